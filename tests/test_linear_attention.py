"""The delta rule's ONNX forms (moec/linear_attention.py) against transformers' recurrent rule."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moec.linear_attention import DeltaRule


def _session(function) -> ort.InferenceSession:
    """The script function as a model of rank-4 inputs (beta rank 3), shapes inferred into its Scans."""
    model = function.to_model_proto()
    for value, rank in zip(model.graph.input, (4, 4, 4, 4, 4, 3)):
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        value.type.tensor_type.ClearField("shape")
        for axis in range(rank):
            value.type.tensor_type.shape.dim.add().dim_param = f"{value.name}_{axis}"
    for value in model.graph.output:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        value.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def session():
    return _session(DeltaRule)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gated delta rule", "Kimi delta attention"])
@pytest.mark.parametrize("tokens", [1, 2, 31, 32, 33, 100])
def test_the_rule_computes_transformers_recurrent_rule(session, tokens, per_channel):
    """From a non-zero state: the outputs and the final state of transformers' recurrent rule, with
    one decay per head (one token: the Scan over tokens; more: the chunked form, over lengths around
    its chunk of 32) and with Kimi's decay per key channel (the Scan over tokens)."""
    from transformers.models.kimi_linear.modeling_kimi_linear import recurrent_kimi_delta_attention
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    rng = np.random.default_rng(tokens)
    batch, heads, key_size, value_size = 2, 3, 16, 8
    query, key = (torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(batch, tokens, heads, key_size))
                                                                 .astype(np.float32)), dim=-1) for _ in range(2))
    value = torch.from_numpy(rng.normal(size=(batch, tokens, heads, value_size)).astype(np.float32))
    g = torch.from_numpy(-rng.uniform(0, 1, size=(batch, tokens, heads) + ((key_size,) if per_channel else ()))
                         .astype(np.float32))
    beta = torch.from_numpy(rng.uniform(size=(batch, tokens, heads)).astype(np.float32))
    state = torch.from_numpy(rng.normal(size=(batch, heads, key_size, value_size)).astype(np.float32))
    rule = recurrent_kimi_delta_attention if per_channel else torch_recurrent_gated_delta_rule
    expected, final = rule(query, key, value, g=g, beta=beta, initial_state=state, output_final_state=True)
    time_major = lambda x: x.transpose(0, 1).numpy()  # noqa: E731
    decay = time_major(g) if per_channel else time_major(g)[..., None]
    feeds = (state.numpy(), time_major(query) * key_size**-0.5, time_major(key), time_major(value), decay,
             time_major(beta))
    got_final, got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))
    np.testing.assert_allclose(got.transpose(1, 0, 2, 3), expected.numpy(), atol=2e-5)
    np.testing.assert_allclose(got_final, final.numpy(), atol=2e-5)
