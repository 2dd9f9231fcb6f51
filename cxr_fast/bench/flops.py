"""Training FLOPs per image, with the grouped-convolution backward counted right: the numerator of MFU."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **_kwargs) -> int:
    """Each gradient asked for (input, weight) costs what the forward convolution costs. `w_shape` is
    (C_out, C_in / groups, kh, kw), so this honours groups; torch's own formula counts the weight gradient of a
    depthwise convolution as a dense one, once per channel (ConvNeXt: about 3x the true training FLOPs).
    `args` are aten.convolution_backward's: bias sizes, stride, padding, dilation, transposed, output padding,
    groups, output mask."""
    transposed, output_mask = args[4], args[7]
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def training_flops_per_image(model: torch.nn.Module, in_chans: int, image_size: int, device: torch.device) -> dict:
    """Forward and forward + backward FLOPs of one image (counted on a batch of 2), with the grouped-convolution
    backward counted right; `torch_counted` is what torch.utils.flop_counter says unpatched, for comparison."""
    aten = torch.ops.aten
    x = torch.randn(2, in_chans, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    counts = {}
    for name, mapping in (("corrected", {aten.convolution_backward: _conv_backward_flop}), ("torch", {})):
        forward_counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with forward_counter:
            out = model(x)
        backward_counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with backward_counter:
            out.sum().backward()
        model.zero_grad(set_to_none=True)
        counts[name] = (forward_counter.get_total_flops() / 2, backward_counter.get_total_flops() / 2)
    forward, backward = counts["corrected"]
    return {"forward_flops_per_image": forward, "flops_per_image": forward + backward,
            "torch_counted_flops_per_image": sum(counts["torch"])}
