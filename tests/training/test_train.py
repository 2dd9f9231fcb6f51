import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_same_run
from cxr_fast.data.datasets import nih
from cxr_fast.training.checkpoint import load_checkpoint, save_checkpoint
from cxr_fast.config import ModelConfig, RunConfig, replace
from cxr_fast.errors import CxrFastError
from cxr_fast.training.model import create_model
from cxr_fast.training.run import run_training

CLI = [sys.executable, "-m", "cxr_fast"]
TINY = {"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 64, "optim.batch_size": 4,
        "optim.accum": 2, "optim.epochs": 2, "optim.lr": 1e-3}
TINY_FLAGS = ["--model", "convnext_atto", "--no-pretrained", "--image-size", "64", "--batch-size", "4", "--accum", "2"]


def tiny(**changes):
    return replace(RunConfig(), **(TINY | changes))


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_ends_where_an_uninterrupted_run_ends(synth_shards, tmp_path):
    whole = run_training(tiny(), synth_shards, tmp_path / "whole", show_progress=False)
    stopped = run_training(tiny(max_steps=3), synth_shards, tmp_path / "parts", show_progress=False)
    assert stopped == {"stopped": "--max-steps 3", "step": 3}
    assert load_checkpoint(tmp_path / "parts/checkpoints/last.pt")["batch_in_epoch"] == 6  # mid-epoch
    resumed = run_training(tiny(), synth_shards, tmp_path / "parts", resume={}, show_progress=False)
    assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "parts")
    records = _records(tmp_path / "whole")
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[0]) >= {"epoch", "train_loss", "val_loss", "val_macro_auc", "val_auc"}
    assert set(records[0]["val_auc"]) == set(nih.CLASSES)
    best = load_checkpoint(tmp_path / "whole/checkpoints/best.pt")
    assert len(best["thresholds"]) == 14 and best["class_names"] == list(nih.CLASSES)
    assert (tmp_path / "whole/config.yaml").read_text().count("convnext_atto") == 1


def test_checkpoint_is_written_atomically_and_checked_on_load(tmp_path):
    path = tmp_path / "ckpt" / "x.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "class_names": list(nih.CLASSES)}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]
    save_checkpoint({"model": {}, "class_names": ["Cat", "Dog"]}, path)  # any data set's classes
    assert load_checkpoint(path)["class_names"] == ["Cat", "Dog"]
    save_checkpoint({"model": {}, "class_names": ["Cat", "Cat"]}, path)
    with pytest.raises(CxrFastError, match="class_names must be a list of distinct names"):
        load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CxrFastError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_state(synth_shards, tmp_path, monkeypatch):
    from cxr_fast.training import setup

    class BreaksAtTheFifthBatch(setup.FocalLoss):
        calls = 0

        def forward(self, logits, targets):
            BreaksAtTheFifthBatch.calls += 1
            loss = super().forward(logits, targets)
            return loss * float("nan") if BreaksAtTheFifthBatch.calls == 5 else loss

    monkeypatch.setattr(setup, "FocalLoss", BreaksAtTheFifthBatch)
    with pytest.raises(CxrFastError, match=r"loss is nan at optimizer step 3 \(epoch 1"):
        run_training(tiny(), synth_shards, tmp_path / "run", show_progress=False)
    saved = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert saved["step"] == 2 and saved["batch_in_epoch"] == 4  # the last good optimizer step (accum 2)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_sigterm_saves_last_and_exits_cleanly(synth_shards, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(CLI + ["train", "--shards", str(synth_shards), "--out", str(run), "--epochs", "50",
                                      "--loader", "torch", "--workers", "0"] + TINY_FLAGS,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:  # first epoch done: surely training
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output
    last = load_checkpoint(run / "checkpoints/last.pt")
    assert last["step"] >= 7 and last["batch_in_epoch"] % 2 == 0


def test_offline_hub_gives_a_message_naming_both_ways_out(synth_shards, tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(CLI + ["train", "--shards", str(synth_shards), "--out", str(tmp_path / "r"),
                                   "--model", "convnext_atto"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "--weights FILE" in result.stderr and "--no-pretrained" in result.stderr
    assert "Traceback" not in result.stderr


def test_weights_file_is_loaded_and_the_stem_folded(tmp_path):
    import timm

    imagenet = timm.create_model("convnext_atto", pretrained=False)  # stands in for a downloaded checkpoint
    torch.save(imagenet.state_dict(), tmp_path / "in1k.pth")
    model = create_model(ModelConfig(name="convnext_atto", weights=str(tmp_path / "in1k.pth")), in_chans=1, num_classes=14)
    assert torch.allclose(model.stem[0].weight, imagenet.stem[0].weight.sum(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(model.stages[2].blocks[0].conv_dw.weight, imagenet.stages[2].blocks[0].conv_dw.weight)
    assert model.head.fc.out_features == 14
    with pytest.raises(CxrFastError, match="does not fit convnext_tiny"):
        create_model(ModelConfig(name="convnext_tiny", weights=str(tmp_path / "in1k.pth")), 1, 14)


def test_convnext_large_has_the_exact_head_and_runs_at_512():
    model = create_model(ModelConfig(name="convnext_large", pretrained=False), in_chans=1, num_classes=14).eval()
    head = model.head
    assert type(head.norm).__name__ == "LayerNorm2d" and head.norm.normalized_shape == (1536,)
    assert isinstance(head.drop, torch.nn.Dropout) and head.drop.p == 0.2
    assert (head.fc.in_features, head.fc.out_features) == (1536, 14)
    assert model.stem[0].in_channels == 1
    x = torch.randn(1, 1, 512, 512).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 14) and torch.isfinite(out).all()


@pytest.mark.slow
def test_two_process_ddp_run_agrees_with_single_process_evaluation(synth_shards, tmp_path):
    from cxr_fast.training.engine import evaluate
    from cxr_fast.data.loaders.loader import LoaderSpec, create_loader
    from cxr_fast.training.losses import FocalLoss
    from cxr_fast.metrics import macro_auc

    run = tmp_path / "ddp"
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
         "cxr_fast", "train", "--shards", str(synth_shards), "--out", str(run), "--epochs", "1", "--workers", "1",
         "--device", "cpu"] + TINY_FLAGS, capture_output=True, text=True, timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    record = _records(run)[-1]
    checkpoint = load_checkpoint(run / "checkpoints/last.pt")
    assert len(checkpoint["rng"]) == 2  # both ranks' RNG states, for exact resume
    config = tiny()
    model = create_model(config.model, 1, 14)
    model.load_state_dict(checkpoint["model"])
    loader = create_loader(LoaderSpec(synth_shards, "val", config.data, batch_size=8, train=False, loader=config.loader))
    single = evaluate(model, loader, FocalLoss(0.0), None, show_progress=False)
    assert record["val_images"] == len(single["keys"])  # every validation image once, across the two ranks
    assert record["val_macro_auc"] == pytest.approx(macro_auc(single["targets"], single["probs"])[0], abs=1e-6)
