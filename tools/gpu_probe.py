"""The GPU measurements of tools/gpu_check.sh (round 2): one JSON line per measurement, appended and flushed as it is
made, most valuable first, so a run cut off by its time limit keeps everything it measured. Every compared setting
runs in a process of its own (cuDNN's plan cache ignores the `benchmark` flag; compiled graphs stay in a process), and
every training rate comes from the trainer's own loop (`engine.train_one_epoch`) with a timed window that opens after
the warm-up, so each record carries images, seconds, steps and warm-up, and the GPU.

  data      synthetic images, sharded as png, jpeg and png resized to the full side
  slowdown  `cxr-fast train --batch-size 4 --epochs 2` with --cudnn-benchmark and --no-cudnn-benchmark (4 x 8)
  profile   torch.profiler over a few steps at 32 x 1, eager and compiled: GPU time by kernel class, top kernels
  loader    `cxr-fast bench loader` (DALI on the GPU) at 256 and 512 on jpeg, png, png resized
  recipe    `cxr-fast bench recipe`: compile modes default and max-autotune-no-cudagraphs, 4 x 8 reduce-overhead
  run       `cxr-fast train` as a GPU user runs it (compiled, progressive) across a change of side, cold then warm
            compile cache

--rehearse runs every step on the CPU with a tiny model and a few images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_fast.bench.machine import machine  # noqa: E402
from cxr_fast.config import ShardConfig, SynthConfig  # noqa: E402
from cxr_fast.data.synth import write_synthetic_dataset  # noqa: E402
from cxr_fast.data.writer import ShardInput, write_shards  # noqa: E402

CUDA = torch.cuda.is_available()
# Kernel classes of a ConvNeXt training step, by substrings of the kernel names (checked in this order).
KERNEL_CLASSES = (
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("depthwise convolution", ("conv", "dgrad", "wgrad", "depthwise")),
    ("matrix multiply", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "addmm", "mm_")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("gelu", ("gelu",)),
    ("fused (triton)", ("triton",)),
    ("element-wise and casts", ("elementwise", "vectorized", "copy", "cast", "_to_", "fill", "reduce", "mul", "add")),
)


class Recorder:
    def __init__(self, path: Path):
        self.path, self.gpu = path, torch.cuda.get_device_name() if CUDA else None

    def __call__(self, step: str, **fields) -> None:
        line = json.dumps({"step": step, "gpu": self.gpu, **fields}, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def cxr_fast(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """The CLI in a process of its own."""
    return subprocess.run([sys.executable, "-m", "cxr_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=True)


def make_data(work: Path, size: dict, record: Recorder) -> dict[str, Path]:
    started = time.perf_counter()
    table = write_synthetic_dataset(work / "synth", SynthConfig(n_images=size["images"], source_size=size["source"],
                                                                workers=size["workers"]))
    variants = {"png": {}, "jpeg": {"encoding": "jpeg"}, "png-resized": {"resize": size["side"]}}
    shards = {}
    for name, settings in variants.items():
        shards[name] = work / f"shards-{name}"
        write_shards(ShardInput(work / "synth", table), ShardConfig(out=str(shards[name]), shard_size=256,
                                                        workers=size["workers"], **settings))
    record("data", images=size["images"], source_size=size["source"], seconds=time.perf_counter() - started,
           shards={k: str(v) for k, v in shards.items()})
    return shards


def slowdown(shards: dict, work: Path, size: dict, record: Recorder) -> None:
    """4 x 8 for two epochs, cuDNN autotuning on and off, each in its own process: epoch 1 against epoch 2."""
    for flag in ("--cudnn-benchmark", "--no-cudnn-benchmark"):
        out = work / f"slowdown{flag}"
        args = ["train", "--shards", shards["png"], "--out", out, "--overwrite", "--model", size["model"],
                "--no-pretrained", "--image-size", size["side"], "--batch-size", 4, "--epochs", 2, "--no-compile",
                flag, "--workers", size["workers"]]
        started = time.perf_counter()
        cxr_fast(args, timeout=300)
        for line in (out / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            record("slowdown", setting=flag, micro_batch=4, accum=8, wall_seconds=time.perf_counter() - started,
                   **{k: r.get(k) for k in ("epoch", "train_images_per_second", "data_wait_fraction", "warmup_steps",
                                            "peak_gpu_memory_gib", "image_side")})


def classify(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other")


def profile_steps(compiled: bool, size: dict) -> dict:
    """(In its own process) a few optimizer steps of the trainer under torch.profiler, after its warm-up."""
    from torch.profiler import ProfilerActivity, profile

    from cxr_fast.bench.train import bench_run_config, trainer
    from cxr_fast.config import BenchTrainConfig
    from cxr_fast.data.loader import LoaderSpec, SyntheticLoader
    from cxr_fast.training.engine import train_one_epoch

    device = torch.device("cuda" if CUDA else "cpu")
    run = bench_run_config(BenchTrainConfig(model=size["model"], image_size=size["side"],
                                            batch_size=size["micro_batch"], compile=compiled))
    state, _model = trainer(run, device)
    spec = LoaderSpec("", "train", run.data, batch_size=size["micro_batch"], device=device)
    warmup, steps = 3, size["profile_steps"]
    train_one_epoch(state, SyntheticLoader(spec, warmup, len(state.classes)), warmup, show_progress=False)
    state.batch_in_epoch = 0
    activities = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        stats = train_one_epoch(state, SyntheticLoader(spec, steps, len(state.classes)), steps, show_progress=False)
        wall = time.perf_counter() - started
    times = {}
    for event in prof.key_averages():
        spent = (event.self_device_time_total if CUDA else event.self_cpu_time_total) / 1e6
        if spent > 0 and (CUDA or event.key.startswith("aten::")):
            times[event.key] = times.get(event.key, 0.0) + spent
    busy = sum(times.values())
    classes: dict[str, float] = {}
    for name, spent in times.items():
        classes[classify(name)] = classes.get(classify(name), 0.0) + spent
    top = sorted(times.items(), key=lambda kv: -kv[1])[:15]
    return {"compiled": compiled, "micro_batch": size["micro_batch"], "steps": steps, "images": stats.images,
            "wall_seconds": wall, "images_per_second": stats.images / wall, "busy_seconds": busy,
            "idle_share": max(0.0, 1 - busy / wall), "share": {k: v / wall for k, v in sorted(classes.items())},
            "top_kernels": [{"name": k[:160], "seconds": v, "share": v / wall} for k, v in top]}


def profiles(size: dict, record: Recorder, rehearse: bool) -> None:
    for compiled in (False, True):
        args = [sys.executable, __file__, "--profile", "compiled" if compiled else "eager"] + \
            (["--rehearse"] if rehearse else [])
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
        record("profile", model=size["model"], image_size=size["side"], **json.loads(done.stdout.splitlines()[-1]))


def loaders(shards: dict, size: dict, record: Recorder, work: Path) -> None:
    """The DALI pipeline (on the GPU where there is one) at the small and the full side, one process each."""
    for name in ("jpeg", "png", "png-resized"):
        for side in size["loader_sides"]:
            path = work / f"loader-{name}-{side}.json"
            cxr_fast(["bench", "loader", "--shards", shards[name], "--loader", "dali", "--image-size", side,
                      "--batches", size["loader_batches"], "--warmup", 10, "--workers", size["workers"], "--json",
                      path], timeout=180)
            result = json.loads(path.read_text())
            record("loader", shards=name, **{k: v for k, v in result.items() if k != "machine"})


def recipes(size: dict, record: Recorder, work: Path) -> None:
    settings = [("default", 32, ["--measure-sides", 3]), ("max-autotune-no-cudagraphs", 32, ["--measure-sides", 2]),
                ("reduce-overhead", 4, ["--measure-sides", 1])]
    for mode, micro_batch, extra in settings:
        path = work / f"recipe-{mode}-{micro_batch}.json"
        cxr_fast(["bench", "recipe", "--model", size["model"], "--image-size", size["side"], "--progressive",
                  size["side"] // 2, "--batch-size", micro_batch, "--compile", "--compile-mode", mode,
                  "--steps", size["recipe_steps"], "--gpus", 8, "--json", path, *extra], timeout=480)
        result = json.loads(path.read_text())
        record("recipe", **{k: v for k, v in result.items() if k != "machine"})


def real_run(shards: dict, size: dict, record: Recorder, work: Path) -> None:
    """`cxr-fast train` with a GPU user's defaults across a change of side, cold then warm compile cache."""
    config = work / "run.yaml"
    config.write_text(f"optim:\n  progressive: {size['side'] // 2}\n  progressive_final_epochs: 1\n")
    cache = work / "inductor-cache"
    for attempt in ("cold cache", "warm cache"):
        out = work / f"run-{attempt.split()[0]}"
        started = time.perf_counter()
        cxr_fast(["train", "--shards", shards["jpeg"], "--out", out, "--overwrite", "--config", config, "--model",
                  size["model"], "--no-pretrained", "--image-size", size["side"], "--epochs", 3, "--compile-cache",
                  cache, "--workers", size["workers"]] + ([] if CUDA else ["--compile"]), timeout=480)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            record("run", attempt=attempt, wall_seconds=time.perf_counter() - started, expected_graphs=3,
                   **{k: r.get(k) for k in ("epoch", "image_side", "train_images_per_second", "data_wait_fraction",
                                            "compile_seconds", "compiled_graphs", "warmup_steps",
                                            "peak_gpu_memory_gib", "val_images")})


SIZES = {
    "gpu": {"model": "convnext_large", "side": 512, "source": 1024, "images": 2048, "workers": 16,
            "micro_batch": 32, "profile_steps": 4, "loader_sides": (256, 512), "loader_batches": 60,
            "recipe_steps": 6},
    "rehearse": {"model": "convnext_atto", "side": 64, "source": 128, "images": 160, "workers": 2,
                 "micro_batch": 4, "profile_steps": 2, "loader_sides": (32, 64), "loader_batches": 4,
                 "recipe_steps": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the JSON-lines file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpucheck"))
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated steps to run (data always runs)")
    parser.add_argument("--profile", choices=("eager", "compiled"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size = SIZES["rehearse" if args.rehearse else "gpu"]
    if args.profile:
        print(json.dumps(profile_steps(args.profile == "compiled", size)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = Recorder(args.out)
    record("machine", **machine(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    only = set(filter(None, args.only.split(",")))

    def step(name, fn, *fn_args):
        if only and name not in only | {"data"}:
            return None
        started = time.perf_counter()
        try:
            return fn(*fn_args)
        except Exception as error:  # a broken step must not cost the later ones
            detail = getattr(error, "stderr", "") or ""
            record(name, error=f"{type(error).__name__}: {error}"[:1500], stderr=detail[-3000:],
                   traceback=traceback.format_exc()[-2000:])
            return None
        finally:
            print(f"== {name}: {time.perf_counter() - started:.1f} s", flush=True)

    shards = step("data", make_data, args.work, size, record)
    if shards is None:
        return
    step("slowdown", slowdown, shards, args.work, size, record)
    step("profile", profiles, size, record, args.rehearse)
    step("loader", loaders, shards, size, record, args.work)
    step("recipe", recipes, size, record, args.work)
    step("run", real_run, shards, size, record, args.work)


if __name__ == "__main__":
    main()
