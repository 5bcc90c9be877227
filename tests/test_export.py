"""Export: the standalone module against the library layer, in a fresh interpreter that cannot
import sqa_search (outputs and gradients within 1e-6 in fp32), torch.export on it, the JSON config
back into the library, weights into either, the README, the pick rules and bad input."""

import argparse
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sqa_search.attention import SparseQueryAttention
from sqa_search.export import (
    ExportError,
    add_arguments,
    export_layer,
    export_trial,
    load_layer,
    parse_pick,
    parse_spec,
    run,
    select_trial,
)
from sqa_search.spec import VARIANTS, AttentionSpec
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
        ("flex-window-gqa", AttentionSpec(D, H, 4, 2, window=8), [37], "flex"),
        ("flex-global-bidir", AttentionSpec(D, H, 6, 4, window=8, n_global=2, causal=False), [37], "flex"),
        ("sdpa-forced-window", AttentionSpec(D, H, 2, 4, window=8), [37], "sdpa"),
    ]
    return out


DECODE = [("sqa", AttentionSpec.variant("sqa", D, H)), ("gqa", AttentionSpec.variant("gqa", D, H)),
          ("uneven", AttentionSpec(D, H, 6, 4)), ("rsqa", AttentionSpec.variant("rsqa", D, H)),
          ("swsqa", AttentionSpec.variant("swsqa", D, H, window=5)),
          ("flexsqa", AttentionSpec.variant("flexsqa", D, H, window=4, n_global=2))]


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
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
        spec = importlib.util.spec_from_file_location("exported_" + name.replace("-", "_"), case["module"])
        m = importlib.util.module_from_spec(spec)
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
        gs = [None if backend == "flex" else torch.randn(2, n, D) for n in lens]
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
    # the graph has no data-dependent branches left: plain tensor ops only
    assert ep.graph_signature is not None


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
    from sqa_search.model import ModelConfig, ProxyLM

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
    with pytest.raises(ExportError, match="not an sqa-search export"):
        load_layer(tmp_path)
    res = export_layer(AttentionSpec.variant("sqa", D, H), tmp_path / "e", with_weights=True)
    res.weights_path.unlink()
    with pytest.raises(ExportError, match="missing"):
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
    from sqa_search.study import open_study

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
    from sqa_search.study import open_study

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
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


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
        out = capsys.readouterr().out
        assert out.startswith("error:") and match in out and out.count("\n") == 1, (argv, out)
