"""
How far the learned prefix moves from where it started, per optimizer step, when it is learned
directly and when it is learned through the paper's MLP (--reparam): the evidence behind the two
default learning rates. Random weights and random tokens (the loss is meaningless; the question is
only how an AdamW step at a given rate turns into a change of the keys/values). Prints figures;
asserts nothing.

    python benchmarks/bench_lr.py                  # GPT-2 XL's width, 4 layers, on the CPU: about a minute
    python benchmarks/bench_lr.py --layers 48      # the whole XL shape (slow on a CPU)

With AdamW every parameter moves by about the learning rate per step, whatever its gradient's
size. Learned directly, that is the prefix itself. Through the MLP, each key/value is a sum over
the MLP's 512 hidden units, all of which move: one step moves it many times further.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402
from benchmarks.bench_prefix import examples  # noqa: E402
from benchmarks.common import SIZES, random_checkpoint  # noqa: E402
from mini_gpt2 import GPTConfig, from_pretrained  # noqa: E402
from methods import METHODS  # noqa: E402
from prefix import NAMES, Prefixes  # noqa: E402


def distances(model, method, reparam, lr, steps, B, T):
    """RMS distance of the learned tensor from its start after each of `steps` AdamW steps (as train.py takes them)."""
    init = METHODS[method].init_random(model, NAMES, 10, torch.Generator().manual_seed(0))
    prefixes = Prefixes(init, reparam=reparam)
    start = prefixes.fold()
    opt = torch.optim.AdamW(prefixes.parameters(), lr=lr, weight_decay=0.0)
    out = []
    for step in range(steps):
        M = METHODS[method]
        train.mean_loss(model, M, prefixes, examples(B, T, seed=step), train.Packing(10**9, M.POSITIONS_PER_VIRTUAL_TOKEN * 10),
                        backward=True)
        torch.nn.utils.clip_grad_norm_(prefixes.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((prefixes.fold() - start).pow(2).mean().sqrt().item())
    return out, start.pow(2).mean().sqrt().item()


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="gpt2-xl", help="whose width (default gpt2-xl)")
    ap.add_argument("--layers", type=int, default=4, help="how many of its layers (default 4)")
    ap.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c = SIZES[args.size]
    folder = random_checkpoint(GPTConfig(n_layer=args.layers, n_head=c.n_head, n_embd=c.n_embd))
    model = from_pretrained(folder, device="cpu").requires_grad_(False)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.size} width ({c.n_head} heads x {c.head_dim}), {args.layers} layers, random weights as GPT-2 "
          f"initialises them, prefix length 10, batch 8 x 32 random tokens\n")
    runs = [("keys/values directly", "prefix", False, 1e-3), ("keys/values through the MLP", "prefix", True, 1e-3),
            ("input embeddings (prompt)", "prompt", False, 1e-3),
            ("keys/values directly", "prefix", False, METHODS["prefix"].LR),
            ("keys/values through the MLP", "prefix", True, METHODS["prefix"].REPARAM_LR),
            ("input embeddings (prompt)", "prompt", False, METHODS["prompt"].LR)]
    marks = [m for m in (1, 10, 30, 100, 300, 1000) if m <= args.steps]
    print("| learned | lr | " + " | ".join(f"after {m} step{'s' * (m > 1)}" for m in marks) + " | per step, in units of lr |")
    print("|---|---:|" + "---:|" * len(marks) + "---:|")
    scales = {}
    for name, method, reparam, lr in runs:
        d, scales[name] = distances(model, method, reparam, lr, args.steps, 8, 32)
        print(f"| {name} | {lr:g} | " + " | ".join(f"{d[m - 1]:.2e}" for m in marks) +
              f" | {d[-1] / args.steps / lr:.1f} |", flush=True)
    print("\nRMS distance of the learned numbers from their start; their own RMS at the start (random weights: a "
          "real model's differ): " + ", ".join(f"{name} {scale:.3f}" for name, scale in scales.items()))


if __name__ == "__main__":
    main()
