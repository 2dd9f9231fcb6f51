"""The DALI pipelines (train and eval): read → decode → gray → resize → CLAHE → augment → normalise.

Built from `DataConfig` alone. `device_id=None` runs every operator on the CPU (tests, CPU-only machines); with a GPU
id JPEG decodes on the GPU ('mixed'), PNG decodes on the CPU (as DALI does) and everything after it runs on the GPU.
The output is HWC, so `loader.py` views a batch as NCHW channels-last without a copy.
"""

from __future__ import annotations

from cxr_fast import constants as C
from cxr_fast.config import DataConfig
from cxr_fast.errors import CxrFastError

READER_NAME = "Reader"


def import_dali():
    """DALI, or a message that says how to install it (it is imported lazily: the CLI works without it)."""
    try:
        from nvidia import dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise CxrFastError("NVIDIA DALI is not installed. Install it with `pip install nvidia-dali-cuda120` "
                           "(CUDA 12; see docs.nvidia.com/deeplearning/dali), or use --loader torch.") from None
    return fn, pipeline_def, types


def _apply(fn, types, probability: float):
    """1.0 with `probability`, else 0.0, per sample: scales a transform's strength to nothing when it is skipped."""
    return fn.cast(fn.random.coin_flip(probability=probability), dtype=types.FLOAT)


def _augment(images, cfg: DataConfig, fn, types):
    aug, size = cfg.augment, float(cfg.image_size)
    centre = [size / 2, size / 2]
    on = _apply(fn, types, aug.affine_prob)
    angle = fn.random.uniform(range=[-aug.rotate_degrees, aug.rotate_degrees]) * on
    scale = 1.0 + (fn.random.uniform(range=list(aug.scale_range)) - 1.0) * on
    shift = fn.random.uniform(range=[-aug.translate_fraction * size, aug.translate_fraction * size], shape=[2]) * on
    matrix = fn.transforms.rotation(angle=angle, center=centre)
    matrix = fn.transforms.scale(matrix, scale=fn.stack(scale, scale), center=centre)
    matrix = fn.transforms.translation(matrix, offset=shift)
    # Source-to-destination matrix; borders filled with black, the background of a radiograph.
    images = fn.warp_affine(images, matrix=matrix, inverse_map=False, fill_value=0)
    if aug.hflip_prob > 0:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=aug.hflip_prob))
    on = _apply(fn, types, aug.brightness_contrast_prob)
    brightness = 1.0 + (fn.random.uniform(range=list(aug.brightness_range)) - 1.0) * on
    contrast = 1.0 + (fn.random.uniform(range=list(aug.contrast_range)) - 1.0) * on
    images = fn.brightness_contrast(images, brightness=brightness, contrast=contrast, contrast_center=128.0)
    # A per-sample branch rather than stddev 0: drawing a normal per pixel is the dearest CPU operator here, and
    # the branch runs it only for the samples that get noise (measured: see benchmarks/RESULTS.md).
    if fn.random.coin_flip(probability=aug.noise_prob):
        images = fn.noise.gaussian(images, stddev=aug.noise_std)
    return images


def build_pipeline(tars: list[str], image_ext: str, cfg: DataConfig, *, batch_size: int, train: bool,
                   device_id: int | None, seed: int, shard_id: int = 0, num_shards: int = 1,
                   normalize: bool = True):
    """A built DALI pipeline over `tars` with outputs (images HWC, labels uint8 (14,), ids uint8 (64,)).

    normalize=False returns the processed uint8 image (for preview); otherwise float32 (x - mean) / std.
    """
    fn, pipeline_def, types = import_dali()
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=cfg.num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True, enable_conditionals=True)
    def cxr_pipeline():
        ext = [image_ext, "labels", "id"] + (["shape"] if image_ext == "raw" else [])
        outputs = fn.readers.webdataset(
            paths=tars, index_paths=[t[: -len(".tar")] + ".idx" for t in tars], ext=ext,
            dtypes=[types.UINT8, types.UINT8, types.UINT8] + ([types.INT32] if image_ext == "raw" else []),
            missing_component_behavior="error", random_shuffle=train, initial_fill=cfg.shuffle_buffer,
            shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name=READER_NAME)
        encoded, labels, ids = outputs[:3]
        if image_ext == "raw":
            images = fn.reshape(encoded, shape=outputs[3])
        else:
            # 'mixed' decodes JPEG with nvJPEG on the GPU; PNG still decodes on the host inside the same operator.
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.GRAY)
        if gpu:
            images = images.gpu()
        # Cubic with antialiasing: within 1 gray level of OpenCV's INTER_AREA after CLAHE (linear is not).
        images = fn.resize(images, size=[cfg.image_size, cfg.image_size], interp_type=types.INTERP_CUBIC,
                           antialias=True)
        images = fn.clahe(images, tiles_x=cfg.clahe_tiles, tiles_y=cfg.clahe_tiles, clip_limit=cfg.clahe_clip_limit)
        if train:
            images = _augment(images, cfg, fn, types)
        if normalize:
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                              mean=[C.GRAY_MEAN], std=[C.GRAY_STD])
            if cfg.in_chans == 3:
                images = fn.cat(images, images, images, axis=2)
        return images, (labels.gpu() if gpu else labels), ids

    pipe = cxr_pipeline()
    pipe.build()
    return pipe
