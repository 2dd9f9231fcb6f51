"""Throughput measurements: warm-up, then measured loops with synchronised timers; JSON results with the settings
and the machine that produced them. Ratios are only meaningful between results of one run on one machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from cxr_fast.config import DataConfig, ModelConfig
from cxr_fast.data.codec import decode_image
from cxr_fast.data.loader import create_loader, resolve_backend
from cxr_fast.data.reader import iter_samples, load_manifest, split_shards
from cxr_fast.errors import CxrFastError

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; others via --peak-tflops.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def machine() -> dict:
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "opencv": cv2.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all cores), from /proc/stat, in seconds."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_forever(loader):
    """The batches of one loader object, epoch after epoch (DALI's iterator resets, DataLoader workers persist)."""
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            raise CxrFastError("the loader produced no batch")


def bench_loader(shards_dir, split: str = "train", backend: str = "auto", batch_size: int = 32, batches: int = 50,
                 warmup: int = 10, image_size: int = 512, workers: int | None = None, augment: bool = True,
                 dali_cpu: bool = False) -> dict:
    """Steady-state images/s of one loader doing the full work (decode → resize → CLAHE → augment → normalised
    channels-last batches on the target device) and the CPU time it costs per image (all cores of the machine).

    One loader object serves every epoch; its build and the first `warmup` batches (prefetch fill) are outside
    the timed window."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = resolve_backend(backend, device)
    workers = workers or os.cpu_count()
    cfg = DataConfig(image_size=image_size, workers=workers)
    started = time.perf_counter()
    loader = create_loader(resolved, shards_dir, split, cfg, batch_size=batch_size, train=augment, device=device,
                           dali_cpu=dali_cpu)
    stream = batches_forever(loader)
    for _ in range(warmup):
        next(stream)
    _sync(device)
    build_seconds = time.perf_counter() - started
    busy, started = cpu_busy_seconds(), time.perf_counter()
    images = 0
    for _ in range(batches):
        images += len(next(stream).keys)
    _sync(device)
    seconds = time.perf_counter() - started
    cpu_seconds = cpu_busy_seconds() - busy
    manifest = load_manifest(shards_dir)
    on = "cpu" if resolved == "torch" or dali_cpu or device.type != "cuda" else "gpu"
    return {"kind": "loader", "backend": backend, "resolved": f"{resolved}-{on}" if resolved == "dali" else resolved,
            "images_per_second": images / seconds, "cpu_core_ms_per_image": 1000 * cpu_seconds / images,
            "cpu_cores_busy": cpu_seconds / seconds, "images": images, "seconds": seconds,
            "build_and_warmup_seconds": build_seconds, "batch_size": batch_size, "workers": workers,
            "image_size": image_size, "augment": augment, "split": split, "split_images": loader.batches,
            "encoding": manifest["config"]["encoding"], "stored_size": manifest["config"]["resize"],
            "device": str(device), "machine": machine()}


def bench_decode(shards_dir, split: str, samples: int = 64) -> dict:
    """The decode-bound limit of an encoding: images/s of decoding alone on one core (OpenCV, one thread)."""
    payloads = []
    for tar in split_shards(shards_dir, split):
        for _key, sample in iter_samples(tar):
            payloads.append(sample)
            if len(payloads) == samples:
                break
        if len(payloads) == samples:
            break
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        decode_image(payloads[0])
        started = time.perf_counter()
        for sample in payloads:
            decode_image(sample)
        seconds = time.perf_counter() - started
    finally:
        cv2.setNumThreads(threads)
    sizes = [len(s.get("png") or s.get("jpg") or s.get("raw")) for s in payloads]
    return {"kind": "decode", "images_per_second_per_core": len(payloads) / seconds,
            "decode_bound_images_per_second": len(payloads) / seconds * os.cpu_count(),
            "bytes_per_image": float(np.mean(sizes)), "machine": machine()}


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_kwargs) -> int:
    """Each gradient asked for (input, weight) costs what the forward convolution costs. `w_shape` is
    (C_out, C_in / groups, kh, kw), so this honours groups; torch's own formula counts the weight gradient of a
    depthwise convolution as a dense one, once per channel (ConvNeXt: about 3x the true training FLOPs)."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def training_flops_per_image(model: torch.nn.Module, in_chans: int, image_size: int, device: torch.device) -> dict:
    """Forward and forward + backward FLOPs of one image (counted on a batch of 2), with the grouped-convolution
    backward counted right; `torch_counted` is what torch.utils.flop_counter says unpatched, for comparison."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    x = torch.randn(2, in_chans, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    counts = {}
    for name, mapping in (("corrected", {aten.convolution_backward: _conv_backward_flop}), ("torch", {})):
        forward_counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with forward_counter:
            out = model(x)
        backward_counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with backward_counter:
            out.sum().backward()
        model.zero_grad(set_to_none=True)
        counts[name] = (forward_counter.get_total_flops() / 2, backward_counter.get_total_flops() / 2)
    forward, backward = counts["corrected"]
    return {"forward_flops_per_image": forward, "flops_per_image": forward + backward,
            "torch_counted_flops_per_image": sum(counts["torch"])}


def bench_train(shards_dir, model_name: str, image_size: int, batch_size: int, steps: int, warmup: int = 3,
                amp: str = "auto", channels_last: bool = True, compile: bool = False, in_chans: int = 1,
                data: str = "synthetic", workers: int | None = None, peak_tflops: float | None = None) -> dict:
    """Training images/s, with synthetic on-device inputs (the compute ceiling) or a real loader; the share of step
    time spent waiting for data; MFU from counted FLOPs against the device's peak."""
    from cxr_fast.training.engine import autocast, resolve_amp
    from cxr_fast.training.losses import FocalLoss
    from cxr_fast.training.model import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(ModelConfig(name=model_name, pretrained=False, channels_last=channels_last),
                         in_chans=in_chans).to(device)
    flops = training_flops_per_image(model, in_chans, image_size, device)["flops_per_image"]
    step_model = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp_dtype = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = FocalLoss(2.0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if data == "synthetic":
        x = torch.randn(batch_size, in_chans, image_size, image_size, device=device).contiguous(memory_format=layout)
        y = (torch.rand(batch_size, 14, device=device) > 0.9).float()
        stream = iter(lambda: (x, y), None)
    else:
        cfg = DataConfig(image_size=image_size, in_chans=in_chans, workers=workers or os.cpu_count())
        batches = batches_forever(create_loader(data, shards_dir, "train", cfg, batch_size=batch_size, train=True,
                                                device=device))
        stream = ((b.images.contiguous(memory_format=layout), b.targets) for b in batches)

    wait = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            started, wait = time.perf_counter(), 0.0
        # Data wait: the time next() blocks once the previous step's GPU work is done (not that work itself).
        _sync(device)
        before = time.perf_counter()
        x, y = next(stream)
        _sync(device)
        wait += time.perf_counter() - before
        with autocast(device, amp_dtype):
            logits = step_model(x)
        scaler.scale(loss_fn(logits, y)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - started
    rate = steps * batch_size / seconds
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device)
    return {"kind": "train", "model": model_name, "data": data, "images_per_second": rate,
            "data_wait_fraction": wait / seconds, "flops_per_image": flops,
            "mfu": rate * flops / peak if peak else None, "peak_flops": peak, "batch_size": batch_size,
            "image_size": image_size, "amp": str(amp_dtype), "channels_last": channels_last, "compile": compile,
            "in_chans": in_chans, "steps": steps, "device": str(device), "machine": machine()}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (FLOP/s) from PEAK_FLOPS, or None where it is not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


def write_json(result: dict, path: str | Path | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
