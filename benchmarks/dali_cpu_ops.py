"""Where the DALI CPU pipeline spends its time: images/s after each operator is added, on the real NIH sample,
next to OpenCV doing the same step on one core. Explains the dali-cpu vs torch gap in RESULTS.md.

    .venv/bin/python benchmarks/dali_cpu_ops.py --out benchmarks/results/cpu-2core-dali-ops.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
from nvidia.dali import fn, pipeline_def, types

from cxr_fast.bench.machine import machine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-sample" / "images"
STAGES = ["decode", "resize", "clahe", "warp_affine", "brightness_contrast", "noise", "normalize"]


def dali_rate(files: list[str], upto: int, batch: int = 16, runs: int = 6) -> float:
    @pipeline_def(batch_size=batch, num_threads=os.cpu_count(), device_id=None, exec_dynamic=True, seed=1)
    def pipe():
        encoded, _ = fn.readers.file(files=files)
        x = fn.decoders.image(encoded, output_type=types.GRAY)
        steps = [
            lambda x: fn.resize(x, size=[512, 512], interp_type=types.INTERP_CUBIC, antialias=True),
            lambda x: fn.clahe(x, tiles_x=8, tiles_y=8, clip_limit=2.0),
            lambda x: fn.warp_affine(x, matrix=fn.transforms.rotation(angle=fn.random.uniform(range=[-7, 7]),
                                                                      center=[256, 256]), inverse_map=False,
                                     fill_value=0),
            lambda x: fn.brightness_contrast(x, brightness=fn.random.uniform(range=[0.9, 1.1]), contrast=1.05),
            lambda x: fn.noise.gaussian(x, stddev=4.0),
            lambda x: fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="HWC", mean=[114.5],
                                               std=[57.6]),
        ]
        for step in steps[:upto]:
            x = step(x)
        return x

    p = pipe()
    p.build()
    p.run()
    started = time.perf_counter()
    for _ in range(runs):
        p.run()
    return batch * runs / (time.perf_counter() - started)


def opencv_ms(files: list[str]) -> dict[str, float]:
    """Milliseconds per image of each step in OpenCV/numpy on one core."""
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    data = [Path(f).read_bytes() for f in files[:32]]
    times = dict.fromkeys(STAGES, 0.0)
    clahe = cv2.createCLAHE(2.0, (8, 8))
    for blob in data:
        t = time.perf_counter()
        x = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_GRAYSCALE)
        marks = [time.perf_counter()]
        x = cv2.resize(x, (512, 512), interpolation=cv2.INTER_AREA)
        marks.append(time.perf_counter())
        x = clahe.apply(x)
        marks.append(time.perf_counter())
        x = cv2.warpAffine(x, cv2.getRotationMatrix2D((256, 256), 5.0, 1.0), (512, 512), borderValue=0)
        marks.append(time.perf_counter())
        y = np.clip(1.05 * (128 + 1.05 * (x.astype(np.float32) - 128)), 0, 255)
        marks.append(time.perf_counter())
        y = np.clip(y + rng.normal(0, 4.0, y.shape), 0, 255).astype(np.uint8)
        marks.append(time.perf_counter())
        _ = (y.astype(np.float32) - 114.5) / 57.6
        marks.append(time.perf_counter())
        previous = t
        for stage, mark in zip(STAGES, marks):
            times[stage] += mark - previous
            previous = mark
    return {k: 1000 * v / len(data) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    files = sorted(glob.glob(str(DATA / "*.png")))[:96]
    rates = [dali_rate(files, upto) for upto in range(len(STAGES))]
    cores = os.cpu_count()
    rows = []
    reference = opencv_ms(files)
    for i, stage in enumerate(STAGES):
        dali_ms = cores * 1000 * (1 / rates[i] - (1 / rates[i - 1] if i else 0))  # core-ms per image
        rows.append({"stage": stage, "dali_images_per_second_cumulative": rates[i], "dali_core_ms_per_image": dali_ms,
                     "opencv_core_ms_per_image": reference[stage]})
        print(f"{stage:20s} DALI cumulative {rates[i]:6.1f} img/s, +{dali_ms:5.1f} core-ms/img; "
              f"OpenCV {reference[stage]:5.1f} ms/img", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "stages": rows}, indent=1))


if __name__ == "__main__":
    main()
