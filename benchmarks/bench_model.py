"""
mini_gpt2 against transformers' GPT-2 on the same random weights: load time and greedy decoding
speed at batch 1 and 16. Prints figures and ratios; asserts nothing.

    python benchmarks/bench_model.py                   # gpt2 shape on CPU (2 threads)
    python benchmarks/bench_model.py --size gpt2-xl    # the default on CUDA
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import mini_gpt2  # noqa: E402
from benchmarks.common import best_time, parser, random_checkpoint, setup  # noqa: E402


def main():
    ap = parser(__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    device, size, dtype = setup(args)
    from transformers import GPT2LMHeadModel

    print(f"{size}, random weights, {dtype}, {args.new_tokens} new tokens after a {args.prompt_len}-token prompt")
    folder = random_checkpoint(size, dtype=dtype)
    try:
        def load_ours():
            return mini_gpt2.from_pretrained(folder, device=device, dtype=dtype)

        def load_hf():
            return GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device).eval()

        t_ours = best_time(load_ours, args.repeats, device)
        t_hf = best_time(load_hf, args.repeats, device)
        print(f"\nload    mini_gpt2 {t_ours:6.2f} s   transformers {t_hf:6.2f} s   speed-up x{t_hf / t_ours:.2f}")
        ours, hf = load_ours(), load_hf()
        x = torch.randint(0, 50256, (4, 128), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            a, b = ours(x).float(), hf(x).logits.float()
        print(f"logits on 4 x 128 random tokens: max |difference| {(a - b).abs().max().item():.3g} "
              f"(largest logit {b.abs().max().item():.3g}), same top token {(a.argmax(-1) == b.argmax(-1)).float().mean().item():.1%}")

        print(f"\n{'batch':>5} {'mini_gpt2 tok/s':>16} {'transformers tok/s':>19} {'ratio':>6} {'same tokens':>12}")
        g = torch.Generator().manual_seed(0)
        for B in args.batch_sizes:
            prompts = torch.randint(0, 50256, (B, args.prompt_len), generator=g)
            out = {}

            def run_ours():
                out["ours"] = mini_gpt2.generate(ours, prompts.tolist(), args.new_tokens, stop_ids=())

            def run_hf():
                with torch.no_grad():
                    x = prompts.to(device)
                    y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
                out["hf"] = y[:, args.prompt_len:].tolist()

            s_ours = best_time(run_ours, args.repeats, device)
            s_hf = best_time(run_hf, args.repeats, device)
            n = B * args.new_tokens
            same = sum(a == b for r, q in zip(out["ours"], out["hf"]) for a, b in zip(r, q)) / n
            print(f"{B:>5} {n / s_ours:>16.1f} {n / s_hf:>19.1f} {s_hf / s_ours:>6.2f} {same:>11.0%}")
        if device == "cuda":
            print(f"\npeak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (both models loaded)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n({time.time() - t0:.0f} s in all)")
