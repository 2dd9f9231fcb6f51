"""Render the markdown tables of RESULTS.md from a result file.

    .venv/bin/python benchmarks/summarize.py benchmarks/results/cpu-2core-encodings.json   # benchmarks/encodings.py
    .venv/bin/python benchmarks/summarize.py benchmarks/results/gpu-h200-check.jsonl       # tools/gpu_check.sh
    .venv/bin/python benchmarks/summarize.py OUT/gpu.jsonl                                # any round, any subset

Every rate is printed beside the images and seconds it was computed from, so each row can be recomputed; a failed or
skipped part is a line saying so, and the tables show the parts that ran.
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


def _num(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _corrected(record: dict) -> tuple[float, float | None]:
    """(images/s, MFU) of a round-1 sweep or compile record. The first probe's timer started one optimizer step
    early: its `seconds` cover steps + 1 steps while its images counted `steps`, so each rate is (steps + 1) / steps
    of what it recorded."""
    factor = (record["steps"] + 1) / record["steps"]
    return record["images_per_second"] * factor, record["mfu"] * factor if record.get("mfu") else None


def _machine(record: dict) -> str:
    return (f"Machine: {record.get('gpu') or 'no GPU (a CPU rehearsal)'}, {record.get('cpu_count')} CPU cores; Python "
            f"{record.get('python')}, torch {record.get('torch')} (CUDA {record.get('cuda')}, cuDNN "
            f"{record.get('cudnn')}), DALI {record.get('dali')}, OpenCV {record.get('opencv')}; {record.get('date')}.\n")


def _round1_model(records: list[dict]) -> None:
    flops = next(iter(records.get("flops", [])), None)
    if flops:
        print(f"\nFLOPs per training image: {flops['flops_per_image'] / 1e12:.3f} T (3 x forward "
              f"{flops['forward_flops_per_image'] / 1e12:.3f} T); torch.utils.flop_counter unpatched: "
              f"{flops['torch_counted_flops_per_image'] / 1e12:.3f} T. Peak: {flops['peak_flops'] / 1e12:.1f} "
              "TFLOP/s.\n")
    rows = records.get("model", []) + records.get("compile", [])
    if rows:
        print("| model: setting | micro-batch x accum | images/s | step ms | peak GiB | MFU |\n"
              "|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['label']} | {r['micro_batch']} x {r['accum']} | out of memory | | | |")
            continue
        label = "torch.compile, fused AdamW, cudnn.benchmark" if r["step"] == "compile" else r["label"]
        if r["step"] == "model" and r["label"] != "sweep":
            label += "".join([", fused AdamW" if r.get("fused_adamw") else "",
                              ", cudnn.benchmark" if r.get("cudnn_benchmark") else ""])
        rate, mfu = _corrected(r)
        print(f"| {label} | {r['micro_batch']} x {r['accum']} | {rate:.1f} | {r['step_ms']:.0f} | "
              f"{r['peak_memory_gib']:.1f} | {_pct(mfu)} |")


def _round1(records: dict) -> None:
    """The first GPU round and its follow-up (gpu-h200-check.jsonl, gpu-h200-train.jsonl)."""
    if records.get("fidelity"):
        print("| fidelity: encoding | pair | images | MAD | p99 | max |\n|---|---|---:|---:|---:|---:|")
        for r in records["fidelity"]:
            print(f"| {r['encoding']} | {r['pair']} | {r['images']} | {r['mad']:.2f} | {r['p99']:.0f} | {r['max']} |")
    _round1_model(records)
    for r in records.get("compile", []):
        print(f"\ntorch.compile: first step (compilation) {r['compile_seconds']:.0f} s.")
    loaders = [r for r in records.get("loader", []) if "backend" in r or "hw_decoder_load" in r]
    if loaders:
        print("\n| loader | encoding | hw_decoder_load | images/s | CPU core-ms/image | cores busy | workers |\n"
              "|---|---|---:|---:|---:|---:|---:|")
    for r in loaders:
        print(f"| {r.get('loader', r.get('backend'))} | {r['encoding']} | {r.get('hw_decoder_load') or '-'} | "
              f"{r['images_per_second']:.0f} | {r['cpu_core_ms_per_image']:.2f} | {r['cpu_cores_busy']:.1f} | "
              f"{r['workers']} |")
    if records.get("e2e"):
        print("\n| end to end | micro-batch x accum | images/s | data wait | peak GiB |\n|---|---|---:|---:|---:|")
    for r in records.get("e2e", []):
        rate = r.get("images_per_second") or r.get("train_images_per_second")
        peak = r.get("peak_memory_gib", r.get("peak_gpu_memory_gib"))
        print(f"| {r['kind']} | {r['micro_batch']} x {r['accum']} | {rate:.1f} | {_pct(r.get('data_wait_fraction'))} "
              f"| {_num(peak)} |")
    for r in records.get("cli", []):
        mfu = f", MFU {_pct(r['mfu'])}" if r.get("mfu") else ""
        print(f"\n`{r.get('command', r.get('kind'))}`: {r['images_per_second']:.1f} images/s{mfu}.")


def _profiles(records: list[dict]) -> None:
    for r in records:
        print(f"\nProfile, {r['model']} at {r['image_size']}, {r['micro_batch']} x 1, "
              f"{'compiled' if r['compiled'] else 'eager'}: {r['steps']} steps, {r['images']} images in "
              f"{r['wall_seconds']:.3f} s ({r['images_per_second']:.1f} images/s); {r.get('on', 'device kernels')}; "
              f"idle {_pct(r['idle_share'])} of the wall time.\n")
        print("| class | seconds | share of busy time |\n|---|---:|---:|")
        for name, share in sorted(r["share"].items(), key=lambda item: -item[1]):
            print(f"| {name} | {_num(r.get('seconds', {}).get(name), '.4f')} | {_pct(share)} |")
        print("\n| top kernels | class | seconds |\n|---|---|---:|")
        for k in r.get("top", r.get("top_kernels", [])):
            print(f"| `{k['name'][:80]}` | {k.get('class', '')} | {k['seconds']:.4f} |")


def _trainings(title: str, records: list[dict], label: str) -> None:
    """Epoch records of `cxr-fast train` (slowdown, run): the rate with its images and seconds, and the parts."""
    if not records:
        return
    print(f"\n| {title}: {label} | epoch | side | timed images | timed s | images/s | data wait | MFU | compile s | "
          "graphs (expected) | epoch s | start | loader build | loader start | warm-up | validation | checkpoint | "
          "unaccounted |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        parts = r.get("seconds") or {}
        graphs = f"{r.get('compiled_graphs', '-')} ({r.get('expected_graphs', '-')})"
        print(f"| {r.get(label)} | {r['epoch']} | {r['image_side']} | {r.get('timed_images')} | "
              f"{_num(r.get('timed_seconds'), '.2f')} | {_num(r.get('train_images_per_second'))} | "
              f"{_pct(r.get('data_wait_fraction'))} | {_pct(r.get('mfu'))} | {_num(r.get('compile_seconds'))} | "
              f"{graphs} | {_num(r.get('epoch_seconds'))} | "
              + " | ".join(_num(parts.get(k)) for k in ("start", "loader_build", "loader_start", "warmup",
                                                        "validation", "checkpoint"))
              + f" | {_num(r.get('unaccounted_seconds'), '.2f')} |")


def _loaders(records: list[dict]) -> None:
    rows = [r for r in records if "resolved" in r]
    if rows:
        print("\n| loader: shards | side | loader | images | seconds | images/s | CPU core-ms/image | cores busy |\n"
              "|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.get('shards', r.get('encoding'))} | {r['image_size']} | {r['resolved']} | {r['images']} | "
              f"{r['seconds']:.3f} | {r['images_per_second']:.0f} | {r['cpu_core_ms_per_image']:.2f} | "
              f"{r['cpu_cores_busy']:.1f} |")


def _fastnorm(records: list[dict]) -> None:
    if records:
        print("\n| LayerNorm | compiled | steps | images | seconds | images/s | MFU | mean loss |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        print(f"| {'bf16 (--fast-norm)' if r.get('fast_norm') else 'float32 (default)'} | {r.get('compiled')} | "
              f"{r['steps']} | {r['images']} | {r['seconds']:.3f} | {r['images_per_second']:.1f} | "
              f"{_pct(r.get('mfu'))} | {_num(r.get('loss'), '.5f')} |")


def round2(path: str) -> None:
    """The GPU rounds made by tools/gpu_probe.py (parts data, profile, fastnorm, slowdown, loader, recipe, run), and
    the first round's records; any subset, error and skipped records included."""
    records = [json.loads(line) for line in open(path) if line.strip()]
    by_step: dict[str, list] = {}
    for record in records:
        if "error" in record:
            print(f"**{record['step']} failed:** {record['error'][:300]} (left out below)\n")
        elif "skipped" in record:
            print(f"**{record['step']} skipped:** {record['skipped']}\n")
        else:
            by_step.setdefault(record["step"], []).append(record)
    if by_step.get("machine"):
        print(_machine(by_step["machine"][0]))
    _round1(by_step)
    _profiles(by_step.get("profile", []))
    _fastnorm(by_step.get("fastnorm", []))
    _trainings("4 x 8", by_step.get("slowdown", []), "setting")
    _loaders(by_step.get("loader", []))
    _recipes(by_step.get("recipe", []))
    _trainings("real run", by_step.get("run", []), "attempt")


def _recipes(records: list[dict]) -> None:
    """Per recipe record: images/s and MFU at each side, then the projection term by term."""
    if not records:
        return
    print("\n| recipe: compile mode | side | micro-batch x accum | images | seconds | images/s | MFU | compile s |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|")
    for r in records:
        for side in r["sides"]:
            if side.get("estimated"):
                print(f"| {r['compile_mode']} | {side['side']} | (fitted to the measured sides) | | | "
                      f"{side['images_per_second']:.1f} | {_pct(side.get('mfu'))} | |")
                continue
            print(f"| {r['compile_mode']} | {side['side']} | {side['micro_batch']} x {side['accum']} | "
                  f"{side['images']} | {side['seconds']:.3f} | {side['images_per_second']:.1f} | "
                  f"{_pct(side.get('mfu'))} | {_num(side.get('compile_seconds'))} |")
    terms = ("startup_seconds", "train_seconds", "validation_seconds", "compile_seconds", "loader_build_seconds",
             "checkpoint_seconds")
    print("\n| recipe: schedule | " + " | ".join(t[:-len("_seconds")].replace("_", " ") + ", min" for t in terms) +
          " | total, h (1 GPU) | total, h (N GPUs) |\n|---|" + "---:|" * (len(terms) + 2))
    for r in records:
        for name, p in r["projection"].items():
            if "startup_seconds" not in p:  # a projection from before the terms were listed
                print(f"| {r['compile_mode']}, {name} | " + " | " * len(terms) + f"{p['total_hours']:.2f} | |")
                continue
            print(f"| {r['compile_mode']}, {name} | " + " | ".join(f"{p[t] / 60:.1f}" for t in terms) +
                  f" | {p['total_hours']:.2f} | {p['total_hours_gpus']:.2f} ({p['gpus']}) |")


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
        round2(sys.argv[1])
    elif "progressive" in sys.argv[1]:
        progressive(sys.argv[1])
    else:
        encodings(sys.argv[1])
