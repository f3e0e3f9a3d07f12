#!/usr/bin/python3
"""One Llama block forward + backward in PyTorch (CPU fp32, or a GPU in bf16): the tool users would otherwise pick.

The same maths as tsp's block (include/tsp/model/block.h): pre-RMSNorm, q/k/v projections without
bias, RoPE (Hugging Face rotate_half), causal GQA attention, o_proj, residual, RMSNorm, SwiGLU
(down(silu(gate(x)) * up(x))), residual. Attention is written out (QK^T, causal mask, softmax, PV)
because Debian's torch 1.13 has no scaled_dot_product_attention: it builds the S x S scores, as
eager PyTorch does.

FLOPs are counted with the formula of bench/block.cpp ("model FLOPs" of one forward + backward):
  6*N*P for the GEMMs, P = h*(hq*d) + 2*h*(hkv*d) + (hq*d)*h + 3*h*F,
  7*B*S^2*hq*d for causal attention (fwd 2*S^2*d, bwd 5*S^2*d per head),
so the GFLOP/s ratio of the two equals their tokens/s ratio. (Eager PyTorch actually computes the
full S x S square, twice the causal FLOPs; that is its cost, not credited.)

  /usr/bin/python3 bench/torch_block.py [--h 1024] [--heads 16] [--kv-heads 16] [--ffn 2816]
      [--seq 1024] [--batch 1] [--threads 2] [--repeats 5] [--device cpu|cuda]
      [--dtype fp32|bf16] [--attention auto|manual|sdpa] [--json]

--device cuda (scripts/gpu_check.sh: --dtype bf16, h=4096, 32/8 heads, FFN 14336, S=8192): the
block in eager PyTorch on the GPU, parameters and activations in --dtype (RMSNorm computed in
fp32 and cast back, as Hugging Face's LlamaRMSNorm), timed between torch.cuda.synchronize()
calls. --attention auto: scaled_dot_product_attention (is_causal, GQA by enable_gqa where
available) on a GPU, what a PyTorch user runs there; the written-out S x S attention on the CPU
(Debian's torch 1.13 has no SDPA, and bench_vs_torch.sh's figures were taken with it).

Needs python3-torch (Debian): scripts/bench_vs_torch.sh installs it when missing. The project does
not depend on PyTorch; this script is only for this comparison.
"""
import argparse
import json
import math
import platform
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("torch_block.py: PyTorch is not installed; run scripts/bench_vs_torch.sh "
             "(it installs Debian's python3-torch) or apt-get install python3-torch")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def rms_norm(x, w, eps):
    if x.dtype == torch.float32:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    x32 = x.float()  # low precision: statistics in fp32, as Hugging Face's LlamaRMSNorm
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_tables(S, d, theta):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(S, dtype=torch.float32), inv)  # [S, d/2]
    emb = torch.cat([ang, ang], dim=-1)  # [S, d]
    return emb.cos(), emb.sin()


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def block(x, p, cos, sin, a):
    """x [B, S, h] -> [B, S, h]."""
    B, S, h = x.shape
    hq, hkv, d = a.heads, a.kv_heads, h // a.heads
    xn = rms_norm(x, p["norm1"], a.eps)
    q = F.linear(xn, p["wq"]).view(B, S, hq, d).transpose(1, 2)    # [B, hq, S, d]
    k = F.linear(xn, p["wk"]).view(B, S, hkv, d).transpose(1, 2)   # [B, hkv, S, d]
    v = F.linear(xn, p["wv"]).view(B, S, hkv, d).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    g = hq // hkv
    if a.attention == "sdpa" and a.enable_gqa:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        if g > 1:  # query head j reads kv head j // g
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        if a.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)   # [B, hq, S, S]
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1), v)              # [B, hq, S, d]
    o = o.transpose(1, 2).reshape(B, S, hq * d)
    x2 = x + F.linear(o, p["wo"])
    xn2 = rms_norm(x2, p["norm2"], a.eps)
    mlp = F.linear(F.silu(F.linear(xn2, p["wg"])) * F.linear(xn2, p["wu"]), p["wd"])
    return x2 + mlp


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=0, help="default: = heads")
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--theta", type=float, default=10000.0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["fp32", "f32", "bf16"], default="fp32")
    ap.add_argument("--attention", choices=["auto", "manual", "sdpa"], default="auto")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_block.py: --device cuda but torch.cuda.is_available() is False")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    has_sdpa = hasattr(F, "scaled_dot_product_attention")
    if a.attention == "auto":
        a.attention = "sdpa" if dev.type == "cuda" and has_sdpa else "manual"
    if a.attention == "sdpa" and not has_sdpa:
        sys.exit(f"torch_block.py: torch {torch.__version__} has no scaled_dot_product_attention")
    a.enable_gqa = False
    if a.attention == "sdpa":  # enable_gqa: torch >= 2.5
        try:
            t = torch.zeros(1, 2, 4, 8, device=dev, dtype=dtype)
            F.scaled_dot_product_attention(t, t[:, :1], t[:, :1], is_causal=True, enable_gqa=True)
            a.enable_gqa = True
        except (TypeError, RuntimeError):
            pass
    if a.kv_heads == 0:
        a.kv_heads = a.heads
    if a.h % a.heads or a.heads % a.kv_heads:
        sys.exit(f"torch_block.py: need heads | h and kv_heads | heads "
                 f"(got h={a.h} heads={a.heads} kv_heads={a.kv_heads})")
    torch.set_num_threads(a.threads)
    torch.manual_seed(1234)

    h, F_, S, B = a.h, a.ffn, a.seq, a.batch
    d = h // a.heads
    qw, kvw = a.heads * d, a.kv_heads * d

    def param(*shape, std=0.02):
        return (torch.randn(*shape) * std).to(dev, dtype).requires_grad_()

    def ones(n):
        return torch.ones(n, device=dev, dtype=dtype).requires_grad_()

    p = {
        "norm1": ones(h), "wq": param(qw, h), "wk": param(kvw, h),
        "wv": param(kvw, h), "wo": param(h, qw), "norm2": ones(h),
        "wg": param(F_, h), "wu": param(F_, h), "wd": param(h, F_),
    }
    cos, sin = (t.to(dev, dtype) for t in rope_tables(S, d, a.theta))
    x = torch.randn(B, S, h).to(dev, dtype).requires_grad_()
    dy = torch.randn(B, S, h).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        for t in list(p.values()) + [x]:
            t.grad = None
        y = block(x, p, cos, sin, a)
        y.backward(dy)
        return y

    step()  # warm-up
    sync()
    times = []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        y = step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    finite = bool(torch.isfinite(y).all()) and bool(torch.isfinite(x.grad).all())

    N = B * S
    P = h * qw + 2 * h * kvw + qw * h + 3 * h * F_
    flops = 6.0 * N * P + 7.0 * B * S * S * a.heads * d
    gflops, tok_s = flops / med / 1e9, N / med
    if a.json:
        print(json.dumps({
            "impl": "torch", "torch": torch.__version__, "device": str(dev),
            "dtype": "bf16" if dtype == torch.bfloat16 else "f32", "attention": a.attention,
            "h": h, "heads": a.heads,
            "kv_heads": a.kv_heads, "ffn": F_, "seq": S, "batch": B, "threads": a.threads,
            "repeats": a.repeats, "median_ms": round(med * 1e3, 3),
            "min_ms": round(min(times) * 1e3, 3), "gflop": round(flops / 1e9, 4),
            "gflops": round(gflops, 2), "tokens_per_s": round(tok_s, 1), "finite": finite}))
    else:
        where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
        print(f"# torch_block  torch={torch.__version__}  device={dev} ({where})  "
              f"threads={a.threads}  repeats={a.repeats}  dtype={a.dtype}  attention={a.attention}")
        print(f"# {'impl':<5} {'h':>5} {'heads':>6} {'kv':>3} {'ffn':>5} {'seq':>6} {'batch':>5} "
              f"{'median_ms':>11} {'min_ms':>9} {'GFLOP':>8} {'GFLOP/s':>9} {'tokens/s':>10} ok")
        print(f"  {'torch':<5} {h:>5} {a.heads:>6} {a.kv_heads:>3} {F_:>5} {S:>6} {B:>5} "
              f"{med * 1e3:>11.2f} {min(times) * 1e3:>9.2f} {flops / 1e9:>8.2f} {gflops:>9.2f} "
              f"{tok_s:>10.1f} {'yes' if finite else 'NO'}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
