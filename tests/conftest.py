import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def restore_environment():
    """Undo what a test's in-process Trainer writes to os.environ.

    A distributed strategy run in-process (test_fsdp.py) sets LOCAL_RANK / NODE_RANK / MASTER_PORT;
    a later test's subprocess inherits them, and Lightning then takes a fresh 2-process DDP run for
    an already-launched rank 0 and waits forever for a rank 1 it never starts.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def digits_teacher():
    from dmdx_lightning.teachers.digits import DigitsTeacher

    torch.manual_seed(0)
    return DigitsTeacher()


def prompt_loader(prompts, batch_size=4, shuffle=False):
    """A minimal prompt DataLoader (the PromptDataModule has its own tests)."""
    items = [{"prompt": p, "index": i} for i, p in enumerate(prompts)]
    return torch.utils.data.DataLoader(
        items, batch_size=batch_size, shuffle=shuffle, drop_last=True,
        collate_fn=lambda b: {"prompt": [x["prompt"] for x in b], "index": torch.tensor([x["index"] for x in b])})


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A random SD3 pipeline folder (2 layers, 2 heads x 8, CLIP x2, T5), built once per session."""
    from dmdx_lightning.teachers.sd3_random import save_random_sd3

    return save_random_sd3(tmp_path_factory.mktemp("sd3") / "tiny")


#: SD3Teacher options that make the tiny folder fast (16 px images = 8x8 latents, 16 T5 tokens)
TINY_SD3 = {"resolution": 16, "max_sequence_length": 16, "lora_rank": 4}


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A random SDXL pipeline folder (UNet with text_time conditioning, 2 CLIPs, VAE), built once per
    session; its UNet's sample_size makes the teacher's default resolution 16 px (8x8 latents)."""
    from dmdx_lightning.teachers.sdxl_random import save_random_sdxl

    return save_random_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny")


#: SDXLTeacher options for the tiny folder (its resolution is the default, from the UNet)
TINY_SDXL = {"lora_rank": 4}


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A random SD 1.5-style pipeline folder (UNet without added embeddings, one CLIP, VAE, PNDM
    scheduler, epsilon), built once per session; 16 px images (8x8 latents) by default."""
    from dmdx_lightning.teachers.sd_random import save_random_sd

    return save_random_sd(tmp_path_factory.mktemp("sd15") / "tiny")


@pytest.fixture(scope="session")
def tiny_sd2v_dir(tmp_path_factory):
    """As tiny_sd15_dir with SD 2.1's v-prediction DDIM scheduler and linear attention projections."""
    from dmdx_lightning.teachers.sd_random import save_random_sd

    return save_random_sd(tmp_path_factory.mktemp("sd2v") / "tiny", prediction_type="v_prediction")


#: StableDiffusionTeacher options for the tiny folders (their resolution is the default, from the UNet)
TINY_SD = {"lora_rank": 4}


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A random FLUX.1-dev-like pipeline folder (1 double + 2 single blocks, guidance embedding,
    dynamic shifting, CLIP-L + T5, 16-channel VAE), built once per session."""
    from dmdx_lightning.teachers.flux_random import save_random_flux

    return save_random_flux(tmp_path_factory.mktemp("flux") / "tiny")


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory):
    """As tiny_flux_dir, FLUX.1-schnell-like: no guidance embedding, no shift."""
    from dmdx_lightning.teachers.flux_random import save_random_flux

    return save_random_flux(tmp_path_factory.mktemp("flux_schnell") / "tiny", guidance_embeds=False)


#: FluxTeacher options that make the tiny folders fast (16 px images = 8x8 latents = 16 tokens, 16 T5 tokens)
TINY_FLUX = {"resolution": 16, "max_sequence_length": 16, "lora_rank": 4}


@pytest.fixture(scope="session")
def tiny_sam_path(tmp_path_factory):
    """A random tiny SAM vision encoder saved with save_pretrained (pixel discriminator backbone)."""
    from transformers import SamVisionConfig, SamVisionModel

    torch.manual_seed(0)
    config = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=3, num_attention_heads=2,
                             image_size=32, patch_size=8, mlp_dim=64, window_size=2, global_attn_indexes=[2],
                             num_pos_feats=8)
    path = tmp_path_factory.mktemp("sam")
    SamVisionModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_cogvideox_dir(tmp_path_factory):
    """A random CogVideoX pipeline folder (2 layers, 2 heads x 16, rotary 3D embeddings, 3-stage 3D VAE,
    T5), built once per session: 9 frames of 32x32 px = 3 latent frames of 8x8."""
    from dmdx_lightning.teachers.cogvideox_random import save_random_cogvideox

    return save_random_cogvideox(tmp_path_factory.mktemp("cogvideox") / "tiny")


#: CogVideoXTeacher options that make the tiny folder fast
TINY_COGVIDEOX = {"lora_rank": 4}


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A random Wan 2.1 pipeline folder (2 blocks, 2 heads x 8, 3-stage causal 3D VAE with 4 latent
    channels, UMT5, UniPC flow scheduler with flow_shift 3), built once per session."""
    from dmdx_lightning.teachers.wan_random import save_random_wan

    return save_random_wan(tmp_path_factory.mktemp("wan") / "tiny")


@pytest.fixture(scope="session")
def tiny_wan_a14b_dir(tmp_path_factory):
    """A random two-expert Wan 2.2 A14B pipeline folder (the tiny Wan's size, each expert its own
    weights), its boundary at timestep 600 so that the conformance inputs (t in [0.3, 0.8]) reach both
    experts."""
    from dmdx_lightning.teachers.wan_random import save_random_wan

    return save_random_wan(tmp_path_factory.mktemp("wan_a14b") / "tiny", two_experts=True, boundary_ratio=0.6)


#: WanTeacher options that make the tiny folder fast: 9 frames of 32x32 px = 3 latent frames of 4x4, 16 UMT5 tokens
TINY_WAN = {"num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16, "lora_rank": 4}
