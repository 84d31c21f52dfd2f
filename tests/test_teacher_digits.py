"""Teacher base machinery on the built-in digits teacher: roles, CFG, feature maps, samplers."""

import pytest
import torch

from dmdx_lightning.teachers.base import Conditioning
from dmdx_lightning.teachers.digits import (DIGIT_PROMPTS, NULL_CLASS, DigitsTeacher, load_classifier,
                                            load_digits_data, prompt_to_label)


def test_prompt_vocabulary():
    assert prompt_to_label("a handwritten digit seven") == 7
    assert prompt_to_label("the digit 3") == 3
    assert prompt_to_label("") == NULL_CLASS
    with pytest.raises(ValueError, match="exactly one digit"):
        prompt_to_label("a cat")
    with pytest.raises(ValueError, match="exactly one digit"):
        prompt_to_label("seven or 8")


def test_conditioning_batches():
    c = Conditioning(labels=torch.arange(3), pooled=torch.zeros(3, 2))
    both = Conditioning.cat([c, c[:1]])
    assert len(both) == 4 and both.labels.tolist() == [0, 1, 2, 0]
    assert c.repeat(2).labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="batch size"):
        Conditioning(labels=torch.arange(3), pooled=torch.zeros(2, 2))


def test_cfg_is_linear_combination_in_x0_eps_space(digits_teacher):
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    cond = digits_teacher.encode_prompts(["the digit 1", "the digit 2"])
    c = digits_teacher.predict("real", x_t, t, cond)
    u = digits_teacher.predict("real", x_t, t, digits_teacher.encode_prompts(["", ""]))
    g = digits_teacher.predict("real", x_t, t, cond, cfg_scale=3.0)
    for i in range(2):
        torch.testing.assert_close(g[i], u[i] + 3.0 * (c[i] - u[i]), atol=1e-5, rtol=1e-5)
    # the pair is consistent: it reproduces x_t at time t
    torch.testing.assert_close(digits_teacher.schedule.add_noise(*g, t), x_t, atol=1e-5, rtol=1e-5)


def test_roles_start_equal_and_are_separate_in_full_mode(digits_teacher):
    x_t, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    cond = digits_teacher.encode_prompts(["the digit 4"] * 2)
    outs = [digits_teacher.forward_role(r, x_t, t, cond) for r in ("real", "fake", "student")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert digits_teacher.network("student") is not digits_teacher.network("real")
    assert all(p.requires_grad for p in digits_teacher.trainable_parameters("student"))
    assert not any(p.requires_grad for p in digits_teacher.network("real").parameters())


def test_lora_mode_shares_one_base_and_switches_roles():
    teacher = DigitsTeacher(mode="lora", lora_rank=4)
    base = teacher.network("real")
    assert teacher.network("student") is base and teacher.network("fake") is base
    student = teacher.trainable_parameters("student")
    fake = teacher.trainable_parameters("fake")
    assert student and fake and not {id(p) for p in student} & {id(p) for p in fake}
    # perturb the student adapter only: the real and fake roles must not see it
    with torch.no_grad():
        for n, p in teacher.named_trainable_parameters("student"):
            if "lora_B" in n:
                p.add_(0.1)
    x_t, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    cond = teacher.encode_prompts(["the digit 4"] * 2)
    real = teacher.forward_role("real", x_t, t, cond)
    assert torch.equal(real, teacher.forward_role("fake", x_t, t, cond))
    assert not torch.allclose(real, teacher.forward_role("student", x_t, t, cond))
    # switching roles must not change which parameters train
    assert all(p.requires_grad for p in student + fake)
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)


def test_feature_maps_stop_forward_early_and_carry_gradient(digits_teacher):
    net = digits_teacher.network("real")
    ran = []
    hook = net.conv_out.register_forward_hook(lambda *a: ran.append("out"))
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    cond = digits_teacher.encode_prompts(["the digit 5"] * 2)
    maps = digits_teacher.feature_maps("real", x, torch.full((2,), 0.5), cond, [0, 2])
    hook.remove()
    assert [m.shape for m in maps] == [(2, 64, 8, 8)] * 2
    assert ran == []  # the blocks after the deepest requested one never ran
    maps[1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="layers"):
        digits_teacher.feature_maps("real", x, torch.full((2,), 0.5), cond, [7])


def test_shape_check_names_the_family(digits_teacher):
    digits_teacher.model_output = lambda net, x_t, t, cond: x_t[:, :, :4]
    with pytest.raises(RuntimeError, match="DigitsTeacher.model_output"):
        digits_teacher.predict("real", torch.randn(1, 1, 8, 8), torch.full((1,), 0.5),
                               digits_teacher.encode_prompts(["the digit 1"]))


@pytest.mark.slow
def test_teacher_and_classifier_quality(digits_teacher):
    """The shipped weights: classifier >= 95% held out; teacher samples classify as prompted."""
    clf = load_classifier()
    x, y = load_digits_data("test")
    assert (clf(x).argmax(-1) == y).float().mean() >= 0.95
    torch.manual_seed(0)
    cond = digits_teacher.encode_prompts([p for p in DIGIT_PROMPTS for _ in range(10)])
    samples = digits_teacher.sample_ode(torch.randn(100, 1, 8, 8), cond, 8, 2.0)
    assert (clf(samples).argmax(-1) == cond.labels).float().mean() >= 0.9


def test_missing_weights_error_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/digits/teacher.yaml"):
        DigitsTeacher(weights=str(tmp_path / "nope.safetensors"))
