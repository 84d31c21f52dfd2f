"""ODE-pair generation (the paper, Stage 1, step 1) as ``dmdx predict``.

``ODEPairGenerator.predict_step`` samples the teacher's PF-ODE with CFG from noise seeded by each
pair's index; ``ODEPairWriter`` gathers a shard's batches and writes it atomically with its
manifest entry (format: :mod:`dmdx_lightning.data.ode_pairs`). Which pairs and shards a rank
makes is decided by :class:`~dmdx_lightning.data.ode_pairs.ODEPairPromptsDataModule`.

    dmdx predict --config configs/quickstart/ode_pairs.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from dmdx_lightning.data.ode_pairs import (FORMAT, MANIFEST, SEED_RULE, ODEPairPromptsDataModule,
                                           check_header, finished_shards, pair_noise, prompts_sha256,
                                           read_manifest, write_manifest, write_shard)
from dmdx_lightning.dtypes import parse_dtype
from dmdx_lightning.teachers.base import Teacher


class ODEPairGenerator(pl.LightningModule):
    """The teacher's own deterministic sampler, run on seeded noise for each prompt index.

    Args:
        teacher: the frozen teacher (only its ``real`` role is used).
        num_steps: PF-ODE steps (default: the teacher's ``sample_steps``).
        cfg_scale: CFG scale (default: the teacher's ``cfg_scale``); the paper samples WITH CFG.
        seed: base seed; pair ``i`` starts from noise seeded by ``seed + i``.
        storage_dtype: storage dtype of the latents in the shards (``float32 | float16 | bfloat16``).
    """

    def __init__(self, teacher: Teacher, num_steps: int | None = None, cfg_scale: float | None = None,
                 seed: int = 0, storage_dtype: str = "float32") -> None:
        super().__init__()
        parse_dtype(storage_dtype, "storage_dtype")  # an unknown name fails here, not at the first shard
        self.teacher = teacher
        self.num_steps = int(num_steps or teacher.sample_steps)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        self.cfg_scale = float(cfg_scale if cfg_scale is not None else teacher.cfg_scale)
        self.seed, self.storage_dtype = seed, storage_dtype

    def header(self, data: ODEPairPromptsDataModule) -> dict[str, Any]:
        """The manifest header: everything that decides the bytes of a pair."""
        return {
            "format": FORMAT, "teacher_family": self.teacher.family, "teacher_id": self.teacher.identity(),
            "latent_shape": list(self.teacher.latent_shape(1)[1:]), "dtype": self.storage_dtype,
            "sampler": "pf_ode_euler (DDIM move on the teacher's euler_grid)", "num_steps": self.num_steps,
            "cfg_scale": self.cfg_scale, "seed_rule": SEED_RULE, "seed": self.seed,
            "num_pairs": data.num_pairs, "shard_size": data.shard_size, "prompt_file": str(data.prompt_file),
            "num_prompts": len(data.prompts), "prompts_sha256": prompts_sha256(data.prompts),
        }

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        index = batch["index"]
        x_T = pair_noise(self.teacher.latent_shape(1)[1:], index.tolist(), self.seed).to(self.device)
        cond = self.teacher.encode_prompts(batch["prompt"])
        x0 = self.teacher.sample_ode(x_T, cond, self.num_steps, self.cfg_scale)
        dtype = parse_dtype(self.storage_dtype, "storage_dtype")
        return {"shard": batch["shard"], "index": index.cpu(), "prompt": list(batch["prompt"]),
                "x_T": x_T.to(dtype).cpu(), "x0": x0.to(dtype).cpu()}


class ODEPairWriter(BasePredictionWriter):
    """Writes each shard as soon as its last batch is predicted, then ``index.json``.

    Per rank, batches are buffered until their shard is whole (a shard's batches are consecutive,
    see the DataModule), then written atomically with its entry. At the end every rank waits
    for the others, and rank 0 rebuilds ``index.json`` from the finished shards. A rerun with the
    same settings skips finished shards; one with other settings (teacher, steps, CFG, seed, ...)
    is refused instead of mixing pairs. Predictions are not kept in memory
    (``return_predictions`` is switched off), and a progress bar counts pairs.

    Args:
        progress: show the pairs progress bar (rank 0).
    """

    def __init__(self, progress: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.progress = progress
        self._buffer: dict[int, list[dict]] = {}
        self._bar = None

    def _data(self, trainer) -> ODEPairPromptsDataModule:
        data = trainer.datamodule
        if not isinstance(data, ODEPairPromptsDataModule):
            raise TypeError(f"ODEPairWriter needs an ODEPairPromptsDataModule as data, got {type(data).__name__}")
        return data

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        if not isinstance(pl_module, ODEPairGenerator):
            raise TypeError(f"ODEPairWriter needs an ODEPairGenerator model, got {type(pl_module).__name__}")
        data = self._data(trainer)
        if data.prompts is None:
            data.setup(stage)
        self.header = pl_module.header(data)
        if (Path(data.output_dir) / MANIFEST).is_file():
            check_header(read_manifest(data.output_dir), self.header, Path(data.output_dir) / MANIFEST)
        elif trainer.is_global_zero:
            # the header goes down first, so a killed run's shards are never mixed with other settings
            Path(data.output_dir).mkdir(parents=True, exist_ok=True)
            write_manifest(data.output_dir, self.header, data.done)
        # every pair lives in memory until its shard is written, never in Lightning's result list
        trainer.predict_loop.return_predictions = False

    def on_predict_start(self, trainer, pl_module) -> None:
        data = self._data(trainer)
        if self.progress and trainer.is_global_zero:
            from tqdm.auto import tqdm

            mine = data.pending_shards(trainer.global_rank, trainer.world_size)
            total = sum(data.ranges[k][1] - data.ranges[k][0] for k in mine)
            self._bar = tqdm(total=total, desc=f"ODE pairs (rank 0 of {trainer.world_size})", unit="pair")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        data = self._data(trainer)
        k = prediction["shard"]
        self._buffer.setdefault(k, []).append(prediction)
        if self._bar is not None:
            self._bar.update(len(prediction["index"]))
        start, stop = data.ranges[k]
        parts = self._buffer[k]
        if sum(len(p["index"]) for p in parts) == stop - start:
            write_shard(data.output_dir, k, torch.cat([p["x_T"] for p in parts]),
                        torch.cat([p["x0"] for p in parts]), torch.cat([p["index"] for p in parts]),
                        [q for p in parts for q in p["prompt"]])
            del self._buffer[k]

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._buffer:
            raise RuntimeError(f"shards {sorted(self._buffer)} received only part of their pairs")
        trainer.strategy.barrier("ode_pairs_written")
        if trainer.is_global_zero:
            data = self._data(trainer)
            manifest = write_manifest(data.output_dir, self.header, finished_shards(data.output_dir, data.ranges))
            print(f"{data.output_dir}/{MANIFEST}: {len(manifest['shards'])} of {manifest['num_shards']} shards, "
                  f"{sum(e['count'] for e in manifest['shards'])} pairs")
        trainer.strategy.barrier("ode_pairs_manifest")
