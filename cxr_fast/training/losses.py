"""Focal loss for multi-label classification, with per-class weights from inverse frequency, over stated labels.

    loss = mean over the stated (image, class) pairs of  w_c * (1 - p_t)^gamma * BCE(logit, target)

A target that is NaN is not stated (masked: an uncertain label under `ignore`, a blank one under `--blank masked`,
a class its data set lacks) and adds nothing; with every label stated this is the mean over images and classes.

p_t is the predicted probability of the true value. gamma = 2 (Lin et al. 2017) lowers the weight of the many easy
negatives. w_c = 1 / prevalence_c among the training images where c is stated, normalised so that the weights average 1 over the classes
(the loss then stays on BCE's scale); prevalence is floored at one image so an absent class gets a finite weight.
With gamma = 0 and unit weights this is BCE-with-logits exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn



def inverse_frequency_weights(split: dict, classes: tuple[str, ...]) -> torch.Tensor:
    """From a manifest split's summary: prevalence among the images where each class is stated (format 2 shards
    state every label), floored at one image."""
    stated = split.get("stated") or {c: split["images"] for c in classes}
    values = np.array([max(split["prevalence"][c], 1.0 / max(stated[c], 1)) for c in classes])
    weights = 1.0 / values
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


class FocalLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # in fp32 even under autocast: log-sigmoid of large logits underflows in half
        stated = ~torch.isnan(targets)
        targets = torch.where(stated, targets, 0.0)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if self.gamma:
            p = torch.sigmoid(logits)
            p_t = p * targets + (1 - p) * (1 - targets)
            bce = bce * (1 - p_t).pow(self.gamma)
        if self.class_weights is not None:
            bce = bce * self.class_weights
        # Summed over stated pairs and divided by their count: the mean when all are stated. A batch with none
        # stated gives 0 (its gradient too), not NaN.
        return torch.where(stated, bce, 0.0).sum() / stated.sum().clamp(min=1)
