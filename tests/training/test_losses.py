import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_fast.data.datasets import nih
from cxr_fast.training.engine import warmup_cosine
from cxr_fast.training.losses import FocalLoss, inverse_frequency_weights


def test_gamma_zero_unit_weights_is_bce_with_logits():
    logits, targets = torch.randn(16, 14) * 3, (torch.rand(16, 14) > 0.7).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, targets), expected, atol=1e-7)
    assert torch.allclose(FocalLoss(gamma=0.0, class_weights=torch.ones(14))(logits, targets), expected, atol=1e-7)


def test_focal_term_down_weights_easy_examples():
    targets = torch.ones(1, 14)
    easy, hard = torch.full((1, 14), 4.0), torch.full((1, 14), -1.0)
    bce = F.binary_cross_entropy_with_logits
    assert FocalLoss(2.0)(easy, targets) / bce(easy, targets) < 0.001
    assert FocalLoss(2.0)(hard, targets) / bce(hard, targets) > 0.5
    p = torch.sigmoid(torch.tensor(-1.0))
    assert torch.allclose(FocalLoss(2.0)(hard, targets), (1 - p) ** 2 * bce(hard, targets))


def test_inverse_frequency_weights_are_normalised_and_ordered():
    weights = inverse_frequency_weights({"images": 100_000, "prevalence": dict(nih.REAL_PREVALENCE)}, nih.CLASSES)
    assert weights.mean().item() == pytest.approx(1.0)
    hernia, infiltration = nih.CLASSES.index("Hernia"), nih.CLASSES.index("Infiltration")
    ratio = weights[hernia] / weights[infiltration]
    assert ratio.item() == pytest.approx(nih.REAL_PREVALENCE["Infiltration"] / nih.REAL_PREVALENCE["Hernia"])
    absent = inverse_frequency_weights({"images": 50, "prevalence": {c: 0.0 for c in nih.CLASSES}}, nih.CLASSES)
    assert torch.isfinite(absent).all()


def test_weights_scale_each_class():
    logits, targets = torch.randn(8, 14), (torch.rand(8, 14) > 0.5).float()
    weights = torch.arange(1, 15, dtype=torch.float32)
    per_class = FocalLoss(2.0)(logits[:, :1], targets[:, :1])
    weighted = FocalLoss(2.0, weights)(logits, targets)
    plain = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    assert torch.allclose(weighted, (plain * (1 - p_t) ** 2 * weights).mean())
    assert per_class > 0


def test_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    factor = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    values = np.array([factor(s) for s in range(100)])
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert np.all(np.diff(values[:10]) > 0) and np.all(np.diff(values[10:]) <= 1e-12)
    assert values[55] == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-9)  # halfway through the cosine
    assert factor(100) == pytest.approx(0.01)
