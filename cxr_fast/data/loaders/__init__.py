"""Loaders: the DALI pipeline and the OpenCV/torch baseline behind one specification, their transforms, and
`preview`."""

from cxr_fast.data.loaders.loader import Batch, LoaderSpec, SyntheticLoader, create_loader, resolve_loader

__all__ = ["Batch", "LoaderSpec", "SyntheticLoader", "create_loader", "resolve_loader"]
