"""
A prefix-tuning training step, ours against PEFT's PrefixTuningConfig on transformers' GPT-2, with
the same random weights, batch, sequence length and prefix length, in one process. Prints real
(non-pad) tokens per second and memory, with ratios; asserts nothing.

    python benchmarks/bench_prefix.py                     # gpt2 shape on CPU, fp32, 2 threads
    python benchmarks/bench_prefix.py --size gpt2-xl      # the default on CUDA, bf16

Ours runs its real training layout: [source prefix] 32 source tokens [target prefix] 32 target
tokens, loss on the target. PEFT runs one prefix before all 64 tokens, loss on all of them (its
standard causal-LM setup). Memory: on CUDA the peak allocated during a step, beyond the weights;
on the CPU the bytes autograd saves for backward (the activations), which is what differs.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import mini_gpt2  # noqa: E402
from benchmarks.common import best_time, parser, random_checkpoint, setup  # noqa: E402
from prefix import NAMES, Prefixes, init_random, prefix_hidden, target_loss  # noqa: E402


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


def measure(step, device, repeats, weights):
    """(seconds per step, memory in bytes) for one training step."""
    seconds = best_time(step, repeats, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return seconds, torch.cuda.max_memory_allocated() - base
    with SavedBytes(weights) as saved:
        step()
    return seconds, saved.total


def bench_ours(folder, idx, P, device, dtype, args):
    B, T = idx.shape
    model = mini_gpt2.from_pretrained(folder, device=device, dtype=dtype).requires_grad_(False)
    prefixes = Prefixes(init_random(model, NAMES, P, torch.Generator().manual_seed(0))).to(device)
    opt = torch.optim.AdamW(prefixes.parameters(), lr=1e-3)
    src_len = torch.full((B,), T // 2, device=device)  # half source, half target
    seq_len = torch.full((B,), T, device=device)
    which = torch.arange(B, device=device) % 2  # both directions

    def step():
        with autocast(device):
            h = prefix_hidden(model, prefixes.kv(), idx, src_len, seq_len, which, 1 - which)
            loss = target_loss(model, h, idx, src_len, seq_len)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(step, device, args.repeats, list(model.parameters()))


def bench_peft(folder, idx, P, device, dtype, args):
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device)
    model = get_peft_model(hf, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    model.eval()  # no dropout, like ours
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    mask = torch.ones_like(idx)

    def step():
        with autocast(device):
            loss = model(input_ids=idx, attention_mask=mask, labels=idx).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(step, device, args.repeats, list(hf.parameters()))


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def main():
    ap = parser(__doc__)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64, help="real tokens per sequence (default 64)")
    ap.add_argument("--prefix-len", type=int, default=16)
    args = ap.parse_args()
    device, size, dtype = setup(args)
    B, T, P = args.batch_size, args.seq_len, args.prefix_len
    print(f"{size}, random weights, {dtype}; batch {B} x {T} tokens, prefix length {P}")
    folder = random_checkpoint(size, dtype=dtype)
    idx = torch.randint(0, 50256, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        s_ours, m_ours = bench_ours(folder, idx, P, device, dtype, args)
        if device == "cuda":
            torch.cuda.empty_cache()
        s_peft, m_peft = bench_peft(folder, idx, P, device, dtype, args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    what = "peak CUDA memory beyond weights" if device == "cuda" else "activations saved for backward"
    print(f"\n{'':12} {'tokens/s':>10} {'s/step':>8} {what:>34}")
    print(f"{'ours':12} {B * T / s_ours:>10.0f} {s_ours:>8.3f} {m_ours / 2**20:>30.1f} MiB")
    print(f"{'PEFT':12} {B * T / s_peft:>10.0f} {s_peft:>8.3f} {m_peft / 2**20:>30.1f} MiB")
    print(f"{'ours / PEFT':12} {s_peft / s_ours:>9.2f}x {'':>8} {m_ours / m_peft:>33.2f}x")


if __name__ == "__main__":
    main()
