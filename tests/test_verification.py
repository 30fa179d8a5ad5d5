"""Every compile verifies the cached decode path: an error that only a step with a past shows refuses
the build, names the step and the layer, and writes nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

import moec
import moec.targets.cpu
from moec.planner import DEFAULT_NON_EXPERT, save_plan


class PerturbPast(ir.passes.InPlacePass):
    """Adds 0.5 to one past input where its nodes read it: a prefill's past is empty, so only the
    steps that continue a sequence go wrong."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        past = next(value for value in model.graph.inputs if value.name == self.name)
        uses = list(past.uses())
        half = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(0.5, np.float32))})
        shifted = ir.node("Add", [past, half.outputs[0]])
        model.graph.insert_before(model.graph[0], [half, shifted])
        for node, index in uses:
            node.replace_input_with(index, shifted.outputs[0])
        return ir.passes.PassResult(model, modified=True)


def perturbing(past: str):
    """The CPU target with PerturbPast(past) after its own passes."""
    cpu = moec.targets.cpu.TARGET
    return dataclasses.replace(cpu, pass_list=lambda *args: [*cpu.pass_list(*args), PerturbPast(past)])


@pytest.mark.parametrize("quantized", [False, True])
def test_an_error_only_decode_shows_refuses_the_build(quantized, compiled, tmp_path, monkeypatch):
    model_dir = compiled("mixtral").model_dir
    plan = None
    if quantized:  # 4-bit experts, pruned in layer 1: the exact-kernel copy and the pruned reference
        plan = tmp_path / "plan.json"
        save_plan({"format": "moec-plan/1", "model": None, "experts": {"bits": [[4] * 4] * 2},
                   "non_expert": DEFAULT_NON_EXPERT, "quantization": {"method": "rtn", "group_size": 32},
                   "pruning": {"layers": [{"layer": 1, "beta": 0.5}], "protect_fraction": 0.0}}, plan)
    # unperturbed, the same build verifies prefill and two decode steps, with both kinds of past
    record = moec.compile(model_dir, tmp_path / "good", plan=plan, progress=False)
    assert [s["step"] for s in record["verification"]["steps"]] == ["prefill", "decode step 1", "decode step 2"]
    assert record["verification"]["pasts"] == ["as they come", "in place"]
    assert record["verification"]["max_abs_logit_diff"] <= record["verification"]["tolerance"]

    monkeypatch.setattr(moec.targets.cpu, "TARGET", perturbing("past_key_values.1.key"))
    with pytest.raises(moec.MoecError) as refused:
        moec.compile(model_dir, tmp_path / "bad", plan=plan, progress=False)
    message = str(refused.value)
    assert "\n" not in message
    # the prefill passed (it is checked first); the first step with a past fails, at layer 1
    assert message.startswith("verification failed at decode step 1 ")
    assert "present.1.key differs first" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good"] + (["plan.json"] if quantized else []))


def test_inspect_says_which_steps_were_verified(compiled):
    from moec.summary import describe, summary

    text = summary(describe(compiled("mixtral").artifact_dir))
    assert "steps      prefill of 8 tokens" in text and "decode step 2" in text
    assert "pasts fed back as they come and in place" in text
