"""Mixtral: softmax over all experts, top-k, always renormalised."""

from moec.ops.moe import MoESpec

from .base import Adapter


class MixtralAdapter(Adapter):
    model_type = "mixtral"

    def spec(self, layer):
        return MoESpec(layer=layer, top_k=self.config.num_experts_per_tok)
