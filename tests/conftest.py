import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
