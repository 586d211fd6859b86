"""Would the optimizer step gain from running beside the next forward? One GPU, PyTorch only.

Stream A runs the GEMMs of the Llama-3.2-1B layers' forward (seq 4096, micro batch 2: 8192
tokens, bf16), stream B PyTorch's fused AdamW over 1.24 B fp32 parameters (28 bytes per parameter,
as many as mbridge's fused Adam moves). Each is timed alone and both together, repeated until the GPU sits at its
power limit, so the table shows how much of B hides behind A when they share the GPU.
Usage: python3 overlap_probe.py [REPEATS]
"""
import sys, time
import torch

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
N, H, FFN, QKV, LAYERS = 8192, 2048, 8192, 3072, 16
PARAMS = 1_235_814_400

def gemm_inputs():
    x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    w = {k: torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.02
         for k, (o, i) in dict(qkv=(QKV, H), proj=(H, H), fc1=(2 * FFN, H), fc2=(H, FFN)).items()}
    return x, w

def forward_gemms(x, w):
    for _ in range(LAYERS):
        torch.mm(x, w["qkv"].t()); torch.mm(x, w["proj"].t())
        h = torch.mm(x, w["fc1"].t())
        torch.mm(h[:, :FFN], w["fc2"].t())

def adam_optimizer(chunks=98):
    # PyTorch's fused AdamW on fp32 parameters and gradients: reads p, g, m, v and writes
    # p, m, v, 28 bytes per parameter, as many as mbridge's fused Adam moves.
    n = PARAMS // chunks
    params = [torch.nn.Parameter(torch.randn(n, device="cuda") * 0.02) for _ in range(chunks)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return torch.optim.AdamW(params, lr=1e-4, fused=True)

def timed(fn, reps):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps

def main():
    x, w = gemm_inputs()
    opt = adam_optimizer()
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    high = torch.cuda.Stream(priority=-1)
    def gemms(stream=a):
        with torch.cuda.stream(stream):
            forward_gemms(x, w)
    def adam():
        with torch.cuda.stream(b):
            opt.step()
    def both():
        gemms(); adam()
    def both_high():
        gemms(high); adam()
    for name, fn in [("warm-up", both), ("gemms alone", gemms), ("adam alone", adam),
                     ("both, equal priority", both), ("both, gemms high", both_high),
                     ("gemms alone again", gemms)]:
        print(f"{name:22s} {timed(fn, REPS):8.2f} ms", flush=True)

main()
