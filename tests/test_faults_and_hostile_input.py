"""Hostile input and faults, one group per class of defect (the README's reliability table): each asserts the clear
error or the correct result, and that nothing the user had was changed."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cxr_fast.data.datasets import nih
from cxr_fast import constants as C
from cxr_fast.cli import cli
from cxr_fast.config import ShardConfig
from cxr_fast.data.images.source import read_gray
from cxr_fast.data.shards.manifest import load_manifest, split_shards
from cxr_fast.data.shards.tars import walk_tar
from cxr_fast.data.shards.verify import verify
from cxr_fast.data.shards.writer import ShardInput, write_shards
from cxr_fast.errors import CxrFastError
from cxr_fast.files import folder_lock

CLI = [sys.executable, "-m", "cxr_fast"]
TINY_FLAGS = ["--model", "convnext_atto", "--no-pretrained", "--image-size", "64", "--batch-size", "4", "--accum", "2"]


def _run(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def _tree(folder):
    """Every file below `folder` with its bytes: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_set(synth_dir, tmp_path, rows):
    """An image folder and a table of (image name, finding labels, patient) using the synthetic PNGs."""
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((synth_dir / "images_001/images").glob("*.png"))
    for (name, _labels, _patient), source in zip(rows, sources):
        shutil.copy(source, images / name.strip())
    table = tmp_path / "table.csv"
    pd.DataFrame(rows, columns=["Image Index", "Finding Labels", "Patient ID"]).to_csv(table, index=False)
    return images, table


def _shard_labels(shards):
    labels, splits = {}, {}
    for split in C.SPLITS:
        for tar in split_shards(shards, split):
            for _key, sample in walk_tar(tar):
                meta = json.loads(sample["json"])
                labels[meta["image_index"]] = np.frombuffer(sample["labels"], np.uint8)
                splits.setdefault(meta["patient_id"], set()).add(split)
    return labels, splits


# 1 and 2 -------------------------------------------------------------------------------- whitespace in the table
def test_whitespace_loses_no_label_and_splits_no_patient(synth_dir, tmp_path):
    rows = [(f"{i:08d}_000.png", "No Finding", str(i)) for i in range(30)]
    rows[0] = ("00000000_000.png", "Effusion | Mass", "3")
    rows[1] = ("00000001_000.png", " Cardiomegaly", " 3")
    rows[2] = ("00000002_000.png", "Hernia ", "3 ")
    images, table = _small_set(synth_dir, tmp_path, rows)
    shards = tmp_path / "shards"
    write_shards(ShardInput(images, table), ShardConfig(out=str(shards), shard_size=8, val_fraction=0.2, test_fraction=0.2))
    labels, splits = _shard_labels(shards)
    index = {name: nih.CLASSES.index(name) for name in nih.CLASSES}
    assert labels["00000000_000.png"][[index["Effusion"], index["Mass"]]].tolist() == [1, 1]
    assert labels["00000001_000.png"][index["Cardiomegaly"]] == 1
    assert labels["00000002_000.png"][index["Hernia"]] == 1
    assert len(splits["3"]) == 1 and " 3" not in splits  # one patient, one split
    eda = _run(["eda", "--labels", table, "--out", tmp_path / "eda"])
    assert eda.exit_code == 0
    report = (tmp_path / "eda/report.md").read_text()
    assert "| Mass | 1 |" in report and "| Cardiomegaly | 1 |" in report and "| Hernia | 1 |" in report


# 3 ------------------------------------------------------------------------------------- finished results destroyed
def test_a_finished_run_is_not_replaced_without_overwrite(tiny_run, synth_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = _tree(run)
    result = _run(["train", "--shards", synth_shards, "--out", run, *TINY_FLAGS, "--epochs", "1"])
    assert result.exit_code == 2 and "already holds a run" in result.output and "--overwrite" in result.output
    assert _tree(run) == before
    (run / "notes.txt").write_text("mine")
    result = _run(["train", "--shards", synth_shards, "--out", run, *TINY_FLAGS, "--epochs", "1", "--overwrite",
                   "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert not (run / "metrics.jsonl").exists()  # the old run's record is gone, not appended to
    assert (run / "notes.txt").read_text() == "mine"  # what is not a run's is left alone


def test_two_writers_of_one_folder_are_refused(synth_dir, synth_shards, tmp_path):
    run = tmp_path / "run"
    with folder_lock(run, "a training run"):
        result = _run(["train", "--shards", synth_shards, "--out", run, *TINY_FLAGS])
        assert result.exit_code == 2 and "is in use" in result.output
        result = _run(["shard", "--images", synth_dir / "images_001", "--labels", synth_dir / "Data_Entry_2017.csv",
                       "--out", run])
        assert result.exit_code == 2 and "is in use" in result.output
    assert list(run.iterdir()) == []


def test_a_complete_shard_set_survives_a_failed_rerun(synth_dir, tmp_path):
    images, labels = tmp_path / "images", synth_dir / "Data_Entry_2017.csv"
    shutil.copytree(synth_dir / "images_001", images)
    out = tmp_path / "shards"
    write_shards(ShardInput(images, labels), ShardConfig(out=str(out), shard_size=16))
    before = _tree(out)
    victim = sorted(images.rglob("*.png"))[3]
    victim.write_bytes(b"broken")  # same names, so the plan changes only through the image's size
    with pytest.raises(CxrFastError, match="complete shard set made with other settings or data"):
        write_shards(ShardInput(images, labels), ShardConfig(out=str(out), shard_size=16))
    with pytest.raises(CxrFastError, match="complete shard set"):
        write_shards(ShardInput(images, labels), ShardConfig(out=str(out), shard_size=8))
    assert _tree(out) == before and verify(out) == []
    with pytest.raises(CxrFastError, match=victim.name):
        write_shards(ShardInput(images, labels), ShardConfig(out=str(out), shard_size=8), overwrite=True)
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))


def test_shard_refuses_a_folder_with_other_files(synth_dir, tmp_path):
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "manifest.json").write_text("my own notes")
    (out / "train" / "data.tar").write_bytes(b"mine")
    (out / "train" / "work.tmp").write_bytes(b"mine too")
    before = _tree(out)
    result = _run(["shard", "--images", synth_dir / "images_001", "--labels", synth_dir / "Data_Entry_2017.csv",
                   "--out", out])
    assert result.exit_code == 2 and "holds files cxr-fast did not write" in result.output
    assert _tree(out) == before


# 4 --------------------------------------------------------------------------------------------------- preemption
def test_loader_workers_have_a_process_group_of_their_own(synth_shards):
    from cxr_fast.config import DataConfig
    from cxr_fast.data.loaders.loader import LoaderSpec, create_loader

    loader = create_loader(LoaderSpec(synth_shards, "train", DataConfig(image_size=32, workers=2), batch_size=4,
                                      train=False, loader="torch"))
    assert sum(1 for _ in loader) == len(loader)  # every worker has served a batch: all are initialised
    workers = [worker.pid for worker in loader.loader._iterator._workers]
    assert len(workers) == 2 and all(os.getpgid(pid) == pid != os.getpgid(0) for pid in workers)
    # Their forkserver stays in the job's group but ignores SIGTERM; the workers do not ignore it.
    forkserver = {_parent(pid) for pid in workers}
    assert len(forkserver) == 1 and _ignores_sigterm(*forkserver)
    assert not any(map(_ignores_sigterm, workers))
    os.kill(*forkserver, signal.SIGTERM)
    time.sleep(0.5)
    assert sum(1 for _ in loader) == len(loader)  # and, persistent, they serve the next epoch


def _parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _ignores_sigterm(pid):
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn"))
    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def _descendants(pid):
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [d for c in children for d in _descendants(int(c))]


@pytest.mark.parametrize("how", ["process group", "every process"])
def test_sigterm_on_preemption_saves_last(synth_shards, tmp_path, how):
    run = tmp_path / "run"
    process = subprocess.Popen(CLI + ["train", "--shards", str(synth_shards), "--out", str(run), "--epochs", "50",
                                      "--loader", "torch", "--workers", "2"] + TINY_FLAGS,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the second epoch: its loader's workers are running
    if how == "process group":  # kill -TERM -PGID, torchrun, a terminal's job control
        os.killpg(process.pid, signal.SIGTERM)
    else:  # SLURM signals each process of the job step, the loader's workers too
        for pid in [process.pid, *_descendants(process.pid)]:
            os.kill(pid, signal.SIGTERM)
    output = process.communicate(timeout=180)[0]
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    if how == "process group":  # the workers were not signalled: they serve the main process to its last step
        assert "the loader failed" not in output
    assert (run / "checkpoints/last.pt").exists()


# 5 ------------------------------------------------------------------------------------------------ values checked
@pytest.mark.parametrize("yaml_text, message", [
    ("optim:\n  class_weighting: inverse\n", "optim.class_weighting must be one of inverse_frequency, none"),
    ("amp: float16\n", "amp (--amp) must be one of auto, bf16, fp16, off"),
    ("device: gpu\n", "device (--device) must be one of auto, cuda, cpu"),
    ("optim:\n  lr: fast\n", "optim.lr (--lr) must be a number"),
    ("optim:\n  epochs: 2.5\n", "optim.epochs (--epochs) must be a whole number"),
    ("data:\n  augment:\n    noise_prob: 2\n", "data.augment.noise_prob must be <= 1"),
])
def test_config_files_are_checked_by_type_and_range(synth_shards, tmp_path, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    result = _run(["train", "--shards", synth_shards, "--out", tmp_path / "run", "--config", tmp_path / "c.yaml"])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    from cxr_fast.config import load_yaml

    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-3\n")  # YAML 1.1 reads this as a string
    assert load_yaml(tmp_path / "c.yaml").optim.lr == 1e-3


@pytest.mark.parametrize("command, message", [
    (["train", "--batch-size", "0"], "optim.batch_size (--batch-size) must be auto or a whole number >= 1"),
    (["train", "--accum", "0"], "optim.accum (--accum) must be auto or a whole number >= 1"),
    (["train", "--lr", "-1"], "optim.lr (--lr) must be > 0"),
    (["train", "--epochs", "0"], "optim.epochs (--epochs) must be >= 1"),
    (["train", "--image-size", "7"], "data.image_size (--image-size) must be >= 32"),
    (["preview", "--n", "0"], "Invalid value for '--n'"),
    (["bench", "train", "--steps", "0"], "Invalid value for '--steps'"),
    (["shard", "--val-fraction", "0"], "shard.val_fraction (--val-fraction) must be > 0"),
])
def test_numeric_flags_are_checked_before_any_work(synth_dir, synth_shards, tmp_path, command, message):
    where = {"train": ["--shards", synth_shards, "--out", tmp_path / "run"],
             "preview": ["--shards", synth_shards, "--out", tmp_path / "p"], "bench": [],
             "shard": ["--images", synth_dir / "images_001", "--labels", synth_dir / "Data_Entry_2017.csv", "--out",
                       tmp_path / "s"]}[command[0]]
    result = _run(command + where)
    assert result.exit_code == 2 and message in result.output
    assert not any(tmp_path.iterdir())


# 6 ------------------------------------------------------------------------------------------- decompression bombs
def _claims(path, width, height):
    """A small PNG whose header claims width x height (the pixels are never there)."""
    data = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_bombs_are_refused_before_decoding(synth_dir, tmp_path):
    rows = [(f"{i:08d}_000.png", "No Finding", str(i)) for i in range(20)]
    images, table = _small_set(synth_dir, tmp_path, rows)
    _claims(images / "00000004_000.png", 60000, 60000)
    out = tmp_path / "shards"
    result = _run(["shard", "--images", images, "--labels", table, "--out", out])
    assert result.exit_code == 2 and "claims 60000 x 60000 pixels, more than --max-pixels" in result.output
    assert not out.exists()
    result = _run(["shard", "--images", images, "--labels", table, "--out", out, "--on-error", "skip"])
    assert result.exit_code == 0, result.output
    skipped = load_manifest(out)["skipped"]
    assert [s["file"] for s in skipped] == [str(images / "00000004_000.png")] and "pixels" in skipped[0]["reason"]
    # The limit is a setting: a real image over it is refused as well (its header is read, not the pixels).
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((300, 300), np.uint8))
    with pytest.raises(Exception, match="300 x 300 pixels, more than --max-pixels 50000"):
        read_gray(tmp_path / "big.png", max_pixels=50_000)


# 7 ------------------------------------------------------------------------------------------------- late failures
def test_preconditions_fail_before_the_work(tiny_run, synth_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"]["images"] = 0
    (shards / "manifest.json").write_text(json.dumps(manifest))
    started = time.perf_counter()
    result = _run(["train", "--shards", shards, "--out", tmp_path / "run", *TINY_FLAGS])
    assert result.exit_code == 2 and "empty validation split" in result.output
    assert time.perf_counter() - started < 30 and not (tmp_path / "run" / "config.yaml").exists()

    boxes = tmp_path / "boxes.csv"
    for text, message in (("a,b\n1,2\n", "expected NIH's BBox_List_2017.csv"),
                          ("Image Index,Finding Label,x,y,w,h\na.png,Mass,ten,1,2,3\n", "row 2 has an invalid box x")):
        boxes.write_text(text)
        result = _run(["analyze", "--checkpoint", tiny_run / "checkpoints/best.pt", "--shards", synth_shards,
                       "--out", tmp_path / "analysis", "--bbox", boxes])
        assert result.exit_code == 2 and message in result.output
        assert not (tmp_path / "analysis").exists()  # refused before any inference


# 8 ------------------------------------------------------------------------------------------------------ integrity
def test_verify_reports_a_false_count_and_a_stray_tar(synth_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["images"] = 999
    (shards / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(shards / "val/shard-000000.tar", shards / "val/shard-000099.tar")
    problems = verify(shards)
    assert any("claims 999 images" in p for p in problems)
    assert any("val/shard-000099.tar: stray file" in p for p in problems)


def test_full_disk_and_blocked_output_are_clear_errors(synth_dir, tmp_path, monkeypatch):
    from cxr_fast.training import checkpoint

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    result = _run(["shard", "--images", synth_dir / "images_001", "--labels", synth_dir / "Data_Entry_2017.csv",
                   "--out", blocked])
    assert result.exit_code == 2 and "is a file" in result.output
    with pytest.raises(CxrFastError, match=f"{blocked} is a file, not a folder"):
        write_shards(ShardInput(synth_dir / "images_001", synth_dir / "Data_Entry_2017.csv"), ShardConfig(out=str(blocked)))

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CxrFastError, match="cannot write checkpoint .*x.pt: No space left on device"):
        checkpoint.save_checkpoint({"model": {"w": torch.ones(1)}}, tmp_path / "ck" / "x.pt")
    assert list((tmp_path / "ck").iterdir()) == []  # no half-written file left behind
