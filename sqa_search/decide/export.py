"""`sqa-search export`: a chosen head configuration as a ready-to-use layer.

Which configuration: a study's trial (``--study S --trial N``), a rule over a study's complete
trials (``--pick knee``, ``--pick "fastest-within 1%"``, ``--pick "best-under-latency 5ms"``;
pick.py), or a spec given directly (``--spec sqa --d-model 256 --heads 16``, ``--spec 8/4/128/4``;
parse.py).

What it writes into ``--out DIR``:

1. ``sqa_layer.py``: one standalone module that depends only on torch. It holds the
   configuration as constants and the layer (`SparseQueryAttention`, with ``new_cache`` /
   ``prefill_cache`` / ``decode``), generated from the library's own source (spec.py, masks.py,
   rope.py, attention.py inlined; layer_source.py), so it runs the library's code path for path and one
   state_dict loads into either.
2. ``config.json``: the spec and where it came from; `load_layer` (load.py) turns it back into the
   library's `SparseQueryAttention` (with the weights, when the export has them).
3. ``weights.pt`` (with ``--weights`` / ``--weights-from FILE``): a state_dict loadable into
   either layer. Studies do not save trained weights, so these are either taken from a
   state_dict file you give or freshly initialised with ``--seed``; the README says which.
4. ``README.md``: the configuration, its provenance (study, trial, fingerprint, date), its
   figures with their sources, and a usage example.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from .._format import fmt_bytes, fmt_s
from ..layer.spec import AttentionSpec
from ..search.records import TrialRecord
from ..speed.workload import KIND_NOTES, latency_kind, latency_label
from .errors import ExportError
from .layer_source import DEFAULT_MODULE, render_module
from .load import CONFIG_FILE, FORMAT, FORMAT_VERSION, README_FILE, WEIGHTS_FILE, load_config, load_layer
from .objectives import objective_figures
from .pick import select_record

# load_layer / load_config live in load.py; they stay importable from here because every exported
# README names `sqa_search.decide.export.load_layer`
__all__ = ["ExportError", "ExportResult", "CONFIG_FILE", "FORMAT", "export_layer", "export_trial",
           "export_recommendation", "load_config", "load_layer", "trial_latency_words"]


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


# ===== weights ========================================================================================
def _resolve_state_dict(obj, prefix: str | None, source: str) -> dict:
    """A layer's state_dict out of a saved object: a state_dict, a checkpoint dict holding one
    ('state_dict' / 'model'), or a whole model's state_dict with `prefix` (e.g. 'blocks.0.attn.')."""
    import torch  # lazy, like every torch import in decide/: `sqa-search --help` stays free of torch

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
    import torch  # lazy (see _resolve_state_dict)

    from ..layer.attention import SparseQueryAttention  # imports torch

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


# ===== writing ========================================================================================
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
    kind = figures.get("latency_kind") if figures else None
    if kind:
        lines += [f"Latency figures are {kind}" + (f": {KIND_NOTES[kind]}." if kind in KIND_NOTES else "."), ""]
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


def _provenance(source: dict, figures: dict, weights_note: str | None) -> str:
    """Where the configuration came from and its figures, for the module's docstring."""
    lines = [f"Exported {source['exported']} from {source['origin']}"]
    for key in ("study", "trial", "chosen_by", "fingerprint"):
        if source.get(key) not in (None, ""):
            lines.append(f"  {key.replace('_', ' ')}: {source[key]}")
    for row in figures.get("rows", []):
        lines.append(f"  {row['name']}: {row['value']} ({row['source']})")
    if weights_note:
        lines.append(f"Weights ({WEIGHTS_FILE}): {weights_note}.")
    return "\n".join(lines)


def _config(spec: AttentionSpec, module_path: Path, weights_path, weights_note, source: dict, figures: dict) -> dict:
    return {
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
    weights_path, weights_note, state = None, None, None
    if weights is not None or with_weights:  # checked before anything is written
        state, weights_note = _make_weights(spec, weights, weights_prefix, seed)
    out.mkdir(parents=True, exist_ok=True)
    source = dict(source or {})
    source.setdefault("origin", "spec given directly")
    source["exported"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures = dict(figures or {})

    module_path = out / f"{module_name}.py"
    module_path.write_text(render_module(spec, provenance=_provenance(source, figures, weights_note),
                                         module_name=module_name))
    if state is not None:
        import torch  # lazy (see _resolve_state_dict)

        weights_path = out / WEIGHTS_FILE
        torch.save(state, weights_path)
    elif (out / WEIGHTS_FILE).exists():
        (out / WEIGHTS_FILE).unlink()  # a stale file from an earlier export would not match this spec
    config_path = out / CONFIG_FILE
    config = _config(spec, module_path, weights_path, weights_note, source, figures)
    config_path.write_text(json.dumps(config, indent=2, default=str) + "\n")
    readme_path = out / README_FILE
    readme_path.write_text(_readme(spec, module_name, source, figures, weights_note))
    return ExportResult(out, module_path, config_path, readme_path, weights_path, spec, source)


# ===== a study's trial, a recommendation ==============================================================
def _trial_source(handle, rec: TrialRecord, reason: str) -> dict:
    """Where a study's trial came from: the study, the trial, the machine, the target, the model."""
    space, target = handle.space, handle.space.target
    fp = rec.fingerprint
    latency_words = trial_latency_words(rec) if rec.latency_source is not None else "not measured"
    return {
        "origin": f"study {space.name!r}",
        "study": space.name,
        "study_path": str(Path(handle.directory).resolve()),
        "trial": rec.number,
        "chosen_by": reason,
        "fingerprint": (f"{fp.device_name or fp.device_type}, torch {fp.torch_version}, {fp.threads} threads"
                        if fp else f"none (latency {latency_words})"),
        "fingerprint_id": rec.fingerprint_id,
        "trial_date": rec.datetime_complete.strftime("%Y-%m-%d %H:%M") if rec.datetime_complete else None,
        "target": (f"{target.hardware}, {target.mode}, {target.dtype}, batch {target.batch}, "
                   f"N={list(target.seq_len)}, timing the {target.what}"),
        "model": {"d_model": space.model.d_model, "n_heads": space.model.n_heads, "n_layers": space.model.n_layers,
                  "d_ff": space.model.d_ff, "causal": space.model.causal},
    }


def _trial_figures(handle, rec: TrialRecord) -> dict:
    """A trial's figures with their sources: latency (per length too), quality, KV cache in their
    own words, then every other objective of the study (e.g. peak memory) as it formats itself."""
    space, target = handle.space, handle.space.target
    quality_name = space.objectives.quality
    train = {k: "?" if rec.train_value(k) is None else rec.train_value(k) for k in ("steps", "tokens", "data_source",
                                                                                   "seed")}
    rows = [{"name": f"latency per step ({target.mode}, {target.what}, N={'+'.join(map(str, target.seq_len))})",
             "value": fmt_s(rec.latency_s), "source": trial_latency_words(rec)}]
    for lat in rec.latencies:
        if len(rec.latencies) > 1 and lat.measured:
            rows.append({"name": f"latency at N={lat.seq_len}", "value": fmt_s(lat.seconds),
                         "source": f"{lat.kind}, backend {lat.backend}"})
    seeds = rec.replicate_seeds or [train["seed"]]
    value = f"{rec.quality:.4f}" + (f" ± {rec.quality_se:.2g} (SE)" if rec.quality_se is not None else "")
    rows.append({"name": quality_name, "value": value,
                 "source": f"proxy model trained {train['steps']} steps / {train['tokens']} tokens "
                           f"(data {train['data_source']}, "
                           + (f"seed {seeds[0]})" if len(seeds) == 1 else f"mean of seeds {', '.join(map(str, seeds))})")})
    rows.append({"name": "KV cache (model, largest N, batch 1)", "value": fmt_bytes(rec.kv_cache_bytes),
                 "source": "analytic"})
    figures = {"latency_s": rec.latency_s, "latency_source": trial_latency_words(rec) if rec.latency_source else None,
               "latency_kind": latency_kind(rec.latencies), "quality": rec.quality, "quality_metric": quality_name,
               "kv_cache_bytes": rec.kv_cache_bytes, "timing": rec.timing_rows}
    for fig in objective_figures(space, rec, leave_out=(quality_name, "latency_s", "kv_cache_bytes")):
        rows.append({"name": fig.name, "value": fig.formatted, "source": f"objective of study {space.name!r}"})
        figures[fig.name] = fig.value
    figures["rows"] = rows
    return figures


def trial_latency_words(rec: TrialRecord) -> str:
    """What a trial's latency is, in words ('measured on X, speed-corrected', '... raw', 'predicted
    for Y'): from its timing rows, so a study stored before the words said it reads right too."""
    kind = latency_kind(rec.latencies)
    if kind in ("measured-raw", "measured-corrected") and rec.fingerprint is not None:
        return latency_label(kind, rec.fingerprint.device_name or rec.fingerprint.label)
    return rec.latency_source or "?"


def export_trial(study, out, *, trial: int | None = None, pick: str | None = None, **kwargs) -> ExportResult:
    """Export a study's trial (by number or by a --pick rule) with its provenance and figures."""
    from ..search.engine import StudyError, open_study  # imports optuna: only when a study is exported

    path = Path(study)
    if not path.exists():
        raise ExportError(f"--study {str(path)!r} does not exist (a study folder, e.g. studies/quickstart)")
    try:
        handle = open_study(path)
    except StudyError as exc:
        raise ExportError(f"--study {str(path)!r}: {exc}") from None
    rec, reason = select_record(handle, trial=trial, pick=pick)
    return export_layer(rec.spec, out, source=_trial_source(handle, rec, reason),
                        figures=_trial_figures(handle, rec), **kwargs)


def export_recommendation(recommendation, out, **kwargs) -> ExportResult:
    """Export the configuration a `sqa_search.decide.recommend.Recommendation` chose, with its figures
    and their sources (measured or predicted, loss from a study or from the prior)."""
    r, c = recommendation, recommendation.choice
    source = {"origin": "sqa-search recommend", "chosen_by": r.why, "study": r.study, "trial": c.trial,
              "target": f"{r.hardware_name}, {r.mode}, N={r.seq_len}, batch {r.batch}, {r.dtype}"}
    rows = [{"name": f"latency per step ({r.mode}, {r.what})", "value": fmt_s(c.latency_s),
             "source": c.latency_source},
            {"name": "loss", "value": "-" if c.loss is None else f"{c.loss:.4f}", "source": c.loss_source},
            {"name": "KV cache", "value": fmt_bytes(c.kv_cache_bytes), "source": "analytic"}]
    figures = {"latency_s": c.latency_s, "latency_source": c.latency_source, "latency_kind": c.latency_kind,
               "quality": c.loss, "quality_source": c.loss_source, "kv_cache_bytes": c.kv_cache_bytes}
    for fig in c.other_objectives:  # the study's other objectives (e.g. peak memory), as the study measured them
        rows.append({"name": fig.name, "value": fig.formatted, "source": f"study {r.study!r} trial {c.trial}"})
        figures[fig.name] = fig.value
    figures["rows"] = rows
    return export_layer(c.spec, out, source=source, figures=figures, **kwargs)
