"""Shared plumbing of the distillation LightningModules (ADP, ADM/DMD/DMD2).

What lives here and nowhere else:
- the player loop: a method's players are ONE table, :attr:`DistillationModule.players` (name ->
  :class:`Player`: step, parameters, optimizer factory), built in its ``__init__``;
  :meth:`DistillationModule.training_step` asks ONE function, :meth:`players_for_step`, who steps
  at this iteration, then runs each one's step inside ``toggled_optimizer`` with manual
  optimization, and ``configure_optimizers`` makes one optimizer per player in table order;
- student sampling with DMD2-style backward simulation for multi-step students;
- generator EMA, ``init_from``, and checkpoints that hold only trainable state (the frozen
  teacher is never written) plus the RNG states needed to resume exactly (:mod:`dmdx_lightning.rng`;
  the DDP / FSDP plumbing is in :mod:`dmdx_lightning.methods.distributed`).

One step unit, the ITERATION: one batch through :meth:`DistillationModule.training_step`, in which
every player :meth:`~DistillationModule.players_for_step` names steps once. ``trainer.global_step``
counts iterations (Lightning's manual optimization would count every player's optimizer step, see
:func:`one_global_step`), so ``trainer.max_steps``, ``every_n_train_steps``, ``log_every_n_steps``,
``val_check_interval``, TensorBoard's x-axis and checkpoint names all count iterations, whatever
the method, its players or its update ratio. Generator updates are logged on their own
(``train/generator_updates``). Checkpoints say their unit (``checkpoint["dmdx"]["step_unit"]``);
older ones, whose ``global_step`` counted optimizer steps, are converted when resumed.
"""

from __future__ import annotations

import importlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dmdx_lightning.checksums import verify_file, verify_sharded
from dmdx_lightning.ema import GeneratorEMA
from dmdx_lightning.errors import ConfigError
from dmdx_lightning.methods.distributed import (check_ddp_finds_unused_parameters, clean_name,
                                                 finish_fsdp_backward, reshard_units, same_pass_count)
from dmdx_lightning.rng import capture_rng, restore_rng
from dmdx_lightning.schedules import student_timesteps
from dmdx_lightning.sharded_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint
from dmdx_lightning.teachers.base import ROLES, Conditioning, Teacher


# The frozen parts of a teacher (real score, text encoders, VAE, discriminator backbones) stay in
# eval mode on purpose (Teacher.train): no dropout, no norm statistics. Lightning warns about every
# such module at the start of each fit; for these modules the warning is wrong, so it is not shown.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def _default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.0, 0.999), weight_decay=0.0)


class NonFiniteLossError(RuntimeError):
    pass


#: the ``torch.compile`` options ``compile`` may set (:func:`dmdx_lightning.compile.compile_blocks`)
COMPILE_OPTIONS = {"backend", "mode", "dynamic", "fullgraph"}


#: what ``trainer.global_step`` counts in our checkpoints (``checkpoint["dmdx"]["step_unit"]``);
#: checkpoints without it were written while it counted optimizer steps
STEP_UNIT = "iteration"


#: a player's step: ``(batch, cond, ctx) -> {"loss": ..., other logged values}``
Step = Callable[[dict, Conditioning, dict], dict[str, Tensor]]


@dataclass
class Player:
    """One row of a method's player table.

    Args:
        step: computes this player's loss (and values to log under ``train/<player>/``).
        parameters: returns what its optimizer owns (asked when the optimizers are made, after
            any strategy has wrapped the model).
        optimizer: the optimizer factory (a config's ``<player>_optimizer``).
    """

    step: Step
    parameters: Callable[[], list[torch.nn.Parameter]]
    optimizer: OptimizerCallable


class DistillationModule(pl.LightningModule):
    """Base of every distillation method.

    Args:
        teacher: the teacher family (owns real score, fake score and student roles).
        student_steps: number of student sampling steps (1-8); times evenly spaced from 1 (before
            the schedule's shift for flow-matching teachers).
        student_timesteps: explicit student times in ``(0, 1]``, highest first (overrides
            ``student_steps``; e.g. ``[0.999, 0.749, 0.499, 0.249]`` for DMD2's SDXL schedule).
        generator_optimizer: optimizer factory for the student's trainable parameters.
        ema_decay: generator EMA decay per generator update; ``None`` disables EMA.
        init_from: a checkpoint (ours, e.g. from ADP) whose student weights start the student.
            Read when the run starts (``setup``), not at construction, so a config can name the
            checkpoint of an earlier stage before that stage has run.
        max_nonfinite_steps: steps in a row of one player with a non-finite loss or gradient on
            any rank tolerated (each is skipped on every rank and counted as
            ``train/nonfinite_skipped``) before the run stops with an error naming the player,
            iteration and ranks.
        lr_warmup: linear learning-rate warm-up per player, in that player's own optimizer steps,
            e.g. ``{generator: 500, fake_score: 100}`` (players not named start at full rate).
            Schedulers are stepped by the player loop and saved in checkpoints.
        first_trained_step: multi-step students: the backward simulation trains step ``k`` drawn
            from ``[first_trained_step, steps)`` (default 0: every step, DMD2). 1 never asks the
            pure-noise step's prediction to look like data: a teacher-initialised student
            predicts the conditional mean there, and training it as a sample collapses it onto one
            mode that every later step then inherits (measured on the mixture testbed, docs/reports/adm_study.md).
        compile: ``torch.compile`` every block of the teacher's networks
            (:func:`dmdx_lightning.compile.compile_blocks`) when training starts, after any
            sharding: ``true`` (inductor), or its options, e.g. ``{backend: inductor, mode:
            max-autotune}``. The first iterations compile (one graph per block class and state);
            benchmarks/results/compile.md measures it.
    """

    def __init__(
        self,
        teacher: Teacher,
        student_steps: int = 1,
        student_timesteps: list[float] | None = None,
        generator_optimizer: OptimizerCallable = _default_optimizer,
        ema_decay: float | None = None,
        init_from: str | None = None,
        max_nonfinite_steps: int = 10,
        lr_warmup: dict[str, int] | None = None,
        first_trained_step: int = 0,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # the frozen teacher is left out of checkpoints, so loading must accept its absence
        self.strict_loading = False
        if set(teacher.build_roles) != set(ROLES):
            raise ValueError(f"model.init_args.teacher.init_args.build_roles is {teacher.build_roles}: distillation "
                             f"trains with all roles {ROLES} (fewer are for `dmdx export`); remove build_roles")
        DistillationModule.check_options(dict(
            student_steps=student_steps, student_timesteps=student_timesteps, first_trained_step=first_trained_step,
            max_nonfinite_steps=max_nonfinite_steps, lr_warmup=lr_warmup, ema_decay=ema_decay, compile=compile))
        self.teacher = teacher
        self.student_timesteps = resolve_student_timesteps(student_steps, student_timesteps, teacher.schedule)
        self.first_trained_step = first_trained_step
        self.generator_optimizer = generator_optimizer
        self.init_from = init_from
        self.max_nonfinite_steps = max_nonfinite_steps
        self.lr_warmup = dict(lr_warmup or {})
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("generator_updates", torch.zeros((), dtype=torch.long))
        #: the longest run of skipped steps of one player so far (checkpointed); per player in ``_streaks``
        self.register_buffer("nonfinite_streak", torch.zeros((), dtype=torch.long))
        self._streaks: dict[str, int] = {}
        self.ema = GeneratorEMA(teacher.trainable_parameters("student"), ema_decay) if ema_decay else None
        self._init_from_loaded = False
        #: the player table, in optimizer order (checkpoints store the optimizers in this order);
        #: each method builds its own in ``__init__``, ``"generator"`` first
        self.players: dict[str, Player] = {}

    @classmethod
    def check_options(cls, options: Mapping[str, Any], key: str = "model.init_args") -> None:
        """Refuse a value or combination of the options this class defines (:class:`ConfigError`
        naming the key). Each class of a method checks its own options in its own ``check_options``;
        :mod:`dmdx_lightning.preflight` runs every one of them on a parsed config, before anything is
        built, and ``__init__`` runs them too, so a module built in Python is checked the same way."""
        get = options.get
        steps, times = get("student_steps", 1), get("student_timesteps")
        if times is None and not 1 <= steps <= 1000:
            raise ConfigError(f"{key}.student_steps", steps, "a student samples in 1 or more steps",
                              "The paper trains 1- to 8-step students.")
        if times is not None:
            times = [float(t) for t in times]
            if not times or any(not 0.0 < t <= 1.0 for t in times) or sorted(times, reverse=True) != times:
                raise ConfigError(f"{key}.student_timesteps", times, "must be decreasing values in (0, 1]",
                                  "e.g. [0.999, 0.749, 0.499, 0.249] (DMD2's 4-step SDXL schedule)")
        count = len(times) if times is not None else steps
        first = get("first_trained_step", 0)
        if not 0 <= first < count:
            raise ConfigError(f"{key}.first_trained_step", first, f"the student has {count} step(s), so it must be "
                              f"in [0, {count})", "0 trains every step (DMD2); 1 skips the pure-noise step.")
        if get("max_nonfinite_steps", 10) < 1:
            raise ConfigError(f"{key}.max_nonfinite_steps", get("max_nonfinite_steps"), "must be >= 1",
                              "It is how many non-finite losses in a row are skipped before the run stops.")
        warmup = get("lr_warmup") or {}
        if any(int(n) < 0 for n in warmup.values()):
            raise ConfigError(f"{key}.lr_warmup", dict(warmup), "warm-up lengths must be >= 0", "0 starts at full rate.")
        decay = get("ema_decay")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ConfigError(f"{key}.ema_decay", decay, "an EMA decay is in (0, 1)", "e.g. 0.999, or null for no EMA.")
        compile_ = get("compile", False)
        if isinstance(compile_, Mapping) and set(compile_) - COMPILE_OPTIONS:
            raise ConfigError(f"{key}.compile", dict(compile_), f"unknown option(s) {sorted(set(compile_) - COMPILE_OPTIONS)}",
                              f"torch.compile's options here are {sorted(COMPILE_OPTIONS)}; true takes the defaults.")

    @classmethod
    def batch_keys(cls, options: Mapping[str, Any]) -> dict[str, str]:
        """Batch keys beyond ``prompt`` this method needs with ``options`` (key -> why), so a config
        that pairs it with data that lacks them is refused before anything is built."""
        return {}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            check_ddp_finds_unused_parameters(self.trainer.strategy)
        if self.ema is not None and self._trainer is not None and \
                isinstance(self.trainer.strategy, pl.strategies.FSDPStrategy):
            # the EMA holds the student's parameters as they were before FSDP flattened them
            raise ValueError("model.init_args.ema_decay is set, but the generator EMA does not work with "
                             "FSDP1 (trainer.strategy FSDPStrategy): use configs/trainer/fsdp2.yaml (FSDP2 keeps the "
                             "EMA), remove ema_decay, or use DDP")
        # init_from is resolved here, once; a --ckpt_path resume restores its own state afterwards.
        # Role copies still on the meta device (FSDP2) get it in configure_model, once they hold values
        if not self.teacher.has_meta_roles:
            self._load_init_from()

    def _load_init_from(self) -> None:
        if self.init_from and not self._init_from_loaded:
            self.load_student_from(self.init_from)
            if self.ema is not None:  # the shadows start from the loaded student, not the teacher
                self.ema.restart()
            self._init_from_loaded = True

    # ------------------------------------------------------------------ sharding (FSDP2)
    def sharding_units(self) -> Iterator[torch.nn.Module]:
        """The modules :class:`~dmdx_lightning.strategies.FSDP2Strategy` shards, inner ones first:
        each block of every teacher network (the teacher's ``network_blocks``), then the network
        (its remaining parameters: embeddings, norms, output layers), then each discriminator
        head. Every trainable parameter is in one of them; the frozen text encoders, VAE and
        discriminator backbones are not (whole on every rank)."""
        seen: list[torch.nn.Module] = []
        for role in self.teacher.build_roles:
            net = self.teacher.network(role)
            if any(net is s for s in seen):
                continue  # lora mode: one network for every role
            seen.append(net)
            yield from self.teacher.network_blocks(net)
            yield net
        discriminator = self._modules.get("discriminator")  # heads on a frozen backbone, where a method has one
        if discriminator is not None:
            yield from discriminator.heads

    def configure_model(self) -> None:
        """Lightning's hook for model parallelism, run under every strategy after ``setup`` (so an
        ``init_from`` student is what is sharded): under :class:`~dmdx_lightning.strategies.FSDP2Strategy`
        shard :meth:`sharding_units`, the EMA then tracking the sharded student (its shadows become
        shards too); then ``compile`` the blocks (outside FSDP2's per-unit hooks)."""
        from dmdx_lightning.strategies import FSDP2Strategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDP2Strategy):
            self.trainer.strategy.shard(self)
            if self.ema is not None:
                # sharding replaced the student's parameters; the shadows equal them here (a fresh run,
                # or restarted from init_from in setup), and a resume loads the saved ones after this hook
                self.ema = GeneratorEMA(self.teacher.trainable_parameters("student"), self.ema.decay)
        elif self.teacher.has_meta_roles:  # built for FSDP2, trained without it: whole copies after all
            self.teacher.fill_role_copies(self.teacher.denoiser_device)
        self._load_init_from()  # where setup left it to now (no-op otherwise)
        if self.compile_options is not None:
            from dmdx_lightning.compile import compile_blocks

            compile_blocks(self.teacher, **self.compile_options)

    def checkpoint_keys(self) -> set[str]:
        """State-dict keys a checkpoint holds: the trainable parameters (student, fake score,
        heads) and the persistent buffers (EMA shadows, counters); never the frozen teacher."""
        return {clean_name(n) for n, p in self.named_parameters() if p.requires_grad} | \
            {clean_name(n) for n in _persistent_buffer_names(self)}

    # ------------------------------------------------------------------ who steps
    def players_for_step(self, iteration: int) -> list[str]:
        """THE place that decides which players (keys of :attr:`players`) update at ``iteration``,
        in this order."""
        raise NotImplementedError

    def configure_optimizers(self):
        unknown = set(self.lr_warmup) - set(self.players)
        if unknown:
            raise ValueError(f"model.init_args.lr_warmup names players {sorted(unknown)}; this method's players "
                             f"are {list(self.players)}")
        optimizers = [_optimizer_factory(player.optimizer)(player.parameters()) for player in self.players.values()]
        if not self.lr_warmup:
            return optimizers
        # one scheduler per optimizer (same order), so the loop finds a player's by position
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, _linear_warmup(int(self.lr_warmup.get(name, 0))))
                      for name, opt in zip(self.players, optimizers)]
        return optimizers, schedulers

    # ------------------------------------------------------------------ the player loop
    def prepare(self, batch: dict, cond: Conditioning, players: Sequence[str]) -> dict[str, Any]:
        """Per-iteration tensors shared by the players (e.g. the student's sample)."""
        return {}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        cond = self.teacher.encode_prompts(batch["prompt"])
        players = self.players_for_step(int(self.iteration))
        ctx = self.prepare(batch, cond, players)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        by_name = dict(zip(self.players, optimizers))
        schedulers = dict(zip(self.players, _as_list(self.lr_schedulers()))) if self.lr_warmup else {}
        with one_global_step(self):
            for player in players:
                opt = by_name[player]
                with self.toggled_optimizer(opt):
                    reshard_units(self)  # FSDP2: gather the updated weights, frozen as toggled
                    losses = self.players[player].step(batch, cond, ctx)
                    # every rank runs its backward, finite or not (under DDP and FSDP it is a
                    # collective: a rank that skipped it alone would leave the others waiting)
                    self.manual_backward(losses["loss"])
                    if not self._finite_everywhere(losses["loss"], opt, player):
                        opt.zero_grad(set_to_none=True)
                        continue
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if player in schedulers:
                        schedulers[player].step()
                self.log_dict({f"train/{player}/{k}": v.detach() for k, v in losses.items()},
                              prog_bar=False, batch_size=len(cond))
                if player == "generator":
                    self.generator_updates += 1
                    if self.ema is not None:
                        self.ema.update()
        reshard_units(self)  # FSDP2: nothing stays gathered between iterations (checkpoints, sample grids)
        self.iteration += 1
        self.log_dict({"train/iteration": self.iteration.float(),
                       "train/generator_updates": self.generator_updates.float()}, batch_size=len(cond))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Lightning writes logged values every log_every_n_steps iterations, the first time after the
        # n-th one: the run's first iteration would never be written, nor anything of a shorter run
        trainer = self.trainer
        if int(self.iteration) != 1 or trainer.log_every_n_steps <= 1 or trainer.should_stop or trainer.fast_dev_run:
            return  # not the first iteration, or Lightning writes it (or logs nothing: log_every_n_steps 0)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        for logger in self.loggers:  # at the x-value Lightning gives an iteration's values: its index
            logger.log_metrics(metrics, step=0)
            logger.save()

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        super().manual_backward(loss, *args, **kwargs)
        finish_fsdp_backward(self.trainer.strategy.model)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Nothing per batch: validation metrics are callbacks (``callbacks/metrics.py``) that
        sample fixed prompts and seeds at the end of the validation epoch. Defining this step
        turns Lightning's validation loop on when the data module has validation prompts."""

    def _finite_everywhere(self, loss: Tensor, optimizer, player: str) -> bool:
        """Whether ``player``'s loss and gradients are finite on EVERY rank (one gather of a flag per
        rank), so all ranks skip the same steps and the weights stay equal (a rank that stepped
        alone would drift; under FSDP each rank holds other gradients' shards). A skipped step is
        counted; ``max_nonfinite_steps`` in a row stop the run, naming the player, the iteration
        and the ranks, with the last saved checkpoint intact."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # per rank: (loss finite, gradients finite); a NaN loss on one rank makes every rank's
        # gradients NaN under DDP (all-reduced), so the loss says where it started
        local = torch.stack([torch.isfinite(loss.detach()).all(),
                             torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads
                             else torch.ones((), dtype=torch.bool, device=loss.device)]).float()
        flags = (self.all_gather(local) if self._trainer is not None else local).reshape(-1, 2)
        if not self._streaks:  # a resumed run: every player goes on from the saved (longest) streak
            self._streaks = dict.fromkeys(self.players, int(self.nonfinite_streak))
        finite = bool(flags.all())
        self._streaks[player] = 0 if finite else self._streaks[player] + 1
        self.nonfinite_streak.fill_(max(self._streaks.values()))
        if finite:
            return True
        column, what = (0, "loss") if not bool(flags[:, 0].all()) else (1, "gradients")
        ranks = [r for r, ok in enumerate(flags[:, column].tolist()) if not ok]
        streak = self._streaks[player]
        self.log("train/nonfinite_skipped", float(streak))
        rank_zero_warn(f"iteration {int(self.iteration)}: non-finite {player} {what} on rank(s) {ranks}: the "
                       f"{player} step is skipped on every rank ({streak} in a row; the run stops at "
                       f"{self.max_nonfinite_steps})")
        if streak >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{streak} consecutive non-finite losses or gradients of the {player} (the last at iteration "
                f"{int(self.iteration)}, on rank(s) {ranks}); the last saved checkpoint is intact. Lower the "
                f"learning rate or raise max_nonfinite_steps.")
        return False

    # ------------------------------------------------------------------ the student
    def generate(self, cond: Conditioning, *, grad: bool, noise: Tensor | None = None) -> Tensor:
        """A student sample ``x0_hat`` for ``cond`` (from ``noise`` when given, else fresh noise).

        Multi-step students use DMD2's backward simulation: pick a step ``k`` uniformly (from
        ``first_trained_step`` on), run the student's own first ``k`` steps without gradient, then
        predict from ``t_k`` (with gradient when ``grad``), so training sees the inputs inference
        will produce.
        """
        if noise is None:
            noise = torch.randn(self.teacher.latent_shape(len(cond)), device=self.device)
        ts = self.student_timesteps
        k = int(torch.randint(self.first_trained_step, len(ts), ())) if len(ts) > 1 else 0
        if len(ts) > 1 and self._trainer is not None:
            k = same_pass_count(k, self.trainer.strategy)  # FSDP: the same student passes on every rank
        x_t = noise
        if k > 0:
            with torch.no_grad():
                x0 = self.teacher.sample_student(noise, cond, ts[:k])
            x_t = self.teacher.schedule.add_noise(x0, torch.randn_like(x0), torch.full((len(cond),), ts[k], device=self.device))
        t = torch.full((len(cond),), ts[k], device=self.device)
        with torch.set_grad_enabled(grad):
            x0_hat, _ = self.teacher.predict("student", x_t, t, cond)
        return x0_hat

    @torch.no_grad()
    def sample(self, cond: Conditioning, noise: Tensor, use_ema: bool = True,
               generator: torch.Generator | None = None) -> Tensor:
        """Inference: the student's few-step sampler (EMA weights when available)."""
        if use_ema and self.ema is not None:
            with self.ema.swapped():
                return self.teacher.sample_student(noise, cond, self.student_timesteps, generator)
        return self.teacher.sample_student(noise, cond, self.student_timesteps, generator)

    def load_student_from(self, path: str, use_ema: bool = True) -> None:
        """Start the student from ``path``'s student weights (its EMA when it has one)."""
        load_student(self.teacher, path, use_ema)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # clean names: under FSDP the parameters live in wrapped units (``_fsdp_wrapped_module.``)
        # while the full state dict's keys are the plain ones
        # (remove_duplicate=False: a tied frozen weight, e.g. T5's embed_tokens/shared, under every name)
        frozen = {clean_name(name) for name, p in self.named_parameters(remove_duplicate=False)
                  if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        world = self.trainer.world_size if self._trainer is not None else 1
        checkpoint["dmdx"] = {
            "teacher_family": self.teacher.family,
            "teacher_mode": self.teacher.mode,
            "teacher_id": self.teacher.identity(),
            "step_unit": STEP_UNIT,
            # all ranks run this hook, so the per-rank states can be gathered
            "rng": capture_rng(self.all_gather if world > 1 else None, self.device),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        _check_family(checkpoint, self.teacher, "the checkpoint")
        unit = checkpoint["dmdx"].get("step_unit")
        if unit is None:
            self._steps_to_iterations(checkpoint)
        elif unit != STEP_UNIT:
            raise ValueError(f"the checkpoint counts trainer.global_step in {unit!r}, this dmdx_lightning in "
                             f"{STEP_UNIT!r}s: it was written by another version, which can resume it")
        # the FSDP strategies load the state (non-strictly, FSDP2 checking the keys itself) and pop
        # "state_dict" before this hook: nothing to check then
        state = checkpoint.get("state_dict")
        if state is not None:
            missing = sorted(k for k in self.checkpoint_keys() if k not in state)
            if missing:
                raise KeyError(f"checkpoint lacks trainable state {missing[:5]}: it was saved by a different "
                               "configuration (method, discriminator layers or LoRA settings)")
        # applied in on_train_start, just before the first step: between here and there Lightning
        # builds loaders and may run sanity validation, which would advance the RNGs
        self._rng_to_restore = checkpoint.get("dmdx", {}).get("rng")

    def on_train_start(self) -> None:
        rng, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        restore_rng(rng, self.global_rank, self.trainer.world_size, self.device)

    def _steps_to_iterations(self, checkpoint: dict) -> None:
        """Convert, in place, a checkpoint written while ``trainer.global_step`` counted optimizer
        steps (one per player that stepped) to iterations, the unit of :data:`STEP_UNIT`.

        The iteration count is the module's ``iteration`` buffer (FSDP has loaded it into the module
        already); Lightning's step count, kept in the loop state, becomes that count, so the run goes
        on at the next iteration, every later ``every_n_train_steps`` counts iterations, and the
        generator-update count (new with the unit) is what :meth:`players_for_step` scheduled.
        """
        state = checkpoint.get("state_dict")
        iterations = int(state["iteration"] if state is not None and "iteration" in state else self.iteration)
        generator_updates = sum("generator" in self.players_for_step(i) for i in range(iterations))
        if state is not None:
            state.setdefault("generator_updates", torch.tensor(generator_updates, dtype=torch.long))
        else:  # FSDP loaded the state dict (non-strictly) before this hook
            self.generator_updates.fill_(generator_updates)
        steps = checkpoint.get("global_step")
        checkpoint["global_step"] = iterations
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        progress = fit_loop.get("epoch_loop.manual_optimization.optim_step_progress")
        if progress is not None:
            surplus = progress["total"]["completed"] - iterations
            for tracker in progress.values():
                tracker["ready"] = tracker["completed"] = max(0, tracker["completed"] - surplus)
        rank_zero_warn(f"the checkpoint was written when trainer.global_step counted optimizer steps ({steps}); "
                       f"it is resumed at iteration {iterations}. trainer.max_steps, every_n_train_steps and "
                       f"checkpoint names now count iterations: a config written for the old unit needs its "
                       f"values divided by the optimizer steps per iteration")


def load_student(teacher: Teacher, path: str, use_ema: bool = True, what: str = "init_from checkpoint") -> bool:
    """Copy the student's weights from checkpoint ``path`` into ``teacher`` (the EMA's when the
    checkpoint has one and ``use_ema``); returns whether the EMA was used.

    Only the student's tensors are read: the checkpoint is memory-mapped, so the fake score, the
    heads and the optimizer states in it are never loaded into memory (``dmdx export`` of a
    full-mode SD3.5-Large checkpoint would otherwise read some 200 GB).
    """
    params = dict(teacher.named_trainable_parameters("student"))
    ckpt = _load_checkpoint(path, what, [f"teacher.{n}" for n in params] + [f"ema.shadow_{i}" for i in range(len(params))])
    state = ckpt["state_dict"]
    _check_family(ckpt, teacher, path)
    missing = [n for n in params if f"teacher.{n}" not in state]
    if missing:
        raise KeyError(f"{path} has no student weights for {missing[:3]}... (is it a checkpoint of this teacher/mode?)")
    shadows = GeneratorEMA.stored_shadows(state, "ema.", len(params)) if use_ema else None
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for i, (n, p) in enumerate(params.items()):
            value = shadows[i] if shadows is not None else state[f"teacher.{n}"]
            if isinstance(p, DTensor):  # sharded (FSDP2): every rank read the whole tensor and keeps its shard
                value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)
    return shadows is not None


def resolve_student_timesteps(student_steps: int, student_timesteps: Sequence[float] | None,
                              schedule) -> list[float]:
    """The student's sampling times: ``student_timesteps`` as given, else ``student_steps`` evenly
    spaced ones (:func:`default_student_timesteps`); checked to decrease within ``(0, 1]``."""
    times = [float(t) for t in (student_timesteps or default_student_timesteps(student_steps, schedule))]
    if any(not 0.0 < t <= 1.0 for t in times) or sorted(times, reverse=True) != times:
        raise ValueError(f"student_timesteps must be decreasing values in (0, 1], got {times}")
    return times


def default_student_timesteps(num_steps: int, schedule) -> list[float]:
    """``num_steps`` evenly spaced times from 1, through the schedule's ``shift_time``."""
    return student_timesteps(num_steps, schedule=schedule)


@contextmanager
def one_global_step(module: pl.LightningModule):
    """Count the iteration run inside as ONE ``trainer.global_step``, however many players step.

    Under manual optimization Lightning adds one to ``global_step`` at every
    ``LightningOptimizer.step()`` (``optim_step_progress``): 3 per ADM iteration, 11 per 5 DMD2
    iterations with TTUR 5. Here the count is set to its value at the start of the iteration plus
    one once the players have stepped, so every Lightning setting in steps counts iterations and
    checkpoints hold that count. Outside a Trainer (a bare loop) nothing is counted.
    """
    if module._trainer is None:
        yield
        return
    progress = module.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    total, current = progress.total.completed, progress.current.completed
    yield
    progress.total.ready = progress.total.completed = total + 1
    progress.current.ready = progress.current.completed = current + 1


def _persistent_buffer_names(module: torch.nn.Module):
    """Buffers a state dict holds: not the non-persistent ones (e.g. CLIP text encoders'
    ``position_ids`` in transformers 5), which no checkpoint can contain."""
    for prefix, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name


def _optimizer_factory(factory: OptimizerCallable | str) -> OptimizerCallable:
    """A player's optimizer factory. A config that leaves a ``*_optimizer`` out gets its default
    (:func:`_default_optimizer`), which LightningCLI passes on as its dotted name: import it."""
    if isinstance(factory, str):
        module, _, name = factory.rpartition(".")
        return getattr(importlib.import_module(module), name)
    return factory


def _linear_warmup(steps: int):
    """LambdaLR factor: ``(k + 1) / steps`` for the first ``steps`` optimizer steps, then 1."""
    return lambda k: 1.0 if steps <= 0 else min(1.0, (k + 1) / steps)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _load_checkpoint(path: str, what: str = "init_from checkpoint", keys: Sequence[str] = ()) -> dict:
    """A checkpoint file, or a checkpoint folder (FSDP2's sharded checkpoints) of which only the
    tensors named in ``keys`` are read."""
    p = Path(path)
    if is_sharded_checkpoint(p):
        verify_sharded(p)
        return read_sharded_checkpoint(p, keys)
    if not p.is_file():
        hint = " (run the stage that writes it first, e.g. `dmdx fit --config configs/quickstart/adp.yaml`)" \
            if what.startswith("init_from") else ""
        raise FileNotFoundError(f"{what} {path} does not exist{hint}")
    verify_file(p)  # a damaged file is an error naming it (dmdx_lightning.checksums), not wrong weights
    # weights_only: never unpickle arbitrary objects (our checkpoints hold tensors and plain types only);
    # mmap: a tensor is read from disk only when it is used (the caller takes the student's)
    return torch.load(p, map_location="cpu", weights_only=True, mmap=True)


def _check_family(checkpoint: dict, teacher: Teacher, where: str) -> None:
    meta = checkpoint.get("dmdx")
    if meta is None:
        raise ValueError(f"{where} was not written by a dmdx_lightning distillation module")
    if meta["teacher_family"] != teacher.family or meta["teacher_mode"] != teacher.mode:
        raise ValueError(
            f"{where} was trained with teacher family {meta['teacher_family']!r} ({meta['teacher_mode']} mode), "
            f"but this run uses {teacher.family!r} ({teacher.mode} mode)")
    # older checkpoints have no teacher_id; another id of the same family (e.g. the same weights at
    # another path) may be intended, so it is said, not refused
    if meta.get("teacher_id", teacher.identity()) != teacher.identity():
        rank_zero_warn(f"{where} was trained with teacher {meta['teacher_id']!r}; this run uses "
                       f"{teacher.identity()!r} (same family and mode, so the run goes on)")
