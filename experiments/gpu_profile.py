import torch, time
from sparsemem.modeling.block_decode import BlockSummaryCache, block_decode_attention
from sparsemem.modeling.scorer import PooledKeyScorer
from torch.profiler import profile, ProfilerActivity
B, N = 16, 131072
q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16)
opts = dict(block_size=128, query_block_size=128, sink_tokens=128, local_tokens=256, top_k_blocks=1, block_fraction=0.125, query_chunk_size=512)
sc = PooledKeyScorer("minmax"); cache = BlockSummaryCache(128); cache.update(k)
for _ in range(5): block_decode_attention(q, k, v, 128**-0.5, sc, opts, cache)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20): block_decode_attention(q, k, v, 128**-0.5, sc, opts, cache)
cpu = (time.perf_counter() - t) / 20 * 1000
torch.cuda.synchronize(); wall = (time.perf_counter() - t) / 20 * 1000
print(f"enqueue {cpu:.3f} ms/call, wall {wall:.3f} ms/call")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5): block_decode_attention(q, k, v, 128**-0.5, sc, opts, cache)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))
