"""Prompt files, the hash split, the dataset and the DataModule (all on tmp files, CPU)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from dmdx_lightning.data.prompts import (
    PromptDataModule,
    PromptDataset,
    collate_prompts,
    dedupe,
    read_prompts,
    split_prompts,
)

REPO = Path(__file__).resolve().parents[1]
DIGITS_PROMPTS = REPO / "configs" / "prompts" / "digits.txt"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# read_prompts: formats
# ----------------------------------------------------------------------------------------------


def test_read_txt_skips_blank_and_comment_lines(tmp_path):
    path = _write(tmp_path / "p.txt", "# header\n a cat \n\n   \n#a comment\na dog\r\na cat\n")
    # Stripped, in file order, duplicates kept (dedupe is a separate step).
    assert read_prompts(path) == ["a cat", "a dog", "a cat"]


def test_read_txt_accepts_utf8_bom_and_non_ascii(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9\nna\xc3\xafve\n")
    assert read_prompts(path) == ["café", "naïve"]


def test_read_jsonl_default_and_custom_field(tmp_path):
    rows = [{"prompt": "a cat", "caption": "x"}, {"prompt": "a dog", "caption": "y"}]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_prompts(path) == ["a cat", "a dog"]
    assert read_prompts(path, field="caption") == ["x", "y"]


def test_read_jsonl_keeps_line_separators_inside_strings(tmp_path):
    # U+2028 is legal inside a JSON string; it must not split the record.
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a\u2028b"}\n{"prompt": "c"}\n')
    assert read_prompts(path) == ["a\u2028b", "c"]


def test_read_csv_column(tmp_path):
    path = _write(
        tmp_path / "p.csv",
        'id,prompt\n1,a cat\n2,"a dog, sitting"\n3,"two\nlines"\n',
    )
    assert read_prompts(path) == ["a cat", "a dog, sitting", "two\nlines"]
    assert read_prompts(path, field="id") == ["1", "2", "3"]


def test_read_digits_prompt_file_maps_every_digit_twice():
    from dmdx_lightning.teachers.digits import prompt_to_label

    prompts = read_prompts(DIGITS_PROMPTS)
    assert len(prompts) == 20
    assert "a handwritten digit seven" in prompts and "the digit 7" in prompts
    labels = sorted(prompt_to_label(p) for p in prompts)
    assert labels == sorted(list(range(10)) * 2)


# ----------------------------------------------------------------------------------------------
# read_prompts: errors name the file
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt") as err:
        read_prompts(path)
    assert ".txt/.jsonl/.csv" in str(err.value)


def test_directory_is_not_a_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        read_prompts(tmp_path)


def test_unknown_extension_lists_supported(tmp_path):
    path = _write(tmp_path / "p.json", '["a cat"]')
    with pytest.raises(ValueError, match=r"p\.json.*'\.json'.*\.txt, \.jsonl, \.csv"):
        read_prompts(path)


@pytest.mark.parametrize("name,text", [
    ("empty.txt", ""),
    ("comments.txt", "# only a header\n\n  \n"),
    ("empty.jsonl", "\n\n"),
    ("empty.csv", ""),
    ("header_only.csv", "prompt\n"),
])
def test_file_without_prompts(tmp_path, name, text):
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError, match=re.escape(f"{name} contains no prompts")):
        read_prompts(path)


def test_non_utf8_names_file_offset_and_line(tmp_path):
    path = tmp_path / "latin.txt"
    # "ok\n" is bytes 0-2, so the bad byte 0xff sits at offset 3 on line 2.
    path.write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(ValueError, match=r"latin\.txt.*0xff at byte offset 3 \(line 2\)"):
        read_prompts(path)


def test_non_utf8_offset_counts_the_bom(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xff")  # 3 BOM bytes + "ab" -> 0xff at offset 5
    with pytest.raises(ValueError, match=r"bom\.txt.*byte offset 5 \(line 1\)"):
        read_prompts(path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        read_prompts(path)


def test_json_line_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "list.jsonl", '{"prompt": "a"}\n["b"]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl, line 2: expected a JSON object"):
        read_prompts(path)


def test_missing_jsonl_key_names_file_line_and_key(tmp_path):
    path = _write(tmp_path / "keys.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"keys\.jsonl, line 2: missing key 'prompt'.*\['text'\]"):
        read_prompts(path)


def test_non_string_jsonl_value(tmp_path):
    path = _write(tmp_path / "num.jsonl", '{"prompt": 7}\n')
    with pytest.raises(ValueError, match=r"num\.jsonl, line 1: 'prompt' must be a string, got int"):
        read_prompts(path)


def test_missing_csv_column_names_file_and_column(tmp_path):
    path = _write(tmp_path / "cols.csv", "id,text\n1,a\n")
    with pytest.raises(ValueError, match=r"cols\.csv, line 1: missing column 'prompt'.*'text'"):
        read_prompts(path)


def test_short_csv_row_names_file_and_line(tmp_path):
    path = _write(tmp_path / "short.csv", "id,prompt\n1,a\n2\n")
    with pytest.raises(ValueError, match=r"short\.csv, line 3: row is too short"):
        read_prompts(path)


@pytest.mark.parametrize("name,text,line", [
    ("blank.jsonl", '{"prompt": "a"}\n\n{"prompt": "  "}\n', 3),
    ("blank.csv", 'id,prompt\n1,a\n2,\n', 3),
])
def test_empty_row_names_file_and_line(tmp_path, name, text, line):
    # a blank value in a table is a broken row, not layout: it is no longer skipped silently
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}, line {line}: empty prompt in 'prompt'"):
        read_prompts(path)


# ----------------------------------------------------------------------------------------------
# read_prompts: Parquet, save_to_disk folders, Hub dataset ids
# ----------------------------------------------------------------------------------------------


def _parquet(path: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_read_parquet_column_in_row_order(tmp_path):
    import pyarrow as pa

    path = _parquet(tmp_path / "p.parquet", prompt=[" a cat ", "a dog", "a cat"], id=[3, 1, 2],
                    caption=pa.array([b"caf\xc3\xa9", b"x", b"y"], pa.binary()))
    assert read_prompts(path) == ["a cat", "a dog", "a cat"]
    # a binary column (some writers store text so) is read as UTF-8
    assert read_prompts(path, field="caption") == ["café", "x", "y"]


def _bad_rows():
    import pyarrow as pa

    not_utf8 = pa.array([b"ok", b"ok", b"\xffbad"], pa.binary())
    return [
        ("empty", pa.array(["a", "b", "  "]), r"row 2: empty prompt in 'prompt'"),
        ("null", pa.array(["a", "b", None]), r"row 2: 'prompt' must be a string, got NoneType"),
        ("int", pa.array([1, 2, 3]), r"row 0: 'prompt' must be a string, got int 1"),
        ("binary", not_utf8, r"row 2: 'prompt' is not UTF-8 text \(byte 0xff at offset 0\)"),
        # a string column whose bytes are not UTF-8: Arrow does not check them when reading
        ("string", not_utf8.view(pa.string()), r"row 2: 'prompt' is not UTF-8 text"),
    ]


@pytest.mark.parametrize("case", range(5), ids=["empty", "null", "int", "binary", "string"])
def test_bad_parquet_row_names_file_and_row(tmp_path, case):
    name, column, message = _bad_rows()[case]
    path = _parquet(tmp_path / f"{name}.parquet", prompt=column)
    with pytest.raises(ValueError, match=rf"prompt file .*{name}\.parquet, {message}"):
        read_prompts(path)


def test_parquet_missing_column_and_broken_file(tmp_path):
    path = _parquet(tmp_path / "cols.parquet", text=["a"])
    with pytest.raises(ValueError, match=r"cols\.parquet: missing column 'prompt'.*\['text'\].*`field`"):
        read_prompts(path)
    broken = _write(tmp_path / "broken.parquet", "not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet is not a readable Parquet file"):
        read_prompts(broken)


def test_read_save_to_disk_dataset_and_dataset_dict_split(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b", "a"], "n": [0, 1, 2]}).save_to_disk(tmp_path / "ds")
    assert read_prompts(tmp_path / "ds", field="text") == ["a", "b", "a"]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["t1", "t2"]}),
        "validation": datasets.Dataset.from_dict({"prompt": ["v1"]}),
    }).save_to_disk(tmp_path / "dd")
    assert read_prompts(tmp_path / "dd") == ["t1", "t2"]
    assert read_prompts(tmp_path / "dd", split="validation") == ["v1"]
    with pytest.raises(ValueError, match=r"dd has no split 'test' \(splits: \['train', 'validation'\]\).*`split`"):
        read_prompts(tmp_path / "dd", split="test")
    with pytest.raises(ValueError, match=r"ds: missing column 'prompt' \(columns present: \['text', 'n'\]\)"):
        read_prompts(tmp_path / "ds")


def test_bad_dataset_row_names_folder_split_and_row(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a", "", "c"]})}).save_to_disk(
        tmp_path / "dd")
    with pytest.raises(ValueError, match=r"dataset folder .*dd, split 'train', row 1: empty prompt"):
        read_prompts(tmp_path / "dd")


def test_folder_that_save_to_disk_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"is a directory but not a `datasets` save_to_disk folder"):
        read_prompts(tmp_path, key="data.init_args.train_file")


def test_hub_id_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"prompt": ["h1", "h2"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read_prompts("someone/prompts", split="validation") == ["h1", "h2"]
    assert calls == [("someone/prompts", "validation")]
    # a path-like name that does not exist is a missing file, never a Hub lookup
    for missing in ("./prompts", "configs/prompts/none", "nope.txt"):
        with pytest.raises(FileNotFoundError, match="not found"):
            read_prompts(missing)
    assert len(calls) == 1


def test_missing_hub_id_offline_names_the_key_and_the_fix(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # never the network, whatever the environment: offline, with an empty cache
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    dm = PromptDataModule("nobody/no-such-prompts", batch_size=1)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    for words in ("'nobody/no-such-prompts' (data.init_args.train_file)", "offline",
                  "point data.init_args.train_file at", "save_to_disk(folder)"):
        assert words in message, words


# ----------------------------------------------------------------------------------------------
# dedupe and split
# ----------------------------------------------------------------------------------------------


def test_dedupe_strips_and_keeps_first_position():
    assert dedupe(["b", " a", "b ", "c", "a", "  c  "]) == ["b", "a", "c"]
    assert dedupe([]) == []


PROMPTS = [f"prompt number {i}" for i in range(200)]


def test_split_is_disjoint_complete_and_order_preserving():
    train, val = split_prompts(PROMPTS, 0.25, seed=0)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(PROMPTS)
    assert train == [p for p in PROMPTS if p in set(train)]
    assert val == [p for p in PROMPTS if p in set(val)]
    # 200 prompts at 25%: val is about 50 (binomial std ~6).
    assert 25 <= len(val) <= 75


def test_split_does_not_depend_on_file_order_or_other_prompts():
    train, val = split_prompts(PROMPTS, 0.3, seed=1)
    shuffled = PROMPTS[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_prompts(shuffled, 0.3, seed=1)
    assert set(train2) == set(train) and set(val2) == set(val)
    # A process that reads only half the file puts each prompt on the same side.
    _, val_half = split_prompts(PROMPTS[:100], 0.3, seed=1)
    assert set(val_half) == set(val) & set(PROMPTS[:100])


def test_split_depends_on_seed_and_fraction():
    _, val0 = split_prompts(PROMPTS, 0.3, seed=0)
    _, val1 = split_prompts(PROMPTS, 0.3, seed=1)
    assert set(val0) != set(val1)
    assert split_prompts(PROMPTS, 0.0, seed=0) == (PROMPTS, [])
    # Growing the fraction only moves prompts from train into val.
    _, val_big = split_prompts(PROMPTS, 0.6, seed=0)
    assert set(val0) < set(val_big)


def test_split_puts_duplicates_on_one_side():
    train, val = split_prompts(PROMPTS + PROMPTS, 0.5, seed=3)
    assert set(train).isdisjoint(val)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_prompts(PROMPTS, fraction)


# ----------------------------------------------------------------------------------------------
# Dataset and collate
# ----------------------------------------------------------------------------------------------


def test_dataset_items_and_repeat():
    ds = PromptDataset(["a", "b", "c"], repeat=2)
    assert len(ds) == 6
    assert [ds[i] for i in range(6)] == [
        {"prompt": "a", "index": 0}, {"prompt": "b", "index": 1}, {"prompt": "c", "index": 2},
        {"prompt": "a", "index": 0}, {"prompt": "b", "index": 1}, {"prompt": "c", "index": 2},
    ]
    assert ds[-1] == {"prompt": "c", "index": 2}
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        PromptDataset(["a"], repeat=0)


def test_collate():
    batch = collate_prompts([{"prompt": "a", "index": 4}, {"prompt": "b", "index": 1}])
    assert batch["prompt"] == ["a", "b"]
    assert batch["index"].dtype == torch.long
    assert batch["index"].tolist() == [4, 1]


@pytest.mark.parametrize("size,repeat", [(10, 1), (7, 2), (9, 1)])
def test_distributed_sampler_two_ranks_cover_the_epoch(size, repeat):
    # our ResumableDistributedSampler is a DistributedSampler (same split rule); simulate 2 ranks.
    ds = PromptDataset([f"p{i}" for i in range(size)], repeat=repeat)
    shares = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert len(shares[0]) == len(shares[1])  # ranks stay in step
    seen = shares[0] + shares[1]
    if len(ds) % 2 == 0:
        # No duplicates, no gaps.
        assert sorted(seen) == list(range(len(ds)))
    else:
        # Odd sizes: the sampler pads with exactly one repeated item, still no gaps.
        assert set(seen) == set(range(len(ds))) and len(seen) == len(ds) + 1
    # Index names the prompt, whichever rank and repeat served it.
    for i in seen:
        item = ds[i]
        assert item["prompt"] == f"p{item['index']}"


# ----------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------


def _digits_like(tmp_path: Path, n: int = 5) -> Path:
    return _write(tmp_path / "train.txt", "".join(f"prompt {i}\nprompt {i}\n" for i in range(n)))


def test_datamodule_train_batches_dedupe_and_drop_last(tmp_path):
    dm = PromptDataModule(str(_digits_like(tmp_path)), batch_size=2, shuffle=False)
    dm.setup("fit")
    assert dm.train_prompts == [f"prompt {i}" for i in range(5)]
    batches = list(dm.train_dataloader())
    # 5 prompts, batch 2, drop_last -> 2 full batches.
    assert [b["prompt"] for b in batches] == [["prompt 0", "prompt 1"], ["prompt 2", "prompt 3"]]
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3]]
    assert dm.val_dataloader() == []


def test_datamodule_repeat_and_shuffle(tmp_path):
    dm = PromptDataModule(str(_digits_like(tmp_path)), batch_size=2, repeat=2, shuffle=True)
    dm.setup("fit")
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5  # 10 items / 2
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(indices) == sorted(list(range(5)) * 2)
    assert indices != [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    for b in batches:
        assert b["prompt"] == [f"prompt {i}" for i in b["index"].tolist()]


def test_datamodule_too_few_prompts_suggests_repeat(tmp_path):
    dm = PromptDataModule(str(_digits_like(tmp_path, n=3)), batch_size=8)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"train set has 3 prompts.*batch_size=8.*repeat >= 3"):
        dm.train_dataloader()


def test_datamodule_val_fraction_split(tmp_path):
    path = _write(tmp_path / "many.txt", "\n".join(PROMPTS))
    dm = PromptDataModule(str(path), val_fraction=0.25, batch_size=4, seed=0)
    dm.setup("fit")
    assert (dm.train_prompts, dm.val_prompts) == split_prompts(PROMPTS, 0.25, seed=0)
    val_batches = list(dm.val_dataloader())
    # Validation keeps every prompt, in order, with its own index.
    assert [p for b in val_batches for p in b["prompt"]] == dm.val_prompts
    assert torch.cat([b["index"] for b in val_batches]).tolist() == list(range(len(dm.val_prompts)))


def test_datamodule_val_file(tmp_path):
    val = _write(tmp_path / "val.jsonl", '{"caption": "v1"}\n{"caption": "v2"}\n')
    train = _write(tmp_path / "train.jsonl", '{"caption": "t1"}\n{"caption": "t2"}\n')
    dm = PromptDataModule(str(train), val_file=str(val), field="caption", batch_size=2)
    dm.setup("fit")
    assert dm.train_prompts == ["t1", "t2"]
    assert next(iter(dm.val_dataloader()))["prompt"] == ["v1", "v2"]


def test_datamodule_reads_dataset_splits_and_resumes_like_a_text_file(tmp_path):
    import datasets

    from dmdx_lightning.data.resumable import ResumableDataLoader

    train = [f"prompt {i}" for i in range(6)]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": train + ["prompt 0"]}),
        "validation": datasets.Dataset.from_dict({"prompt": ["v1", "v2"]}),
    }).save_to_disk(tmp_path / "dd")
    from_dataset = PromptDataModule(str(tmp_path / "dd"), val_file=str(tmp_path / "dd"),
                                    val_split="validation", batch_size=2)
    from_text = PromptDataModule(str(_write(tmp_path / "t.txt", "\n".join(train))), batch_size=2)
    for dm in (from_dataset, from_text):
        dm.setup("fit")
    assert from_dataset.train_prompts == train and from_dataset.val_prompts == ["v1", "v2"]
    # the same prompts give the same resumable loader: same order, same saved position
    loader = from_dataset.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    it = iter(loader)
    first = next(it)["prompt"]
    loader.consumed()  # what the DataModule's on_after_batch_transfer does in training
    state = loader.state_dict()
    rest = [b["prompt"] for b in it]
    text_batches = [b["prompt"] for b in from_text.train_dataloader()]
    assert [first, *rest] == text_batches
    resumed = from_dataset.train_dataloader()
    resumed.load_state_dict(state)
    assert [b["prompt"] for b in resumed] == rest


def test_datamodule_argument_checks(tmp_path):
    path = str(_digits_like(tmp_path))
    with pytest.raises(ValueError, match="either val_file"):
        PromptDataModule(path, val_file=path, val_fraction=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        PromptDataModule(path, batch_size=0)
    with pytest.raises(ValueError, match="repeat"):
        PromptDataModule(path, repeat=0)
    with pytest.raises(RuntimeError, match="setup"):
        PromptDataModule(path).train_dataloader()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PromptDataModule(str(tmp_path / "missing.txt")).setup("fit")


def test_datamodule_help_documents_every_argument():
    # LightningCLI builds --help from the Google-style "Args:" section via jsonargparse.
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PromptDataModule, "data")
    help_text = " ".join(parser.format_help().split())  # undo argparse's line wrapping
    for arg, words in {
        "train_file": "for training", "val_file": "separate prompt source",
        "val_fraction": "held out",
        "field": "holding the prompt", "split": "saved ``DatasetDict``", "val_split": "same dataset",
        "batch_size": "prompts per batch", "repeat": "per epoch",
        "num_workers": "worker processes", "seed": "hash split", "shuffle": "every epoch",
    }.items():
        assert f"--data.{arg}" in help_text
        assert words in help_text, arg
