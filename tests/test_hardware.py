"""The machine's fingerprint: one type, the same id as every earlier version stored."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from sqa_search.speed.hardware import HARDWARE_FIELDS, Fingerprint, fingerprint, load_profile


def test_fingerprint_round_trips_through_its_dict():
    fp = fingerprint("cpu", "bfloat16", 1)
    assert isinstance(fp, Fingerprint)
    assert (fp.device_type, fp.dtype, fp.threads, fp.torch_version) == ("cpu", "bfloat16", 1, torch.__version__)
    data = json.loads(json.dumps(fp.to_dict()))  # JSON-safe, as studies and caches store it
    back = Fingerprint.from_dict(data)
    assert back == fp and back.id == fp.id and back.label == fp.label
    assert Fingerprint.from_dict({**data, "from_a_newer_version": 1}) == fp  # unknown keys ignored
    assert Fingerprint.from_dict(fp) is fp


def test_id_is_the_hash_earlier_versions_stored():
    fp = fingerprint("cpu")
    # the rule timing.fingerprint_id(dict) used: sha256 of the hardware fields, sorted, 12 hex
    old = hashlib.sha256(json.dumps({k: fp.to_dict().get(k) for k in HARDWARE_FIELDS},
                                    sort_keys=True).encode()).hexdigest()[:12]
    assert fp.id == old
    assert fingerprint("cpu", "float32", 2).id == fp.id  # threads and dtype are not the machine
    assert dataclasses.replace(fp, cpu_count=(fp.cpu_count or 1) + 1).id != fp.id


def test_label_says_device_and_threads():
    fp = Fingerprint(device_type="cpu", device_name="AMD EPYC", cpu_model="AMD EPYC", threads=2)
    assert fp.label == "AMD EPYC, 2 threads"
    assert Fingerprint(device_type="cuda", device_name="NVIDIA H200", threads=8).label == "NVIDIA H200"


def test_a_calibrated_profile_reads_its_stored_fingerprint_detail():
    shipped = load_profile("cpu-generic", calibrated=False)
    assert shipped.calibrated_on is None
    # the detail an older calibration wrote (extra keys such as host and clock are ignored)
    old = dataclasses.replace(shipped, calibration={"fingerprint": "x", "fingerprint_detail": {
        "device": "cpu", "torch": "2.13.0", "threads": 1, "host": "box", "cpu_model": "AMD EPYC", "clock": "wall"}})
    assert old.calibrated_on == Fingerprint(cpu_model="AMD EPYC", threads=1)
