import torch, time
from torch.profiler import profile, ProfilerActivity
from sparsemem.modeling.block_sparse import plan_block_sparse, run_flex, block_sparse_attention
from sparsemem.modeling.scorer import PooledKeyScorer
from sparsemem.bench import cuda_time_ms
N = 65536
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, 32, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
k = torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
v = torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
opts = dict(block_size=128, query_block_size=128, sink_tokens=128, local_tokens=256, top_k_blocks=1, block_fraction=0.1, query_chunk_size=512)
sc = PooledKeyScorer("minmax")
with torch.no_grad():
    print("plan ms", cuda_time_ms(lambda: plan_block_sparse(q, k, sc, opts), warmup=3, repeats=10))
    print("total ms", cuda_time_ms(lambda: block_sparse_attention(q, k, v, 128**-0.5, sc, opts), warmup=3, repeats=10))
    plan = plan_block_sparse(q, k, sc, opts)
    print("kernel ms", cuda_time_ms(lambda: run_flex(q, k, v, plan, 128**-0.5, need_lse=False), warmup=3, repeats=10))
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): plan_block_sparse(q, k, sc, opts)
    print("plan enqueue ms", (time.perf_counter() - t) * 100)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3): plan_block_sparse(q, k, sc, opts)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
