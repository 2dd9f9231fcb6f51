"""The FLOP count behind MFU: grouped (depthwise) convolutions' backward counted as what it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr_fast.bench.flops import training_flops_per_image
from cxr_fast.config import ModelConfig
from cxr_fast.training.model import create_model


def test_depthwise_backward_costs_twice_its_forward():
    # One depthwise 7x7 convolution, 16 channels, 8x8 output: forward 2 * 64 * 16 * 49 multiply-adds per image.
    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16, bias=False)
    model = nn.Sequential(nn.Conv2d(1, 16, 1, bias=False), conv)
    flops = training_flops_per_image(model, 1, 8, torch.device("cpu"))
    forward = 2 * 64 * 16 * 1 + 2 * 64 * 16 * 49
    assert flops["forward_flops_per_image"] == forward
    # Backward: input and weight gradients of the depthwise conv, the weight gradient only of the first one (its
    # input needs no gradient).
    assert flops["flops_per_image"] == forward + 2 * (2 * 64 * 16 * 49) + 2 * 64 * 16 * 1
    assert flops["torch_counted_flops_per_image"] > flops["flops_per_image"]  # torch counts the depthwise one densely


@pytest.mark.parametrize("name", ["convnext_atto"])
def test_convnext_training_flops_are_three_forwards(name):
    model = create_model(ModelConfig(name=name, pretrained=False), in_chans=1, num_classes=14)
    flops = training_flops_per_image(model, 1, 64, torch.device("cpu"))
    # Every conv and matmul after the stem needs both gradients; the stem's input needs none (one forward less).
    ratio = flops["flops_per_image"] / flops["forward_flops_per_image"]
    assert 2.95 < ratio <= 3.0
    assert flops["torch_counted_flops_per_image"] / flops["forward_flops_per_image"] > 6
