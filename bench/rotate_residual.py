"""What a residual-stream rotation would buy (#33's lever 5), measured before it is built as a pass.

Writes a copy of a Mixtral-layout checkpoint (MixtralForCausalLM as transformers 5 stores it: fused
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]) that computes the same function
with its residual stream rotated by a random orthogonal Q (a Hadamard matrix with random signs,
QuaRot's choice): every RMSNorm's scale folded into the products that read it and set to 1; the
embedding, and each product that reads the stream (q/k/v, router, experts' gate and up, head) times Q;
each product that writes it (o_proj, experts' down) by Q's transpose. Outliers of the stream's
channels spread over all of them, which is what lets low-bit groups fit the weights better.

The copy is an ordinary checkpoint of the same family, so moec calibrates, plans, quantizes and
verifies it unchanged; bench/size_quality.py then scores it against the original on the same text.
The script checks the copy's logits against the original's before writing it.

    python bench/rotate_residual.py CHECKPOINT OUT [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

NORMS = ("input_layernorm", "post_attention_layernorm")


def hadamard(size: int, seed: int) -> torch.Tensor:
    """A size x size orthogonal matrix: Sylvester's Hadamard (size a power of 2), columns' signs random."""
    if size & (size - 1):
        raise SystemExit(f"hidden size {size} is not a power of 2: this probe builds Q from Sylvester's Hadamard")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    return h * signs / size**0.5


def rotate(model, q: torch.Tensor) -> None:
    """Fold the norms and rotate the stream in place (float64 arithmetic, stored back in the model's dtype)."""
    def update(weight: torch.nn.Parameter, value: torch.Tensor) -> None:
        weight.data = value.to(weight.dtype)

    def reads(weight: torch.nn.Parameter, scale: torch.Tensor) -> None:  # [..., out, H]: x -> x diag(scale) Q
        update(weight, weight.double() * scale @ q)

    def writes(weight: torch.nn.Parameter) -> None:  # [..., H, in]: its output y -> y Q
        update(weight, q.T @ weight.double())

    body = model.model
    update(body.embed_tokens.weight, body.embed_tokens.weight.double() @ q)
    for layer in body.layers:
        attention, moe = layer.self_attn, layer.mlp
        scale = layer.input_layernorm.weight.double()
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
            reads(proj.weight, scale)
        writes(attention.o_proj.weight)
        scale = layer.post_attention_layernorm.weight.double()
        reads(moe.gate.weight, scale)
        reads(moe.experts.gate_up_proj, scale)
        writes(moe.experts.down_proj)
        for norm in NORMS:
            torch.nn.init.ones_(getattr(layer, norm).weight)
    reads(model.lm_head.weight, body.norm.weight.double())
    torch.nn.init.ones_(body.norm.weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    if original.config.model_type != "mixtral" or original.config.tie_word_embeddings:
        raise SystemExit(f"{args.checkpoint}: this probe rotates untied Mixtral checkpoints only")
    rotated = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    rotate(rotated, hadamard(original.config.hidden_size, args.seed))
    ids = torch.randint(0, original.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(ids).logits, rotated(ids).logits
    diff = float((want - got).abs().max())
    if diff > 1e-3:
        raise SystemExit(f"the rotated copy computes another function: max logit difference {diff:.3g}")
    args.out.mkdir(parents=True, exist_ok=True)
    rotated.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (args.checkpoint / name).is_file():
            shutil.copy(args.checkpoint / name, args.out / name)
    print(f"wrote {args.out}: residual stream rotated (seed {args.seed}), max logit difference {diff:.3g}")


if __name__ == "__main__":
    main()
