"""The checkpoint schema: tensors and plain data only (a planted pickle never runs), a checksum that refuses a
damaged file, the previous format still read, and `load_model` for every command that needs a trained model."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cxr_fast.data.datasets import nih
from cxr_fast.cli import cli
from cxr_fast.errors import CxrFastError
from cxr_fast.training.checkpoint import (CHECKPOINT_FORMAT_VERSION, load_checkpoint, load_model, restore_rng_states,
                                          rng_states, save_checkpoint)


class RunsACommand:
    """What a malicious checkpoint carries: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(tiny_run, tmp_path, name="checkpoints/last.pt"):
    payload = load_checkpoint(tiny_run / "checkpoints/best.pt")
    marker = tmp_path / "it-ran"
    payload["history"] = RunsACommand(marker)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(payload, run / name)  # as an attacker would: plain torch.save, no cxr-fast schema checks
    return run, marker


def test_a_planted_pickle_is_refused_by_every_reader_and_never_runs(tiny_run, synth_shards, tmp_path):
    run, marker = _plant(tiny_run, tmp_path)
    checkpoint = run / "checkpoints/last.pt"
    with pytest.raises(CxrFastError, match="holds objects other than tensors and plain data .*posix.system"):
        load_model(checkpoint)
    analyze = CliRunner().invoke(cli, ["analyze", "--checkpoint", str(checkpoint), "--shards", str(synth_shards),
                                       "--out", str(tmp_path / "analysis")])
    resume = subprocess.run([sys.executable, "-m", "cxr_fast", "train", "--shards", str(synth_shards), "--out",
                             str(run), "--resume"], capture_output=True, text=True, timeout=300)
    for code, output in ((analyze.exit_code, analyze.output), (resume.returncode, resume.stderr)):
        assert code == 2 and "Error:" in output and "holds objects other than" in output
        assert "Traceback" not in output
    assert not marker.exists()


def test_a_real_checkpoint_is_plain_data(tiny_run):
    payload = torch.load(tiny_run / "checkpoints/best.pt", weights_only=True)  # no allow-list needed
    assert payload["format_version"] == CHECKPOINT_FORMAT_VERSION and len(payload["checksum"]) == 64
    model, info = load_model(tiny_run / "checkpoints/best.pt")
    assert not model.training and info.classes == list(nih.CLASSES) and info.thresholds.shape == (14,)
    assert info.config.model.name == "convnext_atto" and info.weights == "model"


def test_zeroed_bytes_are_caught_by_the_checksum(tiny_run, tmp_path):
    damaged = tmp_path / "damaged.pt"
    data = bytearray((tiny_run / "checkpoints/last.pt").read_bytes())
    # Inside the largest tensor's data (the zip stores it uncompressed), away from the archive's structure.
    start = len(data) // 2
    data[start:start + 64] = bytes(64)
    damaged.write_bytes(bytes(data))
    with pytest.raises(CxrFastError, match="is damaged: its content does not match its checksum"):
        load_checkpoint(damaged)


def test_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CxrFastError, match="cannot read checkpoint .*damaged or not a checkpoint"):
        load_checkpoint(path)


def test_format_1_checkpoints_still_load_and_restore(tiny_run, tmp_path):
    """cxr-fast 0.1 wrote numpy's RNG state as a numpy array, with neither version nor checksum."""
    payload = load_checkpoint(tiny_run / "checkpoints/last.pt")
    for key in ("format", "format_version", "cxr_fast_version", "checksum", "calibration"):
        payload.pop(key)
    np.random.seed(7)
    payload["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = np.random.rand(3)
    torch.save(payload, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt")
    restore_rng_states(loaded["rng"])
    np.testing.assert_array_equal(np.random.rand(3), expected)
    model, info = load_model(tmp_path / "v1.pt")
    assert info.thresholds is not None


def test_rng_states_round_trip(tmp_path):
    states = rng_states()
    expected = (torch.rand(2), np.random.rand(2), random.random())
    save_checkpoint({"model": {}, "rng": states}, tmp_path / "r.pt")
    restore_rng_states(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]


def test_non_plain_content_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="tensors and plain data"):
        save_checkpoint({"model": {}, "extra": np.zeros(3)}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())
