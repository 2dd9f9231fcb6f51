"""Render the markdown tables of RESULTS.md from a result JSON of benchmarks/encodings.py.

    .venv/bin/python benchmarks/summarize.py benchmarks/results/cpu-2core-encodings.json
"""

import json
import sys


def main(path: str) -> None:
    results = json.loads(open(path).read())
    m = results["machine"]
    print(f"Machine: {m['host']}, {m['cpu_count']} cores ({m['cpu']}), {m.get('gpu', 'no GPU')}; torch {m['torch']}, "
          f"DALI {m['dali']}, OpenCV {m['opencv']}; {m['date']}.\n")
    backends = list(results["variants"][0]["loaders"])
    print("| encoding | stored | bytes/image | fidelity (MAD vs lossless) | decode alone, img/s/core | decode-bound "
          "limit, img/s | " + " | ".join(f"{b} img/s (cores busy)" for b in backends) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(backends))
    for row in results["variants"]:
        loaders = " | ".join(f"{row['loaders'][b]['images_per_second']:.1f} ({row['loaders'][b]['cpu_cores_busy']:.1f})"
                             for b in backends)
        print(f"| {row['encoding']} | {row['stored_size']} | {row['bytes_per_image'] / 1e3:.0f} kB | "
              f"{row['fidelity_mad_vs_lossless']:.2f} | {row['decode']['images_per_second_per_core']:.0f} | "
              f"{row['decode']['decode_bound_images_per_second']:.0f} | {loaders} |")
    print("\n| shard writers | images/s (png, 400 real images) |\n|---:|---:|")
    for row in results["sharding"]:
        print(f"| {row['workers']} | {row['images_per_second']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
