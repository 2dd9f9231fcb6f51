"""A run people can watch and steer: metrics.jsonl fields, curves.png, TensorBoard; resume after SIGTERM ends where
an uninterrupted run ends; a resume never ignores a flag; --batch-size auto; the per-step sync."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_same_run
from cxr_fast.data.datasets import nih
from cxr_fast.cli import cli
from cxr_fast.config import RunConfig, replace
from cxr_fast.errors import CxrFastError
from cxr_fast.training.checkpoint import load_checkpoint
from cxr_fast.training.setup import candidates, resolve_batch
from cxr_fast.training.run import run_training

TINY = {"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 64, "optim.batch_size": 4,
        "optim.accum": 2, "optim.epochs": 2, "optim.lr": 1e-3, "data.workers": 0}


def tiny(**changes):
    return replace(RunConfig(), **(TINY | changes))


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_curves_and_tensorboard(synth_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_training(tiny(tensorboard=True), synth_shards, run, show_progress=False)
    records = _records(run)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert record["train_images_per_second"] > 0 and 0 <= record["data_wait_fraction"] < 1
        assert "peak_gpu_memory_gib" not in record  # only where there is a GPU
    assert (run / "curves.png").stat().st_size > 10_000
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "auroc/macro", "lr", f"auroc/{nih.CLASSES[0]}"} <= tags
    assert {"step/loss", "step/lr", "step/images_per_second"} <= tags  # per optimizer step too
    assert [e.value for e in events.Scalars("auroc/macro")] == pytest.approx([r["val_macro_auc"] for r in records])


def test_sigterm_then_resume_ends_where_an_uninterrupted_run_ends(synth_shards, tmp_path, monkeypatch):
    from cxr_fast.training import setup as setup_module

    whole = run_training(tiny(), synth_shards, tmp_path / "whole", show_progress=False)

    class SigtermAtTheNinthBatch(setup_module.FocalLoss):
        calls = 0

        def forward(self, logits, targets):
            SigtermAtTheNinthBatch.calls += 1
            if SigtermAtTheNinthBatch.calls == 9:  # inside epoch 2 (7 steps of 2 batches per epoch)
                os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(logits, targets)

    monkeypatch.setattr(setup_module, "FocalLoss", SigtermAtTheNinthBatch)
    stopped = run_training(tiny(), synth_shards, tmp_path / "parts", show_progress=False)
    monkeypatch.undo()
    assert stopped["stopped"] == "SIGTERM" and 0 < stopped["step"] < whole["step"]
    resumed = run_training(RunConfig(), synth_shards, tmp_path / "parts", resume={}, show_progress=False)
    assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "parts")


def test_resume_extends_epochs_and_refuses_other_changes(synth_shards, tmp_path, caplog):
    run = tmp_path / "run"
    run_training(tiny(**{"optim.epochs": 1}), synth_shards, run, show_progress=False)
    with pytest.raises(CxrFastError, match=r"--lr 0.5 differs from its 0.001"):
        run_training(RunConfig(), synth_shards, run, resume={"optim.lr": 0.5})
    result = CliRunner().invoke(cli, ["train", "--shards", str(synth_shards), "--out", str(run), "--resume",
                                      "--batch-size", "8"])
    assert result.exit_code == 2 and "--batch-size 8 differs from its 4" in result.output
    caplog.set_level("WARNING")
    record = run_training(RunConfig(), synth_shards, run, resume={"optim.epochs": 2},
                          show_progress=False)
    assert record["epoch"] == 2 and [r["epoch"] for r in _records(run)] == [1, 2]
    assert "re-planned over 2 epochs" in caplog.text
    assert load_checkpoint(run / "checkpoints/last.pt")["config"]["optim"]["epochs"] == 2


def test_batch_size_auto_keeps_the_effective_batch():
    assert candidates(32) == [32, 16, 8, 4, 2, 1] and candidates(24) == [24, 12, 6, 3, 1]
    cpu = torch.device("cpu")
    auto = resolve_batch(RunConfig(), None, cpu, None)  # no probe on the CPU: the whole batch in one micro-step
    assert (auto.optim.batch_size, auto.optim.accum) == (32, 1)
    seed = resolve_batch(replace(RunConfig(), **{"optim.batch_size": 4}), None, cpu, None)
    assert (seed.optim.batch_size, seed.optim.accum) == (4, 8)  # the seed's 4 x 8
    with pytest.raises(CxrFastError, match="not a multiple"):
        replace(RunConfig(), **{"optim.batch_size": 5})


def test_one_host_sync_per_optimizer_step(synth_shards, monkeypatch):
    """Counts the engine's transfers to the host during an epoch: one per optimizer step."""
    from cxr_fast.data.loaders.loader import LoaderSpec, create_loader
    from cxr_fast.training import engine
    from cxr_fast.training.setup import Env, Plan, build_model, build_state

    config = tiny()
    env = Env(0, 1, torch.device("cpu"))
    model, ema = build_model(config, env, None, 14)
    state = build_state(config, Plan(nih.CLASSES, 56, 3, 6), env, model, ema, torch.nn.BCEWithLogitsLoss())
    batches = list(create_loader(LoaderSpec(synth_shards, "train", config.data, batch_size=4, train=True,
                                            loader="torch")))[:6]
    calls = []

    def counting(method):
        real = getattr(torch.Tensor, method)

        def wrapper(self, *args):
            if sys._getframe(1).f_code.co_filename == engine.__file__:  # transfers the engine itself asks for
                calls.append(method)
            return real(self, *args)
        return wrapper

    for method in ("item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, counting(method))
    stats = engine.train_one_epoch(state, batches, 6, lambda step: False, show_progress=False)
    assert len(calls) == 3 and state.step == 3 and not stats.stopped


@pytest.mark.slow
def test_compiled_run_trains_and_its_checkpoint_loads(synth_shards, tmp_path):
    from cxr_fast.training.checkpoint import load_model

    config = tiny(**{"data.image_size": 32, "optim.batch_size": 8, "optim.accum": 1, "optim.epochs": 1,
                  "model.compile": True})
    record = run_training(config, synth_shards, tmp_path / "run", show_progress=False)
    assert record["epoch"] == 1 and record["train_loss"] > 0
    model, info = load_model(tmp_path / "run/checkpoints/best.pt")  # plain weights: no torch.compile prefix
    assert info.config.model.compile and not any("_orig_mod" in k for k in model.state_dict())
