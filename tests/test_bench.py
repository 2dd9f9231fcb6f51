"""The instruments: the FLOP count behind MFU (grouped convolutions' backward counted as what it is), `bench train`'s
flags and full batches, `bench loader`'s timed window, the GPU check's plan and the summary of its records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cxr_fast.training.flops import training_flops_per_image
from cxr_fast.config import ModelConfig
from cxr_fast.training.model import create_model

ROOT = Path(__file__).resolve().parents[1]


def test_depthwise_backward_costs_twice_its_forward():
    # One depthwise 7x7 convolution, 16 channels, 8x8 output: forward 2 * 64 * 16 * 49 multiply-adds per image.
    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16, bias=False)
    model = nn.Sequential(nn.Conv2d(1, 16, 1, bias=False), conv)
    flops = training_flops_per_image(model, 1, 8, torch.device("cpu"))
    forward = 2 * 64 * 16 * 1 + 2 * 64 * 16 * 49
    assert flops["forward_flops_per_image"] == forward
    # Backward: input and weight gradients of the depthwise conv, the weight gradient only of the first one (its
    # input needs no gradient).
    assert flops["flops_per_image"] == forward + 2 * (2 * 64 * 16 * 49) + 2 * 64 * 16 * 1
    assert flops["torch_counted_flops_per_image"] > flops["flops_per_image"]  # torch counts the depthwise one densely


@pytest.mark.parametrize("name", ["convnext_atto"])
def test_convnext_training_flops_are_three_forwards(name):
    model = create_model(ModelConfig(name=name, pretrained=False), in_chans=1, num_classes=14)
    flops = training_flops_per_image(model, 1, 64, torch.device("cpu"))
    # Every conv and matmul after the stem needs both gradients; the stem's input needs none (one forward less).
    ratio = flops["flops_per_image"] / flops["forward_flops_per_image"]
    assert 2.95 < ratio <= 3.0
    assert flops["torch_counted_flops_per_image"] / flops["forward_flops_per_image"] > 6


def _probe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_probe", ROOT / "tools/gpu_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_parts_fit_two_calls_and_an_unknown_part_is_an_error(tmp_path):
    probe = _probe()
    assert probe.CALL_SECONDS <= 540
    for call, parts in probe.CALLS.items():
        assert parts[0] == "data" and sum(probe.ESTIMATES[p] for p in parts) <= probe.CALL_SECONDS, call
    assert {p for parts in probe.CALLS.values() for p in parts} == set(probe.ESTIMATES)
    done = subprocess.run([sys.executable, str(ROOT / "tools/gpu_probe.py"), "--only", "profile,bogus", "--out",
                           str(tmp_path / "gpu.jsonl")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Error: unknown part(s) bogus" in done.stderr
    assert not (tmp_path / "gpu.jsonl").exists()


REHEARSAL = ROOT / "benchmarks/results/cpu-2core-gpu-check-rehearsal.jsonl"


@pytest.mark.parametrize("path", [ROOT / "benchmarks/results/gpu-h200-check.jsonl",
                                  ROOT / "benchmarks/results/gpu-h200-train.jsonl", REHEARSAL],
                         ids=lambda p: p.name)
def test_summarize_renders_every_record_and_any_subset(path, tmp_path):
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = {r["step"] for r in records} - {"machine"}
    broken = {"step": "recipe", "gpu": None, "error": "RuntimeError: out of memory"}
    skipped = {"step": "run", "gpu": None, "skipped": "its estimate, 270 s, exceeds the 100 s left"}
    subsets = [records + [broken, skipped]] + [[r for r in records if r["step"] in ("machine", step)]
                                                for step in steps]
    for index, subset in enumerate(subsets):
        file = tmp_path / f"subset-{index}.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in subset))
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks/summarize.py"), str(file)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert "**recipe failed:** RuntimeError: out of memory" in subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/summarize.py"), str(tmp_path / "subset-0.jsonl")],
        capture_output=True, text=True, timeout=60).stdout


def test_bench_train_takes_the_run_flags_and_times_full_batches_only(synth_shards, tmp_path):
    from click.testing import CliRunner

    from cxr_fast.cli import cli

    out = tmp_path / "train.json"
    result = CliRunner().invoke(cli, ["bench", "train", "--shards", str(synth_shards), "--data", "torch", "--model",
                                      "convnext_atto", "--image-size", "32", "--batch-size", "5", "--accum", "2",
                                      "--steps", "6", "--warmup", "1", "--workers", "0", "--no-cudnn-benchmark",
                                      "--compile-mode", "reduce-overhead", "--fast-norm", "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    # 57 training images: batches of 5 leave a short one of 2 at each epoch's end, and 14 micro-batches cross it.
    assert record["accum"] == 2 and record["steps"] == 6 and record["images"] == 6 * 2 * 5
    assert record["cudnn_benchmark"] is False and record["compile_mode"] == "reduce-overhead" and record["fast_norm"]
    assert record["images_per_second"] == pytest.approx(record["images"] / record["seconds"])


def test_bench_loader_window_is_a_time_as_well_as_a_count(synth_shards, tmp_path):
    from click.testing import CliRunner

    from cxr_fast.cli import cli

    out = tmp_path / "loader.json"
    result = CliRunner().invoke(cli, ["bench", "loader", "--shards", str(synth_shards), "--loader", "torch",
                                      "--image-size", "32", "--batch-size", "8", "--batches", "1", "--seconds", "1.5",
                                      "--workers", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["seconds"] >= 1.5 and record["batches"] > 1 and record["warmup_batches"] == 10
    assert record["images_per_second"] == pytest.approx(record["images"] / record["seconds"])
