"""
The one check for the GPU this project is meant for: GPT-2 XL with random weights (no weights need
to be copied to the machine), in bfloat16, one Markdown table printed and written to --out.

    python benchmarks/bench_gpu.py                                  # GPT-2 XL on CUDA: about 8 minutes on an H100
    python benchmarks/bench_gpu.py --size tiny --device cpu         # the same code on a tiny model, in seconds

Rows:
- bf16 against fp32 logits (the same weights), and how often greedy decoding picks the same tokens;
- a training step as train.py takes it (32 sequences at the default --max-batch-tokens, and twice
  that budget): eager, compiled (--compile; the seconds its compilation took), and PEFT's prefix
  tuning on the same batch: tokens/s, MFU, peak memory, ratios; at the default also with
  --grad-checkpoint, and with the attention written out instead of the fused kernel (model.py);
- greedy decoding at batch 1 and 16: through CUDA graphs (mini_gpt2/fast.py), without, and
  transformers' generate, as tokens/s and as a share of what the device's memory bandwidth allows;
- greedy decoding in the steady state: tokens/s from the slope between two lengths (what each
  further token costs, the prompt and the capture left out), through CUDA graphs and without;
- evaluation: sentences/s for the prefixes and for 3-shot prompting, with and without CUDA graphs,
  on the same sentences, and how many translations the two give differently;
- attention: the gradient of a pass with 64 keys and padding rows (the shape of pytorch#196678)
  through each fused kernel, finite or not, with this project's masks and with a query that sees
  nothing; and which kernel PyTorch picks for a training pass;
- the default run end to end: train.py itself, compiled and not, on a generated CSV for
  --e2e-steps steps and a small comparison, its wall time split into loading, compiling, training and
  evaluating, and extrapolated to the default 5,000 steps and 500 pairs each way.

The table is written after each group of rows, so a run cut short keeps what it measured.

MFU counts the matrix products of a step: 4 x (12 n_layer n_embd^2) per token (forward, and
backward into the activations: frozen weights need no gradient of their own), 6 x with
--grad-checkpoint (the forward runs twice), plus 4 x n_embd x vocab per target token for lm_head:
about 6.1 (9.1) GFLOP per token for GPT-2 XL. Peak from the device's name (H100 SXM: 989 TFLOP/s
bf16 dense). Needs transformers, peft, nltk, and GPT-2's tokenizer files (on a machine without
internet, TIKTOKEN_CACHE_DIR pointing at them).
"""

import functools
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from machinery import comparison  # noqa: E402
from methods import prompting  # noqa: E402
import mini_gpt2  # noqa: E402
from benchmarks.bench_model import decoding_speed  # noqa: E402
from benchmarks.bench_prefix import compiled_model, examples, hf_step, our_step, reference  # noqa: E402
from benchmarks.common import graphs as graphs_on  # noqa: E402
from benchmarks.common import (bandwidth, median_times, parser, peak_memory, peak_tflops,  # noqa: E402
                               random_checkpoint, sample_pairs, setup)
from methods import METHODS  # noqa: E402
from mini_gpt2 import fast  # noqa: E402
from mini_gpt2.model import mask_bias  # noqa: E402
from prefix import NAMES, Example, encode_sentence, init_random, max_new_tokens_for, prefix_hidden  # noqa: E402


def step_flops(config, batch, grad_checkpoint, weights_learn=False):
    """
    The matrix-product FLOPs of one training step (attention scores left out: a few percent): a
    frozen model's forward and backward into the activations, and, if its weights learn, into them too.
    """
    tokens = sum(len(s) + len(t) for s, t, _, _ in batch)
    targets = sum(len(t) for _, t, _, _ in batch)
    layers = 12 * config.n_layer * config.n_embd ** 2
    per_token = (6 if grad_checkpoint else 4) + (2 if weights_learn else 0)
    return per_token * layers * tokens + (per_token - 2 * grad_checkpoint) * config.n_embd * config.vocab_size * targets


def precision_rows(folder, device, prompts):
    """bf16 against fp32 on the same (bf16-stored) weights: logits and greedy tokens."""
    m32 = mini_gpt2.from_pretrained(folder, device=device, dtype=torch.float32)
    m16 = mini_gpt2.from_pretrained(folder, device=device, dtype=torch.bfloat16)
    x = torch.tensor(prompts, device=device)
    with torch.no_grad():
        a, b = m32(x), m16(x)
    diff = (a - b).abs()
    g32 = mini_gpt2.generate(m32, prompts, 32, stop_ids=())
    g16 = mini_gpt2.generate(m16, prompts, 32, stop_ids=())
    same = sum(p == q for r, s in zip(g32, g16) for p, q in zip(r, s)) / sum(len(r) for r in g32)
    del m32, m16
    return [("bf16 vs fp32 logits", f"{len(prompts)} x {len(prompts[0])} random tokens",
             f"max rel. error {diff.max().item() / a.abs().max().item():.2e}, "
             f"mean rel. error {diff.mean().item() / a.abs().mean().item():.2e}", "", ""),
            ("bf16 vs fp32 greedy tokens", f"{len(prompts)} x 32 new tokens", f"{same:.1%} the same", "", "")]


def set_fused_attention(model, on):
    for block in model.h:
        block.attn.fused_on_gpu = on


def training_rows(folder, model, device, dtype, seq_len, repeats):
    """A step at the default budget and at twice it: eager, compiled (--compile) and PEFT, timed in turns."""
    rows, default = [], 32 * seq_len  # train.py's default batch of 32 sequences, one pass
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_tflops(device)

    def cells(step, batch, ckpt, seconds, weights_learn=False):
        tokens = len(batch) * seq_len
        flops = step_flops(model.config, batch, ckpt, weights_learn) / seconds
        mfu = f", MFU {flops / (peak * 1e12):.0%}" if peak else ""
        extra = peak_memory(step, device)  # beyond what was allocated before: the weights, PEFT's model
        mem = f", peak {(extra + weights) / 2**30:.1f} GiB with the weights" if extra is not None else ""
        return tokens, f"{tokens / seconds:,.0f} tokens/s ({flops / 1e12:.3g} TFLOP/s{mfu}{mem})"

    for budget in (default, 2 * default):
        batch = examples(budget // seq_len, seq_len)
        idx = torch.tensor([s + t for s, t, _, _ in batch], device=device)
        setting = f"{len(batch)} x {seq_len} tokens, budget {budget}{' (default)' if budget == default else ''}"
        peft, _ = hf_step(folder, idx, device, dtype, reference("prefix", 10)[1])
        compiled_copy, compiled = compiled_model(folder, device, dtype, budget, len(batch))
        steps = {"eager": our_step(model, 10, batch, device, max_batch_tokens=budget),
                 "compiled": our_step(compiled_copy, 10, batch, device, max_batch_tokens=budget, compiled=True),
                 "peft": peft}
        times = median_times(steps, repeats, device)  # the first (untimed) run of "compiled" compiles it
        tokens, cell = cells(steps["eager"], batch, False, times["eager"])
        rows.append(("prefix training", setting, cell, f"PEFT {tokens / times['peft']:,.0f} tokens/s",
                     f"{times['peft'] / times['eager']:.2f}"))
        _, cell = cells(steps["compiled"], batch, False, times["compiled"])
        compile_s = sum(compiled.shapes.values())
        rows.append(("prefix training, --compile", setting, f"{cell}; compiling took {compile_s:.0f} s",
                     f"eager {tokens / times['eager']:,.0f} tokens/s", f"{times['eager'] / times['compiled']:.2f}"))
        if budget == default:
            ckpt = our_step(model, 10, batch, device, max_batch_tokens=budget, grad_checkpoint=True)
            _, cell = cells(ckpt, batch, True, median_times({"ckpt": ckpt}, repeats, device)["ckpt"])
            rows.append(("prefix training, --grad-checkpoint", setting, cell, "", ""))
            # What the fused attention kernel buys on this device: the same step, attention written out.
            written = our_step(model, 10, batch, device, max_batch_tokens=budget)
            set_fused_attention(model, False)
            try:
                t = median_times({"ours": written}, repeats, device)["ours"]
                _, cell = cells(written, batch, False, t)
            finally:
                set_fused_attention(model, True)
            rows.append(("prefix training, attention written out", setting, cell, "", ""))
            rows += other_methods(folder, model, device, dtype, batch, budget, setting, repeats, cells)
        del peft, steps, compiled, compiled_copy
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def other_methods(folder, model, device, dtype, batch, budget, setting, repeats, cells):
    """LoRA against PEFT's LoRA, and full fine-tuning against transformers', at the default budget."""
    rows = []
    idx = torch.tensor([s + t for s, t, _, _ in batch], device=device)
    for method in ("lora", "finetune"):
        own = model if method == "lora" else mini_gpt2.from_pretrained(folder, device=device, dtype=dtype)
        name, adapter = reference(method, 10)
        steps = {"ours": our_step(own, 10, batch, device, max_batch_tokens=budget, method=method)}
        steps["ref"], _ = hf_step(folder, idx, device, dtype, adapter)
        times = median_times(steps, repeats, device)
        tokens, cell = cells(steps["ours"], batch, False, times["ours"], method == "finetune")
        _, ref_cell = cells(steps["ref"], batch, False, times["ref"], method == "finetune")
        rows.append((f"{method} training", setting, cell, f"{name} {ref_cell}", f"{times['ref'] / times['ours']:.2f}"))
        del steps, own
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def decoding_rows(folder, model, device, dtype, new_tokens, repeats):
    """Greedy decoding: through CUDA graphs (the default on a GPU), without, and transformers' generate."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # read once a step, whatever the batch
    bw = bandwidth(device)
    rows, g = [], torch.Generator().manual_seed(0)
    for B in (1, 16):
        speed, _ = decoding_speed(model, hf, B, 16, new_tokens, repeats, device, g, eager_too=True)
        share = (lambda v: f" ({v / (B * bw / weights):.0%} of the memory-bandwidth bound)") if bw else (lambda v: "")
        setting = f"batch {B}, {new_tokens} new tokens after 16"
        rows.append(("greedy decoding", setting, f"{speed['ours']:,.1f} tokens/s{share(speed['ours'])}",
                     f"transformers {speed['hf']:,.1f} tokens/s", f"{speed['ours'] / speed['hf']:.2f}"))
        rows.append(("greedy decoding, no CUDA graph", setting, f"{speed['eager']:,.1f} tokens/s{share(speed['eager'])}",
                     f"graph {speed['ours']:,.1f} tokens/s", f"{speed['eager'] / speed['ours']:.2f}"))
    return rows


def evaluation_rows(model, device, n, repeats):
    """Sentences/s of the comparison's decoding, through CUDA graphs and without, on the same sentences."""
    pairs = sample_pairs(n + 3)
    kv = init_random(model, NAMES, 10, torch.Generator().manual_seed(0))
    texts = [fr for _, fr in pairs[3:]]
    sources = [encode_sentence(t) for t in texts]
    limits = [max_new_tokens_for(s) for s in sources]
    methods = {"prefix": METHODS["prefix"].translator(model, kv), "3-shot": prompting.FewShot(model, pairs[:3])}
    rows, out = [], {}

    def run(name, graphs):
        def fn():
            with graphs_on(graphs):
                out[(name, graphs)] = comparison.translate_all(methods[name], texts, "fr", "en", limits, 16)
        return fn

    fns = {(name, graphs): run(name, graphs) for name in methods for graphs in (True, False)}
    t = median_times(fns, repeats, device)
    for name in methods:
        differ = sum(a != b for a, b in zip(out[(name, True)], out[(name, False)]))
        rows.append(("evaluation", f"{name}, {n} sentences fr->en, batches of 16", f"{n / t[(name, True)]:.1f} sentences/s",
                     f"no CUDA graph {n / t[(name, False)]:.1f} sentences/s; {differ} of {n} translations differ",
                     f"{t[(name, False)] / t[(name, True)]:.2f}"))
    return rows


def steady_decoding_rows(model, device, short, long, repeats):
    """What each further token costs: greedy decoding of `short` and of `long` new tokens, tokens/s from the slope."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # read once a step, whatever the batch
    bw, rows, g = bandwidth(device), [], torch.Generator().manual_seed(2)
    for B in (1, 16):
        prompts = torch.randint(0, mini_gpt2.EOT, (B, 16), generator=g).tolist()
        kept = fast.Graphs()  # both lengths replay the steps captured once (the capture left out, as the prompt is)

        def decode(n, graphs):
            with graphs_on(graphs):
                mini_gpt2.generate(model, prompts, n, stop_ids=(), graphs=kept)

        speed = {}
        for graphs in (True, False):
            t = median_times({n: functools.partial(decode, n, graphs) for n in (short, long)}, repeats, device)
            speed[graphs] = B * (long - short) / max(t[long] - t[short], 1e-9)
        share = f" ({speed[True] / (B * bw / weights):.0%} of the memory-bandwidth bound)" if bw else ""
        rows.append(("greedy decoding, steady state", f"batch {B}, tokens {short + 1} to {long} (the slope)",
                     f"{speed[True]:,.1f} tokens/s{share}", f"no CUDA graph {speed[False]:,.1f} tokens/s",
                     f"{speed[True] / speed[False]:.2f}"))
    return rows


def attention_rows(model, device, dtype):
    """
    The gradient of attention with 64 keys through each kernel PyTorch has (cuDNN, flash, efficient,
    math): with a query that sees nothing (pytorch#196678: NaN from cuDNN's backward), and a prefix
    training pass of 44 tokens after 20 prefix keys with padding rows, as this project masks it.
    Which kernel PyTorch picks for that pass, too.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from train import make_batch, target_loss

    c, rows = model.config, []
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, c.n_head, 64, c.head_dim, generator=g).to(device, dtype) for _ in range(3))
    sees = torch.ones(2, 1, 64, 64, dtype=torch.bool, device=device).tril()
    sees[1, :, 40:] = False  # queries 40 on of row 1 see nothing
    mask = mask_bias(sees, dtype)
    kv = init_random(model, NAMES, 10, torch.Generator().manual_seed(0))
    lengths = [(22, 22), (10, 12), (5, 6), (30, 14)]  # 44 tokens at most: 64 keys with both prefixes; the others padded
    examples = [Example(list(range(1000, 1000 + s)), list(range(2000, 2000 + t - 1)) + [mini_gpt2.EOT], b % 2, 1 - b % 2)
                for b, (s, t) in enumerate(lengths)]
    batch = make_batch(examples, device)

    def sdpa_grad():
        qq = q.clone().requires_grad_()
        torch.nn.functional.scaled_dot_product_attention(qq, k, v, attn_mask=mask).float().sum().backward()
        return qq.grad

    def pass_grad():
        p = kv.clone().requires_grad_()
        target_loss(model, prefix_hidden(model, p, batch), batch).backward()
        return p.grad

    for what, fn in (("SDPA backward, 64 keys, a query that sees nothing", sdpa_grad),
                     ("prefix training pass, 20 + 44 keys, padding rows, this project's masks", pass_grad)):
        cells = []
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    grad = fn()
                cells.append(f"{backend.name.lower()}: {'finite' if bool(torch.isfinite(grad).all()) else 'NaN or inf'}")
            except RuntimeError as e:
                cells.append(f"{backend.name.lower()}: not available ({str(e).splitlines()[0][:40]})")
        rows.append(("attention gradient", what, "; ".join(cells), "", ""))
    if torch.device(device).type == "cuda" and hasattr(torch, "_fused_sdp_choice"):
        x = torch.randn(4, c.n_head, 44, c.head_dim, device=device, dtype=dtype)
        keys = torch.randn(4, c.n_head, 64, c.head_dim, device=device, dtype=dtype, requires_grad=True)  # as in training
        pass_mask = mask_bias(torch.ones(4, 1, 44, 64, dtype=torch.bool, device=device), dtype)
        chosen = SDPBackend(torch._fused_sdp_choice(x, keys, keys, pass_mask)).name.lower()
        rows.append(("attention kernel", f"a training pass's shapes, {str(dtype).removeprefix('torch.')}, with a mask",
                     f"PyTorch picks {chosen}", "", ""))
    return rows


class Timeline:
    """Standard output, each line stamped with the time it was written: what train.py said, and when."""

    def __init__(self):
        self.lines, self.rest = [], ""

    def write(self, text):
        *whole, self.rest = (self.rest + text).split("\n")
        self.lines += [(time.time(), line) for line in whole]
        return len(text)

    def flush(self):
        pass

    def at(self, start):
        """The time of the first line that starts with `start`."""
        return next(t for t, line in self.lines if line.startswith(start))


def end_to_end_rows(folder, device, dtype, steps, eval_size):
    """
    train.py itself, as a user runs it (in this process): on `folder`'s model and a generated CSV of
    sentences about as long as the Kaggle data's, `steps` steps and a comparison on `eval_size` pairs
    each way, compiled and not. Wall time split into loading, compiling, training and evaluating,
    and extrapolated to the default run (5,000 steps, 500 pairs each way).
    """
    import contextlib
    import csv
    import io
    import tempfile

    import train

    rows, work = [], Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    pairs = [(" ".join(en for en, _ in group), " ".join(fr for _, fr in group))  # three sentences a pair
             for group in zip(*[iter(sample_pairs(3 * 600))] * 3)]
    with open(work / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("en", "fr")] + pairs)
    try:
        for compiled in (False, True):
            out, said = work / ("compiled" if compiled else "eager"), Timeline()
            args = ["--model", folder, "--data", work / "pairs.csv", "--out", out, "--steps", steps,
                    "--heldout", eval_size, "--val-size", 16, "--eval-size", eval_size, "--save-every", steps,
                    "--device", device, "--dtype", str(dtype).removeprefix("torch."), "--warmup", 10,
                    "--compile" if compiled else "--no-compile"]
            t0 = time.time()
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(io.StringIO()):
                code = train.main([str(a) for a in args])
            end = time.time()
            if code:
                raise SystemExit(f"train.py ended with {code}: {said.lines[-3:]}")
            compiling = sum(float(line.rsplit(" in ", 1)[1].split()[0]) for _, line in said.lines
                            if line.startswith("compiled the training pass for"))
            loading, trained = said.at("model ") - t0, said.at("prefixes: ")
            training, evaluating = trained - said.at("model ") - compiling, end - trained
            translations = 2 * 3 * eval_size  # both ways, three rows: 0-shot, 3-shot, prefix
            default = loading + compiling + training / steps * 5000 + evaluating / translations * 2 * 3 * 500
            rows.append((f"the default run end to end{', --compile' if compiled else ''}",
                         f"{steps} steps of 32 sequences, {eval_size} pairs each way",
                         f"{end - t0:.0f} s: loading {loading:.0f}, compiling {compiling:.0f}, training {training:.0f} "
                         f"({training / steps * 1000:.0f} ms a step), evaluating {evaluating:.0f}",
                         f"extrapolated to 5,000 steps and 500 pairs each way: {default / 60:.1f} min", ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def model_rows(rows, table, folder, device, dtype, seq_len, new_tokens, eval_sentences, repeats):
    """The rows measured on one model loaded once: training, decoding, evaluation, attention; table() after each group."""
    model = mini_gpt2.from_pretrained(folder, device=device, dtype=dtype).requires_grad_(False)
    for group in (lambda: training_rows(folder, model, device, dtype, seq_len, repeats),
                  lambda: decoding_rows(folder, model, device, dtype, new_tokens, repeats),
                  lambda: steady_decoding_rows(model, device, new_tokens // 4, new_tokens, repeats),
                  lambda: evaluation_rows(model, device, eval_sentences, repeats),
                  lambda: attention_rows(model, device, dtype)):
        table()  # what was measured so far, kept if what follows fails
        rows += group()


def write_table(path, size, dtype, device, repeats, rows):
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU"
    table = [f"GPT-2 {size} with random weights, {str(dtype).removeprefix('torch.')}, on {name} "
             f"(torch {torch.__version__}); medians of {repeats}", "",
             "| measure | setting | ours | reference | ours / reference |", "|---|---|---|---|---:|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(table) + "\n"
    Path(path).write_text(text)
    return text


def main():
    ap = parser(__doc__)
    ap.add_argument("--seq-len", type=int, help="tokens per training sequence (default 96; 24 for --size tiny)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--eval-sentences", type=int, help="default 64 (16 for --size tiny)")
    ap.add_argument("--e2e-steps", type=int, help="steps of the end-to-end rows (default 150; 4 for --size tiny)")
    ap.add_argument("--out", default="bench_gpu.md", help="where the table is written too (default bench_gpu.md)")
    ap.add_argument("--compile-backend", default=fast.BACKEND,
                    help=f"torch.compile's backend for the --compile rows (default {fast.BACKEND}; the tests use aot_eager)")
    args = ap.parse_args()
    fast.BACKEND = args.compile_backend
    t0 = time.time()
    device, size, dtype = setup(args)
    tiny = size == "tiny"
    seq_len = args.seq_len or (24 if tiny else 96)
    on_gpu = torch.device(device).type == "cuda"
    folder = random_checkpoint(size, dtype=torch.bfloat16, device="cuda" if on_gpu else "cpu")
    rows, table = [], lambda: write_table(args.out, size, dtype, device, args.repeats, rows)
    try:
        g = torch.Generator().manual_seed(1)
        rows += precision_rows(folder, device, torch.randint(0, mini_gpt2.EOT, (4, 128), generator=g).tolist())
        model_rows(rows, table, folder, device, dtype, seq_len, args.new_tokens,
                   args.eval_sentences or (16 if tiny else 64), args.repeats)
        if on_gpu:
            torch.cuda.empty_cache()  # the model is let go: the end-to-end runs load their own
        table()
        rows += end_to_end_rows(folder, device, dtype, args.e2e_steps or (4 if tiny else 150), 2 if tiny else 32)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("\n" + table())
    print(f"({time.time() - t0:.0f} s in all; table written to {args.out})")


if __name__ == "__main__":
    main()
