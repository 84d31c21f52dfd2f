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
