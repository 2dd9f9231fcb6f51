"""A run's loaders, kept for the run: where each epoch's batches come from and what asking for them costs.

The torch loader keeps its workers across epochs and is re-seeded at each one, so epoch e shuffles and augments as a
loader built with the seed of (seed, e, rank) would, and a resumed epoch replays the same batches. A DALI pipeline
cannot be re-seeded once built, and DALI 2.4 refuses to checkpoint a pipeline with `fn.clahe`, so each epoch gets a
pipeline of its own seed, built in the background while the previous epoch validates and saves its checkpoints. A
change of side builds the train loader anew; the validation loader (no shuffle, no augmentation) lives for the run.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cxr_fast.config import RunConfig
from cxr_fast.data.loaders.loader import LoaderSpec, create_loader
from cxr_fast.training.setup import EVAL_BATCH_FACTOR, Env, loader_seed


@dataclass
class _Built:
    epoch: int
    side: int
    loader: object


class RunLoaders:
    def __init__(self, shards_dir: Path, config: RunConfig, env: Env):
        self.shards_dir, self.config, self.env = shards_dir, config, env
        self.current: _Built | None = None
        self.ahead: Future | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.val_loader = None

    def _spec(self, epoch: int, side: int) -> LoaderSpec:
        config, env = self.config, self.env
        return LoaderSpec(self.shards_dir, "train", config.data, batch_size=config.optim.batch_size, train=True,
                          loader=config.loader, device=env.device, seed=loader_seed(config.seed, epoch, env.rank),
                          rank=env.rank, world_size=env.world_size, side=side)

    def _build(self, epoch: int, side: int) -> _Built:
        return _Built(epoch, side, create_loader(self._spec(epoch, side)))

    def train(self, epoch: int, side: int) -> tuple[object, float]:
        """The loader of `epoch` at `side`, and the seconds spent waiting for it (a build, or nothing)."""
        started = time.perf_counter()
        built = self.ahead.result() if self.ahead is not None else None
        self.ahead = None
        if built is not None and (built.epoch, built.side) != (epoch, side):
            built = None
        current = self.current
        if built is None and current is not None and current.side == side and hasattr(current.loader, "reseed"):
            current.loader.reseed(loader_seed(self.config.seed, epoch, self.env.rank))
            built = _Built(epoch, side, current.loader)
        if built is None:
            self.current = None  # let the old loader's workers go before the new ones start
            built = self._build(epoch, side)
        self.current = built
        return built.loader, time.perf_counter() - started

    def prepare(self, epoch: int, side: int) -> None:
        """After an epoch's training: start building the loader of `epoch` where it cannot be re-seeded (DALI)."""
        if self.current is None or hasattr(self.current.loader, "reseed"):
            return
        self.current = None
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-fast-loader")
        self.ahead = self.executor.submit(self._build, epoch, side)

    def val(self):
        if self.val_loader is None:
            config, env = self.config, self.env
            self.val_loader = create_loader(LoaderSpec(
                self.shards_dir, "val", config.data, batch_size=config.optim.batch_size * EVAL_BATCH_FACTOR,
                loader=config.loader, device=env.device, rank=env.rank, world_size=env.world_size))
        return self.val_loader

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.current = self.ahead = self.val_loader = None
