# Can the decode kernel read the block store in place from pinned host memory (UVA), and how fast?
import torch, math
from sparsemem.modeling import block_decode as bd
from sparsemem.bench import cuda_time_ms
B, N, H, HKV, D, BS = 1, 131072, 32, 8, 128, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, HKV, H // HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
k = torch.randn(B, HKV, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
v = torch.randn(B, HKV, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
nb = N // BS
budget = math.ceil((nb - 3) * 0.125)
index = torch.stack([torch.randperm(nb - 3, device="cuda")[:budget] + 1 for _ in range(B * HKV)]).view(B, HKV, budget)
high = N - 1 - 256
ref = bd._tiles_triton(q, k, v, index, 128, high, D**-0.5, BS, torch.float32)
kh, vh = k.cpu().pin_memory(), v.cpu().pin_memory()
print("pinned", kh.is_pinned())
try:
    got = bd._tiles_triton(q, kh, vh, index, 128, high, D**-0.5, BS, torch.float32)
    torch.cuda.synchronize()
    print("max diff", float((got[0] - ref[0]).abs().max()), "lse", float((got[1] - ref[1]).abs().max()))
    gpu_ms = cuda_time_ms(lambda: bd._tiles_triton(q, k, v, index, 128, high, D**-0.5, BS, torch.bfloat16), warmup=3, repeats=20)
    host_ms = cuda_time_ms(lambda: bd._tiles_triton(q, kh, vh, index, 128, high, D**-0.5, BS, torch.bfloat16), warmup=3, repeats=20)
    read = (budget + 3) * BS * HKV * D * 2 * 2 * B
    print(f"GPU-resident {gpu_ms:.3f} ms, pinned host {host_ms:.3f} ms, {read/2**20:.1f} MiB read, {read/host_ms/1e6:.1f} GB/s over the bus")
except Exception as error:  # noqa: BLE001
    print("pinned host tensors refused:", type(error).__name__, str(error)[:300])
