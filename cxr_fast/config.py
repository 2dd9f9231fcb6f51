"""Every setting a user can change, with its default, its meaning and its valid range: the only home of defaults.

Frozen dataclasses per concern: the synthetic data set, the shards, the data pipeline (and its augmentation), the
model, the optimisation, and the run that holds the last four. Each field carries its help text and its rule; a
config is checked when it is built, from flags, from YAML or in code alike, and a bad value is an error that names
the field (and its flag), before any work starts. The CLI takes its defaults and help from here.

A run folder always gets the fully resolved config (`config.yaml`), so every result can be traced to its settings.
YAML files may set any subset of fields; unknown keys are an error that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from cxr_fast import constants
from cxr_fast.errors import CxrFastError


class ConfigError(CxrFastError):
    """A setting of the wrong type or out of its range; the message names the field."""


def setting(default: Any, help: str = "", *, flag: str | None = None, choices: tuple | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A config field with its help text and rule (choices, or a range: ge/gt below, le/lt above)."""
    rule = {"help": help, "flag": flag, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: default, metadata=rule)
    return field(default=default, metadata=rule)


def _coerce(name: str, kind: str, value: Any) -> Any:
    """`value` as the field's type (from its annotation text), or a ConfigError."""
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must be set (a {base})")
    if base == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if base == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if base == "int | str":  # a count or "auto"
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if base == "tuple[float, float]":
        pair = list(value) if isinstance(value, (list, tuple)) else None
        if pair is None or len(pair) != 2:
            raise ConfigError(f"{name} must be a pair [low, high], got {value!r}")
        low, high = (_coerce(name, "float", v) for v in pair)
        if low > high:
            raise ConfigError(f"{name} must be [low, high] with low <= high, got {value!r}")
        return low, high
    return value  # a nested config: checked by its own class


def _check_rule(name: str, value: Any, rule: dict) -> None:
    if value is None:
        return
    if rule["choices"] is not None and value not in rule["choices"]:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, rule['choices']))}, got {value!r}")
    tests = {"ge": (">=", lambda a, b: a >= b), "gt": (">", lambda a, b: a > b), "le": ("<=", lambda a, b: a <= b),
             "lt": ("<", lambda a, b: a < b)}
    for key, (text, passes) in tests.items():
        bound = rule[key]
        if bound is not None and not all(passes(item, bound) for item in (value if isinstance(value, tuple)
                                                                           else (value,))):
            raise ConfigError(f"{name} must be {text} {bound}, got {value!r}")


class _Checked:
    """Checks and normalises every field when the config is built (frozen: fields are set via object.__setattr__)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        for f in fields(self):
            name = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            if f.metadata.get("flag"):
                name += f" ({f.metadata['flag']})"
            value = _coerce(name, str(f.type), getattr(self, f.name))
            if f.metadata:
                _check_rule(name, value, f.metadata)
            object.__setattr__(self, f.name, value)


@dataclass(frozen=True)
class SynthConfig(_Checked):
    """The synthetic data set in the NIH layout (`cxr-fast synth`)."""

    SECTION: ClassVar[str] = "synth"
    n_images: int = setting(800, "Number of images.", flag="--n-images", ge=10)
    source_size: int = setting(1024, "Side of the square PNGs written (NIH: 1024).", flag="--source-size", ge=64,
                               le=8192)
    seed: int = setting(0, "Seed of the labels, patients and pictures.", flag="--seed", ge=0)
    no_finding_fraction: float = setting(0.54, "Share of images without a finding (NIH: 0.54).", ge=0, le=1)
    min_prevalence: float = setting(0.04, "Floor of every class's prevalence, so small sets have positives.",
                                    ge=0, le=0.5)
    test_fraction: float = setting(0.2, "Share of patients in the official-style test list.", gt=0, lt=1)
    mean_images_per_patient: float = setting(2.5, "Mean follow-ups per patient.", ge=1)


@dataclass(frozen=True)
class ShardConfig(_Checked):
    """What decides the content of the shards (and so is part of each shard's digest), and the input policy."""

    SECTION: ClassVar[str] = "shard"
    encoding: str = setting("png", "png: lossless, pixel-identical; jpeg: decodes on the GPU; raw: uint8, no "
                            "decoding.", flag="--encoding", choices=("png", "jpeg", "raw"))
    jpeg_quality: int = setting(95, "JPEG quality of --encoding jpeg.", flag="--jpeg-quality", ge=1, le=100)
    resize: int | None = setting(None, "Store images resized to N x N (INTER_AREA); default: the source size.",
                                 flag="--resize", ge=16, le=8192)
    shard_size: int = setting(1000, "Samples per tar.", flag="--shard-size", ge=1)
    seed: int = setting(0, "Seed of the split and of the sample shuffle.", flag="--seed", ge=0)
    val_fraction: float = setting(0.1, "Validation share (of train_val with the official lists); training needs "
                                  "a validation split.", flag="--val-fraction", gt=0, lt=1)
    test_fraction: float = setting(0.2, "Test share, used only without split lists.", flag="--test-fraction",
                                   ge=0, lt=1)
    on_error: str = setting("fail", "fail: stop at a bad input, remove this run's shards; skip: leave it out, "
                            "list it in the manifest.", flag="--on-error", choices=("fail", "skip"))
    max_pixels: int = setting(64_000_000, "Largest source image accepted (width x height, checked in the header "
                              "before decoding): a guard against decompression bombs.", flag="--max-pixels", ge=1)

    def __post_init__(self):
        super().__post_init__()
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"shard.val_fraction + shard.test_fraction must be < 1, got {self.val_fraction} + "
                              f"{self.test_fraction}")


@dataclass(frozen=True)
class AugmentConfig(_Checked):
    """Train-time augmentation, applied on the device by DALI (and by OpenCV in the baseline loader).

    Each transform has a probability and a range. Horizontal flip is off by default: it moves the heart to the right,
    an anatomy the test set never shows (dextrocardia is rare), so it teaches the model something false.
    """

    SECTION: ClassVar[str] = "data.augment"
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
    noise_std: float = setting(4.0, "Noise sigma in gray levels (0-255): quantum noise of a low-dose exposure.",
                               ge=0, le=128)


@dataclass(frozen=True)
class DataConfig(_Checked):
    """What the loaders make of a shard: the model input and how it is processed."""

    SECTION: ClassVar[str] = "data"
    image_size: int = setting(constants.IMAGE_SIZE, "Model input side in pixels (a multiple of 32 is best).",
                              flag="--image-size", ge=32, le=4096)
    in_chans: int = setting(1, "1: gray stem (timm folds the pretrained RGB stem); 3: gray replicated.",
                            flag="--in-chans", choices=(1, 3))
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
class ModelConfig(_Checked):
    SECTION: ClassVar[str] = "model"
    name: str = setting("convnext_large", "Any timm model name.", flag="--model")
    pretrained: bool = setting(True, "Start from ImageNet weights (timm hub).", flag="--pretrained")
    weights: str | None = setting(None, "A local ImageNet checkpoint instead of the timm hub.", flag="--weights")
    drop_rate: float = setting(0.2, "Dropout before the final Linear.", ge=0, lt=1)
    channels_last: bool = setting(True, "Channels-last memory format (tensor cores).")
    compile: bool = setting(False, "torch.compile the model.", flag="--compile")


@dataclass(frozen=True)
class OptimConfig(_Checked):
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


    def __post_init__(self):
        super().__post_init__()
        for name in ("batch_size", "accum"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"optim.{name} (--{name.replace('_', '-')}) must be auto or a whole number >= 1, "
                                  f"got {value!r}")
        if self.accum == "auto" and isinstance(self.batch_size, int) and self.effective_batch % self.batch_size:
            raise ConfigError(f"--effective-batch {self.effective_batch} is not a multiple of --batch-size "
                              f"{self.batch_size}; give --accum")


@dataclass(frozen=True)
class RunConfig(_Checked):
    data: DataConfig = setting(DataConfig(), "The data pipeline.")
    model: ModelConfig = setting(ModelConfig(), "The model.")
    optim: OptimConfig = setting(OptimConfig(), "The optimisation.")
    seed: int = setting(0, "Seed of the model, the loaders and the augmentation.", flag="--seed", ge=0)
    device: str = setting("auto", "auto: CUDA where present.", flag="--device", choices=("auto", "cuda", "cpu"))
    loader: str = setting("auto", "auto: DALI on a GPU, the OpenCV/torch DataLoader on CPU-only machines (faster "
                          "there, see benchmarks/RESULTS.md); or dali, torch.", flag="--loader",
                          choices=("auto", "dali", "torch"))
    amp: str = setting("auto", "Mixed precision: auto is bf16 on GPUs that have it, fp16 on older ones, off on "
                       "the CPU.", flag="--amp", choices=("auto", "bf16", "fp16", "off"))
    max_steps: int | None = setting(None, "Stop after N optimizer steps (the schedule is kept).",
                                    flag="--max-steps", ge=1)
    tensorboard: bool = setting(False, "Also write TensorBoard scalars to OUT/tensorboard/.", flag="--tensorboard")
    cudnn_benchmark: bool = setting(True, "On CUDA, let cuDNN time its kernels once per input shape and keep the "
                                    "fastest.", flag="--cudnn-benchmark")


def describe(cls: type, path: str) -> tuple[Any, dataclasses.Field]:
    """(default, field) of a dotted path below `cls`, e.g. describe(RunConfig, "optim.lr")."""
    head, _, rest = path.partition(".")
    found = {f.name: f for f in fields(cls)}[head]
    default = getattr(cls(), head)
    return describe(type(default), rest) if rest else (default, found)


def to_dict(config: Any) -> dict:
    """A plain nested dict (tuples as lists), for YAML and checkpoints."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# Settings renamed since cxr-fast 0.1, as read from its configs and checkpoints: old key -> (new key, conversion).
_RENAMED = {AugmentConfig: {"rotate_degrees": ("rotate_range", lambda r: (-r, r)),
                            "translate_fraction": ("translate_range", lambda t: (-t, t))}}


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict; missing fields keep their defaults, unknown keys are an error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    for old, (new, convert) in _RENAMED.get(cls, {}).items():
        if old in values and new not in values:
            values = {k: v for k, v in values.items() if k != old} | {new: convert(values[old])}
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    defaults = cls()
    kwargs = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        kwargs[name] = from_dict(type(default), value, f"{where}.{name}") if is_dataclass(default) else value
    return cls(**kwargs)


def replace(config: Any, **changes: Any) -> Any:
    """`dataclasses.replace` that accepts dotted paths: replace(cfg, **{"optim.lr": 1e-3})."""
    nested: dict[str, dict] = {}
    direct = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[key] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **direct)


def load_yaml(path: str | Path) -> RunConfig:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    try:
        return from_dict(RunConfig, values, where=str(path))
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def dump_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
