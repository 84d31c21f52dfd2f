"""`dmdx fit --help` is short; a method's, a teacher's and a config's options are one command away,
with their defaults and docstrings; short class names work wherever a class is named."""

from dataclasses import fields

import pytest
import yaml

from dmdx_lightning.cli import main as dmdx
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.methods.adm_variants import ADMVariants
from dmdx_lightning.options import options_of, resolve_class


def run(capsys, *args) -> str:
    dmdx(list(args))
    return capsys.readouterr().out


def test_fit_help_is_short_and_points_to_the_methods_options(capsys):
    page = run(capsys, "fit", "--help")
    assert len(page.splitlines()) < 60
    assert "--trainer.accelerator" not in page  # Lightning's ~150 Trainer flags are one more flag away
    for name in ("ADMModule", "ADPModule", "ODEPairGenerator", "PromptDataModule", "ODEPairDataModule"):
        assert name in page
    assert "dmdx fit --model ADMModule --help" in page and "dmdx fit --help trainer" in page


def test_trainer_help_is_lightnings_own(capsys):
    with pytest.raises(SystemExit) as exit:
        run(capsys, "fit", "--help", "trainer")
    assert exit.value.code == 0
    assert "--trainer.max_steps" in capsys.readouterr().out


def test_method_help_lists_every_option_with_its_default_and_the_variants_apart(capsys):
    page = run(capsys, "fit", "--model", "ADMModule", "--help")
    for option in options_of(ADMModule):  # ADMModule's own and DistillationModule's (through **kwargs)
        assert f"--model.init_args.{option.name}  (" in page
    assert "--model.init_args.student_steps  (int; default: 1)" in page
    assert "--model.init_args.loss  (one of adm | dmd | dmd2; default: 'adm')" in page
    lines = page.splitlines()
    first_variant = next(i for i, line in enumerate(lines) if "--model.init_args.variants." in line)
    assert all("--model.init_args.variants." not in line for line in lines[:first_variant])
    for field in fields(ADMVariants):  # each variant: its default and its measured outcome
        line = next(i for i, text in enumerate(lines) if f"--model.init_args.variants.{field.name}  (" in text)
        assert f"default: {field.default!r}" in lines[line] or f"default: {field.default}" in lines[line]
    assert page.count("Measured:") >= 7


def test_config_help_shows_model_teacher_and_data_options_with_the_configs_values(capsys):
    page = run(capsys, "fit", "--config", "configs/quickstart/adm.yaml", "--help")
    assert "teacher is DigitsTeacher in this config" in page
    assert "--model.init_args.teacher.init_args.cfg_scale  (float; default: 2.0; config: 2.0)" in page
    assert "--model.init_args.discriminator.init_args.layers  (Sequence[int]; default: (-1,); config: [1, 3])" in page
    assert "data: dmdx_lightning.data.prompts.PromptDataModule" in page
    assert "--data.init_args.train_file" in page and "config: '${dmdx.configs:prompts/digits.txt}'" in page


def test_command_line_class_choices_extend_the_help(capsys):
    page = run(capsys, "fit", "--model", "ADMModule", "--model.init_args.teacher", "MixtureTeacher", "--help")
    assert "teacher is MixtureTeacher in this config" in page


def test_unknown_class_gets_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as exit:
        dmdx(["fit", "--model", "ADMModel", "--help"])
    assert exit.value.code == 2
    assert "did you mean ADMModule" in capsys.readouterr().err
    with pytest.raises(ValueError, match="full dotted path"):
        resolve_class("NoSuchThing")


def test_short_class_names_work_in_a_real_parse(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        dmdx(["fit", "--model", "ADMModule", "--model.init_args.teacher", "DigitsTeacher",
              "--data", "PromptDataModule", "--data.init_args.train_file", "configs/prompts/digits.txt",
              "--trainer.default_root_dir", str(tmp_path), "--print_config"])
    assert exit.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "dmdx_lightning.methods.adm.ADMModule"
    assert config["model"]["init_args"]["teacher"]["class_path"] == "dmdx_lightning.teachers.digits.DigitsTeacher"
    assert config["model"]["init_args"]["variants"] == {f.name: f.default for f in fields(ADMVariants)}
