"""`create_model()`: a timm backbone with a head of one logit per class, ImageNet weights from the hub or a local file.

For ConvNeXt, timm's own head already is the head we want: global average pool → LayerNorm → Dropout(drop_rate) →
Linear(features, classes) (1536 → 14 for convnext_large on NIH), so the pretrained LayerNorm is kept. Other timm models get
their family's head with the same dropout. Outputs are logits; sigmoid is applied at inference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cxr_fast.config import ModelConfig
from cxr_fast.errors import CxrFastError


def create_model(config: ModelConfig, in_chans: int, num_classes: int, pretrained: bool | None = None) -> nn.Module:
    """Build the classifier. A one-channel stem folds the pretrained RGB weights (timm sums them over channels).

    pretrained=None follows the config; False is used when a checkpoint will overwrite the weights anyway. With
    `fast_norm` timm's LayerNorms run in the autocast dtype (bf16) rather than float32 with casts around them.
    """
    import timm
    from timm.layers import is_fast_norm, set_fast_norm

    if not timm.is_model(config.name):
        raise CxrFastError(f"unknown timm model {config.name!r} (e.g. convnext_large, convnext_atto)")
    previous = is_fast_norm()
    set_fast_norm(config.fast_norm)  # read by each norm layer as it is built; a process-wide switch, put back below
    try:
        model = _timm_model(config, in_chans, num_classes, config.pretrained if pretrained is None else pretrained)
    finally:
        set_fast_norm(previous)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _timm_model(config: ModelConfig, in_chans: int, num_classes: int, use_pretrained: bool) -> nn.Module:
    import timm

    kwargs = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": config.drop_rate}
    if config.weights and use_pretrained is not False:
        path = Path(config.weights)
        if not path.is_file():
            raise CxrFastError(f"--weights {path}: no such file")
        try:
            return timm.create_model(config.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                     **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            reason = str(error).splitlines()[0][:300]
            raise CxrFastError(f"--weights {path} does not fit {config.name}: {reason}") from None
    if use_pretrained:
        try:
            return timm.create_model(config.name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as error:  # huggingface_hub's offline and not-found errors are OSErrors
            raise CxrFastError(
                f"could not get ImageNet weights for {config.name} from the timm hub ({type(error).__name__}). "
                f"If this machine is offline, pass --weights FILE (a timm or torch checkpoint of {config.name}, e.g. "
                f"downloaded elsewhere), or --no-pretrained to train from random weights.") from None
    return timm.create_model(config.name, pretrained=False, **kwargs)
