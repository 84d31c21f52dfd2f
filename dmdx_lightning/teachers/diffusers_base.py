"""What the teachers loaded from diffusers pipeline folders share (SD3 / SD3.5, SDXL).

- :meth:`DiffusersTeacher.load_component`: ``cls.from_pretrained`` of one pipeline subfolder with
  ``revision`` / ``variant`` / ``torch_dtype``, failing with an error that names the config key
  and says how to get the weights;
- role switching that remembers the active role, and gradient checkpointing that recomputes a
  block in the role it first ran in (lora mode: all roles share one network, and backward runs
  after the forward's role was left);
- no early stop of the forward under FSDP (an aborted unit never reshards).

Nothing here is family-specific: each family's file says which subfolders it loads and how its
network is called.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.dtypes import parse_dtype
from dmdx_lightning.teachers.base import RoleCheckpointing, Teacher

#: the config key users set to point at the weights (named in every loading error)
CONFIG_KEY = "model.init_args.teacher.init_args.pretrained_model_name_or_path"


#: the attention projections of both streams of a joint-attention (MMDiT) block, as diffusers' SD3
#: and FLUX LoRA scripts adapt them, so an exported adapter loads with the pipeline's
#: ``load_lora_weights`` (FLUX's single blocks match the first four too)
JOINT_ATTENTION_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

#: the example prompts of the image families (sample grids without their own prompts)
IMAGE_EXAMPLE_PROMPTS = ("a photo of a cat wearing a red scarf", "an astronaut riding a horse on the moon",
                         "a bowl of ramen, studio lighting", "a watercolor painting of a lighthouse at dawn")


class RawConfig:
    """``from_pretrained`` giving a config file as stored, whatever class it names: a subfolder's
    scheduler config (any scheduler class), or the pipeline's ``model_index.json`` (``subfolder=None``);
    for :meth:`DiffusersTeacher.load_component`'s errors and the parse-time checks."""

    @staticmethod
    def from_pretrained(source: str, **kwargs) -> dict:
        from diffusers import DDPMScheduler, DiffusionPipeline

        reader = DDPMScheduler if kwargs.get("subfolder") else DiffusionPipeline
        return dict(reader.load_config(source, **kwargs))


class DiffusersTeacher(RoleCheckpointing, Teacher):
    """Base of the families whose weights are a diffusers pipeline folder or hub id.

    A family sets ``pretrained_model_name_or_path``, ``revision``, ``variant`` and ``torch_dtype``
    before loading, and the class attributes below for its error messages.
    """

    #: how errors name the pipeline (e.g. ``"SD3"``)
    pipeline_name: str = "diffusers"
    #: the subfolders a pipeline folder of this family has (said when one is missing)
    pipeline_layout: str = ""

    #: the ``model_index.json`` ``_class_name`` values this family trains (``()``: not checked)
    pipeline_classes: tuple[str, ...] = ()

    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    torch_dtype: torch.dtype | None = None

    def enable_decode_checkpointing(self) -> bool:
        """diffusers' own per-block checkpointing of the VAE ``decode`` runs (it acts only when
        gradients flow)."""
        self.vae.enable_gradient_checkpointing()
        return True

    @classmethod
    def check_scheduler(cls, config: dict) -> str | None:
        """What in the pipeline's scheduler config this family cannot train with (``None``: nothing),
        said as the end of "its scheduler/ ..."; checked at setup and again when the teacher loads."""
        return None

    @classmethod
    def pipeline_problem(cls, index: dict) -> str | None:
        """What in a pipeline's ``model_index.json`` this family cannot train (``None``: nothing);
        checked when the config is parsed and, where a family reads the index, when it loads."""
        name = index.get("_class_name")
        if cls.pipeline_classes and name and name not in cls.pipeline_classes:
            return f"is a {name} folder; {cls.__name__} trains {' / '.join(cls.pipeline_classes)} folders"
        return None

    @classmethod
    def pipeline_index(cls, options) -> dict | None:
        """The ``model_index.json`` of the pipeline ``options`` name, from a local folder or a Hub id
        already in the cache (no download at parse time); ``None`` where it cannot be read yet (loading
        the teacher then reports that with its own message)."""
        source = options.get("pretrained_model_name_or_path")
        if not source:
            return None
        try:
            return RawConfig.from_pretrained(str(source), revision=options.get("revision"), local_files_only=True)
        except (OSError, ValueError):
            return None

    @classmethod
    def check_options(cls, options, key: str = "model.init_args.teacher.init_args") -> None:
        """The pipeline a config names, from its config files alone (no weights): a local path that does
        not exist, a pipeline of another class (:meth:`pipeline_problem`), or a scheduler of another
        family (e.g. an SDXL folder given to SD3Teacher)."""
        source = options.get("pretrained_model_name_or_path")
        if not source:
            return
        name, local = str(source), Path(str(source)).expanduser()
        where = f"{key}.pretrained_model_name_or_path"
        if not local.exists():
            if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a Hub id "owner/name"
                raise ConfigError(where, name, "no such folder", f"Set it to a local diffusers {cls.pipeline_name} "
                                  f"pipeline folder ({cls.pipeline_layout}) or a Hub id.")
            if os.environ.get("HF_HUB_OFFLINE") and not _cached(name, options.get("revision")):
                raise ConfigError(where, name, "is not in the local Hugging Face cache and the Hub is offline "
                                  "(HF_HUB_OFFLINE=1)", f"Either download it first (accept the model's license on "
                                  f"huggingface.co, `hf auth login`, then `hf download {name}`), or set {where} to "
                                  "a local diffusers pipeline folder.")
        problem = cls.pipeline_problem(cls.pipeline_index(options) or {}) if cls.pipeline_classes else None
        if problem:
            raise ConfigError(where, name, problem, "Point it at a pipeline of this family, or use the teacher class "
                              "of that pipeline's family.")
        if not local.exists():
            return  # online: loading downloads it, or says why it cannot
        from diffusers import DDPMScheduler

        try:
            config = dict(DDPMScheduler.load_config(str(local), subfolder="scheduler"))
        except (OSError, ValueError):
            return  # loading names the missing part with its own message
        problem = cls.check_scheduler(config)
        if problem:
            raise ConfigError(where, name, f"its scheduler/ {problem}", f"{cls.__name__} trains {cls.pipeline_name} "
                              "pipelines: use the teacher class of this pipeline's family, or another folder.")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._active_role: str | None = None  # the role of the forward in progress

    def set_source(self, pretrained_model_name_or_path, revision: str | None, variant: str | None,
                   torch_dtype: str | None, trainable_dtype: str | None) -> None:
        """Where the weights come from and the dtypes they load in: every family's first options,
        set before its first :meth:`load_component`."""
        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        self.revision, self.variant = revision, variant
        self.torch_dtype = parse_dtype(torch_dtype, "torch_dtype")
        self.trainable_dtype = parse_dtype(trainable_dtype, "trainable_dtype")

    @staticmethod
    def flow_match_scheduler_problem(config: dict, teacher: str) -> str | None:
        """What ``teacher`` (a flow-matching family) says of a scheduler config of another class."""
        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            return f"is a {name}; {teacher} trains flow-matching pipelines (FlowMatchEulerDiscreteScheduler)"
        return None

    # ------------------------------------------------------------------ loading
    def load_component(self, cls, subfolder: str, model: bool = True, missing_hint: str = "",
                       source: str | None = None, source_key: str = CONFIG_KEY,
                       torch_dtype: torch.dtype | None = None):
        """``cls.from_pretrained`` of one component, with an error that says what to do.

        ``source`` defaults to the pipeline (``pretrained_model_name_or_path``); a component stored
        on its own (e.g. a separate VAE) passes its own ``source`` and ``source_key`` (the config key
        that names it) and ``subfolder=None``.
        """
        key, of_pipeline = source_key, source is None
        if of_pipeline:
            source = self.pretrained_model_name_or_path
        # revision and variant describe the pipeline repository, not a separately named component
        kwargs = {"revision": self.revision} if of_pipeline else {}
        if subfolder:
            kwargs["subfolder"] = subfolder
        if model:
            kwargs["torch_dtype"] = torch_dtype or self.torch_dtype
            if self.variant and of_pipeline:
                kwargs["variant"] = self.variant
        local = Path(source).expanduser()
        if local.is_dir():
            if subfolder and not (local / subfolder).is_dir():
                raise FileNotFoundError(
                    f"{local} has no {subfolder}/ folder: {key} must name a diffusers {self.pipeline_name} pipeline "
                    f"folder ({self.pipeline_layout}){missing_hint}")
            source = str(local)
        try:
            return cls.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            where = f"{subfolder}/ of " if subfolder else ""
            raise OSError(
                f"could not load {where}{self.pipeline_name} teacher component {source!r} (set by {key}): {e}\n"
                f"Either download it first (accept the model's license on huggingface.co, `hf auth login`, then "
                f"`hf download {source}`), or set {key} to a local diffusers pipeline folder."
            ) from e

    #: dtype of the trainable copies in ``full`` mode (``None``: ``torch_dtype``)
    trainable_dtype: torch.dtype | None = None

    def setup_roles(self, denoiser: nn.Module) -> None:
        super().setup_roles(denoiser)
        if self.mode == "full" and self.trainable_dtype is not None and "real" in self.build_roles:
            # fp32 master weights serve an optimizer; a student built alone (dmdx export, no real
            # score) is the loaded network itself and stays in torch_dtype, the dtype it is written in
            for net in self.roles.values():
                net.to(self.trainable_dtype)

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Square image latents: ``resolution / vae_scale_factor`` a side (a family sets both)."""
        size = self.resolution // self.vae_scale_factor
        return (batch_size, self.denoiser.config.in_channels, size, size)

    def identity(self) -> str:
        """The hub id or local folder the teacher was loaded from."""
        return self.pretrained_model_name_or_path

    # ------------------------------------------------------------------ export
    #: the denoiser's component name in the family's pipeline (``transformer``; ``unet`` for the UNet
    #: families): it names the LoRA entries its ``save_lora_weights`` / ``load_lora_weights`` read
    denoiser_component: str = "transformer"

    @property
    def pipeline_class(self):
        """The family's diffusers pipeline class (e.g. ``StableDiffusion3Pipeline``)."""
        raise NotImplementedError(f"{type(self).__name__} must name its diffusers pipeline class")

    def pipeline_denoiser(self, pipe) -> nn.Module:
        """The network a pipeline of this family denoises with, as :meth:`model_output` runs it
        (the inverse of :meth:`diffusers_pipeline`): its :attr:`denoiser_component`."""
        return getattr(pipe, self.denoiser_component)

    def diffusers_pipeline(self, denoiser: nn.Module, scheduler):
        """A :attr:`pipeline_class` of this teacher's frozen components around ``denoiser``."""
        raise NotImplementedError(f"{type(self).__name__} must build its diffusers pipeline")

    def student_scheduler(self, timesteps) -> tuple:
        """``(scheduler, info)``: a stock diffusers scheduler that replays the student's sampler at
        ``timesteps`` (it must re-noise the predicted ``x0`` with fresh noise between steps), and what
        the export's info file records: at least ``call``, the pipeline arguments that replay it."""
        raise NotImplementedError(f"{type(self).__name__} must give the scheduler that replays its student")

    def export_pipeline(self, output: Path, timesteps) -> dict:
        """A :attr:`pipeline_class` folder: the student denoiser (adapter merged in lora mode) in the
        teacher's dtype, this teacher's frozen components, and the student's scheduler.

        Consumes the student of a teacher built for export (``build_roles=("student",)``): the merge
        and the cast happen in place, so no second copy of the denoiser is made."""
        scheduler, info = self.student_scheduler(timesteps)
        self.diffusers_pipeline(merged_student(self), scheduler).save_pretrained(output, safe_serialization=True)
        return info

    def lora_files(self, state: dict) -> list[tuple[str | None, dict, dict]]:
        """The files the student's adapter ``state`` is written to: ``(weight_name, its entries, the
        load_lora_weights keywords that load it)``. Default: one file with the pipeline's default name
        (``pytorch_lora_weights.safetensors``); a network of several experts writes one per expert."""
        return [(None, state, {})]

    def export_lora(self, output: Path, timesteps) -> dict:
        """The denoiser's adapter for the pipeline's ``load_lora_weights`` (its LoRA config in the
        metadata; :meth:`lora_files` says which files) and the student's scheduler under
        ``scheduler/``, to swap in. Several files: the info lists the ``load_lora_weights`` keywords
        of each (``dmdx sample`` makes those calls)."""
        from dmdx_lightning.export import student_lora_state

        scheduler, info = self.student_scheduler(timesteps)
        state, meta = student_lora_state(self)
        component = self.denoiser_component
        files = self.lora_files(state)
        for weight_name, entries, _ in files:
            self.pipeline_class.save_lora_weights(output, weight_name=weight_name, safe_serialization=True, **{
                f"{component}_lora_layers": entries, f"{component}_lora_adapter_metadata": meta})
        scheduler.save_pretrained(Path(output) / "scheduler")
        if len(files) > 1:
            info["load_lora_weights"] = [{"weight_name": name, **load} for name, _, load in files]
        return {**info, "lora": meta}

    def pipeline_info(self) -> dict:
        """What every diffusers export of this teacher records besides its call: the dtype the
        pipeline is written in (``dmdx sample`` loads an exported folder in it)."""
        return {"torch_dtype": str(self.torch_dtype or torch.float32).removeprefix("torch.")}


def network_dtype(net: nn.Module) -> torch.dtype:
    """The dtype a family casts ``net``'s inputs to: its first floating parameter's (a trainable
    role's ``trainable_dtype``, else the loaded ``torch_dtype``).

    diffusers' ``ModelMixin.dtype`` gives the same answer, but first walks every submodule looking
    for layer-wise casting hooks, on every call: SDXL's UNet has 1930 modules, 9210 with LoRA roles
    (five modules per adapted projection), and the walk costs 5 ms and 23 ms of CPU per denoiser
    call (the topology of benchmarks/topology.py; 0.003 ms here). We attach no casting hooks.
    """
    for p in net.parameters():
        if p.is_floating_point():
            return p.dtype
    raise ValueError(f"{type(net).__name__} has no floating-point parameters")


def merged_student(teacher: Teacher) -> nn.Module:
    """The student network of a teacher built for export (``build_roles=("student",)``), ready
    for a pipeline folder, changed IN PLACE so no second copy of the network is made: in lora
    mode diffusers' own merge (``W += (alpha / r) B A`` of the ``student`` adapter, then every
    peft layer replaced by its base layer), then cast to the teacher's dtype (one dtype per
    pipeline: the student joins the frozen components). Any family on a diffusers model."""
    student = teacher.network("student")
    if teacher.mode == "lora":
        student.fuse_lora(adapter_names=["student"])
        student.unload_lora()
    return cast_as_loaded(student.requires_grad_(False).eval(), teacher.torch_dtype or torch.float32)


def cast_as_loaded(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``net`` in ``dtype`` except the modules its class keeps in float32 whatever the dtype
    (diffusers' ``_keep_in_fp32_modules``: Wan's norms, time embedder and ``scale_shift_table``), as
    ``from_pretrained(torch_dtype=dtype)`` would load it: a plain ``.to(dtype)`` would round them to
    bf16 in the written folder, and loading then only upcasts the rounded values. In place."""
    keep = tuple(getattr(net, "_keep_in_fp32_modules", None) or ())
    if not keep or dtype == torch.float32:
        return net.to(dtype)
    for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
        if tensor.is_floating_point():
            fp32 = any(module in name.split(".") for module in keep)  # diffusers' own matching rule
            tensor.data = tensor.data.to(torch.float32 if fp32 else dtype)
    return net


def _cached(repo_id: str, revision: str | None) -> bool:
    """Whether the Hub pipeline ``repo_id`` has its ``model_index.json`` in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "model_index.json", revision=revision), str)

