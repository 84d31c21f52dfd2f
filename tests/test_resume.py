"""Exact resume: stopping at iteration k and resuming with ``ckpt_path`` to iteration N gives bitwise
the same state and logged losses as an uninterrupted run to N (CPU), data order included.

The modules under test are listed in ``MODULES`` (name -> factory); ADP joins it after the ``adp``
branch lands, with no other change to these tests.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dmdx_lightning.data.prompts import PromptDataModule
from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, DigitsTeacher

OPT = partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99))
# CPU here and in CI; a GPU machine can rerun the same checks with DMDX_TEST_ACCELERATOR=gpu
# (and DMDX_TEST_DETERMINISTIC=1 for Lightning's deterministic=True)
ACCELERATOR = os.environ.get("DMDX_TEST_ACCELERATOR", "cpu")
DETERMINISTIC = os.environ.get("DMDX_TEST_DETERMINISTIC") == "1"


def make_adm(**kw) -> pl.LightningModule:
    # the DMD diagnostic on every generator step, so that it is compared at every iteration too: at
    # the default cadence Lightning keeps logging the block's last value, which a run resumed
    # mid-block has not computed (it logs the key again from the next block on)
    return ADMModule(DigitsTeacher(), LatentDiscriminator(layers=[1, -1], head_channels=16), loss="adm",
                     generator_optimizer=OPT, fake_score_optimizer=OPT, discriminator_optimizer=OPT,
                     ema_decay=0.9, dmd_diagnostic_every=1, **kw)


def make_adp(**kw) -> pl.LightningModule:
    from dmdx_lightning.discriminators.pixel import PixelDiscriminator
    from dmdx_lightning.evaluation.digits import DigitsClassifierBackbone
    from dmdx_lightning.methods.adp import ADPModule

    return ADPModule(DigitsTeacher(), LatentDiscriminator(layers=[1, -1], head_channels=16),
                     PixelDiscriminator(DigitsClassifierBackbone(), layers=[1, 2], head_channels=16),
                     generator_optimizer=OPT, discriminator_optimizer=OPT, ema_decay=0.9, **kw)


def prompt_data(tmp_path: Path):
    # 10 prompts, batch 4: 2 batches an epoch (drop_last), so runs cross epoch boundaries
    return PromptDataModule(str(prompt_file(tmp_path)), batch_size=4)


def pair_data(tmp_path: Path):
    """10 ODE pairs (random latents, written by the real shard writer), batch 4: 2 batches an epoch."""
    from dmdx_lightning.data.ode_pairs import ODEPairDataModule
    from tests.test_configs import write_tiny_pairs

    directory = tmp_path / "pairs"
    if not (directory / "index.json").is_file():
        write_tiny_pairs(directory, num_pairs=10)
    return ODEPairDataModule(str(directory), batch_size=4)


#: name -> (factory, players (= optimizers), data module factory)
MODULES = {"adm": (make_adm, 3, prompt_data), "adp": (make_adp, 2, pair_data)}


class Recorder(pl.Callback):
    """Per-iteration record of what training saw and logged."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.rows[trainer.global_step] = {"index": batch["index"].tolist(), "epoch": trainer.current_epoch,
                                          "logged": logged}


def prompt_file(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(DIGIT_PROMPTS) + "\n")
    return path


def run(module_name, tmp_path, iterations, ckpt_path=None, save_every=None):
    make, _, make_data = MODULES[module_name]
    pl.seed_everything(0)
    module = make()
    data = make_data(tmp_path)
    recorder = Recorder()
    callbacks = [recorder]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_every,
                                         save_top_k=-1, filename="{step}"))
    trainer = pl.Trainer(max_steps=iterations, accelerator=ACCELERATOR, devices=1, deterministic=DETERMINISTIC,
                         logger=False, callbacks=callbacks,
                         enable_checkpointing=bool(save_every), enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer, recorder


def full_state(module, trainer) -> dict[str, torch.Tensor]:
    state = {f"module.{k}": v.cpu() for k, v in module.state_dict().items()}
    for i, opt in enumerate(trainer.optimizers):
        for pid, s in opt.state_dict()["state"].items():
            for k, v in s.items():
                state[f"opt{i}.{pid}.{k}"] = torch.as_tensor(v).cpu()
    return state


N_ITERATIONS = 5


@pytest.fixture(scope="module", params=list(MODULES))
def reference(request, tmp_path_factory):
    """An uninterrupted run of N_ITERATIONS that saves a checkpoint after every iteration."""
    name = request.param
    tmp_path = tmp_path_factory.mktemp(f"reference_{name}")
    module, trainer, rec = run(name, tmp_path, N_ITERATIONS, save_every=1)
    return name, tmp_path, module, trainer, rec


@pytest.mark.slow
@pytest.mark.parametrize("stop_iteration", [3, 4], ids=["mid_epoch", "epoch_end"])
def test_resume_is_bitwise_exact(reference, stop_iteration, tmp_path):
    module_name, ref_dir, ref_module, ref_trainer, ref_rec = reference
    k, n = stop_iteration, N_ITERATIONS
    ckpt = ref_dir / "ckpt" / f"step={k}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (ref_dir / "ckpt").iterdir())

    module, trainer, rec = run(module_name, tmp_path, n, ckpt_path=str(ckpt))
    assert trainer.global_step == ref_trainer.global_step == n
    # the resumed run trained exactly the iterations after k, on the same prompts, in the same
    # order, in the same epochs, and logged the same losses
    assert sorted(rec.rows) == [s for s in sorted(ref_rec.rows) if s > k]
    for step, row in rec.rows.items():
        assert row == ref_rec.rows[step], f"step {step}: {row} != {ref_rec.rows[step]}"
    ref_state, state = full_state(ref_module, ref_trainer), full_state(module, trainer)
    assert state.keys() == ref_state.keys()
    different = [key for key in state if not torch.equal(state[key], ref_state[key])]
    assert not different, different[:10]
    # the comparison covers every player, the EMA and every optimizer
    for prefix in ("module.teacher.roles.student.", "module.teacher.roles.fake.", "module.discriminator.heads.",
                   "module.ema.shadow_", *(f"opt{i}." for i in range(MODULES[module_name][1]))):
        assert any(key.startswith(prefix) for key in state), prefix


@pytest.mark.slow
def test_resume_would_differ_without_the_saved_position(reference, tmp_path):
    """The exactness test can fail: a checkpoint without the loader position replays prompts."""
    module_name, ref_dir, _, _, ref_rec = reference
    k = 3  # mid-epoch
    ckpt = torch.load(ref_dir / "ckpt" / f"step={k}.ckpt", weights_only=True)
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(ckpt, tmp_path / "no_position.ckpt")
    _, _, rec = run(module_name, tmp_path, k + 1, ckpt_path=str(tmp_path / "no_position.ckpt"))
    assert rec.rows[k + 1]["index"] != ref_rec.rows[k + 1]["index"]


@pytest.mark.parametrize("module_name", list(MODULES))
def test_checkpoint_holds_no_frozen_teacher_and_loads_weights_only(module_name, tmp_path):
    run(module_name, tmp_path, 2, save_every=1)
    path = tmp_path / "ckpt" / "step=1.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects anywhere
    keys = ckpt["state_dict"].keys()
    assert not [k for k in keys if k.startswith("teacher.denoiser.")]
    assert any(k.startswith("teacher.roles.student.") for k in keys)
    assert {"torch", "numpy", "python"} <= set(ckpt["dmdx"]["rng"])
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_consumed"] == 1


# -------------------------------------------------------------------------------- the sampler alone
from dmdx_lightning.data.prompts import PromptDataset, collate_prompts  # noqa: E402
from dmdx_lightning.data.resumable import ResumableDataLoader, ResumableDistributedSampler  # noqa: E402


@pytest.mark.parametrize("size", [20, 21])
def test_sampler_splits_ranks_disjointly_and_completely(size):
    ds = PromptDataset([f"p{i}" for i in range(size)])
    shares = [list(ResumableDistributedSampler(ds, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == -(-size // 2)
    assert set(shares[0]) | set(shares[1]) == set(range(size))
    assert len(set(shares[0]) & set(shares[1])) == (size % 2)  # odd sizes pad with one repeat
    again = [list(ResumableDistributedSampler(ds, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert again == shares  # a function of seed and epoch only


def test_loader_state_resumes_mid_epoch_and_refuses_another_split():
    ds = PromptDataset([f"p{i}" for i in range(12)])

    def loader(batch_size=2, world=1):
        return ResumableDataLoader(ds, sampler=ResumableDistributedSampler(ds, num_replicas=world, seed=1),
                                   batch_size=batch_size, drop_last=True, collate_fn=collate_prompts)

    a = loader()
    a.sampler.set_epoch(2)
    batches = []
    for batch in a:
        batches.append(batch["index"].tolist())
        a.consumed()
        if len(batches) == 2:
            state = a.state_dict()
            break
    assert state == {"epoch": 2, "batches_consumed": 2, "num_replicas": 1, "batch_size": 2, "seed": 1}
    b = loader()
    b.load_state_dict(state)
    rest = [batch["index"].tolist() for batch in b]
    full = loader()
    full.sampler.set_epoch(2)
    assert batches + rest == [batch["index"].tolist() for batch in full]
    c = loader(batch_size=3)  # another batch size: the position means nothing there
    with pytest.warns(UserWarning, match="restarts from its first batch"):
        c.load_state_dict(state)
    assert len(list(c)) == 4


@pytest.mark.parametrize("saved_world,world", [(2, 4), (4, 2), (2, 1)])
def test_loader_position_carries_over_to_another_world_size(saved_world, world):
    """A checkpoint of W ranks resumed on W' ranks: together the new ranks see the rest of the epoch's
    order, each prompt once (FSDP2 checkpoints load at any world size)."""
    ds = PromptDataset([f"p{i}" for i in range(16)])

    def loader(rank, replicas):
        return ResumableDataLoader(ds, sampler=ResumableDistributedSampler(ds, num_replicas=replicas, rank=rank, seed=1),
                                   batch_size=1, drop_last=True, collate_fn=collate_prompts)

    order = list(ResumableDistributedSampler(ds, num_replicas=1, rank=0, seed=1))  # the epoch's order
    state = {"epoch": 0, "batches_consumed": 2, "num_replicas": saved_world, "batch_size": 1, "seed": 1}
    rest = []
    for rank in range(world):
        resumed = loader(rank, world)
        with pytest.warns(UserWarning, match=f"written by {saved_world} processes.*after its first {2 * saved_world} "
                                             "prompts \\(exactly\\)"):
            resumed.load_state_dict(state)
        rest += [i for batch in resumed for i in batch["index"].tolist()]
    assert sorted(rest) == sorted(order[2 * saved_world:])


def test_rng_capture_and_restore_round_trip():
    import random

    import numpy as np

    from dmdx_lightning.rng import capture_rng, restore_rng

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(state, rank=0, world=1, device=torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    # a fresh run's rank 1 gets its own stream, rank 0 keeps the seeded one
    torch.manual_seed(5)
    restore_rng(None, rank=1, world=2, device=torch.device("cpu"))
    rank1 = torch.rand(3)
    torch.manual_seed(5)
    restore_rng(None, rank=0, world=2, device=torch.device("cpu"))
    assert not torch.equal(rank1, torch.rand(3))
