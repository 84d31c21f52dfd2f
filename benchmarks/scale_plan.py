"""Scale plan: per-GPU memory and iteration time of every shipped GPU training config, for DDP, FSDP2
and HSDP, LoRA and full mode, on 1, 8 and 64 GPUs, from the real architectures (no GPU, no weights).

    python benchmarks/scale_plan.py              # every config: benchmarks/results/scale_plan.{md,json} (4-6 min, 2 CPU cores)
    python benchmarks/scale_plan.py --configs sdxl/dmd_1step.yaml --no_check --out DIR   # a subset, no GPU-check section

The architectures are the published ``config.json`` dicts of each teacher's components, stored in
``benchmarks/architectures/*.json`` (one file per teacher, naming its hub repository), built with the
diffusers / transformers classes on the ``meta`` device: every shape and dtype is real, nothing is
allocated or computed, and a pass through SD3.5-Large or CogVideoX-5b at full size takes seconds.
Each shipped config (``configs/<family>/*.yaml`` of ``CONFIG_FAMILIES``) is read with yaml for its teacher,
resolution / frames / text length, batch per GPU, mode, LoRA rank, dtypes, method, student steps,
update ratio, CFG and discriminators.

COUNTED on the meta device (exact for the stated shapes and dtypes):

- parameters of every component; LoRA adapters injected by peft's ``inject_adapter_in_model`` on
  the teacher class's ``default_lora_targets`` (as ``Teacher.setup_roles`` does); discriminator
  heads built by dmdx's own ``head_for`` on the feature maps a forward probes; SAM ViT-B;
- two-expert teachers (Wan 2.2 A14B: every component of role ``denoiser`` is an expert of the same
  architecture, one denoising the timesteps at or above the architecture's ``boundary_ratio``, the
  other those below): frozen weights, LoRA adapters and full-mode copies of every expert; one
  expert's FLOPs and activations per sample (each sample runs one expert; ``WanExperts`` runs the
  idle one on a single token);
- FLOPs (``torch.utils.flop_counter.FlopCounterMode``) of each KIND of denoiser pass an iteration
  makes, at the config's shape: a no-grad forward; forward + backward to the input (frozen weights:
  the real score under a discriminator); forward + backward of a trainable role (student, fake
  score), including the recomputation of activation checkpointing; whole network or stopped after
  the deepest discriminator layer, as ``Teacher.feature_maps`` stops;
- activations: the bytes autograd keeps for backward in each such pass
  (``torch.autograd.graph.saved_tensors_hooks``, distinct storages, parameters excluded), with and
  without checkpointing; the largest checkpointed unit's own bytes (what its recomputation holds
  during backward); a no-grad pass's peak working bytes (live storages); ADP's pixel path (VAE
  decode + SAM ViT-B + heads) with ``benchmarks/pixel_memory.py``'s counters.
  One sample is counted per pass kind and scaled by the samples of the pass (batch, x2 for CFG):
  every op here acts per sample. Weights and activations are bf16, what ``bf16-mixed`` computes in
  (the meta device has no autocast); LoRA adapters are measured in bf16 too, stored in fp32.

MODELLED (each assumption is printed in the report):

- how many passes of each kind an iteration makes, per method, read from
  ``dmdx_lightning/methods/{base,adm,adp}.py`` (:func:`passes`): the student's backward simulation
  (on average ``(steps - 1 + first_trained_step) / 2`` no-grad student passes), CFG doubling the real
  score's batch, TTUR (the generator steps in one iteration of ``update_ratio``), ADM's DMD
  diagnostic once per ``dmd_diagnostic_every`` (10) iterations;
- memory per GPU: parameters + AdamW states + one player's gradients (the player loop frees them,
  ``set_to_none``, before the next player) + activations of the player that keeps the most, with
  the phase rule of :func:`memory`; DDP's gradient buckets and autocast's bf16 copies of fp32
  trainable weights; FSDP2 / HSDP as ``dmdx_lightning.strategies.FSDP2Strategy`` shards (teacher
  networks per block, fp32 master weights, bf16 gathers; text encoders, VAE and SAM whole);
- time: counted FLOPs / (989 TFLOP/s dense bf16, H100 SXM and H200 alike, x a utilisation), and a
  communication estimate (NVLink in a node, InfiniBand across nodes) assumed to overlap compute.

Checked against the one GPU measurement (``sd3_gpu_check.md``: SD3-Medium, one H100) in the
report's "Predicted vs measured" section, which also gives the utilisation that measurement implies.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, machine, markdown_table, write_json  # noqa: E402
from benchmarks.pixel_memory import LiveBytes, SavedBytes, fused_attention_on_meta  # noqa: E402

ARCHITECTURES = Path(__file__).resolve().parent / "architectures"
CONFIG_FAMILIES = ("sd3", "sdxl", "sd15", "cogvideox", "flux", "wan")
GIB = 2**30
COMMAND = "python benchmarks/scale_plan.py"

#: dense bf16 peak of one H100 SXM and of one H200 (the same Hopper tensor cores)
PEAK_FLOPS = 989e12
#: card capacities in bytes, and the share of a card the plan lets a run use (the CUDA context,
#: NCCL buffers and allocator fragmentation are not counted)
CARDS = {"H100": 80e9, "H200": 141e9}
USABLE = 0.9
UTILISATION = 0.35
GPU_COUNTS = (1, 8, 64)
STRATEGIES = ("DDP", "FSDP2", "HSDP")
MODES = ("lora", "full")
NODE = 8
#: achieved collective bandwidth per GPU: NVLink 4 inside an 8-GPU node, 8 x 400 Gb/s InfiniBand per node
NVLINK_BYTES_PER_S = 300e9
IB_BYTES_PER_S = 40e9
#: the LoRA rank of a config that ships in full mode, shown in LoRA mode (the LoRA configs' rank)
LORA_RANK = 64
#: ADMModule's default: the DMD diagnostic's real-score pass, once per this many iterations
DIAGNOSTIC_EVERY = 10
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the measurement this plan is checked against (benchmarks/results/sd3_gpu_check.json)
CHECK = RESULTS / "sd3_gpu_check.json"

#: the classes diffusers checkpoints one at a time under gradient checkpointing (its units)
CHECKPOINT_UNITS = ("JointTransformerBlock", "CogVideoXBlock", "ResnetBlock2D", "BasicTransformerBlock",
                    "WanTransformerBlock")
#: scaled_dot_product_attention's fused CPU kernel (what fused_attention_on_meta runs on meta), which
#: FlopCounterMode has no formula for: the same count as the GPU's fused kernels
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v),
}


# ------------------------------------------------------------------------------ architectures
def architecture(name: str) -> dict:
    return json.loads((ARCHITECTURES / f"{name}.json").read_text())


def architecture_of(source: str) -> str:
    """The stored architecture whose hub repository is ``source`` (a config's teacher)."""
    for path in sorted(ARCHITECTURES.glob("*.json")):
        if json.loads(path.read_text())["source"] == source:
            return path.stem
    raise KeyError(f"no file in {ARCHITECTURES.name}/ holds the architecture of {source}")


def build(spec: dict, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """One component on the meta device, from its stored config dict (``Cls.from_config`` for
    diffusers, ``Cls(ConfigCls(**config))`` for transformers), created directly in ``dtype``."""
    library, name = spec["class"].split(".")
    cls = getattr(importlib.import_module(library), name)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            if library == "diffusers":
                return cls.from_config(spec["config"])
            return cls(cls.config_class.from_dict(spec["config"]))
    finally:
        torch.set_default_dtype(default)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table() -> list[dict]:
    """Every stored component's parameters, counted on meta, beside its published size."""
    rows = []
    for path in sorted(ARCHITECTURES.glob("*.json")):
        arch = json.loads(path.read_text())
        for key, spec in arch["components"].items():
            rows.append({"architecture": path.stem, "source": arch["source"], "component": key,
                         "class": spec["class"], "role": spec["role"], "params": count(build(spec)),
                         "published": spec.get("published_params")})
    return rows


# ------------------------------------------------------------------------------ configs
def teacher_class(family: str):
    from dmdx_lightning.teachers.cogvideox import CogVideoXTeacher
    from dmdx_lightning.teachers.flux import FluxTeacher
    from dmdx_lightning.teachers.sd3 import SD3Teacher
    from dmdx_lightning.teachers.sdxl import SDXLTeacher, StableDiffusionTeacher
    from dmdx_lightning.teachers.wan import WanTeacher

    if family == "wan":
        return WanTeacher
    return {"sd3": SD3Teacher, "sdxl": SDXLTeacher, "sd": StableDiffusionTeacher, "cogvideox": CogVideoXTeacher, "flux": FluxTeacher}[family]


FAMILY_OF = {"SD3Teacher": "sd3", "SDXLTeacher": "sdxl", "StableDiffusionTeacher": "sd", "CogVideoXTeacher": "cogvideox", "FluxTeacher": "flux"}
FAMILY_OF["WanTeacher"] = "wan"
METHOD_OF = {"ADMModule": None, "ADPModule": "adp", "ODEPairGenerator": "ode_pairs"}


@dataclass
class Run:
    """What the plan reads from one config (and what it assumes where the config is silent)."""

    config: str
    family: str
    architecture: str
    method: str  # adm | dmd | dmd2 | adp | ode_pairs
    mode: str
    lora_rank: int
    dtype: str
    trainable_dtype: str | None
    batch: int
    latent: tuple  # one sample's latent shape
    text_tokens: int
    student_steps: int = 1
    first_trained_step: int = 0
    update_ratio: int = 1
    real_cfg: float = 1.0
    true_cfg: bool = True  # a real_cfg != 1 doubles the real score's batch (False: embedded guidance, one pass)
    layers: tuple | None = None
    head_channels: int = 256
    num_down: int = 3
    backbone_role: str = "real"
    paired: bool = False
    pixel: dict | None = None
    checkpointing: bool = False
    checkpoint_frozen: bool = False
    drop_t5: bool = False
    diagnostic: bool = True
    sample_steps: int = 0
    adapter_dtype: str = "float32"
    tiny_encoders_bytes: float | None = None  # the GPU check's text encoders and VAE (measured there)

    @property
    def trains(self) -> bool:
        return self.method != "ode_pairs"


def read_config(name: str) -> Run:
    """A shipped config (``sd3/adm_4step.yaml``) as the plan's :class:`Run`."""
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    model = raw["model"]
    args = model["init_args"]
    teacher = args["teacher"]["init_args"]
    family = FAMILY_OF[args["teacher"]["class_path"].rsplit(".", 1)[-1]]
    arch_name = architecture_of(teacher["pretrained_model_name_or_path"])
    components = architecture(arch_name)["components"]
    method = METHOD_OF[model["class_path"].rsplit(".", 1)[-1]] or args.get("loss", "adm")
    latent, text = _shapes(family, components, teacher)
    steps = len(args["student_timesteps"]) if args.get("student_timesteps") else args.get("student_steps", 1)
    disc = (args.get("discriminator") or {}).get("init_args", {})
    has_disc = method in ("adm", "dmd2", "adp")
    pixel = args.get("pixel_discriminator")
    mode = teacher.get("mode", "full")
    return Run(
        config=name, family=family, architecture=arch_name, method=method, mode=mode,
        # a LoRA config without a rank has the teacher's default, 16; a full config is shown with LORA_RANK
        lora_rank=teacher.get("lora_rank", 16 if mode == "lora" else LORA_RANK),
        dtype=teacher.get("torch_dtype", "float32"), trainable_dtype=teacher.get("trainable_dtype"),
        batch=raw["data"]["init_args"]["batch_size"], latent=latent, text_tokens=text, student_steps=steps,
        first_trained_step=args.get("first_trained_step", 0), update_ratio=args.get("update_ratio", 1),
        real_cfg=float(args.get("real_cfg_scale", args.get("cfg_scale", 2.0))),
        # FLUX.1-dev's embedded guidance runs the guided real score in ONE pass (teachers/flux.py)
        true_cfg=family != "flux" or teacher.get("guidance") == "true_cfg",
        layers=tuple(disc.get("layers", (-1,))) if has_disc else None, head_channels=disc.get("head_channels", 256),
        num_down=disc.get("num_down", 3), backbone_role=disc.get("backbone_role", "fake" if method == "dmd2" else "real"),
        paired=(args.get("variants") or {}).get("adm_pairing") == "paired",
        checkpointing=teacher.get("gradient_checkpointing", False), checkpoint_frozen=teacher.get("checkpoint_frozen", False),
        pixel=_pixel_options(pixel) if pixel else None, drop_t5=teacher.get("drop_t5", False),
        diagnostic=args.get("log_dmd_diagnostic", True), sample_steps=args.get("num_steps", 0))


def _shapes(family: str, components: dict, teacher: dict) -> tuple[tuple, int]:
    """One sample's latent shape and text length, as the teacher family computes them."""
    vae = components["vae"]["config"]
    if family == "wan":  # (C, F, H, W) as WanTeacher.latent_shape (the VAE's own factors); UMT5 tokens
        net = components["transformer"]["config"]
        space, time = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
        frames = teacher.get("num_frames", 81)
        return (net["in_channels"], (frames - 1) // time + 1, teacher.get("height", 480) // space,
                teacher.get("width", 832) // space), teacher.get("max_sequence_length", 512)
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    if family == "flux":  # the latent before 2x2 packing; T5 tokens only (CLIP gives the pooled vector)
        net = components["transformer"]["config"]
        side = teacher.get("resolution", 1024) // scale
        return (net["in_channels"] // 4, side, side), teacher.get("max_sequence_length", 512)
    if family == "sd3":
        net = components["transformer"]["config"]
        side = teacher.get("resolution", 1024) // scale
        return (net["in_channels"], side, side), 77 + teacher.get("max_sequence_length", 256)  # CLIP + T5 tokens
    if family in ("sdxl", "sd"):
        net = components["unet"]["config"]
        side = (teacher.get("resolution") or net["sample_size"] * scale) // scale
        return (net["in_channels"], side, side), 77
    net = components["transformer"]["config"]
    frames = teacher.get("num_frames") or net["sample_frames"]
    height = teacher.get("height") or net["sample_height"] * scale
    width = teacher.get("width") or net["sample_width"] * scale
    latent_frames = (frames - 1) // vae["temporal_compression_ratio"] + 1
    return (latent_frames, net["in_channels"], height // scale, width // scale), \
        teacher.get("max_sequence_length") or net["max_text_seq_length"]


def _pixel_options(pixel: dict) -> dict:
    init = pixel["init_args"]
    backbone = init["backbone"]["init_args"]
    return {"layers": list(init.get("layers", (-1,))), "head_channels": init.get("head_channels", 256),
            "dtype": backbone.get("dtype", "float32"), "sam_checkpointing": backbone.get("checkpointing", False),
            "decode_checkpointing": init.get("decode_checkpointing", False), "decode_batch": init.get("decode_batch")}


def shipped_configs() -> list[str]:
    return [f"{family}/{p.name}" for family in CONFIG_FAMILIES for p in sorted((ROOT / "configs" / family).glob("*.yaml"))]


# ------------------------------------------------------------------------------ networks
class Networks:
    """The teacher's denoiser of one run on meta: the plain network (the real score; in full mode
    also each trainable copy, which has the same shape) and, for LoRA mode, the network with the
    ``student`` and ``fake`` adapters injected as ``Teacher.setup_roles`` does, adapters in bf16
    (what bf16-mixed autocast computes them in; their fp32 storage is counted apart).

    A teacher of several experts (the components of role ``denoiser``: Wan 2.2 A14B's ``transformer``
    and ``transformer_2``, one architecture) is built as ONE expert: each sample runs one expert, so
    a pass's FLOPs and activations per sample are one expert's; ``experts`` multiplies what every
    expert holds (frozen weights, adapters, full copies: :meth:`params`, :meth:`role_params`)."""

    def __init__(self, run: Run, mode: str, rank: int) -> None:
        specs = [s for s in architecture(run.architecture)["components"].values() if s["role"] == "denoiser"]
        spec = specs[0]
        if any(s["class"] != spec["class"] or _shape_config(s) != _shape_config(spec) for s in specs):
            raise ValueError(f"{run.architecture}: the denoiser experts differ in architecture; the plan counts "
                             "one expert's passes")
        self.experts = len(specs)
        #: what a pass's counts depend on besides its shapes: the experts of Wan 2.1 14B and 2.2 A14B share them
        self.denoiser = (run.family, spec["class"], json.dumps(_shape_config(spec), sort_keys=True))
        self.family, self.mode, self.rank = run.family, mode, rank
        self.plain = build(spec, DTYPES[run.dtype]).requires_grad_(False).eval()
        self.role_net = self._with_adapters(spec, run) if mode == "lora" else self.plain
        self.stub = SimpleNamespace(patch_size=getattr(self.plain.config, "patch_size", None), _rotary_cache={})

    def _with_adapters(self, spec: dict, run: Run):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        net = build(spec, DTYPES[run.dtype]).requires_grad_(False).eval()
        targets = list(teacher_class(run.family).default_lora_targets)
        config = LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=targets)
        for role in ("student", "fake"):
            inject_adapter_in_model(config, net, adapter_name=role)
        net.to(DTYPES[run.dtype]).requires_grad_(False)
        # peft's own adapter switch (dmdx's RoleLoraLinear asks autocast about the device, which meta
        # has not): the student and the fake score cost the same, so the student's is measured
        for layer in net.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.set_adapter("student")
        return net

    def net(self, role: str) -> nn.Module:
        return self.plain if role == "real" else self.role_net

    def params(self) -> int:
        """The frozen denoiser's parameters, every expert."""
        return self.experts * count(self.plain)

    def role_params(self) -> int:
        """One trainable role's parameters, every expert (LoRA: its adapter on each; full: a copy of each)."""
        return self.experts * sum(p.numel() for p in self.trainable("student"))

    def trainable(self, role: str) -> list[nn.Parameter]:
        if role == "real":
            return []
        if self.mode == "lora":
            return [p for n, p in self.role_net.named_parameters() if ".student." in n]
        return list(self.plain.parameters())

    def feature_blocks(self, net: nn.Module) -> list[nn.Module]:
        return list(teacher_class(self.family).feature_blocks(self.stub, net))

    def block_to_map(self, output, x: torch.Tensor) -> torch.Tensor:
        return teacher_class(self.family).block_to_map(self.stub, output, x)

    def forward(self, net: nn.Module, x: torch.Tensor, text_tokens: int) -> torch.Tensor:
        """One denoiser call as the family's ``model_output`` makes it (bf16 inputs)."""
        b, dtype, cfg = x.shape[0], x.dtype, net.config
        t = torch.full((b,), 500.0, device="meta")
        if self.family == "flux":  # packed 2x2 patches with their position ids, as FluxTeacher.model_output
            from dmdx_lightning.teachers.flux import pack_latents, unpack_latents

            h, w = x.shape[-2:]
            guidance = torch.full((b,), 3.5, device="meta") if cfg.guidance_embeds else None
            out = net(hidden_states=pack_latents(x), timestep=t / 1000, guidance=guidance,
                      encoder_hidden_states=_meta(b, text_tokens, cfg.joint_attention_dim, dtype=dtype),
                      pooled_projections=_meta(b, cfg.pooled_projection_dim, dtype=dtype),
                      txt_ids=_meta(text_tokens, 3, dtype=dtype), img_ids=_meta(h * w // 4, 3, dtype=dtype),
                      return_dict=False)[0]
            return unpack_latents(out, h, w)
        if self.family == "sd3":
            return net(hidden_states=x, timestep=t,
                       encoder_hidden_states=_meta(b, text_tokens, cfg.joint_attention_dim, dtype=dtype),
                       pooled_projections=_meta(b, cfg.pooled_projection_dim, dtype=dtype), return_dict=False)[0]
        if self.family == "sdxl":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            return net(x, t, encoder_hidden_states=_meta(b, text_tokens, cfg.cross_attention_dim, dtype=dtype),
                       added_cond_kwargs={"text_embeds": _meta(b, pooled, dtype=dtype),
                                          "time_ids": _meta(b, 6, dtype=dtype)}, return_dict=False)[0]
        if self.family == "sd":  # no added conditioning
            return net(x, t, encoder_hidden_states=_meta(b, text_tokens, cfg.cross_attention_dim, dtype=dtype),
                       return_dict=False)[0]
        if self.family == "wan":  # as WanTeacher.model_output (its own rotary embedding inside)
            return net(hidden_states=x, timestep=t, encoder_hidden_states=_meta(b, text_tokens, cfg.text_dim, dtype=dtype),
                       return_dict=False)[0]
        rotary = teacher_class("cogvideox").rotary_embeddings(self.stub, net, x)
        return net(hidden_states=x, encoder_hidden_states=_meta(b, text_tokens, cfg.text_embed_dim, dtype=dtype),
                   timestep=t, image_rotary_emb=rotary, return_dict=False)[0]

    def units(self) -> dict[str, int]:
        """FSDP2's largest unit (``DistillationModule.sharding_units``: each feature block, then the
        network's remaining parameters, of every expert together) and the adapter parameters of one
        role in it."""
        net = self.role_net
        blocks = self.feature_blocks(net)
        inside = {id(p) for b in blocks for p in b.parameters()}
        sizes = [(count(b), sum(p.numel() for n, p in b.named_parameters() if ".student." in n)) for b in blocks]
        rest = [p for p in net.parameters() if id(p) not in inside]
        sizes.append((self.experts * sum(p.numel() for p in rest), 0))
        params, adapters = max(sizes)
        return {"params": params, "role_adapter_params": adapters}


def _shape_config(spec: dict) -> dict:
    """A component's config without the keys that change no shape (``_diffusers_version``, ...)."""
    return {k: v for k, v in spec["config"].items() if not k.startswith("_")}


def _meta(*shape, dtype=torch.bfloat16, requires_grad=False) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=requires_grad)


class _Stop(Exception):
    """Raised after the deepest feature block a discriminator reads (``Teacher.feature_maps`` stops there)."""


# ------------------------------------------------------------------------------ one pass, counted
@dataclass
class PassCost:
    """One denoiser pass of one sample, counted on meta."""

    flops: float        # forward (+ backward, + checkpointing's recomputation)
    saved: int          # bytes kept for backward after the forward, as run (checkpointed where the role is)
    saved_plain: int    # the same without checkpointing
    transient: int      # the largest checkpointed unit's own bytes (recomputed during backward), or a
    #                     no-grad pass's peak working bytes
    maps: list = field(default_factory=list)  # feature-map shapes at the discriminator's layers


@contextmanager
def _grads(nets: Networks, role: str, grad: str):
    """``grad == "train"``: the role's trainable parameters require grad (LoRA: the active adapter;
    full: every weight of its copy), as when its player steps; otherwise none does."""
    trainable = nets.trainable(role)
    for p in trainable:
        p.requires_grad_(grad == "train")
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(False)


def measure_pass(nets: Networks, role: str, grad: str, checkpointing: bool, latent: tuple, text_tokens: int,
                 layers: tuple | None = None) -> PassCost:
    """Count one pass: ``grad`` is ``none`` (no graph), ``input`` (frozen weights, backward to the
    input) or ``train`` (backward into the role's trainable weights); ``layers``: stop after the
    deepest of these feature blocks and return their maps (a discriminator's backbone pass)."""
    net = nets.net(role)
    with _grads(nets, role, grad):
        plain = _count_pass(nets, net, grad, False, latent, text_tokens, layers)
        if grad == "none":
            return plain
        if not checkpointing:  # nothing is recomputed in backward
            return PassCost(plain.flops, plain.saved, plain.saved, 0, plain.maps)
        ckpt = _count_pass(nets, net, grad, True, latent, text_tokens, layers)
    return PassCost(ckpt.flops, ckpt.saved, plain.saved, plain.transient, plain.maps)


def _count_pass(nets: Networks, net: nn.Module, grad: str, checkpointing: bool, latent: tuple, text_tokens: int,
                layers: tuple | None) -> PassCost:
    if checkpointing:
        net.enable_gradient_checkpointing()
    else:
        net.disable_gradient_checkpointing()
    resident = {p.untyped_storage()._cdata for p in [*net.parameters(), *net.buffers()]}
    saved, live = SavedBytes(resident), WorkingBytes(resident)
    x = _meta(1, *latent, dtype=nets.plain.dtype, requires_grad=grad == "input")
    blocks = nets.feature_blocks(net)
    wanted = sorted({i % len(blocks) for i in layers}) if layers else []
    maps: dict[int, torch.Tensor] = {}
    unit_bytes = [0]

    def capture(i):
        def hook(_module, _inputs, output):
            maps.setdefault(i, nets.block_to_map(output, x))
            if len(maps) == len(wanted):
                raise _Stop
        return hook

    def unit_start(module, _inputs):
        module._scale_plan_start = saved.total

    def unit_end(module, _inputs, _output):
        unit_bytes[0] = max(unit_bytes[0], saved.total - module._scale_plan_start)

    units = [m for m in net.modules() if type(m).__name__ in CHECKPOINT_UNITS]
    handles = [blocks[i].register_forward_hook(capture(i)) for i in wanted]
    handles += [m.register_forward_pre_hook(unit_start) for m in units] + [m.register_forward_hook(unit_end) for m in units]
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as flops, fused_attention_on_meta():
            with saved.hooks(), torch.set_grad_enabled(grad != "none"), (live if grad == "none" else _nothing()):
                try:
                    out = [nets.forward(net, x, text_tokens)]
                except _Stop:
                    out = [maps[i] for i in wanted]
            if grad != "none":
                sum(o.float().sum() for o in out).backward()
    finally:
        for h in handles:
            h.remove()
    transient = live.peak if grad == "none" else unit_bytes[0]
    return PassCost(flops.get_total_flops(), saved.total, saved.total, transient,
                    [tuple(maps[i % len(blocks)].shape) for i in layers] if layers else [])


@contextmanager
def _nothing():
    yield


class WorkingBytes(LiveBytes):
    """pixel_memory's live-storage counter, leaving out the storages of ``exclude`` (parameters and
    buffers: ``aten.t`` of a weight is a view of the weight's own, resident storage)."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in self.live and s._cdata not in self.exclude:
                    self.live[s._cdata] = (s.nbytes(), weakref.ref(s, lambda _, key=s._cdata: self._freed(key)))
                    self.current += s.nbytes()
                    self.peak = max(self.peak, self.current)
        return out


# ------------------------------------------------------------------------------ what an iteration runs
@dataclass(frozen=True)
class Pass:
    """A kind of denoiser pass an iteration makes, and how often."""

    player: str          # whose memory it lives in: generator (with the student sample it trains), fake_score,
    #                      discriminator
    role: str            # student | fake | real
    grad: str            # none | input | train
    samples: float       # samples per call, in units of the config's batch (2: CFG or a real/fake pair)
    calls: float         # expected calls per iteration
    features: bool       # stopped after the deepest discriminator layer


def passes(run: Run) -> list[Pass]:
    """The denoiser passes of one iteration (modelled from dmdx_lightning/methods/*.py).

    - ``DistillationModule.generate``: the student's backward simulation, ``k`` uniform in
      ``[first_trained_step, steps)`` no-grad student passes, then its prediction (with grad when
      the generator steps, every ``update_ratio``-th iteration);
    - ADM: generator = fake-score ODE move (backward to ``x_t``, the fake score's weights toggled
      off) + the real score's features under the discriminator (paired: also the real move with
      CFG, and both moves scored in one pass) + the DMD diagnostic (a real CFG pass, 1 in 10);
      fake score = its denoising loss; discriminator = no-grad real (CFG) and fake moves + one
      no-grad backbone pass for both moves;
    - DMD: generator = no-grad real (CFG) and fake predictions; DMD2 adds the GAN head on the fake
      score's features (backward to the input) and a discriminator step on real / fake latents;
    - ADP: the student's prediction at a pair interpolant (no simulation), the real score's
      features under the latent discriminator; the pixel path is counted apart.
    """
    cfg = 2.0 if run.real_cfg != 1.0 and run.true_cfg else 1.0
    if run.method == "adp":
        return [Pass("generator", "student", "train", 1, 1, False),
                Pass("generator", "real", "input", 1, 1, True),
                Pass("discriminator", "real", "none", 2, 1, True)]
    g = 1.0 / run.update_ratio
    steps = run.student_steps
    simulated = (run.first_trained_step + steps - 1) / 2 if steps > 1 else 0.0
    out = [Pass("generator", "student", "none", 1, simulated, False),
           Pass("generator", "student", "train", 1, g, False),
           Pass("generator", "student", "none", 1, 1 - g, False),
           Pass("fake_score", "fake", "train", 1, 1, False)]
    if run.method == "adm":
        out.append(Pass("generator", "fake", "input", 1, g, False))
        if run.paired:
            out += [Pass("generator", "real", "input", cfg, g, False), Pass("generator", "real", "input", 2, g, True)]
        else:
            out.append(Pass("generator", "real", "input", 1, g, True))
            if run.diagnostic:
                out.append(Pass("generator", "real", "none", cfg, 1 / DIAGNOSTIC_EVERY, False))
        out += [Pass("discriminator", "real", "none", cfg, 1, False), Pass("discriminator", "fake", "none", 1, 1, False),
                Pass("discriminator", "real", "none", 2, 1, True)]
    else:  # dmd, dmd2
        out += [Pass("generator", "real", "none", cfg, g, False), Pass("generator", "fake", "none", 1, g, False)]
        if run.method == "dmd2":
            out += [Pass("generator", "fake", "input", 1, g, True), Pass("discriminator", "fake", "none", 2, 1, True)]
    return [p for p in out if p.calls > 0]


def head_uses(run: Run) -> dict[str, float]:
    """Samples the latent heads score with gradient, per player (in units of the batch)."""
    if run.method == "dmd" or run.layers is None:
        return {}
    generator = 2.0 if run.paired else 1.0
    return {"generator": generator, "discriminator": 2.0}


# ------------------------------------------------------------------------------ counting a run
class Counter:
    """Counts on meta with caches: a pass kind, the heads or the pixel path is counted once per shape."""

    def __init__(self) -> None:
        self.networks: dict = {}
        self.costs: dict = {}
        self.heads: dict = {}
        self.pixels: dict = {}
        self.encoders: dict = {}
        self.seconds = 0.0

    def nets(self, run: Run, mode: str, rank: int) -> Networks:
        key = (run.architecture, run.dtype, mode, rank if mode == "lora" else None)
        if key not in self.networks:
            self.networks[key] = Networks(run, mode, rank)
        return self.networks[key]

    def cost(self, run: Run, nets: Networks, role: str, grad: str, features: bool) -> PassCost:
        # the frozen real score is not checkpointed (``RoleCheckpointing``), unless LoRA mode's checkpoint_frozen
        checkpointing = run.checkpointing and grad != "none" and (
            role != "real" or (nets.mode == "lora" and run.checkpoint_frozen))
        layers = run.layers if features else None
        # the real score and a full-mode copy are the same network: one count serves both
        network = "plain" if nets.net(role) is nets.plain else ("lora", nets.rank)
        key = (nets.denoiser, run.dtype, network, grad, checkpointing, run.latent, run.text_tokens, layers)
        if key not in self.costs:
            started = time.perf_counter()
            self.costs[key] = measure_pass(nets, role, grad, checkpointing, run.latent, run.text_tokens, layers)
            self.seconds += time.perf_counter() - started
        return self.costs[key]

    def head_cost(self, run: Run, nets: Networks) -> dict:
        """The latent discriminator's heads (fp32, as built): parameters, FLOPs and saved bytes of
        one sample's forward + backward."""
        maps = self.cost(run, nets, run.backbone_role, "none", True).maps
        key = (tuple(maps), run.head_channels, run.num_down, run.family)
        if key not in self.heads:
            from dmdx_lightning.discriminators.heads import head_for

            cond = pooled_dim(run)
            with torch.device("meta"):
                heads = nn.ModuleList(head_for(torch.empty(m), cond, run.head_channels, run.num_down) for m in maps)
            resident = {p.untyped_storage()._cdata for p in heads.parameters()}
            saved = SavedBytes(resident)
            with FlopCounterMode(display=False) as flops:
                with saved.hooks():
                    t, pooled = _meta(1, dtype=torch.float32), _meta(1, cond, dtype=torch.float32)
                    logits = sum(h(_meta(*m, requires_grad=True), t, pooled).sum() for h, m in zip(heads, maps))
                logits.backward()
            self.heads[key] = {"params": count(heads), "flops": flops.get_total_flops(), "saved": saved.total}
        return self.heads[key]

    def pixel_cost(self, run: Run) -> dict:
        """ADP's pixel discriminator at the config's batch: SAM and heads' parameters, the generator
        term's saved bytes, live peak and FLOPs (forward, backward, recomputation), and the
        discriminator term's FLOPs (two no-grad decodes and backbone passes, heads trained)."""
        key = (run.architecture, run.batch, json.dumps(run.pixel, sort_keys=True))
        if key not in self.pixels:
            from transformers import SamVisionConfig

            from benchmarks.pixel_memory import build as build_pixel
            from benchmarks.pixel_memory import measure

            vae = {k: v for k, v in architecture(run.architecture)["components"]["vae"]["config"].items()
                   if not k.startswith("_")}
            sam = SamVisionConfig(**architecture("sam_vit_base")["components"]["vision_encoder"]["config"])
            p = run.pixel
            teacher, disc = build_pixel(run.family, vae, sam, run.latent[-1], pooled_dim(run), "meta", DTYPES[p["dtype"]],
                                        {k: p[k] for k in ("decode_checkpointing", "decode_batch")},
                                        {"checkpointing": p["sam_checkpointing"]}, p["layers"], p["head_channels"])
            memory = measure(teacher, disc, run.batch)
            x0 = _meta(run.batch, *run.latent, dtype=torch.float32, requires_grad=True)
            cond = teacher.encode_prompts(["a prompt"] * run.batch)
            generator, discriminator = (FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) for _ in "gd")
            with generator, fused_attention_on_meta():
                disc(teacher, x0, cond).mean().backward()
            with discriminator, fused_attention_on_meta():
                with torch.no_grad():
                    images = [disc.decode(teacher, x0.detach()) for _ in range(2)]
                sum(disc.score_images(i, cond.pooled).sum() for i in images).backward()
            self.pixels[key] = {"head_params": count(disc.heads), "sam_params": count(disc.backbone),
                                "sam_bytes_per_param": DTYPES[p["dtype"]].itemsize,
                                "saved": memory["saved_bytes"], "peak": memory["peak_live_bytes"],
                                "generator_flops": generator.get_total_flops(),
                                "discriminator_flops": discriminator.get_total_flops()}
        return self.pixels[key]

    def encoder_params(self, run: Run) -> dict[str, int]:
        """Text encoders and VAE (frozen, in the teacher's dtype): parameters per component."""
        if run.architecture not in self.encoders:
            components = architecture(run.architecture)["components"]
            self.encoders[run.architecture] = {k: count(build(s)) for k, s in components.items() if s["role"] != "denoiser"}
        params = dict(self.encoders[run.architecture])
        if run.drop_t5:
            params.pop("text_encoder_3", None)
        return params


def pooled_dim(run: Run) -> int:
    """The pooled prompt vector the heads are conditioned on (each family's ``encode_prompts``)."""
    components = architecture(run.architecture)["components"]
    if run.family == "sd3":  # both CLIPs' projections
        return sum(components[k]["config"]["projection_dim"] for k in ("text_encoder", "text_encoder_2"))
    if run.family == "sdxl":
        return components["text_encoder_2"]["config"]["projection_dim"]
    if run.family == "flux":  # CLIP-L's pooled output
        return components["text_encoder"]["config"]["hidden_size"]
    if run.family == "sd":  # the CLIP's pooled output (end-of-text token), unprojected
        return components["text_encoder"]["config"]["hidden_size"]
    return components["text_encoder"]["config"]["d_model"]  # CogVideoX: the mean T5 token


# ------------------------------------------------------------------------------ per run and mode
def work(run: Run, mode: str, counter: Counter) -> dict:
    """Everything of one (run, mode) that no strategy changes: parameters per role and player, FLOPs
    per iteration, activations per player (with and without checkpointing), the passes' gathers."""
    nets = counter.nets(run, mode, run.lora_rank)
    # every expert's weights (a two-expert teacher: frozen, adapters, full copies of both), but one
    # expert's FLOPs and activations per sample below: each sample runs one expert
    denoiser = nets.params()
    role = nets.role_params() if mode == "lora" else denoiser
    heads = counter.head_cost(run, nets) if head_uses(run) else None
    pixel = counter.pixel_cost(run) if run.pixel else None
    b = run.batch
    flops = 0.0
    # per player: bytes kept for backward with / without checkpointing, and the largest transient
    # (a checkpointed unit's recomputation, a no-grad pass's working set) with / without
    kept = {player: {"saved": 0.0, "saved_no_ckpt": 0.0, "transient": 0.0, "transient_no_ckpt": 0.0}
            for player in ("generator", "fake_score", "discriminator")}
    gathers = []
    full_depth = counter.cost(run, nets, "real", "none", False).flops
    for p in passes(run):
        cost = counter.cost(run, nets, p.role, p.grad, p.features)
        samples = p.samples * b
        flops += p.calls * samples * cost.flops
        k = kept[p.player]
        if p.grad == "none":
            k["transient"] = max(k["transient"], samples * cost.transient)
            k["transient_no_ckpt"] = max(k["transient_no_ckpt"], samples * cost.transient)
        else:
            k["saved"] += samples * cost.saved
            k["saved_no_ckpt"] += samples * cost.saved_plain
            k["transient"] = max(k["transient"], samples * cost.transient)
        # the share of the network's parameters the pass reaches (FSDP2 gathers only those blocks)
        share = counter.cost(run, nets, "real", "none", True).flops / full_depth if p.features else 1.0
        gathers.append({"calls": p.calls, "grad": p.grad != "none", "train": p.grad == "train", "share": share})
    for player, samples in head_uses(run).items():
        calls = 1.0 / run.update_ratio if player == "generator" else 1.0
        flops += calls * samples * b * heads["flops"]
        for key in ("saved", "saved_no_ckpt"):
            kept[player][key] += samples * b * heads["saved"]
    if pixel:  # as configured (checkpointed) in both columns: only the denoisers' checkpointing is switched
        flops += pixel["generator_flops"] + pixel["discriminator_flops"]
        for key in ("saved", "saved_no_ckpt"):
            kept["generator"][key] += pixel["saved"]
        for key in ("transient", "transient_no_ckpt"):
            kept["generator"][key] = max(kept["generator"][key], pixel["peak"] - pixel["saved"])
    head_params = heads["params"] if heads else 0
    pixel_heads = pixel["head_params"] if pixel else 0
    # what each player's optimizer owns (ADP has no fake-score player; its fake role still exists)
    players = {"generator": role, "fake_score": 0 if run.method == "adp" else role,
               "discriminator": head_params + pixel_heads}
    return {"denoiser_params": denoiser, "role_params": role, "encoder_params": counter.encoder_params(run),
            "head_params": head_params, "pixel_head_params": pixel_heads, "pixel": pixel, "players": players,
            "sam_params": pixel["sam_params"] if pixel else 0, "flops": flops, "activations": kept,
            "gathers": gathers, "unit": nets.units()}


def roles_row(run: Run, mode: str, w: dict) -> dict:
    """Per role, counted: the real score is the frozen network; LoRA: student / fake score = its two
    adapters on that same network; full: two trainable copies."""
    return {"config": run.config, "mode": mode, "real_score": w["denoiser_params"], "student": w["role_params"],
            "fake_score": w["role_params"], "latent_heads": w["head_params"], "pixel_heads": w["pixel_head_params"],
            "sam_frozen": w["sam_params"], "text_encoders_and_vae": sum(w["encoder_params"].values()),
            "lora_rank": run.lora_rank if mode == "lora" else None}


# ------------------------------------------------------------------------------ memory and time per strategy
def shard_size(strategy: str, gpus: int) -> int:
    """GPUs a sharded parameter is split over: FSDP2 all, HSDP those of one node, DDP (and the GPU
    check's single device) none."""
    if strategy == "FSDP2":
        return gpus
    return min(gpus, NODE) if strategy == "HSDP" else 1


def trainable_bytes(run: Run, mode: str, strategy: str) -> int:
    """Bytes per trainable denoiser parameter. LoRA adapters: fp32 (``Teacher.setup_roles``; the GPU
    check's were bf16). Full copies: the config's ``trainable_dtype``, fp32 where it sets none (the
    shipped full configs' master weights). FSDP2 / HSDP cast every trainable parameter to their
    ``master_dtype``, fp32."""
    if strategy in ("FSDP2", "HSDP"):
        return 4
    return DTYPES[run.adapter_dtype if mode == "lora" else run.trainable_dtype or "float32"].itemsize


def memory(run: Run, mode: str, strategy: str, gpus: int, w: dict, checkpointing: bool = True) -> dict:
    """Bytes per GPU, modelled from the counted parts (``strategy``: DDP, FSDP2, HSDP, or ``single``:
    one device without DDP, the GPU check's setting).

    total = parameters + AdamW states + DDP buckets + autocast's weight copies
            + max(activations + one player's gradients + FSDP2's gathered units,
                  one player's gradients + AdamW's temporaries of the same size)
    (a player's activations are freed by its backward before its optimizer step, and its gradients
    before the next player starts: ``set_to_none``).
    """
    s = shard_size(strategy, gpus)
    sharded = strategy in ("FSDP2", "HSDP")
    frozen = DTYPES[run.dtype].itemsize
    trained = trainable_bytes(run, mode, strategy)
    encoders = (run.tiny_encoders_bytes if run.tiny_encoders_bytes is not None
                else sum(w["encoder_params"].values()) * frozen)
    sam = w["sam_params"] * (w["pixel"]["sam_bytes_per_param"] if w["pixel"] else 0)
    # sharded: the teacher networks (frozen real score, both roles) and the latent heads; whole on
    # every rank: text encoders, VAE, SAM and ADP's pixel heads (not among sharding_units)
    sharded_params = (w["denoiser_params"] * frozen + 2 * w["role_params"] * trained + w["head_params"] * 4) / s
    whole_params = encoders + sam + w["pixel_head_params"] * 4
    params = sharded_params + whole_params
    player_bytes = {"generator": w["players"]["generator"] * trained, "fake_score": w["players"]["fake_score"] * trained,
                    "discriminator_latent": w["head_params"] * 4}
    optimizer = 2 * sum(player_bytes.values()) / s + 2 * w["pixel_head_params"] * 4
    grads = max(player_bytes["generator"] / s, player_bytes["fake_score"] / s,
                player_bytes["discriminator_latent"] / s + w["pixel_head_params"] * 4)
    # DDP's reducer holds a bucket slot for every parameter that requires grad (both roles, heads)
    buckets = (2 * w["role_params"] * trained + (w["head_params"] + w["pixel_head_params"]) * 4) if strategy == "DDP" else 0
    # torch.autocast keeps a bf16 copy of every fp32 trainable weight it casts until the training step
    # ends; FSDP2 / HSDP gather in bf16, so nothing is cast there
    autocast = 2 * (2 * w["role_params"] if trained == 4 else 0) if not sharded else 0
    unit = w["unit"]
    unit_trainable = unit["params"] if mode == "full" else unit["role_adapter_params"]
    gathered = 2 * unit["params"] * 2 + unit_trainable * 6 if sharded else 0  # two bf16 blocks + a block's bf16 / fp32 grads
    suffix = "" if checkpointing else "_no_ckpt"
    activations = max(a["saved" + suffix] + a["transient" + suffix] for a in w["activations"].values())
    total = params + optimizer + buckets + autocast + max(activations + grads + gathered, 2 * grads)
    return {"params": params, "sharded_params": sharded_params, "whole_params": whole_params,
            "grads_optimizer": optimizer + grads + buckets, "activations": activations,
            "optimizer": optimizer, "grads": grads, "ddp_buckets": buckets, "autocast_copies": autocast,
            "fsdp_gathered": gathered, "total": total}


def communication(run: Run, mode: str, strategy: str, gpus: int, w: dict) -> dict:
    """Bytes each GPU moves per iteration, and the seconds at the modelled bandwidths (ring
    collectives move (n - 1) / n of the data per GPU; NVLink within a node, InfiniBand across).

    DDP: an all-reduce (2x) of each stepping player's gradients. FSDP2 / HSDP: every pass through the
    sharded networks all-gathers what it reaches in bf16 (again in backward: ``reshard_after_forward``),
    a trainable pass reduce-scatters its fp32 gradients; HSDP then all-reduces the sharded gradients
    across the replicas (nodes) over InfiniBand.
    """
    if gpus == 1:
        return {"bytes": 0.0, "seconds": 0.0}
    trained = trainable_bytes(run, mode, strategy)
    generator_share = 1.0 if run.method == "adp" else 1.0 / run.update_ratio
    grad_bytes = (generator_share * w["players"]["generator"] * trained + w["players"]["fake_score"] * trained
                  + w["players"]["discriminator"] * 4)
    if strategy == "DDP":
        moved = 2 * (gpus - 1) / gpus * grad_bytes
        return {"bytes": moved, "seconds": moved / (NVLINK_BYTES_PER_S if gpus <= NODE else IB_BYTES_PER_S)}
    s = shard_size(strategy, gpus)
    network = 2 * (w["denoiser_params"] + (2 * w["role_params"] if mode == "lora" else 0))  # what one pass gathers, bf16
    gathered = sum(g["calls"] * (2 if g["grad"] else 1) * g["share"] * network for g in w["gathers"])
    reduced = sum(g["calls"] * g["share"] * w["role_params"] * 4 for g in w["gathers"] if g["train"])
    within = (s - 1) / s * (gathered + reduced)
    seconds = within / (NVLINK_BYTES_PER_S if s <= NODE else IB_BYTES_PER_S)
    replicas = gpus // s
    across = 2 * (replicas - 1) / replicas * grad_bytes / s if replicas > 1 else 0.0
    return {"bytes": within + across, "seconds": seconds + across / IB_BYTES_PER_S}


def seconds(flops: float, utilisation: float) -> float:
    return flops / (PEAK_FLOPS * utilisation)


# ------------------------------------------------------------------------------ the GPU check
def check_run() -> Run:
    """The setting of sd3_gpu_check.md: SD3-Medium at 1024 px (128x128 latents), batch 1, ADM with
    a 4-step student, CFG 7, heads on blocks 5/11/17/23, checkpointing, one device (no DDP); its
    LoRA adapters (rank 64) and full copies were bf16; LoRA mode then also checkpointed the frozen
    real score's passes (what ``checkpoint_frozen: true`` does since); its text length 77 CLIP + 77
    T5 tokens (``max_sequence_length=77``); its tiny text encoders and VAE are taken from the
    measurement (resident teacher minus role bytes); no DMD diagnostic in its timed iterations."""
    base = read_config("sd3/adm_4step.yaml")
    return Run(**{**asdict(base), "config": "sd3_gpu_check", "batch": 1, "text_tokens": 154, "diagnostic": False,
                  "trainable_dtype": "bfloat16", "adapter_dtype": "bfloat16", "checkpoint_frozen": True})


def compare_with_check(counter: Counter) -> dict | None:
    if not CHECK.is_file():
        return None
    measured = json.loads(CHECK.read_text())
    rows = {}
    for mode in MODES:
        m = measured[f"sd3_medium_size_{mode}"]
        run = check_run()
        run.tiny_encoders_bytes = (m["resident_teacher_bytes_gib"] - m["role_param_bytes_gib"]) * GIB
        w = work(run, mode, counter)
        mem = memory(run, mode, "single", 1, w)
        role_bytes = w["denoiser_params"] * 2 + 2 * w["role_params"] * trainable_bytes(run, mode, "single")
        implied = w["flops"] / (m["seconds_per_iteration"] * PEAK_FLOPS)
        rows[mode] = {"predicted_peak": mem["total"], "measured_peak": m["peak_training_gib"] * GIB,
                      "predicted_role_bytes": role_bytes, "measured_role_bytes": m["role_param_bytes_gib"] * GIB,
                      "memory": mem, "tflop_per_iteration": w["flops"] / 1e12,
                      "predicted_seconds_at_default": seconds(w["flops"], UTILISATION),
                      "measured_seconds": m["seconds_per_iteration"], "implied_utilisation": implied}
    return {"device": measured["device"], "rows": rows}


# ------------------------------------------------------------------------------ the plan
def plan_rows(run: Run, counter: Counter, utilisation: dict[str, float]) -> tuple[list[dict], list[dict], list[dict]]:
    """Rows of the main table (strategy x GPUs x mode), of the roles table, of the work table.

    LoRA rows also carry the ``checkpoint_frozen: true`` variant (the frozen real score's passes
    checkpointed too: fewer activations, one more real-score forward per such pass)."""
    rows, roles, works = [], [], []
    for mode in MODES:
        w = work(run, mode, counter)
        frozen = None
        if mode == "lora" and run.checkpointing and not run.checkpoint_frozen:
            frozen = work(replace(run, checkpoint_frozen=True), mode, counter)
        roles.append(roles_row(run, mode, w))
        works.append({"config": run.config, "mode": mode, "tflop_per_iteration": w["flops"] / 1e12,
                      "activations_ckpt": memory(run, mode, "DDP", 1, w)["activations"],
                      "activations_no_ckpt": memory(run, mode, "DDP", 1, w, checkpointing=False)["activations"],
                      "activations_checkpoint_frozen": memory(run, mode, "DDP", 1, frozen)["activations"] if frozen else None,
                      "per_player": w["activations"], "passes": [asdict(p) for p in passes(run)]})
        for strategy in STRATEGIES:
            for gpus in GPU_COUNTS:
                mem = memory(run, mode, strategy, gpus, w)
                comm = communication(run, mode, strategy, gpus, w)
                row = {"config": run.config, "shipped_mode": run.mode, "mode": mode, "strategy": strategy, "gpus": gpus,
                       "memory": mem, "total_no_ckpt": memory(run, mode, strategy, gpus, w, checkpointing=False)["total"],
                       "tflop_per_iteration": w["flops"] / 1e12, "communication": comm,
                       **_outcome(run, mem, w, utilisation[mode], comm)}
                if frozen:
                    mem_frozen = memory(run, mode, strategy, gpus, frozen)
                    row["checkpoint_frozen"] = {"memory": mem_frozen, "tflop_per_iteration": frozen["flops"] / 1e12,
                                                **_outcome(run, mem_frozen, frozen, utilisation[mode], comm)}
                rows.append(row)
    return rows, roles, works


def _outcome(run: Run, mem: dict, w: dict, implied: float, comm: dict) -> dict:
    """Whether a memory plan fits each card, the largest batch per GPU that would (activations scale
    with the batch; the rest does not), and the seconds per iteration (compute and communication
    overlapping) at the stated and at the implied utilisation."""
    fixed, per_sample = mem["total"] - mem["activations"], mem["activations"] / run.batch
    compute = {"default": seconds(w["flops"], UTILISATION), "implied": seconds(w["flops"], implied)}
    return {"fits": {card: mem["total"] <= USABLE * capacity for card, capacity in CARDS.items()},
            "max_batch": {card: max(0, int((USABLE * capacity - fixed) // per_sample)) for card, capacity in CARDS.items()},
            "compute_seconds": compute, "seconds": {k: max(v, comm["seconds"]) for k, v in compute.items()}}


def inference_row(run: Run, counter: Counter) -> dict:
    """An ODE-pair config: no training, the teacher's sampler with CFG (one batch of pairs)."""
    nets = counter.nets(run, "lora", run.lora_rank)
    cost = counter.cost(run, nets, "real", "none", False)
    cfg = 2 if run.real_cfg != 1.0 and run.true_cfg else 1
    params = (nets.experts * count(nets.role_net) + sum(counter.encoder_params(run).values())) * DTYPES[run.dtype].itemsize
    flops = run.sample_steps * cfg * run.batch * cost.flops
    total = params + cfg * run.batch * cost.transient
    return {"config": run.config, "batch": run.batch, "steps": run.sample_steps, "cfg": run.real_cfg, "params": params,
            "transient": cfg * run.batch * cost.transient, "total": total,
            "fits": {card: total <= USABLE * capacity for card, capacity in CARDS.items()},
            "tflop_per_batch": flops / 1e12, "seconds_per_batch": seconds(flops, UTILISATION)}


def recommend(rows: list[dict], config: str, mode: str, variant: str | None = None) -> dict | None:
    """The plan for one config and mode: on the smaller card that fits, one node (8 GPUs, as the
    configs are written) if a strategy fits there, else 64 GPUs; the fastest fitting strategy
    (predicted at the stated utilisation; DDP, then FSDP2, on a tie). ``variant``: the rows'
    ``checkpoint_frozen`` outcome instead of the shipped one."""
    candidates = [(r, r[variant] if variant else r) for r in rows
                  if r["config"] == config and r["mode"] == mode and (variant is None or variant in r)]
    if not candidates:
        return None
    # where an H100 does not hold the config's batch per GPU, the largest batch it holds
    h100_batch = max(o["max_batch"]["H100"] for _, o in candidates)
    for card in CARDS:
        for gpus in (NODE, GPU_COUNTS[-1]):
            fitting = [(r, o) for r, o in candidates if r["gpus"] == gpus and o["fits"][card]]
            if fitting:
                r, o = min(fitting, key=lambda ro: (round(ro[1]["seconds"]["default"], 2),
                                                    STRATEGIES.index(ro[0]["strategy"])))
                return {"card": card, "strategy": r["strategy"], "gpus": gpus, "total_gib": o["memory"]["total"] / GIB,
                        "seconds": o["seconds"]["default"], "h100_max_batch": h100_batch,
                        "fits_one_gpu": any(x["gpus"] == 1 and y["fits"][card] for x, y in candidates)}
    return {"card": None, "h100_max_batch": h100_batch}


def run_plan(configs: list[str], check: bool = True) -> dict:
    started = time.perf_counter()
    counter = Counter()
    report = {"command": COMMAND, "machine": machine(torch.get_num_threads()), "assumptions": assumptions(),
              "parameters": parameter_table()}
    check = compare_with_check(counter) if check else None
    report["check"] = check
    utilisation = {m: check["rows"][m]["implied_utilisation"] if check else UTILISATION for m in MODES}
    report["implied_utilisation"] = utilisation
    rows, roles, works, inference = [], [], [], []
    for name in configs:
        run = read_config(name)
        if not run.trains:
            inference.append(inference_row(run, counter))
            print(f"{name}: inference only", flush=True)
            continue
        r, ro, wo = plan_rows(run, counter, utilisation)
        rows += r
        roles += ro
        works += wo
        print(f"{name}: " + ", ".join(f"{x['mode']} {x['tflop_per_iteration']:.0f} TFLOP/it" for x in wo), flush=True)
    report.update(rows=rows, roles=roles, work=works, inference=inference,
                  recommendations={f"{c}|{m}": {"shipped": recommend(rows, c, m),
                                                "checkpoint_frozen": recommend(rows, c, m, "checkpoint_frozen")}
                                   for c in dict.fromkeys(r["config"] for r in rows) for m in MODES},
                  counting_seconds=round(counter.seconds, 1), seconds=round(time.perf_counter() - started, 1))
    return report


def assumptions() -> dict:
    return {
        "peak_bf16_flops": PEAK_FLOPS, "utilisation": UTILISATION, "usable_share_of_card": USABLE,
        "cards_bytes": CARDS, "node_gpus": NODE, "nvlink_bytes_per_s": NVLINK_BYTES_PER_S,
        "infiniband_bytes_per_s": IB_BYTES_PER_S, "lora_rank_for_full_configs": LORA_RANK,
        "dmd_diagnostic_every": DIAGNOSTIC_EVERY,
        "full_mode_trainable_dtype": "the config's trainable_dtype, float32 where unset (FSDP2: master_dtype float32)",
        "optimizer": "AdamW, 2 states per trainable parameter in its dtype",
    }


# ------------------------------------------------------------------------------ report
def _g(x: float) -> str:
    return f"{x / GIB:.1f}"


def _yes(x: bool) -> str:
    return "yes" if x else "no"


def markdown(report: dict) -> str:
    u = report["implied_utilisation"]
    lines = [
        "# Scale plan: memory and time per GPU of the shipped GPU configs (predicted, not measured)", "",
        f"Command: `{report['command']}` ({report['machine']['date_utc']} UTC, torch {report['machine']['torch']}, "
        f"{report['seconds']:.0f} s on a CPU). Raw numbers: `scale_plan.json`. Architectures: "
        "`benchmarks/architectures/*.json` (the published config.json of each component), built on the `meta` device.", "",
        "**Counted on the meta device** (exact for the shapes and dtypes): parameters of every component, LoRA "
        "adapters (peft `inject_adapter_in_model` on the teacher's `default_lora_targets`) and discriminator heads "
        "(`head_for` on the probed feature maps); FLOPs of each kind of denoiser pass at the config's resolution / "
        "frames / text length (`FlopCounterMode`, forward, backward and checkpointing's recomputation); activations "
        "kept for backward per pass (`saved_tensors_hooks`, distinct storages), with and without checkpointing, and "
        "the largest checkpointed unit's bytes (held while it is recomputed in backward); ADP's pixel path "
        "(`pixel_memory.py`'s counters). **Modelled**: the passes per iteration of each method (counted per pass on "
        "meta + analytic pass count), how the parts add up per strategy, communication and time; the assumptions "
        "are listed at the end. Nothing here ran on a GPU; the one GPU measurement is compared below.", "",
    ]
    lines += _check_section(report)
    lines += ["## Recommended plan per config", "",
              f"Per config and mode: on an 80 GB H100 if any strategy fits in {USABLE:.0%} of it, else on a 141 GB H200; "
              "on one node (8 GPUs, as the configs are written) if a strategy fits there, else on 64; there the fastest "
              f"at {UTILISATION:.0%} utilisation (DDP, then FSDP2, on a tie). \"fits on 1\": one GPU holds it too. "
              "LoRA plans that need more also give the plan with the teacher option `checkpoint_frozen: true` (the "
              "frozen real score's passes checkpointed too).", "",
              markdown_table(["config", "shipped mode", "LoRA plan", "full plan"],
                             [[f"`{c}`", next(r["shipped_mode"] for r in report["rows"] if r["config"] == c)]
                              + [_plans_cell(report["recommendations"][f"{c}|{m}"]) for m in MODES]
                              for c in dict.fromkeys(r["config"] for r in report["rows"])]), ""]
    for family, title in (("sd3", "SD3-Medium and SD3.5-Large"), ("sdxl", "SDXL base"), ("sd15", "Stable Diffusion 1.5"), ("cogvideox", "CogVideoX"), ("flux", "FLUX.1-dev and FLUX.1-schnell"),
                          ("wan", "Wan 2.1 and 2.2 T2V")):
        rows = [r for r in report["rows"] if r["config"].startswith(family + "/")]
        if not rows:
            continue
        lines += [f"## {title}", "",
                  "Per GPU, GiB, activation checkpointing on (as shipped). `grads + optim.`: AdamW states, one player's "
                  "gradients and DDP's buckets; `total` adds transients (FSDP2's gathered blocks, autocast's bf16 "
                  "weight copies) and takes the larger of the backward and optimizer-step phases, so it is not the "
                  "plain sum. Left out as the same as a row shown (they are in the JSON): FSDP2 and HSDP on 1 GPU "
                  "(nothing to shard), HSDP on 8 (= FSDP2 on one node). "
                  f"s / it on H100 = H200 (same bf16 peak) at {UTILISATION:.0%} utilisation and at the GPU check's implied "
                  f"{u['lora']:.0%} (LoRA) / {u['full']:.0%} (full), with communication assumed to overlap compute.", "",
                  markdown_table(["config", "mode", "strategy", "GPUs", "params", "grads + optim.", "activations (ckpt)",
                                  "total", "fits 80 GB", "fits 141 GB", "TFLOP / it", "comm s / it",
                                  f"s / it @{UTILISATION:.0%}", "s / it @check"],
                                 [_main_row(r) for r in rows if _shown(r)]), ""]
    lines += _work_section(report) + _roles_section(report) + _inference_section(report) + _parameters_section(report)
    lines += _assumptions_section(report)
    return "\n".join(lines)


def plan_text(rec: dict) -> str:
    """One recommendation in words: ``33 GiB/GPU, DDP on 8 GPUs (fits on 1), 2.1 s/it``."""
    if rec["card"] is None:
        return f"fits neither card ({_h100_batch(rec)})"
    one = " (fits on 1)" if rec["fits_one_gpu"] else ""
    text = f"{rec['total_gib']:.0f} GiB/GPU, {rec['strategy']} on {rec['gpus']} GPUs{one}, {rec['seconds']:.1f} s/it"
    if rec["card"] == "H100":
        return text
    return f"{rec['card']} only: {text} ({_h100_batch(rec)})"


def _h100_batch(rec: dict) -> str:
    batch = rec["h100_max_batch"]
    return f"H100: batch <= {batch} per GPU" if batch else "H100: not even batch 1"


def _plans_cell(recs: dict) -> str:
    text = plan_text(recs["shipped"])
    shipped, frozen = recs["shipped"], recs["checkpoint_frozen"]
    where = ("card", "gpus", "strategy")
    if frozen and [shipped.get(k) for k in where] != [frozen.get(k) for k in where]:
        text += f"; with `checkpoint_frozen: true`: {plan_text(frozen)}"
    return text


def _shown(row: dict) -> bool:
    """One row per distinct setting: nothing is sharded on one GPU, and HSDP is FSDP2 within one node."""
    return row["strategy"] == "DDP" or (row["gpus"] > 1 and not (row["strategy"] == "HSDP" and row["gpus"] <= NODE))


def _main_row(r: dict) -> list:
    m = r["memory"]
    return [f"`{r['config'].split('/', 1)[1]}`", r["mode"], r["strategy"], r["gpus"], _g(m["params"]),
            _g(m["grads_optimizer"]), _g(m["activations"]), f"**{_g(m['total'])}**", _yes(r["fits"]["H100"]),
            _yes(r["fits"]["H200"]), f"{r['tflop_per_iteration']:.0f}", f"{r['communication']['seconds']:.2f}",
            f"{r['seconds']['default']:.2f}", f"{r['seconds']['implied']:.2f}"]


def _check_section(report: dict) -> list[str]:
    check = report["check"]
    if check is None:
        return []
    rows = []
    for mode, r in check["rows"].items():
        rows.append([mode, f"{r['predicted_role_bytes'] / GIB:.2f} / {r['measured_role_bytes'] / GIB:.2f}",
                     f"{r['predicted_peak'] / GIB:.2f} / {r['measured_peak'] / GIB:.2f}",
                     f"{(r['predicted_peak'] / r['measured_peak'] - 1):+.0%}", f"{r['tflop_per_iteration']:.0f}",
                     f"{r['predicted_seconds_at_default']:.2f} / {r['measured_seconds']:.2f}",
                     f"{r['implied_utilisation']:.1%}"])
    lora = check["rows"]["lora"]["memory"]
    return ["## Predicted vs measured: SD3-Medium on one H100 (sd3_gpu_check.md)", "",
            f"The setting of [sd3_gpu_check.md](sd3_gpu_check.md) ({check['device']}): SD3-Medium's transformer at "
            "128x128 latents, 77 + 77 text tokens, batch 1, ADM with a 4-step student, CFG 7, heads on blocks "
            "5/11/17/23, checkpointing, one device, LoRA rank 64 with **bf16** adapters (before the fp32 fix) and "
            "**bf16** full copies (AdamW states in bf16). At that date LoRA mode also checkpointed the frozen real "
            "score's passes (today `checkpoint_frozen: true`; the default now keeps their activations, as full "
            "mode), so the LoRA row is predicted with it. Its tiny text encoders and VAE are taken from the "
            "measurement (resident minus role bytes).", "",
            markdown_table(["mode", "role bytes GiB, predicted / measured", "peak GiB, predicted / measured",
                            "peak error", "TFLOP / it (counted)", f"s / it at {UTILISATION:.0%} / measured",
                            "utilisation the measurement implies"], rows), "",
            f"LoRA peak, predicted parts: parameters {_g(lora['params'])}, AdamW + gradients {_g(lora['grads_optimizer'])}, "
            f"activations {_g(lora['activations'])} GiB. The implied utilisation is low because one sample at "
            "1024 px keeps the GPU partly idle (kernel launches, role switches, the optimizer); larger batches and "
            "video shapes will do better, so the `@check` column is a pessimistic bound and the 35% column a "
            "middle guess.", ""]


def _work_section(report: dict) -> list[str]:
    rows = [[f"`{w['config']}`", w["mode"], f"{w['tflop_per_iteration']:.0f}", _g(w["activations_ckpt"]),
             _g(w["activations_no_ckpt"]),
             _g(w["activations_checkpoint_frozen"]) if w["activations_checkpoint_frozen"] is not None else "-",
             ", ".join(f"{p['calls']:g}x {p['role']} {p['grad']}{' (features)' if p['features'] else ''}"
                       f"{' x' + format(p['samples'], 'g') if p['samples'] != 1 else ''}" for p in w["passes"])]
            for w in report["work"]]
    return ["## Work per iteration (per GPU, any strategy)", "",
            "Activations: the player that keeps the most, GiB, counted on meta and summed over the passes it keeps "
            "for backward, plus the largest transient (a checkpointed unit's recomputation, a no-grad pass's working "
            "set); `checkpoint_frozen`: LoRA mode with the frozen real score's passes checkpointed too. "
            "Passes per iteration (modelled from the methods' code): calls x role, `none` = no grad, `input` = "
            "backward to the input only, `train` = backward into the role's weights, `x2` = twice the batch (CFG or "
            "a real / fake pair).", "",
            markdown_table(["config", "mode", "TFLOP / it", "activations (ckpt)", "activations (no ckpt)",
                            "activations (`checkpoint_frozen`)", "denoiser passes"],
                           rows), ""]


def _roles_section(report: dict) -> list[str]:
    rows = [[f"`{r['config']}`", r["mode"] + (f" r{r['lora_rank']}" if r["lora_rank"] else ""),
             f"{r['real_score'] / 1e9:.3f}B",
             f"{r['student'] / 1e6:.1f}M", f"{r['fake_score'] / 1e6:.1f}M", f"{r['latent_heads'] / 1e6:.1f}M",
             f"{r['pixel_heads'] / 1e6:.1f}M" + (f" (+ SAM {r['sam_frozen'] / 1e6:.1f}M frozen)" if r["sam_frozen"] else ""),
             f"{r['text_encoders_and_vae'] / 1e9:.2f}B"] for r in report["roles"]]
    return ["## Parameters per role (counted on meta)", "",
            "Real score: the frozen denoiser (both experts of Wan 2.2 A14B). Student and fake score: trainable "
            "parameters (LoRA: one adapter each on the same frozen network, every expert, injected by peft on the "
            "meta model; full: a copy each). Heads: the latent "
            "discriminator's (and ADP's pixel discriminator's), fp32. Text encoders and VAE: frozen, shared.", "",
            markdown_table(["config", "mode", "real score", "student", "fake score", "latent heads", "pixel heads",
                            "text encoders + VAE"], rows), ""]


def _inference_section(report: dict) -> list[str]:
    if not report["inference"]:
        return []
    rows = [[f"`{r['config']}`", r["batch"], f"{r['steps']} x CFG {r['cfg']:g}", _g(r["params"]), _g(r["transient"]),
             _g(r["total"]), _yes(r["fits"]["H100"]), f"{r['tflop_per_batch']:.0f}", f"{r['seconds_per_batch']:.1f}"]
            for r in report["inference"]]
    return ["## ODE-pair configs (inference only, per GPU, any number of GPUs)", "",
            markdown_table(["config", "batch", "teacher steps", "params GiB", "working GiB", "total GiB", "fits 80 GB",
                            "TFLOP / batch", f"s / batch @{UTILISATION:.0%}"], rows), ""]


def _parameters_section(report: dict) -> list[str]:
    rows = [[r["architecture"], f"`{r['source']}`", r["component"], r["class"].split(".")[-1],
             f"{r['params'] / 1e6:,.1f}M", f"{r['published'] / 1e6:,.0f}M" if r["published"] else "-",
             f"{(r['params'] / r['published'] - 1):+.1%}" if r["published"] else "-"] for r in report["parameters"]]
    return ["## Architectures: parameters counted on meta vs published", "",
            markdown_table(["architecture", "source", "component", "class", "counted", "published", "difference"], rows), ""]


def _assumptions_section(report: dict) -> list[str]:
    return ["## Assumptions (modelled)", "",
            "- **Passes**: see `passes()` in `benchmarks/scale_plan.py`, read from `dmdx_lightning/methods/`: the student's "
            "backward simulation runs on average `(steps - 1 + first_trained_step) / 2` no-grad student passes; CFG "
            "doubles the real score's batch; with TTUR the generator's passes count 1 / `update_ratio`; ADM's DMD "
            f"diagnostic adds a real CFG pass once per {DIAGNOSTIC_EVERY} iterations; the frozen real score is never "
            "checkpointed, the student and fake score are where the config sets `gradient_checkpointing`.",
            "- **Memory**: parameters in the config's `torch_dtype`; LoRA adapters fp32; full copies in `trainable_dtype`, "
            "fp32 where unset; AdamW: 2 states per trainable parameter in its dtype; gradients of one player at a time "
            "(freed with `set_to_none` before the next); a player's activations are gone before its optimizer step, "
            "whose foreach temporaries are modelled as one more copy of its gradients. Activations are counted in bf16 "
            "(what `bf16-mixed` computes in), one sample at a time and scaled by the batch.",
            "- **DDP** (`ddp_find_unused_parameters_true`, also on one GPU): everything whole on every GPU, plus the "
            "reducer's gradient buckets for every trainable parameter and autocast's bf16 copies of fp32 trainable "
            "weights (kept until the training step ends).",
            "- **FSDP2** (`configs/trainer/fsdp2.yaml`, `dmdx_lightning.strategies.FSDP2Strategy`): the teacher networks "
            "sharded per unit of `DistillationModule.sharding_units` (each feature block, then the rest of the network), "
            "trainable parameters as fp32 master weights, gathers in bf16, gradients reduced in fp32; text encoders, "
            "VAE and SAM whole on every rank; two gathered units live at once (the largest one, computing and "
            "prefetched: for SDXL an up block of 1.2B parameters). ADP's pixel heads are not among the units as "
            "written (`FSDP2Strategy` refuses trainable parameters outside every unit); the plan counts them whole. "
            "**HSDP** (`replicate_size: nodes`): the same sharded over the 8 GPUs of a node, replicated across nodes.",
            f"- **Time**: counted FLOPs / ({PEAK_FLOPS / 1e12:.0f} TFLOP/s x utilisation); communication from ring "
            f"collectives at {NVLINK_BYTES_PER_S / 1e9:.0f} GB/s per GPU in a node (NVLink) and "
            f"{IB_BYTES_PER_S / 1e9:.0f} GB/s across nodes (InfiniBand), overlapping compute (s / it = the larger of "
            "the two). Data loading, text encoding, logging, validation and checkpoints are not counted.",
            f"- **Fits**: the total is at most {USABLE:.0%} of the card (80 GB H100, 141 GB H200); the CUDA context, NCCL "
            "buffers and fragmentation take the rest.",
            f"- Configs shipped in full mode are shown in LoRA mode with rank {LORA_RANK}; configs shipped in LoRA mode "
            "are shown in full mode with fp32 copies.",
            "- **Two-expert teachers** (Wan 2.2 A14B: the architecture's components of role `denoiser`, `transformer` "
            "at timesteps >= `boundary_ratio` x 1000, `transformer_2` below): the frozen weights, LoRA adapters "
            "(trainable parameters, gradients, AdamW states) and full-mode copies are every expert's; FLOPs and "
            "activations per sample are one expert's (each sample runs one expert; `WanExperts` runs the idle one on a "
            "single token, not counted); FSDP2 shards both experts' blocks, and every pass gathers both (the idle "
            "expert runs too).", ""]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None,
                        help="configs under configs/ (default: every config of " + ", ".join(CONFIG_FAMILIES) + ")")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="scale_plan", help="file stem of the results")
    parser.add_argument("--no_check", action="store_true",
                        help="skip the comparison with the GPU check (sd3_gpu_check.json); the @check column then "
                             "uses the stated utilisation")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dmdx_lightning import quiet

    quiet.install()
    torch.set_num_threads(1)
    report = run_plan(args.configs or shipped_configs(), check=not args.no_check)
    report["command"] = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", report)
    (args.out / f"{args.name}.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
