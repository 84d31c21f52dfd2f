"""LoRA roles on one shared network (dmdx_lightning/teachers/adapters.py): a switch costs a constant
(no walk over modules or parameters), computes what peft's own switch computes, leaves trainability
to the optimizers, and happens a known number of times per iteration (a count, not a time)."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.teachers.adapters import RoleLoraLinear
from dmdx_lightning.teachers.sd3 import SD3Teacher
from tests.conftest import TINY_SD3

OPT = partial(torch.optim.AdamW, lr=1e-2, betas=(0.0, 0.99))
PROMPTS = ["a red cube", "a blue sphere"]


class PeftSwitchingSD3(SD3Teacher):
    """The switch as peft's API makes it (what this library did before): every layer's
    ``enable_adapters`` / ``set_adapter``, then every parameter's ``requires_grad`` restored."""

    def _set_adapters(self, role: str) -> None:
        self._check_built(role)
        flags = [(p, p.requires_grad) for p in self.denoiser.parameters()]
        for layer in self.denoiser.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(role != "real")
                if role != "real":
                    layer.set_adapter(role)
        for p, flag in flags:
            p.requires_grad_(flag)


def teacher(folder, cls=SD3Teacher, **kw):
    torch.manual_seed(0)
    t = cls(str(folder), mode="lora", **{**TINY_SD3, **kw})
    with torch.no_grad():  # distinct adapters (peft starts lora_B at zero: every role would equal the base)
        for name, p in t.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3 if ".student." in name else 0.6)
    return t


def outputs(t) -> dict[str, torch.Tensor]:
    cond = t.encode_prompts(PROMPTS)
    x_t = torch.randn(t.latent_shape(2), generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        return {role: t.forward_role(role, x_t, s, cond) for role in ("student", "real", "fake", "student")}


def test_switch_computes_what_peft_switching_computes(tiny_sd3_dir):
    ours, peft_way = outputs(teacher(tiny_sd3_dir)), outputs(teacher(tiny_sd3_dir, PeftSwitchingSD3))
    for role in ours:
        torch.testing.assert_close(ours[role], peft_way[role], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours["student"], ours["fake"]) and not torch.allclose(ours["student"], ours["real"])


def test_switch_is_one_list_and_survives_peft_switching(tiny_sd3_dir):
    t = teacher(tiny_sd3_dir)
    layers = [m for m in t.denoiser.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(type(m) is RoleLoraLinear for m in layers)  # every SD3 target is a plain Linear
    assert all(m._active_adapter is t._adapters.active for m in layers)  # one list object: a switch is O(1)
    before = outputs(t)
    for layer in layers:  # something (a user, a peft utility) switches through peft's own API
        layer.set_adapter("fake")
    after = outputs(t)  # the next role entered shares the list again
    assert all(m._active_adapter is t._adapters.active for m in layers)
    for role in before:
        torch.testing.assert_close(before[role], after[role])


def test_switch_leaves_requires_grad_to_the_optimizers(tiny_sd3_dir):
    t = teacher(tiny_sd3_dir)
    fake = [p for n, p in t.denoiser.named_parameters() if ".fake." in n]
    for p in fake:  # what Lightning's toggle_optimizer does while the generator steps
        p.requires_grad_(False)
    for role in ("fake", "real", "student", "fake"):
        with t.as_role(role):
            pass
    assert not any(p.requires_grad for p in fake)
    assert all(p.requires_grad for n, p in t.denoiser.named_parameters() if ".student." in n)
    assert not any(p.requires_grad for n, p in t.denoiser.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------ whole iterations
def run(folder, loss: str, iterations: int, cls=SD3Teacher, **kw):
    """``(module, roles entered per iteration)`` after ``iterations`` iterations of ``loss`` in lora
    mode with gradient checkpointing (the one-card recipe's setting), seed 0."""
    t = teacher(folder, cls, gradient_checkpointing=True, **kw)
    disc = None if loss == "dmd" else LatentDiscriminator(layers=[0, 1], head_channels=8,
                                                        backbone_role="fake" if loss == "dmd2" else "real")
    module = ADMModule(t, disc, loss=loss, generator_optimizer=OPT, fake_score_optimizer=OPT,
                       discriminator_optimizer=OPT, student_steps=1)
    entered: list[list[str]] = []

    class Record(pl.Callback):
        def on_train_start(self, *args):
            module.switches_at_start = t.role_switches  # building the discriminator may enter a role

        def on_train_batch_start(self, *args):
            entered.append([])

    switch = t._adapters.set if cls is SD3Teacher else None
    if switch is not None:
        def recording(adapter):
            if t._adapters.active != ([] if adapter is None else [adapter]):
                entered[-1].append(adapter or "real")
            switch(adapter)
        t._adapters.set = recording
    shape = t.latent_shape(2)
    g = torch.Generator().manual_seed(2)
    data = [{"prompt": PROMPTS, "x0": torch.randn(shape, generator=g)} for _ in range(iterations)]
    torch.manual_seed(0)
    pl.Trainer(accelerator="cpu", max_steps=iterations, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()]
               ).fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return module, entered


#: the adapter changes of one iteration after the first (the first starts from the frozen network).
#: ADM: generator (student samples, fake and real scores, the discriminator on the real score's
#: features; backward recomputes the fake score's then the student's checkpointed blocks), fake
#: score (its denoising loss, backward), discriminator (real score's features).
#: DMD / DMD2: generator (student, real, fake; backward: student), fake score (DMD2's GAN head
#: reads the fake score's own features, so the discriminator adds no switch).
SWITCHES = {
    "adm": ["student", "fake", "real", "fake", "student", "fake", "real", "fake", "real"],
    "dmd": ["student", "real", "fake", "student", "fake"],
    "dmd2": ["student", "real", "fake", "student", "fake"],
}


@pytest.mark.parametrize("loss", list(SWITCHES))
def test_switches_per_iteration(tiny_sd3_dir, loss):
    module, entered = run(tiny_sd3_dir, loss, 3)
    assert entered[1] == entered[2] == SWITCHES[loss]
    assert module.teacher.role_switches - module.switches_at_start == sum(map(len, entered))


def test_training_equals_peft_switching_and_checkpoint_frozen_changes_nothing(tiny_sd3_dir):
    """Three ADM iterations: the same adapters (to float tolerance: the short forward sums in one
    op) with our switch, with peft's, and with the frozen teacher's passes checkpointed too."""
    def adapters(module):
        return {n: p.detach().clone() for n, p in module.teacher.denoiser.named_parameters() if "lora_" in n}

    ours = adapters(run(tiny_sd3_dir, "adm", 3)[0])
    reference = adapters(run(tiny_sd3_dir, "adm", 3, PeftSwitchingSD3, checkpoint_frozen=True)[0])
    frozen = adapters(run(tiny_sd3_dir, "adm", 3, checkpoint_frozen=True)[0])
    start = adapters(ADMModule(teacher(tiny_sd3_dir), None, loss="dmd", generator_optimizer=OPT,
                               fake_score_optimizer=OPT, discriminator_optimizer=OPT, student_steps=1))
    assert any(not torch.equal(ours[n], start[n]) for n in ours)  # they trained
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours[name], frozen[name], rtol=1e-4, atol=1e-5)
