"""Focal loss for multi-label classification, with per-class weights from inverse frequency.

    loss = mean over images and classes of  w_c * (1 - p_t)^gamma * BCE(logit, target)

p_t is the predicted probability of the true value. gamma = 2 (Lin et al. 2017) lowers the weight of the many easy
negatives. w_c = 1 / prevalence_c in the training split, normalised so that the weights average 1 over the classes
(the loss then stays on BCE's scale); prevalence is floored at one image so an absent class gets a finite weight.
With gamma = 0 and unit weights this is BCE-with-logits exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_fast import constants as C


def inverse_frequency_weights(prevalence: dict[str, float], n_images: int) -> torch.Tensor:
    values = np.array([max(prevalence[c], 1.0 / max(n_images, 1)) for c in C.CLASS_NAMES])
    weights = 1.0 / values
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # in fp32 even under autocast: log-sigmoid of large logits underflows in half
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if self.gamma:
            p = torch.sigmoid(logits)
            p_t = p * targets + (1 - p) * (1 - targets)
            bce = bce * (1 - p_t).pow(self.gamma)
        if self.class_weights is not None:
            bce = bce * self.class_weights
        return bce.mean()
