#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/): small valid files
and near-valid ones, each one defect away from valid, so the fuzzer starts next to every check.
Deterministic; rerun after changing it. Inputs of past findings are written here too (regress_*).
Usage: python3 tests/fuzz/make_corpus.py"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- safetensors -------------------------------------------------------------------------------
SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "U8": 1, "F64": 8, "BOOL": 1}


def safetensors(tensors, metadata=None, header_patch=None, tail=b"", size_delta=0):
    """tensors: [(name, dtype, shape)]; data is a byte ramp. header_patch edits the header dict."""
    header, data, off = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        data += bytes((off + i) % 251 for i in range(n))
        off += n
    if header_patch:
        header_patch(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the reference writer pads the header to 8 bytes
    return struct.pack("<Q", len(h) + size_delta) + h + data + tail


LAYER = [("model.embed_tokens.weight", "F32", [8, 4]),
         ("model.layers.0.input_layernorm.weight", "F32", [4]),
         ("model.layers.0.self_attn.q_proj.weight", "F32", [4, 4]),
         ("model.norm.weight", "F32", [4])]
write("safetensors_fuzz", "valid_f32", safetensors(LAYER, {"format": "pt"}))
write("safetensors_fuzz", "valid_bf16", safetensors([("w", "BF16", [3, 5]), ("b", "BF16", [5])]))
write("safetensors_fuzz", "valid_mixed",
      safetensors([("f16", "F16", [2, 3]), ("i32", "I32", [4]), ("i64", "I64", [2, 1]),
                   ("u8", "U8", [3]), ("f64", "F64", [1]), ("flag", "BOOL", [2])]))
write("safetensors_fuzz", "valid_scalar_and_empty",
      safetensors([("scalar", "F32", []), ("empty", "F32", [0, 4]), ("x", "F32", [2])]))
write("safetensors_fuzz", "valid_no_tensors", safetensors([], {"step": "7"}))
write("safetensors_fuzz", "bad_overlap",
      safetensors([("a", "F32", [2]), ("b", "F32", [2])],
                  header_patch=lambda h: h["b"].update(data_offsets=[4, 12])))
write("safetensors_fuzz", "bad_hole", safetensors([("a", "F32", [2])], tail=b"\0\0\0\0"))
write("safetensors_fuzz", "bad_size_mismatch",
      safetensors([("a", "F32", [2, 2])], header_patch=lambda h: h["a"].update(shape=[3, 2])))
write("safetensors_fuzz", "bad_dtype",
      safetensors([("a", "F32", [2])], header_patch=lambda h: h["a"].update(dtype="F12")))
write("safetensors_fuzz", "bad_huge_shape",
      safetensors([("a", "F32", [2])],
                  header_patch=lambda h: h["a"].update(shape=[2**62, 2**62])))
write("safetensors_fuzz", "bad_negative_dim",
      safetensors([("a", "F32", [2])], header_patch=lambda h: h["a"].update(shape=[-2])))
write("safetensors_fuzz", "bad_header_size", safetensors(LAYER, size_delta=1 << 20))
write("safetensors_fuzz", "bad_truncated", safetensors(LAYER)[:-7])
write("safetensors_fuzz", "bad_metadata",
      safetensors([("a", "F32", [1])], {"format": "pt"},
                  header_patch=lambda h: h["__metadata__"].update(n=3)))
dup = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' \
      b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
write("safetensors_fuzz", "bad_duplicate", struct.pack("<Q", len(dup)) + dup + bytes(8))
write("safetensors_fuzz", "bad_not_json", struct.pack("<Q", 8) + b"{nope!!}")
write("safetensors_fuzz", "bad_short", b"\x10\0\0")

# --- config.json -------------------------------------------------------------------------------
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "initializer_range": 0.02, "torch_dtype": "float32"}


def config(name, **changes):
    c = dict(TINY)
    for k, v in changes.items():
        if v is ...:
            c.pop(k, None)
        else:
            c[k] = v
    write("config_fuzz", name, json.dumps(c, indent=2) + "\n")


config("valid_tiny")
config("valid_minimal", architectures=..., model_type=..., hidden_act=..., rope_scaling=...,
       attention_bias=..., mlp_bias=..., initializer_range=..., torch_dtype=...,
       num_key_value_heads=..., rms_norm_eps=..., rope_theta=..., max_position_embeddings=...,
       tie_word_embeddings=...)
config("valid_hf_newer", torch_dtype=..., dtype="bfloat16", head_dim=16, tie_word_embeddings=True,
       bos_token_id=1, eos_token_id=2, use_cache=True, pretraining_tp=1)
config("bad_heads", num_attention_heads=3)
config("bad_gqa", num_key_value_heads=3)
config("bad_head_dim", head_dim=8)
config("bad_types", hidden_size="64", rms_norm_eps="small")
config("bad_rope_scaling", rope_scaling={"type": "linear", "factor": 2.0})
config("bad_huge", intermediate_size=288230376151711744, vocab_size=2**62)
config("bad_negative", num_hidden_layers=-1)
config("bad_dtype", torch_dtype="float16")
config("bad_model_type", model_type="mistral")
write("config_fuzz", "bad_truncated", json.dumps(TINY)[:40])
write("config_fuzz", "bad_array", "[1, 2, 3]")
write("config_fuzz", "empty", "")

# --- llm.c token files and training text --------------------------------------------------------
MAGIC16, MAGIC32 = 20240520, 20240801


def tokens(ids, magic=MAGIC16, version=1, count=None, width=2):
    header = [magic, version, len(ids) if count is None else count] + [0] * 253
    fmt = "<%d%s" % (len(ids), "H" if width == 2 else "I")
    return struct.pack("<256i", *header) + struct.pack(fmt, *ids)


ramp = [(i * 37) % 256 for i in range(64)]
write("tokens_fuzz", "valid_u16", tokens(ramp))
write("tokens_fuzz", "valid_u16_large_ids", tokens([65535, 0, 50000, 1] * 8))
write("tokens_fuzz", "valid_u32", tokens([70000, 1, 2**31 - 1, 5] * 8, MAGIC32, 7, width=4))
write("tokens_fuzz", "valid_empty_u16", tokens([]))
write("tokens_fuzz", "bad_version", tokens(ramp, version=2))
write("tokens_fuzz", "bad_count", tokens(ramp, count=65))
write("tokens_fuzz", "bad_negative_count", tokens(ramp, count=-1))
write("tokens_fuzz", "bad_u32_id", tokens([2**31, 1, 2, 3] * 8, MAGIC32, 7, width=4))
write("tokens_fuzz", "bad_truncated_header", tokens(ramp)[:600])
damaged = bytearray(tokens(ramp))
damaged[0] ^= 0x01  # a flipped bit in the magic number
write("tokens_fuzz", "bad_magic_bit", bytes(damaged))
write("tokens_fuzz", "text_kjv",
      "In the beginning God created the heaven and the earth.\n"
      "And the earth was without form, and void; and darkness was upon the face of the deep.\n")
write("tokens_fuzz", "text_short", "Amen.")
write("tokens_fuzz", "text_binary", bytes(range(256)))

# --- past findings (docs/testing.md): each stays in the corpus, so the replay test in every
# build keeps it fixed ------------------------------------------------------------------------
# A number beyond double's range made nlohmann throw out_of_range, which escaped as a non-tsp
# exception (message without the file name).
write("config_fuzz", "regress_number_overflow", '{"hidden_size": 64, "rope_theta": 1e353}')
# Corpus leaked its file descriptor on every rejected file (here: empty).
write("tokens_fuzz", "regress_empty_fd_leak", b"")
