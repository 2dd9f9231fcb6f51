"""MFU's two sides: training FLOPs per image (the grouped-convolution backward counted right) and the device's dense
bf16 peak."""

from __future__ import annotations

import re

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


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by the device name torch reports, most specific first: the
# PCIe and NVL parts of the H100/H200 run at lower clocks and power than the SXM ones ("NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = (
    (r"H100 PCIe", 756.0), (r"H100 NVL", 835.0), (r"H200 NVL", 835.0), (r"H100", 989.4), (r"H200", 989.4),
    (r"GH200", 989.4), (r"A100", 312.0), (r"L40S", 362.0), (r"L4\b", 121.0), (r"A10\b", 125.0),
)


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU by its full name, or None where it is not listed (give --peak-tflops)."""
    if not device_name:
        return None
    return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, device_name)), None)


def device_peak(device: torch.device, override_tflops: float | None = None) -> tuple[str | None, float | None]:
    """(GPU name, peak FLOP/s): the override where given, else the table's value for this GPU; None on the CPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = override_tflops if override_tflops else peak_tflops(name)
    return name, peak * 1e12 if peak else None
