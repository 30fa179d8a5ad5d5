"""What every architecture adapter states: where the router, experts and shared experts live.

The rest of the compiler speaks only this vocabulary (layer, router, expert gate/up/down,
shared expert); each family's quirks stay in its own adapter module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moec.ops.moe import MoESpec, route


@dataclass
class MoEBlock:
    """One sparse layer in canonical form: weights in [out, in] layout, gate and up separate."""

    spec: MoESpec
    path: str                        # module path in the model, e.g. "model.layers.3.mlp"
    router_weight: torch.Tensor      # [E, H]
    gate: torch.Tensor               # [E, I, H]
    up: torch.Tensor                 # [E, I, H]
    down: torch.Tensor               # [E, H, I]
    router_bias: torch.Tensor | None = None
    score_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    shared: nn.Module | None = None  # maps hidden [T, H] to the shared experts' output [T, H]

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights, expert indices) [T, k] of the layer's own routing for hidden states x [T, H]."""
        as_np = lambda t: None if t is None else t.detach().float().numpy()  # noqa: E731
        logits = x @ as_np(self.router_weight).T
        if self.router_bias is not None:
            logits = logits + as_np(self.router_bias)
        return route(logits, self.spec, as_np(self.score_bias))


class Adapter:
    """Base adapter: MoE blocks live at `model.layers[i].<moe_attr>` with `.experts` inside."""

    model_type: str
    moe_attr = "mlp"
    router_attr = "gate"
    returns_router_scores = False  # gpt-oss's block returns (hidden, scores)

    def __init__(self, config):
        self.config = config

    def check_config(self) -> None:
        """Raise MoecError for configurations the exporter cannot represent."""

    def spec(self, layer: int) -> MoESpec:
        raise NotImplementedError

    def layer_modules(self, model) -> list[nn.Module]:
        return list(model.model.layers)

    def is_sparse(self, module: nn.Module) -> bool:
        return hasattr(module, "experts")

    def routed_experts(self, model) -> list[nn.Module]:
        """The modules holding the routed experts' weights, one per sparse layer."""
        return [getattr(layer, self.moe_attr).experts for layer in self.layer_modules(model)
                if self.is_sparse(getattr(layer, self.moe_attr))]

    def blocks(self, model) -> list[MoEBlock]:
        """The model's sparse layers, in layer order, in canonical form."""
        blocks = []
        for i, layer in enumerate(self.layer_modules(model)):
            module = getattr(layer, self.moe_attr)
            if self.is_sparse(module):
                blocks.append(self.block(i, module, f"model.layers.{i}.{self.moe_attr}"))
        return blocks

    def block(self, layer: int, module: nn.Module, path: str) -> MoEBlock:
        """Default: fused `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I]."""
        experts = module.experts
        gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
        router = getattr(module, self.router_attr)
        return MoEBlock(
            spec=self.spec(layer), path=path,
            router_weight=router.weight.detach(),
            router_bias=None if getattr(router, "bias", None) is None else router.bias.detach(),
            gate=gate, up=up, down=experts.down_proj.detach(),
            shared=self.shared(module),
        )

    def shared(self, module: nn.Module) -> nn.Module | None:
        return None
