"""Helpers the study, Ray, export and recommend tests share: small space files and synthetic studies."""

from __future__ import annotations

import json

import optuna
import yaml

from sqa_search.search.space import space_from_dict


def merged(base: dict, **changes) -> dict:
    """A copy of a space dict with some sections updated key by key."""
    data = {k: dict(v) for k, v in base.items()}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def space_file(tmp_path, base: dict, name="tiny", **changes):
    """`base` with `changes`, named `name`, written as tmp_path/<name>.yaml."""
    data = merged(base, **changes)
    data["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fake_study(tmp_path, rows, fingerprint, *, name="fake", seq_len=128, d_model=64, n_heads=8,
               fingerprint_id="f00d", train=None, failed_reason=None):
    """rows: (spec, quality, latency_s), or with a 4th item, attributes that replace or add to the
    ones written. A study folder `open_study` reads, with trials written straight into Optuna
    (milliseconds); `failed_reason` adds one FAIL trial with that reason."""
    data = {"name": name, "model": {"d_model": d_model, "n_heads": n_heads, "n_layers": 2},
            "target": {"seq_len": seq_len, "mode": "prefill"},
            "search": {"n_q_heads": [1, 2, 4, 8], "n_kv_heads": [1, 2, 4, 8]},
            "study": {"trials": len(rows)}, "training": {"task": "lm"}}
    space = space_from_dict(data, source="fake")
    folder = tmp_path / "studies" / name
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    storage = f"sqlite:///{(folder / 'study.db').resolve()}"
    (folder / "study.json").write_text(json.dumps({"name": name, "storage": storage, "space_fingerprint": "x"}))
    study = optuna.create_study(study_name=name, storage=storage, directions=["minimize", "minimize"])
    for spec, quality, latency, *extra in rows:
        attrs = {"spec": spec.to_dict(), "label": spec.label, "variant": spec.variant_name, "family": spec.family,
                 "latency_s": latency, "latency_source": f"measured on {fingerprint['device_name']}",
                 "quality": quality, "kv_cache_bytes": space.kv_cache_bytes(spec), "fingerprint": fingerprint,
                 "spec_key": json.dumps(spec.to_dict(), sort_keys=True),
                 "timing": [{"seq_len": seq_len, "median_s": latency, "backend": "sdpa/flash", "flags": [],
                             "fingerprint_id": fingerprint_id}],
                 "train": train or {"steps": 10, "tokens": 1000}, **(extra[0] if extra else {})}
        study.add_trial(optuna.trial.create_trial(values=[quality, latency], user_attrs=attrs))
    if failed_reason:
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                  user_attrs={"fail_reason": failed_reason}))
    return folder
