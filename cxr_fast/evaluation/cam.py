"""Grad-CAM++ (the `grad-cam` package) on the last convolutional stage of the model's family (`TARGET_LAYERS`:
ConvNeXt, ResNet, EfficientNet, DenseNet), overlays, and localisation scores against the NIH boxes (Wang et al. 2017:
a box around the thresholded map, scored by IoBB; plus the pointing game).

Maps are computed one image and one class at a time, on the logit of that class: in multi-label models a batched
call attributes the summed targets of the batch, and Grad-CAM++'s second-order terms amplify such mixing.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from cxr_fast.errors import CxrFastError

IOBB_THRESHOLDS = (0.1, 0.25, 0.5)
# Wang et al. threshold the heat map to draw a box; 0.5 of the map's maximum is the usual choice.
BOX_LEVEL = 0.5


# The layer whose feature maps Grad-CAM++ weighs, per model family (timm class name): the last convolutional stage,
# whose maps still have a spatial layout (1/32 of the input). Transformers would need a reshape; none is listed.
TARGET_LAYERS = {
    "ConvNeXt": lambda model: model.stages[-1],
    "ResNet": lambda model: model.layer4,
    "EfficientNet": lambda model: model.conv_head,
    "DenseNet": lambda model: model.features,
}


def target_layer(model: nn.Module) -> nn.Module:
    family = type(model).__name__
    if family not in TARGET_LAYERS:
        raise CxrFastError(f"Grad-CAM++ has no target layer for {family} models; known: {', '.join(TARGET_LAYERS)}")
    return TARGET_LAYERS[family](model)


class CamExplainer:
    def __init__(self, model: nn.Module):
        from pytorch_grad_cam import GradCAMPlusPlus

        self.model = model.eval()
        self.cam = GradCAMPlusPlus(model=self.model, target_layers=[target_layer(self.model)])

    def __call__(self, image: torch.Tensor, class_index: int) -> np.ndarray:
        """(H, W) map in [0, 1] at the input's size for one normalised image (1, C, H, W) and one class."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with torch.autocast(device_type=image.device.type, enabled=False):
            grayscale = self.cam(input_tensor=image.float(), targets=[ClassifierOutputTarget(class_index)])[0]
        grayscale = np.nan_to_num(grayscale.astype(np.float32))
        return np.clip(grayscale, 0.0, 1.0)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """BGR image: the processed input with the map in the JET colours on top."""
    heat = cv2.applyColorMap(np.uint8(255 * cam), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(heat, alpha, base, 1 - alpha, 0)


def cam_box(cam: np.ndarray, level: float = BOX_LEVEL) -> tuple[int, int, int, int]:
    """x, y, w, h of the largest connected region where the map is at least `level` of its maximum."""
    mask = (cam >= level * cam.max()).astype(np.uint8) if cam.max() > 0 else np.ones_like(cam, np.uint8)
    count, _labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if count > 1 else 0
    x, y, w, h = stats[largest, :4]
    return int(x), int(y), int(w), int(h)


def iobb(predicted: tuple, truth: tuple) -> float:
    """Intersection over the predicted box's area (Wang et al. 2017)."""
    px, py, pw, ph = predicted
    tx, ty, tw, th = truth
    iw = max(0.0, min(px + pw, tx + tw) - max(px, tx))
    ih = max(0.0, min(py + ph, ty + th) - max(py, ty))
    return iw * ih / (pw * ph) if pw * ph else 0.0


def pointing_hit(cam: np.ndarray, truth: tuple) -> bool:
    """Whether the map's maximum falls inside the true box."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    tx, ty, tw, th = truth
    return tx <= x <= tx + tw and ty <= y <= ty + th
