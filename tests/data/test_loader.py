import json
import os
import shutil
import sys
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import needs_real_data
from cxr_fast.cli import cli
from cxr_fast.config import DataConfig
from cxr_fast.errors import CxrFastError
from cxr_fast.data.loaders.loader import LoaderSpec, create_loader, rank_range
from cxr_fast.data.shards.manifest import load_manifest, split_shards
from cxr_fast.data.shards.tars import walk_tar

LOADER_NAMES = ["dali", "torch"]
SMALL = DataConfig(image_size=128)


def _collect(loader):
    images, targets = {}, {}
    for batch in loader:
        for key, image, target in zip(batch.keys, batch.images, batch.targets):
            assert key not in images, f"{key} seen twice"
            images[key], targets[key] = image.cpu().numpy(), target.cpu().numpy()
    return images, targets


def _labels_from_json(shards, split):
    labels = {}
    for tar in split_shards(shards, split):
        for key, sample in walk_tar(tar):
            labels[key] = json.loads(sample["json"])["labels"]
    return labels


@needs_real_data
def test_loaders_agree_and_match_opencv_reference(real_shards):
    config = DataConfig(image_size=512)
    device = os.environ.get("CXR_FAST_TEST_DEVICE", "cpu")  # tools/gpu_check.sh runs this with the GPU pipeline
    dali, _ = _collect(create_loader(LoaderSpec(real_shards, "val", config, batch_size=8, train=False, normalize=False,
                                                device=device, loader="dali")))
    torch_, _ = _collect(create_loader(LoaderSpec(real_shards, "val", config, batch_size=8, train=False,
                                                  normalize=False, loader="torch")))
    assert dali.keys() == torch_.keys() and len(dali) == load_manifest(real_shards)["splits"]["val"]["images"]
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    from conftest import REAL_IMAGES

    between, to_reference = [], {"dali": [], "torch": []}
    for key in dali:
        reference = clahe.apply(cv2.resize(cv2.imread(str(REAL_IMAGES / f"{key}.png"), cv2.IMREAD_GRAYSCALE),
                                           (512, 512), interpolation=cv2.INTER_AREA)).astype(float)
        a, b = dali[key][0].astype(float), torch_[key][0].astype(float)
        assert a.shape == (512, 512)
        between.append(np.abs(a - b).mean())
        to_reference["dali"].append(np.abs(a - reference).mean())
        to_reference["torch"].append(np.abs(b - reference).mean())
    print(f"MAD dali-torch {np.mean(between):.3f}, dali-ref {np.mean(to_reference['dali']):.3f}, "
          f"torch-ref {np.mean(to_reference['torch']):.3f}")
    assert np.mean(between) <= 1.0
    assert np.mean(to_reference["dali"]) <= 3.0 and np.mean(to_reference["torch"]) <= 3.0


@needs_real_data
def test_loaders_agree_at_a_reduced_side(real_shards):
    """A progressive epoch's side: CLAHE at --image-size in both loaders, then down to the side; they agree as at the
    full side, and the torch loader's image is the full-side reference resized."""
    config = DataConfig(image_size=512)
    spec = LoaderSpec(real_shards, "val", config, batch_size=8, normalize=False, side=256)
    dali, _ = _collect(create_loader(replace(spec, loader="dali")))
    torch_, _ = _collect(create_loader(replace(spec, loader="torch", data=replace(config, workers=0))))
    full, _ = _collect(create_loader(replace(spec, loader="torch", side=None, data=replace(config, workers=0))))
    between = [np.abs(dali[k][0].astype(float) - torch_[k][0].astype(float)).mean() for k in dali]
    assert dali.keys() == torch_.keys() and next(iter(dali.values())).shape == (1, 256, 256)
    assert np.mean(between) <= 1.0
    for key in list(full)[:4]:
        np.testing.assert_array_equal(torch_[key][0], cv2.resize(full[key][0], (256, 256), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("loader_name", LOADER_NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_labels_stay_with_their_images(synth_shards, loader_name, train):
    expected = _labels_from_json(synth_shards, "val")
    images, targets = _collect(create_loader(LoaderSpec(synth_shards, "val", SMALL, batch_size=5, train=train,
                                                        loader=loader_name)))
    assert set(targets) == set(expected)
    for key, target in targets.items():
        np.testing.assert_array_equal(target, expected[key])


@pytest.mark.parametrize("loader_name", LOADER_NAMES)
def test_batches_are_normalized_channels_last_float(synth_shards, loader_name):
    batch = next(iter(create_loader(LoaderSpec(synth_shards, "train", SMALL, batch_size=4, train=True,
                                               loader=loader_name))))
    assert batch.images.shape == (4, 1, 128, 128) and batch.images.dtype == torch.float32
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.targets.shape == (4, 14) and batch.targets.dtype == torch.float32
    assert -3 < batch.images.mean() < 3 and batch.images.std() > 0.3
    three = next(iter(create_loader(LoaderSpec(synth_shards, "train", DataConfig(image_size=64, in_chans=3),
                                               batch_size=2, train=True, loader=loader_name))))
    assert three.images.shape == (2, 3, 64, 64) and three.images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("loader_name", LOADER_NAMES)
def test_same_seed_same_batches_other_seed_other_batches(synth_shards, loader_name):
    def first_batches(seed):
        loader = create_loader(LoaderSpec(synth_shards, "train", SMALL, batch_size=8, train=True, seed=seed,
                                          loader=loader_name))
        batches = []
        for batch in loader:
            batches.append((batch.keys, batch.images.clone()))
            if len(batches) == 2:
                break
        return batches

    a, b, c = first_batches(7), first_batches(7), first_batches(8)
    for (keys_a, images_a), (keys_b, images_b) in zip(a, b):
        assert keys_a == keys_b and torch.equal(images_a, images_b)
    assert a[0][0] != c[0][0] or not torch.equal(a[0][1], c[0][1])


@pytest.mark.parametrize("loader_name", LOADER_NAMES)
def test_augmentation_changes_images_but_not_eval(synth_shards, loader_name):
    plain, _ = _collect(create_loader(LoaderSpec(synth_shards, "val", SMALL, batch_size=8, train=False,
                                                 loader=loader_name)))
    again, _ = _collect(create_loader(LoaderSpec(synth_shards, "val", SMALL, batch_size=8, train=False,
                                                 loader=loader_name)))
    augmented, _ = _collect(create_loader(LoaderSpec(synth_shards, "val", SMALL, batch_size=8, train=True,
                                                     loader=loader_name)))
    assert all(np.array_equal(plain[k], again[k]) for k in plain)
    changed = [np.abs(plain[k] - augmented[k]).mean() > 0.01 for k in plain]
    assert np.mean(changed) > 0.5


@pytest.mark.parametrize("workers", [0, 2])
def test_a_torch_loader_kept_across_epochs_reseeds_like_a_new_one(synth_shards, workers):
    """The run keeps one DataLoader (and its workers) for every epoch: re-seeded, it yields what a loader built with
    that seed yields, every sample once."""
    def spec(seed):
        return LoaderSpec(synth_shards, "train", replace(SMALL, image_size=32, workers=workers), batch_size=8,
                          train=True, seed=seed, loader="torch")

    kept = create_loader(spec(1))
    first, _ = _collect(kept)
    kept.reseed(2)
    second, _ = _collect(kept)
    fresh, _ = _collect(create_loader(spec(2)))
    assert list(second) == list(fresh) and all(np.array_equal(second[k], fresh[k]) for k in fresh)
    assert sorted(first) == sorted(second) == sorted(_labels_from_json(synth_shards, "train"))
    assert list(first) != list(second) or any(not np.array_equal(first[k], second[k]) for k in first)


def test_forever_leaves_out_the_short_last_batch():
    from cxr_fast.bench.loader import Forever

    class Epochs:
        def __iter__(self):
            yield from (type("B", (), {"keys": list(range(n))})() for n in (8, 8, 3))

    stream = iter(Forever(Epochs(), full_batches=True))
    assert [len(next(stream).keys) for _ in range(5)] == [8] * 5


# (split, batch size, ranks, train): batch sizes that do not divide the per-rank counts, ranks with unequal shares.
EXACTNESS_CASES = [("train", 5, 2, True), ("train", 8, 3, False), ("val", 4, 2, True), ("test", 3, 3, True),
                   ("test", 7, 1, False), ("val", 64, 2, False)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
@pytest.mark.parametrize("loader_name, workers", [("dali", 2), ("torch", 0), ("torch", 3)])
@pytest.mark.parametrize("split, batch_size, ranks, train", EXACTNESS_CASES)
def test_every_sample_exactly_once_and_len_is_exact(synth_shards, loader_name, workers, split, batch_size, ranks,
                                                    train):
    expected = sorted(_labels_from_json(synth_shards, split))
    config = DataConfig(image_size=32, workers=workers)
    seen = []
    for rank in range(ranks):
        loader = create_loader(LoaderSpec(synth_shards, split, config, batch_size=batch_size, train=train, rank=rank,
                                          world_size=ranks, loader=loader_name))
        batches = [batch.keys for batch in loader]
        assert len(batches) == len(loader), f"rank {rank}: {len(batches)} batches, len() says {len(loader)}"
        assert all(len(keys) == batch_size for keys in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
        lo, hi = rank_range(len(expected), rank, ranks)
        assert sum(map(len, batches)) == hi - lo
        seen += [key for keys in batches for key in keys]
    assert sorted(seen) == expected


@pytest.mark.parametrize("loader_name", LOADER_NAMES)
def test_damaged_shard_error_names_the_shard(synth_shards, tmp_path, loader_name):
    copy = tmp_path / "shards"
    shutil.copytree(synth_shards, copy)
    victim = copy / "val" / "shard-000000.tar"
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated mid-sample
    with pytest.raises(CxrFastError, match="shard-000000"):
        _collect(create_loader(LoaderSpec(copy, "val", SMALL, batch_size=4, train=False, loader=loader_name)))


def test_missing_dali_gives_an_install_hint(monkeypatch):
    from cxr_fast.data.loaders.dali import import_dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(CxrFastError, match=r"pip install nvidia-dali-cuda120` \(CUDA 12\) or `nvidia-dali-cuda130`"):
        import_dali()


def test_missing_split_is_a_clear_error(synth_shards):
    with pytest.raises(CxrFastError, match="unknown split 'holdout'"):
        create_loader(LoaderSpec(synth_shards, "holdout", SMALL, batch_size=4, train=False, loader="torch"))


@pytest.mark.parametrize("loader_name", LOADER_NAMES)
def test_preview_writes_processed_images(synth_shards, tmp_path, loader_name):
    out = tmp_path / loader_name
    result = CliRunner().invoke(cli, ["preview", "--shards", str(synth_shards), "--split", "val", "--loader",
                                      loader_name,
                                      "--n", "5", "--image-size", "128", "--out", str(out)])
    assert result.exit_code == 0, result.output
    images = sorted(out.glob("0*.png"))
    assert len(images) == 5 and (out / "contact_sheet.png").exists()
    assert cv2.imread(str(images[0]), cv2.IMREAD_UNCHANGED).shape == (128, 128)


NONE = dict(affine_prob=0.0, hflip_prob=0.0, brightness_contrast_prob=0.0, noise_prob=0.0)
# Each transform alone, with probability 1 and a fixed value; the DALI and OpenCV results must agree as closely as
# the two loaders agree without augmentation (plus `slack` gray levels), and the transform must show.
AUGMENT_CASES = {
    "rotate_range": (dict(affine_prob=1.0, rotate_range=(12.0, 12.0), scale_range=(1.0, 1.0),
                          translate_range=(0.0, 0.0)), 1.5),
    "scale_range": (dict(affine_prob=1.0, rotate_range=(0.0, 0.0), scale_range=(1.15, 1.15),
                         translate_range=(0.0, 0.0)), 1.5),
    "translate_range": (dict(affine_prob=1.0, rotate_range=(0.0, 0.0), scale_range=(1.0, 1.0),
                             translate_range=(0.08, 0.08)), 1.5),
    "hflip_prob": (dict(hflip_prob=1.0), 0.5),
    "brightness_range": (dict(brightness_contrast_prob=1.0, brightness_range=(1.2, 1.2), contrast_range=(1.0, 1.0)),
                         1.0),
    "contrast_range": (dict(brightness_contrast_prob=1.0, brightness_range=(1.0, 1.0), contrast_range=(0.7, 0.7)),
                       1.0),
}


def _augmented(loader_name, shards, augment):
    from cxr_fast.config import AugmentConfig

    config = DataConfig(image_size=96, augment=AugmentConfig(**augment), workers=0 if loader_name == "torch" else 2)
    images, _ = _collect(create_loader(LoaderSpec(shards, "val", config, batch_size=8, train=True, normalize=False,
                                                  loader=loader_name)))
    return {key: image[0].astype(float) for key, image in images.items()}


@pytest.mark.parametrize("field", list(AUGMENT_CASES))
def test_both_loaders_apply_each_augmentation_alike(synth_shards, field):
    augment, slack = AUGMENT_CASES[field]
    plain = {b: _augmented(b, synth_shards, NONE) for b in LOADER_NAMES}
    moved = {b: _augmented(b, synth_shards, NONE | augment) for b in LOADER_NAMES}
    keys = sorted(plain["dali"])
    baseline = np.mean([np.abs(plain["dali"][k] - plain["torch"][k]).mean() for k in keys])
    between = np.mean([np.abs(moved["dali"][k] - moved["torch"][k]).mean() for k in keys])
    effect = np.mean([np.abs(moved["torch"][k] - plain["torch"][k]).mean() for k in keys])
    assert between <= baseline + slack, f"{field}: loaders differ by {between:.2f} (without it {baseline:.2f})"
    assert effect > 3 * (between - baseline + 0.5), f"{field}: the transform barely shows ({effect:.2f})"


def test_both_loaders_add_the_same_noise(synth_shards):
    augment = NONE | dict(noise_prob=1.0, noise_std=6.0)
    for loader_name in LOADER_NAMES:
        plain, noisy = _augmented(loader_name, synth_shards, NONE), _augmented(loader_name, synth_shards, augment)
        # Away from black and white, where clipping would shrink it, the added noise has the configured sigma.
        residual = np.concatenate([(noisy[k] - plain[k])[(plain[k] > 20) & (plain[k] < 235)] for k in plain])
        assert abs(residual.std() - 6.0) < 0.5 and abs(residual.mean()) < 0.3, loader_name
