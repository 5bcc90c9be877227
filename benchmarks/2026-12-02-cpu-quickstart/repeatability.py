import itertools, math
import numpy as np
from sqa_search.search.studies import open_study
from sqa_search.search.records import read_records
def named(path):
    h = open_study(path)
    out = {}
    for r in read_records(h.study):
        if r.complete and r.anchor:
            out[r.anchor] = (r.quality, r.quality_se or 0.0)
    return out
a = named('/tmp/qs1/studies/quickstart'); b = named('/tmp/qs2/studies/quickstart_seed2')
names = sorted(set(a) & set(b))
def ranks(x):
    order = np.argsort(x); r = np.empty(len(x)); r[order] = np.arange(len(x)); return r
qa = np.array([a[n][0] for n in names]); qb = np.array([b[n][0] for n in names])
rho = np.corrcoef(ranks(qa), ranks(qb))[0, 1]
print(f"{len(names)} named variants; Spearman rho = {rho:.3f}")
for n in names: print(f"  {n:14} seeds 0,1: {a[n][0]:.4f} ± {a[n][1]:.4f}   seeds 2,3: {b[n][0]:.4f} ± {b[n][1]:.4f}")
def separated(run):
    out = {}
    for x, y in itertools.combinations(names, 2):
        d = run[x][0] - run[y][0]; s = math.hypot(run[x][1], run[y][1])
        if abs(d) > 2 * s: out[(x, y)] = d > 0
    return out
sa, sb = separated(a), separated(b)
for label, s, other in (("seeds 0,1", sa, b), ("seeds 2,3", sb, a)):
    agree = sum((other[x][0] - other[y][0] > 0) == up for (x, y), up in s.items())
    print(f"{label}: {len(s)} of {len(names)*(len(names)-1)//2} pairs separated beyond 2 SE; same order in the other run: {agree}/{len(s)}")
    for (x, y), up in s.items():
        if (other[x][0] - other[y][0] > 0) != up: print(f"    reversed: {x} vs {y}")
