"""Export: the standalone module against the library layer, in a fresh interpreter that cannot
import sqa_search (outputs and gradients within 1e-6 in fp32), torch.export on it, the JSON config
back into the library, weights into either, the README, the pick rules and bad input."""

import argparse
import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sqa_search.layer.attention import SparseQueryAttention
from sqa_search.cli.export import add_arguments
from sqa_search.decide.export import (
    ExportError,
    export_layer,
    export_trial,
    load_layer,
)
from sqa_search.decide.parse import parse_pick, parse_spec
from sqa_search.decide.pick import select_trial
from sqa_search.layer.spec import VARIANTS, AttentionSpec
from study_helpers import fake_study

D, H = 64, 8
TOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors on a shared machine: intra-op threads only wait on each other (50x slower)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----- cases ---------------------------------------------------------------------------------
def _cases():
    """(name, spec, seq_lens, backend): every named variant causal and bidirectional, plus the
    paths the names do not reach (uneven groups, biases without RoPE, global tokens with full
    attention or a window wider than N, forced FlexAttention)."""
    out = []
    for key in VARIANTS:
        for causal in (True, False):
            extra = {"window": 8} if key in ("swsqa", "flexsqa") else {}
            spec = AttentionSpec.variant(key, D, H, causal=causal, **extra)
            lens = [37, 150] if spec.window else [37]  # 150: several query blocks of 64
            out.append((f"{key}-{'causal' if causal else 'bidir'}", spec, lens, "auto"))
    out += [
        ("uneven-window", AttentionSpec(D, H, 6, 4, window=8), [37, 150], "auto"),
        ("uneven-full-bidir", AttentionSpec(D, H, 6, 4, causal=False), [37], "auto"),
        ("bias-norope", AttentionSpec(D, H, 4, 2, bias=True, rope=False), [37], "auto"),
        ("global-full", AttentionSpec(D, H, 4, 2, n_global=3), [37], "auto"),
        ("global-full-bidir", AttentionSpec(D, H, 4, 2, n_global=3, causal=False), [37], "auto"),
        ("global-wide-window", AttentionSpec(D, H, 4, 2, window=64, n_global=2), [37], "auto"),
        ("flex-window-gqa", AttentionSpec(D, H, 4, 2, window=8), [37], "flex-eager"),
        ("flex-global-bidir", AttentionSpec(D, H, 6, 4, window=8, n_global=2, causal=False), [37], "flex-eager"),
        ("sdpa-forced-window", AttentionSpec(D, H, 2, 4, window=8), [37], "sdpa"),
    ]
    return out


DECODE = [("sqa", AttentionSpec.variant("sqa", D, H)), ("gqa", AttentionSpec.variant("gqa", D, H)),
          ("uneven", AttentionSpec(D, H, 6, 4)), ("rsqa", AttentionSpec.variant("rsqa", D, H)),
          ("swsqa", AttentionSpec.variant("swsqa", D, H, window=5)),
          ("flexsqa", AttentionSpec.variant("flexsqa", D, H, window=4, n_global=2))]


def _import_file(path: Path, name: str):
    # Python's recipe for importing a file: register it first (dataclasses look their module up)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The child: a fresh interpreter (-I: no PYTHONPATH, no user site, no cwd on sys.path) with a
# meta-path blocker, so neither the test nor the exported module can import sqa_search even
# though it is installed (editable) in this environment.
CHILD = textwrap.dedent(r"""
    import importlib.util, sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "sqa_search" or name.startswith("sqa_search."):
                raise ImportError("sqa_search is blocked in this interpreter")
            return None
    sys.meta_path.insert(0, _Block())
    try:
        import sqa_search
    except ImportError:
        pass
    else:
        raise SystemExit("sqa_search could be imported: the isolation failed")
    import torch
    torch.set_num_threads(1)
    root = sys.argv[1]
    plan = torch.load(root + "/plan.pt", weights_only=True)
    results = {}
    for name, case in plan.items():
        module_name = "exported_" + name.replace("-", "_")
        spec = importlib.util.spec_from_file_location(module_name, case["module"])
        m = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = m
        spec.loader.exec_module(m)
        layer = m.load(case["weights"], backend=case["backend"])
        got = {}
        for i, (x, g) in enumerate(zip(case["x"], case["grad_out"])):
            if g is None:  # forward only (FlexAttention has no backward on CPU)
                with torch.no_grad():
                    got[f"out{i}"] = layer(x)
                got[f"backend{i}"] = torch.tensor([ord(c) for c in layer.last_backend])
                continue
            layer.zero_grad(set_to_none=True)
            x = x.clone().requires_grad_(True)
            out = layer(x)
            out.backward(g)
            got[f"out{i}"] = out.detach()
            got[f"xgrad{i}"] = x.grad
            for pname, p in layer.named_parameters():
                got[f"grad{i}.{pname}"] = p.grad
            got[f"backend{i}"] = torch.tensor([ord(c) for c in layer.last_backend])
        if "prompt" in case:
            with torch.no_grad():
                cache = layer.new_cache(case["prompt"].shape[0], case["total"])
                layer.prefill_cache(case["prompt"], cache)
                got["decode"] = torch.cat([layer.decode(t.unsqueeze(1), cache) for t in case["steps"].unbind(1)], 1)
        results[name] = got
    assert not any(k == "sqa_search" or k.startswith("sqa_search.") for k in sys.modules)
    torch.save(results, root + "/results.pt")
    print("ok", len(results))
""")


def _library_figures(layer, xs, gs):
    exp = {}
    for i, (x, g) in enumerate(zip(xs, gs)):
        if g is None:
            with torch.no_grad():
                exp[f"out{i}"] = layer(x)
            exp[f"backend{i}"] = layer.last_backend
            continue
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        out = layer(x)
        out.backward(g)
        exp[f"out{i}"] = out.detach()
        exp[f"xgrad{i}"] = x.grad
        for pname, p in layer.named_parameters():
            exp[f"grad{i}.{pname}"] = p.grad
        exp[f"backend{i}"] = layer.last_backend
    return exp


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Export every case, compute the library's figures here, the exported module's in the child."""
    import warnings

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    root = tmp_path_factory.mktemp("roundtrip")
    torch.manual_seed(0)
    plan, expected = {}, {}
    for i, (name, spec, lens, backend) in enumerate(_cases()):
        res = export_layer(spec, root / name, with_weights=True, seed=i)
        lib = load_layer(root / name, backend=backend)
        xs = [torch.randn(2, n, D) for n in lens]
        # FlexAttention runs forward only on CPU (torch 2.13): its cases compare outputs only
        gs = [None if backend.startswith("flex") else torch.randn(2, n, D) for n in lens]
        plan[name] = {"module": str(res.module_path), "weights": str(res.weights_path), "backend": backend,
                      "x": xs, "grad_out": gs}
        expected[name] = _library_figures(lib, xs, gs)
    for name, spec in DECODE:
        res = export_layer(spec, root / f"decode-{name}", with_weights=True, seed=7)
        lib = load_layer(root / f"decode-{name}")
        prompt, steps = torch.randn(2, 9, D), torch.randn(2, 8, D)
        with torch.no_grad():
            cache = lib.new_cache(2, 17)
            lib.prefill_cache(prompt, cache)
            dec = torch.cat([lib.decode(t.unsqueeze(1), cache) for t in steps.unbind(1)], 1)
        key = f"decode-{name}"
        plan[key] = {"module": str(res.module_path), "weights": str(res.weights_path), "backend": "auto",
                     "x": [], "grad_out": [], "prompt": prompt, "steps": steps, "total": 17}
        expected[key] = {"decode": dec}
    torch.save(plan, root / "plan.pt")
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, str(root)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = torch.load(root / "results.pt", weights_only=True)
    return expected, got, root


@pytest.mark.parametrize("name", [c[0] for c in _cases()] + [f"decode-{n}" for n, _ in DECODE])
def test_exported_module_matches_library_in_fresh_interpreter(round_trip, name):
    expected, got, _ = round_trip
    exp, res = expected[name], got[name]
    tensor_keys = [k for k in exp if not k.startswith("backend")]
    assert tensor_keys and set(tensor_keys) <= set(res)
    for key in tensor_keys:
        assert res[key] is not None and exp[key] is not None, key
        assert res[key].shape == exp[key].shape, key
        err = (res[key] - exp[key]).abs().max().item()
        assert err <= TOL, f"{name} {key}: max abs diff {err:.3g}"
    for key in [k for k in exp if k.startswith("backend")]:
        # the same path ran (the kernel suffix too: same inputs, same choice)
        assert "".join(chr(c) for c in res[key].tolist()) == exp[key], key


def test_round_trip_covers_every_path(round_trip):
    expected, _, _ = round_trip
    ran = {v.split("/")[0] for exp in expected.values() for k, v in exp.items() if k.startswith("backend")}
    assert {"sdpa", "blocked", "sdpa-masked", "flex-eager"} <= ran


# ----- one implementation: the export is the library's source -------------------------------------
def test_exported_module_is_the_library_source_inlined():
    import inspect

    from sqa_search.layer import attention, spec as spec_module
    from sqa_search.decide.layer_source import LAYER_MODULES, module_source, render_module

    text = render_module(AttentionSpec.variant("swsqa", D, H, window=8))
    # the library's layer and spec classes appear verbatim, in the order spec, masks, attention
    assert inspect.getsource(attention.SparseQueryAttention) in text
    assert inspect.getsource(spec_module.AttentionSpec) in text
    present = [m for m in LAYER_MODULES if module_source(m) is not None]
    banners = [text.index(f"inlined from sqa_search/layer/{m}.py") for m in present]
    assert present[0] == "spec" and present[-1] == "attention" and banners == sorted(banners)
    # no import of the package is left, and only one `from __future__` line
    imports = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n.lineno for n in imports if isinstance(n, ast.ImportFrom) and n.level > 0]
    names = [a.name for n in imports if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in imports if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] == "sqa_search"]
    assert names.count("__future__") == 1


def test_inlining_rewrites_relative_imports_and_refuses_the_package():
    from sqa_search.decide.layer_source import inline

    src = textwrap.dedent("""\
        from __future__ import annotations
        from .spec import (AttentionSpec,
                           SpecError)
        from .masks import causal as _causal, window
        def f():
            from .masks import window
        x = 1
    """)
    out = inline("attention", src)
    assert "from ." not in out and "__future__" not in out
    assert "_causal = causal" in out and "    pass" in out and out.rstrip().endswith("x = 1")
    compile(out, "inlined", "exec")
    with pytest.raises(ExportError, match="attention.py line 1 imports sqa_search itself"):
        inline("attention", "from sqa_search.layer.spec import AttentionSpec\n")


# ----- torch.export ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [AttentionSpec.variant("sqa", D, H),
                                  AttentionSpec.variant("swsqa", D, H, window=8),
                                  AttentionSpec.variant("flexsqa", D, H, window=8, causal=False)],
                         ids=["full", "window", "window-global-bidir"])
def test_torch_export_traces_the_exported_module(tmp_path, spec):
    res = export_layer(spec, tmp_path / "e", with_weights=True)
    m = _import_file(res.module_path, f"exp_{spec.family}_{spec.causal}")
    layer = m.load(res.weights_path).eval()
    x = torch.randn(2, 150, D)
    ep = torch.export.export(layer, (x,))
    torch.testing.assert_close(ep.module()(x), layer(x), rtol=0, atol=TOL)
    # attention stays one fused SDPA call in the graph (not decomposed into an N x N softmax)
    ops = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
    assert any("scaled_dot_product_attention" in op for op in ops), sorted(ops)
    assert not any("softmax" in op for op in ops), sorted(ops)


def test_torch_export_with_dynamic_sequence_length(tmp_path):
    spec = AttentionSpec.variant("sqa", D, H)
    res = export_layer(spec, tmp_path / "e", with_weights=True)
    m = _import_file(res.module_path, "exp_dynamic")
    layer = m.load(res.weights_path).eval()
    n = torch.export.Dim("n", min=2, max=4096)
    ep = torch.export.export(layer, (torch.randn(2, 64, D),), dynamic_shapes=({1: n},))
    for length in (17, 100):
        x = torch.randn(2, length, D)
        torch.testing.assert_close(ep.module()(x), layer(x), rtol=0, atol=TOL)


# ----- config, weights, README ------------------------------------------------------------------
def test_config_loads_back_into_library_layer_with_weights(tmp_path):
    spec = AttentionSpec.variant("lsqa", D, H, window=16)
    res = export_layer(spec, tmp_path / "e", with_weights=True, seed=3)
    config = json.loads(res.config_path.read_text())
    assert config["spec"] == spec.to_dict() and config["weights"] == "weights.pt"
    for path in (tmp_path / "e", res.config_path):
        layer = load_layer(path)
        assert isinstance(layer, SparseQueryAttention) and layer.spec == spec
        state = torch.load(res.weights_path, weights_only=True)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), k
    # the same seed gives the same weights in either layer: the init order matches
    torch.manual_seed(3)
    fresh = SparseQueryAttention(spec)
    m = _import_file(res.module_path, "exp_seed")
    torch.manual_seed(3)
    fresh_exported = m.SparseQueryAttention()
    for (k1, v1), (k2, v2) in zip(fresh.state_dict().items(), fresh_exported.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert set(state) == set(fresh.state_dict())


def test_weights_from_a_model_checkpoint_with_prefix(tmp_path):
    from sqa_search.layer.model import ModelConfig, ProxyLM

    spec = AttentionSpec.variant("sqa", D, H)
    model = ProxyLM(ModelConfig(spec, n_layers=2))
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "step": 3}, ckpt)
    with pytest.raises(ExportError, match="weights-prefix"):
        export_layer(spec, tmp_path / "a", weights=ckpt)
    res = export_layer(spec, tmp_path / "b", weights=ckpt, weights_prefix="blocks.1.attn.")
    layer = load_layer(res.directory)
    assert torch.equal(layer.q_proj.weight, model.blocks[1].attn.q_proj.weight)
    m = _import_file(res.module_path, "exp_ckpt")
    ex = m.load(res.weights_path)
    x = torch.randn(1, 20, D)
    torch.testing.assert_close(ex(x), model.blocks[1].attn(x), rtol=0, atol=TOL)
    assert "taken from" in res.readme_path.read_text()
    # weights of another configuration do not fit: a clear error, not a silent partial load
    other = SparseQueryAttention(AttentionSpec.variant("mha", D, H)).state_dict()
    with pytest.raises(ExportError, match="does not fit"):
        export_layer(spec, tmp_path / "c", weights=other)
    with pytest.raises(ExportError, match="no such file"):
        export_layer(spec, tmp_path / "d", weights=tmp_path / "missing.pt")


def test_readme_and_module_say_what_and_how(tmp_path):
    spec = AttentionSpec.variant("sqa", 256, 16)
    res = export_layer(spec, tmp_path / "e", with_weights=True)
    readme = res.readme_path.read_text()
    assert "SQA 8q/4kv" in readme and "NOT trained" in readme and "## Usage" in readme
    usage = readme.split("```python")[1].split("```")[0].strip().splitlines()
    assert len(usage) == 4 and usage[0] == "import torch"  # import torch + the three-line example
    # the usage example runs as written, from the export folder, without sqa_search
    code = "import sys; sys.path.insert(0, '.'); " + "; ".join(line.split("#")[0].strip() for line in usage)
    code += "; assert y.shape == (2, 1024, 256); assert 'sqa_search' not in sys.modules"
    code = "import torch; torch.set_num_threads(1); " + code
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=res.directory, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    # no stale weights after re-exporting without them
    res2 = export_layer(spec, tmp_path / "e")
    assert res2.weights_path is None and not (tmp_path / "e" / "weights.pt").exists()
    assert json.loads(res2.config_path.read_text())["weights"] is None
    assert "no weights" in res2.readme_path.read_text()


def test_load_layer_errors(tmp_path):
    with pytest.raises(ExportError, match="config.json is missing"):
        load_layer(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ExportError, match="not an sqa-search export: format is 'something else'"):
        load_layer(tmp_path)
    res = export_layer(AttentionSpec.variant("sqa", D, H), tmp_path / "e", with_weights=True)
    res.weights_path.unlink()
    with pytest.raises(ExportError, match="weights.pt is missing"):
        load_layer(res.directory)


def _damage(folder: Path, what: str) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if what == "config-truncated":
        config_path.write_text(config_path.read_text()[:40])
    elif what == "config-binary":
        config_path.write_bytes(b"\x80\x81\xfe\x00")
    elif what == "config-a-list":
        config_path.write_text("[1, 2]")
    elif what in ("version-newer", "version-text", "spec-missing", "spec-bad", "weights-path"):
        change = {"version-newer": ("format_version", 99), "version-text": ("format_version", "one"),
                  "spec-missing": ("spec", None), "spec-bad": ("spec", {**config["spec"], "n_q_heads": 0}),
                  "weights-path": ("weights", "../elsewhere/weights.pt")}[what]
        config[change[0]] = change[1]
        config_path.write_text(json.dumps(config))
    elif what == "weights-truncated":
        data = (folder / "weights.pt").read_bytes()
        (folder / "weights.pt").write_bytes(data[: len(data) // 2])
    elif what == "weights-text":
        (folder / "weights.pt").write_text("not a checkpoint")
    elif what == "weights-not-a-dict":
        torch.save([torch.zeros(2)], folder / "weights.pt")
    elif what == "weights-other-spec":  # a state_dict of another configuration
        torch.save(SparseQueryAttention(AttentionSpec.variant("mha", D, H)).state_dict(), folder / "weights.pt")
    elif what == "weights-missing-key":
        state = torch.load(folder / "weights.pt", weights_only=True)
        del state["o_proj.weight"]
        torch.save(state, folder / "weights.pt")


@pytest.mark.parametrize("what, message", [
    ("config-truncated", r"config\.json is not valid JSON .* expected the config\.json"),
    ("config-binary", r"config\.json is not valid JSON"),
    ("config-a-list", r"not an sqa-search export: format is 'a JSON list'"),
    ("version-newer", r"format_version 99; this sqa-search reads up to 1"),
    ("version-text", r"format_version='one' is not allowed: an integer from 1 to 1 expected"),
    ("spec-missing", r"spec=None is not allowed: a JSON object"),
    ("spec-bad", r"spec is not a valid AttentionSpec .*n_q_heads"),
    ("weights-path", r"weights='\.\./elsewhere/weights\.pt' is not allowed: null or a file name"),
    ("weights-truncated", r"weights\.pt cannot be read as a state_dict .* expected the weights\.pt"),
    ("weights-text", r"weights\.pt cannot be read as a state_dict"),
    ("weights-not-a-dict", r"weights\.pt holds a list, not a state_dict"),
    ("weights-other-spec", r"weights\.pt does not fit the spec in config\.json \(SQA 4q/2kv\): wrong shape "
                           r".*q_proj\.weight \(64, 64\) \(expected \(32, 64\)\)"),
    ("weights-missing-key", r"weights\.pt does not fit .*missing o_proj\.weight"),
])
def test_a_damaged_export_names_the_file_and_what_is_wrong(tmp_path, what, message):
    res = export_layer(AttentionSpec.variant("sqa", D, H), tmp_path / "e", with_weights=True)
    _damage(res.directory, what)
    with pytest.raises(ExportError, match=message):
        load_layer(res.directory)


# ----- specs and rules ---------------------------------------------------------------------------
def test_parse_spec_forms():
    assert parse_spec("sqa") == AttentionSpec.variant("sqa", 256, 16)
    assert parse_spec("SW-SQA", d_model=64, n_heads=8, window=32).window == 32
    assert parse_spec("6/4", d_model=64, n_heads=8) == AttentionSpec(64, 8, 6, 4)
    assert parse_spec("4/2/128/4", d_model=64, n_heads=8) == AttentionSpec(64, 8, 4, 2, window=128, n_global=4)
    assert parse_spec("4/2/none/3", d_model=64, n_heads=8).n_global == 3
    assert parse_spec(json.dumps(AttentionSpec(64, 8, 2, 1).to_dict())) == AttentionSpec(64, 8, 2, 1)
    for bad, match in (("nonsense", "not known"), ("4/x", "integers"), ("9/2", "n_q_heads"), ("{bad", "JSON")):
        with pytest.raises(ExportError, match=match):
            parse_spec(bad, d_model=64, n_heads=8)


def test_parse_pick():
    assert parse_pick("knee") == ("knee", None)
    assert parse_pick("fastest-within 1%") == ("fastest-within", 0.01)
    assert parse_pick("fastest-within 0.005")[1] == pytest.approx(0.005)
    assert parse_pick("best-under-latency 5ms")[1] == pytest.approx(0.005)
    assert parse_pick("best-under-latency 0.2")[1] == pytest.approx(0.2)
    for bad in ("fastest", "fastest-within lots", "best-under-latency -1", "knee 3", "fastest-within 5"):
        with pytest.raises(ExportError):
            parse_pick(bad)


# ----- a small synthetic study: trials written straight into Optuna ----------------------------
def _fake_study(tmp_path, rows, name="fake"):
    """A synthetic study measured on "Test CPU", with one failed trial."""
    fp = {"device_type": "cpu", "device_name": "Test CPU", "torch_version": "2.x", "threads": 1}
    return fake_study(tmp_path, rows, fp, name=name, d_model=D, n_heads=H, fingerprint_id="abc",
                      train={"steps": 10, "tokens": 1000, "data_source": "builtin", "seed": 0},
                      failed_reason="invalid combination: test")


ROWS = [(AttentionSpec.variant("mha", D, H), 2.000, 0.010),
        (AttentionSpec.variant("gqa", D, H), 2.010, 0.009),
        (AttentionSpec.variant("sqa", D, H), 2.015, 0.006),
        (AttentionSpec.variant("xsqa", D, H), 2.060, 0.004),
        (AttentionSpec.variant("ssqa", D, H), 2.018, 0.0062)]


def test_pick_rules_on_a_study(tmp_path):
    from sqa_search.search.engine import open_study

    handle = open_study(_fake_study(tmp_path, ROWS))
    t, why = select_trial(handle, pick="fastest-within 1%")
    assert t.user_attrs["label"] == "SQA 4q/2kv" and "MHA" in why
    t, _ = select_trial(handle, pick="fastest-within 0.1%")
    assert t.user_attrs["variant"] == "mha"
    t, _ = select_trial(handle, pick="best-under-latency 7ms")
    assert t.user_attrs["label"] == "SQA 4q/2kv"
    t, _ = select_trial(handle, pick="knee")
    assert t.user_attrs["label"] in {"SQA 4q/2kv", "xSQA 2q/2kv"}
    t, _ = select_trial(handle, trial=1)
    assert t.number == 1
    with pytest.raises(ExportError, match="matches nothing.*fastest is trial 3"):
        select_trial(handle, pick="best-under-latency 1ms")
    with pytest.raises(ExportError, match=r"--trial 42 is not in study 'fake'.*complete: 0, 1, 2, 3, 4"):
        select_trial(handle, trial=42)
    with pytest.raises(ExportError, match="FAIL.*invalid combination"):
        select_trial(handle, trial=5)
    with pytest.raises(ExportError, match="not a rule"):
        select_trial(handle, pick="slowest")


def test_fastest_within_uses_best_trial_without_mha(tmp_path):
    from sqa_search.search.engine import open_study

    handle = open_study(_fake_study(tmp_path, ROWS[1:], name="nomha"))
    t, why = select_trial(handle, pick="fastest-within 0.3%")
    assert "MHA is not in the study" in why and t.user_attrs["label"] == "SQA 4q/2kv"


def test_export_trial_writes_provenance(tmp_path):
    folder = _fake_study(tmp_path, ROWS)
    res = export_trial(folder, tmp_path / "out", pick="fastest-within 1%", with_weights=True)
    config = json.loads(res.config_path.read_text())
    assert config["source"]["study"] == "fake" and config["source"]["trial"] == 2
    assert config["figures"]["latency_s"] == 0.006 and config["figures"]["quality"] == 2.015
    readme = res.readme_path.read_text()
    for text in ("study 'fake'", "trial: 2", "Test CPU", "measured on Test CPU", "2.0150", "abc"):
        assert text in readme, text
    assert "measured on Test CPU" in res.module_path.read_text()
    with pytest.raises(ExportError, match="does not exist"):
        export_trial(tmp_path / "nowhere", tmp_path / "o")


def _cli(argv):
    from sqa_search.cli import main

    return main(["export", *argv])


def test_cli(tmp_path, capsys):
    folder = _fake_study(tmp_path, ROWS)
    assert _cli(["--study", str(folder), "--trial", "3", "--out", str(tmp_path / "a")]) == 0
    assert "xSQA 2q/2kv" in capsys.readouterr().out
    assert _cli(["--spec", "sqa", "--d-model", "64", "--heads", "8", "--bidirectional", "--weights",
                 "--out", str(tmp_path / "b")]) == 0
    assert load_layer(tmp_path / "b").spec == AttentionSpec.variant("sqa", 64, 8, causal=False)
    capsys.readouterr()
    for argv, match in (
        (["--study", str(folder), "--trial", "99"], "not in study"),
        (["--study", str(tmp_path / "nowhere"), "--trial", "0"], "does not exist"),
        (["--study", str(folder), "--pick", "best-under-latency 1us"], "matches nothing"),
        (["--trial", "0"], "needs --study"),
        (["--spec", "sqa", "--trial", "0"], "exactly one"),
        (["--spec", "bogus"], "not known"),
    ):
        assert _cli(argv + ["--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err  # through the CLI's one handler: one line on stderr
        assert err.startswith("sqa-search export: error:") and match in err and err.count("\n") == 1, (argv, err)


def test_help_prints(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0 and "fastest-within X%" in capsys.readouterr().out


def test_provenance_with_quotes_and_backslashes_stays_text():
    """A study's name or path lands in the module's docstring: quotes and backslashes must not
    end it or become escapes (a SyntaxError in the user's file)."""
    import ast

    from sqa_search.decide.layer_source import render_module

    provenance = 'study a"""b, path C:\\x\\U1, end"""'
    source = render_module(AttentionSpec.variant("sqa", D, H), provenance=provenance)
    assert provenance in ast.get_docstring(ast.parse(source))


def test_another_objective_of_a_study_is_in_the_readme_and_config(tmp_path, monkeypatch):
    """A study objective beyond quality, latency and KV cache (peak memory, next) is listed with the
    others, without an edit to decide/."""
    from sqa_search.decide import objectives

    declared = objectives.objectives_in_use

    def with_memory(space):
        return declared(space) + [objectives.ObjectiveView(
            "peak_memory_bytes", "minimize", lambda r: 1000 * (r.number + 1), lambda v: f"{v} B")]

    monkeypatch.setattr(objectives, "objectives_in_use", with_memory)
    res = export_trial(_fake_study(tmp_path, ROWS), tmp_path / "out", trial=2)
    assert "| peak_memory_bytes | 3000 B | objective of study 'fake' |" in res.readme_path.read_text()
    assert json.loads(res.config_path.read_text())["figures"]["peak_memory_bytes"] == 3000
    assert "peak_memory_bytes: 3000 B" in res.module_path.read_text()
