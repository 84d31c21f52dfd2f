"""What Lightning's distributed strategies need from modules that optimize manually, several
players per iteration: DDP must find unused parameters, FSDP must finish each manual backward,
FSDP ranks must run the same network passes, FSDP2 units must gather afresh for each player, and
parameter names lose FSDP's wrapper parts before they meet state-dict keys.
"""

from __future__ import annotations

import torch

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without FSDP / activation-checkpoint wrapper parts (the state-dict key)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def check_ddp_finds_unused_parameters(strategy) -> None:
    """Refuse DDP that expects every parameter to get a gradient in every backward.

    Each player's backward reaches only its own parameters (the others are frozen by
    ``toggled_optimizer``), so DDP with ``find_unused_parameters=False`` (Lightning's plain ``ddp``,
    also what ``devices: auto`` picks on a multi-GPU node) fails within the first steps (DDP's
    "Expected to have finished reduction in the prior iteration"); this says so before training.
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, XLAStrategy

    if not isinstance(strategy, DDPStrategy) or isinstance(strategy, (DeepSpeedStrategy, XLAStrategy)):
        return  # the two subclasses do not wrap the model in torch's DistributedDataParallel
    # the keyword arguments Lightning passes to DistributedDataParallel (no public accessor)
    if not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise ValueError(
            "trainer.strategy is DDP with find_unused_parameters=False, but each player's backward uses "
            "only its own parameters: set trainer.strategy to ddp_find_unused_parameters_true (or give "
            "lightning.pytorch.strategies.DDPStrategy init_args {find_unused_parameters: true}), as "
            "configs/trainer/ddp_cpu.yaml does")


def same_pass_count(value: int, strategy) -> int:
    """``value`` as rank 0 drew it under FSDP, this rank's own otherwise.

    For random choices that set how many network passes an iteration makes (e.g. how many student
    steps backward simulation runs). Under FSDP every forward of a unit is an all-gather, so the
    ranks must make the same passes in the same order; ranks that drew different counts exchanged
    mismatched tensors (gloo: "Received data size doesn't match expected size") or hung. Under DDP
    passes are local and each rank keeps its own draw. Every rank still draws, so the RNG streams
    advance as without FSDP.
    """
    if not shards_parameters(strategy) or strategy.world_size < 2:
        return value
    return int(strategy.broadcast(int(value), src=0))


def finish_fsdp_backward(root: torch.nn.Module) -> None:
    """Do what FSDP's post-backward final callback does, after a backward run inside the root's forward.

    Lightning runs ``training_step`` INSIDE the root FSDP unit's forward, and manual optimization
    calls ``manual_backward`` there. FSDP queues its end-of-backward callback only from the root's
    pre-backward hook, which hangs on the root forward's outputs, so it never runs
    (Lightning-AI/pytorch-lightning#19685). Units then stay in their backward state: a unit whose
    parameters do not require grad (the frozen real score under the discriminator and generator
    losses, and the roles Lightning's ``toggled_optimizer`` freezes for one player) is unsharded
    for backward by its pre-backward hook but has no post-backward hook to reshard it, so its
    parameters remain plain tensors outside ``_parameters``: the full state dict then fails with
    "FSDP assumes ...transformer_blocks.0.norm1.linear.weight is in the state_dict", training
    states never return to IDLE, and with FULL_SHARD the sharded gradients are never handed to
    the optimizer. This finishes every non-root unit as torch's ``_post_backward_final_callback``
    does. The root unit is still in its forward (its own parameters, if any, stay unsharded until
    its post-forward) and is left alone. A no-op for a model that is not FSDP.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(root, FullyShardedDataParallel) or not getattr(root, "_is_root", False):
        return
    from torch.distributed.fsdp import _runtime_utils as rt
    from torch.distributed.fsdp._common_utils import TrainingState
    from torch.distributed.fsdp._flat_param import HandleTrainingState

    if root._sync_gradients:  # gradient reductions run on side streams: wait for them first
        current = root._device_handle.current_stream()
        current.wait_stream(root._post_backward_stream)
        if root._all_reduce_stream is not current:
            current.wait_stream(root._all_reduce_stream)
        if root.cpu_offload.offload_params:
            current.synchronize()
    with torch.no_grad():
        for state in root._all_fsdp_states:
            if state is root:
                continue
            rt._catch_all_reshard(state)
            rt._finalize_params(state)
            state.training_state = TrainingState.IDLE
            handle = state._handle
            if handle:
                handle._ran_pre_backward_hook = False
                handle._needs_pre_backward_unshard = False
                handle._post_forward_index = None
                handle._training_state = HandleTrainingState.IDLE
                handle._prefetched = False


def reshard_units(root: torch.nn.Module) -> None:
    """Free every FSDP2 unit's gathered parameters, so each unit's next forward gathers afresh.

    The units of whole networks stay gathered after their forward (see
    :meth:`dmdx_lightning.strategies.FSDP2Strategy.shard`), and FSDP2 skips the gather of a unit
    that is still gathered. Its next forward would then run on the values from before the last
    optimizer step, with the ``requires_grad`` of the last gather (a player's trainable network,
    frozen by ``toggled_optimizer`` for the next player, would still collect gradients there, which
    the next update of its own player would add). Called before every player's step; a no-op
    without FSDP2.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shards_parameters(strategy) -> bool:
    """Whether every forward is a collective that all ranks must join (FSDP, FSDP2), so work outside a
    training step (sample grids) must run on every rank, not on rank 0 alone."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def summary_ranks(trainer) -> tuple[bool, bool]:
    """``(this rank samples, every rank samples)`` for work rank 0 scores and writes alone (end-of-fit
    summaries): under FSDP / FSDP2 every forward is a collective, so every rank samples with rank 0
    (alone it would wait forever for the others); otherwise the other ranks have nothing to do."""
    everyone = trainer.world_size > 1 and shards_parameters(trainer.strategy)
    return trainer.is_global_zero or everyone, everyone


def outside_training_step(strategy):
    """A context for network passes outside Lightning's forward (sample grids, summaries).

    Under FSDP the parameters that no nested FSDP unit owns (the VAE, the text encoders, anything
    the auto-wrap policy left in the root unit) are flat shards, materialised only during the
    root's own forward; called directly they are 1-D views ("weight should have at least three
    dimensions"). This gathers the root unit's parameters alone (``recurse=False``: the wrapped
    blocks gather themselves as usual), on every rank, so every rank must enter it. Elsewhere it
    does nothing.
    """
    from contextlib import nullcontext

    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(strategy, FSDPStrategy):
        return nullcontext()  # FSDP2 units gather themselves in any forward; what they leave out is whole
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(strategy.model, recurse=False, writeback=False)
