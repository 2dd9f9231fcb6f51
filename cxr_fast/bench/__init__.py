"""Throughput measurements: the loaders in steady state, the trainer's own loop on on-device batches (or a real
loader), and the full recipe projected from measured rates. Every result is JSON that carries what is needed to
recompute it (images, seconds, steps, warm-up), the settings and the machine (GPU name and its peak)."""
