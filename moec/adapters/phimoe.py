"""PhiMoE: sparsemixer routing (two masked softmaxes, eval mode), router at `.router`."""

from moec.ops.moe import MoESpec

from .base import Adapter


class PhimoeAdapter(Adapter):
    model_type = "phimoe"
    router_attr = "router"

    def spec(self, layer):
        return MoESpec(layer=layer, top_k=self.config.num_experts_per_tok, scoring="sparsemixer",
                       normalize=False, jitter_eps=float(self.config.router_jitter_noise))
