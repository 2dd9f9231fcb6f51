"""The GPU measurements of tools/gpu_check.sh, in one process: one JSON line per measurement, appended and flushed as
it is made, most valuable first, so a run cut off by its time limit keeps everything it measured.

  1. fidelity  DALI on the GPU vs DALI on the CPU vs the OpenCV reference, augmentation off, PNG and JPEG shards.
  2. model     ConvNeXt-Large at 512, bf16, channels-last, eager: a micro-batch sweep (images/s, step time, peak
               memory, MFU from grouped-conv-correct FLOPs); one host sync per micro-batch; fused AdamW;
               cudnn.benchmark.
  3. loader    the DALI GPU pipeline (PNG, JPEG, JPEG with hw_decoder_load 0.95) and the torch baseline, the same
               thread/worker count, steady state: images/s and CPU core-ms per image.
  4. fed       the trainer fed by the DALI GPU loader (data wait per micro-batch) at 4 x 8 and the best.
     train     `cxr-fast train` itself for one epoch, at --batch-size auto and at the seed's 4 (x 8).
     cli       `cxr-fast bench loader --loader auto` and `cxr-fast bench train` as shipped.
  5. compile   torch.compile at the best micro-batch: compile seconds and images/s.
     engine    the trainer's engine on on-device batches at 4 x 8 and 32 x 1, cudnn.benchmark and fused AdamW each
               on and off (`--only engine`: separates those two from the loader).

--rehearse runs every step on the CPU with a tiny model and a few images (DALI's GPU variants are skipped there).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_fast import constants as C  # noqa: E402
from cxr_fast.bench import (batches_forever, cpu_busy_seconds, machine, peak_flops,  # noqa: E402
                            training_flops_per_image)
from cxr_fast.config import (AugmentConfig, DataConfig, ModelConfig, RunConfig, ShardConfig, SynthConfig,  # noqa: E402
                             replace)
from cxr_fast.data.sample import decode_image  # noqa: E402
from cxr_fast.data.loader import LoaderSpec, create_loader  # noqa: E402
from cxr_fast.data.reader import split_shards  # noqa: E402
from cxr_fast.data.tario import walk_tar  # noqa: E402
from cxr_fast.data.synth import write_synthetic_dataset  # noqa: E402
from cxr_fast.data.transforms import process_gray  # noqa: E402
from cxr_fast.data.writer import write_shards  # noqa: E402
from cxr_fast.training.losses import FocalLoss  # noqa: E402
from cxr_fast.training.model import create_model  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NO_AUGMENT = AugmentConfig(affine_prob=0.0, brightness_contrast_prob=0.0, noise_prob=0.0, hflip_prob=0.0)


class Recorder:
    def __init__(self, path: Path):
        self.path, self.gpu = path, torch.cuda.get_device_name() if CUDA else None

    def __call__(self, step: str, **fields) -> None:
        record = {"step": step, "gpu": self.gpu, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")
        print(json.dumps(record, default=_plain), flush=True)


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if CUDA else None


# ------------------------------------------------------------------------------------------------------------ data
def make_data(work: Path, n_images: int, source_size: int, workers: int, record: Recorder) -> dict[str, Path]:
    started = time.perf_counter()
    table = write_synthetic_dataset(work / "synth", SynthConfig(n_images=n_images, source_size=source_size),
                                    workers=workers)
    shards = {}
    for encoding in ("png", "jpeg"):
        shards[encoding] = work / f"shards-{encoding}"
        write_shards(work / "synth", table, ShardConfig(out=str(shards[encoding]), encoding=encoding, shard_size=256))
    record("data", images=n_images, source_size=source_size, seconds=time.perf_counter() - started,
           shards={k: str(v) for k, v in shards.items()})
    return shards


# -------------------------------------------------------------------------------------------------------- fidelity
def fidelity(shards: dict[str, Path], image_size: int, n: int, record: Recorder) -> None:
    """Mean absolute difference (gray levels, 0-255) after CLAHE, augmentation off, on the first n test images."""
    cfg = DataConfig(image_size=image_size, augment=NO_AUGMENT, workers=4)
    for encoding, shards_dir in shards.items():
        reference = {}
        for tar in split_shards(shards_dir, "test"):
            for key, sample in walk_tar(tar):
                if len(reference) < n:
                    reference[key] = process_gray(decode_image(sample), cfg)
        outputs = {"opencv": reference}
        variants = [("dali_cpu", True)] + ([("dali_gpu", False)] if CUDA else [])
        for name, dali_cpu in variants:
            loader = create_loader(LoaderSpec(shards_dir, "test", cfg, batch_size=n, train=False, device=DEVICE,
                                              normalize=False, dali_cpu=dali_cpu, loader="dali"))
            batch = next(iter(loader))
            outputs[name] = {k: img[0].cpu().numpy() for k, img in zip(batch.keys, batch.images) if k in reference}
            del loader
        names = list(outputs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                keys = sorted(set(outputs[a]) & set(outputs[b]))
                diff = np.stack([np.abs(outputs[a][k].astype(np.int16) - outputs[b][k].astype(np.int16))
                                 for k in keys])
                record("fidelity", encoding=encoding, pair=f"{a} vs {b}", images=len(keys), image_size=image_size,
                       mad=float(diff.mean()), p99=float(np.percentile(diff, 99)), max=int(diff.max()))


# ----------------------------------------------------------------------------------------------------------- model
def timed_steps(model, optimizer, x, y, accum: int, steps: int, warmup: int, sync_each: bool = False) -> dict:
    """Optimizer steps of `accum` micro-batches (bf16 autocast, focal loss, clipping, AdamW), as the trainer runs them.
    sync_each: read the loss on the host every micro-batch (the trainer's finiteness check)."""
    loss_fn = FocalLoss(2.0)
    amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()
    started = last = None
    step_times = []
    for step in range(warmup + steps):
        if step >= warmup - 1:
            _sync()
            now = time.perf_counter()
            if started is None:
                started = now
            else:
                step_times.append(now - last)
            last = now
        for _ in range(accum):
            with amp:
                logits = model(x)
            loss = loss_fn(logits, y)
            if sync_each:
                loss.item()
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    step_times.append(time.perf_counter() - last)
    seconds = time.perf_counter() - started
    images = steps * accum * x.shape[0]
    return {"images_per_second": images / seconds, "step_ms": 1000 * float(np.median(step_times)),
            "seconds": seconds, "steps": steps}


def model_sweep(model_name: str, image_size: int, micro_batches: list[int], steps: int, record: Recorder) -> int:
    """Returns the micro-batch with the highest images/s."""
    model = create_model(ModelConfig(name=model_name, pretrained=False), in_chans=1).to(DEVICE)
    flops = training_flops_per_image(model, 1, image_size, DEVICE)
    peak = peak_flops(DEVICE)
    record("flops", model=model_name, image_size=image_size, **flops, peak_flops=peak)
    per_image = flops["flops_per_image"]

    def measure(label: str, mb: int, accum: int, fused: bool = False, benchmark: bool = False,
                sync_each: bool = False) -> dict | None:
        torch.backends.cudnn.benchmark = benchmark
        _free()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None,
                                      foreach=None if fused else True)
        x = torch.randn(mb, 1, image_size, image_size, device=DEVICE).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(mb, C.NUM_CLASSES, device=DEVICE) > 0.9).float()
        try:
            result = timed_steps(model, optimizer, x, y, accum, steps, warmup=3, sync_each=sync_each)
        except torch.OutOfMemoryError:
            result = None
        finally:
            model.zero_grad(set_to_none=True)
        if result is None:
            optimizer = x = y = None
            _free()
            record("model", label=label, micro_batch=mb, accum=accum, oom=True)
            return None
        rate = result["images_per_second"]
        row = {"label": label, "model": model_name, "image_size": image_size, "micro_batch": mb, "accum": accum,
               "fused_adamw": fused, "cudnn_benchmark": benchmark, "sync_per_micro_batch": sync_each, **result,
               "peak_memory_gib": _peak_gib(), "mfu": rate * per_image / peak if peak else None}
        record("model", **row)
        return row

    best, best_rate = micro_batches[0], 0.0
    for mb in micro_batches:
        row = measure("sweep", mb, max(1, 32 // mb))
        if row is None:
            break
        if row["images_per_second"] > best_rate:
            best, best_rate = mb, row["images_per_second"]
    small = micro_batches[0]
    measure("host sync per micro-batch", small, max(1, 32 // small), sync_each=True)
    for fused, benchmark in ((True, False), (False, True), (True, True)):
        measure("options", best, max(1, 32 // best), fused=fused, benchmark=benchmark)
    return best


# ---------------------------------------------------------------------------------------------------------- loader
def loader_rate(shards_dir: Path, backend: str, cfg: DataConfig, batch_size: int, seconds: float,
                dali_cpu: bool = False) -> dict:
    """Steady state: one loader object across epochs; build and the first epoch's fill are outside the window."""
    started = time.perf_counter()
    loader = create_loader(LoaderSpec(shards_dir, "train", cfg, batch_size=batch_size, train=True, device=DEVICE,
                                      dali_cpu=dali_cpu, loader=backend))
    build = time.perf_counter() - started

    stream = batches_forever(loader)
    for _ in range(min(len(loader), 8)):
        next(stream)
    _sync()
    busy, started, images = cpu_busy_seconds(), time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        images += len(next(stream).keys)
    _sync()
    elapsed = time.perf_counter() - started
    cores = (cpu_busy_seconds() - busy)
    epoch_batches = len(loader)
    del stream, loader
    return {"images_per_second": images / elapsed, "cpu_core_ms_per_image": 1000 * cores / images,
            "cpu_cores_busy": cores / elapsed, "images": images, "seconds": elapsed, "build_seconds": build,
            "epoch_batches": epoch_batches}


def loaders(shards: dict[str, Path], image_size: int, workers: int, seconds: float, record: Recorder) -> None:
    cfg = DataConfig(image_size=image_size, workers=workers)
    runs = []
    if CUDA:
        runs += [("dali-gpu", "png", cfg), ("dali-gpu", "jpeg", cfg),
                 ("dali-gpu", "jpeg", replace(cfg, hw_decoder_load=0.95))]
    else:
        runs += [("dali-cpu", "png", cfg), ("dali-cpu", "jpeg", cfg)]
    runs += [("torch", "png", cfg), ("torch", "jpeg", cfg)]
    for backend, encoding, run_cfg in runs:
        result = loader_rate(shards[encoding], "torch" if backend == "torch" else "dali", run_cfg, 32, seconds,
                             dali_cpu=backend == "dali-cpu")
        record("loader", backend=backend, encoding=encoding, workers=workers, batch_size=32, image_size=image_size,
               augment=True, hw_decoder_load=run_cfg.hw_decoder_load if backend == "dali-gpu" else None,
               cpu_count=os.cpu_count(), **result)


# ------------------------------------------------------------------------------------------------------------- e2e
def fed_trainer(shards_dir: Path, model_name: str, image_size: int, mb: int, accum: int, workers: int,
                optimizer_steps: int, record: Recorder) -> None:
    """The train step fed by the DALI loader; data wait = time blocked in next() once the GPU queue is drained."""
    _free()
    model = create_model(ModelConfig(name=model_name, pretrained=False), in_chans=1).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = FocalLoss(2.0)
    cfg = DataConfig(image_size=image_size, workers=workers)
    loader = create_loader(LoaderSpec(shards_dir, "train", cfg, batch_size=mb, train=True, device=DEVICE,
                                      loader="dali"))

    stream = batches_forever(loader)
    amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()
    warmup, wait, images = 2, 0.0, 0
    for step in range(warmup + optimizer_steps):
        if step == warmup:
            _sync()
            started, wait, images = time.perf_counter(), 0.0, 0
        for _ in range(accum):
            _sync()
            before = time.perf_counter()
            batch = next(stream)
            _sync()
            wait += time.perf_counter() - before
            with amp:
                logits = model(batch.images)
            (loss_fn(logits, batch.targets) / accum).backward()
            images += len(batch.keys)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    seconds = time.perf_counter() - started
    record("e2e", kind="trainer fed by the DALI loader (sync around next())", model=model_name,
           image_size=image_size, micro_batch=mb, accum=accum, images_per_second=images / seconds,
           data_wait_fraction=wait / seconds, images=images, peak_memory_gib=_peak_gib(), workers=workers)
    del stream, loader, model, optimizer
    _free()


def train_epoch(shards_dir: Path, work: Path, model_name: str, image_size: int, mb, workers: int,
                record: Recorder) -> None:
    """`cxr-fast train` (run_training) for one epoch with the DALI loader: its metrics.jsonl record."""
    import shutil

    import yaml

    from cxr_fast.training.run import run_training

    _free()
    cfg = replace(RunConfig(), loader="auto", amp="bf16" if CUDA else "off", **{
        "model.name": model_name, "model.pretrained": False, "data.image_size": image_size,
        "data.workers": workers, "optim.batch_size": mb, "optim.epochs": 1})
    out = work / f"train-{mb}"
    started = time.perf_counter()
    result = run_training(cfg, shards_dir, out, show_progress=False, overwrite=True)
    resolved = yaml.safe_load((out / "config.yaml").read_text())["optim"]
    record("e2e", kind="cxr-fast train, one epoch (run_training)", model=model_name, image_size=image_size,
           batch_size_flag=mb, micro_batch=resolved["batch_size"], accum=resolved["accum"],
           wall_seconds=time.perf_counter() - started, workers=workers,
           **{k: result.get(k) for k in ("train_images_per_second", "data_wait_fraction", "peak_gpu_memory_gib",
                                          "val_images")})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # ConvNeXt-L checkpoints are 2.4 GB each
    _free()


def cli_benchmarks(shards: dict[str, Path], work: Path, model_name: str, image_size: int, mb: int,
                   record: Recorder) -> None:
    """The shipped commands: `cxr-fast bench loader --loader auto` and `cxr-fast bench train`."""
    import subprocess

    commands = {"bench loader auto png": ["bench", "loader", "--shards", str(shards["png"]), "--loader", "auto",
                                          "--image-size", str(image_size), "--batches", "40"],
                "bench train": ["bench", "train", "--model", model_name, "--image-size", str(image_size),
                                "--batch-size", str(mb), "--steps", "8", "--amp", "bf16" if CUDA else "off"]}
    for name, args in commands.items():
        path = work / (name.replace(" ", "-") + ".json")
        subprocess.run([sys.executable, "-m", "cxr_fast", *args, "--json", str(path)], check=True,
                       capture_output=True, timeout=240)
        result = json.loads(path.read_text())
        record("cli", command=name, **{k: v for k, v in result.items() if k != "machine"})


def engine_options(model_name: str, image_size: int, record: Recorder) -> None:
    """The trainer's own engine (train_one_epoch: one sync per step, input-wait events) on on-device batches, at the
    seed's 4 x 8 and at 32 x 1, with cudnn.benchmark and fused AdamW each on and off."""
    from cxr_fast.data.loader import Batch
    from cxr_fast.training.engine import TrainState, train_one_epoch

    model = create_model(ModelConfig(name=model_name, pretrained=False), in_chans=1).to(DEVICE)
    for mb, accum in ((4, 8), (32, 1)):
        x = torch.randn(mb, 1, image_size, image_size, device=DEVICE).contiguous(memory_format=torch.channels_last)
        batches = [Batch(x, (torch.rand(mb, C.NUM_CLASSES, device=DEVICE) > 0.9).float(), [""] * mb)] * (accum * 8)
        for benchmark, fused in ((False, False), (True, False), (False, True), (True, True)):
            torch.backends.cudnn.benchmark = benchmark
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            state = TrainState(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False),
                               torch.bfloat16 if CUDA else None, accum, 1.0)
            train_one_epoch(state, batches[:accum * 2], FocalLoss(2.0), DEVICE, accum * 2, lambda s: False, False)
            stats = train_one_epoch(state, batches, FocalLoss(2.0), DEVICE, len(batches), lambda s: False, False)
            record("engine", micro_batch=mb, accum=accum, cudnn_benchmark=benchmark, fused_adamw=fused,
                   images_per_second=stats.images / stats.seconds, input_wait_fraction=stats.input_wait_seconds /
                   stats.seconds)


# --------------------------------------------------------------------------------------------------------- compile
def compiled(model_name: str, image_size: int, mb: int, steps: int, record: Recorder) -> None:
    _free()
    torch.backends.cudnn.benchmark = True
    model = create_model(ModelConfig(name=model_name, pretrained=False), in_chans=1).to(DEVICE)
    flops = training_flops_per_image(model, 1, image_size, DEVICE)["flops_per_image"]
    step_model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if CUDA else None)
    x = torch.randn(mb, 1, image_size, image_size, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(mb, C.NUM_CLASSES, device=DEVICE) > 0.9).float()
    accum = max(1, 32 // mb)
    started = time.perf_counter()
    timed_steps(step_model, optimizer, x, y, accum, steps=1, warmup=1)
    compile_seconds = time.perf_counter() - started
    result = timed_steps(step_model, optimizer, x, y, accum, steps, warmup=2)
    peak = peak_flops(DEVICE)
    record("compile", model=model_name, image_size=image_size, micro_batch=mb, accum=accum, fused_adamw=CUDA,
           cudnn_benchmark=True, compile_seconds=compile_seconds, **result, peak_memory_gib=_peak_gib(),
           mfu=result["images_per_second"] * flops / peak if peak else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON-lines file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpucheck"))
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    parser.add_argument("--only", default="", help="comma-separated steps to run (data always runs)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.rehearse:
        model, size, source, n, mbs, steps, workers, window = "convnext_atto", 128, 256, 160, [2, 4], 2, 2, 2.0
    else:
        model, size, source, n, mbs, steps, workers, window = ("convnext_large", 512, 1024, args.images,
                                                              [4, 16, 32, 48, 64], 8, args.workers, 4.0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = Recorder(args.out)
    record("machine", **machine(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    skip = set(filter(None, args.skip.split(",")))
    best = 32 if not args.rehearse else 4

    only = set(filter(None, args.only.split(",")))

    def step(name, fn, *fn_args):
        if name in skip or (only and name not in only | {"data"}):
            return None
        started = time.perf_counter()
        try:
            return fn(*fn_args)
        except Exception as error:  # a broken step must not cost the later ones
            record(name, error=f"{type(error).__name__}: {error}"[:2000], traceback=traceback.format_exc()[-3000:])
            return None
        finally:
            print(f"== {name}: {time.perf_counter() - started:.1f} s", flush=True)

    step("engine", engine_options, model, size, record)
    shards = step("data", make_data, args.work, n, source, max(workers, 2), record) if only != {"engine"} else None
    if shards is None:
        return
    step("fidelity", fidelity, shards, size, 64 if not args.rehearse else 8, record)
    best = step("model", model_sweep, model, size, mbs, steps, record) or best
    step("loader", loaders, shards, size, workers, window, record)
    e2e_steps = 10 if not args.rehearse else 2
    for mb, accum in ((mbs[0] if args.rehearse else 4, 8 if not args.rehearse else 1), (best, max(1, 32 // best))):
        step("fed", fed_trainer, shards["png"], model, size, mb, accum, workers, e2e_steps, record)
    for mb in ("auto", 4) if not args.rehearse else ("auto", 2):
        step("train", train_epoch, shards["png"], args.work, model, size, mb, workers, record)
    step("cli", cli_benchmarks, shards, args.work, model, size, 64 if not args.rehearse else 4, record)
    step("compile", compiled, model, size, best, steps, record)


if __name__ == "__main__":
    main()
