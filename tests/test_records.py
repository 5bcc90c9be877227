"""Tests for sqa_search.search.records: one schema written by the record_* functions and read back
by TrialRecord, on a real SQLite study and on a study folder made before the redesign."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from sqa_search.layer.spec import AttentionSpec
from sqa_search.search import records
from sqa_search.search.space import candidate_key, space_from_dict
from sqa_search.search.studies import open_study
from sqa_search.speed.hardware import Fingerprint
from sqa_search.speed.workload import Latency

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"

SPACE = {"name": "rec", "model": {"d_model": 64, "n_heads": 8, "n_layers": 2},
         "target": {"seq_len": [128, 256], "mode": "prefill", "device": "cpu"},
         "search": {"n_q_heads": [2, 8], "n_kv_heads": [1, 8]},
         "objectives": {"kv_cache": True}, "training": {"task": "lm"}}


@pytest.fixture
def study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    return optuna.create_study(study_name="rec", storage=storage, directions=["minimize"] * 3)


def _ask(study, space):
    trial = study.ask()
    return trial, space.suggest(trial)


def test_a_trial_written_through_records_reads_back_whole(study):
    space = space_from_dict(SPACE)
    trial, spec = _ask(study, space)
    records.store_owner(study._storage, trial._trial_id)
    records.record_spec(trial, spec, space)
    fp = Fingerprint.from_dict({"device_name": "Test CPU", "device_type": "cpu", "dtype": "float32"})
    rows = [{"seq_len": 128, "median_s": 0.001, "iqr_s": 0.0001, "raw_median_s": 0.0012, "machine_speed": 1.2,
             "backend": "sdpa/math", "flags": [], "fingerprint_id": "abc", "peak_mem_bytes": 1000},
            Latency(seconds=0.003, kind="measured-corrected", where="Test CPU", seq_len=256, spread_s=0.0002,
                    raw_seconds=0.0035, backend="sdpa/math", peak_memory_bytes=2000)]
    records.record_latency(trial, rows, 0.004, "measured on Test CPU", fp)
    records.record_training(trial, {"val_loss": 3.5, "wall_s": 2.0, "tokens_per_s": 100.0}, quality=3.5)
    values = [o.value(records.from_trial(trial)) for o in space.objectives_in_use()]
    study.tell(trial, values)

    record, = records.read_records(study)
    assert record.complete and record.evaluated and record.values == tuple(values)
    assert values == [3.5, 0.004, float(space.kv_cache_bytes(spec))]
    assert record.spec == spec and record.label == spec.label and record.variant == spec.variant_name
    assert record.spec_key == candidate_key(spec) and record.n_params == spec.n_params()
    assert record.quality == 3.5 and record.latency_s == 0.004 and record.latency_source == "measured on Test CPU"
    assert record.train_value("val_loss") == 3.5 and record.train_value("tokens_per_s") == 100.0
    assert [lat.seq_len for lat in record.latencies] == [128, 256]
    assert [lat.kind for lat in record.latencies] == ["measured-corrected", "measured-corrected"]
    assert record.latencies[1].seconds == 0.003 and record.latencies[1].peak_memory_bytes == 2000
    assert record.latency_measured and record.backend == "sdpa/math" and record.fingerprint_id == "abc"
    assert record.pid is not None and record.host
    assert record.peak_memory_bytes == 2000  # the largest over the sequence lengths
    assert record.fingerprint == fp
    # the stored keys are the schema every version wrote
    stored = study.trials[0].user_attrs
    for key in (records.SPEC, records.SPEC_KEY, records.LABEL, records.VARIANT, records.FAMILY,
                records.KV_CACHE_BYTES, records.N_PARAMS, records.QUALITY, records.LATENCY_S,
                records.LATENCY_SOURCE, records.TIMING, records.TRAIN, records.PID, records.HOST):
        assert key in stored, key
    assert stored["timing"][0]["machine_speed"] == 1.2  # a stored row is kept as it was
    assert stored["timing"][1]["median_s"] == 0.003 and stored["timing"][1]["raw_median_s"] == 0.0035


def test_duplicates_failures_prunes_and_reruns(study):
    space = space_from_dict(SPACE)
    first, spec = _ask(study, space)
    records.record_spec(first, spec, space)
    records.record_latency(first, [{"seq_len": 128, "predicted_s": 0.5, "bound": "compute"},
                                   {"seq_len": 256, "predicted_s": 1.5, "bound": "memory"}], 2.0,
                           "predicted for h100 (uncalibrated)")
    records.record_training(first, {"val_loss": 4.0})
    records.record_replicates(first, [4.0], [0], 4.0, None)  # one replicate: no standard error
    study.tell(first, [4.0, 2.0, 1.0])
    earlier = records.read_records(study)[0]
    assert [lat.kind for lat in earlier.latencies] == ["predicted", "predicted"]
    assert not earlier.latency_measured and earlier.latencies[1].flags == ("memory-bound",)

    repeat = study.ask()
    records.record_duplicate(repeat, earlier)
    study.tell(repeat, list(earlier.values))
    failed = study.ask()
    records.record_failure(failed, "timing oom: out of memory")
    study.tell(failed, state=TrialState.FAIL)
    pruned = study.ask()
    records.record_prune(pruned, "invalid combination: x")
    study.tell(pruned, state=TrialState.PRUNED)

    _, dup, fail, prune = records.read_records(study)
    assert dup.duplicate_of == 0 and not dup.evaluated and dup.quality == 4.0 and dup.latency_s == 2.0
    assert dup.train == {"val_loss": 4.0} and len(dup.latencies) == 2
    assert set(dup.stored) >= set(records.REUSED)
    assert dup.quality_values == [4.0] and dup.replicate_seeds == [0] and dup.quality_se is None
    assert fail.state == "FAIL" and fail.reason == "timing oom: out of memory"
    assert prune.state == "PRUNED" and prune.reason == "invalid combination: x"
    assert records.rerun_attrs(fail) == {records.RETRY_OF: fail.number}
    assert records.anchor_attrs("MHA 8q/8kv") == {records.ANCHOR: "MHA 8q/8kv"}


def test_the_legacy_study_reads_through_records(tmp_path):
    folder = tmp_path / "legacy_v1"
    shutil.copytree(LEGACY, folder, ignore=shutil.ignore_patterns("export"))  # never open the fixture itself
    handle = open_study(folder)
    rows = pd.read_csv(LEGACY / "results.csv")
    got = records.read_records(handle.study)
    assert [r.number for r in got] == rows.trial.tolist()
    assert [r.state for r in got] == rows.state.tolist()
    in_use = handle.space.objectives_in_use()
    for record, (_, row) in zip(got, rows.iterrows()):
        if not record.complete:
            continue
        assert record.label == row.label and record.quality == pytest.approx(row.quality)
        assert record.quality_se is None and record.quality_values == [record.quality]  # one seed, no SE
        assert record.latency_s == pytest.approx(row.latency_s)
        assert record.spec is not None and (record.spec.n_q_heads, record.spec.n_kv_heads) == (row.n_q_heads,
                                                                                                row.n_kv_heads)
        assert record.fingerprint_id == row.fingerprint_id and record.backend == row.backend
        assert record.latencies and all(lat.measured for lat in record.latencies)
        # the values the study optimised are the declared objectives read from the record
        assert [o.value(record) for o in in_use] == pytest.approx(list(record.values))
        assert all(math.isfinite(v) for v in record.values)


def test_a_spec_of_another_space_still_reads():
    """A frozen trial written by hand (as the Ray driver writes one) is read like any other."""
    spec = AttentionSpec(d_model=64, n_heads=8, n_q_heads=4, n_kv_heads=2)
    trial = optuna.trial.create_trial(values=[1.0], params={}, distributions={},
                                      user_attrs={records.SPEC: spec.to_dict(), records.RAY: {"trial_id": "t1"}})
    record = records.from_trial(trial)
    assert record.spec == spec and record.ray == {"trial_id": "t1"} and record.latencies == []
