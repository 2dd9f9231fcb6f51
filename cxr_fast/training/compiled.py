"""torch.compile in training: `--compile auto` (the default) compiles on CUDA and runs eager on the CPU, `--compile`
and `--no-compile` force it. Shapes are static (every training micro-batch is full; evaluation runs compiled at its
first batch size and its short last batch eagerly), so the graphs are one per training side plus evaluation, within
dynamo's recompile limit (raised to fit); a recompile is logged. Inductor's cache lives where the next run finds it
(`--compile-cache`, default under the user's cache folder), so compiling costs its time once per machine. Where
compiling fails under `auto`, the run goes on eager with a warning that says why; under `--compile` it is an error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from cxr_fast.config import ModelConfig
from cxr_fast.errors import CxrFastError

log = logging.getLogger(__name__)


def resolve_compile(config: ModelConfig, device: torch.device) -> bool:
    """Whether the run compiles: the forced choice, or under auto (None) on CUDA only."""
    return device.type == "cuda" if config.compile is None else config.compile


def cache_folder(config: ModelConfig) -> Path:
    """Inductor's cache: --compile-cache, else $XDG_CACHE_HOME (or ~/.cache)/cxr_fast/inductor."""
    if config.compile_cache:
        return Path(config.compile_cache)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr_fast" / "inductor"


def prepare_compiler(config: ModelConfig, graphs: int) -> None:
    """Cache folder, on-disk graph cache, a recompile limit that holds `graphs` shapes (plus the eval/train mode
    switch), and recompiles in the log. Must run before the first compilation."""
    import torch._dynamo.config as dynamo_config  # part of torch; imported here, where compiling is chosen
    import torch._inductor.config as inductor_config

    folder = cache_folder(config).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    # Set, not defaulted: importing torch._dynamo has already put torch's temp folder there, and inductor reads the
    # variable at each compilation (Triton's kernels go below it too, unless TRITON_CACHE_DIR says otherwise).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    inductor_config.fx_graph_cache = True
    limit = 2 * graphs + 2
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)
    torch._logging.set_logs(recompiles=True)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledModel(nn.Module):
    """The model and its compiled twin, sharing parameters. Training runs compiled; evaluation runs compiled at its
    first batch size and eagerly at any other (its short last batch), so no shape is compiled twice. `_orig_mod`
    holds the plain model, as torch.compile's own wrapper does, so checkpoints keep the plain weights."""

    def __init__(self, model: nn.Module, mode: str, forced: bool):
        super().__init__()
        self._orig_mod = model
        self.compiled = torch.compile(model, mode=mode, dynamic=False)
        self.forced, self.eval_batch, self.failure = forced, None, None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.failure is not None:
            return self._orig_mod(images)
        if not self.training:
            self.eval_batch = self.eval_batch or images.shape[0]
            if images.shape[0] != self.eval_batch:
                return self._orig_mod(images)
        try:
            return self.compiled(images)
        except (torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as error:  # dynamo and inductor raise many types (no Triton, an untraceable model, ...)
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"
            if self.forced:
                raise CxrFastError(f"--compile: torch.compile failed ({reason}); run with --no-compile") from None
            log.warning("torch.compile failed (%s); the run goes on eager", reason)
            self.failure = reason
            return self._orig_mod(images)


def compile_model(model: nn.Module, config: ModelConfig, device: torch.device, sides: int) -> nn.Module:
    """The model to train with: compiled (see CompiledModel) where `resolve_compile` says so, else `model`.
    `sides` is the number of training input sides (one graph each)."""
    if not resolve_compile(config, device):
        return model
    prepare_compiler(config, sides + 1)
    return CompiledModel(model, config.compile_mode, forced=config.compile is True)
