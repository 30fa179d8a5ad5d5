"""Gated-DeltaNet linear attention (Qwen3-Next and the families built like it) made exportable.

transformers computes the gated delta rule in Python loops over tokens or chunks whose count is the
sequence length, which torch.onnx cannot export with a dynamic sequence. While tracing, the
family's `torch_chunk_gated_delta_rule` and `torch_recurrent_gated_delta_rule` (the names are
transformers' own, shared by every family that uses the rule) become one `moec::gated_delta_rule`
call, whose ONNX translation is the recurrent form as an ONNX Scan over the sequence: one graph for
prefill and decode, carrying the recurrent state in and out. Everything around the rule (the
projections, the causal convolution and its state, the gated norm) stays the family's own code.
"""

from __future__ import annotations

import contextlib
import importlib

import onnxscript
import torch
from onnxscript import FLOAT
from onnxscript import opset18 as op  # the opset torch.onnx builds with, as the function is inlined into it

# transformers' names of the rule's implementations, replaced in a family's modeling module while tracing
RULE_FUNCTIONS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
# other linear-attention rules transformers computes in Python loops over the sequence, which moec
# has no exportable form of yet: refused by name rather than left to a long, failing export
UNEXPORTED_RULES = {"chunk_kimi_delta_attention": "Kimi delta attention"}


@torch.library.custom_op("moec::gated_delta_rule", mutates_args=())
def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, initial_state: torch.Tensor,
                     use_qk_l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' recurrent gated delta rule: query/key [B, T, Hk, Dk], value [B, T, Hv, Dv],
    g/beta [B, T, Hv], state [B, Hv, Dk, Dv] -> (output [B, T, Hv, Dv], final state)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    out, state = torch_recurrent_gated_delta_rule(query, key, value, g, beta, initial_state=initial_state,
                                                  output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm)
    return out.clone(), state.clone()


@gated_delta_rule.register_fake
def _(query, key, value, g, beta, initial_state, use_qk_l2norm):
    return value.new_empty(value.shape, dtype=query.dtype), initial_state.new_empty(initial_state.shape,
                                                                                     dtype=torch.float32)


def exportable_rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                    use_qk_l2norm_in_kernel=False, **kwargs):
    """Stands in for both of transformers' implementations (same arguments, same results)."""
    if initial_state is None:
        initial_state = torch.zeros(key.shape[0], value.shape[2], key.shape[3], value.shape[3],
                                    dtype=torch.float32, device=key.device)
    out, state = torch.ops.moec.gated_delta_rule(query, key, value, g, beta, initial_state.float(),
                                                 bool(use_qk_l2norm_in_kernel))
    return out, (state if output_final_state else None)


@contextlib.contextmanager
def exportable_linear_attention(model: torch.nn.Module):
    """While tracing, the model's modeling module computes the gated delta rule with
    moec::gated_delta_rule (a no-op for a family without the rule)."""
    from moec.errors import Unsupported

    modeling = importlib.import_module(type(model).__module__)
    for function, rule in UNEXPORTED_RULES.items():
        if hasattr(modeling, function):
            raise Unsupported(model.config.model_type, "attention", f"its linear attention computes {rule}, "
                              "which moec does not export yet")
    saved = {name: getattr(modeling, name) for name in RULE_FUNCTIONS if hasattr(modeling, name)}
    for name in saved:
        setattr(modeling, name, exportable_rule)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(modeling, name, function)


@onnxscript.script(onnxscript.values.Opset("moec", 1), default_opset=op)
def DeltaRuleScan(initial_state: FLOAT, query: FLOAT, key: FLOAT, value: FLOAT, decay: FLOAT,
                  beta: FLOAT) -> tuple[FLOAT, FLOAT]:
    """The recurrent form over time-major inputs: state [B, H, Dk, Dv]; query/key [T, B, H, Dk];
    value [T, B, H, Dv]; decay/beta [T, B, H] -> (final state, outputs [T, B, H, Dv])."""
    def step(state: FLOAT[...], q: FLOAT[...], k: FLOAT[...], v: FLOAT[...], d: FLOAT[...], b: FLOAT[...]):
        decayed = state * op.Unsqueeze(op.Exp(d), [2, 3])
        column_key = op.Unsqueeze(k, [3])
        delta = (v - op.ReduceSum(decayed * column_key, [2], keepdims=0)) * op.Unsqueeze(b, [2])
        updated = decayed + column_key * op.Unsqueeze(delta, [2])
        return updated, op.ReduceSum(updated * op.Unsqueeze(q, [3]), [2], keepdims=0)

    final_state, outputs = op.Scan(initial_state, query, key, value, decay, beta, body=step, num_scan_inputs=5)
    return final_state, outputs


def _heads(x, groups: int):
    """[B, T, Hk, D] -> [T, B, Hk * groups, D], each head repeated `groups` times in place."""
    if groups > 1:
        x = op.Reshape(op.Expand(op.Unsqueeze(x, [3]), op.Constant(value_ints=[1, 1, 1, groups, 1])),
                       op.Constant(value_ints=[0, 0, x.shape[2] * groups, x.shape[3]]))
    return op.Transpose(x, perm=[1, 0, 2, 3])


def _l2_normalized(x):
    return x * op.Reciprocal(op.Sqrt(op.ReduceSum(x * x, [-1], keepdims=1) + op.Constant(value_float=1e-6)))


def onnx_gated_delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm):
    """torch.onnx translation of moec::gated_delta_rule: the recurrent form as a Scan over tokens."""
    groups, key_size = value.shape[2] // key.shape[2], key.shape[3]
    query = op.Cast(_heads(query, groups), to=onnxscript.ir.DataType.FLOAT)
    key = op.Cast(_heads(key, groups), to=onnxscript.ir.DataType.FLOAT)
    if use_qk_l2norm:
        query, key = _l2_normalized(query), _l2_normalized(key)
    query = query * op.Constant(value_float=float(key_size) ** -0.5)
    value = op.Cast(op.Transpose(value, perm=[1, 0, 2, 3]), to=onnxscript.ir.DataType.FLOAT)
    g, beta = (op.Cast(op.Transpose(x, perm=[1, 0, 2]), to=onnxscript.ir.DataType.FLOAT) for x in (g, beta))
    state, out = DeltaRuleScan(initial_state, query, key, value, g, beta)  # inlined by torch.onnx's optimizer
    state.dtype = out.dtype = onnxscript.ir.DataType.FLOAT  # the recorder does not infer through a Scan
    return op.Transpose(out, perm=[1, 0, 2, 3]), state
