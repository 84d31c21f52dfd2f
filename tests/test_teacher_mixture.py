"""The exact Gaussian-mixture teacher: posterior, CFG, roles, metrics, and `dmdx fit` on it."""

import json
import math

import pytest
import torch

from dmdx_lightning.teachers.mixture import (GaussianMixture, MixtureTeacher, class_prompt, mixture_metrics,
                                             prompt_to_class)
from tests.helpers import ROOT, dmdx_fit

#: a mixture small enough for Monte Carlo and for `dmdx fit` in seconds
TINY = dict(shape=(2, 4, 4), num_classes=4, modes_per_class=4, std=0.3, weight_ratio=10.0, channels=8,
            num_blocks=2, sample_steps=8)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return MixtureTeacher(**TINY)


def test_posterior_mean_matches_monte_carlo():
    """E[x0 | x_t] = E_p[x0 N(x_t; (1 - t) x0, t^2 I)] / E_p[N(...)], estimated with prior samples."""
    mixture = GaussianMixture((1, 2, 2), num_classes=1, modes_per_class=3, std=0.5, weight_ratio=4.0, seed=1)
    g = torch.Generator().manual_seed(0)
    x0, _ = mixture.sample(torch.zeros(400_000, dtype=torch.long), g)
    for t in (0.3, 0.6, 0.9):
        query, _ = mixture.sample(torch.zeros(4, dtype=torch.long), g)
        x_t = (1 - t) * query + t * torch.randn(query.shape, generator=g)
        for q in x_t:
            log_lik = -((q - (1 - t) * x0) ** 2).flatten(1).sum(1) / (2 * t * t)
            w = torch.softmax(log_lik, 0)
            mc = (w[:, None] * x0.flatten(1)).sum(0)
            exact = mixture.posterior_mean(q[None], torch.tensor([t]), torch.zeros(1, dtype=torch.long))
            assert torch.allclose(mc, exact.flatten(), atol=0.03), (t, mc, exact)


def test_posterior_limits():
    mixture = GaussianMixture((1, 2, 2), num_classes=2, modes_per_class=3, std=0.1, seed=0)
    labels = torch.tensor([0, 1])
    x = torch.randn(2, 1, 2, 2)
    # t = 1: x_t is pure noise, the posterior mean is the class mean sum_k w_k mu_k
    class_mean = (mixture.log_weights.exp()[:, :, None] * mixture.means).sum(1)
    assert torch.allclose(mixture.posterior_mean(x, torch.ones(2), labels).flatten(1), class_mean, atol=1e-5)
    # t = 0: x_t is the data itself
    assert torch.allclose(mixture.posterior_mean(x, torch.zeros(2), labels), x, atol=1e-5)


def test_prompts_and_cfg(teacher):
    assert prompt_to_class("mixture class 1", 4) == 1 and prompt_to_class("", 4) == 4
    with pytest.raises(ValueError, match="class number"):
        prompt_to_class("class 7", 4)
    cond = teacher.encode_prompts([class_prompt(0), class_prompt(1)])
    x, t = torch.randn(teacher.latent_shape(2)), torch.full((2,), 0.7)
    x0_c, _ = teacher.predict("real", x, t, cond)
    x0_u, _ = teacher.predict("real", x, t, teacher.null_conditioning(2))
    x0_g, _ = teacher.predict("real", x, t, cond, cfg_scale=3.0)
    assert not torch.allclose(x0_c, x0_u, atol=1e-3)  # the empty prompt is a different (wider) mixture
    assert torch.allclose(x0_g, x0_u + 3.0 * (x0_c - x0_u), atol=1e-5)


def test_roles_start_equal_to_the_exact_teacher_and_the_student_starts_collapsed(teacher):
    cond = teacher.encode_prompts([class_prompt(0)] * 6)
    x, t = torch.randn(teacher.latent_shape(6)), torch.rand(6)
    exact = teacher.mixture.posterior_mean(x, t, cond.labels)
    for role in ("real", "fake", "student"):
        assert torch.allclose(teacher.predict(role, x, t, cond)[0], exact, atol=1e-5)
    one_step = teacher.predict("student", x, torch.ones(6), cond)[0]
    assert torch.allclose(one_step, one_step[:1].expand_as(one_step), atol=1e-5)  # same output for any noise
    # and the trainable parts move it: offsets re-weight modes, the residual moves off them
    assert teacher.trainable_parameters("student")
    maps = teacher.feature_maps("real", x, t, cond, [0])
    assert maps[0].shape == (6, TINY["channels"], 4, 4)


def test_posterior_features_expose_the_exact_responsibilities_and_change_no_prediction():
    """``posterior_features``: one more feature block, the exact log r_k(x_t) of the prompted class's
    modes, read by a vector head whose logit has an input gradient; predictions are unchanged."""
    from dmdx_lightning.discriminators.heads import HeadVector
    from dmdx_lightning.discriminators.latent import LatentDiscriminator

    torch.manual_seed(0)
    plain, viewed = MixtureTeacher(**TINY), MixtureTeacher(**TINY, posterior_features=True)
    cond = viewed.encode_prompts([class_prompt(1), class_prompt(3), ""])
    x, t = torch.randn(viewed.latent_shape(3)), torch.tensor([0.9, 0.5, 0.7])
    for role in ("real", "fake", "student"):
        assert torch.equal(plain.predict(role, x, t, cond)[0], viewed.predict(role, x, t, cond)[0])
    assert len(viewed.feature_blocks(viewed.network("real"))) == TINY["num_blocks"] + 1
    (log_r,) = viewed.feature_maps("real", x, t, cond, [TINY["num_blocks"]])
    M = TINY["modes_per_class"]
    assert log_r.shape == (3, TINY["num_classes"] * M)
    # the prompted class's modes hold the whole posterior, the others sit on the floor
    assert torch.allclose(log_r[0, M:2 * M].exp().sum(), torch.tensor(1.0), atol=1e-5)
    assert (log_r[0, :M] == -viewed.denoiser.LOG_R_FLOOR).all()
    assert (log_r[2] > -viewed.denoiser.LOG_R_FLOOR).any()  # the empty prompt: every class's modes
    d = LatentDiscriminator(layers=[TINY["num_blocks"]], head_channels=16).build(viewed)
    assert isinstance(d.heads[0], HeadVector)
    x = x.requires_grad_()
    d(viewed, x, t, cond).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="feature blocks"):
        plain.feature_maps("real", x, t, cond, [TINY["num_blocks"]])


def test_metrics_count_modes_precision_and_tv():
    mixture = GaussianMixture((4, 4, 4), num_classes=1, modes_per_class=4, std=0.05, weight_ratio=1.0, seed=0)
    labels = torch.zeros(400, dtype=torch.long)
    exact, _ = mixture.sample(labels, torch.Generator().manual_seed(0))
    m = mixture_metrics(exact, labels, mixture)
    assert m["modes_covered"] == 4 and m["precision"] == 1.0 and m["tv"] < 0.1
    one_mode = mixture.means[0, :1].expand(400, -1).reshape(400, 4, 4, 4)
    m = mixture_metrics(one_mode, labels, mixture)
    assert m["modes_covered"] == 1 and math.isclose(m["tv"], 0.75, abs_tol=1e-6)
    blur = mixture.means[0, :2].mean(0).expand(400, -1).reshape(400, 4, 4, 4)  # between two modes
    m = mixture_metrics(blur, labels, mixture)
    assert m["precision"] == 0.0 and m["modes_covered"] == 0 and math.isclose(m["tv"], 1.0, abs_tol=1e-6)


def test_teacher_ode_covers_every_mode(teacher):
    labels = [class_prompt(k) for k in range(4) for _ in range(300)]
    cond = teacher.encode_prompts(labels)
    x = teacher.sample_ode(torch.randn(teacher.latent_shape(len(labels))), cond, 16, 1.0)
    m = mixture_metrics(x, cond.labels, teacher.mixture)
    assert m["modes_covered"] == m["modes_total"] == 16 and m["precision"] > 0.97


TINY_ARGS = [f"--model.init_args.teacher.init_args.{k}={json.dumps(list(v)) if isinstance(v, tuple) else v}"
             for k, v in TINY.items()]


@pytest.mark.slow
@pytest.mark.parametrize("overlay", [None, "dmd.yaml", "dmd2.yaml"])
def test_dmdx_fit_runs_adm_dmd_dmd2_on_the_mixture(overlay, tmp_path):
    pairs = tmp_path / "pairs"
    if overlay == "dmd2.yaml":  # DMD2's real latents: the teacher's own ODE pairs
        r = _predict_pairs(pairs)
        assert r.returncode == 0, r.stderr[-3000:]
    configs = ["--config", "configs/mixture/adm.yaml"]
    if overlay:
        configs += ["--config", f"configs/mixture/{overlay}"]
    extra = ["--data.init_args.path", str(pairs)] if overlay == "dmd2.yaml" else []
    r = dmdx_fit(*configs, *TINY_ARGS, *extra, *_outputs(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    arm = {None: "adm_1step", "dmd.yaml": "dmd_1step", "dmd2.yaml": "dmd2_1step"}[overlay]
    assert {"teacher", arm, f"{arm}@init"} <= set(summary)
    assert summary["teacher"]["modes_covered"] == 16
    assert summary[f"{arm}@init"]["precision"] == 0.0  # the one-step student starts collapsed
    if overlay is None:  # ADM's diagnostics reach the summary row
        assert -1.0 <= summary[arm]["dmd_alignment"] <= 1.0 and "logit_gap" in summary[arm]


@pytest.mark.slow
def test_dmdx_fit_runs_adp_then_dmdx_on_the_mixture(tmp_path):
    pairs = tmp_path / "pairs"
    assert _predict_pairs(pairs).returncode == 0
    r = dmdx_fit("--config", "configs/mixture/adp.yaml", *TINY_ARGS, "--data.init_args.path", str(pairs),
                 *_outputs(tmp_path / "adp"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = dmdx_fit("--config", "configs/mixture/adm.yaml", "--config", "configs/mixture/dmdx.yaml", *TINY_ARGS,
                 "--model.init_args.init_from", str(tmp_path / "adp/checkpoints/last.ckpt"),
                 *_outputs(tmp_path / "dmdx"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dmdx_1step" in json.loads((tmp_path / "dmdx/summary.json").read_text())


def _outputs(directory):
    """An overlay: two iterations, every output (checkpoint, summary) under ``directory``."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    overlay = {"trainer": {"max_steps": 2, "default_root_dir": str(directory), "logger": False,
                           "enable_progress_bar": False, "callbacks": [
                               {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                "init_args": {"dirpath": str(directory / "checkpoints"), "save_last": True}},
                               {"class_path": "dmdx_lightning.callbacks.mixture.MixtureSummary",
                                "init_args": {"path": str(directory / "summary.json"), "samples_per_class": 200}}]}}
    path = directory / "outputs.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return ["--config", str(path)]


def _predict_pairs(directory):
    import subprocess
    import sys

    from tests.helpers import dmdx_env

    tiny = [a for a in TINY_ARGS if "sample_steps" not in a]
    return subprocess.run([sys.executable, "-m", "dmdx_lightning.cli", "predict", "--config",
                           "configs/mixture/ode_pairs.yaml", *tiny, "--model.init_args.num_steps", "8",
                           "--data.init_args.output_dir", str(directory), "--data.init_args.num_pairs", "64",
                           "--data.init_args.shard_size", "64", "--data.init_args.batch_size", "64"],
                          cwd=ROOT, env=dmdx_env(), capture_output=True, text=True, timeout=300)
