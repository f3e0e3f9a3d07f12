#!/usr/bin/python3
"""An independent safetensors reader (numpy only, no torch, no safetensors package).

It parses the format from its specification (https://github.com/huggingface/safetensors), so it
proves that files written by tsp are readable by other tools, and that tsp reads files written
by other code. Run with Debian's /usr/bin/python3 (python3-numpy).

  check_safetensors.py FILE                      names, dtypes, shapes and checksum lines
  check_safetensors.py FILE --compare OUT        compare with `tsp inspect --checksums FILE` output
  check_safetensors.py FILE --init-seed N --config config.json
                                                 check every value equals tsp's init_param(seed)
                                                 (re-implemented here, bit for bit)
  check_safetensors.py --write-sample FILE       write a sample file (F32, BF16, F16, I32, I64,
                                                 metadata, HF ordering) and print its checksums
  check_safetensors.py --shard DIR --shards N    split DIR/model.safetensors into N shards and
                                                 model.safetensors.index.json, as transformers'
                                                 save_pretrained(max_shard_size=...) writes them
  check_safetensors.py FILE --poison NAME:INDEX:VALUE
                                                 set element INDEX (flat) of tensor NAME (F32 or
                                                 BF16) to VALUE (nan, inf, -inf or a number)
Exit status 0 when every check passes, 1 otherwise.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np

DTYPES = {  # safetensors dtype -> (numpy dtype, bytes)
    "BOOL": (np.bool_, 1), "U8": (np.uint8, 1), "I8": (np.int8, 1), "I16": (np.dtype("<i2"), 2),
    "U16": (np.dtype("<u2"), 2), "F16": (np.dtype("<f2"), 2), "BF16": (np.dtype("<u2"), 2),
    "I32": (np.dtype("<i4"), 4), "U32": (np.dtype("<u4"), 4), "F32": (np.dtype("<f4"), 4),
    "F64": (np.dtype("<f8"), 8), "I64": (np.dtype("<i8"), 8), "U64": (np.dtype("<u8"), 8),
}
CHECKSUM_DTYPES = ("F32", "BF16", "F16", "I32", "I64")


def fail(msg):
    print(f"check_safetensors: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def load(path):
    """Returns (metadata, [(name, dtype, shape, array)]) in data order, validating the file."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        fail(f"{path}: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        fail(f"{path}: header size {n} exceeds the file")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    meta = header.pop("__metadata__", {})
    entries = sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
    pos, out = 0, []
    for name, e in entries:
        begin, end = e["data_offsets"]
        np_dtype, size = DTYPES[e["dtype"]]
        count = int(np.prod(e["shape"], dtype=np.int64))
        if begin != pos or end - begin != count * size:
            fail(f"{path}: tensor {name} offsets [{begin}, {end}) do not tile the buffer")
        pos = end
        arr = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(e["shape"])
        out.append((name, e["dtype"], list(e["shape"]), arr))
    if pos != len(data):
        fail(f"{path}: {len(data) - pos} trailing bytes after the last tensor")
    return meta, out


def as_f64(dtype, arr):
    if dtype == "BF16":  # bf16 = upper half of an IEEE float
        return (arr.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return arr.astype(np.float64)


def checksum_line(name, dtype, shape, arr):
    x = as_f64(dtype, arr).ravel()
    shape_s = "[" + ", ".join(str(d) for d in shape) + "]"
    return (name, dtype, shape_s, float(x.sum()), float(np.abs(x).sum()), float((x * x).sum()))


def print_summary(path, meta, tensors):
    print(f"# {path}: {len(tensors)} tensors")
    for k, v in sorted(meta.items()):
        print(f"# metadata {k} = {v.splitlines()[0] if v else ''}")
    for name, dtype, shape, arr in tensors:
        print(f"{name:52s} {dtype:5s} {str(shape):16s}")
    lines = []
    for name, dtype, shape, arr in tensors:
        if dtype in CHECKSUM_DTYPES:
            line = checksum_line(name, dtype, shape, arr)
            lines.append(line)
            print("checksum\t%s\t%s\t%s\t%.17g\t%.17g\t%.17g" % line)
    return lines


def compare(mine, other_path):
    """Compares our checksum lines with tsp's (same names, order, dtypes, shapes; sums within a
    tolerance). Both sum the same float64 values in different orders; the error of a float64 sum
    of n terms is at most n * 2^-53 * sum|x| (< 1.2e-10 * sum|x| for n <= 1e6), so a relative
    tolerance of 1e-9 of sum|x| only fails on a real difference."""
    theirs = []
    with open(other_path) as f:
        for line in f:
            if line.startswith("checksum\t"):
                p = line.rstrip("\n").split("\t")
                theirs.append((p[1], p[2], p[3], float(p[4]), float(p[5]), float(p[6])))
    if [t[:3] for t in theirs] != [m[:3] for m in mine]:
        fail("tensor lists differ:\n  python: %s\n  tsp:    %s" % ([m[:3] for m in mine][:5],
                                                                   [t[:3] for t in theirs][:5]))
    for m, t in zip(mine, theirs):
        scale = m[4] + 1e-30
        for what, a, b, s in (("sum", m[3], t[3], scale), ("sum|x|", m[4], t[4], scale),
                              ("sum x^2", m[5], t[5], m[5] + 1e-30)):
            if abs(a - b) > 1e-9 * s:
                fail(f"{m[0]}: {what} python {a!r} != tsp {b!r}")
    print(f"check_safetensors: {len(mine)} tensors agree with {other_path}")


# ---- tsp's init_param, re-implemented from its description in src/model/params.cpp ----------

M64 = (1 << 64) - 1


def splitmix64(x):  # numpy uint64 arrays wrap on overflow, as C++ uint64_t does
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def fnv1a(s):
    h = 0xCBF29CE484222325
    for c in s.encode():
        h = ((h ^ c) * 0x100000001B3) & M64
    return h


def init_values(name, std, seed, count):
    """float32 values of init_param for elements 0..count-1."""
    if std == 0.0:
        return np.ones(count, dtype=np.float32)
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(seed) ^ splitmix64(np.uint64(fnv1a(name))))
        idx = np.arange(count, dtype=np.uint64)
        pair = idx >> np.uint64(1)
        a = splitmix64(key ^ splitmix64(np.uint64(2) * pair))
        b = splitmix64(key ^ splitmix64(np.uint64(2) * pair + np.uint64(1)))
    # Box-Muller in double with Python's math (the C library's log/sin/cos, as in C++), one
    # rounding to float at the end.
    u1 = [((int(v) >> 11) + 1) * 2.0 ** -53 for v in a]
    u2 = [(int(v) >> 11) * 2.0 ** -53 for v in b]
    out = np.empty(count, dtype=np.float64)
    for i in range(count):
        r = math.sqrt(-2.0 * math.log(u1[i]))
        t = 2.0 * math.pi * u2[i]
        out[i] = std * (r * math.sin(t) if i & 1 else r * math.cos(t))
    return out.astype(np.float32)


def bf16_round(f32):
    """Round-to-nearest-even float32 -> bf16 bits (finite values)."""
    u = f32.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def llama_specs(c):
    h, nh, nkv, L = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], \
        c["num_hidden_layers"]
    d, inter, V = h // nh, c["intermediate_size"], c["vocab_size"]
    small, resid = 0.02, 0.02 / math.sqrt(2.0 * L)
    specs = [("model.embed_tokens.weight", [V, h], small)]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", [h], 0.0),
                  (p + "self_attn.q_proj.weight", [nh * d, h], small),
                  (p + "self_attn.k_proj.weight", [nkv * d, h], small),
                  (p + "self_attn.v_proj.weight", [nkv * d, h], small),
                  (p + "self_attn.o_proj.weight", [h, nh * d], resid),
                  (p + "post_attention_layernorm.weight", [h], 0.0),
                  (p + "mlp.gate_proj.weight", [inter, h], small),
                  (p + "mlp.up_proj.weight", [inter, h], small),
                  (p + "mlp.down_proj.weight", [h, inter], resid)]
    specs.append(("model.norm.weight", [h], 0.0))
    if not c.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", [V, h], small))
    return specs


def check_init(tensors, config_path, seed):
    with open(config_path) as f:
        c = json.load(f)
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    specs = llama_specs(c)
    got = {name: (dtype, shape, arr) for name, dtype, shape, arr in tensors}
    if [s[0] for s in specs] != [t[0] for t in tensors]:
        fail("tensor names/order differ from the Llama parameter list of %s" % config_path)
    for name, shape, std in specs:
        dtype, fshape, arr = got[name]
        if fshape != shape:
            fail(f"{name}: shape {fshape}, expected {shape}")
        want = init_values(name, std, seed, int(np.prod(shape)))
        if dtype == "F32":
            ok = np.array_equal(arr.ravel().view(np.uint32), want.view(np.uint32))
        elif dtype == "BF16":
            ok = np.array_equal(arr.ravel(), bf16_round(want))
        else:
            fail(f"{name}: unexpected dtype {dtype}")
        if not ok:
            fail(f"{name}: values differ from init_param(seed={seed})")
    print(f"check_safetensors: all {len(specs)} tensors equal init_param(seed={seed}) bit for bit")


# ---- a sample file written here, read by tsp ---------------------------------------------------

def write_file(path, meta, items):
    """Writes (name, dtype, array) items in the given order, header keys sorted as the HF writer."""
    header, blobs, off = ({"__metadata__": meta} if meta else {}), [], 0
    for name, dtype, arr in items:
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header, sort_keys=True).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def shard(model_dir, shards):
    """model.safetensors -> model-0000i-of-0000n.safetensors (consecutive tensors) and the index."""
    single = os.path.join(model_dir, "model.safetensors")
    meta, tensors = load(single)
    per = -(-len(tensors) // shards)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = tensors[k * per:(k + 1) * per]
        write_file(os.path.join(model_dir, name), {"format": "pt"},
                   [(n, d, a.copy()) for n, d, _, a in part])
        weight_map.update({n: name for n, _, _, _ in part})
    total = sum(a.nbytes for _, _, _, a in tensors)
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.remove(single)
    print(f"check_safetensors: {single} -> {shards} shards and model.safetensors.index.json")


def poison(path, spec):
    name, index, value = spec.split(":")
    meta, tensors = load(path)
    items = []
    for n, dtype, _, arr in tensors:
        arr = arr.copy()
        if n == name:
            v = np.float32(float(value))
            if dtype == "F32":
                arr.reshape(-1)[int(index)] = v
            elif dtype == "BF16":
                arr.reshape(-1)[int(index)] = np.array(v).view(np.uint32) >> 16
            else:
                fail(f"{path}: {name} is {dtype}, not F32 or BF16")
        items.append((n, dtype, arr))
    if name not in [n for n, _, _ in items]:
        fail(f"{path}: no tensor {name}")
    write_file(path, meta, items)


def write_sample(path):
    rng = np.random.default_rng(3)
    f32 = rng.standard_normal((5, 7)).astype("<f4")
    bf = bf16_round(rng.standard_normal((3, 4)).astype(np.float32)).astype("<u2")
    f16 = rng.standard_normal((9,)).astype("<f2")
    i32 = rng.integers(-2**31, 2**31 - 1, size=(2, 3), dtype=np.int64).astype("<i4")
    i64 = rng.integers(-2**62, 2**62, size=(4,), dtype=np.int64).astype("<i8")
    scalar = np.array(2.5, dtype="<f4")
    # As the HF writer orders data: by dtype size (descending), then name. The JSON keys are
    # written sorted by name (unlike tsp's writer), so offsets are not in key order.
    items = [("w.i64", "I64", i64), ("a.f32", "F32", f32), ("z.i32", "I32", i32),
             ("s.scalar", "F32", scalar), ("m.bf16", "BF16", bf), ("b.f16", "F16", f16)]
    items.sort(key=lambda t: (-t[2].dtype.itemsize, t[0]))
    write_file(path, {"format": "pt", "origin": "numpy"}, items)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?")
    ap.add_argument("--compare", help="output of `tsp inspect --checksums FILE`")
    ap.add_argument("--init-seed", type=int, help="check values equal tsp init_param(seed)")
    ap.add_argument("--config", help="config.json for --init-seed")
    ap.add_argument("--write-sample", metavar="FILE", help="write a sample file and summarise it")
    ap.add_argument("--shard", metavar="DIR", help="split DIR/model.safetensors into shards")
    ap.add_argument("--shards", type=int, default=3, help="number of shards for --shard")
    ap.add_argument("--poison", metavar="NAME:INDEX:VALUE", help="overwrite one element of FILE")
    args = ap.parse_args()
    if args.shard:
        shard(args.shard, args.shards)
        return
    if args.poison:
        if not args.file:
            ap.error("--poison needs FILE")
        poison(args.file, args.poison)
        return
    path = args.write_sample or args.file
    if not path:
        ap.error("give FILE or --write-sample FILE")
    if args.write_sample:
        write_sample(path)
    meta, tensors = load(path)
    lines = print_summary(path, meta, tensors)
    if args.compare:
        compare(lines, args.compare)
    if args.init_seed is not None:
        if not args.config:
            ap.error("--init-seed needs --config")
        check_init(tensors, args.config, args.init_seed)


if __name__ == "__main__":
    main()
