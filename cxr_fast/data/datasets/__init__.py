"""The data-set descriptions, by the name `cxr-fast shard --dataset` takes.

A description is one module with NAME, CLASSES (None when its table names them, as `table` does), DEFAULT_VIEWS and
`read(Request) -> SampleTable`; adding a data set is one such module and one line here (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from types import ModuleType

from cxr_fast.data.datasets import chexpert, mimic, nih, table
from cxr_fast.data.datasets.base import Request, SampleTable, keep_views
from cxr_fast.errors import CxrFastError

DATASETS: dict[str, ModuleType] = {module.NAME: module for module in (nih, chexpert, mimic, table)}


def describe(name: str) -> ModuleType:
    if name not in DATASETS:
        raise CxrFastError(f"unknown data set {name!r}: use {', '.join(DATASETS)}")
    return DATASETS[name]


def read_dataset(name: str, request: Request) -> SampleTable:
    """The data set's table(s) in the common form, keeping the views asked for (default: the data set's own)."""
    module = describe(name)
    table = module.read(request)
    return table.subset(keep_views(table.frame, request.views, module.DEFAULT_VIEWS))


__all__ = ["DATASETS", "Request", "SampleTable", "describe", "read_dataset"]
