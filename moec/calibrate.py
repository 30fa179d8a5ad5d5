"""`moec calibrate`: measure how much each expert matters (MC-MoE's pre-loading statistics).

The model is streamed layer by layer from safetensors: each decoder layer is materialized,
the cached hidden states of every calibration sequence are run through it while its MoE block's
inputs are recorded, the statistics are computed, and the layer is freed. Peak memory is about
one layer plus the activations.

Per sparse layer and expert it records (moec-stats/1, read by `moec plan`):
  frequency       tokens routed to the expert by the model's own top-k
  routing_weight  sum of the expert's routing weight over those tokens
  quant_loss[b]   L2 norm of the MoE block's output error when that expert alone is RTN-quantized
                  to b bits (asymmetric, blocks of group_size along the input), summed over batches
and per layer `pruning`: for each beta of a grid, the fraction of the layer's top-k activations
MC-MoE's dynamic pruning rule drops and the relative error of the MoE output it causes (what
`moec plan --prune-target` chooses layers and betas from).
Hessians for error-compensating quantization are not stored: the same streaming recomputes them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from moec.errors import MoecError
from moec.text import read_text, token_windows

STATS_FORMAT = "moec-stats/1"
DEFAULT_BITS = (2, 4, 8)
BATCH_SEQUENCES = 8
PRUNING_BETAS = tuple(round(0.025 * i, 3) for i in range(1, 40))  # 0.025 ... 0.975


def layer_stats(block, inputs: list, bits: tuple[int, ...], group_size: int) -> dict:
    """One sparse layer's statistics from what its MoE block received (one [tokens, H] per batch)."""
    from moec.ops.moe import PROJECTIONS, expert_ffn, expert_hidden
    from moec.quant import fake_quantize

    spec, experts = block.spec, block.num_experts
    frequency = np.zeros(experts)
    routing_weight = np.zeros(experts)
    quant_loss = np.zeros((experts, len(bits)))
    routed = []
    for x in map(np.asarray, inputs):
        weights, indices = block.route(x)
        routed.append((x, weights, indices))
        np.add.at(frequency, indices.ravel(), 1)
        np.add.at(routing_weight, indices.ravel(), weights.ravel())

    outputs = [np.zeros((x.shape[0], spec.top_k, x.shape[1]), np.float32) for x, _, _ in routed]
    for e in range(experts):
        picks = [np.nonzero(indices == e) for _, _, indices in routed]
        if not any(tokens.size for tokens, _ in picks):
            continue
        # the expert's tokens of every batch in one matrix; its weights upcast from the stored dtype
        # (and quantized) one projection at a time, so a Mixtral-8x7B expert adds ~0.7 GB, not 1.4
        x = np.concatenate([x[tokens] for (x, _, _), (tokens, _) in zip(routed, picks)])
        bounds = np.cumsum([tokens.size for tokens, _ in picks])[:-1]
        weight = lambda p: getattr(block, p)[e].float().numpy()  # noqa: B023
        bias = {p: None if getattr(block, f"{p}_bias") is None else getattr(block, f"{p}_bias")[e].float().numpy()
                for p in PROJECTIONS}
        exact = expert_ffn(x, weight("gate"), weight("up"), weight("down"), spec, *bias.values())
        for out, (tokens, rank), rows in zip(outputs, picks, np.split(exact, bounds)):
            out[tokens, rank] = rows
        for j, width in enumerate(bits):
            quantized = lambda p: fake_quantize(weight(p), width, group_size)  # noqa: B023
            hidden = expert_hidden(x, quantized("gate"), quantized("up"), spec, bias["gate"], bias["up"])
            error = hidden @ quantized("down").T + (0 if bias["down"] is None else bias["down"]) - exact
            for (_, weights, _), (tokens, rank), rows in zip(routed, picks, np.split(error, bounds)):
                if tokens.size:
                    quant_loss[e, j] += float(np.linalg.norm(rows * weights[tokens, rank][:, None]))
    return {
        "experts": [{"frequency": float(frequency[e]), "routing_weight": float(routing_weight[e]),
                     "quant_loss": {str(width): float(quant_loss[e, j]) for j, width in enumerate(bits)}}
                    for e in range(experts)],
        "pruning": _pruning(spec, routed, outputs),
    }


def _pruning(spec, routed, outputs) -> dict:
    """The layer's dynamic-pruning curve: for each beta of PRUNING_BETAS, the fraction of its
    top-k (token, expert) activations the beta rule drops and the relative L2 error of the MoE
    output that causes (kept weights renormalized as the architecture does; no token protected)."""
    import dataclasses

    from moec.ops.dynamic_gating import prune

    betas = PRUNING_BETAS if spec.top_k > 1 else ()
    dropped, error = np.zeros(len(betas)), np.zeros(len(betas))
    norm = activations = 0.0
    for (_, weights, _), out in zip(routed, outputs):
        full = (out * weights[..., None]).sum(1)
        norm += float(np.sum(full.astype(np.float64) ** 2))
        activations += weights.size
        for j, beta in enumerate(betas):
            kept, keep = prune(weights, dataclasses.replace(spec, beta=beta))
            dropped[j] += float(weights.size - keep.sum())
            error[j] += float(np.sum(((out * kept[..., None]).sum(1) - full).astype(np.float64) ** 2))
    return {"beta": list(betas), "pruned_fraction": [float(d / max(activations, 1)) for d in dropped],
            "relative_error": [float(np.sqrt(e / norm)) if norm > 0 else 0.0 for e in error]}


def moe_inputs(checkpoint, windows: np.ndarray, *, desc: str = "calibrate", progress: bool = True):
    """Stream the model layer by layer over token windows.

    Yields (block, inputs) for each sparse layer: its canonical MoEBlock and what its MoE block
    received, one [tokens, H] fp32 tensor per batch of sequences. The layer computes in fp32 with
    its sparse block run by the MoE op's reference, which upcasts one expert at a time (the routed
    experts stay in the checkpoint's dtype). The layer stays materialized until the consumer asks
    for the next one; then it is freed.
    """
    import torch
    from tqdm import tqdm

    from moec.adapters import adapter_for
    from moec.reference import swap_block
    from moec.weights import StreamingModel

    stream = StreamingModel(checkpoint)
    adapter = adapter_for(stream.model.config)
    stream.keep_stored(adapter.routed_experts(stream.model))
    batches = [torch.from_numpy(w) for w in np.array_split(windows, -(-len(windows) // BATCH_SEQUENCES))]
    with torch.no_grad():
        hidden, calls = _embed(stream, batches)
        for i, path in enumerate(tqdm(stream.layer_paths(), desc=desc, unit="layer", disable=not progress)):
            layer = stream.load(path)
            moe = getattr(layer, adapter.moe_attr)
            block = adapter.block(i, moe, f"{path}.{adapter.moe_attr}") if adapter.is_sparse(moe) else None
            restore = swap_block(stream.model, block, adapter) if block is not None else None
            inputs = []
            handle = getattr(layer, adapter.moe_attr).register_forward_pre_hook(
                lambda module, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
            for b, (args, kwargs) in enumerate(calls[i]):
                out = layer(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
            handle.remove()
            if block is not None:
                restore()
                yield block, inputs
            layer = moe = block = inputs = None  # a block's views would keep the layer's tensors alive
            stream.unload(path)


def calibrate(model_dir: str | Path, *, data: str | Path | None = None, samples: int = 64,
              seq_len: int = 256, bits: tuple[int, ...] = DEFAULT_BITS, group_size: int = 128,
              progress: bool = True) -> dict:
    """Run the model on calibration text layer by layer; return the moec-stats/1 dict."""
    from transformers import AutoConfig

    from moec.checkpoint import open_checkpoint
    from moec.runtime import Tokenizer

    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise MoecError(f"--bits must be widths between 1 and 8, got {bits}")
    start = time.perf_counter()
    checkpoint = open_checkpoint(model_dir)
    text, source = read_text(data)
    windows = token_windows(Tokenizer(checkpoint.path).encode(text), samples, seq_len)
    layers, shape = [], None
    for block, inputs in moe_inputs(checkpoint, windows, progress=progress):
        shape = shape or {"num_experts": block.num_experts, "top_k": block.spec.top_k,
                          "moe_intermediate_size": int(block.gate.shape[1])}
        layers.append({"layer": block.spec.layer, **layer_stats(block, inputs, tuple(bits), group_size)})
        block = None
    if not layers:
        raise MoecError(f"{checkpoint.path}: the model has no sparse MoE layers")
    config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=False)
    return {
        "format": STATS_FORMAT,
        "model": {"name_or_path": str(checkpoint.path.resolve()), "model_type": config.model_type,
                  "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size, **shape},
        "calibration": {"data": source, "samples": int(len(windows)), "seq_len": seq_len,
                        "tokens": int(windows.size), "bits": list(bits), "group_size": group_size,
                        "quantizer": "rtn-asymmetric", "seconds": round(time.perf_counter() - start, 2)},
        "layers": layers,
    }


def _embed(stream, batches):
    """Embed every batch and record each decoder layer's call arguments (masks, rotary, ...) by
    running the model body with its layers replaced by pass-through recorders."""
    import torch

    class Recorder(torch.nn.Module):
        def __init__(self, calls, inputs=None):
            super().__init__()
            self.calls, self.inputs = calls, inputs

        def forward(self, hidden_states, *args, **kwargs):
            self.calls.append((args, kwargs))
            if self.inputs is not None:
                self.inputs.append(hidden_states)
            return hidden_states

    body = stream.model.model
    real_layers, real_norm = body.layers, body.norm
    calls = [[] for _ in real_layers]
    hidden = []
    parts = [p for p in ("model.embed_tokens", "model.rotary_emb") if _has(stream.model, p)]
    for part in parts:
        stream.load(part)
    body.layers = torch.nn.ModuleList([Recorder(calls[0], hidden)] + [Recorder(c) for c in calls[1:]])
    body.norm = torch.nn.Identity()  # still on the meta device; its output is not needed
    try:
        for batch in batches:
            body(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    finally:
        body.layers, body.norm = real_layers, real_norm
    for part in parts:
        stream.unload(part)
    return hidden, calls


def _has(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
