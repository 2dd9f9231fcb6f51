"""Bytes per image and CPU cost per image of each stored encoding (the registry of `data/shards/sample.py`), on the
reference images of ../shared/data, one core (OpenCV single-threaded), all encodings in one run: what an encoding
costs the disk and the CPU before any loader runs. Decoding is checked against the source (lossless ones exactly).

    .venv/bin/python benchmarks/encoding_costs.py --out benchmarks/results/cpu-2core-encoding-costs.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from cxr_fast.bench.machine import machine
from cxr_fast.data.shards.sample import ENCODINGS, decode_image

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-sample" / "images"


def measure(grays: list[np.ndarray], name: str, quality: int = 95) -> dict:
    encoding = ENCODINGS[name]
    started = time.perf_counter()
    samples = [encoding.encode(gray, quality) for gray in grays]
    encode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    decoded = [decode_image(sample) for sample in samples]
    decode_seconds = time.perf_counter() - started
    errors = [np.abs(d.astype(float) - g).mean() for d, g in zip(decoded, grays)]
    return {"encoding": name, "ext": encoding.ext, "lossless": encoding.lossless, "images": len(grays),
            "bytes_per_image": float(np.mean([len(s[encoding.ext]) for s in samples])),
            "encode_ms_per_image": 1000 * encode_seconds / len(grays),
            "decode_ms_per_image": 1000 * decode_seconds / len(grays), "mean_abs_error": float(np.mean(errors)),
            "pixel_identical": all(e == 0 for e in errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    grays = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(IMAGES.glob("*.png"))[:args.images]]
    rows = [measure(grays, name) for name in ENCODINGS]
    png = next(r for r in rows if r["encoding"] == "png")
    for row in rows:
        row["bytes_vs_png"] = row["bytes_per_image"] / png["bytes_per_image"]
        row["decode_vs_png"] = row["decode_ms_per_image"] / png["decode_ms_per_image"]
    args.out.write_text(json.dumps({"machine": machine(), "source": "NIH ChestX-ray14 sample, 1024 x 1024 8-bit PNG",
                                    "rows": rows}, indent=1))
    print("| encoding | lossless | bytes/image | vs png | encode ms | decode ms | decode vs png | identical |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['encoding']} | {r['lossless']} | {r['bytes_per_image'] / 1e3:.0f} kB | {r['bytes_vs_png']:.2f} | "
              f"{r['encode_ms_per_image']:.1f} | {r['decode_ms_per_image']:.1f} | {r['decode_vs_png']:.2f} | "
              f"{r['pixel_identical']} |")


if __name__ == "__main__":
    main()
