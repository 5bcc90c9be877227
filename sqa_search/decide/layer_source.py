"""The exported standalone module's source, generated from the library's own layer source, so there
is one implementation.

spec.py, masks.py, rope.py and attention.py (LAYER_MODULES) are inlined in that order (they import
only the standard library, torch and each other), their imports of each other and repeated
`from __future__` lines dropped, then the configuration and `load()` are appended.
tests/test_export.py runs the result in a fresh interpreter that cannot import sqa_search and
compares it with the library layer.
"""

from __future__ import annotations

import ast
from importlib import resources

from ..layer.spec import AttentionSpec
from .errors import ExportError

LAYER_MODULES = ("spec", "masks", "rope", "attention")  # inlined in this order
DEFAULT_MODULE = "sqa_layer"


def module_source(name: str) -> str:
    """The source of sqa_search/layer/<name>.py as installed."""
    return resources.files("sqa_search.layer").joinpath(f"{name}.py").read_text(encoding="utf-8")


def inline(name: str, text: str) -> str:
    """A module's source with its intra-package imports and `from __future__` lines taken out.

    A relative import that renames (``from .masks import causal as _causal``) becomes an
    assignment, so the inlined code still finds the name. An import of the package by its name
    is refused: the exported file must stand alone.
    """
    replace: dict[int, tuple[int, list[str]]] = {}  # first line -> (last line, replacement lines)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or node.module == "__future__"):
            indent = " " * node.col_offset
            aliases = [f"{indent}{a.asname} = {a.name}" for a in node.names
                       if node.level > 0 and a.asname and a.asname != a.name]
            # an import alone in a function body leaves a `pass`, so the body stays valid
            replace[node.lineno] = (node.end_lineno, aliases or ([f"{indent}pass"] if node.col_offset else []))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m == "sqa_search" or m.startswith("sqa_search.") for m in modules):
                raise ExportError(f"sqa_search/{name}.py line {node.lineno} imports sqa_search itself; the layer's "
                                  f"modules ({', '.join(LAYER_MODULES)}) may import only the standard library, "
                                  f"torch and each other (relative imports)")
    lines, out, i = text.splitlines(), [], 1
    while i <= len(lines):
        if i in replace:
            last, new = replace[i]
            out += new
            i = last + 1
        else:
            out.append(lines[i - 1])
            i += 1
    return "\n".join(out).strip("\n") + "\n"


def library_layer_source() -> str:
    """The LAYER_MODULES inlined into one source text (see above)."""
    parts = []
    for name in LAYER_MODULES:
        banner = f"# {'=' * 30} inlined from sqa_search/layer/{name}.py {'=' * 30}\n"
        parts.append(banner + inline(name, module_source(name)))
    return "\n\n".join(parts)


_APPENDIX = '''
SPEC = AttentionSpec(d_model=D_MODEL, n_heads=N_HEADS, n_q_heads=N_Q_HEADS, n_kv_heads=N_KV_HEADS,
                     head_dim=HEAD_DIM, window=WINDOW, n_global=N_GLOBAL, causal=CAUSAL, rope=ROPE, bias=BIAS)
CONFIG = SPEC.to_dict()
_LibraryLayer = SparseQueryAttention


class SparseQueryAttention(_LibraryLayer):
    """The library's layer (above, unchanged) built with this export's configuration.

    backend: "auto" (fused SDPA for full attention; FlexAttention on CUDA for windows and global
    tokens; the blocked window path elsewhere) or a backend the library allows forcing. The path
    that ran is in ``last_backend``. Parameter names are the library's: a state_dict loads into either.
    """

    def __init__(self, backend="auto", device=None, dtype=None, *, spec=None):
        super().__init__(SPEC if spec is None else spec, backend=backend)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)


def load(weights=None, backend="auto", device=None, dtype=None):
    """The layer, with weights from a state_dict file (e.g. the export's weights.pt) if given."""
    layer = SparseQueryAttention(backend=backend, device=device, dtype=dtype)
    if weights is not None:
        state = torch.load(weights, map_location=device or "cpu", weights_only=True)
        layer.load_state_dict(state)
    return layer


__all__ = ["SparseQueryAttention", "KVCache", "AttentionSpec", "SPEC", "CONFIG", "LABEL", "load"]
'''


def _docstring(spec: AttentionSpec, provenance: str, module_name: str) -> str:
    """The module's docstring: the configuration, the conventions, usage and where it came from."""
    lines = [
        f'"""{spec.label}: a Sparse Query Attention layer exported by sqa-search (standalone: needs only torch).',
        "",
        f"{spec.n_q_heads} query heads, {spec.n_kv_heads} key/value heads, head_dim {spec.head_dim}, "
        f"d_model {spec.d_model} (baseline H={spec.n_heads}),",
        f"{'causal' if spec.causal else 'bidirectional'}"
        + (f", sliding window W={spec.window}" if spec.window is not None else ", full attention")
        + (f", {spec.n_global} learned global tokens" if spec.n_global else "")
        + (", RoPE" if spec.rope else ", no RoPE") + (", with biases." if spec.bias else "."),
        "",
        "Conventions (those of sqa_search): query head h reads KV head h * H_kv // H_q (SDPA's enable_gqa",
        "layout when H_kv divides H_q); rSQA (H_q < H_kv) shares query heads instead. Causal window:",
        "key j is visible to query i iff i - W < j <= i; bidirectional: |i - j| < W. Global tokens have",
        "no position; causal ones see nothing of the sequence, bidirectional ones read it first.",
        "The code below is sqa_search's own (spec.py, masks.py, attention.py, inlined by the exporter),",
        "so parameter names match sqa_search.SparseQueryAttention and a state_dict loads into either.",
        "torch.export traces every path at a fixed shape; a dynamic sequence length works for full",
        "attention (the windowed path specialises on its number of blocks).",
        "",
        "Usage:",
        f"    from {module_name} import load",
        '    layer = load("weights.pt")            # or SparseQueryAttention() for fresh weights',
        f"    y = layer(torch.randn(2, 1024, {spec.d_model}))",
    ]
    if provenance:  # user text (a study's name, a path) inside a docstring: no escapes, no end quotes
        safe = provenance.strip().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
        lines += ["", *safe.splitlines()]
    lines.append('"""')
    return "\n".join(lines) + "\n"


def render_module(spec: AttentionSpec, *, provenance: str = "", module_name: str = DEFAULT_MODULE) -> str:
    """The standalone module's source for `spec` (depends only on torch): the library's layer source
    inlined, this configuration's constants, a `SparseQueryAttention` built with it, and `load()`."""
    if not isinstance(spec, AttentionSpec):
        raise ExportError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    constants = "\n".join([
        "",
        f"# {'=' * 30} this export's configuration {'=' * 30}",
        f"D_MODEL = {spec.d_model!r}",
        f"N_HEADS = {spec.n_heads!r}  # the baseline H the configuration was chosen against",
        f"N_Q_HEADS = {spec.n_q_heads!r}",
        f"N_KV_HEADS = {spec.n_kv_heads!r}",
        f"HEAD_DIM = {spec.head_dim!r}",
        f"WINDOW = {spec.window!r}  # None: full attention",
        f"N_GLOBAL = {spec.n_global!r}",
        f"CAUSAL = {spec.causal!r}",
        f"ROPE = {spec.rope!r}",
        f"BIAS = {spec.bias!r}",
        f"LABEL = {spec.label!r}",
    ]) + "\n"
    source = (_docstring(spec, provenance, module_name) + "\nfrom __future__ import annotations\n\n"
              + library_layer_source() + constants + _APPENDIX)
    compile(source, f"{module_name}.py", "exec")  # a generation bug fails here, not at the user's import
    return source
