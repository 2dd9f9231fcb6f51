"""The DALI pipelines (train and eval): read → decode → gray → resize (padded to a square, or squashed) → CLAHE →
augment.

Built from `DataConfig` alone. `device_id=None` runs every operator on the CPU (tests, CPU-only machines); with a GPU
id JPEG decodes on the GPU ('mixed'), PNG decodes on the CPU (as DALI does) and everything after it runs on the GPU.
The output is uint8 HWC: `loader.py` views a batch as NCHW channels-last without a copy and normalises it with torch
on the same device, as it does for the OpenCV loader. (DALI's CPU crop_mirror_normalize cost 9.5 core-ms per 512²
image, 30 times the torch op: benchmarks/RESULTS.md.)
"""

from __future__ import annotations

from dataclasses import replace

from cxr_fast.config import DataConfig
from cxr_fast.data.shards.sample import BY_EXTENSION
from cxr_fast.errors import CxrFastError

READER_NAME = "Reader"


def import_dali():
    """DALI, or a message that says how to install it. Imported here, when a pipeline is built, on purpose: DALI is an
    optional, heavy dependency, and the CLI and the torch loader work without it."""
    try:
        from nvidia import dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise CxrFastError("NVIDIA DALI is not installed. Install the build for your CUDA: `pip install "
                           "nvidia-dali-cuda120` (CUDA 12) or `nvidia-dali-cuda130` (CUDA 13), as tools/setup.sh "
                           "does; or use --loader torch.") from None
    return fn, pipeline_def, types


def _draw(fn, value_range, shape=None):
    """A per-sample uniform draw from `value_range`, or its one value when low == high (DALI refuses an empty
    range; a fixed value is how the tests, and users, pin a transform)."""
    low, high = value_range
    if low == high:
        return [low] * shape[0] if shape else low
    return fn.random.uniform(range=[low, high], shape=shape) if shape else fn.random.uniform(range=[low, high])


def _augment(images, config: DataConfig, fn):
    """Per-sample branches (DALI conditionals): a transform runs only for the samples that draw it, which on the
    CPU saves most of the cost of warp_affine and of drawing a normal per pixel (benchmarks/RESULTS.md)."""
    aug, size = config.augment, float(config.image_size)
    centre = [size / 2, size / 2]
    if fn.random.coin_flip(probability=aug.affine_prob):
        scale = _draw(fn, aug.scale_range)
        shift = _draw(fn, (aug.translate_range[0] * size, aug.translate_range[1] * size), shape=[2])
        # DALI's positive angle turns clockwise on the screen (y points down); the config's, like OpenCV's,
        # counter-clockwise: hence the minus.
        matrix = fn.transforms.rotation(angle=-_draw(fn, aug.rotate_range), center=centre)
        matrix = fn.transforms.scale(matrix, scale=[scale, scale] if isinstance(scale, float) else
                                     fn.stack(scale, scale), center=centre)
        matrix = fn.transforms.translation(matrix, offset=shift)
        # Source-to-destination matrix; borders filled with black, the background of a radiograph.
        images = fn.warp_affine(images, matrix=matrix, inverse_map=False, fill_value=0)
    if aug.hflip_prob > 0:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=aug.hflip_prob))
    if fn.random.coin_flip(probability=aug.brightness_contrast_prob):
        images = fn.brightness_contrast(images, brightness=_draw(fn, aug.brightness_range),
                                        contrast=_draw(fn, aug.contrast_range), contrast_center=128.0)
    if fn.random.coin_flip(probability=aug.noise_prob):
        images = fn.noise.gaussian(images, stddev=aug.noise_std)
    return images


def build_pipeline(tars: list[str], image_ext: str, spec, device_id: int | None, with_mask: bool = False):
    """A built DALI pipeline over `tars` for a `loader.LoaderSpec` (its data config, batch, train/eval, seed and rank),
    with outputs (images uint8 HWC, labels uint8 (classes,), ids uint8 (64,), and with_mask: the stated-label mask
    uint8 (classes,)); device_id None keeps it on the CPU."""
    fn, pipeline_def, types = import_dali()
    gpu, config, train = device_id is not None, spec.data, spec.train
    side = spec.side or config.image_size
    raw = BY_EXTENSION[image_ext].dali == "raw"

    @pipeline_def(batch_size=spec.batch_size, num_threads=max(1, config.workers or 1), device_id=device_id,
                  seed=spec.seed, prefetch_queue_depth=2, exec_dynamic=True, enable_conditionals=True)
    def cxr_pipeline():
        extra = (["mask"] if with_mask else []) + (["shape"] if raw else [])
        outputs = fn.readers.webdataset(
            paths=tars, index_paths=[t[: -len(".tar")] + ".idx" for t in tars], ext=[image_ext, "labels", "id"] + extra,
            dtypes=[types.UINT8] * (3 + with_mask) + ([types.INT32] if raw else []),
            missing_component_behavior="error", random_shuffle=train, initial_fill=config.shuffle_buffer,
            shard_id=spec.rank, num_shards=spec.world_size, pad_last_batch=True, name=READER_NAME)
        encoded, labels, ids = outputs[:3]
        if raw:
            images = fn.reshape(encoded, shape=outputs[-1])
        else:
            # 'mixed' decodes JPEG with nvJPEG and JPEG 2000 with nvJPEG2000 on the GPU; PNG still decodes on the host
            # inside the same operator.
            decode = {"device": "mixed", "hw_decoder_load": config.hw_decoder_load} if gpu else {"device": "cpu"}
            images = fn.decoders.image(encoded, output_type=types.GRAY, **decode)
        if gpu:
            images = images.gpu()
        # Cubic with antialiasing: within 1 gray level of OpenCV's INTER_AREA after CLAHE (linear is not).
        full = [config.image_size, config.image_size]
        if config.fit == "pad":  # the longer side to image_size, then centred on a black square: pad, then resize
            images = fn.resize(images, size=full, mode="not_larger", interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop(images, crop=full, out_of_bounds_policy="pad", fill_values=0)
        else:
            images = fn.resize(images, size=full, interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.clahe(images, tiles_x=config.clahe_tiles, tiles_y=config.clahe_tiles,
                          clip_limit=config.clahe_clip_limit)
        if side != config.image_size:  # a progressive epoch: CLAHE at the full side, then down to this one (cubic
            # with antialiasing: within a gray level of OpenCV's INTER_AREA, as for the first resize)
            images = fn.resize(images, size=[side, side], interp_type=types.INTERP_CUBIC, antialias=True)
        if train:
            images = _augment(images, replace(config, image_size=side), fn)
        def on_device(node):
            return node.gpu() if gpu else node

        return (images, on_device(labels), ids) + ((on_device(outputs[3]),) if with_mask else ())

    pipe = cxr_pipeline()
    pipe.build()
    return pipe
