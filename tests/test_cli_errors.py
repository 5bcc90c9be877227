"""The catalogue of bad inputs: every subcommand and flag, YAML keys and values, damaged study and
export folders, and the Python API. Each must end in one clear line that names the field (or
file), the value and what is allowed, with exit code 2 and no traceback, before any work starts.

The CLI cases run `sqa_search.cli.main` in this process (a subprocess per case would cost ~2 s
of imports each); `test_errors_in_a_real_process` runs a few through the installed command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sqa_search.cli import main as cli_main
from sqa_search.layer.spec import AttentionSpec

from study_helpers import fake_study

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
FINGERPRINT = {"device_name": "cpu", "device": "cpu"}


def _cli(argv, capsys):
    """(exit code, stderr + stdout) of one CLI call in this process."""
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits on its own
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _assert_one_clear_line(code, text, pattern):
    assert code == 2, f"exit {code}, expected 2:\n{text}"
    assert "Traceback" not in text, text
    error_lines = [line for line in text.splitlines() if "error" in line]
    assert len(error_lines) == 1, f"expected one error line:\n{text}"
    assert "internal error" not in error_lines[0], error_lines[0]
    import re

    assert re.search(pattern, error_lines[0]), f"{pattern!r} not in {error_lines[0]!r}"


# ----- flags of every subcommand ----------------------------------------------------------------
# (argv after the command, a regex the error line must match: the field, the value, what is allowed)
FLAG_CASES = {
    "top: unknown command": ([], "bogus", r"invalid choice: 'bogus'.*run"),
    "run: missing space file": (["run"], "{tmp}/nope.yaml", r"nope\.yaml.*does not exist"),
    "run: space is a folder": (["run"], "{tmp}", r"is a folder|not a file|is a directory"),
    "run: --trials 0": (["run", "{space}", "--trials", "0"], None, r"--trials.*0.*>= ?1|trials=0"),
    "run: --trials abc": (["run", "{space}", "--trials", "abc"], None, r"--trials.*int.*'abc'"),
    "run: --workers 0": (["run", "{space}", "--workers", "0"], None, r"workers=0.*>= 1"),
    "run: --backend dask": (["run", "{space}", "--backend", "dask"], None, r"--backend.*'dask'.*optuna, ray|'optuna', 'ray'"),
    "run: --storage bogus://x": (["run", "{space}", "--storage", "bogus://x"], None, r"storage.*bogus://x.*(sqlite|postgresql)"),
    "run: --storage not a URL": (["run", "{space}", "--storage", "just-a-word"], None, r"storage.*just-a-word.*(sqlite|postgresql)"),
    "run: --address without ray": (["run", "{space}", "--address", "1.2.3.4:6379"], None, r"--address.*only for --backend ray"),
    "run: --workers with ray": (["run", "{space}", "--backend", "ray", "--workers", "2"], None, r"--workers=2.*--backend ray"),
    "run: --cpus-per-trial 0": (["run", "{space}", "--backend", "ray", "--cpus-per-trial", "0"], None, r"cpus.per.trial.*0"),
    "run: --max-concurrent 0": (["run", "{space}", "--backend", "ray", "--max-concurrent", "0"], None, r"max.concurrent.*0"),
    "run: --max-retries -1": (["run", "{space}", "--backend", "ray", "--max-retries", "-1"], None, r"max.retries.*-1"),
    "run: --name with a slash": (["run", "{space}", "--name", "a/b"], None, r"name='a/b'.*without slashes"),
    "show: missing folder": (["show"], "{tmp}/nope", r"no study at '.*nope': the folder does not exist"),
    "show: empty folder": (["show"], "{empty}", r"no study.*study\.json"),
    "recommend: unknown hardware": (["recommend", "--hardware", "tpu9", "--seq-len", "1k"], None, r"--hardware 'tpu9'.*h100"),
    "recommend: --seq-len 0": (["recommend", "--hardware", "h100", "--seq-len", "0"], None, r"seq.len.*0"),
    "recommend: --seq-len abc": (["recommend", "--hardware", "h100", "--seq-len", "abc"], None, r"seq.len.*'abc'"),
    "recommend: --mode infer": (["recommend", "--hardware", "h100", "--mode", "infer"], None, r"--mode.*'infer'.*train"),
    "recommend: --batch 0": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--batch", "0"], None, r"batch.*0"),
    "recommend: --tolerance -5%": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--tolerance=-5%"], None, r"tolerance.*-5"),
    "recommend: --tolerance abc": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--tolerance", "abc"], None, r"tolerance.*'abc'"),
    "recommend: --tolerance-vs x": (["recommend", "--hardware", "h100", "--tolerance-vs", "x"], None, r"--tolerance-vs.*'x'.*mha"),
    "recommend: --max-latency -1": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--max-latency", "-1"], None, r"latency.*-1"),
    "recommend: --max-kv-cache abc": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--max-kv-cache", "abc"], None, r"kv.cache.*'abc'"),
    "recommend: --study missing": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--study"], "{tmp}/nope", r"--study '.*nope' does not exist"),
    "recommend: --d-model 0": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--d-model", "0"], None, r"--d-model 0.*>= 1"),
    "recommend: heads do not divide": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--heads", "7"], None, r"7.*256|256.*7"),
    "recommend: --layers 0": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--layers", "0"], None, r"layers.*0"),
    "recommend: --dtype fp8": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--dtype", "fp8"], None, r"dtype.*'fp8'.*bfloat16"),
    "recommend: --what head": (["recommend", "--hardware", "h100", "--what", "head"], None, r"--what.*'head'.*layer"),
    "recommend: --device tpu": (["recommend", "--hardware", "local", "--seq-len", "1k", "--device", "tpu"], None, r"device.*'tpu'.*cpu"),
    "recommend: --alternatives -1": (["recommend", "--hardware", "h100", "--seq-len", "1k", "--alternatives", "-1"], None, r"alternatives.*-1"),
    "export: nothing chosen": (["export", "--out"], "{tmp}/out", r"exactly one of --study S --trial N"),
    "export: unknown spec": (["export", "--out", "{tmp}/out", "--spec"], "mla", r"'mla'.*(sqa|variant)"),
    "export: heads beyond H": (["export", "--out", "{tmp}/out", "--heads", "8", "--spec"], "9/4", r"n_q_heads.*9"),
    "export: bad pick rule": (["export", "--out", "{tmp}/out", "--study", "{study}", "--pick"], "fastest", r"--pick 'fastest'.*knee"),
    "export: --trial without --study": (["export", "--out", "{tmp}/out", "--trial"], "0", r"--trial needs --study"),
    "export: trial not in study": (["export", "--out", "{tmp}/out", "--study", "{study}", "--trial"], "999", r"999"),
    "export: --weights-from missing": (["export", "--out", "{tmp}/out", "--spec", "sqa", "--weights-from"], "{tmp}/w.pt", r"w\.pt"),
    "export: --window 0": (["export", "--out", "{tmp}/out", "--spec", "sqa", "--window"], "0", r"window.*0"),
    "export: --n-global -1": (["export", "--out", "{tmp}/out", "--spec", "sqa", "--n-global"], "-1", r"n_global.*-1"),
    "export: --module-name with a dot": (["export", "--out", "{tmp}/out", "--spec", "sqa", "--module-name"], "my.layer", r"module.name.*'my\.layer'"),
    "export: --out is a file": (["export", "--spec", "sqa", "--out"], "{file}", r"out.*(not a folder|exists)|Not a directory|File exists"),
    "bench: --seq-lens abc": (["bench", "--seq-lens"], "abc", r"seq.lens.*'abc'"),
    "bench: --seq-lens 0": (["bench", "--seq-lens"], "0", r"seq.len.*0"),
    "bench: --variants mla": (["bench", "--variants"], "mha,mla", r"'mla'.*(sqa|variant)"),
    "bench: --window 0": (["bench", "--window"], "0", r"window.*0"),
    "bench: --batch 0": (["bench", "--batch"], "0", r"batch.*0"),
    "bench: --dtype fp8": (["bench", "--dtype"], "fp8", r"dtype.*'fp8'.*bfloat16"),
    "bench: --device tpu": (["bench", "--device"], "tpu", r"device.*'tpu'.*cpu"),
    "bench: --hardware tpu9": (["bench", "--hardware"], "tpu9", r"hardware.*'tpu9'.*h100"),
    "bench: --threads 0": (["bench", "--threads"], "0", r"threads.*0"),
    "bench: --budget-s -1": (["bench", "--budget-s"], "-1", r"budget.*-1.*>= 0"),
    "bench: --passes 0": (["bench", "--passes"], "0", r"passes.*0"),
    "bench: --max-repeats 0": (["bench", "--max-repeats"], "0", r"max.repeats.*0"),
    "bench: --layers 0": (["bench", "--what", "model", "--layers"], "0", r"layers.*0"),
    "bench: --mode sample": (["bench", "--mode"], "sample", r"--mode.*'sample'.*prefill"),
    "bench: heads do not divide": (["bench", "--heads"], "7", r"7.*256|256.*7"),
}


@pytest.fixture
def places(tmp_path, monkeypatch):
    """The folders and files the cases name; the working folder is tmp_path, so nothing lands in the repo."""
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    space = tmp_path / "tiny.yaml"
    space.write_text(QUICKSTART.read_text())
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    study = fake_study(tmp_path, [(AttentionSpec.variant("mha", d_model=64, n_heads=8), 2.5, 0.01)], FINGERPRINT)
    return {"tmp": tmp_path, "empty": empty, "space": space, "file": file, "study": study}


def _fill(value, places):
    return value.format(**{k: str(v) for k, v in places.items()})


@pytest.mark.parametrize("case", list(FLAG_CASES), ids=list(FLAG_CASES))
def test_bad_flag(case, places, capsys):
    head, last, pattern = FLAG_CASES[case]
    argv = [_fill(a, places) for a in head] + ([_fill(last, places)] if last is not None else [])
    before = sorted(p.relative_to(places["tmp"]) for p in places["tmp"].rglob("*"))
    code, text = _cli(argv, capsys)
    _assert_one_clear_line(code, text, pattern)
    after = sorted(p.relative_to(places["tmp"]) for p in places["tmp"].rglob("*"))
    assert after == before, f"a refused command wrote files: {set(after) ^ set(before)}"


# ----- YAML keys and values, through `sqa-search run` ------------------------------------------
YAML_CASES = {
    "unknown top-level key": (("modle", None, {"d_model": 1}), r"unknown key.*'modle'.*top level"),
    "unknown model key": (("model", "layers", 3), r"unknown key.*'layers'.*model"),
    "n_heads not dividing d_model": (("model", "n_heads", 6), r"model\.n_heads=6.*divide.*d_model=128"),
    "d_model not an integer": (("model", "d_model", "big"), r"model\.d_model='big'"),
    "target.mode": (("target", "mode", "inference"), r"target\.mode='inference'.*train, prefill, decode"),
    "target.dtype": (("target", "dtype", "fp8"), r"target\.dtype='fp8'"),
    "target.hardware": (("target", "hardware", "tpu-v9"), r"target\.hardware='tpu-v9'.*h100"),
    "target.device": (("target", "device", "tpu"), r"target\.device='tpu'"),
    "target.seq_len": (("target", "seq_len", -5), r"target\.seq_len=-5"),
    "target.what": (("target", "what", "head"), r"target\.what='head'.*layer"),
    "search.n_q_heads out of range": (("search", "n_q_heads", [2, 9]), r"search\.n_q_heads=9.*n_heads=8"),
    "search.window": (("search", "window", [0]), r"search\.window=0"),
    "search.variants": (("search", "variants", ["mla"]), r"'mla'.*not known"),
    "objectives.quality": (("objectives", "quality", "bleu"), r"objectives\.quality='bleu'.*val_loss"),
    "study.sampler": (("study", "sampler", "cmaes"), r"study\.sampler='cmaes'.*tpe"),
    "study.trials": (("study", "trials", 0), r"study\.trials=0"),
    "training unknown key": (("training", "epochs", 3), r"unknown key.*'epochs'.*training"),
    "training.lr": (("training", "lr", -1.0), r"training.*lr=-1"),
}


def _edited_space(path: Path, section, key, value):
    data = yaml.safe_load(QUICKSTART.read_text())
    if key is None:
        data[section] = value
    else:
        data.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("case", list(YAML_CASES), ids=list(YAML_CASES))
def test_bad_yaml(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (section, key, value), pattern = YAML_CASES[case]
    space = _edited_space(tmp_path / "bad.yaml", section, key, value)
    code, text = _cli(["run", space], capsys)
    _assert_one_clear_line(code, text, pattern)
    assert not (tmp_path / "studies").exists(), "a refused space created a study folder"


def test_yaml_that_does_not_parse(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: {d_model: 128\nsearch: [")
    _assert_one_clear_line(*_cli(["run", bad], capsys), r"broken\.yaml.*(YAML|yaml)")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    _assert_one_clear_line(*_cli(["run", listy], capsys), r"list\.yaml.*mapping")


# ----- damaged study folders: every command refuses with the reason and changes nothing ---------
def _damage(folder: Path, how: str):
    if how == "study.json missing":
        (folder / "study.json").unlink()
    elif how == "study.json corrupt":
        (folder / "study.json").write_text("{not json")
    elif how == "study.json not an object":
        (folder / "study.json").write_text("[1, 2]")
    elif how == "study.json without storage":
        (folder / "study.json").write_text(json.dumps({"name": "fake"}))
    elif how == "study.db missing":
        (folder / "study.db").unlink()
    elif how == "study.db corrupt":
        (folder / "study.db").write_bytes(b"this is not a database" * 100)
    elif how == "study.db truncated":
        data = (folder / "study.db").read_bytes()
        (folder / "study.db").write_bytes(data[: len(data) // 3])
    elif how == "space.yaml missing":
        (folder / "space.yaml").unlink()
    elif how == "space.yaml corrupt":
        (folder / "space.yaml").write_text("model: [unclosed")
    elif how == "space.yaml invalid":
        data = yaml.safe_load((folder / "space.yaml").read_text())
        data["model"]["n_heads"] = 7
        (folder / "space.yaml").write_text(yaml.safe_dump(data))
    else:
        raise AssertionError(how)


DAMAGES = ["study.json missing", "study.json corrupt", "study.json not an object", "study.json without storage",
           "study.db missing", "study.db corrupt", "study.db truncated", "space.yaml missing", "space.yaml corrupt",
           "space.yaml invalid"]
# what the error must name for each damage
DAMAGE_PATTERNS = {
    "study.json missing": r"study\.json", "study.json corrupt": r"study\.json", "study.json not an object": r"study\.json",
    "study.json without storage": r"study\.json.*storage", "study.db missing": r"study\.db",
    "study.db corrupt": r"study\.db", "study.db truncated": r"study\.db", "space.yaml missing": r"space\.yaml",
    "space.yaml corrupt": r"space\.yaml", "space.yaml invalid": r"n_heads=7",
}


def _folder_state(folder: Path) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["show", "recommend", "export"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_study(command, damage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = fake_study(tmp_path, [(AttentionSpec.variant("mha", d_model=64, n_heads=8), 2.5, 0.01),
                                   (AttentionSpec.variant("sqa", d_model=64, n_heads=8), 2.6, 0.005)], FINGERPRINT)
    _damage(folder, damage)
    before = _folder_state(folder)
    argv = {"show": ["show", folder],
            "recommend": ["recommend", "--hardware", "h100", "--seq-len", "1k", "--study", folder],
            "export": ["export", "--study", folder, "--pick", "knee", "--out", tmp_path / "out"]}[command]
    code, text = _cli(argv, capsys)
    _assert_one_clear_line(code, text, DAMAGE_PATTERNS[damage])
    assert _folder_state(folder) == before, "a damaged study was changed"
    assert not (tmp_path / "out").exists()


# ----- damaged export folders -------------------------------------------------------------------
def _exported(tmp_path) -> Path:
    from sqa_search.decide.export import export_layer

    out = tmp_path / "exported"
    export_layer(AttentionSpec.variant("sqa", d_model=64, n_heads=8), out, with_weights=True, seed=0)
    return out


EXPORT_DAMAGES = {
    "folder missing": (lambda out: __import__("shutil").rmtree(out), r"exported.*(no such|does not exist|missing)"),
    "config.json missing": (lambda out: (out / "config.json").unlink(), r"config\.json"),
    "config.json corrupt": (lambda out: (out / "config.json").write_text("{oops"), r"config\.json"),
    "config.json another format": (lambda out: (out / "config.json").write_text(json.dumps({"format": "x"})),
                                   r"config\.json.*format"),
    "config.json bad spec": (lambda out: (out / "config.json").write_text(
        (out / "config.json").read_text().replace('"n_q_heads": 4', '"n_q_heads": 99')), r"n_q_heads.*99"),
    "weights.pt missing": (lambda out: (out / "weights.pt").unlink(), r"weights\.pt"),
    "weights.pt corrupt": (lambda out: (out / "weights.pt").write_bytes(b"garbage" * 50), r"weights\.pt"),
    "weights.pt of another shape": (lambda out: torch.save({"q_proj.weight": torch.zeros(3, 3)}, out / "weights.pt"),
                                    r"weights\.pt.*(shape|key|match)"),
}


@pytest.mark.parametrize("case", list(EXPORT_DAMAGES), ids=list(EXPORT_DAMAGES))
def test_damaged_export(case, tmp_path):
    import re

    from sqa_search.errors import UserError
    from sqa_search.decide.export import load_layer

    out = _exported(tmp_path)
    damage, pattern = EXPORT_DAMAGES[case]
    damage(out)
    with pytest.raises(UserError) as info:
        load_layer(out)
    assert re.search(pattern, str(info.value)), str(info.value)


# ----- the Python API ---------------------------------------------------------------------------
def _api_cases():
    from sqa_search import AttentionSpec as Spec, SparseQueryAttention
    from sqa_search.layer.model import build_model
    from sqa_search.quality.tokenizer import get_tokenizer
    from sqa_search.quality.tokens import load_tokens
    from sqa_search.search.space import load_space
    from sqa_search.quality.train import TrainConfig

    return {
        "AttentionSpec d_model 0": (lambda: Spec(d_model=0, n_heads=8, n_q_heads=8, n_kv_heads=8), r"d_model=0"),
        "AttentionSpec n_q_heads > n_heads": (lambda: Spec(d_model=64, n_heads=8, n_q_heads=9, n_kv_heads=8), r"n_q_heads=9"),
        "AttentionSpec window 0": (lambda: Spec(d_model=64, n_heads=8, n_q_heads=8, n_kv_heads=8, window=0), r"window=0"),
        "AttentionSpec.variant unknown": (lambda: Spec.variant("mla", d_model=64, n_heads=8), r"'mla'"),
        "layer backend unknown": (lambda: SparseQueryAttention(Spec.variant("sqa", d_model=64, n_heads=8), backend="cuda-magic"),
                                  r"backend.*'cuda-magic'.*auto"),
        "ProxyLM preset unknown": (lambda: build_model(Spec.variant("sqa", d_model=64, n_heads=8), preset="gpt-9"),
                                   r"preset='gpt-9'.*choose"),
        "load_space missing": (lambda: load_space("/nope/space.yaml"), r"/nope/space\.yaml.*does not exist"),
        "tokenizer unknown": (lambda: get_tokenizer("gpt-5"), r"'gpt-5'.*byte"),
        "load_tokens missing file": (lambda: load_tokens("/nope/corpus.txt"), r"/nope/corpus\.txt"),
        "TrainConfig lr": (lambda: TrainConfig(lr=-1.0).validate() if hasattr(TrainConfig, "validate") else TrainConfig(lr=-1.0),
                           r"lr=-1"),
    }


@pytest.mark.parametrize("case", ["AttentionSpec d_model 0", "AttentionSpec n_q_heads > n_heads", "AttentionSpec window 0",
                                  "AttentionSpec.variant unknown", "layer backend unknown", "ProxyLM preset unknown",
                                  "load_space missing", "tokenizer unknown", "load_tokens missing file", "TrainConfig lr"])
def test_bad_python_api(case):
    import re

    from sqa_search.errors import UserError
    from sqa_search.layer.spec import SpecError

    call, pattern = _api_cases()[case]
    with pytest.raises((UserError, SpecError)) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


# ----- a few through the real command: one line, exit 2, no traceback; --debug shows it ----------
@pytest.mark.slow
def test_errors_in_a_real_process(tmp_path):
    exe = [sys.executable, "-m", "sqa_search.cli"]
    for argv, pattern in [(["show", str(tmp_path / "nope")], "folder does not exist"),
                          (["bench", "--seq-lens", "abc"], "'abc'"),
                          (["export", "--help"], None)]:
        proc = subprocess.run(exe + argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        if pattern is None:
            assert proc.returncode == 0 and "--pick" in proc.stdout, proc.stderr
            continue
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert pattern in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    debug = subprocess.run(exe + ["show", str(tmp_path / "nope"), "--debug"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
