#!/usr/bin/env python3
"""Causal GQA attention forward + backward in PyTorch on a GPU: scaled_dot_product_attention with
the flash backend, the baseline of bench_attention --device cuda (issue 10: tsp >= 0.7x).

Shapes as bench_attention: q [1, hq, S, d], k, v [1, hkv, S, d], bf16, causal, scale 1/sqrt(d).
GQA through enable_gqa=True where this PyTorch's flash kernel takes it; else k and v are
repeat_interleave'd to hq heads outside the timed region (the row says which), and their
gradients are then those of the repeated tensors (the reduction back to hkv heads is not timed).

FLOPs (FlashAttention's and PyTorch's convention, the same as bench/attention.cpp): forward
2*S^2*d*hq (QK^T and PV, 4*S^2*d*hq, halved by the causal mask), backward 2.5x forward, fwd+bwd
7*S^2*d*hq over the sum of both times. Times: CUDA events around a loop of calls (the median of
--repeats loops); backward is o.backward(dout, retain_graph=True) on one forward's graph.

  python3 bench/torch_attention.py [--sizes 4096,8192,16384,32768] [--heads 32] [--kv-heads 8]
      [--head-dim 128] [--dtype bf16|fp16] [--repeats 5] [--json]
"""
import argparse
import json
import statistics
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("torch_attention.py: PyTorch is not installed")


def flash_context():
    """Only the flash backend (an error, not a silent fallback, when it cannot run a case)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False,
                                              enable_mem_efficient=False)


def time_loop(fn, inner, repeats):
    """Median seconds per call over `repeats` loops of `inner` calls (CUDA events)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def run(S, hq, hkv, d, dtype, repeats):
    g = torch.Generator(device="cuda").manual_seed(1)
    q = (torch.rand(1, hq, S, d, device="cuda", generator=g) * 2 - 1).to(dtype).requires_grad_()
    k = (torch.rand(1, hkv, S, d, device="cuda", generator=g) * 2 - 1).to(dtype)
    v = (torch.rand(1, hkv, S, d, device="cuda", generator=g) * 2 - 1).to(dtype)
    dout = (torch.rand(1, hq, S, d, device="cuda", generator=g) * 2 - 1).to(dtype)
    scale = d ** -0.5
    gqa = "enable_gqa"
    with flash_context():
        try:
            k.requires_grad_(), v.requires_grad_()
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            kk, vv = k, v
            attn = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale,
                                                          enable_gqa=True)
        except (RuntimeError, TypeError):
            gqa = "repeat_interleave"
            kk = k.detach().repeat_interleave(hq // hkv, dim=1).requires_grad_()
            vv = v.detach().repeat_interleave(hq // hkv, dim=1).requires_grad_()
            attn = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale)
        # Warm-up, then inner counts so one loop lasts >= ~20 ms.
        o = attn()
        o.backward(dout)
        torch.cuda.synchronize()
        with torch.no_grad():
            one = time_loop(attn, 1, 1)
        inner_f = max(1, min(50, int(0.02 / max(one, 1e-6))))
        with torch.no_grad():
            t_f = time_loop(attn, inner_f, repeats)
        o = attn()
        bwd = lambda: o.backward(dout, retain_graph=True)
        one = time_loop(bwd, 1, 1)
        inner_b = max(1, min(50, int(0.02 / max(one, 1e-6))))
        t_b = time_loop(bwd, inner_b, repeats)
        finite = bool(torch.isfinite(o).all()) and bool(torch.isfinite(q.grad).all())
    return t_f, t_b, gqa, finite


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4096,8192,16384,32768")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_attention.py: no CUDA device (torch.cuda.is_available() is False)")
    if a.heads % a.kv_heads:
        sys.exit(f"torch_attention.py: --kv-heads {a.kv_heads} must divide --heads {a.heads}")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    dev = torch.cuda.get_device_name(0)
    if not a.json:
        print(f"# torch_attention  torch={torch.__version__}  device={dev}  dtype={a.dtype}  "
              f"repeats={a.repeats} (median)")
        print("# FLOPs: forward 2*S^2*d*hq (causal), backward 2.5x forward, fwd+bwd 7*S^2*d*hq")
        print(f"# {'pass':>8} {'S':>6} {'heads':>5} {'kv':>3} {'d':>4} {'ms':>10} {'TFLOP/s':>8} "
              f"{'gqa':>18}")
    for S in [int(s) for s in a.sizes.split(",")]:
        t_f, t_b, gqa, finite = run(S, a.heads, a.kv_heads, a.head_dim, dtype, a.repeats)
        base = S * S * a.head_dim * a.heads
        for p, t, fl in (("forward", t_f, 2.0 * base), ("backward", t_b, 5.0 * base),
                         ("fwd+bwd", t_f + t_b, 7.0 * base)):
            tflops = fl / t / 1e12
            if a.json:
                print(json.dumps({
                    "bench": "attention", "impl": "torch", "torch": torch.__version__,
                    "device": "cuda:0", "device_name": dev, "dtype": a.dtype, "pass": p,
                    "causal": True, "S": S, "heads": a.heads, "kv_heads": a.kv_heads,
                    "head_dim": a.head_dim, "backend": "flash", "gqa": gqa,
                    "ms": round(t * 1e3, 4), "tflops": round(tflops, 2),
                    "gflops": round(tflops * 1e3, 1), "tokens_per_s": round(S / t),
                    "finite": finite}), flush=True)
            else:
                print(f"  {p:>8} {S:>6} {a.heads:>5} {a.kv_heads:>3} {a.head_dim:>4} "
                      f"{t * 1e3:>10.3f} {tflops:>8.1f} {gqa:>18}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
