"""The data-set descriptions, by the name `cxr-fast shard --dataset` takes.

A description is one module with NAME, CLASSES (None when its table names them, as `table` does), DEFAULT_VIEWS,
NO_FINDING (its class that means "no finding", or None), SYNONYMS (its class names in the shared vocabulary,
`vocabulary.py`), LABEL_SOURCE (per split, where its labels come from) and `read(Request) -> SampleTable`; adding a
data set is one such module and one line here (docs/ARCHITECTURE.md).

    from cxr_fast.data.datasets import Request, read_dataset
    table = read_dataset("chexpert", Request(images=Path("data"), labels=Path("data/CheXpert-v1.0-small/train.csv")))
    table.frame, table.classes, table.labels  # one row per image; (images, classes), NaN where not stated
    table.totals()                            # per class: positive, negative, uncertain, blank, stated
"""

from __future__ import annotations

from types import ModuleType

from cxr_fast.data.datasets import chexpert, mimic, nih, padchest, table
from cxr_fast.data.datasets.base import Request, SampleTable, wanted_views
from cxr_fast.data.datasets.vocabulary import apply_class_map, class_map
from cxr_fast.errors import CxrFastError

DATASETS: dict[str, ModuleType] = {module.NAME: module for module in (nih, chexpert, mimic, padchest, table)}


def describe(name: str) -> ModuleType:
    if name not in DATASETS:
        raise CxrFastError(f"unknown data set {name!r}: use {', '.join(DATASETS)}")
    return DATASETS[name]


def read_dataset(name: str, request: Request) -> SampleTable:
    """The data set's table(s) in the common form, keeping the views asked for (default: the data set's own), its
    classes in the shared vocabulary (the description's synonyms, then `request.relabel`)."""
    module = describe(name)
    table = module.read(request)
    views = wanted_views(request.views, module.DEFAULT_VIEWS, table.frame)
    if views is not None:
        table = table.keep(table.frame["view"].isin(views).to_numpy(), "view not kept (--views)")
    table.applied["views"] = list(views) if views is not None else "all"
    return apply_class_map(table, class_map(table.classes, module.SYNONYMS, request.relabel))


__all__ = ["DATASETS", "Request", "SampleTable", "describe", "read_dataset"]
