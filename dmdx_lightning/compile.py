"""``torch.compile`` for a teacher's networks, one feature block at a time.

:func:`compile_blocks` compiles the forward of every block :meth:`Teacher.network_blocks` returns
(SD3 / CogVideoX: the transformer blocks; SDXL: the UNet's down / mid / up blocks; digits: its
residual blocks), in every distinct network of the teacher; everything between the blocks (patch
embedding, time and text projections, the output layer) stays eager.
"""

from __future__ import annotations

import inspect
import types
from typing import Callable

import torch
from torch import nn

from dmdx_lightning.teachers.base import ROLES, Teacher

#: set on a block whose forward :func:`compile_blocks` replaced (what makes it idempotent)
COMPILED = "_dmdx_compiled_forward"
#: graphs dynamo may keep per compiled function. Its default, 8, is per code object, and all the
#: blocks of a class share one; ADM runs each block class in 4 (digits, full mode) to 23 (SD3, the
#: shipped 4-step lora config) states: role, grad mode, which inputs and parameters require grad,
#: batch size, the last SD3 block's other layout (benchmarks/results/compile.md). Past the limit
#: dynamo runs the block eagerly in every new state, after one warning.
RECOMPILE_LIMIT = 64


def compile_blocks(teacher: Teacher, *, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None, fullgraph: bool = False) -> int:
    """Compile the forward of every feature block of every distinct network of ``teacher`` in place;
    returns how many blocks it compiled (0 when called again: blocks already compiled are skipped).

    The networks are ``teacher.denoiser`` and, in full mode, each built role's own copy
    (``teacher.network(role)``), each once (in lora mode every role is the one shared base).
    The keyword arguments are ``torch.compile``'s.

    Why per block and not the whole network: a diffusion transformer or UNet is a stack of a few
    block classes repeated (SD3-Medium: 24 joint blocks), and blocks of one class share a compiled
    graph (dynamo caches per code object), so compile time and graph size are those of a block,
    not of the network; and per-block FSDP2 sharding and gradient checkpointing call the blocks one
    by one, each block a unit of their own, which a whole-network graph would have to fit around.

    Why the forward (``block.forward = compiled``) and not ``Module.compile()``:
    ``Module.compile`` compiles ``Module._call_impl``, the forward together with the module's
    hooks, so the discriminator's feature hooks (which capture a block's output and may stop the
    network's forward early by raising) and FSDP2's per-module pre/post-forward hooks (which
    all-gather and reshard) would be traced into the graph. Replacing the forward keeps the hooks
    outside the compiled region, run eagerly by ``nn.Module.__call__``, and leaves the module's
    identity, its parameter names and its state-dict keys unchanged (no ``_orig_mod.`` prefix).

    Call it on a built teacher: it compiles the networks that exist then (a network deep-copied
    afterwards has a compiled forward too, bound to the copy); under FSDP2 after ``fully_shard``
    (whose hooks then stay around the compiled forward). Under gradient checkpointing the
    checkpoint wraps the block's call, so the compiled forward runs inside it, and again when
    backward recomputes the block.

    Compilation happens at the first forward of each block class in each new state, not here: per
    role in lora mode (the active adapter is a guard), with and without gradient, per player
    (Lightning's optimizer toggling flips the other players' ``requires_grad``), and at a second
    batch size (CFG doubles the batch), after which ``dynamic=None`` compiles a graph with a
    dynamic batch dimension (``dynamic=False``: one graph per batch size); so the first iterations
    are slow. It raises dynamo's ``recompile_limit`` to at least :data:`RECOMPILE_LIMIT` (a
    process-wide setting) so that every state gets a graph; ``torch._dynamo.utils.counters``
    counts them (``["stats"]["unique_graphs"]``; ``["frames"]["total"] - ["frames"]["ok"]``: frames
    dynamo gave up on and ran eagerly).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    options = dict(backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    compiled: dict[Callable, Callable] = {}  # one compiled function per forward shared by blocks of a class
    count = 0
    for net in _networks(teacher):
        for block in teacher.network_blocks(net):
            if getattr(block, COMPILED, False):
                continue
            forward = block.forward
            if inspect.ismethod(forward) and forward.__self__ is block:
                # the class's function rebound to the block: ``copy.deepcopy`` rebinds a method to
                # the copy, where a compiled bound method would keep running the original's weights
                function = forward.__func__
                if function not in compiled:
                    compiled[function] = torch.compile(function, **options)
                block.forward = types.MethodType(compiled[function], block)
            else:  # a forward some library already wrapped (e.g. a diffusers hook): compiled as it is
                block.forward = torch.compile(forward, **options)
            setattr(block, COMPILED, True)
            count += 1
    return count


def _networks(teacher: Teacher) -> list[nn.Module]:
    """``teacher.denoiser`` and every built role's network, each once (by identity)."""
    networks: list[nn.Module] = []
    for net in [teacher.denoiser, *(teacher.network(role) for role in ROLES if role in teacher.build_roles)]:
        if not any(net is seen for seen in networks):
            networks.append(net)
    return networks
