"""The GPU measurements of tools/gpu_check.sh (round 3), in parts ordered by value, packed into two calls of at most
9 minutes each on one H100/H200. Each part prints its GPU estimate before it runs and is skipped, with a record
saying so, when the estimate no longer fits the call's time left; every part's subprocess gets that time as its
limit. One JSON line per measurement goes to --out as it is made (a cut-off call keeps what it measured); work
files (images, shards, checkpoints, compile caches) go to a temporary folder outside $OUT, removed at the end.

  call 1   data, profile, fastnorm, slowdown, loader
  call 2   data, recipe, run

  data      synthetic images, sharded as jpeg, png, png resized to the full side, raw and lossless JPEG 2000
  profile   the kernel profile (bench/profile.py) of ConvNeXt-L 512 at 32 x 1, eager and compiled, one process each
  fastnorm  `bench train` eager at 32 x 1 for 20 steps, LayerNorm in float32 (default) and in bf16 (--fast-norm)
  slowdown  `cxr-fast train --batch-size 4` (4 x 8) for 2 epochs: cuDNN autotuning on, off, and compiled with
            reduce-overhead (CUDA graphs), one process each
  loader    `bench loader` (DALI on the GPU) at 256 and 512 on each encoding, a window of at least 3 s
  recipe    `bench recipe`, compiled, --measure-sides 3, 25 epochs 256 -> 512, projected for 1 and 8 GPUs
  run       `cxr-fast train`, compiled, progressive 256 -> 384 -> 512 over 3 epochs, from an empty compile cache
            and again from the one it filled (the cache folder is checked for files)

Every compared setting runs in a process of its own (cuDNN's plan cache ignores the `benchmark` flag; compiled graphs
stay in a process). --rehearse runs every part on the CPU with a tiny model and a few images, and prints the GPU
estimates all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_fast.bench.machine import machine  # noqa: E402
from cxr_fast.config import ShardConfig, SynthConfig  # noqa: E402
from cxr_fast.data.synth import write_synthetic_dataset  # noqa: E402
from cxr_fast.data.shards.writer import ShardInput, write_shards  # noqa: E402

CUDA = torch.cuda.is_available()
CALL_SECONDS = 510  # a call of 540 s on the device machine, less the DALI bundle's extraction and the imports
# GPU seconds per part on one H200 (16 cores), from the round-1 records: a process start with ConvNeXt-L ~15 s,
# a cold compile ~40 s per graph (8 s warm), 236 images/s compiled at 512 (~600 at 256), 189 eager, 44-80 at 4 x 8,
# a DALI pipeline ~2 s, a 2.4 GB checkpoint ~3 s.
ESTIMATES = {"data": 60, "profile": 90, "fastnorm": 40, "slowdown": 180, "loader": 120, "recipe": 180, "run": 270}
CALLS = {1: ("data", "profile", "fastnorm", "slowdown", "loader"), 2: ("data", "recipe", "run")}
SIZES = {
    "gpu": {"model": "convnext_large", "side": 512, "source": 1024, "images": 1024, "workers": 16,
            "micro_batch": 32, "profile_steps": 4, "fastnorm_steps": 20, "loader_sides": (256, 512),
            "loader_seconds": 3.0, "recipe_steps": 6, "recipe_sides": 3},
    "rehearse": {"model": "convnext_atto", "side": 64, "source": 128, "images": 160, "workers": 2,
                 "micro_batch": 4, "profile_steps": 2, "fastnorm_steps": 2, "loader_sides": (32, 64),
                 "loader_seconds": 0.5, "recipe_steps": 1, "recipe_sides": 2},
}
ENCODINGS = {"jpeg": {"encoding": "jpeg"}, "png": {"encoding": "png"}, "png-resized": {"encoding": "png"},
             "raw": {"encoding": "raw"}, "j2k": {"encoding": "j2k"}}


class Recorder:
    def __init__(self, path: Path):
        self.path, self.gpu = path, torch.cuda.get_device_name() if CUDA else None

    def __call__(self, step: str, **fields) -> None:
        line = json.dumps({"step": step, "gpu": self.gpu, **fields}, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line[:400], flush=True)


class Clock:
    """The call's time left; each subprocess gets it as its limit."""

    def __init__(self, budget: float):
        self.started, self.budget = time.perf_counter(), budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)


class Probe:
    def __init__(self, size: dict, work: Path, record: Recorder, clock: Clock):
        self.size, self.work, self.record, self.clock = size, work, record, clock
        self.shards: dict[str, Path] = {}

    def process(self, argv: list, cache: str) -> subprocess.CompletedProcess:
        """A command in a process of its own, with a compile cache of its own name below the work folder, limited
        to the call's time left."""
        env = dict(os.environ, XDG_CACHE_HOME=str(self.work / "cache" / cache))
        return subprocess.run(list(map(str, argv)), capture_output=True, text=True,
                              timeout=max(1.0, self.clock.left()), check=True, env=env)

    def cxr_fast(self, args: list, cache: str) -> subprocess.CompletedProcess:
        return self.process([sys.executable, "-m", "cxr_fast", *args], cache)

    def data(self) -> None:
        size, started = self.size, time.perf_counter()
        table = write_synthetic_dataset(self.work / "synth", SynthConfig(
            n_images=size["images"], source_size=size["source"], workers=size["workers"]))
        for name, settings in ENCODINGS.items():
            resize = {"resize": size["side"]} if name == "png-resized" else {}
            self.shards[name] = self.work / f"shards-{name}"
            write_shards(ShardInput(self.work / "synth", table), ShardConfig(
                out=str(self.shards[name]), shard_size=256, workers=size["workers"], **settings, **resize))
        self.record("data", images=size["images"], source_size=size["source"], seconds=time.perf_counter() - started,
                    encodings=sorted(self.shards))

    def profile(self) -> None:
        for compiled in (False, True):
            args = [sys.executable, __file__, "--profile", "compiled" if compiled else "eager"]
            args += ["--rehearse"] if self.size is SIZES["rehearse"] else []
            done = self.process(args, cache=f"profile-{compiled}")
            self.record("profile", model=self.size["model"], image_size=self.size["side"],
                        micro_batch=self.size["micro_batch"], compiled=compiled,
                        **json.loads(done.stdout.splitlines()[-1]))

    def fastnorm(self) -> None:
        size = self.size
        for flag in ("--no-fast-norm", "--fast-norm"):
            path = self.work / f"fastnorm{flag}.json"
            self.cxr_fast(["bench", "train", "--model", size["model"], "--image-size", size["side"], "--batch-size",
                           size["micro_batch"], "--steps", size["fastnorm_steps"], "--warmup", 3, "--no-compile", flag,
                           "--json", path], cache="fastnorm")
            self.record("fastnorm", setting=flag, **_without_machine(json.loads(path.read_text())))

    def slowdown(self) -> None:
        """4 x 8 for two epochs, one process per setting: epoch 1 against epoch 2, every part of each epoch."""
        size = self.size
        settings = {"cudnn-benchmark": ["--cudnn-benchmark", "--no-compile"],
                    "no-cudnn-benchmark": ["--no-cudnn-benchmark", "--no-compile"],
                    "reduce-overhead": ["--cudnn-benchmark", "--compile", "--compile-mode", "reduce-overhead"]}
        for name, flags in settings.items():
            out = self.work / f"slowdown-{name}"
            started = time.perf_counter()
            self.cxr_fast(["train", "--shards", self.shards["jpeg"], "--out", out, "--overwrite", "--model",
                           size["model"], "--no-pretrained", "--image-size", size["side"], "--batch-size", 4,
                           "--effective-batch", 32, "--epochs", 2, "--workers", size["workers"], *flags],
                          cache=f"slowdown-{name}")
            for record in _metrics(out):
                self.record("slowdown", setting=name, micro_batch=4, accum=8,
                            process_seconds=time.perf_counter() - started, **record)

    def loader(self) -> None:
        size = self.size
        for name in self.shards:
            for side in size["loader_sides"]:
                if name == "png-resized" and side != size["side"]:
                    continue
                path = self.work / f"loader-{name}-{side}.json"
                self.cxr_fast(["bench", "loader", "--shards", self.shards[name], "--loader", "dali", "--image-size",
                               side, "--seconds", size["loader_seconds"], "--batches", 20, "--workers",
                               size["workers"], "--json", path], cache="loader")
                self.record("loader", shards=name, **_without_machine(json.loads(path.read_text())))

    def recipe(self) -> None:
        size = self.size
        path = self.work / "recipe.json"
        self.cxr_fast(["bench", "recipe", "--model", size["model"], "--image-size", size["side"], "--progressive",
                       size["side"] // 2, "--batch-size", size["micro_batch"], "--compile", "--steps",
                       size["recipe_steps"], "--measure-sides", size["recipe_sides"], "--gpus", 8, "--json", path],
                      cache="recipe")
        self.record("recipe", **_without_machine(json.loads(path.read_text())))

    def run(self) -> None:
        """A GPU user's run across two changes of side, from an empty compile cache, then from the one it filled."""
        size = self.size
        config = self.work / "run.yaml"
        config.write_text(f"optim:\n  progressive: {size['side'] // 2}\n  progressive_final_epochs: 1\n")
        cache = self.work / "run-inductor-cache"
        for attempt in ("cold", "warm"):
            out = self.work / f"run-{attempt}"
            files_before = _files(cache)
            started = time.perf_counter()
            self.cxr_fast(["train", "--shards", self.shards["jpeg"], "--out", out, "--overwrite", "--config", config,
                           "--model", size["model"], "--no-pretrained", "--image-size", size["side"], "--epochs", 3,
                           "--compile", "--compile-cache", cache, "--workers", size["workers"]], cache="run")
            process_seconds, files_after, records = time.perf_counter() - started, _files(cache), _metrics(out)
            for record in records:
                self.record("run", attempt=attempt, cache_files_before=files_before, cache_files_after=files_after,
                            process_seconds=process_seconds, expected_graphs=_expected_graphs(records, record),
                            **record)


def _without_machine(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "machine"}


def _metrics(run: Path) -> list[dict]:
    keep = ("epoch", "image_side", "train_images_per_second", "data_wait_fraction", "timed_images", "timed_seconds",
            "timed_steps", "warmup_steps", "train_images", "compile_seconds", "compiled_graphs", "mfu",
            "peak_gpu_memory_gib", "val_images", "epoch_seconds", "seconds", "unaccounted_seconds", "train_loss")
    return [{k: r.get(k) for k in keep} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _expected_graphs(records: list[dict], record: dict) -> int:
    """Compiled graphs after this epoch: one per training side so far, and one for evaluation once validated."""
    done = [r for r in records if r["epoch"] <= record["epoch"]]
    return len({r["image_side"] for r in done}) + any(r.get("val_images") for r in done)


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def plan(parts: list[str]) -> str:
    """The estimate per part and in all, and of each call, printed before anything runs."""
    rows = [f"  {name:<9} {ESTIMATES[name]:>4} s" for name in parts]
    calls = ", ".join(f"call {call} {sum(ESTIMATES[p] for p in names)} s" for call, names in CALLS.items())
    return "\n".join(["GPU estimate (one H200):", *rows, f"  {'total':<9} {sum(ESTIMATES[n] for n in parts):>4} s "
                      f"({calls}; at most {CALL_SECONDS} s a call)"])


def run_parts(probe: Probe, parts: list[str], rehearse: bool) -> None:
    record, clock = probe.record, probe.clock
    for name in parts:
        if not rehearse and ESTIMATES[name] > clock.left():
            record(name, skipped=f"its estimate, {ESTIMATES[name]} s, exceeds the {clock.left():.0f} s left")
            continue
        print(f"== {name}: estimate {ESTIMATES[name]} s on the GPU; {clock.left():.0f} s left", flush=True)
        started = time.perf_counter()
        try:
            getattr(probe, name)()
        except Exception as error:  # a broken part must not cost the later ones
            detail = getattr(error, "stderr", "") or ""
            record(name, error=f"{type(error).__name__}: {error}"[:1500], stderr=str(detail)[-3000:],
                   traceback=traceback.format_exc()[-2000:])
            if name == "data":
                return
        finally:
            print(f"== {name}: {time.perf_counter() - started:.1f} s", flush=True)


def parse_parts(args) -> list[str]:
    parts = list(CALLS[args.call]) if args.call else [p for call in (1, 2) for p in CALLS[call] if p != "data"]
    if args.only:
        asked = [p.strip() for p in args.only.split(",") if p.strip()]
        unknown = [p for p in asked if p not in ESTIMATES]
        if unknown:
            raise SystemExit(f"Error: unknown part(s) {', '.join(unknown)}; the parts are {', '.join(ESTIMATES)}")
        parts = [p for p in ESTIMATES if p in asked]
    return (["data"] if parts and parts[0] != "data" else []) + parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the JSON-lines file")
    parser.add_argument("--call", type=int, choices=(1, 2), help="the parts of call 1 or 2 (default: all)")
    parser.add_argument("--only", default="", help="comma-separated parts (data always runs first)")
    parser.add_argument("--budget", type=float, help=f"seconds this call may take (default {CALL_SECONDS}; "
                        "a rehearsal: an hour, and no part is skipped)")
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--profile", choices=("eager", "compiled"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size = SIZES["rehearse" if args.rehearse else "gpu"]
    args.budget = args.budget or (3600 if args.rehearse else CALL_SECONDS)
    if args.profile:
        print(json.dumps(_profile_child(args.profile == "compiled", size)))
        return
    parts = parse_parts(args)
    print(plan(parts), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = Recorder(args.out)
    record("machine", **machine(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), parts=parts,
           estimates={p: ESTIMATES[p] for p in parts}, budget_seconds=args.budget, rehearse=args.rehearse)
    work = Path(tempfile.mkdtemp(prefix="cxr-fast-gpu-check-"))
    try:
        run_parts(Probe(size, work, record, Clock(args.budget)), parts, args.rehearse)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _profile_child(compiled: bool, size: dict) -> dict:
    from cxr_fast.bench.profile import profile_training
    from cxr_fast.config import RunConfig, replace

    run = replace(RunConfig(), **{"model.name": size["model"], "model.pretrained": False, "model.compile": compiled,
                                  "data.image_size": size["side"], "optim.batch_size": size["micro_batch"],
                                  "optim.accum": 1, "optim.effective_batch": size["micro_batch"]})
    return profile_training(run, size["profile_steps"])


if __name__ == "__main__":
    main()
