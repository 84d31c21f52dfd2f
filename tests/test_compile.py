"""compile_blocks: the same modules, state-dict keys, hooks and ADM losses with the blocks compiled."""

import copy
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch._dynamo.utils import counters

from dmdx_lightning.compile import RECOMPILE_LIMIT, compile_blocks
from dmdx_lightning.discriminators.latent import LatentDiscriminator
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, DigitsTeacher
from tests.conftest import TINY_SD3, prompt_loader

OPT = partial(torch.optim.AdamW, lr=1e-3, betas=(0.0, 0.99))
SD3_PROMPTS = ["a photo of a cat", "a red bus", "", "an astronaut riding a horse"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, counts only its own graphs and leaves dynamo's limit as it was."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = limit


def adm_module(teacher, layers, head_channels, **kw):
    disc = LatentDiscriminator(layers=layers, head_channels=head_channels)
    return ADMModule(teacher, disc, loss="adm", generator_optimizer=OPT, fake_score_optimizer=OPT,
                     discriminator_optimizer=OPT, **kw)


class Losses(pl.Callback):
    """Every ``train/`` value logged at each iteration."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def adm_losses(module, data, steps: int = 2) -> list[dict[str, float]]:
    """The generator's, fake score's and discriminator's losses of ``steps`` ADM iterations (seed 0)."""
    losses = Losses()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[losses])
    trainer.fit(module, data)
    return losses.rows


def assert_same_losses(eager, compiled):
    assert len(eager) == len(compiled) == 2
    for plain, fast in zip(eager, compiled):
        assert {"train/generator/loss", "train/fake_score/loss", "train/discriminator/loss"} <= plain.keys()
        assert plain.keys() == fast.keys()
        for key in plain:
            assert fast[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-4), key


def assert_every_graph_compiled():
    """Each block state got its own graph: none fell back to eager at dynamo's recompile limit."""
    assert counters["stats"]["unique_graphs"] > 0
    assert counters["frames"]["ok"] == counters["frames"]["total"], dict(counters["frames"])


def test_compile_blocks_keeps_modules_and_is_idempotent(digits_teacher):
    full = digits_teacher
    blocks = {id(b) for net in (full.denoiser, full.roles["student"], full.roles["fake"]) for b in net.blocks}
    keys = list(full.state_dict())
    names = [n for n, _ in full.named_parameters()]
    assert compile_blocks(full, backend="eager") == 12  # 4 blocks in each of the 3 full-mode networks
    assert compile_blocks(full, backend="eager") == 0
    assert {id(b) for net in (full.denoiser, full.roles["student"], full.roles["fake"]) for b in net.blocks} == blocks
    assert list(full.state_dict()) == keys and [n for n, _ in full.named_parameters()] == names
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT

    x, emb = torch.randn(2, 64, 8, 8), torch.randn(2, 128)
    lora = DigitsTeacher(mode="lora")
    wrapped = lora.denoiser.blocks[0]
    wrapped.forward = partial(type(wrapped).forward, wrapped)  # as a library's forward hook wraps it
    assert compile_blocks(lora, backend="eager") == 4  # every role is the one shared base
    torch.testing.assert_close(wrapped(x, emb), type(wrapped).forward(wrapped, x, emb))

    # a deep copy's compiled forward runs the copy's weights, not the original's
    block = full.denoiser.blocks[0]
    twin = copy.deepcopy(block)
    assert twin.forward.__self__ is twin
    with torch.no_grad():
        twin.conv2.weight.zero_()
        twin.conv2.bias.zero_()
    torch.testing.assert_close(twin(x, emb), x)
    assert not torch.allclose(block(x, emb), x)


def test_feature_hooks_run_outside_the_compiled_blocks(digits_teacher):
    """The discriminator's hooks still capture the blocks' outputs (with gradient) and stop the
    network's forward after the deepest block needed."""
    teacher = digits_teacher
    cond = teacher.encode_prompts(list(DIGIT_PROMPTS[:4]))
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    t = torch.full((4,), 0.5)
    eager = teacher.feature_maps("real", x, t, cond, [1, 2])
    compile_blocks(teacher, backend="aot_eager")
    last, tracing = [], []
    teacher.denoiser.blocks[3].register_forward_pre_hook(lambda module, args: last.append(1))
    teacher.denoiser.blocks[1].register_forward_hook(lambda *_: tracing.append(torch.compiler.is_compiling()))
    compiled = teacher.feature_maps("real", x, t, cond, [1, 2])
    assert counters["stats"]["unique_graphs"] > 0
    assert tracing == [False]  # the hook ran eagerly, once, not traced into the block's graph
    assert not last  # stopped early: the block after the deepest one needed never ran
    for plain, fast in zip(eager, compiled):
        torch.testing.assert_close(fast, plain)
    compiled[1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.slow
def test_digits_adm_losses_match_with_inductor():
    """Two ADM iterations (generator, fake score, discriminator) on the digits teacher in full mode."""
    def build():
        torch.manual_seed(0)
        return adm_module(DigitsTeacher(), [1, -1], 32)

    data = prompt_loader(list(DIGIT_PROMPTS) * 2)
    eager, compiled = build(), build()
    keys = list(eager.state_dict())
    assert compile_blocks(compiled.teacher) == 12
    assert_same_losses(adm_losses(eager, data), adm_losses(compiled, data))
    assert list(compiled.state_dict()) == keys
    assert_every_graph_compiled()


@pytest.mark.slow
def test_sd3_lora_adm_losses_match_with_gradient_checkpointing(tiny_sd3_dir):
    """Two ADM iterations on a tiny SD3 in lora mode (one shared base: a graph per role) with the
    blocks under gradient checkpointing, recomputed in backward in the role they ran in.
    ``aot_eager``: dynamo and autograd's graphs without inductor's code generation, which takes
    minutes on this CPU for the 14 block states."""
    from dmdx_lightning.teachers.sd3 import SD3Teacher

    def build():
        torch.manual_seed(0)
        teacher = SD3Teacher(str(tiny_sd3_dir), mode="lora", gradient_checkpointing=True, **TINY_SD3)
        with torch.no_grad():  # fake != real, so the ADM signal is not zero
            gen = torch.Generator().manual_seed(1)
            for p in teacher.trainable_parameters("fake"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        return adm_module(teacher, [0, -1], 16, real_cfg_scale=3.0, student_steps=2)

    data = prompt_loader(SD3_PROMPTS * 2, batch_size=2)
    eager, compiled = build(), build()
    keys = list(eager.state_dict())
    assert compile_blocks(compiled.teacher, backend="aot_eager") == 2
    assert_same_losses(adm_losses(eager, data), adm_losses(compiled, data))
    assert list(compiled.state_dict()) == keys
    assert_every_graph_compiled()
    assert counters["stats"]["unique_graphs"] > 8  # more than dynamo's default limit: RECOMPILE_LIMIT is needed
