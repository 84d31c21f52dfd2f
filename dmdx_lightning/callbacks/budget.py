"""Stop a run after a number of GENERATOR updates, whatever the update ratio or warm-up.

``trainer.max_steps`` counts every player's optimizer step; comparing methods at equal
generator updates (DMD at 2 players, ADM at 3, TTUR 5, a fake-score warm-up) needs this instead.
"""

from __future__ import annotations

import lightning.pytorch as pl


class GeneratorBudget(pl.Callback):
    """Stop once the generator has stepped ``updates`` times (asks the module's ``players_for_step``).

    Args:
        updates: generator updates to run.
    """

    def __init__(self, updates: int) -> None:
        if updates < 1:
            raise ValueError(f"updates must be >= 1, got {updates}")
        self.updates = updates

    @staticmethod
    def generator_updates(module, iterations: int) -> int:
        """Generator updates in the first ``iterations`` iterations (who steps is a function of the iteration)."""
        return sum("generator" in module.players_for_step(i) for i in range(iterations))

    def on_train_start(self, trainer, module) -> None:
        # counted once from the iteration buffer, so a resumed run knows what it has already done
        self._done = self.generator_updates(module, int(module.iteration))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._done += "generator" in module.players_for_step(int(module.iteration) - 1)
        if self._done >= self.updates:
            trainer.should_stop = True
