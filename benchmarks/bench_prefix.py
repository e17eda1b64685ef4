"""
A prefix-tuning training step, ours against PEFT's PrefixTuningConfig on transformers' GPT-2, with
the same random weights, batch, sequence length and prefix length, in one process. Prints real
(non-pad) tokens per second and memory, with ratios; asserts nothing.

    python benchmarks/bench_prefix.py                     # gpt2 shape on CPU, fp32, 2 threads: batch 8 x 64, P = 16
    python benchmarks/bench_prefix.py --batch-sizes 8 32 --seq-lens 32 64 128 256 --prefix-lens 10 64   # a grid
    python benchmarks/bench_prefix.py --methods prefix prompt   # both of our methods
    python benchmarks/bench_prefix.py --size gpt2-xl      # the default on CUDA, bf16

Ours runs train.py's own step (train.mean_loss with backward, clipping, AdamW): [source prefix] T/2
source tokens [target prefix] T/2 target tokens, loss on the target; with --methods prompt also
the input-embedding prompts, whose 2P vectors are extra positions with queries in every layer.
PEFT runs one prefix before all T tokens, loss on all of them (its standard causal-LM setup). All are timed in turns,
after a warm-up each; the median of --repeats counts. Memory: on CUDA the peak allocated during a
step beyond the weights; on the CPU the bytes autograd saves for backward (the activations).
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import mini_gpt2  # noqa: E402
import train  # noqa: E402
from mini_gpt2 import fast  # noqa: E402
from benchmarks.common import median_times, parser, peak_memory, random_checkpoint, setup  # noqa: E402
from mini_gpt2 import EOT  # noqa: E402
from methods import METHODS  # noqa: E402
from prefix import NAMES, Prefixes  # noqa: E402


class SavedBytes:
    """Counts the bytes of the tensors autograd keeps for backward, the model's own weights aside."""

    def __init__(self, weights):
        self.weights = {w.untyped_storage().data_ptr() for w in weights}

    def __enter__(self):
        self.total, seen = 0, set(self.weights)

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                self.total += t.untyped_storage().nbytes()
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def memory(step, device, weights):
    """Bytes a step needs beyond the weights: peak CUDA memory, or on the CPU the activations saved."""
    peak = peak_memory(step, device)
    if peak is not None:
        return peak
    with SavedBytes(weights) as saved:
        step()
    return saved.total


def examples(B, T, seed=0):
    """B training examples of T tokens: half source, half target (ending in <|endoftext|>), both directions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, EOT, (B, T), generator=g).tolist()
    return [train.Example(row[:T // 2], row[T // 2:-1] + [EOT], b % 2, 1 - b % 2) for b, row in enumerate(ids)]


def our_step(model, P, batch, device, max_batch_tokens=10**9, grad_checkpoint=False, method="prefix", compiled=None):
    """One optimizer step as train.py takes it, with either method (compiled: a fast.CompiledBlocks, as --compile)."""
    prefixes = Prefixes(METHODS[method].init_random(model, NAMES, P, torch.Generator().manual_seed(0))).to(device)
    opt = torch.optim.AdamW(prefixes.parameters(), lr=1e-3)

    def step():
        train.mean_loss(model, prefixes, batch, method, max_batch_tokens, backward=True,
                        grad_checkpoint=grad_checkpoint, compiled=compiled)
        torch.nn.utils.clip_grad_norm_(prefixes.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peft_step(folder, P, idx, device, dtype):
    """One optimizer step of PEFT's prefix tuning; returns (step, the base model's weights)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device)
    model = get_peft_model(hf, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    model.eval()  # no dropout, like ours
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    mask = torch.ones_like(idx)

    def step():
        model(input_ids=idx, attention_mask=mask, labels=idx).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, list(hf.parameters())


def compare(folder, model, B, T, P, device, dtype, repeats, methods, compiled=False):
    """{name: (seconds, bytes)} for ours (each method, and compiled if asked: "<method> compiled") and PEFT in one cell."""
    batch = examples(B, T)
    idx = torch.tensor([s + t for s, t, _, _ in batch], device=device)
    steps = {m: our_step(model, P, batch, device, method=m) for m in methods}
    if compiled:  # as train.py --compile: the first, untimed run of each compiles it
        steps |= {f"{m} compiled": our_step(model, P, batch, device, method=m, compiled=fast.CompiledBlocks())
                  for m in methods}
    steps["PEFT"], peft_weights = peft_step(folder, P, idx, device, dtype)
    times = median_times(steps, repeats, device)
    return {name: (times[name], memory(step, device, peft_weights if name == "PEFT" else list(model.parameters())))
            for name, step in steps.items()}


def main():
    ap = parser(__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[64], help="real tokens per sequence (default 64)")
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=[16])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["prefix"],
                    help="ours: keys/values in every layer (prefix, default), input-embedding prompts (prompt)")
    ap.add_argument("--compile", action="store_true", help="also each method's step compiled, as train.py --compile")
    args = ap.parse_args()
    device, size, dtype = setup(args)
    print(f"{size}, random weights, {dtype}, median of {args.repeats} (all timed in turns)")
    folder = random_checkpoint(size, dtype=dtype, device="cuda" if torch.device(device).type == "cuda" else "cpu")
    what = "peak memory beyond weights" if torch.device(device).type == "cuda" else "activations saved for backward"
    print("\n| batch | T | P | method | tokens/s | PEFT tokens/s | ours / PEFT | MiB | PEFT MiB | memory ours / PEFT |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    try:
        model = mini_gpt2.from_pretrained(folder, device=device, dtype=dtype).requires_grad_(False)
        for B in args.batch_sizes:
            for T in args.seq_lens:
                for P in args.prefix_lens:
                    r = compare(folder, model, B, T, P, device, dtype, args.repeats, args.methods, args.compile)
                    (s_peft, m_peft) = r["PEFT"]
                    for m in [name for name in r if name != "PEFT"]:
                        s_ours, m_ours = r[m]
                        print(f"| {B} | {T} | {P} | {m} | {B * T / s_ours:.0f} | {B * T / s_peft:.0f} | "
                              f"{s_peft / s_ours:.2f} | {m_ours / 2**20:.1f} | {m_peft / 2**20:.1f} | "
                              f"{m_ours / m_peft:.2f} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nmemory: {what}")


if __name__ == "__main__":
    main()
