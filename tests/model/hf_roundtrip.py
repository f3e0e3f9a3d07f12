"""The Python half of the Hugging Face round trip (tests/model/hf_roundtrip_test.sh).

  hf_roundtrip.py make DIR
      Random LlamaForCausalLM models made and saved by transformers (save_pretrained, safetensors)
      into DIR/<case> for the cases below, and DIR/tokens.bin (llm.c uint16 token file).
  hf_roundtrip.py check DIR NAME:MODEL_DIR:GRAD_FILE[:mismatch] ...
      For each case: transformers loads MODEL_DIR (nothing missing, unexpected or re-initialised),
      computes the loss and PyTorch autograd's gradients on the batch `tsp grad` used (the first
      B·(S+1) tokens of DIR/tokens.bin as B rows of S+1), in fp32 and in fp64, and compares them
      with the loss and gradients tsp wrote to GRAD_FILE (read with the safetensors library).
      Exits 1 when an error exceeds the tolerance, or when a case marked `mismatch` (a negative
      control: the check must be able to fail) is within it. One process checks every case:
      importing torch and transformers takes seconds.

Tolerance (derived from the dimensions, never tuned to pass; docs/huggingface.md has the story).
Errors are measured against the fp64 computation of the same model, as a normwise relative error
per tensor, max|g - g64| / max|g64| (elementwise relative errors are meaningless for entries that
cancel to ~0), and |L - L64| / |L64| for the loss. Each fp32 operation rounds with unit roundoff
u = 2^-24. A reduction of n terms (a GEMM's inner dimension, the softmax/attention sums, a
weight gradient's sum over the B·S tokens) has error ~ lambda·sqrt(n)·u with rounding errors as
independent random variables (Higham & Mary 2019, probabilistic bound; lambda = 4 holds with
probability > 1 - 1e-6 per reduction), and the errors of the m reductions the result depends on
in sequence add up. So

    tol = m · lambda · sqrt(n_max) · u,   n_max = max(h, I, V, B·S),
    m   = 10 per layer and 5 outside the layers for the loss (forward only: norm, q/k/v, RoPE,
          scores, softmax, P·V, o, residual, norm, gate/up, SiLU·up, down, ...),
          30 per layer + 10 for gradients (forward + two GEMMs per linear map backward).

For the test's models (h=64, I=176, V=256, B·S=64, L=2) n_max=256, giving 1.0e-4 for the loss
and 2.7e-4 for gradients. PyTorch's own fp32 result must meet the same bound (else the bound is
wrong, and the test says so); a wrong equation (RoPE base, norm epsilon, head layout) misses it by
orders of magnitude, which the negative control shows.
"""
import contextlib
import math
import os
import struct
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import transformers.models.llama.modeling_llama as ml
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

transformers.logging.set_verbosity_error()

B, S = 2, 32  # the batch `tsp grad --batch 2 --seq 32` reads
U = 2.0**-24
LAMBDA = 4.0

# name: (num_key_value_heads, tie_word_embeddings, max_shard_size or None)
CASES = {
    "mha": (4, False, None),
    "gqa": (2, False, None),
    "tied": (2, True, None),
    "sharded": (2, False, "40KB"),
}


def make(out):
    for i, (name, (kv, tied, shard)) in enumerate(CASES.items()):
        cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                          num_key_value_heads=kv, num_hidden_layers=2, vocab_size=256,
                          max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                          tie_word_embeddings=tied, torch_dtype="float32")
        torch.manual_seed(100 + i)
        model = LlamaForCausalLM(cfg)
        # transformers initialises norm gains to 1; random gains make the test see a norm weight
        # applied in the wrong place.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
        kwargs = {"safe_serialization": True}
        if shard:
            kwargs["max_shard_size"] = shard
        model.save_pretrained(os.path.join(out, name), **kwargs)
    # llm.c token file: 256 int32 header (magic 20240520, version 1, count), uint16 ids.
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 256, size=4096, dtype=np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, ids.size]
    with open(os.path.join(out, "tokens.bin"), "wb") as f:
        f.write(header.tobytes())
        f.write(ids.tobytes())
    print(f"made {', '.join(CASES)} with transformers {transformers.__version__}, "
          f"torch {torch.__version__}")


def read_batch(path):
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(1024), dtype=np.int32)
        assert header[0] == 20240520 and header[1] == 1, f"{path}: not an llm.c uint16 token file"
        ids = np.frombuffer(f.read(2 * B * (S + 1)), dtype=np.uint16)
    return torch.from_numpy(ids.astype(np.int64)).reshape(B, S + 1)


def load(model_dir):
    model, info = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                   output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"FAIL: transformers loading {model_dir}: {problems}")
    # Every parameter transformers holds must be exactly the bits in the files (nothing re-made).
    # model.safetensors or model-0000i-of-0000n.safetensors (a tsp checkpoint also holds
    # optimizer.*.safetensors, with the parameters' names).
    files = [f for f in os.listdir(model_dir)
             if f.startswith("model") and f.endswith(".safetensors")]
    stored = {}
    for f in files:
        with safe_open(os.path.join(model_dir, f), framework="pt") as st:
            for k in st.keys():
                stored[k] = st.get_tensor(k)
    for n, p in model.named_parameters():
        if not torch.equal(p.detach(), stored[n].to(p.dtype)):
            raise SystemExit(f"FAIL: {model_dir}: transformers' {n} differs from the file")
    return model


@contextlib.contextmanager
def exact_fp64():
    """transformers computes RMSNorm, the RoPE angles, the attention softmax and the loss in fp32
    even in an fp64 model (for stability in half precision). For an fp64 reference these run in
    the input's dtype while the context is active; the equations are unchanged."""
    rms, rope, softmax = ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, F.softmax

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        cfg = self.config
        d = cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        freqs = position_ids[:, :, None].to(torch.float64) * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def softmax_keep(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward = rms_forward, rope_forward
    F.softmax = softmax_keep
    try:
        yield
    finally:
        ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, F.softmax = rms, rope, softmax


def loss_and_grads(model, batch, dtype):
    m = model.to(dtype)
    m.zero_grad(set_to_none=True)
    if dtype == torch.float32:
        # transformers' own causal-LM loss: the mean over B·S positions of -log p(t+1 | ..t).
        loss = m(input_ids=batch, labels=batch).loss
    else:
        with exact_fp64():
            logits = m(input_ids=batch).logits
            V = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().to(torch.float64).clone() for n, p in m.named_parameters()}
    return loss.item(), grads


def tolerances(cfg):
    n = max(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, B * S)
    L = cfg.num_hidden_layers
    per = LAMBDA * math.sqrt(n) * U
    return (10 * L + 5) * per, (30 * L + 10) * per


def norm_err(a, ref):
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / scale if scale > 0 else (a - ref).abs().max().item()


def check_one(name, model_dir, grad_file, batch):
    model = load(model_dir)
    loss32, g32 = loss_and_grads(model, batch, torch.float32)
    loss64, g64 = loss_and_grads(model, batch, torch.float64)
    with safe_open(grad_file, framework="pt") as st:
        meta = st.metadata()
        tsp_loss = float(meta["loss"])
        tsp = {k: st.get_tensor(k).to(torch.float64) for k in st.keys() if k != "loss"}
    missing = sorted(set(g64) - set(tsp))
    extra = sorted(set(tsp) - set(g64))
    if missing or extra:
        raise SystemExit(f"FAIL: {name}: gradient names differ: tsp lacks {missing}, has extra "
                         f"{extra}")
    tol_loss, tol_grad = tolerances(model.config)
    e_loss_tsp = abs(tsp_loss - loss64) / abs(loss64)
    e_loss_pt = abs(loss32 - loss64) / abs(loss64)
    worst_tsp = max(((norm_err(tsp[n], g64[n]), n) for n in g64))
    worst_pt = max(((norm_err(g32[n], g64[n]), n) for n in g64))
    tsp_vs_pt = max(norm_err(tsp[n], g32[n]) for n in g64)
    print(f"{name:<10} loss tsp {tsp_loss:.9f} torch32 {loss32:.9f} fp64 {loss64:.9f} | "
          f"loss err tsp {e_loss_tsp:.1e} torch32 {e_loss_pt:.1e} (tol {tol_loss:.1e}) | "
          f"grad err tsp {worst_tsp[0]:.1e} torch32 {worst_pt[0]:.1e} (tol {tol_grad:.1e}) "
          f"tsp-vs-torch32 {tsp_vs_pt:.1e} | worst {worst_tsp[1]} [layout {meta.get('layout')}"
          f", world {meta.get('world')}]")
    bound_ok = e_loss_pt <= tol_loss and worst_pt[0] <= tol_grad
    if not bound_ok:
        raise SystemExit(f"FAIL: {name}: PyTorch's own fp32 error exceeds the derived bound: the "
                         f"tolerance derivation is wrong, not tsp")
    return e_loss_tsp <= tol_loss and worst_tsp[0] <= tol_grad


def check(d, cases):
    batch = read_batch(os.path.join(d, "tokens.bin"))
    wrong = []
    for c in cases:
        fields = c.split(":")
        if len(fields) not in (3, 4) or (len(fields) == 4 and fields[3] != "mismatch"):
            raise SystemExit(f"bad case {c!r}: NAME:MODEL_DIR:GRAD_FILE[:mismatch]")
        name, model_dir, grad_file = fields[:3]
        control = len(fields) == 4
        within = check_one(name, model_dir, grad_file, batch)
        if control and within:
            wrong.append(f"{name} (a negative control, within the tolerance: the check cannot "
                         f"tell a wrong model from a right one)")
        elif control:
            print(f"negative control: {name} exceeds the tolerance, as it must")
        elif not within:
            wrong.append(f"{name} (loss or gradients outside the fp32 tolerance)")
    if wrong:
        raise SystemExit(f"FAIL: {'; '.join(wrong)}")
    print(f"PASS: {len(cases)} cases as expected")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(__doc__)
