#!/usr/bin/env python3
"""Train a tiny Mixtral-architecture Mixture-of-Experts model on CPU.

The result is a small but genuinely *trained* MoE checkpoint in the standard
Hugging Face layout (config.json, model.safetensors, tokenizer.json, ...), handy
as a test subject for moec: it is small enough to compile in seconds, yet its
routers make real, non-uniform decisions and its greedy generations look like
Python.

Everything is reproducible offline on any machine with Python:

* corpus    -- the Python standard library's own ``.py`` sources (sorted, so the
               selection is deterministic); every 10th file is kept out of training;
* tokenizer -- byte-level BPE trained with the ``tokenizers`` library;
* model     -- ``transformers.MixtralForCausalLM`` (8 experts, top-2, GQA),
               trained with AdamW plus the router load-balancing loss, then
               saved in bfloat16 as safetensors (no pickle files).

Usage::

    python samples/train_sample.py                 # writes samples/tiny-mixtral
    python samples/train_sample.py --steps 100 --out /tmp/quick
"""

import argparse
import os
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]  # id 0 = bos/eos, id 1 = pad


def stdlib_sources(max_bytes):
    """Return (train_texts, heldout_texts) from the stdlib's top-level .py files.

    Files are taken in sorted order until ``max_bytes`` is reached; every 10th
    file goes to the held-out set instead of the training set.
    """
    libdir = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(libdir) if n.endswith(".py"))
    train, heldout, total = [], [], 0
    for i, name in enumerate(names):
        with open(os.path.join(libdir, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        (heldout if i % 10 == 9 else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return train, heldout


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE (GPT-2 style) trained on ``texts``; deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
        model_max_length=512,
    )


def tokenize_corpus(tokenizer, texts):
    """Concatenate all files into one long id stream, separated by eos."""
    ids = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts):
        ids += enc.ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def build_model(tokenizer, hidden_size=128, intermediate_size=160):
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        num_local_experts=8,
        num_experts_per_tok=2,  # top-2 routing
        max_position_embeddings=512,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.02,  # weight of the load-balancing loss (see `balance_loss`)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return MixtralForCausalLM(config)


def balance_loss(router_logits, config):
    """Switch-Transformer load-balancing loss, averaged over layers.

    Passing all layers' logits to transformers' ``load_balancing_loss_func`` at
    once only balances expert usage summed over the layers, which lets single
    layers collapse onto a few experts; applying it layer by layer avoids that.
    """
    losses = [load_balancing_loss_func((logits,), config.num_local_experts, config.num_experts_per_tok)
              for logits in router_logits]
    return torch.stack(losses).mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="samples/tiny-mixtral", help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (default: %(default)s)")
    parser.add_argument("--corpus-bytes", type=int, default=3_000_000, help="stdlib text to read (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--intermediate-size", type=int, default=160, help="each expert's (default: %(default)s)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    train_texts, heldout_texts = stdlib_sources(args.corpus_bytes)
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    data = tokenize_corpus(tokenizer, train_texts)
    print(f"corpus: {len(train_texts)} files, {len(data):,} tokens (vocab {len(tokenizer)}); "
          f"{len(heldout_texts)} files held out")

    model = build_model(tokenizer, args.hidden_size, args.intermediate_size)
    # transformers 5 keeps each layer's experts as fused 3-D weights; its default
    # "grouped_mm" experts kernel runs on CPU and is as fast as "eager" here
    # ("batched_mm" is ~50x slower), so we leave the experts implementation alone.
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay to 10%
        optimizer, lambda s: min((s + 1) / warmup, 1.0 - 0.9 * max(0, s - warmup) / max(1, args.steps - warmup)))

    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    losses = []
    start = time.time()
    bar = tqdm(range(args.steps), desc="train")
    for _ in bar:
        # Random windows from the token stream; loss_function shifts the labels by one.
        offsets = torch.randint(0, len(data) - args.seq_len, (args.batch_size,), generator=generator)
        batch = torch.stack([data[o : o + args.seq_len] for o in offsets])
        out = model(input_ids=batch, output_router_logits=True)
        lm_loss = model.loss_function(out.logits, batch, vocab_size=model.config.vocab_size)
        aux_loss = balance_loss(out.router_logits, model.config)
        (lm_loss + model.config.router_aux_loss_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(lm_loss.item())
        bar.set_postfix(loss=f"{lm_loss.item():.3f}", balance=f"{aux_loss.item():.3f}")  # balance: 2.0 = uniform
    final = sum(losses[-50:]) / len(losses[-50:])
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s; lm loss (mean of last 50 steps) {final:.3f}")

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
