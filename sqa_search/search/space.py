"""Search spaces: a YAML file -> a validated `SearchSpace` that proposes `AttentionSpec`s.

The schema (every key optional unless marked; unknown keys are errors, not ignored):

```yaml
name: quickstart                 # default study name (studies/<name>/)
description: free text
model:
  d_model: 128                   # required
  n_heads: 8                     # required: the baseline H
  n_layers: 4
  d_ff: null                     # SwiGLU hidden size; null = 8/3 d_model
  causal: true                   # decoder (true) or encoder (false)
target:
  hardware: local                # local = measure on this machine; or a cost-model profile (predicted)
  device: auto                   # auto | cpu | cuda | cuda:N (for hardware: local)
  dtype: null                    # float32 | bfloat16 | float16; null = bfloat16 on CUDA, float32 on CPU
  batch: 1
  seq_len: 1024                  # an integer, or a list: latency is then the sum over lengths
  mode: prefill                  # train | prefill | decode
  what: layer                    # layer | block | model: what is timed
  threads: null                  # CPU threads for timing; null = torch's default
  timing_budget_s: 1.0           # time spent repeating each timing
search:
  n_q_heads: [1, 2, 4, 8]        # explicit counts, or {ratios: [1, 0.5, 0.25]} of n_heads
  n_kv_heads: [1, 2, 4, 8]       # same forms
  window: [null]                 # null = full attention; integers = sliding window sizes
  n_global: [0]                  # learned global tokens (used only with a window)
  variants: all                  # named variants enqueued first when inside the space: all | [mha, gqa, ...] | []
constraints:
  kv_divides_q: false            # require n_kv_heads to divide n_q_heads (SDPA enable_gqa layouts)
  allow_reverse: true            # allow n_q_heads < n_kv_heads (rSQA)
  max_params: null               # attention parameters per layer
  max_kv_cache_bytes: null       # KV cache of the whole model at the (largest) target length, batch 1
  max_latency_s: null            # on the target
objectives:
  quality: val_loss              # val_loss | mqar_accuracy
  kv_cache: false                # true: KV-cache bytes as an objective
  memory: false                  # true: peak memory of the timed step (measured, or predicted by the cost model)
study:
  mode: pareto                   # pareto (multi-objective) | constrained (min quality s.t. budgets; prunes)
  sampler: auto                  # auto | explore | tpe | nsga2 | gp | random (measured: see README). explore:
                                 # only unevaluated valid candidates, most promising first (search/samplers.py);
                                 # auto: explore up to 300 valid candidates, tpe above
  seed: 0
  trials: 20
  halving: null                  # successive halving over seeds under a total of training runs
                                 # ({budget, max_seeds, eta, tolerance}: search/budget.py)
training:                        # sqa_search.quality.train.TrainConfig fields, e.g.
  budget_tokens: 200000
  seq_len: 128
  batch_size: 16
  replicates: 1                  # seeds per candidate (seed, seed + 1, ...): quality = mean +- SE
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..common import DTYPE_BYTES, resolve_device_name
from ..errors import UserError
from ..layer.spec import VARIANTS, AttentionSpec, SpecError, variant_heads, normalise_variant
from ..speed.workload import MODES, Workload
from ..speed.workload import SCOPES as WHATS
from .budget import HalvingSettings, read_halving
from .objectives import KV_CACHE, LATENCY, MEMORY, Objective, quality_objective  # the target's `what` is the workload's scope

__all__ = ["SearchSpace", "SpaceError", "load_space", "candidate_key", "default_dtype", "SEARCH_PARAMS",
           "params_of", "Objective", "quality_objective", "LATENCY", "KV_CACHE", "MEMORY", "replicates_of",
           "TRAINING_EXTRA", "train_config_from"]

# The search parameters: what a sampler proposes and a trial's params hold, in this order, for both
# backends and the efficiency benchmark.
SEARCH_PARAMS = ("n_q_heads", "n_kv_heads", "window", "n_global")


def params_of(spec: AttentionSpec) -> dict:
    """A spec's search parameters, as a trial stores them."""
    return {name: getattr(spec, name) for name in SEARCH_PARAMS}


DTYPES = ("float32", "bfloat16", "float16")
QUALITIES = ("val_loss", "mqar_accuracy")
STUDY_MODES = ("pareto", "constrained")
SAMPLERS = ("auto", "explore", "nsga2", "tpe", "gp", "random")


def default_dtype(device_type: str) -> str:
    """The target dtype when a space names none: bfloat16 on CUDA, float32 on CPU.

    In float32 on CUDA, SDPA has no flash kernel (it takes the efficient or math path) and
    grouped K/V are expanded, so a float32 GPU timing would not time what a GPU user runs.
    """
    return "bfloat16" if device_type == "cuda" else "float32"


def _target_device_type(hardware: str, device: str) -> str:
    """cuda or cpu: the device a target's timings run on (local) or its profile describes."""
    if hardware != "local":
        from ..speed.hardware import load_profile  # only for predicted targets

        return load_profile(hardware).device_type
    return "cuda" if resolve_device_name(device).startswith("cuda") else "cpu"


class SpaceError(UserError):
    """A search-space file that cannot be used; the message names the file, the key and the value."""


@dataclass(frozen=True)
class ModelSection:
    d_model: int
    n_heads: int
    n_layers: int = 4
    d_ff: int | None = None
    causal: bool = True


@dataclass(frozen=True)
class TargetSection:
    hardware: str = "local"
    device: str = "auto"
    dtype: str = "float32"
    batch: int = 1
    seq_len: tuple[int, ...] = (1024,)
    mode: str = "prefill"
    what: str = "layer"
    threads: int | None = None
    timing_budget_s: float = 1.0

    @property
    def measured(self) -> bool:
        return self.hardware == "local"


@dataclass(frozen=True)
class SearchSection:
    n_q_heads: tuple[int, ...]
    n_kv_heads: tuple[int, ...]
    window: tuple[int | None, ...] = (None,)
    n_global: tuple[int, ...] = (0,)
    variants: tuple[str, ...] = tuple(VARIANTS)


@dataclass(frozen=True)
class ConstraintSection:
    kv_divides_q: bool = False
    allow_reverse: bool = True
    max_params: int | None = None
    max_kv_cache_bytes: int | None = None
    max_latency_s: float | None = None


@dataclass(frozen=True)
class ObjectiveSection:
    quality: str = "val_loss"
    kv_cache: bool = False
    memory: bool = False


@dataclass(frozen=True)
class StudySection:
    mode: str = "pareto"
    sampler: str = "auto"
    seed: int | None = 0
    trials: int = 20
    halving: HalvingSettings | None = None


@dataclass(frozen=True)
class SearchSpace:
    name: str
    model: ModelSection
    target: TargetSection
    search: SearchSection
    constraints: ConstraintSection
    objectives: ObjectiveSection
    study: StudySection
    training: dict = field(default_factory=dict)
    description: str = ""
    source: str = "<dict>"

    # ----- candidates --------------------------------------------------------------------
    def make_spec(self, n_q_heads: int, n_kv_heads: int, window: int | None, n_global: int) -> AttentionSpec:
        m = self.model
        return AttentionSpec(
            d_model=m.d_model, n_heads=m.n_heads, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
            window=window, n_global=n_global if window is not None else 0, causal=m.causal,
        )

    def violation(self, spec: AttentionSpec) -> str | None:
        """Why a spec falls outside the space's static constraints, or None. (Latency is
        checked after timing.)"""
        c = self.constraints
        if c.kv_divides_q and spec.n_q_heads % spec.n_kv_heads:
            return f"n_kv_heads={spec.n_kv_heads} does not divide n_q_heads={spec.n_q_heads} (constraints.kv_divides_q)"
        if not c.allow_reverse and spec.n_q_heads < spec.n_kv_heads:
            return f"n_q_heads={spec.n_q_heads} < n_kv_heads={spec.n_kv_heads} (constraints.allow_reverse is false)"
        if c.max_params is not None and spec.n_params() > c.max_params:
            return f"{spec.n_params()} attention parameters > constraints.max_params={c.max_params}"
        if c.max_kv_cache_bytes is not None and self.kv_cache_bytes(spec) > c.max_kv_cache_bytes:
            return (f"KV cache {self.kv_cache_bytes(spec)} bytes > "
                    f"constraints.max_kv_cache_bytes={c.max_kv_cache_bytes}")
        return None

    def kv_cache_bytes(self, spec: AttentionSpec) -> int:
        """The model's KV cache at the largest target length, batch 1, in the target dtype."""
        dtype_bytes = DTYPE_BYTES[self.target.dtype]
        return self.model.n_layers * spec.kv_cache_bytes(max(self.target.seq_len), dtype_bytes)

    def candidates(self) -> list[AttentionSpec]:
        """Every distinct spec in the space that passes the static constraints."""
        s = self.search
        seen, out = set(), []
        for q, kv, w, g in itertools.product(s.n_q_heads, s.n_kv_heads, s.window, s.n_global):
            spec = self.make_spec(q, kv, w, g)
            if spec not in seen and self.violation(spec) is None:
                seen.add(spec)
                out.append(spec)
        return out

    def named_variants(self) -> list[AttentionSpec]:
        """The named variants (search.variants) that fall inside the space, to evaluate first."""
        s, m = self.search, self.model
        out = []
        for name in s.variants:
            try:
                q, kv = variant_heads(name, m.n_heads)
            except SpecError:
                continue
            windows = [w for w in s.window if w is not None] if name in ("swsqa", "flexsqa") else [None]
            globals_ = [g for g in s.n_global if g > 0] if name == "flexsqa" else [0]
            for w, g in itertools.product(windows[:1], globals_[:1]):
                if q in s.n_q_heads and kv in s.n_kv_heads and w in s.window and (g in s.n_global):
                    spec = self.make_spec(q, kv, w, g)
                    if self.violation(spec) is None and spec not in out:
                        out.append(spec)
        return out

    # ----- objectives --------------------------------------------------------------------
    def declared_objectives(self) -> list[Objective]:
        """Every objective the space declares, in order: quality, latency, then the optional ones."""
        out = [quality_objective(self.objectives.quality), LATENCY]
        if self.objectives.kv_cache:
            out.append(KV_CACHE)
        if self.objectives.memory:
            out.append(MEMORY)
        return out

    def objectives_in_use(self) -> list[Objective]:
        """What the study optimises: every declared objective in pareto mode, else quality only
        (constrained mode minimises quality subject to the budgets)."""
        declared = self.declared_objectives()
        return declared if self.study.mode == "pareto" else declared[:1]

    def front_objectives(self) -> list[Objective]:
        """The objectives of the Pareto front `show` draws: those in use, and latency always (the
        front is quality against speed even in constrained mode)."""
        in_use = {o.name for o in self.objectives_in_use()}
        return [o for o in self.declared_objectives() if o.name in in_use or o is LATENCY]

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.declared_objectives()]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.declared_objectives()]

    # ----- proposing and timing ------------------------------------------------------------
    def distributions(self) -> dict:
        """The search parameters as Optuna distributions (both backends propose from these)."""
        from optuna.distributions import CategoricalDistribution  # optuna is slow to import: not for --help

        return {name: CategoricalDistribution(list(getattr(self.search, name))) for name in SEARCH_PARAMS}

    def suggest_params(self, trial) -> dict:
        """One proposal of the search parameters from an Optuna trial."""
        return {name: trial.suggest_categorical(name, list(getattr(self.search, name))) for name in SEARCH_PARAMS}

    def suggest(self, trial) -> AttentionSpec:
        return self.make_spec(**self.suggest_params(trial))

    def workload(self, seq_len: int) -> Workload:
        """What the target times or predicts at one sequence length."""
        t = self.target
        device = resolve_device_name(t.device) if t.measured else t.device
        return Workload(mode=t.mode, seq_len=seq_len, batch=t.batch, scope=t.what, dtype=t.dtype, device=device,
                        n_layers=self.model.n_layers, d_ff=self.model.d_ff, threads=t.threads)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        for key in ("seq_len",):
            data["target"][key] = list(data["target"][key])
        for key in (*SEARCH_PARAMS, "variants"):
            data["search"][key] = list(data["search"][key])
        if not data["objectives"]["memory"]:  # unwritten when off: older spaces keep their fingerprint
            del data["objectives"]["memory"]
        return data

    def fingerprint(self) -> str:
        """A hash of everything that changes a trial's result (not the study's size or sampler)."""
        data = self.to_dict()
        for key in ("name", "description", "study"):
            data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def candidate_key(spec: AttentionSpec) -> str:
    """A stable key for a spec: identical specs are evaluated once."""
    return json.dumps(spec.to_dict(), sort_keys=True)


# ----- loading and validation ---------------------------------------------------------------------
class _Reader:
    """Reads one mapping, remembering which keys were used, so leftovers are reported."""

    def __init__(self, source: str, path: str, data: Any):
        self.source, self.path = source, path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(None, data, "must be a mapping of keys to values")
        self.data = data

    def error(self, key: str | None, value: Any, allowed: str) -> SpaceError:
        where = f"{self.path}.{key}" if key and self.path else (key or self.path or "<top level>")
        return SpaceError(f"{self.source}: {where}={value!r} is not allowed: {allowed}")

    def check_unknown(self, allowed_keys) -> None:
        unknown = sorted(set(self.data) - set(allowed_keys))
        if unknown:
            where = self.path or "the top level"
            raise SpaceError(
                f"{self.source}: unknown key(s) {unknown} in {where}: allowed are {sorted(allowed_keys)}"
            )

    def int(self, key, default=None, low=1, required=False, optional=False):
        if key not in self.data:
            if required:
                raise self.error(key, None, "is required (an integer)")
            return default
        value = self.data[key]
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.error(key, value, f"must be an integer >= {low}" + (" or null" if optional else ""))
        return value

    def float(self, key, default=None, optional=False):
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.error(key, value, "must be a number > 0" + (" or null" if optional else ""))
        return float(value)

    def bool(self, key, default):
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, value, "must be true or false")
        return value

    def choice(self, key, default, allowed):
        value = self.data.get(key, default)
        if value not in allowed:
            raise self.error(key, value, f"choose one of {', '.join(map(str, allowed))}")
        return value

    def section(self, key) -> "_Reader":
        return _Reader(self.source, f"{self.path}.{key}" if self.path else key, self.data.get(key))


def _heads_choices(r: _Reader, key: str, h: int) -> tuple[int, ...]:
    if key not in r.data:
        raise r.error(key, None, f"is required: a list of head counts in [1, {h}] or {{ratios: [...]}}")
    value = r.data[key]
    if isinstance(value, dict):
        sub = _Reader(r.source, f"{r.path}.{key}", value)
        sub.check_unknown(["ratios"])
        ratios = value.get("ratios")
        if not isinstance(ratios, list) or not ratios:
            raise sub.error("ratios", ratios, "must be a non-empty list of numbers in (0, 1]")
        out = []
        for ratio in ratios:
            count = ratio * h if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else None
            if count is None or not 0 < ratio <= 1 or abs(count - round(count)) > 1e-9:
                raise sub.error("ratios", ratio, f"each ratio times n_heads={h} must be a whole number in [1, {h}]")
            out.append(int(round(count)))
        value = out
    if not isinstance(value, list) or not value:
        raise r.error(key, value, f"must be a non-empty list of integers in [1, {h}] or {{ratios: [...]}}")
    for count in value:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= h:
            raise r.error(key, count, f"each head count must be an integer in [1, n_heads={h}]")
    return tuple(sorted(set(value)))


def _int_list(r: _Reader, key: str, default, low: int, allow_null: bool) -> tuple:
    value = r.data.get(key, default)
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise r.error(key, value, "must not be empty")
    for item in value:
        if item is None and allow_null:
            continue
        if isinstance(item, bool) or not isinstance(item, int) or item < low:
            allowed = f"each entry must be an integer >= {low}" + (" or null (full attention)" if allow_null else "")
            raise r.error(key, item, allowed)
    return tuple(dict.fromkeys(value))


def space_from_dict(data: dict, source: str = "<dict>", name: str | None = None) -> SearchSpace:
    top = _Reader(source, "", data)
    top.check_unknown(["name", "description", "model", "target", "search", "constraints",
                       "objectives", "study", "training"])
    model = _read_model(top.section("model"))
    target = _read_target(top.section("target"), model)
    search = _read_search(top.section("search"), model.n_heads)
    constraints = _read_constraints(top.section("constraints"))

    o = top.section("objectives")
    o.check_unknown([f.name for f in dataclasses.fields(ObjectiveSection)])
    objectives = ObjectiveSection(quality=o.choice("quality", "val_loss", QUALITIES), kv_cache=o.bool("kv_cache", False),
                                 memory=o.bool("memory", False))

    training = top.data.get("training") or {}
    if not isinstance(training, dict):
        raise top.error("training", training, "must be a mapping of TrainConfig fields")
    _check_training(source, training, objectives.quality)

    st = top.section("study")
    st.check_unknown([f.name for f in dataclasses.fields(StudySection)])
    trials = st.int("trials", 20)
    study = StudySection(mode=st.choice("mode", "pareto", STUDY_MODES), sampler=st.choice("sampler", "auto", SAMPLERS),
                         seed=st.int("seed", 0, low=0, optional=True), trials=trials,
                         halving=read_halving(st.section("halving"), trials, replicates_of(training))
                         if st.data.get("halving") is not None else None)
    if study.mode == "constrained" and constraints.max_latency_s is None and constraints.max_kv_cache_bytes is None:
        raise st.error("mode", "constrained", "needs constraints.max_latency_s and/or constraints.max_kv_cache_bytes")

    name = name or top.data.get("name") or Path(source).stem
    if not isinstance(name, str) or not name or any(ch in name for ch in "/\\ "):
        raise top.error("name", name, "must be a non-empty name without slashes or spaces")
    space = SearchSpace(name=name, model=model, target=target, search=search, constraints=constraints,
                        objectives=objectives, study=study, training=dict(training),
                        description=str(top.data.get("description", "")), source=source)
    if not space.candidates():
        raise SpaceError(f"{source}: the search space is empty once constraints are applied")
    return space


def _read_model(m: _Reader) -> ModelSection:
    m.check_unknown([f.name for f in dataclasses.fields(ModelSection)])
    d_model = m.int("d_model", required=True)
    n_heads = m.int("n_heads", required=True)
    model = ModelSection(d_model=d_model, n_heads=n_heads, n_layers=m.int("n_layers", 4),
                         d_ff=m.int("d_ff", None, optional=True), causal=m.bool("causal", True))
    if d_model % n_heads:
        raise m.error("n_heads", n_heads, f"must divide model.d_model={d_model}")
    return model


def _read_target(t: _Reader, model: ModelSection) -> TargetSection:
    t.check_unknown([f.name for f in dataclasses.fields(TargetSection)])
    hardware = t.data.get("hardware", "local")
    if hardware != "local":
        from ..speed.hardware import CostError, list_profiles, load_profile  # only needed for predicted targets

        try:
            hardware = load_profile(hardware).name  # short names such as h100 resolve here
        except (CostError, TypeError):
            raise t.error("hardware", hardware, f"choose local or one of {', '.join(list_profiles())}") from None
    device = t.data.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise t.error("device", device, "choose auto, cpu, cuda or cuda:N")
    mode = t.choice("mode", "prefill", MODES)
    target = TargetSection(
        hardware=hardware, device=device,
        dtype=t.choice("dtype", None, DTYPES) if t.data.get("dtype") is not None
        else default_dtype(_target_device_type(hardware, device)),
        batch=t.int("batch", 1), seq_len=_int_list(t, "seq_len", [1024], 1, False), mode=mode,
        what=t.choice("what", "layer", WHATS), threads=t.int("threads", None, optional=True),
        timing_budget_s=t.float("timing_budget_s", 1.0),
    )
    if mode == "decode" and not model.causal:
        raise t.error("mode", mode, "decode needs model.causal: true (an encoder has no next token)")
    return target


def _read_search(s: _Reader, n_heads: int) -> SearchSection:
    s.check_unknown([f.name for f in dataclasses.fields(SearchSection)])
    variants = s.data.get("variants", "all")
    if variants == "all":
        variants = list(VARIANTS)
    if not isinstance(variants, list):
        raise s.error("variants", variants, f"must be 'all' or a list of: {', '.join(VARIANTS)}")
    try:
        variants = tuple(normalise_variant(v) for v in variants)
    except SpecError as exc:
        raise SpaceError(f"{s.source}: search.variants: {exc}") from None
    return SearchSection(
        n_q_heads=_heads_choices(s, "n_q_heads", n_heads), n_kv_heads=_heads_choices(s, "n_kv_heads", n_heads),
        window=_int_list(s, "window", [None], 1, True), n_global=_int_list(s, "n_global", [0], 0, False),
        variants=variants,
    )


def _read_constraints(c: _Reader) -> ConstraintSection:
    c.check_unknown([f.name for f in dataclasses.fields(ConstraintSection)])
    return ConstraintSection(
        kv_divides_q=c.bool("kv_divides_q", False), allow_reverse=c.bool("allow_reverse", True),
        max_params=c.int("max_params", None, optional=True),
        max_kv_cache_bytes=c.int("max_kv_cache_bytes", None, optional=True),
        max_latency_s=c.float("max_latency_s", None, optional=True),
    )


# `training` keys that are not TrainConfig fields: how many seeds each candidate trains (its quality
# is their mean, with a standard error; sqa_search.quality.replicates), seeds training.seed + i
TRAINING_EXTRA = {"replicates": 1}


def replicates_of(training: dict) -> int:
    """How many replicate seeds a candidate trains (`training.replicates`, default 1)."""
    return training.get("replicates", TRAINING_EXTRA["replicates"])


def train_config_from(training: dict, quality: str = "val_loss", check_device: bool = True):
    """The `training` section -> a TrainConfig. The task defaults to what the quality objective
    needs. check_device=False validates a GPU space on a machine without one. Keys that are not
    TrainConfig fields (TRAINING_EXTRA) are left out."""
    from ..quality.mqar import MQARConfig  # quality/ imports torch: only when training is configured
    from ..quality.train import TrainConfig

    fields = {k: v for k, v in training.items() if k not in TRAINING_EXTRA}
    if isinstance(fields.get("mqar"), dict):
        fields["mqar"] = MQARConfig(**fields["mqar"])
    if "betas" in fields and isinstance(fields["betas"], list):
        fields["betas"] = tuple(fields["betas"])
    fields.setdefault("task", "mqar" if quality == "mqar_accuracy" else "lm")
    if not check_device:
        fields["device"] = "cpu"
    return TrainConfig(**fields)


def _check_training(source: str, training: dict, quality: str) -> None:
    """Unknown training keys are errors too; values are checked by TrainConfig itself."""
    from ..quality.train import TrainConfig, TrainError  # torch: only when a space is validated

    allowed = {f.name for f in dataclasses.fields(TrainConfig)} | set(TRAINING_EXTRA)
    unknown = sorted(set(training) - allowed)
    if unknown:
        raise SpaceError(f"{source}: unknown key(s) {unknown} in training: allowed are {sorted(allowed)}")
    n = replicates_of(training)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpaceError(f"{source}: training.replicates={n!r} is not allowed: must be an integer >= 1 "
                         "(seeds training.seed, training.seed + 1, ...)")
    try:
        config = train_config_from(training, quality, check_device=False)
    except (TrainError, TypeError, ValueError) as exc:
        raise SpaceError(f"{source}: training: {exc}") from None
    if quality == "mqar_accuracy" and "mqar" not in config.task:
        raise SpaceError(f"{source}: training.task={config.task!r} is not allowed with objectives.quality="
                         f"mqar_accuracy: the task must include mqar")
    if quality == "val_loss" and "lm" not in config.task:
        raise SpaceError(f"{source}: training.task={config.task!r} is not allowed with objectives.quality="
                         f"val_loss: the task must include lm")


def load_space(path: str | Path, name: str | None = None) -> SearchSpace:
    path = Path(path)
    if path.is_dir():
        raise SpaceError(f"search space file {str(path)!r} is a folder: give a .yaml file (e.g. search_spaces/quickstart.yaml)")
    if not path.is_file():
        raise SpaceError(f"search space file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from None
    return space_from_dict(data, source=str(path), name=name)
