"""Progressive resolution: the input side of each training epoch.

Low-resolution early epochs and full resolution at the end, as FFCV's ImageNet configs (a linear ramp in multiples
of 32) and Composer's progressive resizing (start at about half size, fine-tune at full size) do; it rests on the
train/test resolution effect (Touvron et al., FixRes): a network trained at a lower side adapts to the full side
in its last epochs. Compute per image grows with the square of the side, so 256 → 512 over 25 epochs (the last 3 at
512) costs 0.58 of the fixed run's FLOPs.

The side ramps linearly from START at the first epoch towards the full side, rounded down to a multiple of 32 (never
below START); the final `final_epochs` epochs run at the full side. Validation, the checkpoints' choices, calibration
and everything after training run at the full side only. The schedule is a function of the run's config, so a
resumed run with another --epochs re-plans it as it re-plans the learning rate.
"""

from __future__ import annotations

STEP = 32  # sides stay multiples of 32: ConvNeXt downsamples by 32, and shapes repeat (fewer compiled graphs)


def side_schedule(image_size: int, epochs: int, start: int | None, final_epochs: int) -> list[int]:
    """The training side of each epoch (epoch 0 first); every epoch at `image_size` when `start` is None."""
    if start is None or start >= image_size:
        return [image_size] * epochs
    ramp = max(0, epochs - final_epochs)
    sides = []
    for epoch in range(epochs):
        if epoch >= ramp:
            sides.append(image_size)
        else:
            side = start + (image_size - start) * epoch / ramp
            sides.append(max(start, int(side) // STEP * STEP))
    return sides


def flops_ratio(sides: list[int], image_size: int) -> float:
    """Training compute of a schedule against every epoch at `image_size` (compute per image ∝ side²)."""
    return sum(side * side for side in sides) / (len(sides) * image_size * image_size)
