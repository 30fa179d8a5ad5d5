"""DeepSeek-V3: sigmoid scores, bias-corrected group-limited selection, scaled weights.

The first `first_k_dense_replace` layers are dense and stay as traced; the shared experts
are added outside the MoE node.
"""

from moec.ops.moe import MoESpec

from .base import Adapter


class DeepseekV3Adapter(Adapter):
    model_type = "deepseek_v3"

    def spec(self, layer):
        c = self.config
        return MoESpec(layer=layer, top_k=c.num_experts_per_tok, scoring="sigmoid",
                       normalize=bool(c.norm_topk_prob), scaling=float(c.routed_scaling_factor),
                       n_group=int(c.n_group), topk_group=int(c.topk_group))

    def block(self, layer, module, path):
        block = super().block(layer, module, path)
        block.score_bias = module.gate.e_score_correction_bias.detach()
        return block

    def shared(self, module):
        return module.shared_experts
