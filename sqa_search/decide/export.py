"""`sqa-search export`: a chosen head configuration as a ready-to-use layer.

Which configuration: a study's trial (``--study S --trial N``), a rule over a study's complete
trials (``--pick knee``, ``--pick "fastest-within 1%"``, ``--pick "best-under-latency 5ms"``),
or a spec given directly (``--spec sqa --d-model 256 --heads 16``, ``--spec 8/4/128/4``).

What it writes into ``--out DIR``:

1. ``sqa_layer.py``: one standalone module that depends only on torch. It holds the
   configuration as constants and the layer (`SparseQueryAttention`, with ``new_cache`` /
   ``prefill_cache`` / ``decode``), generated from the library's own source (spec.py, masks.py,
   attention.py inlined), so it runs the library's code path for path and one state_dict loads
   into either.
2. ``config.json``: the spec and where it came from; `load_layer` turns it back into the
   library's `SparseQueryAttention` (with the weights, when the export has them).
3. ``weights.pt`` (with ``--weights`` / ``--weights-from FILE``): a state_dict loadable into
   either layer. Studies do not save trained weights, so these are either taken from a
   state_dict file you give or freshly initialised with ``--seed``; the README says which.
4. ``README.md``: the configuration, its provenance (study, trial, fingerprint, date), its
   figures with their sources, and a usage example.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..layer.spec import VARIANTS, AttentionSpec, SpecError, normalise_variant
from .._format import fmt_bytes as _fmt_bytes, fmt_s as _fmt_s
from ..errors import UserError

__all__ = [
    "ExportError",
    "ExportResult",
    "CONFIG_FILE",
    "FORMAT",
    "export_layer",
    "export_trial",
    "export_recommendation",
    "select_trial",
    "parse_pick",
    "parse_spec",
    "render_module",
    "load_config",
    "load_layer",
    "add_arguments",
    "run",
]

FORMAT = "sqa-search/attention-layer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
README_FILE = "README.md"
DEFAULT_MODULE = "sqa_layer"


class ExportError(UserError):
    """An export that cannot be done as asked; the message names the option, the value and what is allowed."""


@dataclass
class ExportResult:
    directory: Path
    module_path: Path
    config_path: Path
    readme_path: Path
    weights_path: Path | None
    spec: AttentionSpec
    source: dict = field(default_factory=dict)

    def summary(self) -> str:
        files = [self.module_path, self.config_path] + ([self.weights_path] if self.weights_path else []) + [
            self.readme_path]
        return f"exported {self.spec.label} to {self.directory}: " + ", ".join(p.name for p in files)


# ===== the standalone module ======================================================================
# Generated from the library's own layer source, so there is one implementation: spec.py, masks.py
# (when present) and attention.py are inlined in that order (they import only the standard library,
# torch and each other), their imports of each other and repeated `from __future__` lines dropped,
# then the configuration and `load()` are appended. tests/test_export.py runs the result in a fresh
# interpreter that cannot import sqa_search and compares it with the library layer.
LAYER_MODULES = ("spec", "masks", "rope", "attention")  # inlined in this order


def _module_source(name: str) -> str:
    """The source of sqa_search/layer/<name>.py as installed."""
    from importlib import resources

    return resources.files("sqa_search.layer").joinpath(f"{name}.py").read_text(encoding="utf-8")


def _inline(name: str, text: str) -> str:
    """A module's source with its intra-package imports and `from __future__` lines taken out.

    A relative import that renames (``from .masks import causal as _causal``) becomes an
    assignment, so the inlined code still finds the name. An import of the package by its name
    is refused: the exported file must stand alone.
    """
    import ast

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
    """spec.py, masks.py and attention.py inlined into one source text (see above)."""
    parts = []
    for name in LAYER_MODULES:
        parts.append(f"# {'=' * 30} inlined from sqa_search/layer/{name}.py {'=' * 30}\n" + _inline(name, _module_source(name)))
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


def _py(value) -> str:
    return repr(value)


def render_module(spec: AttentionSpec, *, provenance: str = "", module_name: str = DEFAULT_MODULE) -> str:
    """The standalone module's source for `spec` (depends only on torch): the library's layer source
    inlined, this configuration's constants, a `SparseQueryAttention` built with it, and `load()`."""
    if not isinstance(spec, AttentionSpec):
        raise ExportError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
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
    header = "\n".join(lines) + "\n"
    constants = "\n".join([
        "",
        f"# {'=' * 30} this export's configuration {'=' * 30}",
        f"D_MODEL = {_py(spec.d_model)}",
        f"N_HEADS = {_py(spec.n_heads)}  # the baseline H the configuration was chosen against",
        f"N_Q_HEADS = {_py(spec.n_q_heads)}",
        f"N_KV_HEADS = {_py(spec.n_kv_heads)}",
        f"HEAD_DIM = {_py(spec.head_dim)}",
        f"WINDOW = {_py(spec.window)}  # None: full attention",
        f"N_GLOBAL = {_py(spec.n_global)}",
        f"CAUSAL = {_py(spec.causal)}",
        f"ROPE = {_py(spec.rope)}",
        f"BIAS = {_py(spec.bias)}",
        f"LABEL = {_py(spec.label)}",
    ]) + "\n"
    source = header + "\nfrom __future__ import annotations\n\n" + library_layer_source() + constants + _APPENDIX
    compile(source, f"{module_name}.py", "exec")  # a generation bug fails here, not at the user's import
    return source


# ===== choosing the configuration =================================================================
_PICK_HELP = "knee | 'fastest-within X%' | 'best-under-latency SECONDS' (units s, ms, us allowed)"


def parse_pick(text: str) -> tuple[str, float | None]:
    """'knee' -> ('knee', None); 'fastest-within 1%' -> ('fastest-within', 0.01);
    'best-under-latency 5ms' -> ('best-under-latency', 0.005). Raises ExportError."""
    raw = str(text).strip()
    parts = raw.replace("=", " ").split(None, 1)
    if not parts:
        raise ExportError(f"--pick {text!r} is not a rule: choose {_PICK_HELP}")
    rule = parts[0].lower().replace("_", "-")
    arg = parts[1].strip() if len(parts) > 1 else ""
    if rule == "knee":
        if arg:
            raise ExportError(f"--pick {text!r}: 'knee' takes no argument")
        return "knee", None
    if rule == "fastest-within":
        return rule, parse_fraction(arg, "--pick fastest-within")
    if rule == "best-under-latency":
        return rule, parse_seconds(arg, "--pick best-under-latency")
    raise ExportError(f"--pick {text!r} is not a rule: choose {_PICK_HELP}")


def parse_fraction(text, what: str = "tolerance") -> float:
    """'1%' -> 0.01; '0.01' -> 0.01 (a bare number is a fraction and must be < 1). Raises ExportError."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1].strip()) / 100.0
        else:
            value = float(raw)
            if value >= 1:
                raise ExportError(f"{what} {raw!r} is ambiguous: a bare number is a fraction of the loss "
                                  f"(0.01 = 1%) and must be < 1; write {raw}% for percent")
    except ValueError as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{what} {raw!r} cannot be parsed: give a percentage like 1% "
                          f"or a fraction like 0.01") from None
    if not math.isfinite(value) or value < 0:
        raise ExportError(f"{what} {raw!r} is not allowed: must be a finite loss increase >= 0")
    return value


_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_seconds(text, what: str = "latency") -> float:
    """'0.01', '10ms', '250 us' -> seconds. Raises ExportError."""
    raw = str(text).strip().lower()
    m = re.fullmatch(r"([0-9.eE+-]+)\s*(s|sec|ms|us|µs)?", raw)
    try:
        value = float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else float("nan")
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ExportError(f"{what} {text!r} cannot be parsed: give seconds > 0, e.g. 0.01, 10ms or 250us")
    return value


def _trial_summary(handle) -> str:
    trials = handle.study.get_trials(deepcopy=False)
    if not trials:
        return "it has no trials"
    from optuna.trial import TrialState

    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    return (f"it has trials 0-{trials[-1].number}; complete: "
            f"{', '.join(map(str, complete)) if complete else 'none'}")


def _complete_rows(handle):
    """Complete trials with finite quality and latency, one per distinct spec (lowest number)."""
    from optuna.trial import TrialState

    rows, seen = [], set()
    for t in handle.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = t.user_attrs
        quality, latency = attrs.get("quality"), attrs.get("latency_s")
        if "spec" not in attrs or quality is None or latency is None:
            continue
        if not (math.isfinite(quality) and math.isfinite(latency)):
            continue
        key = attrs.get("spec_key") or json.dumps(attrs["spec"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        rows.append(t)
    return rows


def _quality_direction(handle) -> str:
    return handle.space.directions[0]


def select_trial(handle, *, trial: int | None = None, pick: str | None = None):
    """The trial to export and why: (FrozenTrial, reason). Exactly one of trial / pick.

    Raises ExportError for a trial not in the study, an incomplete trial, an unknown rule,
    or a rule that matches nothing (the message says what the study has).
    """
    from optuna.trial import TrialState

    if (trial is None) == (pick is None):
        raise ExportError("choose the configuration with exactly one of --trial N or --pick RULE")
    name = handle.space.name
    if trial is not None:
        trials = handle.study.get_trials(deepcopy=False)
        found = [t for t in trials if t.number == trial]
        if not found:
            raise ExportError(f"--trial {trial} is not in study {name!r} ({handle.directory}): "
                              f"{_trial_summary(handle)}")
        t = found[0]
        if t.state != TrialState.COMPLETE or "spec" not in t.user_attrs:
            why = t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason") or "no result"
            raise ExportError(f"--trial {trial} of study {name!r} is {t.state.name} ({why}): only complete trials "
                              f"can be exported; {_trial_summary(handle)}")
        return t, f"trial {trial} of study {name!r}, chosen by number"

    rule, arg = parse_pick(pick)
    rows = _complete_rows(handle)
    if not rows:
        raise ExportError(f"--pick {pick!r}: study {name!r} has no complete trial with a quality and a latency")
    direction = _quality_direction(handle)
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    quality = handle.space.objectives.quality
    if rule == "knee":
        from ..search.pareto import knee_point

        points = [[t.user_attrs["quality"], t.user_attrs["latency_s"]] for t in rows]
        t = rows[knee_point(points, [direction, "minimize"])]
        return t, f"knee of the {quality}/latency front of study {name!r} (trial {t.number})"
    if rule == "fastest-within":
        ref = [t for t in rows if t.user_attrs.get("variant") == "mha"]
        if ref:
            ref_t, ref_name = ref[0], f"MHA (trial {ref[0].number})"
        else:
            ref_t = rows[0]
            for t in rows[1:]:
                if better(t.user_attrs["quality"], ref_t.user_attrs["quality"]):
                    ref_t = t
            ref_name = f"the best trial {ref_t.number} ({ref_t.user_attrs.get('label')}; MHA is not in the study)"
        ref_q = ref_t.user_attrs["quality"]
        limit = ref_q + arg * abs(ref_q) if direction == "minimize" else ref_q - arg * abs(ref_q)
        ok = [t for t in rows if (t.user_attrs["quality"] <= limit if direction == "minimize"
                                  else t.user_attrs["quality"] >= limit)]
        if not ok:  # cannot happen with a reference in rows, kept for safety
            raise ExportError(f"--pick {pick!r}: no trial of study {name!r} has {quality} within {100 * arg:g}% of "
                              f"{ref_name} ({ref_q:.4g})")
        t = min(ok, key=lambda t: (t.user_attrs["latency_s"], t.number))
        return t, (f"fastest trial of study {name!r} with {quality} within {100 * arg:g}% of {ref_name}, "
                   f"{ref_q:.4g} -> limit {limit:.4g} (trial {t.number})")
    # best-under-latency
    ok = [t for t in rows if t.user_attrs["latency_s"] <= arg]
    if not ok:
        fastest = min(rows, key=lambda t: t.user_attrs["latency_s"])
        raise ExportError(f"--pick {pick!r} matches nothing: no complete trial of study {name!r} has latency <= "
                          f"{arg:.4g} s; the fastest is trial {fastest.number} ({fastest.user_attrs.get('label')}) "
                          f"at {fastest.user_attrs['latency_s']:.4g} s")
    best = ok[0]
    for t in ok[1:]:
        if better(t.user_attrs["quality"], best.user_attrs["quality"]):
            best = t
    return best, (f"best {quality} of study {name!r} with latency <= {arg:.4g} s "
                  f"({best.user_attrs['latency_s']:.4g} s, trial {best.number})")


def parse_spec(text: str, *, d_model: int | None = None, n_heads: int | None = None, **overrides) -> AttentionSpec:
    """A spec given directly: a variant name ('sqa', 'SW-SQA'), 'q/kv[/W[/G]]' (W may be 'none'),
    or a JSON object of AttentionSpec fields. d_model / n_heads default to the SQA paper's 256 / 16
    for names and head counts. overrides: window, n_global, causal, rope, bias. Raises ExportError."""
    raw = str(text).strip()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        if raw.startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ExportError(f"--spec {raw!r} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ExportError(f"--spec {raw!r}: a JSON spec must be an object of AttentionSpec fields")
            return AttentionSpec.from_dict({**data, **overrides})
        d = 256 if d_model is None else d_model
        h = 16 if n_heads is None else n_heads
        if "/" in raw:
            parts = [p.strip() for p in raw.split("/")]
            if not 2 <= len(parts) <= 4:
                raise ExportError(f"--spec {raw!r} is not 'q/kv[/W[/G]]'")
            try:
                q, kv = int(parts[0]), int(parts[1])
                window = None
                if len(parts) > 2 and parts[2].lower() not in ("none", "full", "-", ""):
                    window = int(parts[2])
                n_global = int(parts[3]) if len(parts) > 3 else 0
            except ValueError:
                raise ExportError(f"--spec {raw!r}: the parts of 'q/kv[/W[/G]]' must be integers "
                                  f"(W may be 'none')") from None
            fields = {"window": window, "n_global": n_global, **overrides}
            return AttentionSpec(d_model=d, n_heads=h, n_q_heads=q, n_kv_heads=kv, **fields)
        try:
            normalise_variant(raw)
        except SpecError:
            raise ExportError(f"--spec {raw!r} is not known: give a variant name ({', '.join(VARIANTS)}), "
                              f"'q/kv[/W[/G]]' or a JSON object of AttentionSpec fields") from None
        return AttentionSpec.variant(raw, d, h, **overrides)
    except SpecError as exc:
        raise ExportError(f"--spec {raw!r}: {exc}") from None


# ===== writing =======================================================================================


def _resolve_state_dict(obj, prefix: str | None, source: str) -> dict:
    """A layer's state_dict out of a saved object: a state_dict, a checkpoint dict holding one
    ('state_dict' / 'model'), or a whole model's state_dict with `prefix` (e.g. 'blocks.0.attn.')."""
    import torch

    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ExportError(f"--weights-from {source}: holds a {type(obj).__name__}, not a state_dict")
    wanted = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
    if prefix is None:
        if all(k in obj for k in wanted):
            prefix = ""
        else:
            prefixes = sorted({k[: -len("q_proj.weight")] for k in obj if k.endswith("q_proj.weight")})
            if len(prefixes) != 1:
                found = ", ".join(repr(p) for p in prefixes[:8]) or "none"
                raise ExportError(f"--weights-from {source}: cannot tell which attention layer to take "
                                  f"(layer prefixes found: {found}); pass --weights-prefix, e.g. 'blocks.0.attn.'")
            prefix = prefixes[0]
    state = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    if not state:
        raise ExportError(f"--weights-from {source}: no key starts with --weights-prefix {prefix!r}")
    keep = ("q_proj.", "k_proj.", "v_proj.", "o_proj.", "global_tokens")
    return {k: v for k, v in state.items() if k.startswith(keep)}


def _make_weights(spec: AttentionSpec, weights, prefix: str | None, seed: int | None):
    """(state_dict, description) checked against the spec by loading it into the library layer."""
    import torch

    from ..layer.attention import SparseQueryAttention

    if weights is None:
        seed = 0 if seed is None else int(seed)
        torch.manual_seed(seed)
        layer = SparseQueryAttention(spec)
        how = (f"freshly initialised with torch.manual_seed({seed}) (PyTorch's nn.Linear default init; "
               f"NOT trained: studies do not save model weights)")
    else:
        if isinstance(weights, (str, Path)):
            path = Path(weights)
            if not path.is_file():
                raise ExportError(f"--weights-from {str(path)!r}: no such file")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a pickle that is not plain tensors, a corrupt file
                raise ExportError(f"--weights-from {str(path)!r}: cannot be read as a state_dict ({exc})") from None
            source = str(path)
        else:
            obj, source = weights, "the given state_dict"
        state = _resolve_state_dict(obj, prefix, source)
        layer = SparseQueryAttention(spec)
        try:
            layer.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ExportError(f"--weights-from {source}: does not fit {spec.label}: "
                              f"{' '.join(first[:3])}") from None
        how = f"taken from {source}" + (f" (prefix {prefix!r})" if prefix else "")
    return {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}, how


def _readme(spec: AttentionSpec, module_name: str, source: dict, figures: dict, weights_note: str | None) -> str:
    lines = [f"# {spec.label}", "",
             f"An attention head configuration exported by sqa-search on {source.get('exported', '?')}.", "",
             "## Configuration", "",
             "| field | value |", "|---|---|"]
    for key, value in spec.to_dict().items():
        lines.append(f"| {key} | {value} |")
    lines += ["", f"Attention runs with {spec.n_attn_heads} head(s); grouping: {spec.grouping} "
                  f"(query head h reads KV head h * H_kv // H_q; rSQA shares query heads).", "",
              "## Where it came from", ""]
    for key in ("origin", "study", "study_path", "trial", "chosen_by", "fingerprint", "fingerprint_id",
                "trial_date", "target", "model"):
        if source.get(key) not in (None, ""):
            lines.append(f"- {key.replace('_', ' ')}: {source[key]}")
    lines += ["", "## Figures", ""]
    if figures:
        lines += ["| figure | value | source |", "|---|---|---|"]
        for row in figures.get("rows", []):
            lines.append(f"| {row['name']} | {row['value']} | {row['source']} |")
    else:
        lines.append("None: this configuration was given directly, not measured.")
    lines += ["", "## Files", "",
              f"- `{module_name}.py`: the layer, standalone (needs only torch), configuration as constants.",
              f"- `{CONFIG_FILE}`: the configuration; `sqa_search.decide.export.load_layer(\"{CONFIG_FILE}\")` "
              f"(or the folder) builds the library's layer from it.",
              ]
    if weights_note:
        lines.append(f"- `{WEIGHTS_FILE}`: a state_dict for either layer, {weights_note}.")
    else:
        lines.append("- no weights: the layer starts freshly initialised (export with --weights or "
                     "--weights-from FILE to include a state_dict).")
    load_arg = f'"{WEIGHTS_FILE}"' if weights_note else ""
    lines += ["", "## Usage", "", "```python",
              "import torch",
              f"from {module_name} import load          # this folder on sys.path; sqa-search not needed",
              f"layer = load({load_arg})" + ("" if weights_note else "                           # fresh weights"),
              f"y = layer(torch.randn(2, 1024, {spec.d_model}))",
              "```", "",
              "With sqa-search installed, the same layer from the library: "
              "`from sqa_search.decide.export import load_layer; layer = load_layer(\"path/to/this/folder\")`.", ""]
    return "\n".join(lines)


def export_layer(spec: AttentionSpec, out, *, weights=None, weights_prefix: str | None = None,
                 with_weights: bool = False, seed: int | None = None, source: dict | None = None,
                 figures: dict | None = None, module_name: str = DEFAULT_MODULE) -> ExportResult:
    """Write the standalone module, config.json, optional weights.pt and README.md into `out`.

    weights: a state_dict, or a path to a file holding one (a whole model's too, with
    `weights_prefix`); with_weights=True and no weights: fresh weights from `seed`.
    source / figures: provenance and figures for the README and the config (see export_trial).
    """
    if not isinstance(spec, AttentionSpec):
        raise ExportError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module_name or ""):
        raise ExportError(f"module_name={module_name!r} is not a Python module name")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} exists and is not a folder")
    weights_path, weights_note = None, None
    state = None
    if weights is not None or with_weights:  # checked before anything is written
        state, weights_note = _make_weights(spec, weights, weights_prefix, seed)
    out.mkdir(parents=True, exist_ok=True)
    source = dict(source or {})
    source.setdefault("origin", "spec given directly")
    source["exported"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures = dict(figures or {})

    provenance = [f"Exported {source['exported']} from {source['origin']}"]
    for key in ("study", "trial", "chosen_by", "fingerprint"):
        if source.get(key) not in (None, ""):
            provenance.append(f"  {key.replace('_', ' ')}: {source[key]}")
    for row in figures.get("rows", []):
        provenance.append(f"  {row['name']}: {row['value']} ({row['source']})")
    if weights_note:
        provenance.append(f"Weights ({WEIGHTS_FILE}): {weights_note}.")

    module_path = out / f"{module_name}.py"
    module_path.write_text(render_module(spec, provenance="\n".join(provenance), module_name=module_name))
    if state is not None:
        import torch

        weights_path = out / WEIGHTS_FILE
        torch.save(state, weights_path)
    elif (out / WEIGHTS_FILE).exists():
        (out / WEIGHTS_FILE).unlink()  # a stale file from an earlier export would not match this spec

    from .. import __version__

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sqa_search_version": __version__,
        "spec": spec.to_dict(),
        "label": spec.label,
        "variant": spec.variant_name,
        "family": spec.family,
        "module": module_path.name,
        "weights": WEIGHTS_FILE if weights_path else None,
        "weights_note": weights_note,
        "source": source,
        "figures": figures,
    }
    config_path = out / CONFIG_FILE
    config_path.write_text(json.dumps(config, indent=2, default=str) + "\n")
    readme_path = out / README_FILE
    readme_path.write_text(_readme(spec, module_name, source, figures, weights_note))
    return ExportResult(out, module_path, config_path, readme_path, weights_path, spec, source)


def _trial_source_and_figures(handle, t, reason: str) -> tuple[dict, dict]:
    attrs = t.user_attrs
    space = handle.space
    target = space.target
    fp = attrs.get("fingerprint") or {}
    timing = attrs.get("timing") or []
    fp_id = next((r.get("fingerprint_id") for r in timing if r.get("fingerprint_id")), None)
    device = fp.get("device_name") or fp.get("device_type")
    source = {
        "origin": f"study {space.name!r}",
        "study": space.name,
        "study_path": str(Path(handle.directory).resolve()),
        "trial": t.number,
        "chosen_by": reason,
        "fingerprint": (f"{device}, torch {fp.get('torch_version')}, {fp.get('threads')} threads"
                        if fp else f"none (latency {attrs.get('latency_source', 'not measured')})"),
        "fingerprint_id": fp_id,
        "trial_date": t.datetime_complete.strftime("%Y-%m-%d %H:%M") if t.datetime_complete else None,
        "target": (f"{target.hardware}, {target.mode}, {target.dtype}, batch {target.batch}, "
                   f"N={list(target.seq_len)}, timing the {target.what}"),
        "model": {"d_model": space.model.d_model, "n_heads": space.model.n_heads, "n_layers": space.model.n_layers,
                  "d_ff": space.model.d_ff, "causal": space.model.causal},
    }
    quality_name = space.objectives.quality
    train = attrs.get("train") or {}
    rows = [{"name": f"latency per step ({target.mode}, {target.what}, N={'+'.join(map(str, target.seq_len))})",
             "value": _fmt_s(attrs.get("latency_s")), "source": attrs.get("latency_source", "?")}]
    for rec in timing:
        if len(timing) > 1 and "median_s" in rec:
            rows.append({"name": f"latency at N={rec['seq_len']}", "value": _fmt_s(rec["median_s"]),
                         "source": f"measured, backend {rec.get('backend')}"})
    rows.append({"name": quality_name, "value": f"{attrs.get('quality'):.4f}",
                 "source": f"proxy model trained {train.get('steps', '?')} steps / {train.get('tokens', '?')} tokens "
                           f"(data {train.get('data_source', '?')}, seed {train.get('seed', '?')})"})
    rows.append({"name": "KV cache (model, largest N, batch 1)", "value": _fmt_bytes(attrs.get("kv_cache_bytes")),
                 "source": "analytic"})
    figures = {"latency_s": attrs.get("latency_s"), "latency_source": attrs.get("latency_source"),
               "quality": attrs.get("quality"), "quality_metric": quality_name,
               "kv_cache_bytes": attrs.get("kv_cache_bytes"), "timing": timing, "rows": rows}
    return source, figures


def export_trial(study, out, *, trial: int | None = None, pick: str | None = None, **kwargs) -> ExportResult:
    """Export a study's trial (by number or by a --pick rule) with its provenance and figures."""
    from ..search.engine import StudyError, open_study

    path = Path(study)
    if not path.exists():
        raise ExportError(f"--study {str(path)!r} does not exist (a study folder, e.g. studies/quickstart)")
    try:
        handle = open_study(path)
    except StudyError as exc:
        raise ExportError(f"--study {str(path)!r}: {exc}") from None
    t, reason = select_trial(handle, trial=trial, pick=pick)
    spec = AttentionSpec.from_dict(t.user_attrs["spec"])
    source, figures = _trial_source_and_figures(handle, t, reason)
    return export_layer(spec, out, source=source, figures=figures, **kwargs)


def export_recommendation(recommendation, out, **kwargs) -> ExportResult:
    """Export the configuration a `sqa_search.decide.recommend.Recommendation` chose, with its figures
    and their sources (measured or predicted, loss from a study or from the prior)."""
    c = recommendation.choice
    source = {"origin": "sqa-search recommend", "chosen_by": recommendation.why,
              "study": recommendation.study, "trial": c.trial,
              "target": (f"{recommendation.hardware_name}, {recommendation.mode}, N={recommendation.seq_len}, "
                         f"batch {recommendation.batch}, {recommendation.dtype}")}
    rows = [{"name": f"latency per step ({recommendation.mode}, {recommendation.what})", "value": _fmt_s(c.latency_s),
             "source": c.latency_source},
            {"name": "loss", "value": "-" if c.loss is None else f"{c.loss:.4f}", "source": c.loss_source},
            {"name": "KV cache", "value": _fmt_bytes(c.kv_cache_bytes), "source": "analytic"}]
    figures = {"latency_s": c.latency_s, "latency_source": c.latency_source, "quality": c.loss,
               "quality_source": c.loss_source, "kv_cache_bytes": c.kv_cache_bytes, "rows": rows}
    return export_layer(c.spec, out, source=source, figures=figures, **kwargs)


# ===== loading ======================================================================================
def load_config(path) -> tuple[dict, Path]:
    """(config dict, its folder) from an export folder or its config.json.

    Raises ExportError naming the file, what is wrong and what is expected: a missing or
    unreadable file, JSON that is not an sqa-search export, a format_version this version cannot
    read, a spec or a weights entry of the wrong form.
    """
    path = Path(path)
    config_path = path / CONFIG_FILE if path.is_dir() else path
    if not config_path.is_file():
        raise ExportError(f"no exported layer at {str(path)!r}: {config_path.name} is missing "
                          f"(give the export folder or its {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{config_path} is not valid JSON ({exc}): expected the {CONFIG_FILE} "
                          f"`sqa-search export` writes") from None
    except OSError as exc:
        raise ExportError(f"{config_path} cannot be read: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else f"a JSON {type(config).__name__}"
        raise ExportError(f"{config_path} is not an sqa-search export: format is {found!r}, {FORMAT!r} expected")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"{config_path}: format_version={version!r} is not allowed: an integer from 1 to "
                          f"{FORMAT_VERSION} expected")
    if version > FORMAT_VERSION:
        raise ExportError(f"{config_path} has format_version {version}; this sqa-search reads up to "
                          f"{FORMAT_VERSION}: upgrade sqa-search")
    if not isinstance(config.get("spec"), dict):
        raise ExportError(f"{config_path}: spec={config.get('spec')!r} is not allowed: a JSON object with the "
                          f"AttentionSpec fields expected")
    weights = config.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights or Path(weights).name != weights):
        raise ExportError(f"{config_path}: weights={weights!r} is not allowed: null or a file name in the export "
                          f"folder (e.g. {WEIGHTS_FILE!r}) expected")
    return config, config_path.parent


def _read_weights(path: Path, spec: AttentionSpec, layer, map_location) -> dict:
    """The exported state_dict at `path`, checked against the layer built from the config's spec."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path} cannot be read as a state_dict ({reason[:200]}): expected the "
                          f"{WEIGHTS_FILE} `sqa-search export --weights` writes") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    wanted = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {wanted[k]})" for k in sorted(set(wanted) & set(state))
              if tuple(state[k].shape) != wanted[k]]
    if missing or unexpected or shapes:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected)}"] if unexpected else []) + (
            [f"wrong shape {'; '.join(shapes)}"] if shapes else [])
        raise ExportError(f"{path} does not fit the spec in {CONFIG_FILE} ({spec.label}): " + "; ".join(parts))
    return state


def load_layer(path, *, backend: str = "auto", weights: bool = True, map_location="cpu"):
    """An export folder (or its config.json) -> the library's `SparseQueryAttention`, with the
    exported weights when there are some (weights=False: freshly initialised). A damaged export
    raises ExportError naming the file, what is wrong and what is expected."""
    from ..layer.attention import SparseQueryAttention

    config, folder = load_config(path)
    try:
        spec = AttentionSpec.from_dict(config["spec"])
    except (KeyError, TypeError, SpecError) as exc:
        raise ExportError(f"{folder / CONFIG_FILE}: spec is not a valid AttentionSpec ({exc})") from None
    layer = SparseQueryAttention(spec, backend=backend)
    if weights and config.get("weights"):
        wpath = folder / config["weights"]
        if not wpath.is_file():
            raise ExportError(f"{folder / CONFIG_FILE} names weights {config['weights']!r} but {wpath} is missing: "
                              f"copy it beside {CONFIG_FILE}, or load with weights=False")
        layer.load_state_dict(_read_weights(wpath, spec, layer, map_location))
    return layer.to(map_location) if map_location is not None else layer


# ===== `sqa-search export` ==========================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("which configuration (one of --trial, --pick, --spec)")
    what.add_argument("--study", help="a study folder, e.g. studies/quickstart (with --trial or --pick)")
    what.add_argument("--trial", type=int, help="the study's trial number to export")
    # argparse %-formats help strings: the rule's "X%" must be escaped or --help crashes
    what.add_argument("--pick", help=f"a rule over the study's complete trials: {_PICK_HELP.replace('%', '%%')}")
    what.add_argument("--spec", help="a spec given directly: a variant name (sqa, ssqa, swsqa, ...), "
                                     "'q/kv[/W[/G]]', or a JSON object of AttentionSpec fields")
    spec = parser.add_argument_group("with --spec")
    spec.add_argument("--d-model", type=int, default=None, help="model width (default 256, the SQA paper's)")
    spec.add_argument("--heads", type=int, default=None, help="baseline heads H (default 16)")
    spec.add_argument("--window", type=int, default=None, help="sliding window W")
    spec.add_argument("--n-global", type=int, default=None, help="learned global tokens (with a window)")
    spec.add_argument("--bidirectional", action="store_true", help="an encoder layer (default causal)")
    spec.add_argument("--bias", action="store_true", help="projections with biases")
    spec.add_argument("--no-rope", action="store_true", help="no rotary position embedding")
    parser.add_argument("--out", required=True, help="folder to write the module, config, weights and README into")
    parser.add_argument("--module-name", default=DEFAULT_MODULE, help=f"module file name (default {DEFAULT_MODULE})")
    w = parser.add_argument_group("weights")
    w.add_argument("--weights", action="store_true",
                   help=f"write {WEIGHTS_FILE}: freshly initialised (--seed), since studies do not save weights")
    w.add_argument("--weights-from", metavar="FILE", help="write the weights from this state_dict file (a layer's, "
                                                          "or a whole model's with --weights-prefix)")
    w.add_argument("--weights-prefix", help="key prefix of the layer in --weights-from, e.g. blocks.0.attn.")
    w.add_argument("--seed", type=int, default=0, help="seed of fresh weights (default 0)")


def run(args) -> int:
    chosen = [name for name in ("trial", "pick", "spec") if getattr(args, name) is not None]
    if len(chosen) != 1:
        raise ExportError("choose the configuration with exactly one of --study S --trial N, "
                          "--study S --pick RULE or --spec SPEC" + (f" (got {', '.join('--' + c for c in chosen)})"
                                                                    if chosen else ""))
    kwargs = dict(weights=args.weights_from, weights_prefix=args.weights_prefix,
                  with_weights=args.weights, seed=args.seed, module_name=args.module_name)
    if args.spec is not None:
        if args.study:
            raise ExportError("--spec is given directly: drop --study (or use --trial / --pick with it)")
        spec = parse_spec(args.spec, d_model=args.d_model, n_heads=args.heads, window=args.window,
                          n_global=args.n_global, causal=False if args.bidirectional else None,
                          bias=True if args.bias else None, rope=False if args.no_rope else None)
        result = export_layer(spec, args.out, **kwargs)
    else:
        if not args.study:
            raise ExportError(f"--{chosen[0]} needs --study S (a study folder)")
        result = export_trial(args.study, args.out, trial=args.trial, pick=args.pick, **kwargs)
    print(result.summary())
    print(f"  chosen: {result.source.get('chosen_by', result.source.get('origin'))}")
    if result.weights_path is None:
        print("  no weights written (add --weights or --weights-from FILE)")
    return 0


def main(argv=None) -> int:
    """`python -m sqa_search.decide.export`: the same as `sqa-search export`, errors included."""
    import sys

    from ..cli import main as cli_main

    return cli_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
