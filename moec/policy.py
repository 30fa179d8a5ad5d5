"""Which weight gets which width, and which layer prunes with which beta: the plan, plus the
functions here that read it.

Weights are known by name: routed experts as `layers.{l}.experts.{e}.{gate,up,down}_proj` (the
experts lowering's names), everything else by torch module path (passes/name_weights.py).
Routing (what a MoE block holds besides its experts and shared experts) and anything not listed
stays in float.
"""

from __future__ import annotations

import re

from moec.ops.moe import EXPERT_WEIGHT_PATTERN

UNQUANTIZED = 16


def weight_category(name: str, moe_blocks: list[str] = ()) -> str | None:
    """The plan's non-expert category of a weight name, or None for weights kept in float.
    `moe_blocks` are the MoE blocks' module paths."""
    block = next((path for path in moe_blocks if name.startswith(path + ".")), None)
    if block is not None:  # a shared expert's own gate (Qwen2-MoE's shared_expert_gate) is routing too
        child = name[len(block) + 1:].split(".")[0]
        return "shared_expert" if child.startswith("shared") and not child.endswith("gate") else None
    if "router" in name:
        return None
    if name.startswith("lm_head"):
        return "lm_head"
    if "embed_tokens" in name:
        return "embedding"
    if ".self_attn." in name:
        return "attention"
    if name.startswith("model.layers."):
        return "dense_mlp"
    return None


def weight_bits(plan: dict, name: str, moe_blocks: list[str] = ()) -> int | None:
    """The width the plan gives weight `name`; None keeps it in float."""
    expert = re.fullmatch(EXPERT_WEIGHT_PATTERN, name)
    if expert:
        row = plan["experts"]["bits"][int(expert["layer"])]
        bits = None if row is None else row[int(expert["expert"])]
    else:
        category = weight_category(name, moe_blocks)
        bits = None if category is None else plan["non_expert"].get(category)
    return None if bits is None or bits >= UNQUANTIZED else int(bits)


def layer_pruning(plan: dict | None) -> dict[int, tuple[float, float]]:
    """(beta, protect_fraction) of each layer the plan prunes dynamically; others are absent."""
    pruning = (plan or {}).get("pruning") or {}
    protect = float(pruning.get("protect_fraction", 0.0))
    return {int(entry["layer"]): (float(entry["beta"]), protect) for entry in pruning.get("layers", [])}
