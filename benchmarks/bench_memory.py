"""
The arithmetic behind --max-batch-tokens: how many bytes a training forward pass keeps for
backward, per token, at GPT-2 XL's width in bfloat16. Measured on the CPU (no GPU needed) with
models of 1 and 2 layers and random weights: the difference is one layer's share, the rest is what
lies outside the layers (the float32 logits of the target tokens, and the float32 copy of wte that
lm_head keeps for backward, once per pass). Prints figures; asserts nothing.

    python benchmarks/bench_memory.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_prefix import SavedBytes, examples  # noqa: E402
from benchmarks.common import SIZES  # noqa: E402
from mini_gpt2.model import GPT, GPTConfig  # noqa: E402
from prefix import prefix_hidden  # noqa: E402
from train import make_batch, target_loss  # noqa: E402


def saved_bytes(n_layer, width, B, T, P, dtype, grad_checkpoint):
    torch.manual_seed(0)
    c = GPTConfig(n_layer=n_layer, n_head=width.n_head, n_embd=width.n_embd)
    model = GPT(c).to(dtype).requires_grad_(False)
    kv = (torch.randn(2, n_layer, 2, c.n_head, P, c.head_dim) * 0.5).requires_grad_()
    batch = make_batch(examples(B, T), "cpu")
    with SavedBytes(list(model.parameters())) as saved:
        loss = target_loss(model, prefix_hidden(model, kv, batch, grad_checkpoint=grad_checkpoint), batch)
    loss.backward()
    return saved.total


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(2)
    size, P, budget = "gpt2-xl", 10, 3072
    width = SIZES[size]
    with torch.device("meta"):  # shapes only: count the weights without making them
        weights = sum(p.numel() for p in GPT(width).parameters())
    print(f"{size}: {weights / 1e9:.3f} B weights, {weights * 2 / 2**30:.2f} GiB in bfloat16; "
          f"prefix length {P}, bfloat16\n")
    print("| tokens per sequence | checkpointing | per layer per token | 48 layers per token | rest per token | "
          "rest per pass | activations at 3072 tokens |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for T, ckpt in ((64, False), (128, False), (64, True)):
        # 1 and 2 layers, 4 and 8 rows: one layer's share per token, and what lies outside the
        # layers, split into a part per token and a part per pass
        m = {(n, B): saved_bytes(n, width, B, T, P, torch.bfloat16, ckpt) for n in (1, 2) for B in (4, 8)}
        layer = (m[2, 8] - m[1, 8]) / (8 * T)
        rest = {B: m[1, B] - (m[2, B] - m[1, B]) for B in (4, 8)}
        rest_token = (rest[8] - rest[4]) / (4 * T)
        rest_pass = rest[8] - 8 * T * rest_token
        total = budget * (width.n_layer * layer + rest_token) + rest_pass
        print(f"| {T} | {'yes' if ckpt else 'no'} | {layer / 2**10:.1f} KiB | {width.n_layer * layer / 2**20:.2f} MiB | "
              f"{rest_token / 2**10:.0f} KiB | {rest_pass / 2**20:.0f} MiB | {total / 2**30:.1f} GiB |", flush=True)


if __name__ == "__main__":
    main()
