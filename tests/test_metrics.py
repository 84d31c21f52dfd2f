"""Validation metrics: pure functions against hand-computed values, and each callback run through
``Trainer.validate`` with real (tiny, offline) scoring networks: a CLIP model built from a tiny
``CLIPConfig`` with a tokenizer made in memory, and lpips with random or pre-placed backbone weights."""

import math

import lightning.pytorch as pl
import pytest
import torch

from dmdx_lightning.callbacks.metrics import (CLIPEmbedder, CLIPScoreCallback, LPIPSDiversityCallback, feature_lpips,
                                              knn_precision_recall, load_clip, load_lpips, mean_pairwise_distance,
                                              sample_images)
from dmdx_lightning.evaluation.digits import DigitsMetricsCallback, digits_diversity, digits_metrics
from dmdx_lightning.methods.adm import ADMModule
from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, load_classifier, load_digits_data
from tests.conftest import prompt_loader


# ----------------------------------------------------------------------------- pure functions
def test_knn_precision_recall_hand_computed():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: 1 each
    fake = torch.tensor([[0.5], [10.0]])               # k=1 radii: 9.5 each
    precision, recall = knn_precision_recall(real, fake, k=1)
    assert precision == 0.5   # 0.5 lies in a real ball, 10 in none
    assert recall == 1.0      # every real point lies in the ball of radius 9.5 around 0.5
    precision, recall = knn_precision_recall(fake, real, k=1)
    assert (precision, recall) == (1.0, 0.5)
    with pytest.raises(ValueError, match="more than 3"):
        knn_precision_recall(real[:3], fake, k=3)


def test_feature_lpips_and_pairwise_mean_hand_computed():
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    b = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    assert torch.allclose(feature_lpips([a], [b]), torch.tensor([2.0]))        # orthogonal unit vectors
    assert torch.allclose(feature_lpips([a], [2 * a]), torch.tensor([0.0]))    # same direction
    assert torch.allclose(feature_lpips([a, a], [b, a]), torch.tensor([2.0]))  # summed over layers
    x = torch.tensor([0.0, 1.0, 3.0])
    assert mean_pairwise_distance(x, lambda u, v: (u - v).abs(), batch_size=2) == pytest.approx(2.0)  # (1+3+2)/3


@pytest.mark.slow
def test_digits_metrics_real_vs_noise():
    classifier = load_classifier()
    real, labels = load_digits_data("test")
    good = digits_metrics(real, labels, classifier)
    noise = digits_metrics(torch.rand_like(real) * 2 - 1, labels, classifier)
    assert set(good) == {"fd", "precision", "recall", "class_accuracy", "class_coverage"}
    assert good["class_accuracy"] > 0.9 and good["class_coverage"] == 1.0
    assert good["precision"] > 0.9 and good["recall"] > 0.5
    assert noise["fd"] > 10 * good["fd"] and noise["precision"] < good["precision"]


def test_digits_diversity_zero_for_copies():
    classifier = load_classifier()
    real, _ = load_digits_data("test")
    copies = real[:1].expand(4, -1, -1, -1).reshape(1, 4, 1, 8, 8)
    assert digits_diversity(copies, classifier) == pytest.approx(0.0, abs=1e-6)
    assert digits_diversity(real[:8].reshape(2, 4, 1, 8, 8), classifier) > 0.01


# ----------------------------------------------------------------------------- tiny CLIP
def save_tiny_clip(path):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())  # byte-level BPE alphabet, no merges: one token a byte
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture
def student(digits_teacher):
    return ADMModule(digits_teacher, loss="dmd")  # any distillation module: the callbacks only sample


def validate(module, callback, prompts=DIGIT_PROMPTS[:2]):
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False)
    (metrics,) = trainer.validate(module, prompt_loader(list(prompts), batch_size=len(prompts)))
    return metrics


def test_clip_embedder_returns_projected_embeddings(tiny_clip):
    model, processor = load_clip(tiny_clip)
    assert isinstance(model, CLIPEmbedder) and not any(p.requires_grad for p in model.parameters())
    inputs = processor(text=["a cat", "two dogs"], images=[torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2,
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model.model(**inputs)
        image = model.get_image_features(inputs["pixel_values"])
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    unit = torch.nn.functional.normalize  # CLIPModel.forward returns unit-length projections
    assert torch.allclose(unit(image), full.image_embeds, atol=1e-6)
    assert torch.allclose(unit(text), full.text_embeds, atol=1e-6)
    assert image.shape == (2, 16)


def test_clip_score_callback_matches_hand_computed(tiny_clip, student):
    prompts = list(DIGIT_PROMPTS[:3])
    callback = CLIPScoreCallback(model_name_or_path=tiny_clip, prompts=prompts, seed=5, batch_size=2)
    logged = validate(student, callback)["val/clip_score"]
    model, processor = load_clip(tiny_clip)
    images = sample_images(student, prompts, [5, 6, 7], batch_size=3)
    images = ((images.expand(-1, 3, -1, -1) + 1) * 127.5).round().to(torch.uint8)
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert logged == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)
    assert validate(student, callback)["val/clip_score"] == pytest.approx(logged)  # fixed seeds


def test_clip_score_callback_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_name_or_path"):
        load_clip(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="exactly one of prompts or prompt_file"):
        CLIPScoreCallback(model_name_or_path="x")
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a\nb\na\nc\n")
    assert CLIPScoreCallback(prompt_file=str(prompt_file), max_prompts=2).prompts == ["a", "b"]


# ----------------------------------------------------------------------------- LPIPS
def test_lpips_backbone_from_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.alexnet().features  # torchvision's names: features.<i>.weight
    path = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    model = load_lpips("alex", backbone_weights=str(path))
    loaded = model.net.state_dict()
    assert torch.equal(loaded["slice1.0.weight"], features[0].weight)
    assert torch.equal(loaded["slice5.10.weight"], features[10].weight)
    torch.save({"classifier.1.weight": torch.zeros(1)}, path)
    with pytest.raises(KeyError, match="features.0.weight"):
        load_lpips("alex", backbone_weights=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lpips("alex", backbone_weights=str(tmp_path / "nope.pth"))


def test_lpips_diversity_callback(student):
    callback = LPIPSDiversityCallback(prompts=list(DIGIT_PROMPTS[:2]), samples_per_prompt=3, pnet_rand=True,
                                      min_size=32)
    value = validate(student, callback)["val/lpips_diversity"]
    assert math.isfinite(value) and value > 0
    # the same number by hand: pairwise LPIPS within each prompt's 3 seeds, averaged over prompts
    torch.manual_seed(0)
    model = callback.lpips
    per_prompt = []
    for index, prompt in enumerate(DIGIT_PROMPTS[:2]):
        images = sample_images(student, [prompt] * 3, [3 * index + j for j in range(3)], 3).expand(-1, 3, -1, -1)
        images = torch.nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False)
        with torch.no_grad():
            d = [float(model(images[i:i + 1], images[j:j + 1])) for i, j in ((0, 1), (0, 2), (1, 2))]
        per_prompt.append(sum(d) / 3)
    assert value == pytest.approx(sum(per_prompt) / 2, rel=1e-4)


# ----------------------------------------------------------------------------- digits callback
@pytest.mark.slow
def test_digits_metrics_callback_logs_and_repeats(student):
    callback = DigitsMetricsCallback(samples_per_digit=10, diversity_samples=3)
    first = validate(student, callback)
    assert set(first) == {f"val/{k}" for k in ("fd", "precision", "recall", "class_accuracy",
                                               "class_coverage", "diversity")}
    assert 0 <= first["val/class_accuracy"] <= 1 and first["val/fd"] > 0 and first["val/diversity"] > 0
    assert validate(student, callback) == first  # fixed seeds


@pytest.mark.slow
def test_metrics_run_in_fit_validation_loop_not_in_sanity_check(digits_teacher, tiny_clip):
    module = ADMModule(digits_teacher, loss="dmd")
    callbacks = [DigitsMetricsCallback(samples_per_digit=5, diversity_samples=0),
                 CLIPScoreCallback(model_name_or_path=tiny_clip, prompts=list(DIGIT_PROMPTS[:2]))]
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, val_check_interval=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, num_sanity_val_steps=1)
    calls = []
    original = callbacks[0].compute
    callbacks[0].compute = lambda *a: calls.append(trainer.sanity_checking) or original(*a)
    trainer.fit(module, prompt_loader(list(DIGIT_PROMPTS), batch_size=4),
                prompt_loader(list(DIGIT_PROMPTS[:2]), batch_size=2))
    assert calls and not any(calls)  # ran after each validation, never in the sanity check
    assert {"val/fd", "val/clip_score"} <= set(trainer.callback_metrics)


# ----------------------------------------------------------------------------- ranks
def _score_on_rank(rank, world_size, clip_dir, port, out):
    import torch.distributed as dist
    from types import SimpleNamespace

    from dmdx_lightning.teachers.digits import DigitsTeacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    module = ADMModule(DigitsTeacher(), loss="dmd")
    trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    prompts = list(DIGIT_PROMPTS[:5])  # 5 prompts: ranks get 3 and 2
    clip = CLIPScoreCallback(model_name_or_path=clip_dir, prompts=prompts, batch_size=2).compute(trainer, module)
    lp = LPIPSDiversityCallback(prompts=prompts, samples_per_prompt=2, pnet_rand=True, min_size=32)
    torch.manual_seed(0)  # the random LPIPS backbone must be the same on every rank
    values = {**clip, **lp.compute(trainer, module)}
    torch.save(values, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_metrics_are_reduced_over_ranks(tiny_clip, tmp_path):
    """2 gloo processes, each scoring its share of the prompts, log what 1 process scoring all logs."""
    import socket

    import torch.multiprocessing as mp

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    mp.spawn(_score_on_rank, args=(1, tiny_clip, port(), str(tmp_path / "one")), nprocs=1)
    mp.spawn(_score_on_rank, args=(2, tiny_clip, port(), str(tmp_path / "two")), nprocs=2)
    single = torch.load(tmp_path / "one.0")
    ranks = [torch.load(tmp_path / f"two.{r}") for r in range(2)]
    for key in ("clip_score", "lpips_diversity"):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-5), key
        assert ranks[1][key] == pytest.approx(single[key], rel=1e-5), key


def test_callback_warns_when_the_fit_has_no_validation_loop(digits_teacher):
    callback = DigitsMetricsCallback(samples_per_digit=5, diversity_samples=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with pytest.warns(UserWarning, match="DigitsMetricsCallback never ran"):
        trainer.fit(ADMModule(digits_teacher, loss="dmd"), prompt_loader(list(DIGIT_PROMPTS), batch_size=4))
