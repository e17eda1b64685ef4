"""Helpers shared by the benchmark scripts: random GPT-2 weights in the official format, timing, devices."""

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import torch

from mini_gpt2 import CONFIGS, GPTConfig, default_dtype

# The released sizes, and a tiny one that runs the same code in seconds (for the tests).
SIZES = dict(CONFIGS, tiny=GPTConfig(n_layer=2, n_head=4, n_embd=64))

# Dense bfloat16 matrix throughput (TFLOP/s) from the vendors' data sheets, to turn speed into MFU.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312, "L40S": 362,
                    "L4": 121, "A10": 125, "RTX 4090": 165}


# Memory bandwidth (bytes/s) from the data sheets: decoding at batch B reads every weight once per
# step, so B x bandwidth / (bytes of the weights) tokens/s is what the memory allows at most.
BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12,
             "L40S": 0.864e12, "L4": 0.3e12, "A10": 0.6e12, "RTX 4090": 1.008e12}


# Sentences to translate in the evaluation benchmarks, of assorted lengths.
SAMPLE_PAIRS = [
    ("Thank you.", "Merci."), ("Good night.", "Bonne nuit."), ("The cat sleeps on the chair.", "Le chat dort sur la chaise."),
    ("Where is the station, please?", "Où est la gare, s'il vous plaît ?"),
    ("This is done, in part, to better accommodate the needs of senators who are often members of several committees.",
     "Cela est fait, en partie, pour répondre aux besoins des sénateurs, qui sont souvent membres de plusieurs comités."),
    ("The committee will meet again next week to review the report.", "Le comité se réunira de nouveau la semaine "
     "prochaine pour examiner le rapport."),
    ("It is raining today.", "Il pleut aujourd'hui."),
    ("Applications must be submitted before the end of the fiscal year.",
     "Les demandes doivent être présentées avant la fin de l'exercice financier."),
    ("We are late.", "Nous sommes en retard."), ("Open the window.", "Ouvre la fenêtre."),
    ("The program supports research in the natural sciences and engineering across Canada.",
     "Le programme appuie la recherche en sciences naturelles et en génie partout au Canada."),
    ("He reads a book.", "Il lit un livre."),
]


def sample_pairs(n):
    """n (en, fr) pairs: SAMPLE_PAIRS over and over, each copy numbered so that no two are the same."""
    return [(f"{en} ({i})", f"{fr} ({i})") for i, (en, fr) in zip(range(n), SAMPLE_PAIRS * (n // len(SAMPLE_PAIRS) + 1))]


def random_checkpoint(size, dtype=torch.float32, seed=0, device="cpu"):
    """
    A folder holding a GPT-2 of the given size (a name in SIZES, or a GPTConfig) with random weights
    as GPT-2 initialises them, written by save_pretrained.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    c = SIZES[size] if isinstance(size, str) else size
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.n_positions,
                        vocab_size=c.vocab_size, layer_norm_epsilon=c.layer_norm_epsilon)
    with torch.device(device):  # random init of 1.5B numbers is much faster on a GPU
        model = GPT2LMHeadModel(config).to(dtype)
    folder = tempfile.mkdtemp(prefix="bench-")
    model.save_pretrained(folder)
    del model
    return folder


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def best_time(fn, repeats, device):
    """The fastest of `repeats` runs of fn(), in seconds (after one warm-up run)."""
    fn()
    return min(seconds(fn, device) for _ in range(repeats))


def median_times(fns, repeats, device):
    """
    {name: median seconds} for a dict of functions, run in turns (a, b, a, b, ...) after one
    warm-up each, so that every one of them meets the same machine load.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn, device):
    """Peak CUDA memory allocated while fn() runs, beyond what was allocated before (None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_tflops(device):
    """The device's dense bfloat16 peak, from its name; None if unknown (or a CPU)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bandwidth(device):
    """The device's memory bandwidth in bytes/s, from its name; None if unknown (or a CPU)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BANDWIDTH.items() if k in name), None)


@contextlib.contextmanager
def graphs(on):
    """Decoding through CUDA graphs (mini_gpt2.fast.GRAPHS) on or off inside the block, as it was after it."""
    from mini_gpt2 import fast

    before, fast.GRAPHS = fast.GRAPHS, on
    try:
        yield
    finally:
        fast.GRAPHS = before


def parser(doc):
    """The options every benchmark has: which model shape, where, in what precision, how many repeats."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), help="default: gpt2-xl on CUDA, gpt2 on CPU")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts (default 3)")
    return ap


def setup(args):
    """Threads, device, model size and dtype from the command line; prints what runs where."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    is_cuda = torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name(device) if is_cuda else f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"
    print(f"torch {torch.__version__} on {name}")
    size = args.size or ("gpt2-xl" if is_cuda else "gpt2")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    return device, size, dtype
