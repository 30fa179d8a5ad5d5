"""GraniteMoE: top-k on the logits then softmax over the k (= softmax top-k renormalised)."""

from moec.ops.moe import MoESpec

from .base import Adapter


class GraniteMoeAdapter(Adapter):
    model_type = "granitemoe"
    moe_attr = "block_sparse_moe"
    router_attr = "router"

    def spec(self, layer):
        return MoESpec(layer=layer, top_k=self.config.num_experts_per_tok)
