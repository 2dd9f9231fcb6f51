"""The instruments of a run: every epoch's timed window opens after a step and a sync, the loader's start is outside
it, the parts of an epoch add up to its wall time, loaders live across epochs (exactly as a fresh one per epoch would
train), MFU from counted FLOPs, LayerNorm in bf16 within bf16's tolerance, the kernel profile's classes."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import assert_same_run
from cxr_fast.config import ModelConfig, RunConfig, replace
from cxr_fast.data.loaders.loader import Batch
from cxr_fast.training.run import run_training

TINY = {"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 64, "optim.batch_size": 4,
        "optim.accum": 2, "optim.epochs": 3, "optim.lr": 1e-3, "data.workers": 1}


def tiny(**changes):
    return replace(RunConfig(), **(TINY | changes))


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_epoch_is_timed_after_a_step_and_its_parts_add_up_to_its_wall_time(synth_shards, tmp_path):
    started = time.perf_counter()
    run_training(tiny(), synth_shards, tmp_path / "run", show_progress=False)
    wall = time.perf_counter() - started
    records = _records(tmp_path / "run")
    steps = records[0]["step"]
    for r in records:
        assert r["warmup_steps"] == 1 and r["timed_steps"] == steps - 1  # every epoch, not only the first
        assert r["timed_images"] == r["timed_steps"] * 8 and r["train_images"] == steps * 8
        assert r["train_images_per_second"] == pytest.approx(r["timed_images"] / r["timed_seconds"])
        parts = r["seconds"]
        assert set(parts) == {"start", "loader_build", "loader_start", "warmup", "timed", "validation", "checkpoint"}
        assert all(v >= 0 for v in parts.values()) and parts["timed"] == r["timed_seconds"]
        assert abs(r["epoch_seconds"] - sum(parts.values())) <= 0.03 * r["epoch_seconds"] + 0.02
        assert r["unaccounted_seconds"] == pytest.approx(r["epoch_seconds"] - sum(parts.values()))
    total = sum(r["epoch_seconds"] for r in records)
    assert 0.85 * wall <= total <= wall  # the last record's writing is all that is left
    # The DataLoader's worker lives across epochs: only the first epoch waits for it to start.
    first = records[0]["seconds"]["loader_start"]
    assert all(r["seconds"]["loader_start"] < 0.25 * first for r in records[1:]), [r["seconds"] for r in records]


class _SlowStart:
    """A loader whose first batch takes `delay` seconds (a DataLoader spawning its workers)."""

    def __init__(self, delay: float, batches: int):
        self.delay, self.batches, self.device = delay, batches, torch.device("cpu")

    def __iter__(self):
        time.sleep(self.delay)
        for _ in range(self.batches):
            yield Batch(torch.randn(2, 1, 32, 32).contiguous(memory_format=torch.channels_last),
                        torch.zeros(2, 14), ["a", "b"])


def test_the_loaders_start_is_outside_the_timed_window():
    from cxr_fast.data.datasets import nih
    from cxr_fast.training.engine import train_one_epoch
    from cxr_fast.training.setup import build_trainer

    run = replace(tiny(), **{"data.image_size": 32, "optim.batch_size": 2, "optim.accum": 1,
                             "optim.effective_batch": 2})
    state, _model = build_trainer(run, torch.device("cpu"), tuple(nih.CLASSES), 100)
    stats = train_one_epoch(state, _SlowStart(0.5, 4), 4, show_progress=False)
    assert stats.loader_start_seconds >= 0.5 and stats.timed_steps == 3 and stats.timed_images == 6
    assert stats.timed_seconds < stats.seconds - 0.5
    assert stats.seconds == pytest.approx(stats.loader_start_seconds + stats.warmup_seconds + stats.timed_seconds)
    with pytest.raises(ValueError, match="at least 1"):
        train_one_epoch(state, _SlowStart(0, 2), 2, show_progress=False, warmup_steps=0)


def test_dali_pipelines_built_ahead_and_resume_stays_exact(synth_shards, tmp_path):
    """DALI cannot be re-seeded or checkpointed with CLAHE in the pipeline: each epoch's pipeline (its own seed) is
    built while the previous epoch validates, and an interrupted run still ends where the whole one does."""
    config = tiny(loader="dali", **{"data.workers": 2})
    whole = run_training(config, synth_shards, tmp_path / "whole", show_progress=False)
    records = _records(tmp_path / "whole")
    assert all(r["seconds"]["loader_build"] < 0.25 * records[0]["seconds"]["loader_build"] for r in records[1:])
    steps = whole["step"] // 3
    run_training(replace(config, max_steps=steps + 2), synth_shards, tmp_path / "parts", show_progress=False)
    resumed = run_training(config, synth_shards, tmp_path / "parts", resume={}, show_progress=False)
    assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "parts")


def test_mfu_comes_from_counted_flops_and_counting_them_changes_nothing(synth_shards, tmp_path, monkeypatch):
    from cxr_fast.training import run as run_module
    from cxr_fast.training.flops import training_flops_per_image
    from cxr_fast.training.model import create_model

    config = tiny(**{"optim.epochs": 1, "data.workers": 0})
    plain = run_training(config, synth_shards, tmp_path / "plain", show_progress=False)
    assert _records(tmp_path / "plain")[0]["mfu"] is None  # no peak known for a CPU
    monkeypatch.setattr(run_module, "device_peak", lambda device, override=None: ("a device", 1e12))
    counted = run_training(config, synth_shards, tmp_path / "counted", show_progress=False)
    record = _records(tmp_path / "counted")[0]
    model = create_model(ModelConfig(name="convnext_atto", pretrained=False), 1, 14)
    flops = training_flops_per_image(model, 1, 64, torch.device("cpu"))["flops_per_image"]
    assert record["mfu"] == pytest.approx(record["train_images_per_second"] * flops / 1e12)
    assert counted["val_loss"] == plain["val_loss"] and counted["train_loss"] == plain["train_loss"]


def test_fast_norm_keeps_layer_norm_in_bf16_within_its_tolerance(monkeypatch):
    """Under bf16 autocast, LayerNorm runs in bf16 with --fast-norm and, as CUDA's autocast runs it, in float32
    without (the CPU's autocast would keep it in bf16: the float32 policy is put in here); outputs and gradients of
    the two stay within bf16's tolerance of each other."""
    from timm.layers import is_fast_norm

    from cxr_fast.training.model import create_model

    real = torch.nn.functional.layer_norm
    seen = []

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        seen.append((weight.dtype, torch.is_autocast_enabled("cpu")))
        if torch.is_autocast_enabled("cpu"):  # CUDA's autocast policy for layer_norm: float32
            with torch.autocast("cpu", enabled=False):
                return real(x.float(), shape, weight.float(), bias.float(), eps)
        return real(x, shape, weight, bias, eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", layer_norm)
    torch.manual_seed(0)
    slow = create_model(ModelConfig(name="convnext_atto", pretrained=False), 1, 14).eval()  # eval: no dropout
    fast = create_model(ModelConfig(name="convnext_atto", pretrained=False, fast_norm=True), 1, 14).eval()
    assert not is_fast_norm()  # the switch is put back after the model is built
    fast.load_state_dict(slow.state_dict())
    dtypes, outputs = {}, {}
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    for name, model in (("slow", slow), ("fast", fast)):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[name] = model(x).float()
        outputs[name].sum().backward()
        dtypes[name] = set(seen)
    # Without the switch the norm is left to autocast (float32 on CUDA); with it, bf16 weights and autocast off.
    assert dtypes == {"slow": {(torch.float32, True)}, "fast": {(torch.bfloat16, False)}}
    scale = outputs["slow"].abs().max().item()
    assert (outputs["fast"] - outputs["slow"]).abs().max().item() <= 0.05 * scale
    assert not torch.equal(outputs["fast"], outputs["slow"])  # the switch took effect
    for (name, a), (_, b) in zip(slow.named_parameters(), fast.named_parameters()):
        assert (a.grad - b.grad).abs().max().item() <= 0.1 * (a.grad.abs().max().item() + 1e-6), name


def test_kernel_classes_by_the_operator_that_did_the_work():
    from cxr_fast.bench import profile

    assert profile.classify_aten("aten::cudnn_convolution", [[8, 96, 64, 64], [96, 1, 7, 7]]) == profile.DW_FORWARD
    assert profile.classify_aten("aten::cudnn_convolution", [[8, 96, 64, 64], [192, 96, 2, 2]]) == profile.DENSE_CONV
    depthwise_grad = [[8, 96, 64, 64], [8, 96, 64, 64], [96, 1, 7, 7]]
    assert profile.classify_aten("aten::convolution_backward", depthwise_grad, "sm90_xmma_wgrad_grouped") == \
        profile.DW_WEIGHT_GRAD
    assert profile.classify_aten("aten::convolution_backward", depthwise_grad, "xmma_dgrad_grouped") == \
        profile.DW_INPUT_GRAD
    assert profile.classify_aten("aten::convolution_backward", [[8, 96, 8, 8], [8, 3, 32, 32], [96, 3, 4, 4]],
                                 "xmma_dgrad") == profile.DENSE_CONV  # a dense conv's backward is a dense conv
    assert profile.classify_aten("aten::native_layer_norm_backward", None, "reduce_kernel") == profile.LN_BACKWARD
    # A compiled graph's fused kernels: "convolution" in a name is the work fused around one, not the convolution.
    assert profile.classify_kernel("triton_poi_fused_convolution_gelu_3") == profile.ELEMENTWISE
    assert profile.classify_kernel("triton_red_fused_native_layer_norm_native_layer_norm_backward_7") == \
        profile.LN_BACKWARD
    assert profile.classify_kernel("triton_poi_fused_clone_permute_2") == profile.COPY
    assert profile.classify_kernel("triton_tem_fused_addmm_5") == profile.MATMUL


@pytest.mark.slow
def test_cpu_profile_shows_every_class_the_cpu_has_and_its_shares_add_up():
    from cxr_fast.bench import profile

    run = replace(RunConfig(), **{"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 32,
                                  "optim.batch_size": 2, "optim.accum": 1, "optim.effective_batch": 2})
    result = profile.profile_training(run, steps=2, warmup=1)
    assert sum(result["share"].values()) == pytest.approx(1.0) and result["images"] == 4
    on_cpu = (profile.DW_FORWARD, profile.DW_BACKWARD, profile.DENSE_CONV, profile.LN_FORWARD, profile.LN_BACKWARD,
              profile.ELEMENTWISE, profile.COPY, profile.OPTIMIZER)
    assert all(result["seconds"][name] > 0 for name in on_cpu), result["seconds"]
    assert result["top"] and all(row["class"] in profile.CLASSES for row in result["top"])
