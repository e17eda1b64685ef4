"""
mini_gpt2 against transformers' GPT-2 on the same random weights: load time, greedy decoding speed
at batch 1 and 16 (and fast.py's static-shape decoding against generate.py's plain loop),
and the 3-shot evaluation with plain prompts against the examples' cache. Prints figures and ratios;
asserts nothing.

    python benchmarks/bench_model.py                       # gpt2 shape on CPU (2 threads), float32
    python benchmarks/bench_model.py --dtype bfloat16      # the same in bfloat16
    python benchmarks/bench_model.py --size gpt2-xl        # the default on CUDA

The 3-shot evaluation is timed two ways on the same sentences: `plain`, every sentence's whole
prompt (the three examples included) run through the model, batches in the data's order; and
comparison.py's way, the examples' keys/values computed once per direction and reused, batches of
similar lengths. Both must give the same translations.
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from machinery import comparison  # noqa: E402
from methods import prompting  # noqa: E402
import mini_gpt2  # noqa: E402
from mini_gpt2 import fast  # noqa: E402
from mini_gpt2.generate import prefill  # noqa: E402
from benchmarks.common import best_time, graphs, median_times, parser, random_checkpoint, sample_pairs, setup  # noqa: E402
from prefix import encode_sentence, max_new_tokens_for  # noqa: E402


def decoding_speed(ours, hf, B, prompt_len, new_tokens, repeats, device, generator, eager_too=False):
    """
    Greedy decoding of B random prompts, mini_gpt2 against transformers' generate on the same
    weights: ({"ours": tokens/s, "hf": tokens/s, and with eager_too "eager": ours without CUDA
    graphs}, the fraction of our tokens that are transformers'). All timed in turns.
    """
    prompts = torch.randint(0, mini_gpt2.EOT, (B, prompt_len), generator=generator)
    out = {}

    def run_ours():
        out["ours"] = mini_gpt2.generate(ours, prompts.tolist(), new_tokens, stop_ids=())

    def run_eager():
        with graphs(False):
            out["eager"] = mini_gpt2.generate(ours, prompts.tolist(), new_tokens, stop_ids=())

    def run_hf():
        with torch.no_grad():
            x = prompts.to(device)
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
        out["hf"] = y[:, prompt_len:].tolist()

    fns = {"ours": run_ours, "hf": run_hf} | ({"eager": run_eager} if eager_too else {})
    times = median_times(fns, repeats, device)
    n = B * new_tokens
    same = sum(a == b for r, q in zip(out["ours"], out["hf"]) for a, b in zip(r, q)) / n
    return {name: n / t for name, t in times.items()}, same


def static_generate(model, prompts, new_tokens):
    """generate with fast.decode's static shapes (what a GPU runs as CUDA graphs; on the CPU, step by step)."""
    h, cache, keys_valid, next_pos = prefill(model, prompts, room=new_tokens)
    return fast.decode(model, h[:, -1], cache, keys_valid, next_pos, [new_tokens] * len(prompts), ())


def plain_few_shot(model, few, texts, source, target, limits, batch_size):
    """3-shot translation with each sentence's whole prompt, batches in the data's order."""
    out = []
    for b in range(0, len(texts), batch_size):
        prompts = [mini_gpt2.encode(prompting.few_shot_prompt(few.examples, t, source, target)) for t in texts[b:b + batch_size]]
        out += [mini_gpt2.decode(o).strip() for o in mini_gpt2.generate(model, prompts, limits[b:b + batch_size],
                                                                         stop_ids=few.stop)]
    return out


def few_shot_speed(model, n, batch_size, repeats, device):
    """Sentences per second of 3-shot French->English, plain and as comparison.py runs it, and whether they agree."""
    pairs = sample_pairs(n + 3)
    few = prompting.FewShot(model, pairs[:3])
    texts = [fr for _, fr in pairs[3:]]
    sources = [encode_sentence(t) for t in texts]
    limits = [max_new_tokens_for(s) for s in sources]
    out = {}

    def plain():
        out["plain"] = plain_few_shot(model, few, texts, "fr", "en", limits, batch_size)

    def shared():
        few.heads.clear()  # the examples' keys/values are computed anew on every run
        out["shared"] = comparison.translate_all(few, texts, "fr", "en", limits, batch_size)

    times = median_times({"plain": plain, "shared": shared}, repeats, device)
    return n / times["plain"], n / times["shared"], out["plain"] == out["shared"]


def main():
    ap = parser(__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--eval-sentences", type=int, default=48, help="sentences in the 3-shot timing (default 48)")
    args = ap.parse_args()
    device, size, dtype = setup(args)
    from transformers import GPT2LMHeadModel

    print(f"{size}, random weights, {dtype}, {args.new_tokens} new tokens after a {args.prompt_len}-token prompt")
    folder = random_checkpoint(size, dtype=dtype, device="cuda" if torch.device(device).type == "cuda" else "cpu")
    try:
        def load_ours():
            return mini_gpt2.from_pretrained(folder, device=device, dtype=dtype)

        def load_hf():
            return GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device).eval()

        t_ours = best_time(load_ours, args.repeats, device)
        t_hf = best_time(load_hf, args.repeats, device)
        print(f"\nload    mini_gpt2 {t_ours:6.2f} s   transformers {t_hf:6.2f} s   speed-up x{t_hf / t_ours:.2f}")
        ours, hf = load_ours(), load_hf()
        x = torch.randint(0, mini_gpt2.EOT, (4, 128), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            a, b = ours(x).float(), hf(x).logits.float()
        print(f"logits on 4 x 128 random tokens: max |difference| {(a - b).abs().max().item():.3g} "
              f"(largest logit {b.abs().max().item():.3g}), same top token {(a.argmax(-1) == b.argmax(-1)).float().mean().item():.1%}")

        print("\n| batch | mini_gpt2 tokens/s | transformers tokens/s | ratio | same tokens |")
        print("|---:|---:|---:|---:|---:|")
        g = torch.Generator().manual_seed(0)
        for B in args.batch_sizes:
            speed, same = decoding_speed(ours, hf, B, args.prompt_len, args.new_tokens, args.repeats, device, g)
            print(f"| {B} | {speed['ours']:.1f} | {speed['hf']:.1f} | {speed['ours'] / speed['hf']:.2f} | {same:.0%} |",
                  flush=True)

        for B in args.batch_sizes:  # the static shapes (fast.decode) against generate.py's plain loop, on the same prompts
            prompts = torch.randint(0, mini_gpt2.EOT, (B, args.prompt_len), generator=g).tolist()
            with graphs(False):  # the plain loop, on a GPU too
                t = median_times({"static": lambda: static_generate(ours, prompts, args.new_tokens),
                                  "plain": lambda: mini_gpt2.generate(ours, prompts, args.new_tokens, stop_ids=())},
                                 args.repeats, device)
            print(f"batch {B}: static-shape decoding {B * args.new_tokens / t['static']:.1f} tokens/s, generate.py's plain "
                  f"loop {B * args.new_tokens / t['plain']:.1f}, x{t['plain'] / t['static']:.2f}")

        plain, shared, same = few_shot_speed(ours, args.eval_sentences, 16, args.repeats, device)
        print(f"\n3-shot evaluation, {args.eval_sentences} sentences fr->en, batches of 16: plain prompts "
              f"{plain:.2f} sentences/s, shared examples' cache + length order {shared:.2f} sentences/s, "
              f"x{shared / plain:.2f}; same translations: {'yes' if same else 'NO'}")
        if torch.device(device).type == "cuda":
            print(f"\npeak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n({time.time() - t0:.0f} s in all)")
