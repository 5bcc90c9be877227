"""An export folder read back: `load_config` checks its config.json, `load_layer` builds the
library's `SparseQueryAttention` from it (with the exported weights when there are some). Also
the folder's format: its file names and the config's format version.

`sqa_search.load_layer` and `sqa_search.decide.export.load_layer` are this function.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from ..layer.spec import AttentionSpec, SpecError
from .errors import ExportError

FORMAT = "sqa-search/attention-layer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
README_FILE = "README.md"


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


def read_weights(path: Path, spec: AttentionSpec, layer, map_location) -> dict:
    """The exported state_dict at `path`, checked against the layer built from the config's spec."""
    import torch  # lazy: `sqa-search --help` and `import sqa_search` stay free of torch

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
    from ..layer.attention import SparseQueryAttention  # imports torch (see read_weights)

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
        layer.load_state_dict(read_weights(wpath, spec, layer, map_location))
    return layer.to(map_location) if map_location is not None else layer
