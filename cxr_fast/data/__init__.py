"""The data stage, in rooms by job: `datasets/` (the data-set descriptions and everything about tables: labels, the
patient-level split, EDA), `images/` (reading a source image), `shards/` (samples, tars, the manifest, the writer,
verify), `loaders/` (DALI and the OpenCV/torch baseline, transforms, preview) and `synth/` (synthetic data in any
layout)."""
