"""
Train the [start_french] / [start_english] prefixes on a frozen GPT-2, then compare them with
3-shot prompting of the same model on held-out pairs (evaluate.py).

    python train.py                              # the reference experiment: GPT-2 XL, 200,000 pairs
    python train.py --model gpt2 --data pairs.csv --steps 200    # small, runs on a CPU
    python train.py --resume                     # continue an interrupted run in --out
    python train.py --eval-only --prefix runs/prefix/prefix.safetensors   # only the comparison

Writes to --out: prefix.safetensors (the result), checkpoint.pt (to resume), log.csv (loss per
step), results.json and results.md (the comparison).
"""

import argparse
import csv
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import data
import evaluate
import mini_gpt2
from mini_gpt2 import EOT
from prefix import (NAMES, Prefixes, encode_sentence, init_from_words, init_random, load_prefixes, make_batch,
                    prefix_hidden, save_prefixes, target_loss)

# Settings that must match for --resume to continue the same run.
SAME_RUN = ("model", "data", "rows", "heldout", "seed", "steps", "batch_size", "grad_accum", "lr", "warmup",
            "prefix_len", "max_len", "reparam", "init")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a checkpoint folder "
                    "(default gpt2-xl; with --eval-only, the prefix's own)")
    ap.add_argument("--data", help="CSV with columns en,fr (default: the first --rows of the Kaggle dataset, downloaded)")
    ap.add_argument("--rows", type=int, default=data.DEFAULT_ROWS, help="read only the first N pairs (default 200000)")
    ap.add_argument("--heldout", type=int, default=1000, help="pairs held out for evaluation (at most a tenth; default 1000)")
    ap.add_argument("--out", default="runs/prefix", help="output folder (default runs/prefix)")
    ap.add_argument("--steps", type=int, default=5000, help="optimizer steps (default 5000)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    ap.add_argument("--grad-accum", type=int, default=4, help="forward passes per optimizer step (default 4)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then linear decay to 0 (default 100)")
    ap.add_argument("--prefix-len", type=int, default=10, help="virtual tokens per prefix (default 10)")
    ap.add_argument("--max-len", type=int, default=128, help="skip pairs longer than this many tokens (default 128)")
    ap.add_argument("--reparam", action="store_true", help="train through the paper's MLP reparameterisation")
    ap.add_argument("--init", choices=["words", "random"], default="words",
                    help="start from the model's keys/values for 'French:'/'English:' (default) or random")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute activations during backward: less memory, more time")
    ap.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps (default 250)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the split, the data order and random init (default 0)")
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    ap.add_argument("--no-eval", action="store_true", help="stop after training, without the comparison")
    evaluate.add_args(ap)
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "prefix_len", "max_len", "rows", "save_every", "eval_size",
                 "shots", "eval_batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_data(args):
    """-> (training pairs, held-out pairs)."""
    path = args.data or data.fetch_kaggle(args.rows)
    pairs, skipped = data.read_pairs(path, args.rows)
    if len(pairs) < 2:
        raise ValueError(f"{path}: found {len(pairs)} usable pairs")
    train, held = data.split(pairs, args.heldout, args.seed)
    print(f"data: {len(pairs)} pairs from {path} ({skipped} empty or broken rows skipped); "
          f"{len(train)} to train, {len(held)} held out")
    return train, held


def make_examples(pairs, max_len):
    """
    Each pair, both ways: (source ids, target ids + EOT, source prefix, target prefix), prefix 0 being
    [start_french]. Returns the examples and how many were longer than max_len.
    """
    examples, too_long = [], 0
    for en, fr in tqdm(pairs, desc="tokenizing", unit=" pairs", leave=False):
        en_ids, fr_ids = encode_sentence(en), encode_sentence(fr)
        for src, tgt, s, t in ((fr_ids, en_ids, 0, 1), (en_ids, fr_ids, 1, 0)):
            if len(src) + len(tgt) + 1 > max_len:
                too_long += 1
            else:
                examples.append((src, tgt + [EOT], s, t))
    return examples, too_long


def batch_order(examples, batch_size, seed, epoch):
    """
    The batches of one pass over the data, as lists of example indices: shuffled with (seed, epoch),
    then sorted by length inside windows of 64 batches, so a batch holds sequences of similar
    length (little padding) while the order of batches stays random.
    """
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    length = lambda i: len(examples[i][0]) + len(examples[i][1])  # noqa: E731
    batches = []
    window = 64 * batch_size
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=length)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class Batches:
    """Micro-batch number k of the whole run, always the same one: the data position is just k."""

    def __init__(self, examples, batch_size, seed):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.order = None, None

    def __getitem__(self, k):
        n = math.ceil(len(self.examples) / self.batch_size)
        if self.epoch != k // n:
            self.epoch = k // n
            self.order = batch_order(self.examples, self.batch_size, self.seed, self.epoch)
        return [self.examples[i] for i in self.order[k % n]]


def lr_at(step, args):
    """Linear warm-up, then linear decay to zero at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (args.steps - step) / max(1, args.steps - args.warmup))


def save_checkpoint(path, prefixes, optimizer, step, args):
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"prefixes": prefixes.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "args": {k: getattr(args, k) for k in SAME_RUN}}, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint under the real name


def eval_only(args, device):
    prefix_path = Path(args.prefix or Path(args.out) / "prefix.safetensors")
    if not prefix_path.exists():
        raise FileNotFoundError(f"no prefix file at {prefix_path}: train one first, or point --prefix at one")
    _, _, meta = load_prefixes(prefix_path)
    args.model = args.model or meta.get("model", "gpt2-xl")
    evaluate.check_split(args, meta)
    train_pairs, held = load_data(args)
    model = mini_gpt2.from_pretrained(args.model, device=device)
    evaluate.run(args, model, prefix_path, train_pairs, held)
    return 0


class LossNotFinite(ValueError):
    pass


def open_log(path, resume_step):
    """log.csv, one row per step; on resume, rows past the checkpoint (from a crash) are dropped."""
    rows = []
    if resume_step and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= resume_step]
    f = open(path, "w", newline="")
    log = csv.writer(f)
    log.writerows([["step", "loss", "lr", "tokens", "seconds"]] + rows)
    return f, log


def train_loop(args, model, prefixes, optimizer, batches, step, device):
    """
    Optimizer steps from `step` to args.steps; returns the step reached. Ctrl-C or a crash saves a
    checkpoint of the last completed step first (a step cut short is dropped whole); a loss that is
    not finite stops the run without overwriting the last good checkpoint.
    """
    checkpoint_path = Path(args.out) / "checkpoint.pt"
    log_file, log = open_log(Path(args.out) / "log.csv", step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    bar = tqdm(total=args.steps, initial=step, desc="training", unit="step")
    t0, tokens_seen, saved = time.time(), 0, step
    try:
        while step < args.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            loss_sum, tokens = 0.0, 0
            for micro in range(args.grad_accum):
                idx, src_len, seq_len, sp, tp = make_batch(batches[step * args.grad_accum + micro], device)
                with autocast:
                    h = prefix_hidden(model, prefixes.kv(), idx, src_len, seq_len, sp, tp, args.grad_checkpoint)
                    loss = target_loss(model, h, idx, src_len, seq_len)
                (loss / args.grad_accum).backward()
                loss_sum += loss.item() / args.grad_accum
                tokens += int(seq_len.sum())
            if not math.isfinite(loss_sum):
                kept = f"the last good checkpoint (step {saved}) is {checkpoint_path}" if saved else "nothing was saved"
                raise LossNotFinite(f"the loss became {loss_sum} at step {step + 1}; stopped, and {kept}. "
                                    "Try a lower --lr, then --resume")
            torch.nn.utils.clip_grad_norm_(prefixes.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens
            elapsed = time.time() - t0
            log.writerow([step, f"{loss_sum:.4f}", f"{lr_at(step - 1, args):.3g}", tokens, f"{elapsed:.1f}"])
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
            bar.update(1)
            if step % args.save_every == 0 or step == args.steps:
                log_file.flush()
                save_checkpoint(checkpoint_path, prefixes, optimizer, step, args)
                saved = step
    except BaseException as e:
        bar.close()
        log_file.close()
        if isinstance(e, LossNotFinite):
            raise
        if step > saved:
            optimizer.zero_grad(set_to_none=True)
            save_checkpoint(checkpoint_path, prefixes, optimizer, step, args)
        if isinstance(e, KeyboardInterrupt):
            print(f"\ninterrupted at step {step}; saved {checkpoint_path}. Continue with the same command "
                  "and --resume", file=sys.stderr)
            return step
        print(f"\nstopped by an error at step {step}; saved {checkpoint_path} (--resume continues)", file=sys.stderr)
        raise
    bar.close()
    log_file.close()
    return step


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    device = args.device or mini_gpt2.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but PyTorch sees no CUDA GPU")
    if device == "cpu" and (args.model or "gpt2-xl") in ("gpt2-large", "gpt2-xl"):
        print(f"note: no CUDA GPU, so {args.model or 'gpt2-xl'} would run on the CPU, where training takes days; "
              "for a CPU, try --model gpt2", file=sys.stderr)
    if args.eval_only:
        return eval_only(args, device)
    args.model = args.model or "gpt2-xl"

    checkpoint_path = out / "checkpoint.pt"
    state = None
    if args.resume:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        changed = [k for k in SAME_RUN if state["args"][k] != getattr(args, k)]
        if changed:
            raise ValueError(f"--resume: {checkpoint_path} was made with other settings ({', '.join('--' + k.replace('_', '-') for k in changed)})")

    train_pairs, held = load_data(args)
    model = mini_gpt2.from_pretrained(args.model, device=device)
    model.requires_grad_(False)  # GPT-2 stays frozen: only the prefixes learn
    if args.max_len > model.config.n_positions:
        raise ValueError(f"--max-len {args.max_len} is more than the model's {model.config.n_positions} positions")
    examples, too_long = make_examples(train_pairs, args.max_len)
    if not examples:
        raise ValueError(f"every training pair is longer than --max-len {args.max_len} tokens")
    print(f"training examples: {len(examples)} (both directions; {too_long} longer than {args.max_len} tokens skipped)")

    if args.init == "words":
        init = init_from_words(model, NAMES, args.prefix_len)
    else:
        init = init_random(model, NAMES, args.prefix_len, torch.Generator().manual_seed(args.seed))
    prefixes = Prefixes(init, reparam=args.reparam).to(device)
    optimizer = torch.optim.AdamW(prefixes.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if state:
        prefixes.load_state_dict(state["prefixes"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resuming at step {step} of {args.steps}")
    n_params = sum(p.numel() for p in prefixes.parameters())
    print(f"model {args.model} on {device}, frozen; training {n_params:,} parameters for the prefixes "
          f"({'through the MLP' if args.reparam else 'directly'}, {args.prefix_len} virtual tokens each)")

    out.mkdir(parents=True, exist_ok=True)
    if train_loop(args, model, prefixes, optimizer, Batches(examples, args.batch_size, args.seed), step, device) != args.steps:
        return 130

    prefix_path = out / "prefix.safetensors"
    save_prefixes(prefix_path, prefixes.fold(), NAMES, model.config, model=args.model, steps=args.steps,
                  lr=args.lr, batch=args.batch_size * args.grad_accum, reparam=args.reparam, init=args.init,
                  data=args.data or "kaggle", rows=args.rows, heldout=args.heldout, seed=args.seed)
    print(f"prefixes saved: {prefix_path} ({prefix_path.stat().st_size / 2**20:.1f} MB)")
    if not args.no_eval:
        evaluate.run(args, model, prefix_path, train_pairs, held)
    return 0


if __name__ == "__main__":
    cli.run(main)
