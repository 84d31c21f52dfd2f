"""Stop a run after a number of GENERATOR updates, whatever the update ratio or warm-up.

``trainer.max_steps`` counts iterations; comparing methods at equal generator updates (TTUR 5
updates the generator in one iteration of 5, a fake-score warm-up in none of the first ones)
needs this instead.
"""

from __future__ import annotations

import lightning.pytorch as pl


class GeneratorBudget(pl.Callback):
    """Stop once the generator has stepped ``updates`` times (the module's ``generator_updates``).

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

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # a buffer of the module: a resumed run knows what it has already done
        if int(module.generator_updates) >= self.updates:
            trainer.should_stop = True
