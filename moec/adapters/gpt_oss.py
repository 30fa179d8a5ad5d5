"""gpt-oss: router with bias, top-k then softmax, clamped SwiGLU experts with biases.

Its experts are stored [E, H, 2I] with gate and up interleaved on the last axis, and
[E, I, H] for down; the adapter turns them into the canonical [out, in] layout.
The block returns (hidden, router_scores).
"""

from moec.ops.moe import MoESpec

from .base import Adapter, MoEBlock


class GptOssAdapter(Adapter):
    model_type = "gpt_oss"
    router_attr = "router"
    returns_router_scores = True

    def spec(self, layer):
        c = self.config
        return MoESpec(layer=layer, top_k=c.num_experts_per_tok, activation="clamped_swiglu",
                       swiglu_alpha=float(c.swiglu_alpha), swiglu_limit=float(c.swiglu_limit))

    def block(self, layer, module, path):
        experts, router = module.experts, module.router
        gate_up = experts.gate_up_proj.detach().transpose(1, 2)  # [E, 2I, H], rows interleaved
        gate_up_bias = experts.gate_up_proj_bias.detach()
        return MoEBlock(
            spec=self.spec(layer), path=path,
            router_weight=router.weight.detach(), router_bias=router.bias.detach(),
            gate=gate_up[:, 0::2].contiguous(), up=gate_up[:, 1::2].contiguous(),
            down=experts.down_proj.detach().transpose(1, 2).contiguous(),
            gate_bias=gate_up_bias[:, 0::2].contiguous(), up_bias=gate_up_bias[:, 1::2].contiguous(),
            down_bias=experts.down_proj_bias.detach(),
        )
