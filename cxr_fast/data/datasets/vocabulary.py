"""One vocabulary of findings across data sets, so that a merged set means one thing: each description names its
classes' synonyms in it (`SYNONYMS`: CheXpert's "Pleural Effusion" is NIH's "Effusion"), `--relabel FILE`
overrides that map, and `--classes` keeps a chosen subset.

The shared names are NIH's 14 findings, CheXpert's observations NIH lacks, and "No Finding" — a state (nothing
found), not a finding. In the spirit of torchxrayvision's `relabel_dataset`, only true synonyms are merged; Mass and
Nodule stay apart from Lung Lesion, Infiltration from Lung Opacity, Pleural_Thickening from Pleural Other, unless a
`--relabel` file maps them. Two source classes mapped to one name become one column: positive where either is
positive, stated where either is stated.

`--relabel` is YAML, source name → shared name, or null to drop the class:

    Pleural Effusion: Pleural Effusion   # keep CheXpert's apart from NIH's Effusion
    Lung Lesion: Mass                    # a source name may also be mapped onto another shared name
    Support Devices: null                # drop the class
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from cxr_fast.data.datasets.base import SampleTable
from cxr_fast.errors import CxrFastError
from cxr_fast.settings import load_plain_yaml

log = logging.getLogger(__name__)

NO_FINDING = "No Finding"
VOCABULARY = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
              "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Other", "Fracture",
              "Support Devices", NO_FINDING)


def findings_of(classes) -> np.ndarray:
    """(classes,) bool: which classes are findings (every class but the "no finding" state)."""
    return np.array([c != NO_FINDING for c in classes], dtype=bool)


def no_finding_called(classes, called: np.ndarray) -> np.ndarray:
    """(images,) bool from (images, classes) calls: the model calls the "no finding" state — by its No Finding
    output where it has one, else by calling no finding at all."""
    classes = list(classes)
    if NO_FINDING in classes:
        return called[:, classes.index(NO_FINDING)].astype(bool)
    return ~called[:, findings_of(classes)].any(axis=1)


def read_relabel(path: Path | None) -> dict[str, str | None] | None:
    """The `--relabel` map (None without a file): source name → target name or None (drop)."""
    if path is None:
        return None
    mapping = load_plain_yaml(path, "--relabel file")
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str) and v.strip())
                                                for k, v in mapping.items()):
        raise CxrFastError(f"{path}: --relabel maps class names to class names or null (drop), one per line, "
                           "e.g. 'Pleural Effusion: Effusion'")
    return {k.strip(): v.strip() if v else None for k, v in mapping.items()}


def class_map(classes: tuple[str, ...], synonyms: dict[str, str], relabel: dict | None) -> dict[str, str | None]:
    """Source class → the name it takes (None: dropped): the relabel file's entry, else the description's synonym,
    else its own name; a relabel entry for the name reached renames it once more (`Effusion: Pleural Effusion`
    renames the shared class, CheXpert's included)."""
    relabel = relabel or {}
    mapping = {}
    for name in classes:
        target = relabel[name] if name in relabel else synonyms.get(name, name)
        if target is not None and target != name and target in relabel:
            target = relabel[target]
        mapping[name] = target
    return mapping


def apply_class_map(table: SampleTable, mapping: dict[str, str | None]) -> SampleTable:
    """The table on the mapped classes (in the order first reached): columns mapped to one name merged (raw
    values: 1 over -1 over 0 over blank; labels: positive where any is, stated where any is), dropped ones gone."""
    targets = tuple(dict.fromkeys(t for t in (mapping[c] for c in table.classes) if t is not None))
    labels = np.full((len(table.frame), len(targets)), np.nan, dtype=np.float32)
    raw = np.full_like(labels, np.nan)
    for t, target in enumerate(targets):
        sources = [c for c, name in enumerate(table.classes) if mapping[name] == target]
        with np.errstate(all="ignore"):
            stated = np.isfinite(table.labels[:, sources]).any(axis=1)
            labels[stated, t] = np.nanmax(table.labels[stated][:, sources], axis=1)
        for c in sources:
            better = _rank(table.raw[:, c]) > _rank(raw[:, t])
            raw[better, t] = table.raw[better, c]
    return SampleTable(table.frame, labels, targets, table.dataset, table.unknown_values, raw, table.dropped,
                       table.applied | {"class_map": dict(mapping)})


def _rank(values: np.ndarray) -> np.ndarray:
    return np.select([values == 1, values == -1, values == 0], [3, 2, 1], 0)


def select_classes(table: SampleTable, names: str | None) -> SampleTable:
    """The table on the classes `--classes "A,B"` names (None: all), in that order; an unknown name is an error."""
    if names is None:
        return table
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in table.classes]
    if not wanted or unknown or len(set(wanted)) != len(wanted):
        raise CxrFastError(f"--classes {names[:200]!r}: name each class once, from {', '.join(table.classes)}"
                           + (f"; unknown: {', '.join(map(repr, unknown[:5]))}" if unknown else ""))
    columns = [table.classes.index(n) for n in wanted]
    return SampleTable(table.frame, table.labels[:, columns], tuple(wanted), table.dataset, table.unknown_values,
                       table.raw[:, columns], table.dropped, table.applied)


def warn_near_duplicates(classes: tuple[str, ...]) -> list[tuple[str, str]]:
    """Pairs of class names equal up to case, spaces and underscores ("Pleural_Effusion" and "pleural effusion"),
    each logged as a warning: a merged set where they are two classes probably wants a --relabel entry."""
    seen: dict[str, str] = {}
    pairs = []
    for name in classes:
        folded = re.sub(r"[\s_]+", " ", name).strip().lower()
        if folded in seen:
            pairs.append((seen[folded], name))
            log.warning("classes %r and %r differ only in case, spaces or underscores: map one onto the other with "
                        "--relabel if they are one finding", seen[folded], name)
        else:
            seen[folded] = name
    return pairs
