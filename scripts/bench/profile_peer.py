"""Where the torch.compile peer (`peer_torch.py titan`) spends a training step: the CUDA
kernels of two steps after warm-up, by total time, from torch.profiler.
Usage: python3 profile_peer.py SIZE SEQ MBS   e.g. 1b 4096 2"""
import os
import sys
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
import peer_torch  # noqa: E402

size, T, B = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = peer_torch.llama_cfg(size)
with torch.device("cuda"):
    m = peer_torch.Titan(c, T)
cm = torch.compile(m)
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
tok = torch.randint(0, c["V"], (B, T), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = cm(tok, tok)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
acts = [torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=acts) as prof:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
key = "self_device_time_total" if hasattr(rows[0], "self_device_time_total") else "self_cuda_time_total"
rows.sort(key=lambda e: -getattr(e, key))
total = sum(getattr(e, key) for e in rows)
print(f"peer kernels over 2 steps: {total/2e3:.1f} ms per step")
for e in rows[:25]:
    t = getattr(e, key)
    print(f"  {t/2e3:8.2f} ms/step  x{e.count//2:<5d} {e.key[:110]}")
