"""Qwen2-MoE: softmax top-k with optional renormalisation, plus a sigmoid-gated shared expert.

Dense layers (mlp_only_layers, decoder_sparse_step) have no `.experts` and stay as traced.
"""

import torch
from torch import nn

from moec.ops.moe import MoESpec

from .base import Adapter


class GatedSharedExpert(nn.Module):
    """sigmoid(shared_expert_gate(x)) * shared_expert(x), as Qwen2-MoE adds it (its one-output
    gate is a router, kept in float)."""

    def __init__(self, expert: nn.Module, router: nn.Module):
        super().__init__()
        self.expert, self.router = expert, router

    def forward(self, x):
        return torch.sigmoid(self.router(x)) * self.expert(x)


class Qwen2MoeAdapter(Adapter):
    model_type = "qwen2_moe"

    def spec(self, layer):
        return MoESpec(layer=layer, top_k=self.config.num_experts_per_tok,
                       normalize=bool(self.config.norm_topk_prob))

    def shared(self, module):
        return GatedSharedExpert(module.shared_expert, module.shared_expert_gate)
