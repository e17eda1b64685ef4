"""Helpers shared by the benchmark scripts: random GPT-2 weights in the official format, and timing."""

import argparse
import os
import tempfile
import time

import torch

from mini_gpt2 import CONFIGS, default_dtype


def random_checkpoint(size, dtype=torch.float32, seed=0):
    """A folder holding a GPT-2 of the given size with random weights, written by save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = CONFIGS[size]
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.n_positions,
                        vocab_size=c.vocab_size, layer_norm_epsilon=c.layer_norm_epsilon)
    model = GPT2LMHeadModel(config).to(dtype)
    folder = tempfile.mkdtemp(prefix=f"bench-{size}-")
    model.save_pretrained(folder)
    del model
    return folder


def best_time(fn, repeats, device):
    """The fastest of `repeats` runs of fn(), in seconds (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def parser(doc):
    """The options every benchmark has: which model shape, where, how many repeats."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(CONFIGS), help="default: gpt2-xl on CUDA, gpt2 on CPU")
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts (default 3)")
    return ap


def setup(args):
    """Threads, device, model size and dtype from the command line; prints what runs where."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"
    print(f"torch {torch.__version__} on {name}")
    size = args.size or ("gpt2-xl" if device == "cuda" else "gpt2")
    return device, size, default_dtype(device)
