"""The Teacher contract, checked on every family (diffusers' ModelTesterMixin, for teachers).

Adding a family = one line in FAMILIES: a name and a factory that builds the teacher tiny, given
the role mode and pytest's ``request`` (for session fixtures such as the tiny SD3 folder). What
the contract is: the docstring of :mod:`dmdx_lightning.teachers.base`. A family's own test file
checks only what is particular to it (its prompt encoding, its schedule, its numerics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from dmdx_lightning.schedules import student_timesteps
from dmdx_lightning.teachers.base import Teacher
from tests.conftest import TINY_COGVIDEOX, TINY_FLUX, TINY_SD, TINY_SD3, TINY_SDXL, TINY_WAN


def _digits(mode, request, **kw):
    from dmdx_lightning.teachers.digits import DigitsTeacher

    return DigitsTeacher(mode=mode, lora_rank=4, **kw)


def _sd3(mode, request, **kw):
    from dmdx_lightning.teachers.sd3 import SD3Teacher

    return SD3Teacher(pretrained_model_name_or_path=str(request.getfixturevalue("tiny_sd3_dir")), mode=mode,
                      **TINY_SD3, **kw)


def _sdxl(mode, request, **kw):
    from dmdx_lightning.teachers.sdxl import SDXLTeacher

    return SDXLTeacher(pretrained_model_name_or_path=str(request.getfixturevalue("tiny_sdxl_dir")), mode=mode,
                       **TINY_SDXL, **kw)


def _sd(mode, request, **kw):
    from dmdx_lightning.teachers.sdxl import StableDiffusionTeacher

    return StableDiffusionTeacher(pretrained_model_name_or_path=str(request.getfixturevalue("tiny_sd15_dir")),
                                  mode=mode, **TINY_SD, **kw)


def _cogvideox(mode, request, **kw):
    from dmdx_lightning.teachers.cogvideox import CogVideoXTeacher

    return CogVideoXTeacher(pretrained_model_name_or_path=str(request.getfixturevalue("tiny_cogvideox_dir")),
                            mode=mode, **TINY_COGVIDEOX, **kw)


def _flux(mode, request, **kw):
    from dmdx_lightning.teachers.flux import FluxTeacher

    return FluxTeacher(pretrained_model_name_or_path=str(request.getfixturevalue("tiny_flux_dir")), mode=mode,
                       **TINY_FLUX, **kw)


def _wan(mode, request, **kw):
    from dmdx_lightning.teachers.wan import WanTeacher

    return WanTeacher(pretrained_model_name_or_path=str(request.getfixturevalue("tiny_wan_dir")), mode=mode,
                      **TINY_WAN, **kw)


def _wan_a14b(mode, request, **kw):
    from dmdx_lightning.teachers.wan import WanTeacher

    return WanTeacher(pretrained_model_name_or_path=str(request.getfixturevalue("tiny_wan_a14b_dir")), mode=mode,
                      **TINY_WAN, **kw)


def _mixture(mode, request, **kw):
    from dmdx_lightning.teachers.mixture import MixtureTeacher

    return MixtureTeacher(shape=(2, 4, 4), num_classes=4, modes_per_class=4, std=0.3, channels=8, num_blocks=2,
                          sample_steps=8, mode=mode, lora_rank=4, **kw)


@dataclass(frozen=True)
class Family:
    name: str
    #: ``(mode, request, **Teacher options) -> teacher``
    build: Callable[..., Teacher]
    #: decode(encode(images)) == images within this tolerance; None: only shapes are checked
    #: (a random tiny VAE does not reconstruct)
    round_trip_atol: float | None = None
    #: the teacher's ``family`` attribute where the entry is a variant of a family (default: ``name``)
    family: str | None = None


FAMILIES = [
    Family("digits", _digits, round_trip_atol=0.0),
    Family("sd3", _sd3),
    Family("sdxl", _sdxl),
    Family("sd", _sd),
    Family("mixture", _mixture),
    Family("cogvideox", _cogvideox),
    Family("flux", _flux),
    Family("wan", _wan),
    Family("wan_a14b", _wan_a14b, family="wan"),  # two experts
]


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request) -> Family:
    return request.param


def build(family: Family, request, mode: str = "full", **kw) -> Teacher:
    torch.manual_seed(0)
    return family.build(mode, request, **kw)


def inputs(teacher: Teacher, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(teacher.latent_shape(batch), generator=g)
    t = torch.linspace(0.3, 0.8, batch)
    prompts = [teacher.example_prompts[i % len(teacher.example_prompts)] for i in range(batch)]
    return x_t, t, teacher.encode_prompts(prompts)


def predictions(teacher: Teacher, x_t, t, cond) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {role: teacher.predict(role, x_t, t, cond)[0] for role in ("real", "fake", "student")}


# ------------------------------------------------------------------------------------ the contract
def test_declares_the_contract(family, request):
    teacher = build(family, request)
    teacher.check_contract()
    assert teacher.family == (family.family or family.name)
    assert isinstance(teacher.sample_steps, int) and teacher.sample_steps >= 1
    assert isinstance(teacher.cfg_scale, float)
    assert isinstance(teacher.example_prompts, tuple) and teacher.example_prompts
    cond = teacher.encode_prompts(list(teacher.example_prompts) + [""])
    assert len(cond) == len(teacher.example_prompts) + 1 and cond.pooled.ndim == 2


def test_a_family_missing_the_contract_fails_when_built():
    from dmdx_lightning.schedules import FlowMatchSchedule

    class Incomplete(Teacher):
        family = "incomplete"

        def __init__(self):
            super().__init__()
            self.schedule = FlowMatchSchedule()
            self.setup_roles(torch.nn.Linear(2, 2))

    with pytest.raises(TypeError, match="Incomplete does not fulfil the Teacher contract.*sample_steps.*cfg_scale"
                                        ".*example_prompts"):
        Incomplete()


# ------------------------------------------------------------------------------------ roles
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_roles_start_equal(family, request, mode):
    teacher = build(family, request, mode)
    preds = predictions(teacher, *inputs(teacher))
    torch.testing.assert_close(preds["fake"], preds["real"])
    torch.testing.assert_close(preds["student"], preds["real"])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_changing_the_student_changes_only_the_student(family, request, mode):
    teacher = build(family, request, mode)
    args = inputs(teacher)
    before = predictions(teacher, *args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.trainable_parameters("student"):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    after = predictions(teacher, *args)
    assert (after["student"] - before["student"]).abs().max() > 1e-4
    torch.testing.assert_close(after["real"], before["real"], rtol=0, atol=0)
    torch.testing.assert_close(after["fake"], before["fake"], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_student_built_alone_is_the_training_student(family, request, mode):
    """``build_roles=("student",)`` (what `dmdx export` builds): the student under the same names
    and with the same predictions as in a training build, one network, and no other role."""
    whole, alone = build(family, request, mode), build(family, request, mode, build_roles=["student"])
    names = [n for n, _ in whole.named_trainable_parameters("student")]
    assert [n for n, _ in alone.named_trainable_parameters("student")] == names  # checkpoint keys match
    x_t, t, cond = inputs(alone)
    with torch.no_grad():
        for (_, p), (_, q) in zip(whole.named_trainable_parameters("student"), alone.named_trainable_parameters("student")):
            q.copy_(p.add_(0.05 * torch.randn_like(p)))  # a student that differs from the teacher
        torch.testing.assert_close(alone.predict("student", x_t, t, cond)[0], whole.predict("student", x_t, t, cond)[0])
    if mode == "full":  # the loaded network is the student: no real score and no copy beside it
        assert alone.roles["student"] is alone.denoiser and list(alone.roles) == ["student"]
    for role in ("real", "fake"):
        with pytest.raises(ValueError, match=f"no '{role}' role"):
            alone.network(role)


def test_trainable_parameters_are_the_roles_own(family, request):
    teacher = build(family, request, "lora")
    student = {id(p) for p in teacher.trainable_parameters("student")}
    fake = {id(p) for p in teacher.trainable_parameters("fake")}
    assert student and fake and not student & fake
    assert all(not p.requires_grad for n, p in teacher.denoiser.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------ CFG and features
def test_cfg_is_uncond_plus_w_times_cond_minus_uncond(family, request):
    teacher = build(family, request)
    if teacher.guidance != "true_cfg":
        # (a family's true-CFG option is checked against its pipeline in its own file: tests/test_flux.py)
        pytest.skip(f"{family.name} guides with guidance={teacher.guidance!r}, not true CFG")
    x_t, t, cond = inputs(teacher)
    w = 3.0
    with torch.no_grad():
        x0_w, eps_w = teacher.predict("real", x_t, t, cond, cfg_scale=w)
        x0_c, eps_c = teacher.predict("real", x_t, t, cond)
        x0_u, eps_u = teacher.predict("real", x_t, t, teacher.null_conditioning(len(cond)))
    torch.testing.assert_close(x0_w, x0_u + w * (x0_c - x0_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_w, eps_u + w * (eps_c - eps_u), rtol=1e-4, atol=1e-4)


def test_guidance_reaches_the_network(family, request):
    """Every family's ``cfg_scale = w`` changes the real score; ``embedded`` in ONE pass whose
    conditioning carries ``guidance = w`` (as the network reads it), ``none`` refuses ``w != 1``."""
    teacher = build(family, request)
    x_t, t, cond = inputs(teacher)
    if teacher.guidance == "none":
        with pytest.raises(ValueError, match="cfg_scale must be 1"):
            teacher.predict("real", x_t, t, cond, cfg_scale=3.0)
        return
    with torch.no_grad():
        x0_1 = teacher.predict("real", x_t, t, cond)[0]
        x0_w = teacher.predict("real", x_t, t, cond, cfg_scale=3.0)[0]
    assert (x0_w - x0_1).abs().max() > 1e-4
    if teacher.guidance == "embedded":
        calls = []
        handle = teacher.denoiser.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
        try:
            with torch.no_grad():
                direct = teacher.schedule.to_x0_eps(teacher.forward_role(
                    "real", x_t, t, cond.with_entries(guidance=torch.full((len(cond),), 3.0))), x_t, t,
                    teacher.prediction_type)[0]
                calls.clear()
                teacher.predict("real", x_t, t, cond, cfg_scale=3.0)
        finally:
            handle.remove()
        assert len(calls) == 1 and calls[0]["hidden_states"].shape[0] == x_t.shape[0]  # one pass, no CFG batch
        torch.testing.assert_close(x0_w, direct)


def test_feature_maps_are_batch_first_4d_or_5d(family, request):
    teacher = build(family, request)
    x_t, t, cond = inputs(teacher, batch=3)
    maps = teacher.feature_maps("real", x_t, t, cond, layers=[0, -1])
    assert len(maps) == 2
    for m in maps:
        assert m.ndim in (4, 5) and m.shape[0] == 3 and torch.isfinite(m).all(), tuple(m.shape)


# ------------------------------------------------------------------------------------ latents and images
def test_latent_shape_is_what_decode_reads(family, request):
    teacher = build(family, request)
    shape = teacher.latent_shape(2)
    assert shape[0] == 2 and len(shape) in (4, 5)
    assert teacher.latent_shape(5)[1:] == shape[1:]
    images = teacher.decode(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    assert images.ndim == len(shape) and images.shape[0] == 2 and images.shape[1] in (1, 3)
    assert images.min() >= -1 and images.max() <= 1


def test_decode_is_differentiable(family, request):
    """ADP's pixel discriminator trains the generator through decode (D2's generator loss)."""
    teacher = build(family, request)
    latents = (0.1 * torch.randn(teacher.latent_shape(1), generator=torch.Generator().manual_seed(0))).requires_grad_()
    teacher.decode(latents).sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_encode_decode_round_trip(family, request):
    teacher = build(family, request)
    images = teacher.decode(torch.randn(teacher.latent_shape(2), generator=torch.Generator().manual_seed(0)))
    try:
        latents = teacher.encode(images)
    except NotImplementedError as e:
        assert family.name in str(e)  # the error names the family
        pytest.skip(f"{family.name} has no image encoder: {e}")
    assert tuple(latents.shape) == tuple(teacher.latent_shape(2))
    again = teacher.decode(latents)
    assert again.shape == images.shape
    if family.round_trip_atol is not None:
        torch.testing.assert_close(again, images, rtol=0, atol=family.round_trip_atol)


# ------------------------------------------------------------------------------------ identity
def test_identity_is_stable_and_differs_between_families(request):
    ids = {}
    for fam in FAMILIES:
        first, second = build(fam, request, "full"), build(fam, request, "lora")
        assert isinstance(first.identity(), str) and first.identity()
        assert first.identity() == first.identity() == second.identity(), fam.name
        ids[fam.name] = first.identity()
    assert len(set(ids.values())) == len(FAMILIES), ids


# ------------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_pipeline_export_round_trip(family, request, tmp_path):
    """The exported pipeline's denoiser computes the student's prediction; a family without an
    export says so, naming itself."""
    teacher = build(family, request)
    if "pipeline" not in teacher.export_formats:
        for export in (teacher.export_pipeline, teacher.export_lora):
            with pytest.raises(NotImplementedError, match=f"family {family.name!r}"):
                export(tmp_path, [1.0])
        return
    from diffusers import DiffusionPipeline

    with torch.no_grad():  # a student that differs from the teacher, so the check can fail
        g = torch.Generator().manual_seed(1)
        for p in teacher.trainable_parameters("student"):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    # a 2-step student's times as the methods set them (a discrete schedule replays only its own grid)
    info = teacher.export_pipeline(tmp_path, student_timesteps(2, schedule=teacher.schedule))
    assert isinstance(info, dict)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    denoiser = teacher.pipeline_denoiser(pipe)
    assert type(denoiser) is type(teacher.denoiser), list(pipe.components)
    x_t, t, cond = inputs(teacher)
    with torch.no_grad():
        exported = teacher.model_output(denoiser, x_t, t, cond)
        student = teacher.forward_role("student", x_t, t, cond)
        real = teacher.forward_role("real", x_t, t, cond)
    torch.testing.assert_close(exported, student, rtol=1e-5, atol=1e-5)
    assert (exported - real).abs().max() > 1e-4
