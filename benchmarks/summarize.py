"""Render the markdown tables of RESULTS.md from a result file.

    .venv/bin/python benchmarks/summarize.py benchmarks/results/cpu-2core-encodings.json   # benchmarks/encodings.py
    .venv/bin/python benchmarks/summarize.py benchmarks/results/gpu-h200-check.jsonl       # tools/gpu_check.sh
    .venv/bin/python benchmarks/summarize.py benchmarks/results/gpu-h200-round2.jsonl      # tools/gpu_check.sh, round 2

Every rate is printed beside the images and seconds it was computed from, so each row can be recomputed.
"""

import json
import sys


def encodings(path: str) -> None:
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


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _corrected(record: dict) -> tuple[float, float | None]:
    """(images/s, MFU) of a sweep or compile record. The first probe's timer started one optimizer step early: its
    `seconds` cover steps + 1 steps while its images counted `steps`, so each rate is (steps + 1) / steps of what it
    recorded. Records from the engine-based probe carry `timed_steps` and are exact as written."""
    if "timed_steps" in record:
        return record["images_per_second"], record.get("mfu")
    factor = (record["steps"] + 1) / record["steps"]
    return record["images_per_second"] * factor, record["mfu"] * factor if record.get("mfu") else None


def gpu_check(path: str) -> None:
    records = [json.loads(line) for line in open(path) if line.strip()]
    by_step = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record)
    m = by_step["machine"][0]
    print(f"Machine: {m['gpu']}, {m['cpu_count']} CPU cores; Python {m['python']}, torch {m['torch']} (CUDA "
          f"{m['cuda']}, cuDNN {m['cudnn']}), DALI {m['dali']}, OpenCV {m['opencv']}; {m['date']}.\n")
    for record in records:
        if "error" in record:
            print(f"**{record['step']} failed:** {record['error']}\n")
    print("| fidelity: encoding | pair | images | MAD | p99 | max |\n|---|---|---:|---:|---:|---:|")
    for r in by_step.get("fidelity", []):
        print(f"| {r['encoding']} | {r['pair']} | {r['images']} | {r['mad']:.2f} | {r['p99']:.0f} | {r['max']} |")
    flops = by_step["flops"][0]
    print(f"\nFLOPs per training image: {flops['flops_per_image'] / 1e12:.3f} T (3 x forward "
          f"{flops['forward_flops_per_image'] / 1e12:.3f} T); torch.utils.flop_counter unpatched: "
          f"{flops['torch_counted_flops_per_image'] / 1e12:.3f} T. Peak: {flops['peak_flops'] / 1e12:.0f} TFLOP/s.\n")
    print("| model: setting | micro-batch x accum | images/s | step ms | peak GiB | MFU |")
    print("|---|---|---:|---:|---:|---:|")
    for r in by_step.get("model", []) + by_step.get("compile", []):
        if r.get("oom"):
            print(f"| {r['label']} | {r['micro_batch']} x {r['accum']} | out of memory | | | |")
            continue
        label = "torch.compile, fused AdamW, cudnn.benchmark" if r["step"] == "compile" else r["label"]
        if r["step"] == "model" and r["label"] != "sweep":
            label += "".join([", fused AdamW" if r["fused_adamw"] else "",
                              ", cudnn.benchmark" if r["cudnn_benchmark"] else ""])
        rate, mfu = _corrected(r)
        print(f"| {label} | {r['micro_batch']} x {r['accum']} | {rate:.1f} | {r['step_ms']:.0f} | "
              f"{r['peak_memory_gib']:.1f} | {_pct(mfu)} |")
    for r in by_step.get("compile", []):
        print(f"\ntorch.compile: first step (compilation) {r['compile_seconds']:.0f} s.")
    print("\n| loader | encoding | hw_decoder_load | images/s | CPU core-ms/image | cores busy | workers |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for r in by_step.get("loader", []):
        name = r.get("loader", r.get("backend"))  # records before the rename say "backend"
        print(f"| {name} | {r['encoding']} | {r['hw_decoder_load'] or '-'} | {r['images_per_second']:.0f} | "
              f"{r['cpu_core_ms_per_image']:.2f} | {r['cpu_cores_busy']:.1f} | {r['workers']} |")
    print("\n| end to end | micro-batch x accum | images/s | data wait | peak GiB |\n|---|---|---:|---:|---:|")
    for r in by_step.get("e2e", []):
        rate = r.get("images_per_second") or r.get("train_images_per_second")
        print(f"| {r['kind']} | {r['micro_batch']} x {r['accum']} | {rate:.1f} | "
              f"{_pct(r.get('data_wait_fraction'))} | {r['peak_memory_gib']:.1f} |")


def _machine(record: dict) -> str:
    return (f"Machine: {record['gpu'] or 'no GPU (a CPU rehearsal)'}, {record['cpu_count']} CPU cores; Python "
            f"{record['python']}, torch {record['torch']} (CUDA {record['cuda']}), DALI {record['dali']}, OpenCV "
            f"{record['opencv']}; {record['date']}.\n")


def round2(path: str) -> None:
    """The second GPU round (tools/gpu_probe.py steps slowdown, profile, loader, recipe, run)."""
    records = [json.loads(line) for line in open(path) if line.strip()]
    by_step: dict[str, list] = {}
    for record in records:
        by_step.setdefault(record["step"], []).append(record)
    print(_machine(by_step["machine"][0]))
    for record in records:
        if "error" in record:
            print(f"**{record['step']} failed:** {record['error']}\n")
    print("| 4 x 8 slowdown: setting | epoch | side | train images/s | data wait | warm-up steps |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in by_step.get("slowdown", []):
        print(f"| {r['setting']} | {r['epoch']} | {r['image_side']} | {r['train_images_per_second']:.1f} | "
              f"{_pct(r['data_wait_fraction'])} | {r['warmup_steps']} |")
    for r in by_step.get("profile", []):
        print(f"\nProfile, {r['model']} at {r['image_size']}, {r['micro_batch']} x 1, "
              f"{'compiled' if r['compiled'] else 'eager'}: {r['steps']} steps, {r['images']} images in "
              f"{r['wall_seconds']:.3f} s ({r['images_per_second']:.1f} images/s); device idle "
              f"{_pct(r['idle_share'])} of the time.\n")
        print("| share of device time | |\n|---|---:|")
        for name, share in sorted(r["share"].items(), key=lambda item: -item[1]):
            print(f"| {name} | {_pct(share)} |")
        print("\n| top kernels | seconds | share |\n|---|---:|---:|")
        for k in r["top_kernels"]:
            print(f"| `{k['name'][:80]}` | {k['seconds']:.4f} | {_pct(k['share'])} |")
    print("\n| loader: shards | side | loader | images | seconds | images/s | CPU core-ms/image | cores busy |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|")
    for r in by_step.get("loader", []):
        print(f"| {r['shards']} | {r['image_size']} | {r['resolved']} | {r['images']} | {r['seconds']:.3f} | "
              f"{r['images_per_second']:.0f} | {r['cpu_core_ms_per_image']:.2f} | {r['cpu_cores_busy']:.1f} |")
    _recipes(by_step.get("recipe", []))
    print("\n| real run: cache | epoch | side | train images/s | data wait | compile s | graphs (expected) | "
          "peak GiB |\n|---|---:|---:|---:|---:|---:|---|---:|")
    for r in by_step.get("run", []):
        compile_seconds = "-" if r["compile_seconds"] is None else f"{r['compile_seconds']:.1f}"
        peak = "-" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.1f}"
        print(f"| {r['attempt']} | {r['epoch']} | {r['image_side']} | {r['train_images_per_second']:.1f} | "
              f"{_pct(r['data_wait_fraction'])} | {compile_seconds} | {r['compiled_graphs']} "
              f"({r['expected_graphs']}) | {peak} |")


def _recipes(records: list[dict]) -> None:
    """Per compile mode: images/s and MFU at each side, one evaluation pass, and the projected wall time."""
    print("\n| recipe: compile mode | side | micro-batch x accum | images | seconds | images/s | MFU | compile s |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|")
    for r in records:
        for side in r["sides"]:
            if side.get("estimated"):
                print(f"| {r['compile_mode']} | {side['side']} | (estimated from the default mode) | | | "
                      f"{side['images_per_second']:.1f} | {_pct(side['mfu'])} | |")
                continue
            print(f"| {r['compile_mode']} | {side['side']} | {side['micro_batch']} x {side['accum']} | "
                  f"{side['images']} | {side['seconds']:.3f} | {side['images_per_second']:.1f} | {_pct(side['mfu'])} | "
                  f"{side['compile_seconds']:.1f} |")
    print("\n| recipe: compile mode | evaluation images/s | fixed, hours (1 GPU) | progressive, hours (1 GPU) | "
          "fixed, 8 GPUs | progressive, 8 GPUs | loader images/s per GPU needed |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        p, lin = r["projection"], r["projection_gpus_linear"]
        print(f"| {r['compile_mode']} | {r['evaluation']['images_per_second']:.0f} | "
              f"{p['fixed']['total_hours']:.2f} | {p['progressive']['total_hours']:.2f} | {lin['fixed_hours']:.2f} | "
              f"{lin['progressive_hours']:.2f} | {r['loader_images_per_second_per_gpu']:.0f} |")


def progressive(path: str) -> None:
    """The accuracy guard of progressive resolution (benchmarks/progressive_guard.py)."""
    results = json.load(open(path))
    m = results["machine"]
    print(f"Machine: {m['host']}, {m['cpu_count']} cores; torch {m['torch']}; {m['date']}. Splits: "
          f"{results['splits']}.\n")
    print("| seed | schedule (side per epoch) | FLOPs vs fixed | val macro AUROC, best | last | minutes |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results["runs"]:
        print(f"| {r['seed']} | {' '.join(map(str, r['sides']))} | {r['flops_ratio']:.2f} | "
              f"{r['val_macro_auc_best']:.3f} | {r['val_macro_auc_last']:.3f} | {r['wall_seconds'] / 60:.1f} |")
    for d in results["differences"]:
        print(f"\nSeed {d['seed']}: progressive minus fixed, best {d['best']:+.3f}, last {d['last']:+.3f}.")


if __name__ == "__main__":
    if sys.argv[1].endswith(".jsonl"):
        steps = {json.loads(line)["step"] for line in open(sys.argv[1]) if line.strip()}
        (round2 if "slowdown" in steps or "recipe" in steps else gpu_check)(sys.argv[1])
    elif "progressive" in sys.argv[1]:
        progressive(sys.argv[1])
    else:
        encodings(sys.argv[1])
