"""Damaged study folders (issue 11, parts 2 and 3): `run`, `show`, `recommend` and `export` refuse
with a StudyError that says what is wrong, before any work, and leave every file as it was
(the folder is hashed before and after). Studies are made in milliseconds: the real folder
`run` makes, with trials written straight into Optuna."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sqlite3
from pathlib import Path

import optuna
import pytest

from sqa_search.decide.export import ExportError, export_trial
from sqa_search.decide.recommend import RecommendError, recommend
from sqa_search.cli.show import run as show
from sqa_search.search.space import load_space
from sqa_search.layer.spec import AttentionSpec
from sqa_search.search.engine import StudyError, open_study, run_study
from sqa_search.search.studies import prepare_study
from study_helpers import space_file

SPACE = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "target": {"seq_len": 64, "mode": "prefill"},
    "search": {"n_q_heads": [1, 2, 4], "n_kv_heads": [1, 2, 4], "variants": ["mha", "sqa"]},
    "study": {"sampler": "random", "seed": 0, "trials": 2},
    "training": {"task": "lm"},
}


@pytest.fixture
def made(tmp_path):
    """(space file, studies dir, study folder) of a study with two complete trials."""
    path = space_file(tmp_path, SPACE, "dmg")
    studies = tmp_path / "studies"
    handle = prepare_study(load_space(path), path, studies, None, 1)
    for spec, loss, latency in ((AttentionSpec.variant("mha", d_model=32, n_heads=4), 3.0, 2e-4),
                                (AttentionSpec.variant("sqa", d_model=32, n_heads=4), 3.1, 1e-4)):
        attrs = {"spec": spec.to_dict(), "label": spec.label, "variant": spec.variant_name, "family": spec.family,
                 "quality": loss, "latency_s": latency, "latency_source": "measured on test",
                 "spec_key": json.dumps(spec.to_dict(), sort_keys=True), "kv_cache_bytes": 1}
        handle.study.add_trial(optuna.trial.create_trial(values=[loss, latency], user_attrs=attrs))
    return path, studies, handle.directory


def _digest(folder: Path) -> dict:
    """Every file under `folder` (name -> sha256): what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate_db(folder):
    db = folder / "study.db"
    db.write_bytes(db.read_bytes()[: 3 * 4096 + 100])  # the header survives, most pages do not


def _rename_study(folder):
    con = sqlite3.connect(folder / "study.db")
    con.execute("UPDATE studies SET study_name = 'someone-else'")
    con.commit()
    con.close()


def _empty_sqlite(folder):
    (folder / "study.db").unlink()
    sqlite3.connect(folder / "study.db").execute("CREATE TABLE notes (x)").connection.commit()


# damage -> what the error must say
DAMAGE = {
    "study.json missing": (lambda f: (f / "study.json").unlink(), "study.json is missing|but no study.json"),
    "study.json not JSON": (lambda f: (f / "study.json").write_text('{"name": "dmg", "stor'), "not JSON"),
    "study.json a list": (lambda f: (f / "study.json").write_text("[1, 2]"), "holds a list"),
    "study.json without storage": (lambda f: (f / "study.json").write_text(
        json.dumps({"name": "dmg", "space_fingerprint": "x"})), "storage=None"),
    "study.json bogus storage": (lambda f: (f / "study.json").write_text(json.dumps(
        {**json.loads((f / "study.json").read_text()), "storage": "bogus://x"})), "scheme 'bogus'"),
    "space.yaml missing": (lambda f: (f / "space.yaml").unlink(), "space.yaml"),
    "space.yaml not YAML": (lambda f: (f / "space.yaml").write_text("model: [unclosed\n"), "not valid YAML"),
    "study.db missing": (lambda f: (f / "study.db").unlink(), "is missing"),
    "study.db not SQLite": (lambda f: (f / "study.db").write_text("hello, not a database"),
                            "not an SQLite database"),
    "study.db truncated": (_truncate_db, "damaged"),
    "study.db without Optuna tables": (_empty_sqlite, "without Optuna's tables"),
    "study.db without the study": (_rename_study, "holds no study named 'dmg'"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_study_is_refused_and_left_as_it_was(made, damage, tmp_path):
    path, studies, folder = made
    break_it, says = DAMAGE[damage]
    break_it(folder)
    before = _digest(folder)
    with pytest.raises(StudyError, match=says.replace("(", r"\(")):
        open_study(folder)
    with pytest.raises(StudyError, match=says.replace("(", r"\(")):
        run_study(path, studies_dir=studies, progress=False)
    with pytest.raises(StudyError):
        show(argparse.Namespace(study=str(folder), out=None, all=False))
    with pytest.raises(ExportError):
        export_trial(folder, tmp_path / "exported", pick="knee")
    with pytest.raises(RecommendError):
        recommend("local", seq_len=64, mode="prefill", tolerance="5%", study=folder)
    assert _digest(folder) == before
    assert not (tmp_path / "exported").exists()


def test_intact_study_opens_read_only(made):
    path, studies, folder = made
    before = _digest(folder)
    handle = open_study(folder)
    assert len(handle.study.trials) == 2
    with pytest.raises(optuna.exceptions.StorageInternalError) as info:  # SQLite itself refuses a write
        handle.study.set_user_attr("x", 1)
    assert "readonly" in str(info.value.__cause__)
    assert _digest(folder) == before


@pytest.mark.parametrize("folder_state, says", [("missing", "does not exist"), ("file", "is a file"),
                                                ("empty", r"study.json is missing \(the folder is empty")])
def test_missing_or_empty_folder_is_no_study(tmp_path, folder_state, says):
    folder = tmp_path / "studies" / "x"
    if folder_state == "empty":
        folder.mkdir(parents=True)
    elif folder_state == "file":
        folder.parent.mkdir()
        folder.write_text("")
    with pytest.raises(StudyError, match=says):
        open_study(folder)


@pytest.mark.parametrize("url, says", [
    ("bogus://x", "scheme 'bogus' is not allowed"),
    ("not a url", "not a storage URL"),
    ("sqlite://", "names no database file"),
    ("journal:", "names no file"),
    ("postgresql+nosuchdriver://u@localhost/db", "unknown to SQLAlchemy"),
    ("postgresql://u:secret@127.0.0.1:1/db", "cannot open"),  # nothing listens on port 1
    pytest.param("postgresql+psycopg2://u:secret@localhost/db", "pip install psycopg2-binary",
                 marks=pytest.mark.skipif(importlib.util.find_spec("psycopg2") is not None,
                                          reason="psycopg2 is installed: no missing driver to report")),
])
def test_bad_storage_url_is_refused_before_the_folder_is_made(tmp_path, url, says):
    path = space_file(tmp_path, SPACE, "fresh")
    with pytest.raises(StudyError, match=says) as info:
        run_study(path, storage=url, studies_dir=tmp_path / "studies", progress=False)
    assert "secret" not in str(info.value)  # passwords never reach a message
    assert not (tmp_path / "studies").exists()


def test_folder_without_study_json_is_not_taken_over(tmp_path):
    path = space_file(tmp_path, SPACE, "dmg")
    folder = tmp_path / "studies" / "dmg"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match=r"holds \['notes.txt'\] but no study.json"):
        run_study(path, studies_dir=tmp_path / "studies", progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_damaged_or_missing_journal_is_refused_and_left_as_it_was(tmp_path):
    path = space_file(tmp_path, SPACE, "jrn")
    studies = tmp_path / "studies"
    handle = prepare_study(load_space(path), path, studies, None, 2)  # --workers 2: a journal file
    handle.study.add_trial(optuna.trial.create_trial(values=[3.0, 1e-4]))
    folder = handle.directory
    journal = folder / "journal.log"
    journal.write_bytes(b"{not json\n" + journal.read_bytes())
    for says in ("journal.log' is damaged", "journal.log' is missing"):
        before = _digest(folder)
        with pytest.raises(StudyError, match=says):
            open_study(folder)
        with pytest.raises(StudyError, match=says):
            run_study(path, workers=2, studies_dir=studies, progress=False)
        assert _digest(folder) == before
        journal.unlink(missing_ok=True)  # the second case: no journal at all


def test_folder_with_only_an_empty_storage_becomes_the_study(tmp_path):
    # what a run killed while it made the study leaves (or optuna-dashboard opened too early)
    path = space_file(tmp_path, SPACE, "early")
    folder = tmp_path / "studies" / "early"
    folder.mkdir(parents=True)
    optuna.storages.RDBStorage(f"sqlite:///{folder / 'study.db'}")  # Optuna's tables, no trial
    handle = prepare_study(load_space(path), path, tmp_path / "studies", None, 1)
    assert sorted(p.name for p in folder.iterdir()) == ["space.yaml", "study.db", "study.json"]
    assert open_study(folder).study.study_name == handle.study.study_name == "early"
