"""
A training step of each method, ours against its reference on transformers' GPT-2 with the same
random weights, batch, sequence length and prefix length, in one process: prefixes and prompts
against PEFT's PrefixTuningConfig, LoRA against PEFT's LoraConfig (r = 4, alpha = 32), full
fine-tuning against a plain fine-tuning step of transformers. Prints real (non-pad) tokens per
second and memory, with ratios; asserts nothing.

    python benchmarks/bench_prefix.py                     # gpt2 shape on CPU, fp32, 2 threads: batch 8 x 64, P = 16
    python benchmarks/bench_prefix.py --batch-sizes 8 32 --seq-lens 32 64 128 256 --prefix-lens 10 64   # a grid
    python benchmarks/bench_prefix.py --methods prefix prompt lora finetune   # all of our methods
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
from methods import lora  # noqa: E402
from methods import METHODS  # noqa: E402
from prefix import Example, Start  # noqa: E402


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
    return [Example(row[:T // 2], row[T // 2:-1] + [EOT], b % 2, 1 - b % 2) for b, row in enumerate(ids)]


def compiled_model(folder, device, dtype, max_batch_tokens, rows):
    """A model of its own whose training passes run compiled, as train.py --compile makes them. -> (model, its CompiledBlocks)"""
    model = mini_gpt2.from_pretrained(folder, device=device, dtype=dtype).requires_grad_(False)
    return model, fast.compile_training(model, max_batch_tokens, rows)


def our_step(model, P, batch, device, max_batch_tokens=10**9, grad_checkpoint=False, method="prefix", compiled=False):
    """One optimizer step as train.py takes it, with any method (compiled: on a compiled_model, packed as --compile packs)."""
    M = METHODS[method]
    learned = M.start(model, Start(P, "random", False, 0))
    packing = train.Packing(max_batch_tokens, M.POSITIONS_PER_VIRTUAL_TOKEN * P, fast.ROUND if compiled else 1)
    opt = torch.optim.AdamW(learned.parameters(), lr=1e-3)

    def step():
        train.mean_loss(model, M, learned, batch, packing, backward=True, grad_checkpoint=grad_checkpoint)
        torch.nn.utils.clip_grad_norm_(learned.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step(folder, idx, device, dtype, adapter=None):
    """
    One optimizer step of transformers' GPT-2, loss on every token (its standard causal-LM setup):
    through PEFT's `adapter` if given (only its numbers learn), else every weight (full fine-tuning).
    Returns (step, the base model's weights).
    """
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device)
    model = hf
    if adapter is not None:
        from peft import get_peft_model

        model = get_peft_model(hf, adapter)
    model.eval()  # no dropout, like ours
    learned = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(learned, lr=1e-3)
    mask = torch.ones_like(idx)

    def step():
        model(input_ids=idx, attention_mask=mask, labels=idx).loss.backward()
        torch.nn.utils.clip_grad_norm_(learned, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, list(hf.parameters())


def reference(method, P):
    """What each of our methods is set against: PEFT's prefix tuning, PEFT's LoRA with LoRA's recipe, or plain fine-tuning."""
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    if method in ("prefix", "prompt"):
        return "PEFT prefix", PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P)
    if method == "lora":  # PEFT's GPT-2 target is the fused c_attn: q, k and v, where ours changes q and v
        return "PEFT LoRA", LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.RANK, lora_alpha=lora.ALPHA, lora_dropout=0.0,
                                       target_modules=["c_attn"], fan_in_fan_out=True)
    return "transformers fine-tuning", None


def compare(folder, model, B, T, P, device, dtype, repeats, methods, compiled=False):
    """
    {name: (seconds, bytes)} for ours (each method, and compiled if asked: "<method> compiled") and
    each method's reference (reference()) in one cell, all timed in turns.
    """
    batch = examples(B, T)
    idx = torch.tensor([s + t for s, t, _, _ in batch], device=device)
    models = {m: model if METHODS[m].FROZEN else mini_gpt2.from_pretrained(folder, device=device, dtype=dtype)
              for m in methods}  # fine-tuning changes its model: one of its own
    steps = {m: our_step(models[m], P, batch, device, method=m) for m in methods}
    weights = {name: list(models[name].parameters()) for name in steps}
    if compiled:  # as train.py --compile, each on a model of its own: the first, untimed run of each compiles it
        for m in methods:
            models[f"{m} compiled"], _ = compiled_model(folder, device, dtype, 10**9, B)
            steps[f"{m} compiled"] = our_step(models[f"{m} compiled"], P, batch, device, method=m, compiled=True)
            weights[f"{m} compiled"] = list(models[f"{m} compiled"].parameters())
    for m in methods:
        name, adapter = reference(m, P)
        if name not in steps:
            steps[name], weights[name] = hf_step(folder, idx, device, dtype, adapter)
    times = median_times(steps, repeats, device)
    return {name: (times[name], memory(step, device, weights[name])) for name, step in steps.items()}


def main():
    ap = parser(__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[64], help="real tokens per sequence (default 64)")
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=[16])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["prefix"],
                    help="ours: prefix (default), prompt, lora, finetune; each against its reference")
    ap.add_argument("--compile", action="store_true", help="also each method's step compiled, as train.py --compile")
    args = ap.parse_args()
    device, size, dtype = setup(args)
    print(f"{size}, random weights, {dtype}, median of {args.repeats} (all timed in turns)")
    folder = random_checkpoint(size, dtype=dtype, device="cuda" if torch.device(device).type == "cuda" else "cpu")
    what = "peak memory beyond weights" if torch.device(device).type == "cuda" else "activations saved for backward"
    print("\n| batch | T | P | method | tokens/s | reference | its tokens/s | ours / reference | MiB | its MiB | "
          "memory ours / reference |")
    print("|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|")
    try:
        model = mini_gpt2.from_pretrained(folder, device=device, dtype=dtype).requires_grad_(False)
        for B in args.batch_sizes:
            for T in args.seq_lens:
                for P in args.prefix_lens:
                    r = compare(folder, model, B, T, P, device, dtype, args.repeats, args.methods, args.compile)
                    for name in [n for n in r if n.split()[0] in METHODS]:
                        ref = reference(name.split()[0], P)[0]
                        (s_ours, m_ours), (s_ref, m_ref) = r[name], r[ref]
                        print(f"| {B} | {T} | {P} | {name} | {B * T / s_ours:.0f} | {ref} | {B * T / s_ref:.0f} | "
                              f"{s_ref / s_ours:.2f} | {m_ours / 2**20:.1f} | {m_ref / 2**20:.1f} | "
                              f"{m_ours / m_ref:.2f} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nmemory: {what}")


if __name__ == "__main__":
    main()
