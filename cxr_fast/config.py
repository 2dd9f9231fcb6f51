"""Every setting a user can change, with its default, meaning and valid range: the only home of defaults. Frozen
dataclasses per concern (synthetic data, shards, the data pipeline, the model, the optimisation, the run that holds
the last four, one per remaining command); each field carries its help and rule (`settings.setting`), and a config
is checked when it is built (flags, YAML or code alike): a bad value is an error naming the field and its flag. The
CLI builds its options from here. A run folder gets the resolved config (`config.yaml`); YAML may set any subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cxr_fast import constants
from cxr_fast.settings import (Checked, ConfigError, check_annotations, describe, dump_yaml,  # noqa: F401
                               from_dict, read_yaml, replace, setting, to_dict)

MAX_SEED = 2 ** 32 - 1  # numpy's seeds are 32-bit
MAX_PIXELS = 64_000_000  # the largest source image read, checked before decoding: a guard against decompression bombs
LOADER_HELP = ("auto: DALI on a GPU, the OpenCV/torch DataLoader on CPU-only machines (faster there, see "
               "benchmarks/RESULTS.md); or dali, torch.")
LOADER_CHOICES = ("auto", "dali", "torch")
DEVICE_CHOICES = ("auto", "cuda", "cpu")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# ChestX-ray14's official train_val list (86,524 images) less a 10% validation carve: an epoch of the GPU recipe.
NIH_TRAIN_IMAGES, NIH_VAL_IMAGES = 77_872, 8_652
FAST_NORM_HELP = ("LayerNorm in the autocast dtype (bf16), not float32 with casts around it (timm's fast_norm); off "
                  "until a GPU measurement shows it faster with the same loss (benchmarks/RESULTS.md).")


@dataclass(frozen=True)
class SynthConfig(Checked):
    """The synthetic data set (`cxr-fast synth`), in the layout of NIH, CheXpert, MIMIC-CXR-JPG or PadChest."""

    SECTION: ClassVar[str] = "synth"
    layout: str = setting("nih", "The data set whose files, folders and table columns are written (a layout of "
                          "`data/synth/layouts.py`).", flag="--layout")
    n_images: int = setting(800, "Number of images.", flag="--n-images", ge=10)
    source_size: int = setting(1024, "Side of the images written (NIH: 1024, square; CheXpert and MIMIC: the "
                               "width, the height a fifth more).", flag="--source-size", ge=64, le=8192)
    seed: int = setting(0, "Seed of the labels, patients and pictures.", flag="--seed", ge=0, le=MAX_SEED)
    no_finding_fraction: float = setting(0.54, "Share of images without a finding (NIH: 0.54).", ge=0, le=1)
    min_prevalence: float = setting(0.04, "Floor of every class's prevalence, so small sets have positives.",
                                    ge=0, le=0.5)
    test_fraction: float = setting(0.2, "Share of patients in the official-style test list.", gt=0, lt=1)
    mean_images_per_patient: float = setting(2.5, "Mean follow-ups per patient.", ge=1)
    workers: int = setting(2, "Processes drawing images.", flag="--workers", ge=1, le=1024)


@dataclass(frozen=True)
class ShardConfig(Checked):
    """What decides the content of the shards (and so is part of each shard's digest), the input policy, and where
    and with how many processes they are written (neither of the last three is part of the digest)."""

    SECTION: ClassVar[str] = "shard"
    encoding: str = setting("auto", "png: lossless, pixel-identical; j2k: lossless JPEG 2000, smaller than png, "
                            "decodes on the GPU; jpeg: lossy, decodes on the GPU; raw: uint8, no decoding; auto: jpeg "
                            "when every source is a JPEG (kept as it is: no second lossy generation), else png.",
                            flag="--encoding", choices=("auto", "png", "j2k", "jpeg", "raw"))
    jpeg_quality: int = setting(95, "JPEG quality of --encoding jpeg.", flag="--jpeg-quality", ge=1, le=100)
    resize: int | None = setting(None, "Store images resized to N x N (INTER_AREA); default: the source size.",
                                 flag="--resize", ge=16, le=8192)
    shard_size: int = setting(1000, "Samples per tar.", flag="--shard-size", ge=1)
    seed: int = setting(0, "Seed of the split and of the sample shuffle.", flag="--seed", ge=0, le=MAX_SEED)
    val_fraction: float = setting(0.1, "Validation share (of train_val with the official lists); training needs "
                                  "a validation split.", flag="--val-fraction", gt=0, lt=1)
    test_fraction: float = setting(0.2, "Test share, used only without split lists.", flag="--test-fraction",
                                   ge=0, lt=1)
    uncertain: str | None = setting(None, "What uncertain (-1) labels become, per class: 'ones:Atelectasis,Edema "
                                    "zeros:*' (ignore: masked, zeros, ones; * every other class); default: the "
                                    "data set's own.", flag="--uncertain")
    blank: str = setting("negative", "What a blank (not mentioned) label is: negative, as CheXpert's paper "
                         "trains; masked, except on images whose No Finding is 1 (torchxrayvision's rule); or "
                         "masked-all.", flag="--blank", choices=("negative", "masked", "masked-all"))
    views: str | None = setting(None, "Views kept, e.g. 'PA,AP' or 'all'; default: the data set's own (frontal "
                                "for CheXpert, MIMIC-CXR-JPG and PadChest).", flag="--views")
    relabel: str | None = setting(None, "YAML mapping class names to shared ones or null (drop), over the data "
                                  "sets' own synonyms (README, 'Merging data sets').", flag="--relabel")
    classes: str | None = setting(None, "Keep only these classes, e.g. 'Effusion,Cardiomegaly' (names after the "
                                  "map); default: all.", flag="--classes")
    on_error: str = setting("fail", "fail: stop at a bad input, remove this run's shards; skip: leave it out, "
                            "list it in the manifest.", flag="--on-error", choices=("fail", "skip"))
    max_pixels: int = setting(MAX_PIXELS, "Largest source image accepted (width x height, checked in the header "
                              "before decoding): a guard against decompression bombs.", flag="--max-pixels", ge=1)
    out: str = setting("shards", "Output folder.", flag="--out")
    workers: int = setting(2, "Parallel shard writers.", flag="--workers", ge=1, le=1024)

    def __post_init__(self):
        if isinstance(self.uncertain, dict):  # YAML's mapping form: {ones: [Atelectasis, Edema], zeros: "*"}
            object.__setattr__(self, "uncertain", " ".join(
                f"{policy}:{','.join(names) if isinstance(names, list) else names}"
                for policy, names in self.uncertain.items()))
        super().__post_init__()
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"shard.val_fraction + shard.test_fraction must be < 1, got {self.val_fraction} + "
                              f"{self.test_fraction}")


@dataclass(frozen=True)
class AugmentConfig(Checked):
    """Train-time augmentation, applied on the device by DALI (and by OpenCV in the baseline loader).

    Each transform has a probability and a range. Horizontal flip is off by default: it moves the heart to the right,
    an anatomy the test set never shows (dextrocardia is rare), so it teaches the model something false.
    """

    SECTION: ClassVar[str] = "data.augment"
    # Renamed since cxr-fast 0.1, as read from its configs and checkpoints: old key -> (new key, conversion).
    RENAMED: ClassVar[dict] = {"rotate_degrees": ("rotate_range", lambda r: (-r, r)),
                               "translate_fraction": ("translate_range", lambda t: (-t, t))}
    affine_prob: float = setting(0.8, "Probability of the rotation/scale/shift.", ge=0, le=1)
    rotate_range: tuple[float, float] = setting((-7.0, 7.0), "Rotation in degrees (positive: counter-clockwise on "
                                               "the screen): patient positioning varies by a few degrees.",
                                               ge=-180, le=180)
    scale_range: tuple[float, float] = setting((0.9, 1.1), "Zoom range: distance to the detector varies.", gt=0)
    translate_range: tuple[float, float] = setting((-0.05, 0.05), "Shift, as a fraction of the side, drawn for "
                                                   "each axis (positive: right, down).", ge=-0.5, le=0.5)
    hflip_prob: float = setting(0.0, "Horizontal flip probability (off: it puts the heart on the right).", ge=0,
                                le=1)
    brightness_contrast_prob: float = setting(0.5, "Probability of the brightness/contrast change.", ge=0, le=1)
    brightness_range: tuple[float, float] = setting((0.9, 1.1), "Multiplicative: exposure differences between "
                                                    "scanners.", gt=0)
    contrast_range: tuple[float, float] = setting((0.9, 1.1), "Contrast factor around gray 128.", gt=0)
    noise_prob: float = setting(0.3, "Probability of Gaussian noise.", ge=0, le=1)
    noise_std: float = setting(4.0, "Noise sigma in 8-bit gray levels: quantum noise of a low-dose exposure.", ge=0,
                               le=128)


@dataclass(frozen=True)
class DataConfig(Checked):
    """What the loaders make of a shard: the model input and how it is processed."""

    SECTION: ClassVar[str] = "data"
    image_size: int = setting(constants.IMAGE_SIZE, "Model input side in pixels (a multiple of 32 is best).",
                              flag="--image-size", ge=32, le=4096)
    in_chans: int = setting(1, "1: gray stem (timm folds the pretrained RGB stem); 3: gray replicated.",
                            flag="--in-chans", choices=(1, 3))
    fit: str = setting("pad", "A source that is not square: pad (black, centred) to a square before resizing, or "
                       "squash it.", flag="--fit", choices=("pad", "squash"))
    clahe_clip_limit: float = setting(constants.CLAHE_CLIP_LIMIT, "CLAHE clip limit.", gt=0, le=100)
    clahe_tiles: int = setting(constants.CLAHE_TILES, "CLAHE tiles per side.", ge=1, le=64)
    augment: AugmentConfig = setting(AugmentConfig(), "Train-time augmentation.")
    workers: int | None = setting(None, "DALI threads or DataLoader workers per rank (default: this machine's "
                                  "cores shared among its ranks; PNG decodes on the CPU even in DALI).",
                                  flag="--workers", ge=0, le=1024)
    shuffle_buffer: int = setting(512, "Samples the readers shuffle within (shards are shuffled when written).",
                                  ge=1)
    hw_decoder_load: float = setting(0.65, "Share of JPEG decoding DALI sends to the GPU's hardware JPEG engines "
                                     "(A100, H100, H200); the rest goes to its CUDA decoder.", ge=0, le=1)


@dataclass(frozen=True)
class ModelConfig(Checked):
    SECTION: ClassVar[str] = "model"
    name: str = setting("convnext_large", "Any timm model name.", flag="--model")
    pretrained: bool = setting(True, "Start from ImageNet weights (timm hub).", flag="--pretrained")
    weights: str | None = setting(None, "A local ImageNet checkpoint instead of the timm hub.", flag="--weights")
    drop_rate: float = setting(0.2, "Dropout before the final Linear.", ge=0, lt=1)
    channels_last: bool = setting(True, "Channels-last memory format (tensor cores).")
    compile: bool | None = setting(None, "torch.compile the model; auto (unset): on CUDA, eager on the CPU.",
                                   flag="--compile")
    compile_mode: str = setting("default", "torch.compile mode (reduce-overhead: CUDA graphs, for small "
                                "micro-batches).", flag="--compile-mode", choices=COMPILE_MODES)
    compile_cache: str | None = setting(None, "Inductor's cache folder, kept between runs (default: "
                                        "~/.cache/cxr_fast/inductor; it replaces TORCHINDUCTOR_CACHE_DIR).",
                                        flag="--compile-cache")
    fast_norm: bool = setting(False, FAST_NORM_HELP, flag="--fast-norm")


@dataclass(frozen=True)
class OptimConfig(Checked):
    SECTION: ClassVar[str] = "optim"
    lr: float = setting(1e-4, "Peak AdamW learning rate (warm-up, then cosine).", flag="--lr", gt=0, le=1)
    weight_decay: float = setting(0.05, "AdamW weight decay (not on norms and biases).", ge=0, le=1)
    batch_size: int | str = setting("auto", "Images per device and micro-step; auto: the largest of 32, 16, 8, ... "
                                    "that fits the GPU (probed; 32 on the CPU).", flag="--batch-size")
    accum: int | str = setting("auto", "Micro-steps per optimizer step; auto: --effective-batch / --batch-size "
                               "(the seed's 4 x 8 is --batch-size 4).", flag="--accum")
    effective_batch: int = setting(32, "Images per optimizer step and device, when --accum is auto.",
                                   flag="--effective-batch", ge=1)
    epochs: int = setting(25, "Epochs.", flag="--epochs", ge=1)
    warmup_fraction: float = setting(0.03, "Share of all optimizer steps with a linear warm-up from 0.", ge=0, lt=1)
    min_lr_ratio: float = setting(0.01, "The cosine ends at lr x this.", ge=0, le=1)
    clip_grad_norm: float = setting(1.0, "Gradient norm clipping (0: off).", ge=0)
    focal_gamma: float = setting(2.0, "Focal loss gamma (0: weighted BCE).", ge=0, le=10)
    class_weighting: str = setting("inverse_frequency", "Per-class loss weights.",
                                   choices=("inverse_frequency", "none"))
    ema_decay: float = setting(0.0, "EMA decay of the weights (0: off).", flag="--ema", ge=0, lt=1)
    progressive: int | None = setting(None, "Progressive resolution: the training side ramps from this to "
                                      "--image-size in multiples of 32 (off when unset or 0).", flag="--progressive",
                                      ge=0, le=4096)
    progressive_final_epochs: int = setting(3, "Epochs at the full side at the end of a progressive run.", ge=1)

    def __post_init__(self):
        super().__post_init__()
        if self.progressive == 0:  # "off", as unset: the way to turn off a schedule that a default turns on
            object.__setattr__(self, "progressive", None)
        if self.progressive is not None and self.progressive < 32:
            raise ConfigError(f"optim.progressive (--progressive) must be 0 (off) or >= 32, got {self.progressive}")
        for name in ("batch_size", "accum"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"optim.{name} (--{name.replace('_', '-')}) must be auto or a whole number >= 1, "
                                  f"got {value!r}")
        if self.accum == "auto" and isinstance(self.batch_size, int) and self.effective_batch % self.batch_size:
            raise ConfigError(f"--effective-batch {self.effective_batch} is not a multiple of --batch-size "
                              f"{self.batch_size}; give --accum")


@dataclass(frozen=True)
class RunConfig(Checked):
    data: DataConfig = setting(DataConfig(), "The data pipeline.")
    model: ModelConfig = setting(ModelConfig(), "The model.")
    optim: OptimConfig = setting(OptimConfig(), "The optimisation.")
    seed: int = setting(0, "Seed of the model, the loaders and the augmentation.", flag="--seed", ge=0, le=MAX_SEED)
    device: str = setting("auto", "auto: CUDA where present.", flag="--device", choices=DEVICE_CHOICES)
    loader: str = setting("auto", LOADER_HELP, flag="--loader", choices=LOADER_CHOICES)
    amp: str = setting("auto", "Mixed precision: auto is bf16 on GPUs that have it, fp16 on older ones, off on "
                       "the CPU.", flag="--amp", choices=("auto", "bf16", "fp16", "off"))
    max_steps: int | None = setting(None, "Stop after N optimizer steps (the schedule is kept).",
                                    flag="--max-steps", ge=1)
    tensorboard: bool = setting(False, "Also write TensorBoard scalars to OUT/tensorboard/.", flag="--tensorboard")
    cudnn_benchmark: bool = setting(True, "On CUDA, let cuDNN time its kernels once per input shape and keep the "
                                    "fastest.", flag="--cudnn-benchmark")
    val_every: int = setting(1, "Validate every N epochs, and in each of the last N (best.pt is chosen among "
                             "validated epochs).", flag="--val-every", ge=1)

    def __post_init__(self):
        super().__post_init__()
        start = self.optim.progressive
        if start is not None and start >= self.data.image_size:
            raise ConfigError(f"optim.progressive (--progressive) {start} must be below --image-size "
                              f"{self.data.image_size}")


@dataclass(frozen=True)
class PreviewConfig(Checked):
    """`cxr-fast preview`: which processed images to write (the data settings come from DataConfig)."""

    SECTION: ClassVar[str] = "preview"
    split: str = setting("train", "Split to read.", flag="--split", choices=constants.SPLITS)
    augment: bool = setting(True, "Apply the train-time augmentation.", flag="--augment")
    n: int = setting(16, "Number of images.", flag="--n", ge=1)
    loader: str = setting("auto", LOADER_HELP, flag="--loader", choices=LOADER_CHOICES)


@dataclass(frozen=True)
class AnalyzeConfig(Checked):
    """`cxr-fast analyze`: the split scored and what the report holds."""

    SECTION: ClassVar[str] = "analyze"
    split: str = setting("test", "Split to analyse.", flag="--split")
    device: str = setting("auto", "auto: CUDA where present.", flag="--device", choices=DEVICE_CHOICES)
    loader: str = setting("auto", LOADER_HELP, flag="--loader", choices=LOADER_CHOICES)
    top_k: int = setting(3, "False positives and negatives shown per class.", flag="--top-k", ge=0)
    bbox: str | None = setting(None, "NIH BBox_List_2017.csv: adds localisation scores (IoBB, pointing game).",
                               flag="--bbox")
    batch_size: int = setting(16, "Images per inference batch.", flag="--batch-size", ge=1)
    dataset: str = setting("nih", "With --predictions: the data-set description that reads --labels.",
                           flag="--dataset")
    bootstrap: int = setting(500, "Patient-level bootstrap resamples for AUROC CIs (0: none).", flag="--bootstrap",
                             ge=0)


@dataclass(frozen=True)
class PredictConfig(Checked):
    """`cxr-fast predict`: how new images are read and scored."""

    SECTION: ClassVar[str] = "predict"
    device: str = setting("auto", "auto: CUDA where present.", flag="--device", choices=DEVICE_CHOICES)
    batch_size: int = setting(16, "Images per inference batch.", flag="--batch-size", ge=1)
    workers: int | None = setting(None, "Threads reading and processing images (default: all cores).",
                                  flag="--workers", ge=1, le=1024)
    cam: bool = setting(False, "Write a Grad-CAM++ overlay per positive finding to OUT/cam/.", flag="--cam")
    max_pixels: int = setting(MAX_PIXELS, "Largest image accepted (width x height, checked before decoding).",
                              flag="--max-pixels", ge=1)
    operating_point: str = setting("max_f1", "The thresholds behind `findings`, chosen on validation: max F1, "
                                   "sensitivity >= 0.90 or specificity >= 0.90.", flag="--operating-point",
                                   choices=("max_f1", "sensitivity_90", "specificity_90"))
    any_modality: bool = setting(False, "Score DICOM files of any modality (default: projection radiographs only: "
                                 "CR, DX, DR, RG).", flag="--any-modality")
    min_gray_range: float = setting(0.25, "Warn when an image spans less than this share of the gray range (1st to "
                                    "99th percentile): dark, washed out or flat.", ge=0, le=1)


@dataclass(frozen=True)
class BenchLoaderConfig(Checked):
    """`cxr-fast bench loader`: one loader in steady state."""

    SECTION: ClassVar[str] = "bench.loader"
    split: str = setting("train", "Split to read.", flag="--split")
    loader: str = setting("auto", LOADER_HELP, flag="--loader", choices=LOADER_CHOICES)
    dali_cpu: bool = setting(False, "Keep the DALI pipeline on the CPU even where a GPU is present.",
                             flag="--dali-cpu")
    batch_size: int = setting(32, "Images per batch.", flag="--batch-size", ge=1)
    batches: int = setting(50, "Measured batches at the least, after --warmup (epochs repeat as needed).",
                           flag="--batches", ge=1)
    seconds: float = setting(3.0, "Measured seconds at the least: the window ends when both --batches and this are "
                             "reached.", flag="--seconds", ge=0)
    warmup: int | None = setting(None, "Batches before timing starts (prefetch fill; default: twice the workers, at "
                                 "least 10, so every worker's first wave is out of the window).", flag="--warmup",
                                 ge=0)
    image_size: int = setting(constants.IMAGE_SIZE, "Output side in pixels.", flag="--image-size", ge=32, le=4096)
    workers: int | None = setting(None, "DALI threads / DataLoader workers (default: all cores).", flag="--workers",
                                  ge=0, le=1024)
    augment: bool = setting(True, "Apply the train-time augmentation.", flag="--augment")
    decode: bool = setting(False, "Also measure decode alone per core (the decode-bound limit).", flag="--decode")


def _whole(config, names: tuple[str, ...]) -> None:
    """A benchmark measures a micro-batch it is given: `auto` (probing the GPU) is the run's alone."""
    for name in names:
        if not isinstance(getattr(config.run.optim, name), int):
            raise ConfigError(f"{config.SECTION}.run.optim.{name} (--{name.replace('_', '-')}) must be a whole "
                              f"number here, got {getattr(config.run.optim, name)!r}")


@dataclass(frozen=True)
class BenchTrainConfig(Checked):
    """`cxr-fast bench train`: the trainer's own loop for a few steps, on the run it would train (`run`: model,
    input, micro-batch and accumulation, precision, compilation, cuDNN, as for `train`)."""

    SECTION: ClassVar[str] = "bench.train"
    run: RunConfig = setting(replace(RunConfig(), **{"model.pretrained": False, "optim.batch_size": 32,
                                                     "optim.accum": 1}), "The run measured (random weights).")
    steps: int = setting(20, "Measured optimizer steps, after --warmup.", flag="--steps", ge=1)
    warmup: int = setting(3, "Optimizer steps before timing starts (autotuning, compilation).", flag="--warmup",
                          ge=1)
    data: str = setting("synthetic", "synthetic: on-device tensors (the compute ceiling); a loader name: that "
                        "loader on --shards.", flag="--data", choices=("synthetic", *LOADER_CHOICES))
    peak_tflops: float | None = setting(None, "Device peak for MFU where it is not known.", flag="--peak-tflops",
                                        gt=0)

    def __post_init__(self):
        super().__post_init__()
        _whole(self, ("batch_size", "accum"))


@dataclass(frozen=True)
class BenchRecipeConfig(Checked):
    """`cxr-fast bench recipe`: the recipe whose wall time is projected (`run`, as `train` would run it: by default
    the GPU recipe, 25 epochs progressive from 256), its epoch's images, and how long each side is measured."""

    SECTION: ClassVar[str] = "bench.recipe"
    run: RunConfig = setting(replace(RunConfig(), **{"model.pretrained": False, "optim.batch_size": 32,
                                                     "optim.progressive": 256}), "The recipe's run (random weights).")
    images: int = setting(NIH_TRAIN_IMAGES, "Training images per epoch (ChestX-ray14's official train_val list less "
                          "a 10% validation carve).", flag="--images", ge=1)
    val_images: int = setting(NIH_VAL_IMAGES, "Validation images per validated epoch (the 10% carve).",
                              flag="--val-images", ge=0)
    steps: int = setting(10, "Measured optimizer steps per side, after --warmup.", flag="--steps", ge=1)
    warmup: int = setting(3, "Optimizer steps per side before timing (compilation, autotuning).", flag="--warmup",
                          ge=1)
    eval_batches: int = setting(10, "Measured evaluation batches.", flag="--eval-batches", ge=1)
    measure_sides: int = setting(0, "Measure only this many of the schedule's sides (at least 2, evenly spaced, the "
                                 "smallest and the full one among them; each costs a compilation) and fit the "
                                 "others as time per image = a + b x side^2; 0: measure every side.",
                                 flag="--measure-sides", ge=0)
    loader_build_seconds: float = setting(2.0, "Seconds to build a loader, counted once per distinct side and once "
                                          "for validation (the loaders live across epochs; a DALI pipeline takes "
                                          "about 2 s on an H200).", flag="--loader-build-seconds", ge=0)
    gpus: int = setting(1, "GPUs to project for (linear scaling, stated as such).", flag="--gpus", ge=1)
    peak_tflops: float | None = setting(None, "Device peak for MFU where it is not known.", flag="--peak-tflops",
                                        gt=0)

    def __post_init__(self):
        super().__post_init__()
        _whole(self, ("batch_size",))
        if self.measure_sides == 1:
            raise ConfigError("bench.recipe.measure_sides (--measure-sides) 1 cannot separate the per-image cost from "
                              "the fixed one: give 2 or more, or 0 for every side")


@dataclass(frozen=True)
class DemoConfig(Checked):
    """`cxr-fast demo`: the whole workflow on synthetic (or given) data."""

    SECTION: ClassVar[str] = "demo"
    out: str = setting("outputs/demo", "Output folder.", flag="--out")
    images: str | None = setting(None, "A real NIH image folder (with --labels); default: synthetic data.",
                                 flag="--images")
    labels: str | None = setting(None, "Data_Entry_2017.csv of that download.", flag="--labels")
    n_images: int = setting(800, "Synthetic images.", flag="--n-images", ge=10)
    source_size: int = setting(512, "Side of the synthetic PNGs.", ge=64, le=8192)
    epochs: int | None = setting(None, "Override the recipe's epochs (CPU 8, GPU 3).", flag="--epochs", ge=1)
    seed: int = setting(0, "Seed of the data, the split and the run.", flag="--seed", ge=0, le=MAX_SEED)


def load_yaml(path: str | Path, cls: type = RunConfig):
    """`cls` (a run's config by default) from a YAML file; see `settings.read_yaml`."""
    return read_yaml(path, cls)


for _cls in [c for c in list(globals().values()) if isinstance(c, type) and issubclass(c, Checked) and c is not Checked]:
    check_annotations(_cls)  # an annotation the settings cannot check is refused here, at import
