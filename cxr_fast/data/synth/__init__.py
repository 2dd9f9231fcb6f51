"""Synthetic data: the painter and what it draws (`painter.py`), written in any data set's layout (`layouts.py`)."""

from cxr_fast.data.synth.layouts import LAYOUTS, write_synthetic_dataset

__all__ = ["LAYOUTS", "write_synthetic_dataset"]
