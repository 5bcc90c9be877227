"""Windowed attention on CPU, side by side: this layer, the seed's layer, and RxNN's Flex-SQA loop.

Setting (issue 12): 1 torch thread, fp32, batch 1, d_model=256, H=16, 8 query / 8 KV heads
(head_dim 16), window 128, 16 global tokens; causal and bidirectional; forward (no grad) and
forward+backward; N = 4096 and 16384.

* ``layer``: `sqa_search.layer.attention.SparseQueryAttention` as it is in this checkout (auto backend).
* ``seed``: the same class at git ref ``--seed-ref`` (default fac32df, the layer before issue 12),
  loaded from `git show` into a temporary package.
* ``rxnn``: a minimal, faithful re-implementation of RxNN's ``FlexSparseQueryAttention.forward``
  (RxAI-dev/RxNN, python/src/rxnn/experimental/attention.py, read at commit cafcc7d), written
  for this timing, not copied: global tokens are prepended to the queries only; the global
  queries attend to all keys; then a Python loop over 128-token query chunks, each attending
  (SDPA, no mask, RxNN's ``is_causal`` flag) to keys [start - 128, end + 128); outputs
  concatenated, projected, the global rows dropped. RoPE as RxNN's ``_rotate`` does it. Note what that algorithm computes: chunked
  neighbourhoods rather than a per-token sliding window, no attention from the sequence to the
  global tokens, and with is_causal a top-left-aligned triangle inside each chunk. It is the
  speed baseline the issue names, not a correct layer.

The three run interleaved (one repeat of each in turn), so the machine's slow spells (20-30% on
this shared VM) hit all three alike. Printed per cell: median ms, and min-max over the repeats.

The block-mask memory part (``--mask-memory``) builds the FlexAttention BlockMask of a windowed,
global-token spec in a fresh process per N and prints the peak resident-memory growth (ru_maxrss)
and the BlockMask's own tensor bytes; ``--dense`` does the same with torch's uncompiled
``create_block_mask`` (what the seed did), which evaluates mask_mod over all N x N pairs.

    python benchmarks/layer_windows/bench_windows.py --repeats 7 > table.md
    python benchmarks/layer_windows/bench_windows.py --mask-memory
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sqa_search.layer.attention import SparseQueryAttention  # noqa: E402
from sqa_search.layer.spec import AttentionSpec  # noqa: E402

D_MODEL, HEADS, Q_HEADS, KV_HEADS, WINDOW, GLOBALS = 256, 16, 8, 8, 128, 16


class RxNNFlexSQA(torch.nn.Module):
    """RxNN's Flex-SQA forward, re-implemented minimally for timing (see module docstring)."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal, self.hd = causal, D_MODEL // HEADS
        self.q_proj = torch.nn.Linear(D_MODEL, Q_HEADS * self.hd, bias=False)
        self.k_proj = torch.nn.Linear(D_MODEL, KV_HEADS * self.hd, bias=False)
        self.v_proj = torch.nn.Linear(D_MODEL, KV_HEADS * self.hd, bias=False)
        self.out_proj = torch.nn.Linear(Q_HEADS * self.hd, D_MODEL)
        self.global_tokens = torch.nn.Parameter(torch.randn(1, GLOBALS, D_MODEL))
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("freqs", torch.outer(torch.arange(1 << 18).float(), inv_freq))

    def _heads(self, t, h):
        b, n, _ = t.shape
        return t.view(b, n, h, self.hd).transpose(1, 2)

    def _rope(self, x):
        """RxNN's RotaryPositionalEmbedding._rotate: interleaved pairs, cos/sin of cached
        frequencies evaluated on every call."""
        freqs = self.freqs[None, None, : x.shape[-2]]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * torch.cos(freqs) - x2 * torch.sin(freqs),
                          x1 * torch.sin(freqs) + x2 * torch.cos(freqs)), dim=-1)

    def _sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=Q_HEADS != KV_HEADS)

    def forward(self, x):
        b, n, _ = x.shape
        g = self.global_tokens.expand(b, -1, -1)
        q = self._heads(self.q_proj(torch.cat([g, x], 1)), Q_HEADS)
        k, v = self._heads(self.k_proj(x), KV_HEADS), self._heads(self.v_proj(x), KV_HEADS)
        q, k = self._rope(q), self._rope(k)  # RxNN ropes q (globals first) and k separately
        global_q, local_q = q[:, :, :GLOBALS], q[:, :, GLOBALS:]
        outs = [self._sdpa(global_q, k, v)]
        for start in range(0, n, WINDOW):
            end = min(start + WINDOW, n)
            lo, hi = max(0, start - WINDOW), min(n, end + WINDOW)
            outs.append(self._sdpa(local_q[:, :, start:end], k[:, :, lo:hi], v[:, :, lo:hi]))
        o = torch.cat(outs, 2).transpose(1, 2).reshape(b, n + GLOBALS, Q_HEADS * self.hd)
        return self.out_proj(o)[:, GLOBALS:]


def seed_layer_class(ref: str):
    """SparseQueryAttention and AttentionSpec as they were at git ref `ref`."""
    pkg = Path(tempfile.mkdtemp(prefix="seed-layer-")) / "seed_sqa"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("attention", "spec"):
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:sqa_search/{name}.py"],
                             check=True, capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(src)
    sys.path.insert(0, str(pkg.parent))
    import seed_sqa.attention as seed_attention
    import seed_sqa.spec as seed_spec

    return seed_attention.SparseQueryAttention, seed_spec.AttentionSpec


def time_cell(layers: dict, n: int, grad: bool, repeats: int) -> dict:
    x = torch.randn(1, n, D_MODEL, requires_grad=grad)
    grad_out = torch.randn(1, n, D_MODEL)

    def step(layer):
        with torch.set_grad_enabled(grad):
            out = layer(x)
            if grad:
                out.backward(grad_out)

    for layer in layers.values():  # warm-up: masks, caches, allocator
        step(layer)
    times = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            step(layer)
            times[name].append(time.perf_counter() - start)
    return times


def speed_table(args) -> None:
    torch.set_num_threads(1)
    seed_cls, seed_spec_cls = seed_layer_class(args.seed_ref)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}, "
          f"seed {args.seed_ref}; ms: median [min-max]\n")
    print("| causal | mode | N | layer (backend) | seed (backend) | rxnn | rxnn / layer | seed / layer |")
    print("|---|---|---|---|---|---|---|---|")
    for causal in (False, True):
        kw = dict(window=WINDOW, n_global=GLOBALS, causal=causal)
        layers = {
            "layer": SparseQueryAttention(AttentionSpec(D_MODEL, HEADS, Q_HEADS, KV_HEADS, **kw)),
            "seed": seed_cls(seed_spec_cls(D_MODEL, HEADS, Q_HEADS, KV_HEADS, **kw)),
            "rxnn": RxNNFlexSQA(causal),
        }
        for grad in (False, True):
            for n in args.lengths:
                t = time_cell(layers, n, grad, args.repeats)
                med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
                cell = {k: f"{med[k]:.1f} [{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}]" for k, v in t.items()}
                print(f"| {causal} | {'fwd+bwd' if grad else 'fwd'} | {n} | {cell['layer']} "
                      f"({layers['layer'].last_backend}) | {cell['seed']} ({layers['seed'].last_backend}) | "
                      f"{cell['rxnn']} | {med['rxnn'] / med['layer']:.2f}x | {med['seed'] / med['layer']:.2f}x |",
                      flush=True)


# ----- block-mask memory -------------------------------------------------------------------------
_MEASURE = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
n, dense = int(sys.argv[2]), sys.argv[3] == "dense"
from sqa_search.layer.masks import Visibility, visibility_mask
from sqa_search.layer import attention
rule = Visibility(causal=False, window=128)
torch.arange(10).sum()  # allocator and kernels warm before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if dense:
    from torch.nn.attention.flex_attention import create_block_mask
    bm = create_block_mask(visibility_mask(rule, n, 16), None, None, n, n + 16, device="cpu")
else:
    bm = attention._flex_block_mask(rule, n, 16, "cpu")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
held = sum(t.numel() * t.element_size() for t in bm.as_tuple() if isinstance(t, torch.Tensor))
print(json.dumps({"n": n, "peak_mib": peak / 1024, "blockmask_mib": held / 2**20}))
"""


def mask_memory(args) -> None:
    print("| N | builder | peak RSS growth (MiB) | BlockMask tensors (MiB) | (N/128)^2 |")
    print("|---|---|---|---|---|")
    for n in args.mask_lengths:
        for kind in (["dense"] if args.dense and n <= 8192 else []) + ["kv-blocks"]:
            out = subprocess.run([sys.executable, "-c", _MEASURE, str(REPO), str(n), "dense" if kind == "dense" else "kv"],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            label = "create_block_mask, uncompiled (seed)" if kind == "dense" else "from KV block indices (this layer)"
            print(f"| {n} | {label} | {r['peak_mib']:.1f} | {r['blockmask_mib']:.2f} | {math.ceil(n / 128) ** 2} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--seed-ref", default="fac32df")
    p.add_argument("--mask-memory", action="store_true", help="only the block-mask memory table")
    p.add_argument("--mask-lengths", type=int, nargs="+", default=[4096, 8192, 16384, 131072])
    p.add_argument("--dense", action="store_true", help="also the seed's dense builder (N <= 8192)")
    args = p.parse_args()
    if args.mask_memory:
        mask_memory(args)
    else:
        speed_table(args)


if __name__ == "__main__":
    main()
