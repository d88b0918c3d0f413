import sys, time, torch
import sparsekern
from sparsekern.ops import prune as P
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
w = torch.randn(4096, 4096, generator=g); s = torch.rand(4096, generator=g) + 0.1
for _ in range(5): P.wanda_prune(w, s, 2, 4)
ts = []
for _ in range(40):
    t0 = time.perf_counter(); P.wanda_prune(w, s, 2, 4); ts.append(time.perf_counter() - t0)
ts.sort(); print(sys.argv[1], f"median {ts[len(ts)//2]*1e3:.2f} ms  min {ts[0]*1e3:.2f} ms")
