"""Peer attention kernels: PyTorch SDPA (causal, bf16, GQA) per backend, forward and backward,
on the shapes `mbridge selftest cuda flash_attn` benchmarks, so both are read side by side.
Usage: python3 attn_peer.py    (prints one line per shape and backend)"""
import time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(2, 16, 16, 4096, 128), (2, 32, 8, 4096, 64), (1, 24, 8, 4096, 128), (1, 32, 8, 4096, 128)]
BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


def timed(f, iters=10):
    f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


for b, h, g, s, d in SHAPES:
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, g, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, g, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    fwd_flops = 4.0 * b * h * s * s * d / 2.0
    for name, be in BACKENDS:
        try:
            with sdpa_kernel(be):
                # GQA by repeating K/V where the backend has no native GQA (timed with it, as
                # a model calling it would pay it).
                def fwd():
                    kk, vv = k, v
                    if name != "flash":
                        kk = k.repeat_interleave(h // g, dim=1)
                        vv = v.repeat_interleave(h // g, dim=1)
                        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=True)
                tf = timed(lambda: fwd())
                tfb = timed(lambda: torch.autograd.backward(fwd(), do))
            tb = tfb - tf
            print(f"sdpa {name:9s} b={b} h={h} g={g} s={s} d={d}: fwd {tf*1e3:.3f} ms "
                  f"{fwd_flops/tf/1e12:.1f} TFLOP/s | bwd {tb*1e3:.3f} ms "
                  f"{2.5*fwd_flops/tb/1e12:.1f} TFLOP/s", flush=True)
        except Exception as e:  # a backend that does not take the shape
            print(f"sdpa {name:9s} b={b} h={h} g={g} s={s} d={d}: unavailable ({str(e)[:120]})")
