# The cuDNN attention graphs PyTorch builds (what src/ops/cuda/cudnn/sdpa.rs writes itself):
# runs PyTorch's cuDNN SDPA forward + backward on a small Llama-3.2-1B-like attention (q, k, v
# as views of one fused QKV buffer, GQA 32/8, d=64) under cuDNN's API log. On the device:
#   CUDNN_FRONTEND_LOG_INFO=1 CUDNN_FRONTEND_LOG_FILE=$OUT/fe.log CUDNN_LOGLEVEL_DBG=3 \
#   CUDNN_LOGDEST_DBG=$OUT/be.log python3 scripts/bench/cudnn_graph_log.py [heads]
# be.log's `cudnnBackendFinalizeGraphVisualize` lines hold each graph as JSON (tensors, nodes),
# its `cudnnBackendExecute` entries the variant packs (uids, by-value scalars).
import os, sys, torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
b, s, h, g, d = 2, 256, int(sys.argv[1]) if len(sys.argv) > 1 else 32, 8, 64
dev = "cuda"
qkv = torch.randn(b, s, (h + 2 * g) * d, device=dev, dtype=torch.bfloat16, requires_grad=True)
q = qkv[..., : h * d].view(b, s, h, d).transpose(1, 2)
k = qkv[..., h * d : (h + g) * d].view(b, s, g, d).transpose(1, 2)
v = qkv[..., (h + g) * d :].view(b, s, g, d).transpose(1, 2)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    try:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        print("gqa ok", o.shape, o.stride(), flush=True)
    except Exception as e:
        print("gqa failed:", e, flush=True)
        k = k.repeat_interleave(h // g, 1); v = v.repeat_interleave(h // g, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    o.float().square().sum().backward()
torch.cuda.synchronize()
print("done", flush=True)
