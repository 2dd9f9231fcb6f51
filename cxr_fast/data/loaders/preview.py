"""`cxr-fast preview`: what the model sees (after CLAHE and augmentation, before normalisation), as image files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cxr_fast.config import DataConfig, PreviewConfig
from cxr_fast.data.loaders.loader import LoaderSpec, create_loader
from cxr_fast.files import claim_whole_folder


def write_preview(shards_dir: str | Path, data: DataConfig, config: PreviewConfig, out: str | Path,
                  seed: int) -> list[Path]:
    """Write the first `config.n` processed images as `out/<key>.png` (the shard key), and with augmentation a contact
    sheet, into a folder that is new, empty or an earlier preview's."""
    out = Path(out)
    claim_whole_folder(out, "preview", (shards_dir,))
    n = config.n
    loader = create_loader(LoaderSpec(shards_dir, config.split, data, batch_size=min(n, 16), train=config.augment,
                                      loader=config.loader, seed=seed, normalize=False))
    images = {}
    for batch in loader:
        for key, image in zip(batch.keys, batch.images):
            if len(images) < n:
                images[key] = image[0].cpu().numpy()
        if len(images) >= n:
            break
    paths = []
    for key, image in images.items():
        paths.append(out / f"{key}.png")
        cv2.imwrite(str(paths[-1]), image)
    if config.augment and images:
        paths.append(out / "contact_sheet.png")
        cv2.imwrite(str(paths[-1]), contact_sheet(list(images.values())))
    return paths


def contact_sheet(images: list[np.ndarray], columns: int = 4, tile: int = 256) -> np.ndarray:
    tiles = [cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA) for image in images]
    tiles += [np.zeros((tile, tile), np.uint8)] * (-len(tiles) % columns)
    return np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
