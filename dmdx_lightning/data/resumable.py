"""A train loader that resumes mid-epoch exactly, on one process or many.

Lightning 2.6 saves the ``state_dict()`` of every train loader that has one (the loader must
implement ``state_dict`` / ``load_state_dict``, Lightning's ``_Stateful`` protocol) under
``loops.fit_loop.state_dict.combined_loader`` and hands it back to ``load_state_dict`` on resume,
before the first batch is drawn. A plain ``DataLoader`` has no state, so a mid-epoch resume
would start the epoch again and see some prompts twice. Here:

- :class:`ResumableDistributedSampler` is torch's ``DistributedSampler`` (the epoch's order is a
  function of ``seed + epoch`` alone; each rank takes every ``num_replicas``-th index, so ranks
  never overlap) plus a one-shot "skip the first n indices" for the resumed epoch. Because it IS
  a ``DistributedSampler``, Lightning does not replace it under DDP; we split by rank ourselves.
- :class:`ResumableDataLoader` records how many batches training has CONSUMED in the current
  epoch. Lightning's fetcher draws one batch ahead, so counting the batches the loader yields
  would be one too many at a checkpoint; the owner (the DataModule's ``on_after_batch_transfer``,
  which runs when a batch enters the training step) calls :meth:`ResumableDataLoader.consumed`.
- The loader gets its own ``torch.Generator``: a ``DataLoader`` draws a base seed for its
  workers at every ``iter()``, which would otherwise advance the global torch RNG and shift the
  noise of every later step on resume.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start its next epoch part-way through.

    Args:
        dataset: the map-style dataset.
        num_replicas: number of processes (``trainer.world_size``); 1 outside DDP.
        rank: this process's global rank.
        shuffle: shuffle each epoch with ``seed + epoch``.
        seed: base seed of the order (the same on every rank).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        # drop_last=False pads the epoch with a few repeated indices so every rank has the same
        # count; the DataLoader's drop_last then keeps batches equal-sized.
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0  # only the resumed epoch starts late
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableDistributedSampler` with Lightning-saved position.

    Takes ``DataLoader``'s arguments; ``sampler`` must be a :class:`ResumableDistributedSampler`.
    """

    def __init__(self, dataset: Dataset, *, sampler: ResumableDistributedSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableDistributedSampler):
            raise TypeError(f"sampler must be a ResumableDistributedSampler, got {type(sampler).__name__}")
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_consumed = 0

    def __iter__(self):
        # a new pass: it starts at the sampler's pending skip (0 except right after a resume)
        self.batches_consumed = self.sampler.skip // self.batch_size
        return super().__iter__()

    def consumed(self) -> None:
        """Count one batch as used by training (called when it enters the training step)."""
        self.batches_consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches_consumed": int(self.batches_consumed),
                "num_replicas": int(self.sampler.num_replicas), "batch_size": int(self.batch_size),
                "seed": int(self.sampler.seed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        from lightning.pytorch.utilities import rank_zero_warn

        mine = {"num_replicas": self.sampler.num_replicas, "batch_size": self.batch_size, "seed": self.sampler.seed}
        changed = {k: (state[k], v) for k, v in mine.items() if k in state and state[k] != v}
        if set(changed) - {"num_replicas"}:
            # another order or batch: the saved position means nothing, restart the epoch instead
            rank_zero_warn(f"train loader changed since the checkpoint ({changed}, saved vs now): the "
                           "resumed epoch restarts from its first batch, so resume is not exact")
            return
        epoch, skip = state["epoch"], state["batches_consumed"] * self.batch_size
        if changed:
            # another world size (a resume on more or fewer GPUs): the ranks together had used the
            # epoch order's first `seen` items (rank r takes items r, r+W, ...), so each rank of the
            # new world skips its share of them: exact when `seen` divides by the new world size
            seen = skip * changed["num_replicas"][0]
            skip = seen // self.sampler.num_replicas
            rank_zero_warn(f"the checkpoint was written by {changed['num_replicas'][0]} processes, this run has "
                           f"{self.sampler.num_replicas}: the epoch goes on after its first {seen} prompts "
                           f"({'exactly' if seen % self.sampler.num_replicas == 0 else 'to within one prompt per rank'}); "
                           "each rank's noise stream restarts")
        if skip // self.batch_size >= len(self):
            # saved after the epoch's last batch: Lightning counts that epoch as done and trains the
            # next one on the iterator it opens right after this call, so start the next epoch here
            epoch, skip = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip
        self.batches_consumed = skip // self.batch_size


class ResumableTrainData:
    """Mixin for LightningDataModules: a resumable, rank-split train loader (see module docstring).

    The DataModule calls :meth:`resumable_train_loader` from ``train_dataloader``; this mixin's
    ``on_after_batch_transfer`` counts each batch as it enters the training step.
    """

    _train_loader: ResumableDataLoader | None = None

    def resumable_train_loader(self, dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int,
                               collate_fn) -> ResumableDataLoader:
        import os

        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                              seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        # equal batch sizes keep per-step losses comparable and DDP ranks in step
        self._train_loader = ResumableDataLoader(dataset, sampler=sampler, batch_size=batch_size, drop_last=True,
                                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                                 collate_fn=collate_fn)
        return self._train_loader

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # runs when a batch enters the training step (Lightning fetches one batch ahead), so the
        # count saved in a checkpoint is the number of batches training has really used
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.consumed()
        return batch
