"""Metric components of ``dmdx evaluate`` (dmdx_lightning.evaluation.metrics) on tiny real models
built in code with random weights and loaded from folders the way the real ones are: a CLIP-shaped
transformers model (CLIP score, PickScore, background consistency, aesthetic head), a tiny open_clip
model and checkpoint (HPSv2), a tiny ViT (DINO for subject consistency), torchvision RAFT-small
(dynamic degree), lpips with a random backbone, and a tiny conv net standing in for Inception (FID,
KID, precision / recall). Values are checked against hand computations on the same models."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dmdx_lightning.evaluation.metrics import (FID, KID, METRICS, MPS, AestheticQuality, BackgroundConsistency,
                                               CLIPScore, DigitsMetric, DynamicDegree, HPSv2, ImageReward,
                                               ImagingQuality, LPIPSDiversity, Metric, MetricUnavailable,
                                               MixtureMetric, MotionSmoothness, PickScore, PrecisionRecall,
                                               SubjectConsistency, VideoCLIPScore, build_metric)
from dmdx_lightning.evaluation.metrics.functional import frame_consistency
from dmdx_lightning.evaluation.metrics.video import flow_magnitude_score, is_dynamic
from dmdx_lightning.evaluation.samples import SampleSet
from tests.test_metrics import save_tiny_clip

CPU = torch.device("cpu")
PROMPTS = ["a red cube", "two dogs on a beach", "a bowl of soup"]


def quantized(shape, seed):
    """Random pixels already on the uint8 grid, so PNG files hold exactly the same values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255


def image_set(seed=0, n=3, size=32):
    return SampleSet.from_tensors(quantized((n, 3, size, size), seed), PROMPTS[:n])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


def clip_forward(folder, pixels, prompts):
    """The full CLIPModel forward on the processor's inputs: the route the metrics do not take."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    images = list((pixels * 255).round().to(torch.uint8))
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs)


# ----------------------------------------------------------------------------- registry and gaps
def test_registry_names_every_class_by_its_name():
    assert {"fid", "kid", "precision_recall", "clip_score", "pick_score", "hpsv2", "image_reward", "mps",
            "lpips_diversity", "video_clip_score", "subject_consistency", "background_consistency",
            "dynamic_degree", "aesthetic_quality", "motion_smoothness", "imaging_quality", "digits",
            "mixture"} == set(METRICS)
    for name, cls in METRICS.items():
        assert issubclass(cls, Metric) and cls.name == name and cls.modality in ("image", "video", "any")
    assert isinstance(build_metric("lpips_diversity", pnet_rand=True), LPIPSDiversity)
    with pytest.raises(KeyError, match="unknown metric 'clip'.*clip_score"):
        build_metric("clip")


@pytest.mark.parametrize("cls", [ImageReward, MPS, MotionSmoothness, ImagingQuality])
def test_documented_gaps_fail_when_built_with_the_reason(cls):
    with pytest.raises(MetricUnavailable, match="separate environment|authors' repository") as e:
        cls("/some/checkpoint.pt")
    assert isinstance(e.value, NotImplementedError) and len(str(e.value)) > 100


# ----------------------------------------------------------------------------- CLIP score, PickScore
def test_clip_score_is_100_cos_of_the_clip_model(tiny_clip):
    samples = image_set()
    metric = CLIPScore(tiny_clip, batch_size=2)  # two batches: the result must not depend on batching
    result = metric.score(samples, CPU)
    out = clip_forward(tiny_clip, quantized((3, 3, 32, 32), 0), PROMPTS)
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds).double()
    assert result.values["clip_score"] == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)
    assert result.per_prompt[1]["clip_score"] == pytest.approx(max(float(100 * cos[1]), 0.0), abs=1e-3)
    assert result.info["model"] == tiny_clip and "torchmetrics" in result.info["package"]
    assert metric.score(samples, CPU).values == result.values  # deterministic


def test_video_clip_score_is_the_mean_over_frames(tiny_clip):
    videos = quantized((2, 3, 3, 32, 32), 1)  # 2 videos of 3 frames
    result = VideoCLIPScore(tiny_clip).score(SampleSet.from_tensors(videos, PROMPTS[:2]), CPU)
    out = clip_forward(tiny_clip, videos.flatten(0, 1), [p for p in PROMPTS[:2] for _ in range(3)])
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds).double().view(2, 3)
    assert result.values["video_clip_score"] == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)
    assert result.per_prompt[0]["video_clip_score"] == pytest.approx(max(float(100 * cos[0].mean()), 0.0), abs=1e-3)
    with pytest.raises(ValueError, match="scores video samples, got a image"):
        VideoCLIPScore(tiny_clip).score(image_set(), CPU)


def test_pick_score_is_logit_scale_times_cos(tiny_clip):
    result = PickScore(tiny_clip).score(image_set(), CPU)  # the tiny folder has its own processor
    out = clip_forward(tiny_clip, quantized((3, 3, 32, 32), 0), PROMPTS)
    by_hand = out.logits_per_image.diagonal().double()  # logit_scale.exp() * cos, CLIPModel's own product
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds).double()
    assert not torch.allclose(by_hand, cos, atol=1e-2)  # the scale (exp 2.6592 at init) is really applied
    assert result.values["pick_score"] == pytest.approx(float(by_hand.mean()), abs=1e-4)
    assert [result.per_prompt[i]["pick_score"] for i in range(3)] == pytest.approx(by_hand.tolist(), abs=1e-4)


def test_clip_models_missing_paths_are_named(tmp_path, tiny_clip):
    missing = str(tmp_path / "no_clip")
    with pytest.raises(FileNotFoundError, match=f"CLIPScore could not load model_name_or_path='{missing}'"):
        CLIPScore(missing).score(image_set(), CPU)
    with pytest.raises(FileNotFoundError, match=f"PickScore could not load processor_name_or_path='{missing}'"):
        PickScore(tiny_clip, processor_name_or_path=missing).score(image_set(), CPU)


# ----------------------------------------------------------------------------- HPSv2 (open_clip)
@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("hps")
    config = folder / "tiny-hps-test.json"
    config.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                                                  "patch_size": 8, "head_width": 16},
                                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                               "heads": 2, "layers": 2}}))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps-test")
    checkpoint = folder / "HPS_tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    return str(checkpoint), str(config)


def test_hpsv2_is_100_cos_of_the_open_clip_checkpoint(tiny_hps):
    import open_clip
    from torchvision.transforms.functional import to_pil_image

    checkpoint, config = tiny_hps
    pixels = quantized((3, 3, 32, 32), 0)
    metric = HPSv2(checkpoint, architecture=config)
    result = metric.score(image_set(), CPU)
    # by hand, as hpsv2/img_score.py: the checkpoint in a fresh model, open_clip's eval transform on PIL images
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-hps-test")
    model.load_state_dict({k.removeprefix("module."): v for k, v in torch.load(checkpoint)["state_dict"].items()})
    model.eval()
    with torch.no_grad():
        images = torch.stack([preprocess(to_pil_image((p * 255).round().to(torch.uint8))) for p in pixels])
        image = model.encode_image(images, normalize=True)
        text = model.encode_text(open_clip.get_tokenizer("tiny-hps-test")(PROMPTS), normalize=True)
    by_hand = 100 * (image * text).sum(-1).double()
    assert result.values["hpsv2"] == pytest.approx(float(by_hand.mean()), abs=1e-3)
    assert result.per_prompt[2]["hpsv2"] == pytest.approx(float(by_hand[2]), abs=1e-3)
    assert metric.score(image_set(), CPU).values == result.values


def test_hpsv2_missing_or_wrong_checkpoint(tmp_path, tiny_hps):
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(FileNotFoundError, match=f"HPSv2: checkpoint='{missing}' is not a file"):
        HPSv2(str(missing)).score(image_set(), CPU)
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, missing)
    with pytest.raises(ValueError, match="does not fit open_clip 'tiny-hps-test'"):
        HPSv2(str(missing), architecture=tiny_hps[1]).load()


# ----------------------------------------------------------------------------- LPIPS diversity
def test_lpips_diversity_zero_for_copies_and_the_mean_over_pairs():
    torch.manual_seed(0)
    metric = LPIPSDiversity(pnet_rand=True, min_size=32)
    copies = quantized((1, 3, 32, 32), 0).expand(3, -1, -1, -1)
    assert metric.score(SampleSet.from_tensors(copies, ["a"] * 3), CPU).values["lpips_diversity"] == 0.0
    pixels = quantized((4, 3, 32, 32), 1)
    result = metric.score(SampleSet.from_tensors(pixels, ["a", "a", "b", "b"]), CPU)
    x = pixels * 2 - 1
    with torch.no_grad():
        by_hand = [float(metric.model(x[0:1], x[1:2])), float(metric.model(x[2:3], x[3:4]))]
    assert result.per_prompt[1]["lpips_diversity"] == pytest.approx(by_hand[1], rel=1e-5)
    assert result.values["lpips_diversity"] == pytest.approx(sum(by_hand) / 2, rel=1e-5) and by_hand[0] > 0
    with pytest.raises(ValueError, match=r"at least 2 samples per prompt \(pairs\); prompts \[1\]"):
        metric.score(SampleSet.from_tensors(pixels[:3], ["a", "a", "b"]), CPU)


def test_lpips_diversity_of_videos_averages_aligned_frames():
    torch.manual_seed(0)
    metric = LPIPSDiversity(pnet_rand=True, min_size=32)
    videos = quantized((2, 3, 3, 32, 32), 2)
    value = metric.score(SampleSet.from_tensors(videos, ["a", "a"]), CPU).values["lpips_diversity"]
    x = videos * 2 - 1
    with torch.no_grad():
        per_frame = [float(metric.model(x[0, f:f + 1], x[1, f:f + 1])) for f in range(3)]
    assert value == pytest.approx(sum(per_frame) / 3, rel=1e-5)


# ----------------------------------------------------------------------------- FID, KID, precision / recall
class TinyFeatures(torch.nn.Module):
    """Stands in for Inception: conv, pool, 8 features; reads [0, 1] images of any size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1).flatten(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """40 images as PNG files (nested folder) and the same pixels in memory."""
    folder = tmp_path_factory.mktemp("reference")
    pixels = quantized((40, 3, 16, 16), 3)
    for i, p in enumerate(pixels):
        (folder / f"part{i % 2}").mkdir(exist_ok=True)
        Image.fromarray((p * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"part{i % 2}" / f"{i:03d}.png")
    return str(folder), pixels


def other_set(n=40):
    g = torch.Generator().manual_seed(9)
    return SampleSet.from_tensors(torch.rand(n, 3, 16, 16, generator=g) * 0.5, ["p"] * n)  # darker, less varied


def test_fid_of_the_reference_itself_is_zero_and_npz_statistics_agree(reference, tmp_path):
    folder, pixels = reference
    same = SampleSet.from_tensors(pixels, ["p"] * len(pixels))
    fid = FID(folder, feature_extractor=TinyFeatures(), batch_size=16)
    assert fid.score(same, CPU).values["fid"] == pytest.approx(0.0, abs=1e-4)
    far = fid.score(other_set(), CPU).values["fid"]
    assert far > 1e-2 and fid.score(other_set(), CPU).values["fid"] == far  # repeats exactly
    # the hand-written Frechet distance on the same features
    other = other_set()
    with torch.no_grad():
        a = TinyFeatures()(pixels).double()
        b = TinyFeatures()(torch.stack([other.load(s) for s in other.samples])).double()
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    eig = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    assert far == pytest.approx(float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eig), rel=1e-3)
    stats = tmp_path / "reference.npz"
    fid.save_reference(str(stats))
    assert FID(str(stats), feature_extractor=TinyFeatures()).score(other_set(), CPU).values["fid"] == pytest.approx(far, rel=1e-6)
    assert set(np.load(stats).files) == {"mu", "sigma", "n"}


def test_kid_and_precision_recall(reference):
    folder, pixels = reference
    same = SampleSet.from_tensors(pixels, ["p"] * len(pixels))
    kid = KID(folder, feature_extractor=TinyFeatures(), subsets=10, subset_size=20)
    self_kid, far_kid = kid.score(same, CPU).values, kid.score(other_set(), CPU).values
    assert abs(self_kid["kid"]) < 0.05 * far_kid["kid"] and set(far_kid) == {"kid", "kid_std"}
    assert kid.score(other_set(), CPU).values == far_kid  # subset draws are seeded
    pr = PrecisionRecall(folder, feature_extractor=TinyFeatures(), k=3)
    assert pr.score(same, CPU).values == {"precision": 1.0, "recall": 1.0}
    far = pr.score(other_set(), CPU).values
    assert far["precision"] < 1.0 or far["recall"] < 1.0


def test_reference_and_inception_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "coco_val")
    with pytest.raises(FileNotFoundError, match=f"FID: reference='{missing}' is not a folder of images or a .npz"):
        FID(missing, feature_extractor=TinyFeatures()).score(image_set(), CPU)
    with pytest.raises(FileNotFoundError, match=f"KID: reference='{missing}' is not a folder of images"):
        KID(missing, feature_extractor=TinyFeatures()).score(image_set(), CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        PrecisionRecall(str(tmp_path / "empty"), feature_extractor=TinyFeatures()).score(image_set(), CPU)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(8))
    with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]"):
        FID(str(tmp_path / "bad.npz"), feature_extractor=TinyFeatures()).score(image_set(), CPU)
    weights = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError, match=f"inception_weights='{weights}' is not a file"):
        FID(str(tmp_path / "empty"), inception_weights=weights).score(image_set(), CPU)


# ----------------------------------------------------------------------------- video (VBench dimensions)
def test_frame_consistency_hand_computed():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # frame 1: cos to frame 0 = cos to previous = 1/sqrt2; frame 2: cos to frame 1 < 0 -> 0, to frame 0 = -1 -> 0
    assert frame_consistency(f).tolist() == pytest.approx([1 / math.sqrt(2), 0.0])
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_consistency(f[:1])


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


def test_subject_consistency_with_a_tiny_dino(tiny_dino, tmp_path):
    from transformers import ViTModel

    videos = quantized((2, 3, 3, 24, 32), 4)  # not square: the shorter side goes to 32
    videos[1] = videos[1, :1]  # video 1 is one frame repeated: perfectly consistent
    metric = SubjectConsistency(tiny_dino, image_size=32)
    result = metric.score(SampleSet.from_tensors(videos, ["a", "b"]), CPU)
    assert result.per_prompt[1]["subject_consistency"] == pytest.approx(1.0, abs=1e-6)
    model = ViTModel.from_pretrained(tiny_dino, add_pooling_layer=False).eval()
    x = F.interpolate(videos[0], scale_factor=32 / 24, mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        cls = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    cos = lambda i, j: max(float(F.cosine_similarity(cls[i], cls[j], dim=0)), 0.0)  # noqa: E731
    by_hand = ((cos(1, 0) + cos(1, 0)) / 2 + (cos(2, 1) + cos(2, 0)) / 2) / 2
    assert result.per_prompt[0]["subject_consistency"] == pytest.approx(by_hand, abs=1e-5)
    assert result.values["subject_consistency"] == pytest.approx((by_hand + 1) / 2, abs=1e-5)
    with pytest.raises(FileNotFoundError, match=f"model_name_or_path='{tmp_path / 'no_dino'}'"):
        SubjectConsistency(str(tmp_path / "no_dino")).load()


def test_background_consistency_and_aesthetic_quality_with_a_tiny_clip(tiny_clip, tmp_path):
    videos = quantized((2, 3, 3, 32, 32), 5)
    videos[0] = videos[0, :1]
    samples = SampleSet.from_tensors(videos, ["a", "b"])
    background = BackgroundConsistency(tiny_clip).score(samples, CPU)
    assert background.per_prompt[0]["background_consistency"] == pytest.approx(1.0, abs=1e-6)
    out = clip_forward(tiny_clip, videos[1], ["x"] * 3)
    e = out.image_embeds  # unit length
    cos = lambda i, j: max(float(e[i] @ e[j]), 0.0)  # noqa: E731
    by_hand = (cos(1, 0) + (cos(2, 1) + cos(2, 0)) / 2) / 2
    assert background.per_prompt[1]["background_consistency"] == pytest.approx(by_hand, abs=1e-5)

    # VBench weighs every frame term: a 4-frame video (3 terms) counts three times a 2-frame one
    from dmdx_lightning.evaluation.samples import Sample

    clips = {0: videos[0, :1].expand(4, -1, -1, -1), 1: videos[1, :2]}
    uneven = SampleSet([Sample(0, "a", 0), Sample(1, "b", 1)], lambda s: clips[s.prompt_index], "video")
    two = BackgroundConsistency(tiny_clip).score(uneven, CPU)
    assert two.per_prompt[0]["background_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert two.values["background_consistency"] == pytest.approx((3 + cos(1, 0)) / 4, abs=1e-5)

    head = torch.nn.Linear(16, 1)
    torch.save(head.state_dict(), tmp_path / "sa_0_4_vit_l_14_linear.pth")
    aesthetic = AestheticQuality(str(tmp_path / "sa_0_4_vit_l_14_linear.pth"), tiny_clip).score(samples, CPU)
    with torch.no_grad():
        frames = head(clip_forward(tiny_clip, videos[1], ["x"] * 3).image_embeds).squeeze(-1) / 10
    assert aesthetic.per_prompt[1]["aesthetic_quality"] == pytest.approx(float(frames.mean()), abs=1e-5)
    images = AestheticQuality(str(tmp_path / "sa_0_4_vit_l_14_linear.pth"), tiny_clip).score(image_set(), CPU)
    assert set(images.per_prompt) == {0, 1, 2}  # images: one frame each
    with pytest.raises(FileNotFoundError, match="AestheticQuality: head="):
        AestheticQuality(str(tmp_path / "none.pth"), tiny_clip).load()


def test_dynamic_degree_rules_and_a_tiny_raft(tmp_path):
    from torchvision.models.optical_flow import raft_small

    flow = torch.zeros(2, 20, 20)
    flow[0, :2, :] = 3.0  # 40 of 400 pixels move by 3: the top 5% (20 pixels) average 3
    assert flow_magnitude_score(flow) == pytest.approx(3.0)
    # 256 px video: threshold 6; 16 frames (15 pairs) need round(4 * 16 / 16) = 4 moving pairs
    assert is_dynamic([7.0] * 4 + [0.0] * 11, 256, 256) and not is_dynamic([7.0] * 3 + [0.0] * 12, 256, 256)
    assert is_dynamic([3.5] * 4 + [0.0] * 11, 128, 200)  # 128 px: threshold 3

    torch.manual_seed(0)
    torch.save(raft_small().state_dict(), tmp_path / "raft_small.pth")
    metric = DynamicDegree(str(tmp_path / "raft_small.pth"), architecture="raft_small", num_flow_updates=2)
    videos = quantized((2, 3, 3, 60, 64), 6)  # upsampled to 128 x 136 for RAFT
    samples = SampleSet.from_tensors(videos, ["a", "b"])
    result = metric.score(samples, CPU)
    with torch.no_grad():
        scores = metric.pair_scores(videos[0], CPU)
    assert len(scores) == 2 and result.per_prompt[0]["dynamic_degree"] == float(is_dynamic(scores, 128, 136))
    assert result.values["dynamic_degree"] in (0.0, 0.5, 1.0) and metric.score(samples, CPU).values == result.values
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="is not a raft_small state dict"):
        DynamicDegree(str(tmp_path / "bad.pth"), architecture="raft_small").load()
    with pytest.raises(FileNotFoundError, match="DynamicDegree: weights="):
        DynamicDegree(str(tmp_path / "none.pth")).load()


# ----------------------------------------------------------------------------- toy teachers
def test_digits_metric_equals_digits_metrics_on_the_same_digits():
    from dmdx_lightning.callbacks.samples import unit_range
    from dmdx_lightning.evaluation.digits import digits_diversity, digits_metrics
    from dmdx_lightning.teachers.digits import DIGIT_PROMPTS, load_classifier, load_digits_data

    every, every_label = load_digits_data("test")
    real, labels = every[:60], every_label[:60]
    samples = SampleSet.from_tensors(unit_range(real), [DIGIT_PROMPTS[int(k)] for k in labels])
    assert samples.load(samples.samples[0]).shape == (3, 8, 8)  # what from_tensors makes of a gray digit
    result = DigitsMetric().score(samples, CPU)
    expected = digits_metrics(real, labels, load_classifier())
    assert {k: result.values[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    pairs = torch.stack([every[every_label == k][:2] for k in (0, 1)])  # 2 prompts x 2 samples
    two = SampleSet.from_tensors(unit_range(pairs.flatten(0, 1)), [DIGIT_PROMPTS[k] for k in (0, 0, 1, 1)])
    assert DigitsMetric().diversity(two) == pytest.approx(digits_diversity(pairs, load_classifier()), rel=1e-5)
    with pytest.raises(ValueError, match=r"prompts \[''\] name no digit"):  # the unconditional prompt
        DigitsMetric().quality(SampleSet.from_tensors(unit_range(real[:2]), ["", DIGIT_PROMPTS[0]]))
    with pytest.raises(ValueError, match="must name exactly one digit"):
        DigitsMetric().quality(SampleSet.from_tensors(unit_range(real[:2]), ["a cat", "a cat"]))


def test_mixture_metric_scores_latents_and_refuses_pixels():
    from dmdx_lightning.teachers.mixture import GaussianMixture, class_prompt, mixture_metrics

    metric = MixtureMetric(num_classes=2, modes_per_class=4, mixture_seed=3)
    mixture = GaussianMixture((16, 8, 8), 2, 4, 0.1, 10.0, 3)
    labels = torch.arange(2).repeat_interleave(200)
    x, _ = mixture.sample(labels, generator=torch.Generator().manual_seed(0))
    result = metric.score_latents(x, [class_prompt(int(k)) for k in labels])
    expected = mixture_metrics(x, labels, mixture)
    assert result.info["mode_mass"] == expected.pop("mode_mass")
    assert result.values == pytest.approx(expected) and result.values["precision"] == 1.0
    with pytest.raises(TypeError, match="score_latents"):
        metric.score(image_set(), CPU)
    with pytest.raises(ValueError, match="shape= must match"):
        metric.score_latents(x[:, :4], [class_prompt(0)] * len(x))
