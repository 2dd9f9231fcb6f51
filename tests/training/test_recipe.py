"""The trainer made fast without changing what it learns: progressive resolution (its schedule, its FLOPs, exact
resume across a change of side), --val-every, a compiled run that trains and resumes exactly, one training loop, and
`bench recipe`'s projection."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_same_run
from cxr_fast.cli import cli
from cxr_fast.config import RunConfig, replace
from cxr_fast.training.checkpoint import load_checkpoint
from cxr_fast.training.resolution import flops_ratio, side_schedule
from cxr_fast.training.run import run_training
from cxr_fast.training.setup import validated_epochs

ROOT = Path(__file__).resolve().parents[2]
TINY = {"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 64, "optim.batch_size": 4,
        "optim.accum": 2, "optim.epochs": 4, "optim.lr": 1e-3, "data.workers": 0}


def tiny(**changes):
    return replace(RunConfig(), **(TINY | changes))


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_progressive_schedule_sides_and_flops():
    sides = side_schedule(512, 25, 256, 3)
    assert sides[0] == 256 and sides[-3:] == [512] * 3 and sides[-4] < 512
    assert all(s % 32 == 0 for s in sides) and sides == sorted(sides)
    assert flops_ratio(sides, 512) <= 0.6
    assert side_schedule(512, 25, None, 3) == [512] * 25 and flops_ratio([512] * 25, 512) == 1.0
    assert side_schedule(512, 2, 256, 3) == [512, 512]  # too short to ramp: full size throughout


def test_val_every_validates_every_nth_and_the_last_ones_and_best_is_among_them(synth_shards, tmp_path):
    assert validated_epochs(25, 5) == {5, 10, 15, 20, 21, 22, 23, 24, 25} and validated_epochs(3, 1) == {1, 2, 3}
    run_training(tiny(val_every=2), synth_shards, tmp_path / "run", show_progress=False)
    records = _records(tmp_path / "run")
    assert [("val_macro_auc" in r) for r in records] == [False, True, True, True]
    validated = [r for r in records if "val_macro_auc" in r]
    best = load_checkpoint(tmp_path / "run/checkpoints/best.pt")
    first_best = next(r for r in validated if r["val_macro_auc"] == max(v["val_macro_auc"] for v in validated))
    assert best["epoch"] == first_best["epoch"] and best["val"]["epoch"] == first_best["epoch"]


def test_resume_is_exact_across_a_change_of_side(synth_shards, tmp_path):
    """Sides 32, 32, 64, 64: stopped in the first low-resolution epoch and in the first full one, resumed each time,
    the run ends where the uninterrupted one does."""
    config = tiny(**{"optim.progressive": 32, "optim.progressive_final_epochs": 2})
    whole = run_training(config, synth_shards, tmp_path / "whole", show_progress=False)
    assert [r["image_side"] for r in _records(tmp_path / "whole")] == [32, 32, 64, 64]
    assert load_checkpoint(tmp_path / "whole/checkpoints/last.pt")["side_schedule"] == [32, 32, 64, 64]
    steps = whole["step"] // 4  # per epoch
    run_training(replace(config, max_steps=2), synth_shards, tmp_path / "parts", show_progress=False)
    stopped = run_training(config, synth_shards, tmp_path / "parts", resume={"max_steps": 2 * steps + 1},
                           show_progress=False)
    assert stopped["step"] == 2 * steps + 1  # inside the first epoch at 64
    resumed = run_training(config, synth_shards, tmp_path / "parts", resume={}, show_progress=False)
    assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "parts")
    assert [r["image_side"] for r in _records(tmp_path / "parts")] == [32, 32, 64, 64]


@pytest.mark.slow
def test_compiled_run_trains_resumes_exactly_and_saves_plain_weights(synth_shards, tmp_path):
    from cxr_fast.training.checkpoint import load_model

    config = tiny(**{"data.image_size": 32, "optim.batch_size": 8, "optim.accum": 1, "optim.epochs": 2,
                     "model.compile": True, "model.compile_cache": str(tmp_path / "cache")})
    whole = run_training(config, synth_shards, tmp_path / "whole", show_progress=False)
    record = _records(tmp_path / "whole")[0]
    assert record["compile_seconds"] > 0 and record["compiled_graphs"] >= 1 and record["train_loss"] > 0
    # The cache is the folder named, not torch's temp folder (importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR).
    assert sum(1 for p in (tmp_path / "cache").rglob("*") if p.is_file()) > 0
    run_training(replace(config, max_steps=3), synth_shards, tmp_path / "parts", show_progress=False)
    resumed = run_training(config, synth_shards, tmp_path / "parts", resume={}, show_progress=False)
    assert_same_run(whole, resumed, tmp_path / "whole", tmp_path / "parts")
    model, info = load_model(tmp_path / "whole/checkpoints/best.pt")  # plain weights: no compile prefix
    assert info.config.model.compile and not any("_orig_mod" in k or "compiled." in k for k in model.state_dict())


def test_compile_auto_is_eager_on_the_cpu_and_a_forced_failure_is_an_error(monkeypatch):
    import torch

    from cxr_fast.config import ModelConfig
    from cxr_fast.errors import CxrFastError
    from cxr_fast.training import compiled

    assert not compiled.resolve_compile(ModelConfig(), torch.device("cpu"))
    assert compiled.resolve_compile(ModelConfig(), torch.device("cuda"))
    model = torch.nn.Linear(3, 2)

    def broken(*_args, **_kwargs):
        def fails(_x):
            raise RuntimeError("no Triton")
        return fails

    monkeypatch.setattr(compiled.torch, "compile", broken)
    fallback = compiled.CompiledModel(model, "default", forced=False)
    x = torch.ones(1, 3)
    assert torch.equal(fallback(x), model(x)) and "no Triton" in fallback.failure
    with pytest.raises(CxrFastError, match="--compile: torch.compile failed .*no Triton"):
        compiled.CompiledModel(model, "default", forced=True)(x)


def test_one_training_loop():
    """Only the engine steps an optimizer: bench, the recipe projection and the GPU probe all run
    `engine.train_one_epoch` (the batch-size probe and the FLOP counter take a backward pass, no step)."""
    sources = list((ROOT / "cxr_fast").rglob("*.py")) + [ROOT / "tools/gpu_probe.py"]
    stepping = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step" and \
                    any(word in ast.unparse(node.func.value) for word in ("optimizer", "scaler")):
                stepping.add(path.relative_to(ROOT).as_posix())
    assert stepping == {"cxr_fast/training/engine.py"}


def test_bench_recipe_projection_adds_up_from_its_own_terms(tmp_path):
    """Every term of the projection recomputed from the JSON's own measurements: training images and validation
    images apart, compilation per side and for evaluation, loader builds, a checkpoint per epoch, start-up; more GPUs
    divide the per-image terms only."""
    out = tmp_path / "recipe.json"
    result = CliRunner().invoke(cli, ["bench", "recipe", "--model", "convnext_atto", "--image-size", "64",
                                      "--progressive", "32", "--epochs", "6", "--batch-size", "4",
                                      "--effective-batch", "8", "--steps", "2", "--warmup", "1", "--eval-batches",
                                      "2", "--images", "200", "--val-images", "40", "--val-every", "2", "--gpus",
                                      "8", "--loader-build-seconds", "1.5", "--json", str(out)])
    assert result.exit_code == 0, result.output
    recipe = json.loads(out.read_text())
    assert recipe["schedule"] == [32, 32, 32, 64, 64, 64] and [r["side"] for r in recipe["sides"]] == [32, 64]
    for row in recipe["sides"]:
        assert row["images"] == 2 * 8 and row["steps"] == 2 and row["warmup_steps"] == 1
        assert row["images_per_second"] == pytest.approx(row["images"] / row["seconds"])
    rate = {r["side"]: r["images_per_second"] for r in recipe["sides"]}
    compile_seconds = {r["side"]: r["compile_seconds"] for r in recipe["sides"]}
    evaluation = recipe["evaluation"]
    assert evaluation["images"] == 2 * 8 and evaluation["compile_seconds"] >= 0
    for name, sides in (("progressive", [32] * 3 + [64] * 3), ("fixed", [64] * 6)):
        p = recipe["projection"][name]
        assert p["train_seconds"] == pytest.approx(sum(200 / rate[s] for s in sides))
        assert p["validation_seconds"] == pytest.approx(4 * 40 / evaluation["images_per_second"])
        assert p["compile_seconds"] == pytest.approx(sum(compile_seconds[s] for s in set(sides))
                                                     + evaluation["compile_seconds"])
        assert p["loader_build_seconds"] == pytest.approx((len(set(sides)) + 1) * 1.5)
        assert p["checkpoint_seconds"] == pytest.approx(6 * recipe["checkpoint_seconds"]) and p["checkpoint_seconds"] > 0
        assert p["startup_seconds"] == recipe["startup_seconds"] > 0
        terms = [p[k] for k in ("startup_seconds", "train_seconds", "validation_seconds", "compile_seconds",
                                "loader_build_seconds", "checkpoint_seconds")]
        assert p["total_seconds"] == pytest.approx(sum(terms))
        assert p["total_seconds_gpus"] == pytest.approx(sum(terms) - 7 / 8 * (p["train_seconds"] +
                                                                               p["validation_seconds"]))
    assert recipe["scaled_by_gpus"] == ["train_seconds", "validation_seconds"]
    assert recipe["loader_images_per_second_per_gpu"] == pytest.approx(max(rate.values()))


def test_unmeasured_sides_are_fitted_from_two_or_more_measured_ones():
    from cxr_fast.bench.recipe import estimate_side, measured_sides
    from cxr_fast.config import BenchRecipeConfig, ConfigError

    assert measured_sides([256, 288, 320, 352, 384, 512, 512], 3) == [256, 320, 512]
    assert measured_sides([256, 512], 0) == [256, 512] and measured_sides([256, 384, 512], 2) == [256, 512]
    with pytest.raises(ConfigError, match=r"--measure-sides\) 1 cannot separate"):
        BenchRecipeConfig(measure_sides=1)
    # Seconds per image 1e-3 + 1e-8 x side^2 at the measured sides: the fit gives it back in between.
    rows = {s: {"images_per_second": 1 / (1e-3 + 1e-8 * s * s), "compile_seconds": 10.0} for s in (256, 512)}
    estimate = estimate_side(rows, 384)
    assert estimate["images_per_second"] == pytest.approx(1 / (1e-3 + 1e-8 * 384 ** 2))
    assert estimate["estimated"] and estimate["compile_seconds"] == 10.0
