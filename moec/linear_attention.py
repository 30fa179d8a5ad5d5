"""Delta-rule linear attention (Qwen3-Next's Gated DeltaNet, Kimi's delta attention, and the families
built like them) made exportable.

transformers computes the rule in Python loops over tokens or chunks whose count is the sequence
length, which torch.onnx cannot export with a dynamic sequence. While tracing, the family's
implementations (transformers' own names, shared by every family that uses the rule) become one
`moec::gated_delta_rule` call, whose ONNX translation is the recurrent form as an ONNX Scan over the
sequence (with more than one token, a Scan over chunks: of 32 tokens with one decay per head, of 8
with a decay per key channel):
one graph for prefill and decode, carrying the recurrent state in and out. The decay is
per head (the gated delta rule) or per head and key channel (Kimi delta attention); everything
around the rule (the projections, the causal convolution and its state, the gated norm) stays the
family's own code.
"""

from __future__ import annotations

import contextlib
import importlib

import onnxscript
import torch
from onnxscript import FLOAT
from onnxscript import opset18 as op  # the opset torch.onnx builds with, as the function is inlined into it

# transformers' names of the rule's implementations, replaced in a family's modeling module while
# tracing: the gated delta rule's, then Kimi delta attention's
RULE_FUNCTIONS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                  "chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")


@torch.library.custom_op("moec::gated_delta_rule", mutates_args=())
def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, initial_state: torch.Tensor,
                     use_qk_l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' recurrent delta rule: query/key [B, T, Hk, Dk], value [B, T, Hv, Dv], beta
    [B, T, Hv], the log decay g [B, T, Hv] (gated delta rule) or [B, T, Hv, Dk] (Kimi delta
    attention), state [B, Hv, Dk, Dv] -> (output [B, T, Hv, Dv], final state)."""
    if g.dim() == 4:
        from transformers.models.kimi_linear.modeling_kimi_linear import recurrent_kimi_delta_attention as rule
    else:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule as rule
    out, state = rule(query, key, value, g=g, beta=beta, initial_state=initial_state, output_final_state=True,
                      use_qk_l2norm_in_kernel=use_qk_l2norm)
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
    """While tracing, the model's modeling module computes its delta rule with moec::gated_delta_rule
    and its Mamba scan with moec::selective_scan (a no-op for a family without either)."""
    modeling = importlib.import_module(type(model).__module__)
    saved = {name: getattr(modeling, name) for name in (*RULE_FUNCTIONS, SCAN_FUNCTION) if hasattr(modeling, name)}
    for name in saved:
        setattr(modeling, name, exportable_scan if name == SCAN_FUNCTION else exportable_rule)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(modeling, name, function)


@onnxscript.script(onnxscript.values.Opset("moec", 1), default_opset=op)
def DeltaRule(initial_state: FLOAT[...], query: FLOAT[...], key: FLOAT[...], value: FLOAT[...], decay: FLOAT[...],
              beta: FLOAT[...]) -> tuple[FLOAT[...], FLOAT[...]]:
    """The rule over time-major inputs: state [B, H, Dk, Dv]; query/key [T, B, H, Dk]; value
    [T, B, H, Dv]; log decay [T, B, H, Dk or 1]; beta [T, B, H] -> (final state, outputs
    [T, B, H, Dv]).

    One token (a decode step): the recurrent form, a Scan over tokens. Several tokens: the chunked
    form, a Scan over chunks of 32 tokens with one decay per head, of 8 with a decay per key channel
    (Kimi's) (of all of them when fewer), the sequence zero-padded to whole chunks (a padded token
    has no key and no beta: it changes nothing). Within a chunk, with G the cumulative log decay and
    S the state at its start, the updates U solve (I + A) U = beta (V - exp(G) K S), A strictly lower
    triangular, A[t, s] = beta_t (k_t . k_s) exp(G_t - G_s); (I + A)^-1 is the product (I - A)
    (I + A^2)(I + A^4)(I + A^8)(I + A^16), exact because A^32 = 0. Then the outputs are
    exp(G) Q S + (Q K^T, decayed and masked to s <= t) U and the next state
    exp(G_last) S + (exp(G_last - G) K)^T U. Every exponent is <= 0. With a decay per key channel
    the decays between tokens are a [8, 8, Dk] tensor a head, summed over Dk in A and in the scores,
    and the inverse needs (I - A)(I + A^2)(I + A^4); chunks of 32 ran slower than the Scan over
    tokens at 512 tokens, chunks of 8 faster than chunks of 16 (docs/measurements.md)."""
    def token(state: FLOAT[...], q: FLOAT[...], k: FLOAT[...], v: FLOAT[...], d: FLOAT[...], b: FLOAT[...]):
        decayed = state * op.Unsqueeze(op.Exp(d), [3])
        column_key = op.Unsqueeze(k, [3])
        delta = (v - op.ReduceSum(decayed * column_key, [2], keepdims=0)) * op.Unsqueeze(b, [2])
        updated = decayed + column_key * op.Unsqueeze(delta, [2])
        return updated, op.ReduceSum(updated * op.Unsqueeze(q, [3]), [2], keepdims=0)

    def chunk(state: FLOAT[...], q: FLOAT[...], k: FLOAT[...], v: FLOAT[...], g: FLOAT[...], b: FLOAT[...]):
        index = op.Range(op.Constant(value_int=0), op.Shape(q, start=2, end=3)[0], op.Constant(value_int=1))
        rows = op.Unsqueeze(index, [1])
        cols = op.Unsqueeze(index, [0])
        strict = op.Cast(op.Greater(rows, cols), to=1)
        eye = op.Cast(op.Equal(rows, cols), to=1)
        total = op.CumSum(g, op.Constant(value_int=2))  # [B, H, 32, 1]
        weight = op.Exp(op.Where(op.GreaterOrEqual(rows, cols), total - op.Transpose(total, perm=[0, 1, 3, 2]),
                                 op.Constant(value_float=-1e30)))
        a = op.MatMul(k, op.Transpose(k, perm=[0, 1, 3, 2])) * weight * strict * b
        power = op.MatMul(a, a)
        inverse = op.MatMul(eye - a, eye + power)
        power = op.MatMul(power, power)
        inverse = op.MatMul(inverse, eye + power)
        power = op.MatMul(power, power)
        inverse = op.MatMul(inverse, eye + power)
        power = op.MatMul(power, power)
        inverse = op.MatMul(inverse, eye + power)
        updates = op.MatMul(inverse, b * (v - op.MatMul(k * op.Exp(total), state)))
        scores = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])) * weight
        out = op.MatMul(q * op.Exp(total), state) + op.MatMul(scores, updates)
        last = op.Slice(total, op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**31]),
                        op.Constant(value_ints=[2]))
        carried = op.Transpose(op.Exp(last - total) * k, perm=[0, 1, 3, 2])
        return op.Exp(last) * state + op.MatMul(carried, updates), out

    def channel_chunk(state: FLOAT[...], q: FLOAT[...], k: FLOAT[...], v: FLOAT[...], g: FLOAT[...],
                      b: FLOAT[...]):
        index = op.Range(op.Constant(value_int=0), op.Shape(q, start=2, end=3)[0], op.Constant(value_int=1))
        rows = op.Unsqueeze(index, [1])
        cols = op.Unsqueeze(index, [0])
        strict = op.Cast(op.Greater(rows, cols), to=1)
        eye = op.Cast(op.Equal(rows, cols), to=1)
        total = op.CumSum(g, op.Constant(value_int=2))  # [B, H, 8, Dk]
        pairs = op.Unsqueeze(total, [3]) - op.Unsqueeze(total, [2])  # [B, H, 8 (t), 8 (s), Dk]
        lower = op.Unsqueeze(op.GreaterOrEqual(rows, cols), [2])
        decayed = op.Unsqueeze(k, [2]) * op.Exp(op.Where(lower, pairs, op.Constant(value_float=-1e30)))
        a = op.ReduceSum(op.Unsqueeze(k, [3]) * decayed, [4], keepdims=0) * strict * b
        power = op.MatMul(a, a)
        inverse = op.MatMul(eye - a, eye + power)
        power = op.MatMul(power, power)
        inverse = op.MatMul(inverse, eye + power)
        updates = op.MatMul(inverse, b * (v - op.MatMul(k * op.Exp(total), state)))
        scores = op.ReduceSum(op.Unsqueeze(q, [3]) * decayed, [4], keepdims=0)
        out = op.MatMul(q * op.Exp(total), state) + op.MatMul(scores, updates)
        last = op.Slice(total, op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**31]),
                        op.Constant(value_ints=[2]))
        carried = op.Transpose(op.Exp(last - total) * k, perm=[0, 1, 3, 2])
        return op.Transpose(op.Exp(last), perm=[0, 1, 3, 2]) * state + op.MatMul(carried, updates), out

    several = op.Greater(op.Shape(query, start=0, end=1), op.Constant(value_ints=[1]))
    per_head = op.Equal(op.Shape(decay, start=3, end=4), op.Constant(value_ints=[1]))
    if op.Squeeze(several):
        steps = op.Shape(query, start=0, end=1)
        size = op.Min(steps, op.Where(per_head, op.Constant(value_ints=[32]), op.Constant(value_ints=[8])))
        padding = op.Mod(size - op.Mod(steps, size), size)
        pads = op.Concat(op.Constant(value_ints=[0, 0, 0, 0]), padding, op.Constant(value_ints=[0, 0, 0]), axis=0)
        chunks = op.Div(steps + padding, size)
        # [T, B, H, D] -> [chunks, B, H, size, D]
        q = op.Transpose(op.Reshape(op.Pad(query, pads), op.Concat(chunks, size, op.Shape(query, start=1), axis=0)),
                         perm=[0, 2, 3, 1, 4])
        k = op.Transpose(op.Reshape(op.Pad(key, pads), op.Concat(chunks, size, op.Shape(key, start=1), axis=0)),
                         perm=[0, 2, 3, 1, 4])
        v = op.Transpose(op.Reshape(op.Pad(value, pads), op.Concat(chunks, size, op.Shape(value, start=1), axis=0)),
                         perm=[0, 2, 3, 1, 4])
        g = op.Transpose(op.Reshape(op.Pad(decay, pads), op.Concat(chunks, size, op.Shape(decay, start=1), axis=0)),
                         perm=[0, 2, 3, 1, 4])
        beta4 = op.Unsqueeze(beta, [3])
        b = op.Transpose(op.Reshape(op.Pad(beta4, pads), op.Concat(chunks, size, op.Shape(beta4, start=1), axis=0)),
                         perm=[0, 2, 3, 1, 4])
        if op.Squeeze(per_head):
            final_state, outputs = op.Scan(initial_state, q, k, v, g, b, body=chunk, num_scan_inputs=5)
        else:
            final_state, outputs = op.Scan(initial_state, q, k, v, g, b, body=channel_chunk, num_scan_inputs=5)
        flat = op.Reshape(op.Transpose(outputs, perm=[0, 3, 1, 2, 4]),
                          op.Concat(op.Constant(value_ints=[-1]), op.Shape(value, start=1), axis=0))
        outputs = op.Slice(flat, op.Constant(value_ints=[0]), steps, op.Constant(value_ints=[0]))
    else:
        final_state, outputs = op.Scan(initial_state, query, key, value, decay, beta, body=token, num_scan_inputs=5)
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
    if len(g.shape) == 3:  # one decay per head: a key channel axis of 1, which the scan broadcasts
        g = op.Unsqueeze(g, [3])
    g = op.Cast(op.Transpose(g, perm=[1, 0, 2, 3]), to=onnxscript.ir.DataType.FLOAT)
    beta = op.Cast(op.Transpose(beta, perm=[1, 0, 2]), to=onnxscript.ir.DataType.FLOAT)
    state, out = DeltaRule(initial_state, query, key, value, g, beta)  # inlined by torch.onnx's optimizer
    state.dtype = out.dtype = onnxscript.ir.DataType.FLOAT  # the recorder does not infer through a Scan
    return op.Transpose(out, perm=[1, 0, 2, 3]), state


@contextlib.contextmanager
def exportable_lightning_attention(module_name: str, attention_class: str):
    """While tracing, MiniMax's lightning attention (linear attention whose state decays by a fixed
    per-head rate, computed by transformers in Python loops over blocks or tokens) runs in its
    closed form over the whole sequence, the state carried in and out: with decay a = exp(-slope),
    out_i = sum_{j<=i} a^(i-j) (q_i.k_j) v_j + a^(i+1) q_i S, and the next state
    a^T S + sum_j a^(T-1-j) k_j^T v_j, the same sums as transformers' block and token loops."""
    modeling = importlib.import_module(module_name)
    attention = getattr(modeling, attention_class)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        batch_size, seq_len, _ = hidden_states.shape
        qkv_states = self.act_fn(self.qkv_proj(hidden_states))
        qkv_states = modeling.apply_mask_to_padding_states(qkv_states, attention_mask)
        qkv_states = qkv_states.reshape(batch_size, seq_len, self.num_attention_heads, 3 * self.head_dim)
        query, key, value = (x.transpose(1, 2) for x in torch.split(qkv_states, self.head_dim, dim=3))
        state = cache.get_linear_cache(self.layer_idx)
        if state is None:  # a fresh sequence (the trace's cache probe): transformers starts from zeros
            state = query.new_zeros(batch_size, self.num_attention_heads, self.head_dim, self.head_dim)

        slope = self.slope_rate.to(query.dtype)  # [H, 1, 1]
        steps = torch.arange(seq_len, device=query.device, dtype=query.dtype)
        distance = steps[:, None] - steps[None, :]
        within = torch.exp(-slope * distance.clamp(min=0)) * (distance >= 0)  # [H, T, T]
        attn_output = (torch.matmul(query, key.transpose(-1, -2)) * within) @ value \
            + (query * torch.exp(-slope * (steps[:, None] + 1))) @ state
        state = torch.exp(-slope * seq_len) * state \
            + (key * torch.exp(-slope * (seq_len - 1 - steps[:, None]))).transpose(-1, -2) @ value

        attn_output = attn_output.transpose(1, 2).reshape(batch_size, seq_len, self.num_attention_heads * self.head_dim)
        attn_output = self.norm(attn_output)
        attn_output = torch.sigmoid(self.output_gate(hidden_states)) * attn_output
        attn_output = self.out_proj(attn_output)
        cache.set_linear_cache(self.layer_idx, state)
        return attn_output, state

    saved = attention.forward
    attention.forward = forward
    try:
        yield
    finally:
        attention.forward = saved


# transformers' name of the Mamba (selective state space) scan, shared by the families built on it
SCAN_FUNCTION = "mamba_scan_forward"


@torch.library.custom_op("moec::selective_scan", mutates_args=())
def selective_scan(state: torch.Tensor, decay: torch.Tensor, update: torch.Tensor,
                   readout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's recurrence: state [B, D, N]; decay exp(dt A) and update dt B x [B, D, T, N]; readout C
    [B, T, N] -> (y [B, D, T] with y_t = C_t . h_t, h_t = decay_t h_{t-1} + update_t; final state)."""
    outputs = []
    for t in range(decay.shape[2]):
        state = decay[:, :, t] * state + update[:, :, t]
        outputs.append((state * readout[:, None, t]).sum(-1))
    return torch.stack(outputs, dim=-1), state.clone()


@selective_scan.register_fake
def _(state, decay, update, readout):
    return decay.new_empty(decay.shape[:3]), state.new_empty(state.shape)


def exportable_scan(module, hidden_states, time_step, B, C, gate, cache, **kwargs):
    """Stands in for transformers' `mamba_scan_forward` (same arguments, same result): the selective
    scan from the cache's recurrent state, as one moec::selective_scan, and the state written back.
    (transformers' own multi-token path starts from zeros whatever the cache holds; from an empty
    cache, a prefill, and for one token, a decode step, the two agree.)"""
    import torch.nn.functional as F

    state = cache.get_recurrent_state(module.layer_idx, state_idx=0)
    A = -torch.exp(module.A_log.float())
    dt = time_step.float()
    if module.dt_proj.bias is not None:
        dt = dt + module.dt_proj.bias.float()[..., None]
    dt = F.softplus(dt)  # [B, D, T]
    decay = torch.exp(A[None, :, None, :] * dt[..., None])
    update = dt[..., None] * B.float()[:, None, :, :] * hidden_states.float()[..., None]
    if state is None:  # a fresh sequence (the trace's cache probe): transformers starts from zeros
        state = decay.new_zeros(decay.shape[0], decay.shape[1], decay.shape[3])
    out, state = torch.ops.moec.selective_scan(state.float(), decay, update, C.float())
    out = (out + hidden_states.float() * module.D.float()[None, :, None]) * F.silu(gate.float())
    cache.update_recurrent_state(state, module.layer_idx)
    return out.to(hidden_states.dtype)


@onnxscript.script(onnxscript.values.Opset("moec", 1), default_opset=op)
def SelectiveScan(initial_state: FLOAT, decay: FLOAT, update: FLOAT, readout: FLOAT) -> tuple[FLOAT, FLOAT]:
    """Over time-major inputs: state [B, D, N]; decay/update [T, B, D, N]; readout [T, B, N] ->
    (final state, outputs [T, B, D])."""
    def step(state: FLOAT[...], a: FLOAT[...], u: FLOAT[...], c: FLOAT[...]):
        updated = a * state + u
        return updated, op.ReduceSum(updated * op.Unsqueeze(c, [1]), [2], keepdims=0)

    final_state, outputs = op.Scan(initial_state, decay, update, readout, body=step, num_scan_inputs=3)
    return final_state, outputs


def onnx_selective_scan(state, decay, update, readout):
    """torch.onnx translation of moec::selective_scan: the recurrence as a Scan over tokens."""
    decay, update = (op.Transpose(x, perm=[2, 0, 1, 3]) for x in (decay, update))
    state, out = SelectiveScan(state, decay, update, op.Transpose(readout, perm=[1, 0, 2]))
    state.dtype = out.dtype = onnxscript.ir.DataType.FLOAT  # the recorder does not infer through a Scan
    return op.Transpose(out, perm=[1, 2, 0]), state
