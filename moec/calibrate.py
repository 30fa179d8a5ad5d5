"""`moec calibrate`: measure how much each expert matters (MC-MoE's pre-loading statistics).

The model is streamed layer by layer from safetensors: each decoder layer is materialized,
the cached hidden states of every calibration sequence are run through it while its MoE block's
inputs are recorded, the statistics are computed, and the layer is freed. Peak memory is about
one layer plus the activations.

Per sparse layer and expert it records (moec-stats/1, read by `moec plan`):
  frequency       tokens routed to the expert by the model's own top-k (a route of weight 0, as
                  LongCat-Flash gives its zero-computation experts' routes, computes nothing: not counted)
  routing_weight  sum of the expert's routing weight over those tokens
  quant_loss[b]   L2 norm of the MoE block's output error when that expert alone is RTN-quantized
                  to b bits (asymmetric, blocks of group_size along the input), summed over batches;
                  b = 0 is the expert dropped: the block run again with the expert masked out of its
                  router's top-k (moec.experts.RoutingMask), so its tokens are routed anew; null
                  in a layer that picks its experts without a top-k (DeepSeek-V4's hash-routed
                  layers read theirs from a table), whose experts cannot be dropped
  projection_loss the same for b > 0 with only gate and up quantized (`gate_up`) or only down
                  (`down`): what `moec plan --per-projection` weighs a split width by
  max_down_output the largest |down_proj output| of the expert over its tokens
and per layer `pruning`: for each beta of a grid, the fraction of the layer's top-k activations
MC-MoE's dynamic pruning rule drops and the relative error of the MoE output it causes, and the
same for each p of the top-p rule under `top_p` (what `moec plan --prune-target` chooses layers
and thresholds from).
The model's `super_experts` (Su et al., arXiv 2507.23279, the rule of its released profiling code):
experts whose max_down_output is above the 99.5th percentile of all (layer, expert) pairs and above
a tenth of the largest, in the first three quarters of the layers. Quantizing or pruning even a
few of them wrecks a model; `moec plan` keeps them at the highest width, and pruning never drops them.
With `non_expert` (`moec calibrate --non-expert`), also the quantization loss of the weights outside
the routed experts, on the same scale (`non_expert`, read by `moec plan --whole-budget`): per
moec.policy category (attention, shared_expert, dense_mlp) and decoder layer, the L2 norm of the
layer's output error with that category's weights in it RTN-quantized, summed over batches, as an
expert's quant_loss is the error it adds to the residual stream; the embedding's at the first
layer's input (the table's error on the calibration tokens, scaled as the body scales what the table
returns); each category's weight count, the head's included (its error is in the logits, not the
residual stream: it keeps its width); and beside each such loss, and in each MoE layer's entry
(`residual_norm`), the norm of the residual stream where the error lands (the layer's output, summed
over batches), which the plan weighs errors relative to.
Hessians for error-compensating quantization are not stored: the same streaming recomputes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from moec.errors import MoecError
from moec.planner.stats import PROJECTION_PARTS
from moec.text import read_text, token_windows

STATS_FORMAT = "moec-stats/1"
DEFAULT_BITS = (2, 4, 8)
BATCH_SEQUENCES = 8
KNOWN_BYTES = 2**29  # the known route outputs one width-0 rerun of a MoE block holds
PRUNING_BETAS = tuple(round(0.025 * i, 3) for i in range(1, 40))  # 0.025 ... 0.975
PRUNING_TOP_PS = PRUNING_BETAS
SUPER_EXPERT_PERCENTILE = 99.5
SUPER_EXPERT_SHARE_OF_MAX = 0.1
SUPER_EXPERT_LAYERS = 0.75  # the first three quarters of the layers


class BlockInputs(NamedTuple):
    """A materialized MoE block and what it received: (args, kwargs) per batch."""

    module: object
    calls: list


def layer_stats(layer, module, calls: list, bits: tuple[int, ...], group_size: int,
                block: BlockInputs | None = None) -> dict:
    """One sparse layer's statistics from what its experts module received (hidden [tokens, H],
    top_k_index and top_k_weights [tokens, k], one triple per batch); `module` holds its weights.
    Width 0 (the expert dropped) reruns the MoE `block` on what it received."""
    from moec.experts import float32_views, stacked_weights
    from moec.ops.moe import Expert, expert_ffn, expert_hidden, expert_projection, expert_weights
    from moec.quant import fake_quantize

    spec, experts = layer.spec, layer.num_experts
    frequency = np.zeros(experts)
    routing_weight = np.zeros(experts)
    quant_loss = np.zeros((experts, len(bits)))
    projection_loss = np.zeros((experts, 2, len(bits)))  # gate and up alone (down exact), down alone
    max_down_output = np.zeros(experts)
    for _, indices, weights in calls:
        np.add.at(frequency, indices[weights != 0], 1)
        np.add.at(routing_weight, indices.ravel(), weights.ravel())

    stacked, stored = float32_views(module), stacked_weights(module)
    # a block that is its decoder layer (Gemma 4 keeps its experts beside attention) mixes tokens:
    # it reruns whole
    merged = _merged_call(block.calls, [len(indices) for _, indices, _ in calls]) \
        if 0 in bits and not re.search(r"(?:^|\.)layers\.\d+$", layer.block_path) else None
    outputs = [np.zeros((x.shape[0], indices.shape[1], x.shape[1]), np.float32) for x, indices, _ in calls]
    for e in range(experts):
        picks = [np.nonzero((indices == e) & (weights != 0)) for _, indices, weights in calls]
        if not any(tokens.size for tokens, _ in picks):
            continue
        # the expert's tokens of every batch in one matrix; its weights upcast from the stored dtype
        # (and quantized) one expert at a time
        x = np.concatenate([x[tokens] for (x, _, _), (tokens, _) in zip(calls, picks)])
        bounds = np.cumsum([tokens.size for tokens, _ in picks])[:-1]
        expert = expert_weights(stacked, e, spec)
        exact_hidden = expert_hidden(x, expert, spec)
        exact = expert_ffn(x, expert, spec)
        max_down_output[e] = float(np.abs(exact).max())
        for out, (tokens, rank), rows in zip(outputs, picks, np.split(exact, bounds)):
            out[tokens, rank] = rows
        biases = {name: getattr(expert, name) for name in ("gate_bias", "up_bias", "down_bias")}
        down_bias = 0 if biases["down_bias"] is None else biases["down_bias"]
        exact_down = expert.down
        expert = None

        def add_loss(table, j, error):  # the error's norm on each batch's routes, weighted as routed
            for (_, _, weights), (tokens, rank), rows in zip(calls, picks, np.split(error, bounds)):  # noqa: B023
                if tokens.size:
                    table[e, j] += float(np.linalg.norm(rows * weights[tokens, rank][:, None]))  # noqa: B023
        for j, width in enumerate(bits):
            if width == 0:  # once every route's output is known (below)
                continue
            # each projection upcast alone and quantized, gate and up for the hidden activations, then
            # down: a Mixtral-8x7B expert adds about 0.7 GB, as when it was computed exactly
            quantized = lambda p: fake_quantize(expert_projection(stored, e, p, spec).float().numpy(),  # noqa: B023
                                                width, group_size)
            gate = quantized("gate") if "gate" in spec.projections else None
            hidden = expert_hidden(x, Expert(up=quantized("up"), down=None, gate=gate, **biases), spec)
            gate = None
            down = quantized("down")
            add_loss(quant_loss, j, hidden @ down.T + down_bias - exact)
            add_loss(projection_loss[:, 0], j, hidden @ exact_down.T + down_bias - exact)
            add_loss(projection_loss[:, 1], j, exact_hidden @ down.T + down_bias - exact)
    if 0 in bits:
        full = _block_outputs(block, module, calls, outputs)
        routed = [int(e) for e in np.flatnonzero(frequency)]
        dropped = _dropped_losses(layer, block, module, full, calls, outputs, routed, merged)
        # None: the block picks its experts without a top-k (DeepSeek-V4's hash-routed layers read a table
        # of token -> experts), so no expert of it can be dropped: its width-0 losses are written as null
        if dropped is None:
            quant_loss[:, bits.index(0)] = np.nan
        else:
            quant_loss[routed, bits.index(0)] = dropped
    routing_weights = [weights for _, _, weights in calls]
    return {
        "experts": [{"frequency": float(frequency[e]), "routing_weight": float(routing_weight[e]),
                     "quant_loss": {str(width): None if np.isnan(quant_loss[e, j]) else float(quant_loss[e, j])
                                    for j, width in enumerate(bits)},
                     "projection_loss": {part: {str(width): float(projection_loss[e, i, j])
                                                for j, width in enumerate(bits) if width}
                                         for i, part in enumerate(PROJECTION_PARTS)},
                     "max_down_output": float(max_down_output[e])}
                    for e in range(experts)],
        "pruning": {**_pruning_curve(spec, "beta", PRUNING_BETAS, routing_weights, outputs),
                    "top_p": _pruning_curve(spec, "top_p", PRUNING_TOP_PS, routing_weights, outputs)},
    }


@contextlib.contextmanager
def _known(module, hidden: np.ndarray, index: np.ndarray, outputs: np.ndarray):
    """While in force, the experts `module` reuses `outputs` (each route's expert output on these
    tokens) where a call routes a token to the same expert again (moec.experts.KnownRoutes)."""
    from moec.experts import KnownRoutes

    module.moec_known_routes = KnownRoutes(hidden, index, outputs)
    try:
        yield
    finally:
        del module.moec_known_routes


def _block_outputs(block: BlockInputs, module, calls: list, outputs: list) -> list:
    """The MoE block's output (float32) on each call it received, its experts' outputs known."""
    import torch

    result = []
    with torch.no_grad():
        for (args, kwargs), (x, indices, _), out in zip(block.calls, calls, outputs):
            with _known(module, x, indices, out):
                result.append(_output(block.module(*args, **kwargs)))
    return result


def _dropped_losses(layer, block: BlockInputs, module, full: list, calls: list, outputs: list, experts: list[int],
                    merged) -> list[float] | None:
    """For each of `experts`, the L2 norm of the MoE block's output error with it masked out of its
    router's top-k (its tokens routed to the remaining experts), summed over batches; `full` is the
    block's output unmasked, `calls` what its experts received and `outputs` each of their routes'
    output. The mask changes only the tokens whose top-k held the expert, so the block (router,
    experts, shared experts: each token on its own) reruns on just those tokens of every batch, for
    all experts at once (`merged`: _merged_call of its calls; RoutingMask's per-token experts), in
    calls of at most KNOWN_BYTES of known routes; and of its experts only the ones that take a
    dropped expert's place run, the others' outputs known. A block whose calls cannot be cut to
    tokens (`merged` None) reruns whole, batch by batch, once per expert. None where the block selects
    its experts without a top-k that the mask could act on."""
    import torch

    from moec.experts import RoutingMask

    exact = [out.reshape(-1, out.shape[-1]) for out in full]
    if merged is None:
        losses = []
        for expert in experts:
            mask = RoutingMask(layer.num_experts, [expert])
            errors = []
            with torch.no_grad(), mask:
                for (args, kwargs), want, (x, indices, _), out in zip(block.calls, exact, calls, outputs):
                    with _known(module, x, indices, out):
                        errors.append(_output(block.module(*args, **kwargs)).reshape(want.shape) - want)
            if block.calls and not mask.selections:
                return None
            losses.append(sum(float(torch.linalg.vector_norm(error.double())) for error in errors))
        return losses
    offsets = np.cumsum([0] + [len(want) for want in exact])
    tokens = [np.concatenate([np.flatnonzero((indices == e).any(axis=1)) + o for (_, indices, _), o
                              in zip(calls, offsets)]) for e in experts]  # each expert's tokens, as rows of all
    known = [np.concatenate(parts) for parts in ([x for x, _, _ in calls], [i for _, i, _ in calls], outputs)]
    want, batch_of = torch.cat(exact), np.searchsorted(offsets, np.arange(offsets[-1]), side="right") - 1
    per_call = max(1, KNOWN_BYTES // (known[2][0].nbytes or 1))
    losses = []
    start = 0
    while start < len(experts):  # as many experts' tokens per call as fit
        stop = start + 1
        while stop < len(experts) and sum(map(len, tokens[start:stop + 1])) <= per_call:
            stop += 1
        rows = np.concatenate(tokens[start:stop])
        mask = RoutingMask(layer.num_experts, per_token=np.repeat(experts[start:stop], list(map(len, tokens[start:stop]))))
        args, kwargs = _token_rows(merged, rows, offsets[-1])
        with torch.no_grad(), mask, _known(module, *(np.take(part, rows, axis=0) for part in known)):
            error = _output(block.module(*args, **kwargs)).reshape(len(rows), -1) - want[torch.from_numpy(rows)]
        if not mask.selections:
            return None
        for segment, expert_rows in zip(torch.split(error, list(map(len, tokens[start:stop]))), tokens[start:stop]):
            batches = batch_of[expert_rows]  # norms per batch, summed, as over the batches' calls
            losses.append(sum(float(torch.linalg.vector_norm(segment[torch.from_numpy(batches == b)].double()))
                              for b in np.unique(batches)))
        start = stop
    return losses


def _output(out):
    """A MoE block's output (float32), without what some families return beside it (router logits)."""
    return (out[0] if isinstance(out, tuple) else out).float()


def _merged_call(calls: list, tokens: list[int]):
    """A block's calls (args, kwargs), the i-th on tokens[i] tokens, as one call: each per-token
    tensor ([batch, sequence, ...] or [tokens, ...]) flattened and concatenated as one sequence [1,
    all tokens, ...], everything else the same in every call; None where the calls differ otherwise
    or the first argument is not per-token."""
    import torch

    def merge(values: list):
        first = values[0]
        if isinstance(first, (tuple, list, dict)):
            keys = list(first.keys() if isinstance(first, dict) else range(len(first)))
            if any(type(v) is not type(first) or len(v) != len(keys) or
                   isinstance(v, dict) and list(v.keys()) != keys for v in values):
                raise ValueError
            merged = {k: merge([v[k] for v in values]) for k in keys}
            return merged if isinstance(first, dict) else type(first)(merged.values())
        if all(_per_token(v, t) for v, t in zip(values, tokens)):
            return torch.cat([v.reshape(t, *v.shape[1 if v.shape[0] == t else 2:]) for v, t in zip(values, tokens)])
        if all(v is first for v in values) or not torch.is_tensor(first) and all(v == first for v in values):
            return first
        raise ValueError

    if not calls or not calls[0][0] or not _per_token(calls[0][0][0], tokens[0]):
        return None
    try:
        return merge(calls)  # [[args, kwargs], ...]: per-token tensors as [all tokens, ...]
    except ValueError:
        return None


def _token_rows(value, rows: np.ndarray, tokens: int):
    """A call's arguments (tensors, and tuples, lists and dicts of them) with every per-token tensor
    ([tokens, ...]) cut to `rows`, as one sequence [1, rows, ...]; everything else as it is."""
    import torch

    if isinstance(value, (tuple, list)):
        return type(value)(_token_rows(v, rows, tokens) for v in value)
    if isinstance(value, dict):
        return {k: _token_rows(v, rows, tokens) for k, v in value.items()}
    if not (torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == tokens):
        return value
    return value[torch.from_numpy(rows)][None]


def _per_token(value, tokens: int) -> bool:
    import torch

    return torch.is_tensor(value) and value.dim() >= 1 and (
        value.shape[0] == tokens or value.dim() >= 2 and value.shape[0] * value.shape[1] == tokens)


def _pruning_curve(spec, rule: str, thresholds: tuple, routing_weights: list, outputs: list) -> dict:
    """The layer's dynamic-pruning curve for one rule ("beta" or "top_p"): for each threshold, the
    fraction of its top-k (token, expert) activations the rule drops and the relative L2 error of
    the MoE output that causes (no token protected). A route of weight 0 is no activation."""
    from moec.ops.dynamic_gating import prune

    top_k = routing_weights[0].shape[1] if routing_weights else 1
    thresholds = thresholds if top_k > 1 else ()
    dropped, error = np.zeros(len(thresholds)), np.zeros(len(thresholds))
    norm = activations = 0.0
    for weights, out in zip(routing_weights, outputs):
        full = (out * weights[..., None]).sum(1)
        norm += float(np.sum(full.astype(np.float64) ** 2))
        activations += int(np.count_nonzero(weights))
        for j, threshold in enumerate(thresholds):
            kept, keep = prune(weights, dataclasses.replace(spec, **{rule: threshold}, protect_fraction=0.0))
            dropped[j] += float(np.count_nonzero(weights * ~keep))
            error[j] += float(np.sum(((out * kept[..., None]).sum(1) - full).astype(np.float64) ** 2))
    return {rule: list(thresholds), "pruned_fraction": [float(d / max(activations, 1)) for d in dropped],
            "relative_error": [float(np.sqrt(e / norm)) if norm > 0 else 0.0 for e in error]}


def super_experts(layers: list[dict], num_layers: int) -> list[list[int]]:
    """[layer, expert] of the super experts among the stats' layers (the module docstring's rule)."""
    values = np.array([e["max_down_output"] for layer in layers for e in layer["experts"]])
    if not values.size:
        return []
    bar = max(np.percentile(values, SUPER_EXPERT_PERCENTILE), SUPER_EXPERT_SHARE_OF_MAX * values.max())
    return [[layer["layer"], e] for layer in layers if layer["layer"] < SUPER_EXPERT_LAYERS * num_layers
            for e, expert in enumerate(layer["experts"]) if expert["max_down_output"] > bar]


class NonExpertLosses:
    """`moec calibrate --non-expert`: the quantization loss of the weights outside the routed experts,
    on the experts' scale (the module docstring), filled in by moe_inputs as it streams the model, and the norm
    of the residual stream where each error lands (the layer's output; the first layer's input for the
    embedding): `moec plan --whole-budget` weighs errors relative to it."""

    def __init__(self, bits: tuple[int, ...], group_size: int):
        self.widths = tuple(b for b in bits if b)
        self.group_size = group_size
        self.moe_blocks: list[str] = []
        self.matrices: dict[str, dict[tuple[int, int], int]] = {}  # category -> (rows, columns) -> how many
        self.loss: dict[str, dict[int, list[float]]] = {}  # category -> width -> one loss per layer
        # category -> one per loss list entry: the norm of the residual stream where its error lands
        self.residual: dict[str, list[float]] = {}
        self.layer_residual: dict[int, float] = {}  # decoder layer -> its output's norm, summed over batches
        self._embedded: list = []  # per batch: (the table's rows' norm, their error's norm per width)

    def _add(self, category: str, losses: list[float], residual: float) -> None:
        table = self.loss.setdefault(category, {width: [] for width in self.widths})
        for width, loss in zip(self.widths, losses):
            table[width].append(loss)
        self.residual.setdefault(category, []).append(residual)

    def count(self, model, moe_blocks: list[str]) -> None:
        """Each category's weight count: the decoder layers' linear weights, the table and the head;
        `moe_blocks` are the MoE blocks' module paths (their routers are no category)."""
        import torch

        from moec.policy import weight_category

        self.moe_blocks = moe_blocks
        tables = {"embedding": model.get_input_embeddings(), "lm_head": model.get_output_embeddings()}
        for name, module in model.named_modules():
            category = next((c for c, table in tables.items() if module is table), None) or \
                isinstance(module, torch.nn.Linear) and weight_category(f"{name}.weight", self.moe_blocks)
            if category:
                shape = tuple(module.weight.shape)
                counts = self.matrices.setdefault(category, {})
                counts[shape] = counts.get(shape, 0) + 1

    def embedding_hook(self, module, args, output) -> None:
        """A forward hook on the input embedding: the table's error on these tokens at each width."""
        import torch

        from moec.quant import fake_quantize

        table = module.weight
        if table.shape[1] % self.group_size:
            return  # the table stays float: its rows do not hold whole groups
        ids = args[0].reshape(-1)
        unique, inverse = np.unique(ids.numpy(), return_inverse=True)
        rows = table[torch.from_numpy(unique)].detach().float().numpy()
        exact = rows[inverse]
        errors = [float(np.linalg.norm(fake_quantize(rows, width, self.group_size)[inverse] - exact))
                  for width in self.widths]
        self._embedded.append((float(np.linalg.norm(exact)), errors))

    def embedded(self, hidden: list) -> None:
        """The table's errors scaled as the body scales its rows into `hidden` (the first layer's inputs;
        the last of the body's runs, one call per batch, is the one that gave them)."""
        self._embedded = self._embedded[len(self._embedded) - len(hidden):]
        if self._embedded:
            scales = [float(np.linalg.norm(h.float().numpy())) / max(norm, 1e-30)
                      for h, (norm, _) in zip(hidden, self._embedded)]
            self._add("embedding", [sum(scale * errors[j] for scale, (_, errors) in zip(scales, self._embedded))
                                    for j in range(len(self.widths))],
                      sum(float(np.linalg.norm(h.float().numpy())) for h in hidden))
        self._embedded = []

    def layer(self, index: int, path: str, decoder_layer, runs: list, exact: list) -> None:
        """Rerun decoder layer `index` (at module path `path`) on what it received (`runs`: (hidden, args,
        kwargs) per batch) with each category's weights in it quantized in turn; `exact` its outputs,
        whose norm is the residual stream's where the layer's errors (its experts' too) land."""
        import torch

        from moec.policy import weight_category
        from moec.quant import fake_quantize

        self.layer_residual[index] = sum(float(torch.linalg.vector_norm(out.double())) for out in exact)
        members: dict[str, list] = {}
        for name, module in decoder_layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                category = weight_category(f"{path}.{name}.weight", self.moe_blocks)
                if category is not None:
                    members.setdefault(category, []).append(module)
        for category, modules in members.items():
            originals = [module.weight.data for module in modules]
            losses = []
            for width in self.widths:
                for module, weight in zip(modules, originals):
                    module.weight.data = torch.from_numpy(
                        fake_quantize(weight.float().numpy(), width, self.group_size)).to(weight.dtype)
                loss = 0.0
                with torch.no_grad():
                    for (x, args, kwargs), want in zip(runs, exact):
                        out = decoder_layer(x, *args, **kwargs)
                        out = out[0] if isinstance(out, tuple) else out
                        loss += float(torch.linalg.vector_norm((out - want).double()))
                losses.append(loss)
            for module, weight in zip(modules, originals):
                module.weight.data = weight
            self._add(category, losses, self.layer_residual[index])

    def stats(self) -> dict:
        """moec-stats/1's `non_expert`: per category its weight count, its matrices ([rows, columns,
        how many]: what they take stored) and, where measured, quant_loss (width -> one loss per layer
        holding the category; the embedding's, one) and residual_norm (one per loss)."""
        return {category: {"params": sum(rows * columns * n for (rows, columns), n in counts.items()),
                           "matrices": [[rows, columns, n] for (rows, columns), n in sorted(counts.items())],
                           **({"quant_loss": {str(w): losses for w, losses in self.loss[category].items()},
                               "residual_norm": self.residual[category]} if category in self.loss else {})}
                for category, counts in sorted(self.matrices.items())}


def moe_inputs(checkpoint, windows: np.ndarray, *, desc: str = "calibrate", progress: bool = True,
               blocks: bool = False, non_expert: NonExpertLosses | None = None):
    """Stream the model layer by layer over token windows.

    Yields (layer, module, calls, block) for each sparse layer: its moec.experts.ExpertsLayer, its
    materialized experts module, what that module received from the family's own router, one
    (hidden [tokens, H] fp32, top_k_index, top_k_weights fp32) triple of NumPy arrays per batch of
    sequences, and with `blocks` its MoE block and what that received (BlockInputs; else None).
    The layer computes in fp32 with its experts run by the Experts op's reference, which upcasts
    one expert at a time (the routed experts stay in the checkpoint's dtype). The layer stays
    materialized until the consumer asks for the next one; then it is freed.

    Each layer is replayed on all batches from the inputs the model body gave it (layer-major, so
    each is read once), unless the body computes a layer's inputs from more than what the layer
    before handed on (Inkling2 mixes earlier layers' outputs into later ones' inputs; a looped layer
    runs twice per token): then replayed inputs would be stale, and the body runs as transformers
    runs it (_whole_body).
    """
    import torch
    from tqdm import tqdm

    from moec.experts import REFERENCE_IMPLEMENTATION, checkpoint_experts_layers, set_implementation
    from moec.weights import StreamingModel

    stream = StreamingModel(checkpoint)
    layers = checkpoint_experts_layers(stream)
    stream.keep_stored(stream.model.get_submodule(layer.path) for layer in layers)
    set_implementation(stream.model, REFERENCE_IMPLEMENTATION)
    batches = [torch.from_numpy(w) for w in np.array_split(windows, -(-len(windows) // BATCH_SEQUENCES))]
    if non_expert is not None:
        non_expert.count(stream.model, [layer.block_path for layer in layers])
    with torch.no_grad():
        hidden, calls, piped = _embed(stream, batches, non_expert)
        if not piped:
            if non_expert is not None:
                raise MoecError(f"{stream.model.config.model_type}: its model body does not hand each decoder layer's "
                                "output to the next alone, so --non-expert cannot rerun a layer on its own")
            yield from _whole_body(stream, batches, layers, blocks, desc, progress)
            return
        if non_expert is not None:
            non_expert.embedded(hidden)
        handed = [{} for _ in hidden]  # per batch: the outputs the last layer hands on to the next
        for i, path in enumerate(tqdm(stream.layer_paths(), desc=desc, unit="layer", disable=not progress)):
            decoder_layer = stream.load(path)
            here = [layer for layer in layers if layer.layer == i]
            received, block_received, handles = _record_inputs(stream, here, blocks)
            runs = []  # with non_expert: what the layer received, to run it again
            for b, call in enumerate(calls[i]):
                args, kwargs = _with_outputs(call, handed[b])
                if non_expert is not None:
                    runs.append((hidden[b], args, kwargs))
                out = decoder_layer(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                handed[b] = {LayerOutput(i, k): value for k, value in enumerate(out[1:], 1)} \
                    if isinstance(out, tuple) else {}
            for handle in handles:
                handle.remove()
            if non_expert is not None:
                non_expert.layer(i, path, decoder_layer, runs, hidden)
            runs = None
            for layer in here:
                block = BlockInputs(stream.model.get_submodule(layer.block_path), block_received[layer.path]) \
                    if blocks else None
                yield layer, stream.model.get_submodule(layer.path), received[layer.path], block
            decoder_layer = received = block_received = None
            stream.unload(path)


def _whole_body(stream, batches, layers, blocks: bool, desc: str, progress: bool):
    """moe_inputs for a body that is not a pipe of layers: run it on each batch as transformers does,
    each decoder layer materialized only while it runs (read once per batch and pass), recording every
    sparse layer's inputs; then materialize each sparse layer again for its consumer. Holds all of
    them at once: one layer's inputs times the sparse layers."""
    import torch
    from tqdm import tqdm

    received, block_received, handles = _record_inputs(stream, layers, blocks)
    paths = stream.layer_paths()
    for path in paths:
        module = stream.model.get_submodule(path)
        handles += [module.register_forward_pre_hook(lambda *_, path=path: stream.load(path) and None),
                    module.register_forward_hook(lambda *_, path=path: stream.unload(path))]
    parts = _body_parts(stream)
    for part in parts:
        stream.load(part)
    try:
        for batch in tqdm(batches, desc=f"{desc} (whole model body)", unit="batch", disable=not progress):
            stream.model.model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for part in parts:
            stream.unload(part)
    for layer in sorted(layers, key=lambda layer: layer.layer):
        stream.load(paths[layer.layer])
        block = BlockInputs(stream.model.get_submodule(layer.block_path), block_received.pop(layer.path)) \
            if blocks else None
        yield layer, stream.model.get_submodule(layer.path), received.pop(layer.path), block
        stream.unload(paths[layer.layer])


def _record_inputs(stream, layers, blocks: bool) -> tuple[dict, dict, list]:
    """Forward pre-hooks noting what each of `layers`' experts module (and with `blocks` its MoE
    block) receives: ({experts path: calls}, {experts path: block calls}, the hooks' handles)."""
    received = {layer.path: [] for layer in layers}
    block_received = {layer.path: [] for layer in layers}
    handles = [stream.model.get_submodule(layer.path).register_forward_pre_hook(
        _recorder(received[layer.path]), with_kwargs=True) for layer in layers]
    if blocks:
        handles += [stream.model.get_submodule(layer.block_path).register_forward_pre_hook(
            lambda _, args, kwargs, calls=block_received[layer.path]: calls.append((args, kwargs)), with_kwargs=True)
            for layer in layers]
    return received, block_received, handles


def _body_parts(stream) -> list[str]:
    """What the model body holds besides its decoder layers (embeddings, rotary, per-layer input
    projections, Inkling2's message gate, ...): loaded while it runs."""
    from moec.weights import part_of

    body = stream.model.model
    layer_paths = stream.layer_paths()
    names = [name for name, _ in [*body.named_parameters(prefix="model"), *body.named_buffers(prefix="model")]]
    return sorted({part_of(name.rpartition(".")[0], layer_paths) for name in names} - set(layer_paths))


def _recorder(calls: list):
    """A forward pre-hook noting an experts call's (hidden, top_k_index, top_k_weights) as NumPy."""
    from moec.experts import call_arguments

    def hook(module, args, kwargs):
        hidden, index, weights = call_arguments(args, kwargs)
        calls.append((hidden.detach().reshape(-1, hidden.shape[-1]).float().numpy(), index.numpy(),
                      weights.detach().float().numpy()))
    return hook


def calibrate(model_dir: str | Path, *, data: str | Path | None = None, samples: int = 64,
              seq_len: int = 256, bits: tuple[int, ...] = DEFAULT_BITS, group_size: int = 128,
              non_expert: bool = False, progress: bool = True) -> dict:
    """Run the model on calibration text layer by layer; return the moec-stats/1 dict. `non_expert`:
    also measure the other weights' losses (NonExpertLosses)."""
    from transformers import AutoConfig

    from moec.checkpoint import open_checkpoint
    from moec.runtime import Tokenizer

    if not bits or any(not 0 <= b <= 8 for b in bits):
        raise MoecError(f"--bits must be widths between 0 (the expert dropped) and 8, got {bits}")
    start = time.perf_counter()
    checkpoint = open_checkpoint(model_dir)
    text, source = read_text(data)
    windows = token_windows(Tokenizer(checkpoint.path).encode(text), samples, seq_len)
    layers, shape = [], None
    others = NonExpertLosses(tuple(bits), group_size) if non_expert else None
    for layer, module, calls, block in moe_inputs(checkpoint, windows, progress=progress, blocks=0 in bits,
                                                  non_expert=others):
        shape = shape or {"num_experts": layer.num_experts, "top_k": int(calls[0][1].shape[1]),
                          "moe_intermediate_size": layer.intermediate_size,
                          "expert_projections": list(layer.spec.projections)}
        layers.append({"layer": layer.layer, **layer_stats(layer, module, calls, tuple(bits), group_size, block),
                       **({"residual_norm": others.layer_residual[layer.layer]} if others else {})})
        module = calls = block = None
    config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=False)
    return {
        "format": STATS_FORMAT,
        "model": {"name_or_path": str(checkpoint.path.resolve()), "model_type": config.model_type,
                  "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size, **shape},
        "calibration": {"data": source, "samples": int(len(windows)), "seq_len": seq_len,
                        "tokens": int(windows.size), "bits": list(bits), "group_size": group_size,
                        "quantizer": "rtn-asymmetric", "seconds": round(time.perf_counter() - start, 2)},
        "layers": layers,
        "super_experts": super_experts(layers, config.num_hidden_layers),
        **({"non_expert": others.stats()} if others is not None else {}),
    }


class LayerOutput(NamedTuple):
    """Stands, in a recorded layer call, for output `index` (> 0) of decoder layer `layer`, which the
    model body hands on to the next layer (GLM-MoE-DSA's indexer top-k, Zaya's router state); the
    layer-by-layer replay puts the real output in its place."""

    layer: int
    index: int


def _embed(stream, batches, non_expert: NonExpertLosses | None = None):
    """Embed every batch and record each decoder layer's call arguments (masks, rotary, ...) by
    running the model body with its layers replaced by pass-through recorders. Where the body unpacks
    a layer's output into more than the hidden states, the recorders return LayerOutput markers for
    the rest, which the next layer's recorded call then holds. Returns (each batch's hidden states,
    each layer's calls, whether the body is a pipe: no layer runs twice a batch, and no call's
    arguments besides the hidden states were computed from a layer's output)."""
    import re

    import torch

    class Derived(torch.Tensor):
        """A recorder's output: what the body computes from it is a Derived too (torch's subclass
        propagation), so a call's argument computed from an earlier layer's output shows."""

    class Unpacked(Derived):
        """The recorders' first answer: a body that unpacks it says how many outputs it expects."""

        def __iter__(self):
            return iter(lambda: None, object())  # endless: Python's unpacking error names the count

    class Recorder(torch.nn.Module):
        """Stands in for a decoder layer; the body may read the layer's attributes (Nemotron-H
        its block_type), which come from the real one."""

        def __init__(self, index, layer, calls, inputs, outputs):
            super().__init__()
            self.index, self.calls, self.inputs, self.outputs = index, calls, inputs, outputs
            object.__setattr__(self, "layer", layer)  # not a submodule: stays out of the body's tensors

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(object.__getattribute__(self, "layer"), name)

        def forward(self, hidden_states, *args, **kwargs):
            nonlocal mixes
            values = [*args, *kwargs.values()]
            mixes |= any(isinstance(v, Derived) for value in values
                         for v in (value if isinstance(value, (tuple, list)) else (value,)))
            self.calls.append((args, kwargs))
            if self.inputs is not None:
                self.inputs.append(hidden_states.as_subclass(torch.Tensor))
            if self.outputs is None:
                return hidden_states.as_subclass(Unpacked)
            hidden_states = hidden_states.as_subclass(Derived)
            return hidden_states if self.outputs == 1 else \
                (hidden_states, *(LayerOutput(self.index, k) for k in range(1, self.outputs)))

    body = stream.model.model
    real_layers = body.layers
    mixes = False
    parts = _body_parts(stream)
    for part in parts:
        stream.load(part)
    outputs = None  # how many values the body takes from each layer, once a first run has told
    watch = None if non_expert is None else \
        stream.model.get_input_embeddings().register_forward_hook(non_expert.embedding_hook)
    try:
        for attempt in range(2):
            calls, hidden = [[] for _ in real_layers], []
            body.layers = torch.nn.ModuleList([Recorder(i, layer, c, hidden if i == 0 else None, outputs)
                                               for i, (layer, c) in enumerate(zip(real_layers, calls))])
            try:
                for batch in batches:
                    body(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
                break
            except (ValueError, TypeError, AttributeError) as e:  # the body unpacking, or using, what a recorder gave
                expected = re.search(r"unpack \(expected (\d+)", str(e))
                if attempt or expected is None:
                    raise MoecError(f"{stream.model.config.model_type}: its model body computes with what one decoder "
                                    "layer hands the next, which moec calibrate does not stream layer by layer yet") \
                        from None
                outputs = int(expected.group(1))
    finally:
        body.layers = real_layers
        if watch is not None:
            watch.remove()
    for part in parts:
        stream.unload(part)
    looped = any(len(layer_calls) > len(batches) for layer_calls in calls)
    return hidden, calls, not (mixes or looped)


def _with_outputs(call, outputs: dict):
    """A recorded layer call with each LayerOutput marker replaced by the output it stands for."""
    args, kwargs = call
    real = lambda value: outputs[value] if isinstance(value, LayerOutput) else value  # noqa: E731
    return [real(a) for a in args], {key: real(value) for key, value in kwargs.items()}
