"""Qwen3-MoE: softmax top-k with optional renormalisation; no shared expert."""

from moec.ops.moe import MoESpec

from .base import Adapter


class Qwen3MoeAdapter(Adapter):
    model_type = "qwen3_moe"

    def spec(self, layer):
        return MoESpec(layer=layer, top_k=self.config.num_experts_per_tok,
                       normalize=bool(self.config.norm_topk_prob))
