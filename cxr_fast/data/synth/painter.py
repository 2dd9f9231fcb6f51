"""The synthetic pictures and what is drawn for them: labels with NIH's prevalence order and label counts, patients
with follow-ups, ages, sexes and views, and a chest painter with a visual signal per finding that a small CNN can learn.
The layouts (`layouts.py`) write them as NIH, CheXpert or MIMIC-CXR-JPG ship their files.

Images are chest-like (body, two lung fields with texture, heart, ribs, diaphragm, noise). Each finding adds a
pattern that differs in *appearance*, not only position, because a CNN with global pooling sees appearance best:
a band (Atelectasis), an enlarged heart (Cardiomegaly), a filled lung base (Effusion), and so on. Labels are drawn
with the real prevalence order and typical label counts per image; rare classes are floored at `min_prevalence` so
that a few hundred images still have positives of every class in every split.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cxr_fast.config import SynthConfig
from cxr_fast.data.datasets import nih

log = logging.getLogger(__name__)

CLASSES = nih.CLASSES  # the painter's findings
# Findings that often come together in the real table (Effusion with Atelectasis or Infiltration, Edema with
# Effusion, ...): after the first finding of an image, these partners are three times as likely.
CO_OCCURRING = {
    "Effusion": ("Atelectasis", "Infiltration", "Edema", "Consolidation"),
    "Atelectasis": ("Effusion", "Infiltration", "Consolidation"),
    "Infiltration": ("Effusion", "Atelectasis", "Nodule", "Pneumonia"),
    "Mass": ("Nodule",),
    "Nodule": ("Mass", "Infiltration"),
    "Edema": ("Effusion", "Infiltration", "Pneumonia"),
    "Emphysema": ("Pneumothorax",),
    "Pneumothorax": ("Emphysema",),
}
# Number of findings in an image that has any (the real table: about 60% one, 25% two, 15% more).
FINDINGS_PER_IMAGE = {1: 0.6, 2: 0.27, 3: 0.1, 4: 0.03}


def draw_labels(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_images, 14) multi-hot labels with the real prevalence order and co-occurrence pattern."""
    weights = np.array([max(nih.REAL_PREVALENCE[c], config.min_prevalence) for c in CLASSES])
    counts = list(FINDINGS_PER_IMAGE)
    count_p = np.array(list(FINDINGS_PER_IMAGE.values()))
    labels = np.zeros((config.n_images, len(CLASSES)), dtype=np.uint8)
    for row in labels:
        if rng.random() < config.no_finding_fraction:
            continue
        k = rng.choice(counts, p=count_p)
        p = weights.copy()
        for _ in range(k):
            chosen = rng.choice(len(CLASSES), p=p / p.sum())
            row[chosen] = 1
            p[chosen] = 0
            for partner in CO_OCCURRING.get(CLASSES[chosen], ()):
                p[CLASSES.index(partner)] *= 3
    return labels


def draw_patients(config: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Patient id and follow-up number per image: several images per patient, geometric counts."""
    patients, followups = [], []
    patient = 0
    while len(patients) < config.n_images:
        patient += 1
        n = min(rng.geometric(1 / config.mean_images_per_patient), config.n_images - len(patients))
        patients += [patient] * n
        followups += list(range(n))
    return np.array(patients), np.array(followups)


class ChestPainter:
    """Draws one synthetic radiograph; all sizes are given at 1024 px and scaled to the requested size."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.s = size / 1024.0
        self.rng = rng

    def px(self, value: float) -> int:
        return max(1, int(round(value * self.s)))

    def paint(self, labels: np.ndarray, anatomy: dict) -> np.ndarray:
        size, rng = self.size, self.rng
        image = np.full((size, size), 25.0, np.float32)
        cv2.ellipse(image, (size // 2, self.px(560)), (self.px(450), self.px(520)), 0, 0, 360, 105, -1)
        lungs = np.zeros_like(image)
        lung_axes = (self.px(anatomy["lung_w"]), self.px(anatomy["lung_h"]))
        centres = [(self.px(512 - 215), self.px(470)), (self.px(512 + 215), self.px(470))]
        for centre in centres:
            cv2.ellipse(lungs, centre, lung_axes, 0, 0, 360, 1.0, -1)
        texture = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), self.px(6))
        lung_level = 60.0 - (25.0 if labels[CLASSES.index("Emphysema")] else 0.0)
        image = image * (1 - lungs) + (lung_level + 60 * texture) * lungs
        ribs = np.zeros_like(image)
        for k in range(6):  # ribs: bright arcs over the lungs (bone attenuates: brighter, added on top)
            y = self.px(250 + 85 * k)
            for cx in (self.px(300), self.px(724)):
                cv2.ellipse(ribs, (cx, y), (self.px(230), self.px(60)), 0, 180, 360, 35, self.px(14))
        image += ribs
        heart_scale = 1.55 if labels[CLASSES.index("Cardiomegaly")] else 1.0
        heart_axes = (self.px(120 * heart_scale), self.px(150 * heart_scale))
        cv2.ellipse(image, (self.px(555), self.px(640)), heart_axes, 20, 0, 360, 165, -1)
        cv2.ellipse(image, (size // 2, self.px(900)), (self.px(480), self.px(120)), 0, 180, 360, 150, -1)
        for index in np.flatnonzero(labels):
            getattr(self, "_" + CLASSES[index].lower())(image, centres, lung_axes)
        image += rng.normal(0, 4, image.shape).astype(np.float32)
        return np.clip(image, 0, 255).astype(np.uint8)

    def _in_lung(self, centres, axes, margin: float = 0.55) -> tuple[int, int]:
        cx, cy = centres[self.rng.integers(2)]
        angle = self.rng.uniform(0, 2 * np.pi)
        radius = np.sqrt(self.rng.uniform(0, 1)) * margin
        return int(cx + radius * axes[0] * np.cos(angle)), int(cy + radius * axes[1] * np.sin(angle))

    def _atelectasis(self, image, centres, axes):  # a plate-like horizontal band
        x, y = self._in_lung(centres, axes)
        cv2.line(image, (x - self.px(130), y), (x + self.px(130), y + self.px(15)), 200, self.px(50))

    def _cardiomegaly(self, image, centres, axes):  # drawn by paint(): the heart is 1.55 times larger
        pass

    def _effusion(self, image, centres, axes):  # fluid fills the base of one lung, with a meniscus
        cx, cy = centres[self.rng.integers(2)]
        top = cy + int(axes[1] * self.rng.uniform(0.2, 0.45))
        mask = np.zeros_like(image)
        cv2.ellipse(mask, (cx, cy), axes, 0, 0, 360, 1.0, -1)
        mask[:top] = 0
        image[:] = image * (1 - mask) + 185 * mask

    def _infiltration(self, image, centres, axes):  # patchy fluffy spots
        patch = np.zeros_like(image)
        for _ in range(25):
            cv2.circle(patch, self._in_lung(centres, axes, 0.8), self.px(22), 1.0, -1)
        image += 70 * cv2.GaussianBlur(patch, (0, 0), self.px(8))

    def _mass(self, image, centres, axes):  # one large sharp round opacity
        cv2.circle(image, self._in_lung(centres, axes), self.px(self.rng.uniform(70, 90)), 205, -1)

    def _nodule(self, image, centres, axes):  # a few small sharp dots
        for _ in range(4):
            cv2.circle(image, self._in_lung(centres, axes, 0.7), self.px(38), 225, -1)

    def _pneumonia(self, image, centres, axes):  # a large cloudy opacity
        blob = np.zeros_like(image)
        cv2.circle(blob, self._in_lung(centres, axes, 0.4), self.px(130), 1.0, -1)
        image += 85 * cv2.GaussianBlur(blob, (0, 0), self.px(45))

    def _pneumothorax(self, image, centres, axes):  # black, texture-free apex with a thin pleural line
        cx, cy = centres[self.rng.integers(2)]
        centre, gap_axes = (cx, cy - axes[1] // 2), (int(axes[0] * 0.8), axes[1] // 2)
        cv2.ellipse(image, centre, gap_axes, 0, 180, 360, 5, -1)
        cv2.ellipse(image, centre, gap_axes, 0, 180, 360, 230, self.px(8))

    def _consolidation(self, image, centres, axes):  # a dense homogeneous square-edged opacity
        x, y = self._in_lung(centres, axes)
        half = self.px(80)
        cv2.rectangle(image, (x - half, y - half), (x + half, y + half), 175, -1)

    def _edema(self, image, centres, axes):  # Kerley B lines near both lung bases
        for cx, cy in centres:
            for k in range(5):
                y = cy + int(axes[1] * 0.25) + self.px(38 * k)
                cv2.line(image, (cx - self.px(120), y), (cx + self.px(120), y), 200, self.px(12))

    def _emphysema(self, image, centres, axes):  # drawn by paint(): darker, hyperlucent lungs
        pass

    def _fibrosis(self, image, centres, axes):  # a reticular net
        x, y = self._in_lung(centres, axes, 0.4)
        half, step = self.px(150), self.px(50)
        for offset in range(-half, half + 1, step):
            cv2.line(image, (x + offset, y - half), (x + offset, y + half), 190, self.px(10))
            cv2.line(image, (x - half, y + offset), (x + half, y + offset), 190, self.px(10))

    def _pleural_thickening(self, image, centres, axes):  # a thick bright rim along the outer lung edge
        side = self.rng.integers(2)
        cx, cy = centres[side]
        start = 120 if side == 0 else -60
        cv2.ellipse(image, (cx, cy), axes, 0, start, start + 140, 235, self.px(48))

    def _hernia(self, image, centres, axes):  # a gas-filled ring behind the heart, at the midline
        centre = (self.size // 2 + self.px(self.rng.uniform(-40, 40)), self.px(720))
        cv2.circle(image, centre, self.px(75), 15, -1)
        cv2.circle(image, centre, self.px(75), 230, self.px(16))


def _paint_one(job: tuple) -> None:
    path, labels, anatomy, size, seed, height, bits = job
    painter = ChestPainter(size, np.random.default_rng(seed))
    image = painter.paint(labels, anatomy)
    if height > size:  # a taller film: the square picture on a dark band above and below
        top = (height - size) // 2
        image = cv2.copyMakeBorder(image, top, height - size - top, 0, 0, cv2.BORDER_CONSTANT, value=12)
    if bits > 8:  # a detector's range in a 16-bit PNG (PadChest's): the 8-bit picture spread over `bits` bits
        image = (image.astype(np.uint16) << (bits - 8)) + np.uint16(37)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []  # PNG: lossless
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f"cannot write {path}")


@dataclass
class Drawn:
    """What every layout writes: per image its NIH labels, patient, follow-up, age, sex and view, and per patient
    the anatomy the painter keeps across follow-ups."""

    labels: np.ndarray
    patients: np.ndarray
    followups: np.ndarray
    ages: list
    sexes: list
    views: np.ndarray
    anatomy: dict

    def pick(self, rows: list[int]) -> Drawn:
        """Images `rows` of this draw (repeats allowed: a study's second image)."""
        return Drawn(self.labels[rows], self.patients[rows], self.followups[rows], [self.ages[i] for i in rows],
                     [self.sexes[i] for i in rows], self.views[rows], self.anatomy)


def draw(config: SynthConfig, rng: np.random.Generator) -> Drawn:
    labels = draw_labels(config, rng)
    patients, followups = draw_patients(config, rng)
    anatomy = {p: {"lung_w": rng.uniform(150, 175), "lung_h": rng.uniform(250, 300)} for p in set(patients)}
    ages = {p: int(rng.integers(18, 90)) for p in set(patients)}
    sexes = {p: rng.choice(["M", "F"]) for p in set(patients)}
    return Drawn(labels, patients, followups, [ages[p] + f // 2 for p, f in zip(patients, followups)],
                 [sexes[p] for p in patients], rng.choice(["PA", "AP"], size=len(patients), p=[0.6, 0.4]), anatomy)


def paint(paths: list[Path], drawn: Drawn, config: SynthConfig, height: int | None = None, bits: int = 8) -> None:
    """Paint image i of `drawn` to paths[i] (PNG or JPEG by suffix), in parallel; `height` > the side pads it;
    `bits` > 8 writes 16-bit PNGs holding that many bits."""
    jobs = [(path, drawn.labels[i], drawn.anatomy[drawn.patients[i]], config.source_size,
             config.seed * 1_000_003 + i, height or config.source_size, bits) for i, path in enumerate(paths)]
    with multiprocessing.get_context("spawn").Pool(config.workers) as pool:
        for _ in tqdm(pool.imap_unordered(_paint_one, jobs, chunksize=8), total=len(jobs), desc="synth", unit="img"):
            pass
