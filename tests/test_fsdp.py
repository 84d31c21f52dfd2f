"""configs/trainer/fsdp.yaml on CPU: full-mode SD3 ADM trains, checkpoints and restarts under FSDP.

On CPU the strategy is :class:`tests.helpers.CPUFSDPStrategy`, which lifts only what stops
Lightning's FSDP there, so the wrapping (auto-wrap policy, ``use_orig_params``, full state dict)
is the config's own. World size 1 runs FSDP as NO_SHARD (in-process here); FULL_SHARD across two
processes is in tests/test_multiprocess.py.
"""

from pathlib import Path

import pytest
import torch

from dmdx_lightning.training_cli import DMDXCLI
from dmdx_lightning.methods.distributed import clean_name
from tests.helpers import CPUFSDPStrategy

ROOT = Path(__file__).resolve().parent.parent
_TEACHER = "--model.init_args.teacher.init_args."
FROZEN_PREFIXES = ("teacher.denoiser.", "teacher.text_encoder", "teacher.vae.")


def fsdp_cli(tiny_sd3_dir, tmp_path, max_steps, *extra):
    args = ["--config", str(ROOT / "configs" / "sd3/adm_sd35_large_4step.yaml"),
            "--config", str(ROOT / "configs" / "trainer" / "fsdp.yaml"),
            "--trainer.strategy.class_path", "tests.helpers.CPUFSDPStrategy",
            _TEACHER + "pretrained_model_name_or_path", str(tiny_sd3_dir), _TEACHER + "resolution", "16",
            _TEACHER + "max_sequence_length", "16", _TEACHER + "torch_dtype", "float32",
            "--model.init_args.discriminator.init_args.layers", "[0, 1]",
            "--data.init_args.train_file", str(ROOT / "configs" / "prompts" / "sd3_example.txt"),
            "--data.init_args.batch_size", "1",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.max_steps", str(max_steps), "--trainer.callbacks", "[]", "--trainer.logger", "false",
            "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path), *extra]
    return DMDXCLI(args=args, run=False)


@pytest.mark.slow
def test_fsdp_full_mode_sd3_adm_saves_trainable_state_and_restarts(tiny_sd3_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        # 2 iterations of generator, fake score and discriminator: backward runs through the frozen
        # real score, whose FSDP units used to stay unsharded (the full state dict then asserted
        # "FSDP assumes ...transformer_blocks.0... is in the state_dict")
        cli = fsdp_cli(tiny_sd3_dir, tmp_path, 2)
        assert type(cli.trainer.strategy) is CPUFSDPStrategy and cli.trainer.strategy._state_dict_type == "full"
        before = {n: p.detach().clone() for n, p in cli.model.teacher.named_trainable_parameters("student")}
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        ckpt_path = tmp_path / "fsdp.ckpt"
        cli.trainer.save_checkpoint(ckpt_path)

        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
        assert all("_fsdp_wrapped_module" not in k for k in state)
        for role in ("student", "fake"):
            assert {f"teacher.{n}" for n in before}.issubset(
                {k.replace(f".roles.{role}.", ".roles.student.") for k in state if f".roles.{role}." in k})
        assert any(k.startswith("discriminator.heads.") for k in state)
        buffers = {clean_name(n) for n, _ in cli.model.named_buffers()}
        frozen = [k for k in state if k.startswith(FROZEN_PREFIXES) and k not in buffers]
        assert not frozen, frozen[:5]
        changed = [n for n, p in before.items() if not torch.equal(p, state[f"teacher.{n}"])]
        assert changed, "the student did not train under FSDP"

        # restart: a resumed FSDP run continues from the checkpoint's iteration ...
        resumed = fsdp_cli(tiny_sd3_dir, tmp_path / "resume", 3)
        resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(ckpt_path))
        assert int(resumed.model.iteration) == 3
        # ... and a later stage starts its student from it (init_from, read before wrapping)
        staged = fsdp_cli(tiny_sd3_dir, tmp_path / "stage", 1, "--model.init_args.init_from", str(ckpt_path))
        staged.model.setup("fit")
        for n, p in staged.model.teacher.named_trainable_parameters("student"):
            torch.testing.assert_close(p.detach(), state[f"teacher.{n}"])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_with_generator_ema_is_refused_by_name(tiny_sd3_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        cli = fsdp_cli(tiny_sd3_dir, tmp_path, 1, "--model.init_args.ema_decay", "0.99")
        with pytest.raises(ValueError, match="ema_decay.*FSDP"):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
