"""
Train the [start_french] / [start_english] prefixes on a frozen GPT-2 (or with --method prompt,
input-embedding prompts; lora, low-rank updates of its attention; finetune, every weight), then
compare them with zero-shot and 3-shot prompting of the same model on held-out pairs.

    python train.py                              # the reference experiment: GPT-2 XL, 200,000 pairs
    python train.py --model gpt2 --data data/sample-en-fr.csv --heldout 60 --val-size 40 --steps 300 --eval-size 50
    python train.py ... --resume                 # the same command again continues an interrupted run
    python train.py --eval-only --learned runs/prefix runs/lora   # only the comparison

Writes to --out the learned file (prefix.safetensors: the prefixes with the lowest validation
loss), a checkpoint to resume from, the log of losses, and the comparison's results; the table in
docs/training.md lists them all.

This file is the training, in reading order: pairs to examples to batches, the loss, the loop,
then the command line. What is done with --out (locking it, checkpoints, resuming, the log, what a
stopped run says) is machinery/run_folder.py's; the methods are prefix.py and methods/.
"""

import argparse
import math
import random
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import methods
import mini_gpt2
from machinery import cli, comparison, data, dist, plots
from machinery.cli import natural_int, positive_float, positive_int
from machinery.learned_file import check_fits
from machinery.run_folder import LossNotFinite, Run
from methods import METHODS
from mini_gpt2 import EOT, UserError, fast
from mini_gpt2.load import config_of
from mini_gpt2.tokenizer import encoding
from prefix import Batch, Sentence, Start, encode_sentence, fits

MAX_LR = 10.0  # AdamW moves each number by about the rate per step: more than this is a typo


# ----------------------------------------------------------------------------- pairs -> examples -> batches

def make_examples(pairs, max_len, method):
    """
    Each (en, fr) pair both ways, as the method lays a translation out (method.example), if its
    sentences fit max_len (prefix.fits). Returns the examples and how many did not fit.
    """
    examples, too_long = [], 0
    with tqdm(pairs, desc="tokenizing", unit=" pairs", leave=False) as bar:  # gone before any stop's line
        for en_text, fr_text in bar:
            en, fr = Sentence(en_text, encode_sentence(en_text)), Sentence(fr_text, encode_sentence(fr_text))
            if fits(en.ids, fr.ids, max_len):  # both ways, or neither: the rule counts both sentences
                examples += [method.example(fr, en, "fr", "en"), method.example(en, fr, "en", "fr")]
            else:
                too_long += 2
    return examples, too_long


def batch_order(examples, batch_size, seed, epoch):
    """
    The steps of one pass over the data, as lists of example indices: shuffled with (seed, epoch),
    then sorted by length inside windows of 64 steps, so a step holds sequences of similar length
    (little padding) while the order of steps stays random.
    """
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    length = lambda i: len(examples[i].source) + len(examples[i].target)  # noqa: E731
    batches = []
    window = 64 * batch_size
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=length)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class Batches:
    """The examples of optimizer step k of the whole run, always the same ones: the data position is just k."""

    def __init__(self, examples, batch_size, seed):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.order = None, None

    def __getitem__(self, k):
        n = math.ceil(len(self.examples) / self.batch_size)
        if self.epoch != k // n:
            self.epoch = k // n
            self.order = batch_order(self.examples, self.batch_size, self.seed, self.epoch)
        return [self.examples[i] for i in self.order[k % n]]


def row_size(ex, extra=0, round_to=1):
    """The positions an example takes in a pass: its tokens, `extra` for learned vectors among them, rounded up to round_to."""
    return -(-(len(ex.source) + len(ex.target) + extra) // round_to) * round_to


def micro_batches(examples, max_tokens, extra=0, round_to=1):
    """
    A step's examples packed into forward passes of at most `max_tokens` padded positions (rows x
    longest row_size), shortest first so that rows of a pass have similar lengths. A longer
    example than the budget still gets a pass of its own.
    """
    rows = sorted(examples, key=lambda ex: row_size(ex, extra, round_to))
    passes, current = [], []
    for ex in rows:
        if current and (len(current) + 1) * row_size(ex, extra, round_to) > max_tokens:
            passes.append(current)
            current = []
        current.append(ex)
    return passes + [current]


class Packing(NamedTuple):
    """How a step's examples become forward passes (micro_batches): the budget and the size of a row."""
    max_tokens: int  # --max-batch-tokens
    extra: int = 0  # positions a row takes beyond its tokens: the prompt method's 2P
    round_to: int = 1  # lengths rounded up to a multiple of this (compiled passes: few shapes)


def make_batch(examples, device):
    """A forward pass's tensors (a prefix.Batch): the examples' tokens right-padded, their lengths and prefixes."""
    T = max(len(ex.source) + len(ex.target) for ex in examples)
    idx = torch.full((len(examples), T), EOT, dtype=torch.long)
    lengths = torch.zeros(len(examples), 4, dtype=torch.long)  # source length, target length, source prefix, target prefix
    for b, ex in enumerate(examples):
        idx[b, :len(ex.source) + len(ex.target)] = torch.tensor(ex.source + ex.target)
        lengths[b] = torch.tensor([len(ex.source), len(ex.target), ex.source_prefix, ex.target_prefix])
    if torch.device(device).type == "cuda":  # pinned: the copies to the GPU run beside it, without waiting
        idx, lengths = idx.pin_memory(), lengths.pin_memory()
    src_len, tgt_len, src_prefix, tgt_prefix = lengths.to(device, non_blocking=True).unbind(1)
    return Batch(idx.to(device, non_blocking=True), src_len, src_len + tgt_len, src_prefix, tgt_prefix,
                 sum(len(ex.target) for ex in examples))


# ----------------------------------------------------------------------------- the loss

def target_loss(model, h, batch):
    """
    The summed cross-entropy of the target tokens (and the final <|endoftext|>), nothing else:
    position t predicts token t + 1 for t from the last source token to the one before the end.
    A sum, not a mean: the training step divides by all of its target tokens, however they were
    split into forward passes, so that every target token weighs the same.
    """
    idx, src_len, seq_len = batch.idx, batch.src_len, batch.seq_len
    t = torch.arange(idx.size(1) - 1, device=idx.device)[None]
    predicts_target = (t >= (src_len - 1)[:, None]) & (t < (seq_len - 1)[:, None])  # (B, T-1)
    b, t = predicts_target.nonzero_static(size=batch.targets).unbind(1)  # where they are (we know how many)
    logits = model.logits(h[b, t])  # only those rows, in float32: (targets, vocab)
    return F.cross_entropy(logits, idx[b, t + 1], reduction="sum")


def summed_loss(model, method, learned, examples, packing, n_targets, backward=False, grad_checkpoint=False):
    """
    target_loss summed over `examples`, in as few forward passes as fit the token budget (a
    Packing); with `backward`, the gradient of that sum / n_targets accumulates too. A tensor:
    reading it would wait for the GPU.
    """
    device = model.wte.weight.device
    total = torch.zeros((), device=device)
    for micro in micro_batches(examples, *packing):
        batch = make_batch(micro, device)
        try:
            loss = target_loss(model, *method.hidden(model, learned, batch, grad_checkpoint))
            if backward:
                (loss / n_targets).backward()
        except torch.OutOfMemoryError:
            rows, length = len(micro), max(row_size(ex, *packing[1:]) for ex in micro)
            raise UserError(f"out of GPU memory in a forward pass of {rows} x {length} = {rows * length} tokens; try "
                            f"--max-batch-tokens {max(1, packing.max_tokens // 2)}, or --grad-checkpoint") from None
        total += loss.detach()
    return total


def mean_loss(model, method, learned, examples, packing, backward=False, grad_checkpoint=False):
    """
    The mean loss over all the target tokens of `examples`: every target token weighs the same,
    however the passes split them. With `backward`, the gradient of that mean accumulates in what
    is learned (an optimizer step's).
    """
    n_targets = sum(len(ex.target) for ex in examples)
    # -- scale enters here (machinery/dist.py): under torchrun each process computes its share of the
    # sequences, and the losses and gradients are summed over all the processes. Alone, this is all of them.
    mine = dist.share(sorted(examples, key=row_size))  # every world-th by length: the shares take alike
    total = dist.together(  # and if one process fails, every process stops, with its message
        lambda: summed_loss(model, method, learned, mine, packing, n_targets, backward, grad_checkpoint))
    if backward:
        dist.sum_gradients(learned)
    return dist.sum_(total) / n_targets


@torch.no_grad()
def validation_loss(model, method, learned, examples, packing):
    """The teacher-forced target loss on pairs never trained on (the validation slice), both directions."""
    return mean_loss(model, method, learned, examples, packing).item()


def lr_at(step, lr, warmup, steps):
    """The learning rate of step `step` (from 0): linear warm-up, then linear decay to zero at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (steps - step) / max(1, steps - warmup))


# ----------------------------------------------------------------------------- the loop

def train_loop(model, method, learned, optimizer, batches, val_examples, run, *, packing, peak_lr, warmup, steps,
               eval_every, save_every, grad_checkpoint):
    """Optimizer steps from where the run is (0, or a checkpoint's step) to `steps`."""
    def validate():  # a lower validation loss than any before also writes the best file
        run.validated(validation_loss(model, method, learned, val_examples, packing), learned)

    if run.needs_validation(eval_every):  # where training starts from, or one a stop cut short
        validate()
    for step in range(run.step, steps):
        lr = lr_at(step, peak_lr, warmup, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        examples = batches[step]
        loss = mean_loss(model, method, learned, examples, packing, backward=True, grad_checkpoint=grad_checkpoint)
        norm = torch.nn.utils.clip_grad_norm_(learned.parameters(), 1.0)
        loss, norm = torch.stack([loss, norm.float()]).tolist()  # the step's one wait for the GPU
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise LossNotFinite(loss, norm, step + 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        validating = done % eval_every == 0 or done == steps
        run.step_done(done, loss, lr, sum(row_size(ex) for ex in examples), validating)
        if validating:
            validate()
        if done % save_every == 0 or done == steps:
            run.checkpoint(learned, optimizer)


def train(args, run):
    """The run of `args` (main's command line) in `run` (its --out): data, model, the loop, then the comparison."""
    method = METHODS[args.method]
    if args.resume:
        run.resume()  # the checkpoint, checked; run.restore puts it into what is learned, below
    config = dist.together(lambda: config_of(args.model))  # a small file: checked before the large ones load
    check_lengths(method, args.max_len, args.prefix_len, config.n_positions)
    if args.warmup > args.steps:
        print(f"note: --warmup {args.warmup} is longer than --steps {args.steps}: the learning rate rises to "
              f"{lr_at(args.steps - 1, args.lr, args.warmup, args.steps):.3g} at the last step and never reaches the "
              f"peak {args.lr:g}")
    pairs, split, shots, record = dist.in_turn(lambda: data.load(args.data, args.rows, args.heldout, args.val_size,
                                                                 args.seed, args.shots))  # process 0 may download it
    if args.resume:
        run.check_data(record)
    examples, val_examples = training_examples(pairs, split, record["data"], method, args.max_len)
    taken = method.POSITIONS_PER_VIRTUAL_TOKEN * args.prefix_len  # the positions of a row's learned tokens
    if not args.no_eval:  # the comparison's pairs, checked now: before the model loads and the training starts
        held_out, shot_pairs = comparison.held_out_and_examples(pairs, split, shots, args.max_len, args.eval_size,
                                                                config.n_positions, args.shots)
        if taken:
            comparison.check_prompt_room(held_out, config.n_positions, taken, f"--prefix-len {args.prefix_len}",
                                         "lower --prefix-len or --max-len, or add --no-eval")

    model = load_model(args.model, args.device, args.dtype)
    model.requires_grad_(False)  # GPT-2 stays frozen (but with --method finetune): only what is learned learns
    learned = method.start(model, Start(args.prefix_len, args.init, args.reparam, args.seed))
    optimizer = torch.optim.AdamW(learned.parameters(), lr=args.lr, weight_decay=0.0)
    if args.resume:
        run.restore(learned, optimizer)
    n_learned = sum(p.numel() for p in learned.parameters())
    print(f"model {args.model} on {args.device} in {args.dtype}{', frozen' if method.FROZEN else ''}; training "
          f"{n_learned:,} parameters: {method.WHAT.format(P=args.prefix_len)}"
          f"{', through the MLP' if args.reparam else ''}, peak learning rate {args.lr:g}")
    packing = Packing(args.max_batch_tokens, taken)
    # -- speed enters here (mini_gpt2/fast.py): with --compile, the blocks of the training passes run through
    # torch.compile, the passes padded to few shapes: lengths a multiple of fast.ROUND, rows up to the budget.
    rows = math.ceil(args.batch_size / dist.world)  # a step's sequences in one process: the most a pass can hold
    if args.compile and fast.compile_training(model, args.max_batch_tokens, rows, tqdm.write):
        packing = packing._replace(round_to=fast.ROUND)

    meta = {"model": args.model, "steps": args.steps, "lr": args.lr, "batch": args.batch_size, "reparam": args.reparam,
            "init": args.init, "data": str(Path(args.data).resolve()) if args.data else "kaggle", "rows": args.rows,
            "heldout": args.heldout, "val_size": args.val_size, "seed": args.seed, "data_sha256": record["data_sha256"],
            "heldout_pairs": len(split.held), "val_pairs": len(split.val), "trainable_params": n_learned}
    try:
        run.start(record, lambda path, learned, **more: method.save(path, learned, model.config, **meta, **more),
                  method.FILES, method.LEARNED)
        train_loop(model, method, learned, optimizer, Batches(examples, args.batch_size, args.seed), val_examples, run,
                   packing=packing, peak_lr=args.lr, warmup=args.warmup, steps=args.steps, eval_every=args.eval_every,
                   save_every=args.save_every, grad_checkpoint=args.grad_checkpoint)
        run.finish(learned, math.log(model.config.vocab_size))  # the loss of guessing: every token alike
    except BaseException as e:  # Ctrl-C, a signal, a crash, out of memory, a loss that is not finite
        return run.stopped(e, learned, optimizer)
    title = (f"{args.method} ({method.WHAT.format(P=args.prefix_len)}), {args.model}, {Path(record['data']).name}: "
             f"{len(examples):,} examples, {args.steps} steps of {args.batch_size}")
    try:  # the training is whole: a stop from here on says so
        if dist.is_main() and plots.loss_png(run.log_path, run.out / "loss.png", title):
            print(f"loss curves: {run.out / 'loss.png'}")
        if args.no_eval:
            return 0
        if not method.FROZEN:  # the comparison's 0-shot and 3-shot rows are of the model as released
            del learned, optimizer
            model = load_model(args.model, args.device, args.dtype)
        comparison.run(model, comparison.read_files([run.out / method.FILES[0]]), shot_pairs, held_out, run.out,
                       args.eval_batch_size, comparison.settings_of(args.model, args.seed, args.rows, args.heldout,
                                                                    args.max_len, record))
    except KeyboardInterrupt as e:
        return run.stopped_in_comparison(e)
    return 0


def training_examples(pairs, split, source, method, max_len):
    """The training and validation examples of the pairs `split` gives them (from `source`, named in messages)."""
    if not split.train:
        raise UserError(f"{source}: no pair is left to train on: each of its {len(pairs)} is held out, for "
                        "validation, or a (near-)duplicate of a held-out or validation pair; give more (and different) "
                        "pairs, or lower --heldout and --val-size")
    examples, too_long = make_examples([pairs[i] for i in split.train], max_len, method)
    val_examples, _ = make_examples([pairs[i] for i in split.val], max_len, method)
    if not examples or not val_examples:
        raise UserError(f"every {'training' if not examples else 'validation'} pair is longer than --max-len "
                        f"{max_len} tokens")
    print(f"training examples: {len(examples)} (both directions; {too_long} longer than {max_len} tokens skipped); "
          f"validation examples: {len(val_examples)}")
    return examples, val_examples


def load_model(name, device, dtype):
    """GPT-2 (`name`: a hub name or a folder), on this process's device: process 0 first, which may download it."""
    return dist.in_turn(lambda: mini_gpt2.from_pretrained(name, device=device, dtype=cli.DTYPES[dtype]))


def compare(args, out):
    """
    --eval-only: the comparison alone, on the learned files given (default: --out's own), with the
    model and the split they were made with unless told otherwise.
    """
    paths = [methods.best_file_in(p) for p in args.learned or [out]]
    for path in paths:
        if not path.exists():
            raise UserError(f"no file of what train.py learned at {path}: train first, or point --learned at one")
    comparison.check_results(out, paths)  # never another comparison's results replaced
    files = dist.together(lambda: comparison.read_files(paths))
    meta = files[0][2]
    args.model = args.model or meta.get("model", cli.DEFAULT_MODEL)
    vars(args).update(data.split_settings(vars(args), meta))  # the first file's split, unless told otherwise
    config = dist.together(lambda: config_of(args.model))  # a small file: every learned file is checked against it
    for path, _, file_meta in files:
        check_fits(file_meta, config, path)
    cli.note_if_slow(args.model, args.device)
    pairs, split, shots, record = dist.in_turn(lambda: data.load(args.data, args.rows, args.heldout, args.val_size,
                                                                 args.seed, args.shots))  # process 0 may download it
    for _, _, file_meta in files:
        comparison.check_split(file_meta, args.rows, args.heldout, args.seed, record)
    held_out, shot_pairs = comparison.held_out_and_examples(pairs, split, shots, args.max_len, args.eval_size,
                                                            config.n_positions, args.shots)
    for path, _, file_meta in files:
        taken = METHODS[file_meta["method"]].POSITIONS_PER_VIRTUAL_TOKEN * int(file_meta.get("prefix_len", 0))
        if taken:
            comparison.check_prompt_room(held_out, config.n_positions, taken, path,
                                         "lower --max-len or --eval-size, or leave this file out")
    model = load_model(args.model, args.device, args.dtype)
    comparison.run(model, files, shot_pairs, held_out, out, args.eval_batch_size,
                   comparison.settings_of(args.model, args.seed, args.rows, args.heldout, args.max_len, record))
    return 0


# ----------------------------------------------------------------------------- the command line

def parse_args(argv=None):
    ap = cli.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=f"gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a checkpoint folder "
                    f"(default {cli.DEFAULT_MODEL}; with --eval-only, the learned file's own)")
    ap.add_argument("--data", help="CSV with columns en,fr (default: the first --rows of the Kaggle dataset, downloaded)")
    split = data.SPLIT_DEFAULTS
    ap.add_argument("--rows", type=positive_int, help=f"read only the first N pairs (default {split['rows']})")
    ap.add_argument("--heldout", type=natural_int,
                    help=f"pairs held out for evaluation (at most a tenth; default {split['heldout']})")
    ap.add_argument("--val-size", type=positive_int, help="pairs set aside from training to compute the validation "
                    f"loss on (at most a tenth; default {split['val_size']})")
    ap.add_argument("--out", help="output folder (default runs/<method>)")
    ap.add_argument("--steps", type=positive_int, default=5000, help="optimizer steps (default %(default)s)")
    ap.add_argument("--batch-size", type=positive_int, default=32, help="sequences per optimizer step (default %(default)s)")
    ap.add_argument("--max-batch-tokens", type=positive_int, default=3072,
                    help="padded tokens per forward pass: a step's sequences are packed into as few passes as fit "
                    "(default %(default)s; docs/gpu.md gives the GPU memory it needs)")
    ap.add_argument("--lr", type=positive_float, help="peak learning rate (default: the method's, "
                    + ", ".join(f"{m} {M.LR:g}" for m, M in METHODS.items())
                    + f"; {METHODS['prefix'].REPARAM_LR:g} with --reparam)")
    ap.add_argument("--warmup", type=natural_int, default=100,
                    help="linear warm-up steps, then linear decay to 0 (default %(default)s)")
    ap.add_argument("--method", choices=list(METHODS), default="prefix",
                    help="prefix: learned keys/values in every layer (Li & Liang; default); prompt: learned input "
                    "embeddings, which take positions like tokens (the reference experiment's method); lora: low-rank "
                    "updates of the attention's query and value weights (Hu et al.); finetune: every weight")
    ap.add_argument("--prefix-len", type=positive_int, default=10, help="virtual tokens per prefix (default %(default)s)")
    ap.add_argument("--max-len", type=positive_int, default=128, help="skip pairs longer than this many tokens (default %(default)s)")
    ap.add_argument("--reparam", action="store_true", help="train through the paper's MLP reparameterisation")
    ap.add_argument("--init", choices=["words", "random"], default="words",
                    help="start from what the model makes of the words 'French:'/'English:' (their keys/values, or "
                    "with --method prompt their embeddings; default) or random")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute activations during backward: less memory, more time")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="run the training passes through torch.compile: minutes of compiling first, then faster steps "
                    "on a GPU; for long runs (default off; see docs/gpu.md)")
    ap.add_argument("--save-every", type=positive_int, default=250, help="checkpoint every N steps (default %(default)s)")
    ap.add_argument("--eval-every", type=positive_int,
                    help="validation loss every N steps, and at the end (default: with each checkpoint)")
    cli.add_device_args(ap)
    ap.add_argument("--seed", type=cli.seed, help=f"seeds the split, the data order and random init (default {split['seed']}; "
                    "with --eval-only, the learned file's own, as --data, --rows, --heldout and --val-size are)")
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --out (--lr, --steps, --warmup, "
                    "--save-every, --eval-every, --device, --dtype, --max-batch-tokens, --grad-checkpoint, --compile may "
                    "change; the rest must be as before)")
    ap.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one, replacing it")
    ap.add_argument("--no-eval", action="store_true", help="stop after training, without the comparison")
    comparison.add_args(ap)
    args = ap.parse_args(argv)
    args.device, args.dtype = cli.settle_device(ap, args.device, args.dtype)
    if args.resume and args.overwrite:
        ap.error("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.eval_only and (args.resume or args.overwrite):
        ap.error("--eval-only trains nothing, so --resume and --overwrite do not apply")
    if args.learned and not args.eval_only:
        ap.error("--learned names the files --eval-only evaluates; a training run evaluates its own")
    if args.heldout == 0 and not args.no_eval:
        ap.error("--heldout 0 leaves nothing to evaluate: hold some pairs out, or add --no-eval")
    if args.reparam and args.method != "prefix":
        ap.error(f"--reparam trains --method prefix through an MLP; it does not apply to --method {args.method}")
    if args.lr is not None and args.lr > MAX_LR:
        ap.error(f"--lr {args.lr:g}: AdamW moves every number by about the rate per step, so rates above {MAX_LR:g} "
                 f"only diverge (the defaults are {max(M.LR for M in METHODS.values()):g} and below)")
    method = METHODS[args.method]
    args.lr = args.lr or (method.REPARAM_LR if args.reparam else method.LR)
    args.eval_every = args.eval_every or args.save_every
    args.out = args.out or f"runs/{args.method}"
    if not args.eval_only:  # --eval-only fills them from the learned file first
        vars(args).update(data.split_settings(vars(args), {}))
        args.model = args.model or cli.DEFAULT_MODEL
    return args


def check_lengths(method, max_len, prefix_len, n_positions):
    """--max-len and --prefix-len against the model's positions (its config.json alone), before anything large loads."""
    if max_len > n_positions:
        raise UserError(f"--max-len {max_len}: a sequence length of at most {n_positions} fits this model")
    taken = method.POSITIONS_PER_VIRTUAL_TOKEN * prefix_len + method.PROMPT_POSITIONS
    if method.LEARNS_TOKENS and (prefix_len > n_positions or taken + max_len > n_positions):
        with_prompts = f" (the two prompts take {taken} positions, plus --max-len {max_len})" if taken else ""
        raise UserError(f"--prefix-len {prefix_len}: too long a prefix length for this model's {n_positions} "
                        f"positions{with_prompts}")
    if not method.LEARNS_TOKENS and taken + max_len > n_positions:
        raise UserError(f"--max-len {max_len}: with the zero-shot prompt's {taken} positions around the source, "
                        f"at most {n_positions - taken} fits this model")


def main(argv=None):
    args = parse_args(argv)
    encoding()  # GPT-2's tokenizer, before any data: without its files, one line says where they go
    cli.try_optional_packages()
    args.device = dist.setup(args.device)  # under torchrun: join the others, on a GPU of this process's own
    with Run(args.out, vars(args)) as run:  # claims --out before anything large loads
        if args.eval_only:
            return compare(args, run.out)
        cli.note_if_slow(args.model, args.device)
        return train(args, run)


if __name__ == "__main__":
    cli.run(main)
