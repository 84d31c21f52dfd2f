"""FSDP2 for distillation runs: ``fully_shard`` per block, HSDP, sharded checkpoints that resume exactly.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (FSDP2 through the module's
``configure_model`` hook, torch.distributed.checkpoint) with what a distillation module needs on top:

- **What is sharded** is the module's own choice (:meth:`DistillationModule.sharding_units
  <dmdx_lightning.methods.base.DistillationModule.sharding_units>`): every block of every teacher
  network (the frozen real score and, in full mode, the student's and fake score's copies; in
  LoRA mode the one shared network with its adapters), then each network, then the
  discriminator heads. One unit never mixes two roles' networks, so a player's backward
  reduce-scatters its own gradients only. The text encoders, the VAE and a pixel discriminator's
  backbone are frozen and stay whole on every rank (no gradient to reduce; the VAE's ``decode``
  is not a forward, which FSDP would not gather for). Every trainable parameter must end in a
  unit: one that does not would train apart on each rank, so that is refused by name.
- **Manual optimization works as is**: FSDP2 finishes its backward from autograd's own callback
  (FSDP1 needed :func:`~dmdx_lightning.methods.distributed.finish_fsdp_backward`), keeps parameter
  names (no ``_fsdp_wrapped_module.``), and follows Lightning's ``toggled_optimizer`` (a unit
  re-reads ``requires_grad`` each time it gathers). The generator EMA works (its shadows become
  shards of the student's parameters).
- **Mixed precision**: ``param_dtype`` for compute (``auto``: bf16 under ``trainer.precision:
  bf16-mixed``, as the GPU configs run), ``reduce_dtype`` (fp32) for gradient reduction, and
  ``master_dtype`` (fp32): trainable parameters (full-mode copies loaded in bf16)
  are the optimizer's master weights, so they are cast up before sharding, as the LoRA adapters
  already are.
- **HSDP**: ``replicate_size`` > 1 (or ``"nodes"``) shards within a group of ranks (a node) and
  replicates across groups, so the parameter all-gathers stay on the node's fast links.
- **Checkpoints** are folders written by torch.distributed.checkpoint, one file per rank, holding
  only the trainable state (student, fake score, heads, EMA), every optimizer, and Lightning's
  metadata (loops, loader position, schedulers, per-rank RNG: ``meta.pt``). A save goes to a hidden
  sibling folder and is renamed into place, so a crash mid-save leaves the previous checkpoint.
  Loading reshards: a run resumes at another world size. ``dmdx export`` and ``init_from`` read a
  checkpoint folder directly (:mod:`dmdx_lightning.sharded_checkpoint`).
  ``sharded_checkpoint: false`` writes one consolidated file instead.
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from dmdx_lightning.dtypes import parse_dtype
from dmdx_lightning.atomic import write_json_atomic
from dmdx_lightning.checksums import (SHARDED_MANIFEST, CorruptCheckpointError, sha256_file, verify_file,
                                      verify_sharded)
from dmdx_lightning.errors import ConfigError
from dmdx_lightning.methods.distributed import reshard_units
from dmdx_lightning.sharded_checkpoint import METADATA_FILE, is_sharded_checkpoint

_KEY = "trainer.strategy.init_args"


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all ranks, or HSDP, for distillation modules (module docstring).

    Args:
        replicate_size: 1 shards over every rank (FSDP); ``n`` > 1 shards within groups of
            ``world_size / n`` ranks and replicates across the ``n`` groups (HSDP); ``"nodes"`` makes
            one group per node.
        param_dtype: dtype the units gather their parameters in for forward and backward:
            ``auto`` follows ``trainer.precision`` (bf16 under ``bf16-mixed``, fp16 under
            ``16-mixed``, else no cast); a dtype name needs a ``*-mixed`` precision, whose autocast
            casts what a network computes outside its parameters (timestep embeddings); ``null``:
            the stored dtype, no cast.
        reduce_dtype: dtype gradients are reduced in (``null``: ``param_dtype``).
        master_dtype: dtype of the trainable parameters the optimizers own, cast before sharding
            (``null``: as loaded).
        cpu_offload: keep sharded parameters, gradients and optimizer states in host memory
            (FSDP2's ``CPUOffloadPolicy``): slower, for cards that cannot hold the shards.
        reshard_after_forward: free a block's gathered parameters after its forward (ZeRO-3); false
            keeps them until backward (ZeRO-2: fewer all-gathers, more memory). A network's own
            layers outside its blocks stay gathered either way (see :meth:`shard`).
        sharded_checkpoint: one file per rank (torch.distributed.checkpoint folder) when true; one
            consolidated file written by rank 0 when false.
        process_group_backend: ``nccl`` / ``gloo`` (default: the device's).
        timeout: collective timeout.
    """

    def __init__(
        self,
        replicate_size: int | Literal["nodes"] = 1,
        param_dtype: str | None = "auto",
        reduce_dtype: str | None = "float32",
        master_dtype: str | None = "float32",
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        sharded_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(save_distributed_checkpoint=sharded_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if replicate_size != "nodes" and (isinstance(replicate_size, bool) or not isinstance(replicate_size, int)
                                          or replicate_size < 1):
            raise ConfigError(f"{_KEY}.replicate_size", replicate_size, "must be an integer >= 1 or 'nodes'",
                              "1 shards over all ranks (FSDP); 'nodes' shards within each node (HSDP).")
        self.replicate_size = replicate_size
        self.param_dtype = param_dtype if param_dtype == "auto" else parse_dtype(param_dtype, f"{_KEY}.param_dtype")
        self.reduce_dtype = parse_dtype(reduce_dtype, f"{_KEY}.reduce_dtype")
        self.master_dtype = parse_dtype(master_dtype, f"{_KEY}.master_dtype")
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        #: the mesh the units shard over: 1-D (FSDP) or ("replicate", "shard") (HSDP)
        self.fsdp_mesh = None

    # ------------------------------------------------------------------ processes and mesh
    def setup_environment(self) -> None:
        # Lightning's mesh is (data parallel, tensor parallel) with data parallel = nodes by default;
        # here every rank is data parallel (the sampler splits prompts over all of them)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        replicate = self.num_nodes if self.replicate_size == "nodes" else self.replicate_size
        if self.world_size % replicate:
            raise ConfigError(f"{_KEY}.replicate_size", self.replicate_size,
                              f"the {self.world_size} ranks do not split into {replicate} equal groups",
                              "Use a divisor of the world size (nodes x devices), or 'nodes'.")
        if replicate == 1:
            self.fsdp_mesh = self.device_mesh["data_parallel"]
        else:
            self.fsdp_mesh = init_device_mesh(self.root_device.type, (replicate, self.world_size // replicate),
                                              mesh_dim_names=("replicate", "shard"))

    # ------------------------------------------------------------------ sharding
    def shard(self, module: nn.Module) -> None:
        """``fully_shard`` the units ``module.sharding_units()`` names, in order (blocks before the
        network that holds them); refuse a trainable parameter left outside every unit."""
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        if any(isinstance(m, FSDPModule) for m in module.modules()):
            return  # configure_model runs again when a Trainer is reused: sharded already
        if self.master_dtype is not None:
            for p in module.parameters():
                if p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(self.master_dtype)
        options = dict(mesh=self.fsdp_mesh, mp_policy=MixedPrecisionPolicy(param_dtype=self._compute_dtype(),
                                                                           reduce_dtype=self.reduce_dtype),
                       offload_policy=CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy())
        for unit in module.sharding_units():
            # a unit that holds units is a whole network: its own layers (input projection, time
            # embedding) stay gathered after forward, because the discriminator reads features
            # of inner blocks, so backward runs through those layers without ever reaching the
            # network's output, where FSDP hangs the hook that would gather them again
            network = any(isinstance(m, FSDPModule) for m in unit.modules() if m is not unit)
            fully_shard(unit, **{**options, "reshard_after_forward": False if network else self.reshard_after_forward})
        # full-mode copies made on the meta device (dmdx fit under FSDP2): each rank's shards get
        # storage now, filled from the real score's shards
        module.teacher.fill_role_copies(torch.device("cpu") if self.cpu_offload else self.root_device)
        loose = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if loose:
            raise TypeError(f"{type(module).__name__}.sharding_units() leaves trainable parameters outside every "
                            f"FSDP unit ({loose[:3]}...): each rank would train its own copy of them. Add the "
                            "modules that hold them to sharding_units")

    def _compute_dtype(self) -> torch.dtype | None:
        """``param_dtype`` resolved against ``trainer.precision`` (see the class docstring)."""
        precision = getattr(self.precision_plugin, "precision", "32-true")
        mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        if self.param_dtype == "auto":
            return mixed
        if self.param_dtype is not None and self.param_dtype != torch.float32 and mixed is None:
            raise ConfigError(f"{_KEY}.param_dtype", str(self.param_dtype).removeprefix("torch."),
                              f"gathers the parameters in a lower precision, but trainer.precision is {precision!r}: "
                              "nothing would cast what a network computes outside its parameters (timestep "
                              "embeddings) to match", "Use trainer.precision: bf16-mixed (the GPU configs do), or "
                              "param_dtype: auto (follows the precision) or null.")
        return self.param_dtype

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable state only (the frozen teacher is never written): sharded tensors for a
        checkpoint folder; gathered on rank 0 for a single file (every rank joins each gather)."""
        reshard_units(self.model)  # the sharded parameters (and their requires_grad), not a gathered copy
        keep = self.lightning_module.checkpoint_keys()
        state = {k: v for k, v in self.model.state_dict().items() if k in keep}
        if self._save_distributed_checkpoint:
            return state
        from torch.distributed.tensor import DTensor

        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}
        return full if self.global_rank == 0 else {}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """A player's optimizer state keyed by parameter name: this rank's shards for a checkpoint
        folder; gathered on rank 0 for a single file (Lightning's own single-file path renumbers
        states by position in the whole model, which several optimizers over parts of it do not fit)."""
        if self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        state = get_optimizer_state_dict(self.model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.global_rank == 0 else {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # every rank writes into the same hidden sibling folder, which rank 0 then renames into place
        target = Path(self.broadcast(str(filepath)))
        tmp = target.with_name(self.broadcast(f".partial-{uuid.uuid4().hex}.tmp"))
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self._record_checksums(tmp)
        except BaseException:
            # torch.distributed.checkpoint raises on every rank when one fails (a full disk)
            if self.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier("dmdx_checkpoint_written")
        if self.global_rank == 0:
            _replace(tmp, target)
        self.barrier("dmdx_checkpoint_renamed")

    def _record_checksums(self, folder: Path) -> None:
        """``checksums.json`` in the folder before it is renamed into place: each rank hashes the files
        it wrote (torch.distributed.checkpoint names them ``__<rank>_<n>.distcp``), rank 0 the index
        and the metadata too."""
        import torch.distributed as dist

        mine = {p.name: sha256_file(p) for p in folder.glob(f"__{self.global_rank}_*.distcp")}
        if self.global_rank == 0:
            mine |= {name: sha256_file(folder / name) for name in (".metadata", METADATA_FILE)}
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        if self.global_rank == 0:
            write_json_atomic(folder / SHARDED_MANIFEST, {k: v for part in gathered for k, v in part.items()})

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        path = Path(self.broadcast(str(checkpoint_path)))
        keep = self.lightning_module.checkpoint_keys()
        sharded = is_sharded_checkpoint(path)
        if sharded:
            _agree_intact(lambda: verify_sharded(path, self.global_rank, self.world_size), self)
            saved = {k.removeprefix("state_dict.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
        else:  # a consolidated file: every rank reads it (memory-mapped) and keeps its shards
            _agree_intact(lambda: verify_file(path) if self.global_rank == 0 else None, self)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            saved = checkpoint["state_dict"]
        missing = sorted(k for k in keep if k not in saved)
        if missing:
            raise KeyError(f"checkpoint {path} lacks trainable state {missing[:5]}: it was saved by a different "
                           "configuration (method, discriminator layers or LoRA settings)")
        if not sharded:
            full = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=full)
            for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states")):
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=full)
            return checkpoint
        state = {k: v for k, v in self.model.state_dict().items() if k in keep}
        dcp.load({"state_dict": state}, checkpoint_id=path)  # reshards to this world size
        self.model.load_state_dict(state, strict=False)
        for i, optimizer in enumerate(self.optimizers):
            optim_state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / METADATA_FILE, map_location="cpu", weights_only=True)


def _agree_intact(check, strategy) -> None:
    """Run this rank's part of a checksum check; if any rank found damage, every rank raises
    (the damaged rank its own message), so none waits alone in the next collective."""
    try:
        check()
        damaged = None
    except CorruptCheckpointError as e:
        damaged = e
    if bool(strategy.reduce(torch.tensor(float(damaged is not None), device=strategy.root_device), reduce_op="max")):
        raise damaged or CorruptCheckpointError("another rank found the checkpoint damaged (its output names the file)")


def _replace(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` at ``target``, over a previous checkpoint of that name.

    A folder cannot be renamed over a non-empty one, so the old one moves aside first and is
    deleted last: a crash in between leaves the old checkpoint under its hidden name, never a
    half-written one under ``target``.
    """
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".partial-{uuid.uuid4().hex}.old")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
