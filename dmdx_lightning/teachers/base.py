"""The `Teacher` base: one frozen many-step diffusion model and the roles distillation plays on it.

Roles, not copies (DESIGN.md): the real score ``F_phi``, the fake score ``f_psi`` and the
generator ``G_theta`` are three roles on one architecture.

- ``mode="full"``: the student and the fake score are trainable deep copies of the teacher network.
- ``mode="lora"``: the student and the fake score are peft named adapters (``"student"``,
  ``"fake"``) on ONE frozen base; the real score is that base with adapters disabled. A run then
  holds a single copy of the base weights.

The discriminator backbone is the real score's network (frozen), never another copy.

``build_roles`` builds fewer roles where fewer are needed: ``dmdx export`` and ``dmdx sample``
build the student alone. In full mode the loaded network then IS the student (no copy, no real
score); in lora mode only the student's adapter is injected. ``dmdx sample --teacher`` builds the
real score alone.

The contract (one file per family in ``teachers/``; checked for every family by
``tests/test_teacher_conformance.py``). Prediction conversion, CFG, the ODE step, samplers and
role switching are written once here; a family provides:

MUST
    - class attributes ``family`` (short name, stored in checkpoints and manifests),
      ``prediction_type`` (``flow | v | eps | x0``);
    - in ``__init__``: ``self.schedule`` (a :class:`~dmdx_lightning.schedules.NoiseSchedule`),
      ``self.sample_steps`` (the teacher sampler's default steps), ``self.cfg_scale`` (its default
      guidance scale), ``self.example_prompts`` (non-empty), then ``self.setup_roles(denoiser)``,
      which checks all of these;
    - :meth:`encode_prompts`, :meth:`model_output`, :meth:`feature_blocks`, :meth:`latent_shape`,
      :meth:`decode`.

MAY
    - :meth:`block_to_map` (blocks that do not return maps), :meth:`encode` (families with an
      image encoder), :meth:`identity` (default: the family name), :meth:`unconditional` (CFG's
      unconditional branch; default: the empty prompt encoded),
      :meth:`enable_gradient_checkpointing`, :meth:`enable_decode_checkpointing` (ADP's pixel
      path; diffusers families: their VAE's), ``default_lora_targets`` (for ``mode="lora"``),
      ``stop_forward_early``; :class:`RoleCheckpointing` (mixed in first) for diffusers
      transformers whose checkpointed blocks must be recomputed in the role they ran in;
      :meth:`check_setup` (a setting the built components show cannot work); ``guidance`` (how
      ``predict(cfg_scale=w)`` guides: ``true_cfg``, two passes ``uncond + w (cond - uncond)``, the
      default; ``embedded``, ONE pass with ``w`` given to the network as the conditioning's
      ``guidance`` entry ``(B,)``, which :meth:`model_output` reads (guidance-distilled networks:
      FLUX.1-dev); ``none``, no guidance at all, ``cfg_scale`` must be 1 (FLUX.1-schnell));
      :meth:`guidance_scales` (a teacher guided with another scale at some times: Wan 2.2 A14B's
      low-noise expert); :meth:`network_blocks` (where the feature blocks are not the modules);
    - the diffusers export: ``export_formats`` and :meth:`export_pipeline` / :meth:`export_lora`
      (default: a ``NotImplementedError`` naming the family);
    - the plain export (``"safetensors"`` in ``export_formats``, for families without a diffusers
      pipeline): :meth:`student_config` (what rebuilds the student's network); the writing and the
      loading back (:meth:`export_safetensors`, :meth:`load_student_export`) are generic, and a
      family overrides :meth:`save_student` / :meth:`load_student_export` only where its network
      file differs (digits: the student file is a teacher weights file).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from dmdx_lightning.errors import ConfigError
from dmdx_lightning.schedules import PREDICTION_TYPES, NoiseSchedule, euler_grid

#: every ``dmdx export --format``: diffusers pipeline folder, diffusers LoRA, our plain student file
EXPORT_FORMATS: tuple[str, ...] = ("pipeline", "lora", "safetensors")
#: the file a ``safetensors`` export writes the student's network to
STUDENT_WEIGHTS = "student.safetensors"

#: how a family realises ``predict(..., cfg_scale=w)`` (the ``guidance`` attribute of :class:`Teacher`)
GUIDANCE: tuple[str, ...] = ("true_cfg", "embedded", "none")

Role = Literal["real", "fake", "student"]
ROLES: tuple[str, ...] = ("real", "fake", "student")
TRAINABLE_ROLES: tuple[str, ...] = ("student", "fake")


class Conditioning:
    """Encoded prompts: named tensors with the batch first.

    ``pooled`` (``(B, P)``) is the one vector every family provides; the discriminator heads are
    conditioned on it. Other entries are whatever the family's network consumes.
    """

    def __init__(self, **tensors: Tensor) -> None:
        if "pooled" not in tensors:
            raise ValueError("Conditioning needs a 'pooled' (B, P) tensor for the discriminator heads")
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Conditioning tensors disagree on batch size: {sizes}")
        self.tensors = tensors

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning(**{k: v[index] for k, v in self.tensors.items()})

    def get(self, name: str, default: Tensor | None = None) -> Tensor | None:
        """The entry ``name``, or ``default`` where the family's encoding has none."""
        return self.tensors.get(name, default)

    def with_entries(self, **tensors: Tensor) -> "Conditioning":
        """A copy with ``tensors`` added or replaced (e.g. the ``guidance`` (B,) of embedded guidance)."""
        return Conditioning(**{**self.tensors, **tensors})

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(**{k: v.to(*args, **kwargs) for k, v in self.tensors.items()})

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning(**{k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        keys = items[0].tensors.keys()
        return Conditioning(**{k: torch.cat([c.tensors[k] for c in items]) for k in keys})


#: whether full-mode role copies are made on the meta device (see :func:`meta_role_copies`)
_META_ROLE_COPIES = ContextVar("meta_role_copies", default=False)


@contextmanager
def meta_role_copies():
    """Within this context a full-mode teacher makes its trainable copies (student, fake score) on
    the meta device: their structure, no storage. A sharding strategy then gives each rank storage
    for its own shards only and fills them from the loaded real score's shards
    (:meth:`Teacher.fill_role_copies`), so the weights are loaded once and the full copies never
    exist. ``dmdx fit`` enters it when the trainer's strategy is FSDP2."""
    token = _META_ROLE_COPIES.set(True)
    try:
        yield
    finally:
        _META_ROLE_COPIES.reset(token)


def _structure_copy(net: nn.Module) -> nn.Module:
    """``copy.deepcopy(net)`` with every parameter and buffer replaced by a meta tensor of its shape and dtype."""
    memo: dict[int, Any] = {}
    for p in net.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in net.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(net, memo)


class _StopForward(Exception):
    """Raised by a feature hook once the last needed block has run: the rest of the forward is skipped."""


class RoleCheckpointing:
    """Role switching for teachers on a diffusers transformer (``enable_gradient_checkpointing(
    gradient_checkpointing_func=...)``) whose roles may run under gradient checkpointing.

    Mixed in before :class:`Teacher` (``class SD3Teacher(RoleCheckpointing, Teacher)``): it
    remembers the role of the forward in progress so a checkpointed block is recomputed in the role
    it first ran in, and skips adapter switches that change nothing.
    """

    #: the role of the forward in progress
    _active_role: str | None = None

    @contextmanager
    def as_role(self, role: str):
        """The base's adapter switch, remembering the role (re-applied when checkpointed blocks are
        recomputed) and restoring the enclosing role on exit."""
        previous = self._active_role
        self._set_adapters(role)
        self._active_role = role
        try:
            yield
        finally:
            self._active_role = previous
            if previous is not None:
                self._set_adapters(previous)

    def enable_gradient_checkpointing(self, net: nn.Module) -> None:
        """Checkpoint every transformer block, recomputing it under the role it first ran in.

        In lora mode all roles share one network, and backward runs after the forward's role was
        left (e.g. the generator's loss goes through the fake score, then through the real
        score's features): a plain recomputation would use whatever adapter is active then and
        give wrong gradients (torch notices only when the saved-tensor count differs).
        """
        def checkpoint_in_role(block, *args):
            role = self._active_role
            if role == "real" and not self.checkpoint_frozen:
                return block(*args)  # the frozen teacher keeps its activations, as in full mode

            def run(*inputs):
                if role is None or self.mode != "lora":
                    return block(*inputs)
                with self.as_role(role):
                    return block(*inputs)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        net.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_in_role)


class Teacher(nn.Module):
    """Base class of every teacher family.

    Args:
        mode: ``"full"`` (separate trainable copies for student and fake score) or ``"lora"``
            (named peft adapters on one shared frozen base).
        lora_rank, lora_alpha: LoRA size, used in ``lora`` mode.
        lora_target_modules: module names the adapters wrap (family default when ``None``).
        gradient_checkpointing: trade compute for memory in the trainable roles.
        checkpoint_frozen: lora mode with ``gradient_checkpointing``: checkpoint the frozen
            teacher's passes that carry gradients too (the real score's features under the
            generator's discriminator term), saving their activations at the cost of recomputing
            them during backward. Off by default, as full mode, whose frozen network is never
            checkpointed; on for the last GiBs of a tight card (benchmarks/results/topology.md
            measures the time).
        build_roles: the roles to build (default: all three, as training needs). ``("student",)``
            is what ``dmdx export`` builds: in full mode the loaded network becomes the student
            itself, in lora mode only the ``"student"`` adapter is injected; asking such a
            teacher for another role is an error naming the role. ``("real",)`` (``dmdx sample
            --teacher``): the loaded network alone, no copy and no adapter.
    """

    # ---- MUST: class attributes
    #: one of ``flow | v | eps | x0`` (see :mod:`dmdx_lightning.schedules`)
    prediction_type: str = "flow"
    #: short family name stored in checkpoints and ODE-pair manifests, to refuse a checkpoint or a
    #: pair set of another family
    family: str = "base"

    # ---- MUST: set in the family's ``__init__`` before ``setup_roles`` (which checks them)
    #: the noise schedule the network was trained with
    schedule: NoiseSchedule
    #: steps of the teacher's own PF-ODE sampler (ODE pairs, reference sample grids, evaluation)
    sample_steps: int
    #: the teacher's default classifier-free guidance scale (1.0: no guidance)
    cfg_scale: float
    #: a few prompts this teacher understands (sample grids; the conformance suite)
    example_prompts: tuple[str, ...]

    # ---- MAY
    #: module names the LoRA adapters wrap by default (``mode="lora"`` needs them or
    #: ``lora_target_modules``)
    default_lora_targets: tuple[str, ...] = ()
    #: feature_maps skips the blocks after the deepest one needed (never on a sharded network: an
    #: FSDP unit whose forward is aborted never reshards, and its next gather overwrites parameters
    #: autograd saved); a family turns it off where an aborted forward breaks its own state
    stop_forward_early: bool = True
    #: the ``dmdx export --format`` values this family implements (``"pipeline"``, ``"lora"``:
    #: diffusers; ``"safetensors"``: the student's network and the config that loads it back), the
    #: first one being ``dmdx export``'s default
    export_formats: tuple[str, ...] = ()
    #: how :meth:`predict` applies ``cfg_scale = w != 1`` (one of :data:`GUIDANCE`): ``true_cfg``:
    #: classifier-free guidance, ``uncond + w (cond - uncond)`` from two passes (the unconditional
    #: one on :meth:`unconditional`); ``embedded``: one pass with ``w`` in the conditioning's
    #: ``guidance`` entry (``(B,)``, read by :meth:`model_output`), for networks distilled to take
    #: the guidance scale as an input (FLUX.1-dev's guidance embedding; a call with ``w == 1``, as
    #: the student's and the fake score's, carries no entry: the family's default value); ``none``:
    #: the network has no guidance (FLUX.1-schnell) and a ``w != 1`` is an error
    guidance: str = "true_cfg"

    @classmethod
    def guidance_from_options(cls, options) -> str | None:
        """The :attr:`guidance` a build with ``options`` will have, from the config alone (checked
        against the method's guidance scales before anything loads); ``None``: known once loaded."""
        return cls.guidance

    @classmethod
    def check_options(cls, options, key: str = "model.init_args.teacher.init_args") -> None:
        """Refuse a value of the contract's options before anything loads (a family adds its own
        ``check_options`` for its options; :mod:`dmdx_lightning.preflight` runs each class's)."""
        mode = options.get("mode", "full")
        if mode not in ("full", "lora"):
            raise ConfigError(f"{key}.mode", mode, "unknown mode", "Choose full (trainable copies) or lora "
                              "(adapters on one frozen base, the one-card recipe).")
        if mode == "lora" and options.get("lora_rank", 16) < 1:
            raise ConfigError(f"{key}.lora_rank", options.get("lora_rank"), "a LoRA rank is >= 1",
                              "The configs use 16 to 64.")

    def __init__(
        self,
        mode: Literal["full", "lora"] = "full",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
        checkpoint_frozen: bool = False,
        build_roles: Sequence[str] = ROLES,
    ) -> None:
        super().__init__()
        if mode not in ("full", "lora"):
            raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
        build_roles = tuple(build_roles)
        if not build_roles or not set(build_roles) <= set(ROLES):
            raise ValueError(f"build_roles must be a non-empty subset of {ROLES}, got {build_roles!r}")
        if mode == "full" and "real" not in build_roles and len(set(build_roles) & set(TRAINABLE_ROLES)) > 1:
            # without the real score the loaded network is reused as the one trainable role
            raise ValueError(f"build_roles {build_roles!r}: without 'real', full mode builds one trainable role")
        self.build_roles = build_roles
        self.mode = mode
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else float(lora_rank)
        self.lora_target_modules = lora_target_modules
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_frozen = checkpoint_frozen
        self._null_cache: Conditioning | None = None

    # ------------------------------------------------------------------ roles
    def setup_roles(self, denoiser: nn.Module) -> None:
        """Register the teacher network and create the student / fake-score roles on it.

        Subclasses call this once after loading their denoiser, with the contract's MUST
        attributes set (checked here, so a family that misses one fails when it is built).
        """
        self.check_contract()
        denoiser.requires_grad_(False).eval()
        self.denoiser = denoiser
        self.roles = nn.ModuleDict()
        trainable = [role for role in TRAINABLE_ROLES if role in self.build_roles]
        if self.mode == "full":
            meta = _META_ROLE_COPIES.get() and "real" in self.build_roles
            for role in trainable:
                # without the real score nothing else needs the loaded weights: they become the role's
                net = (_structure_copy if meta else copy.deepcopy)(denoiser) if "real" in self.build_roles else denoiser
                self.roles[role] = net.requires_grad_(True).train()
        else:
            from peft import LoraConfig, inject_adapter_in_model

            targets = self.lora_target_modules or list(self.default_lora_targets)
            if not targets:
                raise ValueError(f"{type(self).__name__}: lora mode needs lora_target_modules")
            config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=targets,
                                init_lora_weights=True)
            for role in trainable:
                inject_adapter_in_model(config, denoiser, adapter_name=role)
            from dmdx_lightning.teachers.adapters import RoleAdapters

            # the frozen teacher until a role is entered; none to switch in a teacher built as "real" alone
            self._adapters = RoleAdapters(denoiser) if trainable else None
            for name, p in denoiser.named_parameters():
                p.requires_grad_(_lora_role_of(name) is not None)
                if p.requires_grad:
                    # peft creates adapters in their base layer's dtype; in bf16 an AdamW update of
                    # lr 1e-5 is mostly below the weight's resolution and is lost. The adapters are
                    # the optimizer's master weights, so they are fp32 whatever the frozen base is
                    # (peft casts a layer's input to its adapter's dtype and the sum back).
                    p.data = p.data.float()
        if self.gradient_checkpointing:
            for role in trainable:
                self.enable_gradient_checkpointing(self.network(role))

    @property
    def has_meta_roles(self) -> bool:
        """Whether the trainable copies are still structure only (made under :func:`meta_role_copies`)."""
        return self.mode == "full" and any(p.is_meta for role in self.roles.values() for p in role.parameters())

    @torch.no_grad()
    def fill_role_copies(self, device: torch.device) -> None:
        """Give meta-device role copies storage on ``device`` and the real score's values, tensor by
        tensor. Sharded alike (the same units on the same mesh), a copy's shards are the real
        score's local shards, so each rank copies only its own part."""
        from torch.distributed.tensor import DTensor

        def local(t: Tensor) -> Tensor:
            return t.to_local() if isinstance(t, DTensor) else t

        source = dict(self.denoiser.named_parameters()) | dict(self.denoiser.named_buffers())
        for net in self.roles.values():
            if not any(p.is_meta for p in net.parameters()):
                continue
            net.to_empty(device=device)
            for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
                local(tensor).copy_(local(source[name]))

    def check_contract(self) -> None:
        """Raise a ``TypeError`` naming what a family left out of the contract (module docstring).

        The one place that asks whether an attribute exists: every caller then reads it directly.
        """
        value = {name: getattr(self, name, None) for name in ("schedule", "sample_steps", "cfg_scale", "example_prompts")}
        problems = []
        if self.family == Teacher.family:
            problems.append("class attribute `family` (a short name, e.g. 'sd3')")
        if self.prediction_type not in PREDICTION_TYPES:
            problems.append(f"class attribute `prediction_type` in {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if not isinstance(value["schedule"], NoiseSchedule):
            problems.append(f"`schedule` (a NoiseSchedule), got {value['schedule']!r}")
        steps = value["sample_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            problems.append(f"`sample_steps` (an int >= 1), got {steps!r}")
        cfg = value["cfg_scale"]
        if not isinstance(cfg, (int, float)) or isinstance(cfg, bool):
            problems.append(f"`cfg_scale` (a float), got {cfg!r}")
        prompts = value["example_prompts"]
        if not isinstance(prompts, tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
            problems.append(f"`example_prompts` (a non-empty tuple of str), got {prompts!r}")
        if self.guidance not in GUIDANCE:
            problems.append(f"`guidance` in {GUIDANCE}, got {self.guidance!r}")
        if not set(self.export_formats) <= set(EXPORT_FORMATS):
            problems.append(f"`export_formats` within {EXPORT_FORMATS}, got {self.export_formats!r}")
        if problems:
            raise TypeError(f"{type(self).__name__} does not fulfil the Teacher contract "
                            "(dmdx_lightning.teachers.base): it must set " + "; ".join(problems))

    def network(self, role: str) -> nn.Module:
        """The module that computes ``role`` (in lora mode the shared base for every role)."""
        self._check_built(role)
        if role == "real" or self.mode == "lora":
            return self.denoiser
        return self.roles[role]

    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        """Parameters an optimizer of ``role`` owns (adapters only in lora mode)."""
        return [p for _, p in self.named_trainable_parameters(role)]

    def named_trainable_parameters(self, role: str) -> Iterator[tuple[str, nn.Parameter]]:
        """``role``'s trainable parameters under their names in this module's state dict (the names
        a training build writes to checkpoints, also when ``build_roles`` left the real score out)."""
        if role not in TRAINABLE_ROLES:
            raise ValueError(f"only {TRAINABLE_ROLES} are trainable, got {role!r}")
        self._check_built(role)
        if self.mode == "full":
            for name, p in self.roles[role].named_parameters():
                yield f"roles.{role}.{name}", p
            return
        for name, p in self.denoiser.named_parameters():
            if _lora_role_of(name) == role:
                yield f"denoiser.{name}", p

    def _check_built(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role not in self.build_roles:
            raise ValueError(f"{type(self).__name__} was built with build_roles={self.build_roles} (e.g. by "
                             f"`dmdx export`, which builds the student alone): it has no {role!r} role")

    @contextmanager
    def as_role(self, role: str):
        """Run the shared network as ``role`` (lora mode: its adapter; ``real``: none); a no-op in full mode."""
        self._set_adapters(role)
        yield

    #: the adapter layers' shared switch (lora mode with a trainable role; see :meth:`setup_roles`)
    _adapters = None

    @property
    def role_switches(self) -> int:
        """Adapter changes of the shared network so far (lora mode; 0 in full mode): a count that
        benchmarks/topology.py and tests/test_roles.py read."""
        return self._adapters.switches if self._adapters is not None else 0

    def _set_adapters(self, role: str) -> None:
        """Point the shared network at ``role`` (lora mode) at constant cost
        (:class:`~dmdx_lightning.teachers.adapters.RoleAdapters`)."""
        self._check_built(role)
        if self._adapters is not None:
            self._adapters.set(None if role == "real" else role)

    def train(self, mode: bool = True) -> "Teacher":
        super().train(mode)
        # the frozen parts never train: no dropout / norm-statistics updates. The text encoders and
        # the VAE too: T5 ships with dropout 0.1, which made the prompt embeddings random while the
        # module was in training mode (and samples drawn then not reproducible)
        for name, child in self.named_children():
            if name not in ("denoiser", "roles"):
                child.eval()
        if self.mode == "full" and "real" in self.build_roles:
            self.denoiser.eval()  # the real score (a student built alone for export is the denoiser)
        return self

    # ------------------------------------------------------------------ family hooks: MUST
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> :class:`Conditioning` with ``pooled`` ``(B, P)``; by default ``""`` is also the
        unconditional branch of CFG (:meth:`unconditional`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_prompts")

    def model_output(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Run the family's network ``net`` (any role's, or an exported copy) at schedule time ``t``
        (``(B,)`` in ``[0, 1]``); returns its raw ``prediction_type`` output, shaped and typed as ``x_t``."""
        raise NotImplementedError(f"{type(self).__name__} must implement model_output")

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        """The blocks whose outputs can feed discriminator heads (indexable by layer number): modules,
        or objects with a module's ``register_forward_hook`` whose hook gets the whole batch's output
        (a network of several experts merges its experts' outputs, see :meth:`network_blocks`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement feature_blocks")

    def network_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        """The repeated block modules of ``net``, the units FSDP2 shards and ``compile: true`` compiles.
        Default: :meth:`feature_blocks`; a family whose feature blocks are not the modules themselves
        (Wan 2.2 A14B: block ``i`` is each expert's block ``i``, merged) lists the modules here."""
        return self.feature_blocks(net)

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of a batch of latents (the samplers' noise), batch first: ``(B, C, H, W)`` for images;
        video keeps its family's own layout (``(B, F, C, H, W)`` for CogVideoX, as its pipeline's
        latents), since callers only draw noise of this shape and hand it back to the family."""
        raise NotImplementedError(f"{type(self).__name__} must implement latent_shape")

    def decode(self, latents: Tensor) -> Tensor:
        """Latents of :meth:`latent_shape` -> images in ``[-1, 1]``, ``(B, 3 or 1, H, W)`` (video:
        ``(B, 3, F, H, W)``); differentiable (the pixel discriminator's generator loss goes through it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement decode")

    # ------------------------------------------------------------------ family hooks: MAY
    def check_setup(self) -> None:
        """Refuse a setting that the built teacher's own components show cannot work and that would
        otherwise fail late (e.g. at the first sample grid, after training): raise a
        :class:`~dmdx_lightning.errors.ConfigError` naming the option, its value and the fix. Called
        once per stage on every rank before the first step, by
        :class:`~dmdx_lightning.callbacks.setup_checks.SetupChecks` (``dmdx fit`` / ``validate`` /
        ``predict``); reads what is loaded, loads nothing. Default: nothing to check."""

    def enable_decode_checkpointing(self) -> bool:
        """Recompute :meth:`decode`'s blocks in backward instead of keeping their activations
        (ADP's ``PixelDiscriminator(decode_checkpointing=True)``); ``False`` when the family's
        decoder cannot, and the caller then recomputes the whole decode."""
        return False

    def block_to_map(self, output, x_t: Tensor) -> Tensor:
        """Turn one block's output into a ``(B, C, H, W)`` (or ``(B, C, F, H, W)``) feature map."""
        return output

    def encode(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` (as :meth:`decode` returns them) -> latents of :meth:`latent_shape`."""
        raise NotImplementedError(f"teacher family {self.family!r} ({type(self).__name__}) has no image encoder")

    def identity(self) -> str:
        """Which teacher this is, beyond its family: recorded in ODE-pair manifests and checkpoints
        and compared when they are read (a hub id or weights path; default: the family name).
        The same for every build of the same teacher, different between families."""
        return self.family

    def unconditional(self) -> Conditioning:
        """The unconditional branch of CFG for ONE sample, as the family's own pipeline builds it.

        Default: the empty prompt encoded. SDXL's pipeline uses zero embeddings instead
        (``force_zeros_for_empty_prompt``), which a family states by overriding this."""
        return self.encode_prompts([""])

    def export_pipeline(self, output: Path, timesteps: Sequence[float]) -> dict[str, Any]:
        """Write a complete diffusers pipeline folder to ``output`` whose denoiser is the student
        (merged with its adapter in lora mode) and whose scheduler replays the student's
        ``timesteps``; returns what the export's info file should record beyond the generic keys."""
        raise NotImplementedError(f"teacher family {self.family!r} ({type(self).__name__}) has no diffusers "
                                  "pipeline export")

    def export_lora(self, output: Path, timesteps: Sequence[float]) -> dict[str, Any]:
        """Write the student's adapter (lora mode) to ``output`` in the layout of the family's
        pipeline ``load_lora_weights``, with a scheduler for ``timesteps``; returns info as
        :meth:`export_pipeline`."""
        raise NotImplementedError(f"teacher family {self.family!r} ({type(self).__name__}) has no diffusers "
                                  "LoRA export")

    def student_config(self) -> dict[str, Any]:
        """Keyword arguments of this class that rebuild the student's network (with
        :meth:`load_student_export`) for a ``safetensors`` export: plain values (they are written to
        JSON), no weights paths and no LoRA settings (the export merges the adapter)."""
        raise NotImplementedError(f"teacher family {self.family!r} ({type(self).__name__}) has no safetensors "
                                  "export (its student_config)")

    def save_student(self, net: nn.Module, path: Path) -> None:
        """Write the student's network ``net`` to ``path`` (one safetensors file, atomically)."""
        from safetensors.torch import save_file

        from dmdx_lightning.atomic import atomic_path

        state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"class": type(net).__name__, "family": self.family})

    def export_safetensors(self, output: Path, timesteps: Sequence[float]) -> dict[str, Any]:
        """Write the student's network (adapter merged in lora mode) to ``output/student.safetensors``;
        returns what :meth:`load_student_export` needs (``teacher_class``, ``teacher_init_args``,
        ``weights``), for the export's info file.

        Consumes the student of a teacher built for export (``build_roles=("student",)``): the
        adapter is merged in place."""
        init_args = self.student_config()
        self.save_student(merged_student_network(self), Path(output) / STUDENT_WEIGHTS)
        cls = type(self)
        return {"weights": STUDENT_WEIGHTS, "teacher_class": f"{cls.__module__}.{cls.__qualname__}",
                "teacher_init_args": init_args}

    @classmethod
    def load_student_export(cls, weights: Path, init_args: dict[str, Any]) -> "Teacher":
        """A teacher with the student alone (``build_roles=("student",)``, full mode) whose student
        is the network :meth:`export_safetensors` wrote to ``weights``."""
        from safetensors.torch import load_file

        teacher = cls(**init_args, build_roles=("student",))
        teacher.network("student").load_state_dict(load_file(str(weights)))
        return teacher

    def guidance_scales(self, cfg_scale: float, t: Tensor) -> float | Tensor:
        """The guidance scale of each sample at time ``t`` (``(B,)``) when a caller guides with
        ``cfg_scale != 1``: a float for all (the default: ``cfg_scale``), or a ``(B,)`` tensor for a
        teacher guided with another scale at some times (Wan 2.2 A14B's ``cfg_scale_2`` below its
        experts' boundary, as ``WanPipeline``'s ``guidance_scale_2``)."""
        return cfg_scale

    def enable_gradient_checkpointing(self, net: nn.Module) -> None:
        """Turn on gradient checkpointing in a trainable role's ``net`` (``gradient_checkpointing``)."""
        if hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ shared machinery
    def null_conditioning(self, batch_size: int) -> Conditioning:
        """The unconditional branch of CFG (:meth:`unconditional`), built once and repeated."""
        if self._null_cache is None:
            self._null_cache = self.unconditional()
        device = self.denoiser_device
        return self._null_cache.to(device).repeat(batch_size)

    @property
    def denoiser_device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def forward_role(self, role: str, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        with self.as_role(role):
            return self.model_output(self.network(role), x_t, t, cond)

    def predict(
        self, role: str, x_t: Tensor, t: Tensor, cond: Conditioning, cfg_scale: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """``(x0_pred, eps_pred)`` of ``role`` at ``(x_t, t)``.

        With ``cfg_scale != 1``, as the family's :attr:`guidance` says: ``true_cfg``:
        ``pred_uncond + w (pred_cond - pred_uncond)`` in x0/eps space (both branches in one batched
        call); ``embedded``: one call with ``guidance = w`` in the conditioning; ``none``: refused.
        """
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        if len(cond) != x_t.shape[0]:
            raise ValueError(f"conditioning has batch {len(cond)} but x_t has batch {x_t.shape[0]}")
        if cfg_scale != 1.0 and self.guidance == "embedded":
            cond = cond.with_entries(guidance=torch.full((len(cond),), float(cfg_scale), device=x_t.device))
        elif cfg_scale != 1.0 and self.guidance == "none":
            raise ValueError(
                f"{type(self).__name__} ({self.identity()}) has no guidance (guidance: none), so cfg_scale must be 1, "
                f"got {cfg_scale}: set the method's real_cfg_scale (ADM, DMD, DMD2), the ODE pairs' cfg_scale or "
                "`dmdx sample --cfg` to 1")
        if cfg_scale == 1.0 or self.guidance == "embedded":
            out = self._checked(self.forward_role(role, x_t, t, cond), x_t)
            return self.schedule.to_x0_eps(out, x_t, t, self.prediction_type)
        both = Conditioning.cat([cond, self.null_conditioning(len(cond)).to(x_t.device)])
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        out = self._checked(self.forward_role(role, x2, t2, both), x2)
        x0, eps = self.schedule.to_x0_eps(out, x2, t2, self.prediction_type)
        x0_c, x0_u = x0.chunk(2)
        eps_c, eps_u = eps.chunk(2)
        w = self.guidance_scales(cfg_scale, t)
        if isinstance(w, Tensor):  # one scale per sample
            w = w.to(x0.dtype).view(-1, *[1] * (x_t.ndim - 1))
        return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)

    def _checked(self, output: Tensor, x_t: Tensor) -> Tensor:
        """Fail loudly where teacher outputs meet the losses (STYLE.md principle 9)."""
        if output.shape != x_t.shape:
            raise RuntimeError(
                f"{type(self).__name__}.model_output returned shape {tuple(output.shape)} for x_t of "
                f"shape {tuple(x_t.shape)}: check the family's output unpacking")
        if output.dtype != x_t.dtype and not torch.is_autocast_enabled(output.device.type):
            raise RuntimeError(
                f"{type(self).__name__}.model_output returned {output.dtype} for x_t in {x_t.dtype}")
        return output

    def feature_maps(
        self, role: str, x_t: Tensor, t: Tensor, cond: Conditioning, layers: Sequence[int]
    ) -> list[Tensor]:
        """Outputs of ``feature_blocks(net)[i]`` for ``i`` in ``layers``, as maps.

        Forward hooks capture the blocks; the forward stops right after the deepest one needed.
        Gradients flow through the captured maps (to ``x_t``, and to trainable roles).
        """
        net = self.network(role)
        blocks = self.feature_blocks(net)
        wanted = sorted(set(layers))
        bad = [i for i in wanted if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise ValueError(f"{type(self).__name__} has {len(blocks)} feature blocks; layers {bad} do not exist")
        wanted = sorted({i % len(blocks) for i in wanted})
        captured: dict[int, Tensor] = {}
        stop_early = self.stop_forward_early and not _sharded(net)

        def hook_for(i: int):
            def hook(_module, _inputs, output):
                if i in captured:  # recomputation under gradient checkpointing
                    return
                captured[i] = self.block_to_map(output, x_t)
                if len(captured) == len(wanted) and stop_early:
                    raise _StopForward

            return hook

        handles = [blocks[i].register_forward_hook(hook_for(i)) for i in wanted]
        try:
            self.forward_role(role, x_t, t, cond)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return [captured[i % len(blocks)] for i in layers]

    @torch.no_grad()
    def sample_ode(
        self, noise: Tensor, cond: Conditioning, num_steps: int, cfg_scale: float, role: str = "real",
        progress: bool = False,
    ) -> Tensor:
        """Deterministic PF-ODE sampling (DDIM / Euler) with CFG: the teacher's own sampler."""
        grid = euler_grid(num_steps, self.schedule)
        x = noise
        steps = zip(grid[:-1], grid[1:])
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(list(steps), desc="teacher ODE", leave=False)
        for t, s in steps:
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
            x0, eps = self.predict(role, x, tt, cond, cfg_scale)
            # the move to s = 0 lands on x0 itself (DDIM's set_alpha_to_one): a discrete VP
            # schedule's first index still holds noise (alpha(0) < 1); flow matching gives x0 anyway
            x = x0 if s == 0 else self.schedule.ode_step(x0, eps, torch.full_like(tt, s))
        return x

    def sample_student(
        self, noise: Tensor, cond: Conditioning, timesteps: Sequence[float],
        generator: torch.Generator | None = None, role: str = "student",
    ) -> Tensor:
        """Few-step student sampling (DMD2): predict x0, re-noise with fresh noise to the next time."""
        x = noise
        for i, t in enumerate(timesteps):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
            x0, _ = self.predict(role, x, tt, cond)
            if i == len(timesteps) - 1:
                return x0
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self.schedule.add_noise(x0, eps, torch.full_like(tt, timesteps[i + 1]))
        raise ValueError("timesteps must not be empty")


def _sharded(net: nn.Module) -> bool:
    """Whether ``net`` is an FSDP unit (FSDP1's wrapper or a module FSDP2's ``fully_shard`` sharded)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(net, (FSDPModule, FullyShardedDataParallel))


def merged_student_network(teacher: Teacher) -> nn.Module:
    """The student network of a teacher built for export, changed IN PLACE into a plain network: in
    lora mode each peft layer's ``student`` adapter is merged into its base layer
    (``W += (alpha / r) B A``) and the peft layer replaced by that base layer, so the network's
    state dict has the names of a full-mode student. (Diffusers models: ``merged_student``.)"""
    student = teacher.network("student")
    if teacher.mode == "lora":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, layer in list(student.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                layer.merge(adapter_names=["student"])
                parent, _, attr = name.rpartition(".")
                setattr(student.get_submodule(parent), attr, layer.get_base_layer())
    return student.requires_grad_(False).eval()


def _lora_role_of(param_name: str) -> str | None:
    """``"student"`` / ``"fake"`` for peft LoRA parameter names such as ``...lora_A.fake.weight``."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_") and parts[i + 1] in TRAINABLE_ROLES:
            return parts[i + 1]
    return None
