"""cxr_fast: a fast, honest training and evaluation pipeline for chest X-ray classifiers.

The public builders, as timm offers them:

    from cxr_fast import DataConfig, LoaderSpec, Predictor, RunConfig, create_loader, create_model, load_model

They are imported on first use, so `import cxr_fast` (and the CLI's --help) stays quick.
"""

__version__ = "0.2.0"

_PUBLIC = {
    "DataConfig": "cxr_fast.config",
    "RunConfig": "cxr_fast.config",
    "LoaderSpec": "cxr_fast.data.loaders.loader",
    "Predictor": "cxr_fast.evaluation.predictor",
    "create_loader": "cxr_fast.data.loaders.loader",
    "create_model": "cxr_fast.training.model",
    "load_model": "cxr_fast.training.checkpoint",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cxr_fast' has no attribute {name!r}")
