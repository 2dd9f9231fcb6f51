import cv2
import numpy as np

from cxr_fast.data.datasets import nih
from cxr_fast.data.datasets.nih import read_label_table


def test_synthetic_set_has_the_nih_layout(synth_dir):
    assert [p.name for p in synth_dir.glob("*.csv")] == ["Data_Entry_2017.csv"]
    table = read_label_table(synth_dir / "Data_Entry_2017.csv")
    assert len(table) == 96
    assert {"Patient Age", "Patient Gender", "View Position", "Follow-up #"} <= set(table.columns)
    assert table.groupby("Patient ID").size().max() > 1  # several images per patient
    images = sorted((synth_dir / "images_001" / "images").glob("*.png"))
    assert len(images) == 96
    image = cv2.imread(str(images[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (256, 256) and image.dtype == np.uint8


def test_split_lists_are_patient_disjoint(synth_dir):
    table = read_label_table(synth_dir / "Data_Entry_2017.csv")
    test = set((synth_dir / "test_list.txt").read_text().split())
    train_val = set((synth_dir / "train_val_list.txt").read_text().split())
    assert test and train_val and not test & train_val
    assert test | train_val == set(table["Image Index"])
    patients = table.set_index("Image Index")["Patient ID"]
    assert not set(patients[list(test)]) & set(patients[list(train_val)])


def test_labels_follow_the_real_prevalence_order():
    from cxr_fast.config import SynthConfig
    from cxr_fast.data.synth.painter import draw_labels

    labels = draw_labels(SynthConfig(n_images=4000), np.random.default_rng(0))
    prevalence = labels.mean(axis=0)
    assert 0.45 < (labels.sum(axis=1) == 0).mean() < 0.6  # about half "No Finding", as in NIH
    assert prevalence.argmax() == nih.CLASSES.index("Infiltration")
    assert prevalence.min() > 0.02  # rare classes floored so small sets have positives everywhere


def test_each_finding_changes_the_image():
    from cxr_fast.data.synth.painter import ChestPainter

    anatomy = {"lung_w": 160, "lung_h": 280}
    normal = ChestPainter(256, np.random.default_rng(0)).paint(np.zeros(14, np.uint8), anatomy).astype(float)
    for index, name in enumerate(nih.CLASSES):
        labels = np.zeros(14, np.uint8)
        labels[index] = 1
        image = ChestPainter(256, np.random.default_rng(0)).paint(labels, anatomy).astype(float)
        assert np.abs(image - normal).mean() > 1.0, name
