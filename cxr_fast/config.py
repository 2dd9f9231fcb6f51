"""Run configuration: frozen dataclasses for data, augmentation, model, optimisation and the run itself.

A run folder always gets the fully resolved config (`config.yaml`), so every result can be traced to its settings.
YAML files may set any subset of fields; unknown keys are an error that names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from cxr_fast import constants
from cxr_fast.errors import CxrFastError


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation, applied on the device by DALI (and by OpenCV in the baseline loader).

    Each transform has a probability and a range. Horizontal flip is off by default: it moves the heart to the right,
    an anatomy the test set never shows (dextrocardia is rare), so it teaches the model something false.
    """

    affine_prob: float = 0.8
    rotate_degrees: float = 7.0  # patient positioning varies by a few degrees
    scale_range: tuple[float, float] = (0.9, 1.1)  # distance to the detector varies
    translate_fraction: float = 0.05  # of the image side, both axes
    hflip_prob: float = 0.0
    brightness_contrast_prob: float = 0.5
    brightness_range: tuple[float, float] = (0.9, 1.1)  # multiplicative, exposure differences between scanners
    contrast_range: tuple[float, float] = (0.9, 1.1)
    noise_prob: float = 0.3
    noise_std: float = 4.0  # gray levels (0-255 scale): quantum noise of a low-dose exposure


@dataclass(frozen=True)
class DataConfig:
    image_size: int = constants.IMAGE_SIZE
    in_chans: int = 1  # gray stays one channel; timm folds the pretrained RGB stem (see benchmarks/RESULTS.md)
    clahe_clip_limit: float = constants.CLAHE_CLIP_LIMIT
    clahe_tiles: int = constants.CLAHE_TILES
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # DALI CPU threads, or torch DataLoader workers (0: in-process). None: this machine's cores shared among the
    # ranks on it, since PNG decoding runs on the CPU even in DALI and must keep up with the GPU.
    num_threads: int | None = None
    shuffle_buffer: int = 512  # DALI's reader shuffles within this many samples (shards are pre-shuffled)
    # Share of JPEG decoding sent to the GPU's hardware JPEG engines (A100, H100, H200) by DALI's mixed decoder; the
    # rest goes to the CUDA decoder. 0.65 is DALI's default.
    hw_decoder_load: float = 0.65


@dataclass(frozen=True)
class ModelConfig:
    name: str = "convnext_large"
    pretrained: bool = True
    weights: str | None = None  # a local checkpoint file instead of the timm hub
    drop_rate: float = 0.2  # the dropout before the final Linear
    channels_last: bool = True
    compile: bool = False


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    batch_size: int = 4  # per device and micro-step
    accum: int = 8  # micro-steps per optimizer step: 4 x 8 = 32 images per step
    epochs: int = 25
    warmup_fraction: float = 0.03  # of all optimizer steps, linear from 0
    min_lr_ratio: float = 0.01  # cosine ends at lr * min_lr_ratio
    clip_grad_norm: float = 1.0
    focal_gamma: float = 2.0
    class_weighting: str = "inverse_frequency"  # or "none"
    ema_decay: float = 0.0  # 0 turns EMA off


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    loader: str = "dali"  # dali | torch
    amp: str = "auto"  # auto | bf16 | fp16 | off
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests); the schedule is unchanged


def to_dict(config: Any) -> dict:
    """A plain nested dict (tuples as lists), for YAML and checkpoints."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict; missing fields keep their defaults, unknown keys are an error."""
    if not isinstance(values, dict):
        raise CxrFastError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CxrFastError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    defaults = cls()
    for name, value in values.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            kwargs[name] = from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
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
        raise CxrFastError(f"cannot read config {path}: {error}") from None
    return from_dict(RunConfig, values, where=str(path))


def dump_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
