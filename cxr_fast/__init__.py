"""cxr_fast: a fast, honest training and evaluation pipeline for the 14 NIH ChestX-ray14 findings."""

__version__ = "0.1.0"
