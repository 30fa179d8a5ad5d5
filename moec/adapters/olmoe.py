"""OLMoE: softmax top-k with optional renormalisation (off in the released models)."""

from moec.ops.moe import MoESpec

from .base import Adapter


class OlmoeAdapter(Adapter):
    model_type = "olmoe"

    def spec(self, layer):
        return MoESpec(layer=layer, top_k=self.config.num_experts_per_tok,
                       normalize=bool(self.config.norm_topk_prob))
