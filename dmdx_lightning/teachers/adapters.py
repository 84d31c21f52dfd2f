"""LoRA roles on one shared network (``mode="lora"``): switching at constant cost, a lean adapter forward.

In lora mode the student and the fake score are two peft adapters on the frozen teacher's network,
and the real score is that network with no adapter. An iteration switches between them several
times (each player's passes, and again during backward, where checkpointed blocks are recomputed
in the role they ran in).

peft keeps the active adapter per layer: ``set_adapter`` / ``enable_adapters`` walk every adapter
layer and rewrite every adapter parameter's ``requires_grad``, which optimizer toggling then had to
restore, a walk over every module and parameter of the network per switch (on SDXL ~700 adapted
layers, ~2800 adapter tensors). A layer's forward only *reads* its ``_active_adapter`` list (peft's
``active_adapters`` property returns it as is). :class:`RoleAdapters` hands every layer the same
list object, so a switch is one in-place assignment to that list, whatever the network's size;
which parameters train is decided once, when the roles are set up, and by optimizer toggling.

:class:`RoleLoraLinear` is peft's ``lora.Linear`` with a shorter forward for this one-adapter-at-a-
time use (no per-call argument checks, no ``lora_A`` / ``lora_B`` / dropout module calls; the
scaled sum in one op). Folding the adapter into the weight for gradient-free passes was tried and
dropped: no measurable gain on the topology benchmark, and in bf16 ``W + s B A`` rounds the
adapter's small update to the base weight's resolution, so sampling would not match training.
State-dict names, merging and peft's own API are unchanged; a layer that uses anything the short
path does not handle (dropout, a variant such as DoRA, ``fan_in_fan_out``, adapter bias, extra call
arguments, merged weights) takes peft's forward.

Both rely on peft internals (``_active_adapter``, the layer's attribute names), checked against
peft's own switch in tests/test_roles.py; peft is pinned in constraints.txt. The cost is measured by
benchmarks/topology.py (role switches per iteration, LoRA / full time per iteration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn


class RoleLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` whose forward handles the plain case in four ops (see the module docstring)."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        active = self._active_adapter
        if args or kwargs or self.disable_adapters or self.merged or isinstance(active, str) or len(active) > 1:
            return super().forward(x, *args, **kwargs)
        if not active:  # the frozen teacher
            return self.base_layer(x)
        role = active[0]
        a, b, base = self.lora_A[role].weight, self.lora_B[role].weight, self.base_layer
        result = base(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)  # fp32 adapters on a bf16 base (peft casts the same way)
        update = F.linear(F.linear(x, a), b)
        # peft: (result + B(A x) * scaling) in the promoted dtype, cast back to the base layer's
        return torch.add(result, update, alpha=self.scaling[role]).to(result.dtype)


def _plain(layer: nn.Module) -> bool:
    """Whether ``layer`` is a peft LoRA ``Linear`` whose every adapter is plain (what the short forward computes)."""
    if type(layer) not in (LoraLinear, RoleLoraLinear) or layer.fan_in_fan_out or layer.lora_variant:
        return False
    return all(isinstance(layer.lora_dropout[name], nn.Identity) and layer.lora_B[name].bias is None
               for name in layer.lora_A)


class RoleAdapters:
    """The peft layers of one network, all reading their active adapter from one shared list.

    Args:
        network: a module with peft adapters injected (``inject_adapter_in_model``).
    """

    def __init__(self, network: nn.Module) -> None:
        self.layers = [m for m in network.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError(f"{type(network).__name__} has no peft adapter layers")
        #: the adapters every layer runs: ``[]`` the frozen network, ``[role]`` one adapter
        self.active: list[str] = []
        #: adapter changes so far (benchmarks and tests count them; a count, not a time)
        self.switches = 0
        self.bind()

    def bind(self) -> None:
        """Give every layer the shared list (again, after something called peft's own switch, which
        replaces each layer's list), and the short forward where it computes the same."""
        for layer in self.layers:
            # object.__setattr__: the attributes peft's properties read, set without its requires_grad walk
            object.__setattr__(layer, "_active_adapter", self.active)
            object.__setattr__(layer, "_disable_adapters", False)
            if _plain(layer):
                layer.__class__ = RoleLoraLinear

    def set(self, adapter: str | None) -> None:
        """Run ``adapter`` (``None``: no adapter) in every layer, at constant cost."""
        if self.layers[0]._active_adapter is not self.active:
            self.bind()
        wanted = [] if adapter is None else [adapter]
        if self.active != wanted:
            self.active[:] = wanted
            self.switches += 1
