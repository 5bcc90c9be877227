"""One process, 20 specs and shapes through compiled FlexAttention (CPU forward): what ran?

Each case builds a layer with backend='flex', runs it (no grad, some under inference_mode),
checks ``last_backend == 'flex-compiled'`` and compares with the float64 reference
(`sqa_search.layer.reference`). Dynamo's default recompile limit (8) stays as it is: the layer compiles
one callable per signature on its own code object, so 20 signatures never pile onto one.
Prints one line per case (compile+run seconds, max |diff|) and dynamo's recompile counters.

    python benchmarks/layer_windows/flex_many_specs.py > benchmarks/layer_windows/flex_many_specs.txt
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sqa_search.layer.attention import SparseQueryAttention  # noqa: E402
from sqa_search.layer.reference import reference  # noqa: E402
from sqa_search.layer.spec import AttentionSpec  # noqa: E402

CASES = [  # (H_q, H_kv, window, n_global, causal, N)
    (4, 4, 50, 0, True, 200), (4, 2, 50, 0, True, 200), (6, 4, 50, 3, True, 200), (2, 4, 90, 2, True, 260),
    (4, 4, 200, 0, False, 300), (4, 2, 100, 5, False, 300), (6, 4, 30, 1, False, 150), (4, 1, 128, 0, True, 256),
    (4, 4, None, 4, True, 140), (4, 4, None, 4, False, 140), (4, 2, 7, 0, False, 130), (6, 4, 129, 2, True, 300),
    (4, 4, 50, 0, True, 129), (4, 4, 50, 0, True, 257), (2, 2, 64, 1, False, 200), (4, 2, 300, 0, True, 280),
    (6, 4, 64, 0, False, 384), (4, 4, 1, 0, True, 140), (4, 4, 1, 3, False, 140), (4, 2, 127, 8, True, 400),
]


def main():
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, recompile_limit {torch._dynamo.config.recompile_limit}")
    for i, (hq, hkv, w, g, causal, n) in enumerate(CASES):
        spec = AttentionSpec(64, 8, hq, hkv, head_dim=16, window=w, n_global=g, causal=causal)
        layer = SparseQueryAttention(spec, backend="flex")
        x = torch.randn(1, n, 64)
        start = time.perf_counter()
        mode = torch.inference_mode() if i % 2 else torch.no_grad()
        with mode:
            out = layer(x)
        seconds = time.perf_counter() - start
        ref_layer = SparseQueryAttention(spec).double()
        ref_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
        diff = (out.double() - reference(ref_layer, x.double())).abs().max().item()
        print(f"{i + 1:2d} {spec.label:28s} causal={causal!s:5} N={n:3d} "
              f"{'inference_mode' if i % 2 else 'no_grad':14s} {layer.last_backend} {seconds:5.1f}s max|diff|={diff:.1e}",
              flush=True)
        assert layer.last_backend == "flex-compiled" and diff < 1e-4
    counters = torch._dynamo.utils.counters
    print("dynamo counters:", {k: dict(v) for k, v in counters.items() if k in ("recompiles", "frames", "stats")})


if __name__ == "__main__":
    main()
