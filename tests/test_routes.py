"""The moec::Routes op (the pruning of an experts module that routes for itself, moec.ops.routes):
its reference, and the one family of the suite whose experts module routes for itself, Ergo (its
pruned artifacts: tests/test_pruning.py; the passes: tests/passes/test_lower_routes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from moec.ops.dynamic_gating import importance, prune
from moec.ops.routes import RoutesSpec, pruned_routes
from test_moe_op import E, H, random_routing

PRUNING = {"beta": 0.6, "protect_fraction": 0.25, "keep_experts": (3,)}


def test_reference_names_no_expert_for_each_route_it_drops():
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(12, H)).astype(np.float32)
    index, routing = random_routing(rng, 12)
    spec = RoutesSpec(0, E, **PRUNING)
    new_index, new_weights = pruned_routes(hidden, index, routing, spec)
    kept, keep = prune(routing, spec, importance(hidden), top_k_index=index)
    assert 0 < (~keep).sum() < keep.size
    assert np.array_equal(new_index, np.where(keep, index, E)) and np.array_equal(new_weights, kept)
    assert np.all(new_weights[~keep] == 0)
    same = pruned_routes(hidden, index, routing, RoutesSpec(0, E))  # no pruning: the routing as it came
    assert np.array_equal(same[0], index) and np.array_equal(same[1], routing)


@pytest.mark.parametrize("arch", ["ergo", "mixtral"])
def test_only_ergo_routes_for_itself_and_its_layers_keep_their_top_k(arch, compiled):
    """Ergo's experts module routes for itself, Mixtral's is the experts interface's dispatch; Ergo's
    record gives each layer the k its router picks, not the top-1 of its per-route calls."""
    from moec.experts import experts_layers, routes_for_itself

    model = compiled(arch)
    layers = experts_layers(model.model)
    assert [routes_for_itself(model.model.get_submodule(layer.path)) for layer in layers] == [arch == "ergo"] * 2
    assert [layer["top_k"] for layer in model.record["moe_layers"]] == [2, 2]
