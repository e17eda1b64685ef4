"""
Train the [start_french] / [start_english] prefixes (or, with --method prompt, input-embedding
prompts) on a frozen GPT-2, then compare them with zero-shot and 3-shot prompting of the same
model on held-out pairs (evaluate.py).

    python train.py                              # the reference experiment: GPT-2 XL, 200,000 pairs
    python train.py --model gpt2 --data pairs.csv --steps 200    # small, runs on a CPU
    python train.py ... --resume                 # the same command again continues an interrupted run
    python train.py --eval-only --prefix runs/prefix/prefix.safetensors   # only the comparison

Writes to --out: prefix.safetensors (the prefixes with the lowest validation loss),
prefix-last.safetensors (the last ones, if not the best), checkpoint.pt (to resume), log.csv (the
loss per step, the validation loss every --eval-every steps), split.json (which pairs did what),
loss.png, and the comparison: results.json, results.md, bleu.png.
"""

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import data
import evaluate
import mini_gpt2
import plots
from cli import natural_int, positive_float, positive_int
from mini_gpt2 import EOT, UserError
from mini_gpt2.files import atomic_write, os_problem, write_bytes
from mini_gpt2.load import config_of
from prefix import METHODS, NAMES, Prefixes, check_fits, encode_sentence, make_batch, save_prefixes, target_loss

# --resume continues a run only with the settings that fix its data order and its shapes...
SAME_RUN = ("model", "data", "rows", "heldout", "val_size", "seed", "batch_size", "method", "prefix_len", "max_len",
            "reparam", "init")
# ...while these may change on the way (a lower --lr after a diverged loss, say), with a note.
MAY_CHANGE = ("steps", "lr", "warmup", "save_every", "eval_every", "grad_checkpoint", "device", "dtype",
              "max_batch_tokens")
# What a run writes to --out; a new run refuses to replace them without --overwrite.
RUN_FILES = ("checkpoint.pt", "log.csv", "prefix.safetensors", "prefix-last.safetensors", "split.json", "loss.png",
             "results.json", "results.md", "bleu.png")
# The default peak learning rate of each parameterisation (why: README, "Learning rates").
DEFAULT_LR = {"direct": 1e-2, "reparam": 5e-5, "prompt": 3e-2}
MAX_LR = 10.0  # AdamW moves each number by about the rate per step: more than this is a typo
# What fixes the split (data.split); --eval-only takes them from the prefix file unless given.
SPLIT_DEFAULTS = {"rows": data.DEFAULT_ROWS, "heldout": 1000, "val_size": 200, "seed": 0}


def parse_args(argv=None):
    ap = cli.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a checkpoint folder "
                    "(default gpt2-xl; with --eval-only, the prefix's own)")
    ap.add_argument("--data", help="CSV with columns en,fr (default: the first --rows of the Kaggle dataset, downloaded)")
    ap.add_argument("--rows", type=positive_int, help="read only the first N pairs (default 200000)")
    ap.add_argument("--heldout", type=natural_int, help="pairs held out for evaluation (at most a tenth; default 1000)")
    ap.add_argument("--val-size", type=positive_int,
                    help="pairs set aside from training to compute the validation loss on (at most a tenth; default 200)")
    ap.add_argument("--out", default="runs/prefix", help="output folder (default runs/prefix)")
    ap.add_argument("--steps", type=positive_int, default=5000, help="optimizer steps (default 5000)")
    ap.add_argument("--batch-size", type=positive_int, default=32, help="sequences per optimizer step (default 32)")
    ap.add_argument("--max-batch-tokens", type=positive_int, default=3072,
                    help="padded tokens per forward pass: a step's sequences are packed into as few passes as fit "
                    "(default 3072: GPT-2 XL in bfloat16 then needs about 11 GiB of GPU memory; see README)")
    ap.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {DEFAULT_LR['direct']:g}; "
                    f"{DEFAULT_LR['reparam']:g} with --reparam; {DEFAULT_LR['prompt']:g} with --method prompt)")
    ap.add_argument("--warmup", type=natural_int, default=100,
                    help="linear warm-up steps, then linear decay to 0 (default 100)")
    ap.add_argument("--method", choices=list(METHODS), default="prefix",
                    help="prefix: learned keys/values in every layer (Li & Liang; default); prompt: learned input "
                    "embeddings, which take positions like tokens (the reference experiment's method)")
    ap.add_argument("--prefix-len", type=positive_int, default=10, help="virtual tokens per prefix (default 10)")
    ap.add_argument("--max-len", type=positive_int, default=128, help="skip pairs longer than this many tokens (default 128)")
    ap.add_argument("--reparam", action="store_true", help="train through the paper's MLP reparameterisation")
    ap.add_argument("--init", choices=["words", "random"], default="words",
                    help="start from what the model makes of the words 'French:'/'English:' (their keys/values, or "
                    "with --method prompt their embeddings; default) or random")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute activations during backward: less memory, more time")
    ap.add_argument("--save-every", type=positive_int, default=250, help="checkpoint every N steps (default 250)")
    ap.add_argument("--eval-every", type=positive_int,
                    help="validation loss every N steps, and at the end (default: with each checkpoint)")
    cli.add_device_args(ap)
    ap.add_argument("--seed", type=cli.seed, help="seeds the split, the data order and random init (default 0; "
                    "with --eval-only, the prefix's own, as --data, --rows, --heldout and --val-size are)")
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --out (--lr, --steps, --warmup, "
                    "--save-every, --eval-every, --device, --dtype, --max-batch-tokens, --grad-checkpoint may change; "
                    "the rest must be as before)")
    ap.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one, replacing it")
    ap.add_argument("--no-eval", action="store_true", help="stop after training, without the comparison")
    evaluate.add_args(ap)
    args = ap.parse_args(argv)
    cli.settle_device(ap, args)
    if args.resume and args.overwrite:
        ap.error("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.eval_only and (args.resume or args.overwrite):
        ap.error("--eval-only trains nothing, so --resume and --overwrite do not apply")
    if args.prefix and not args.eval_only:
        ap.error("--prefix names the files --eval-only evaluates; a training run evaluates its own")
    if args.heldout == 0 and not args.no_eval:
        ap.error("--heldout 0 leaves nothing to evaluate: hold some pairs out, or add --no-eval")
    if args.reparam and args.method != "prefix":
        ap.error("--reparam trains --method prefix through an MLP; it does not apply to --method prompt")
    if args.lr is not None and args.lr > MAX_LR:
        ap.error(f"--lr {args.lr:g}: AdamW moves every number by about the rate per step, so rates above {MAX_LR:g} "
                 "only diverge (the defaults are 0.05 and below)")
    args.lr = args.lr or DEFAULT_LR["prompt" if args.method == "prompt" else "reparam" if args.reparam else "direct"]
    args.eval_every = args.eval_every or args.save_every
    if not args.eval_only:  # --eval-only fills them from the prefix file first
        fill_split_settings(args, {})
    return args


def fill_split_settings(args, meta):
    """The split settings not given on the command line: from a prefix file's metadata if it has them, else the defaults."""
    for name, default in SPLIT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, int(meta[name]) if name in meta else default)
    if args.data is None and meta.get("data", "kaggle") != "kaggle":
        args.data = meta["data"]
        if not Path(args.data).exists():
            raise UserError(f"the prefix was trained on {args.data}, which is not there: give the data with --data")


def load_data(args):
    """
    Read the pairs and split them (data.split). -> (pairs, split, shots, record): `record` says, by CSV
    line, what each pair is for (train.py writes it to split.json) and identifies the data read.
    """
    path = args.data or data.fetch_kaggle(args.rows)
    pairs, lines, skipped = data.read_pairs(path, args.rows)
    if len(pairs) < 2:
        raise UserError(f"{path}: found {len(pairs)} usable pairs; training needs more")
    split = data.split(pairs, args.heldout, args.val_size, args.seed)
    for flag_, asked, got in (("--heldout", args.heldout, split.held), ("--val-size", args.val_size, split.val)):
        if len(got) < asked:
            print(f"note: {flag_} {asked} is more than a tenth of the {len(pairs)} pairs: {len(got)} are used")
    shots = evaluate.few_shot_indices(pairs, split.train, args.shots, args.seed)
    record = {"data": str(path), "rows_read": len(pairs), "data_sha256": data.fingerprint(pairs), "seed": args.seed,
              "lines": "the CSV line each pair starts on (the header is line 1)",
              "heldout": [lines[i] for i in split.held], "validation": [lines[i] for i in split.val],
              "few_shot": [lines[i] for i in shots], "dropped_near_duplicates": [lines[i] for i in split.dropped],
              "train_pairs": len(split.train)}
    print(f"data: {len(pairs)} pairs from {path} ({skipped} empty or broken rows skipped): {len(split.held)} held out, "
          f"{len(split.val)} for validation, {len(split.train)} to train, {len(split.dropped)} dropped as "
          f"(near-)duplicates of held-out or validation pairs")
    return pairs, split, shots, record


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
    The steps of one pass over the data, as lists of example indices: shuffled with (seed, epoch),
    then sorted by length inside windows of 64 steps, so a step holds sequences of similar length
    (little padding) while the order of steps stays random.
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


def micro_batches(examples, max_tokens, extra=0):
    """
    A step's examples packed into forward passes of at most `max_tokens` padded tokens (rows x
    longest row, a row being its tokens plus `extra` positions for prompts), shortest first so
    that rows of a pass have similar lengths. A longer example than the budget still gets a pass
    of its own.
    """
    rows = sorted(examples, key=lambda ex: len(ex[0]) + len(ex[1]))
    passes, current = [], []
    for ex in rows:
        if current and (len(current) + 1) * (len(ex[0]) + len(ex[1]) + extra) > max_tokens:
            passes.append(current)
            current = []
        current.append(ex)
    return passes + [current]


def mean_loss(model, prefixes, examples, method, max_batch_tokens, device, backward=False, grad_checkpoint=False,
              shapes=None):
    """
    The mean loss over all the target tokens of `examples`, in as few forward passes as fit the
    token budget: however they are split, every target token weighs the same. With `backward`,
    the gradient of that mean is accumulated too (an optimizer step's). Returns a tensor: reading
    it would wait for the GPU. `shapes` gets each pass's (rows, length) as it starts.
    The same for both methods but for the forward pass itself (METHODS[method].hidden).
    """
    hidden = METHODS[method].hidden
    extra = METHODS[method].positions(METHODS[method].prefix_len(prefixes.shape))
    n_targets = sum(len(tgt) for _, tgt, _, _ in examples)
    total = torch.zeros((), device=device)
    for micro in micro_batches(examples, max_batch_tokens, extra):
        idx, src_len, seq_len, sp, tp = make_batch(micro, device)
        if shapes is not None:
            shapes.append((idx.size(0), idx.size(1) + extra))
        loss = target_loss(model, *hidden(model, prefixes(), idx, src_len, seq_len, sp, tp, grad_checkpoint))
        if backward:
            (loss / n_targets).backward()
        total += loss.detach()
    return total / n_targets


@torch.no_grad()
def validation_loss(model, prefixes, examples, args, device):
    """The teacher-forced target loss on the validation slice, both directions."""
    return mean_loss(model, prefixes, examples, args.method, args.max_batch_tokens, device).item()


def lr_at(step, args):
    """Linear warm-up, then linear decay to zero at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (args.steps - step) / max(1, args.steps - args.warmup))


def run_settings(args):
    """The settings a checkpoint records, with paths made absolute so that CK, CK/ and ./CK are one."""
    canonical = lambda x: str(Path(x).resolve()) if x and Path(x).exists() else x  # noqa: E731
    return {k: canonical(getattr(args, k)) if k in ("model", "data") else getattr(args, k) for k in SAME_RUN + MAY_CHANGE}


def save_checkpoint(path, prefixes, optimizer, step, seconds, val_history, args, data_sha256):
    """Write checkpoint.pt atomically; prefixes that are not finite are never saved."""
    if not all(bool(torch.isfinite(p).all()) for p in prefixes.parameters()):
        raise UserError(f"the prefixes hold NaN or inf values at step {step}; {path} was not overwritten")
    buf = io.BytesIO()  # serialised in memory first: torch.save reports a failing disk as an unclear RuntimeError
    torch.save({"prefixes": prefixes.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "seconds": seconds, "val_history": val_history, "args": run_settings(args),
                "data_sha256": data_sha256}, buf)
    write_bytes(path, buf.getbuffer())


def read_checkpoint(path, args):
    """checkpoint.pt, checked: whole, from this program, and made with the same data and shapes."""
    fix = "start a new run with --overwrite, or use another --out"
    if not path.exists():
        raise UserError(f"--resume: no checkpoint at {path} (the run there saved none): start it again with "
                        "--overwrite instead of --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"{os_problem(e, path, 'reading')}; {fix}") from None
    except Exception as e:  # truncated or not a checkpoint: torch raises many kinds here
        raise UserError(f"{path} is damaged and cannot be resumed ({type(e).__name__}); {fix}") from None
    if not (isinstance(state, dict) and {"prefixes", "optimizer", "step", "args"} <= state.keys()
            and isinstance(state["args"], dict) and set(SAME_RUN) <= state["args"].keys()):
        raise UserError(f"{path} is not a checkpoint of this program; {fix}")
    saved, now = state["args"], run_settings(args)
    changed = [k for k in SAME_RUN if saved[k] != now[k]]
    if changed:
        was = ", ".join(f"{flag(k)} {saved[k]}" for k in changed)
        raise UserError(f"--resume: {path} was made with other settings ({was}); give the same ones, "
                        "or start a new run in another --out")
    if args.steps < state["step"]:
        raise UserError(f"--resume: {path} is at step {state['step']}, past --steps {args.steps}")
    for k in MAY_CHANGE:
        if saved.get(k, now[k]) != now[k]:
            print(f"note: resuming with {flag(k)} {now[k]} (the run so far used {saved[k]})")
    return state


def check_same_data(state, record, path):
    """--resume only on the pairs the run started with: an edited or reshuffled CSV would change the split mid-run."""
    if state.get("data_sha256", record["data_sha256"]) != record["data_sha256"]:
        raise UserError(f"--resume: the data changed since {path} was saved ({record['data']} now gives other pairs: "
                        f"sha256 {record['data_sha256'][:12]}..., was {state['data_sha256'][:12]}...); resume with "
                        "the data the run started with, or start a new run in another --out")


def flag(name):
    return "--" + name.replace("_", "-")


@contextmanager
def run_folder(out, args):
    """
    Claim --out for this run, before anything large is loaded: it must be a folder we can write, no
    other run may be using it, and a new run must not replace an earlier one's files by accident.
    Yields the files of an earlier run that --overwrite replaces (clear_old_run, once the new run
    is sure to start: until then a failed start leaves them as they were).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as e:
        raise UserError(f"--out: {os_problem(e, out, 'creating')}") from None
    with lock:
        lock.seek(0)
        try:
            if os.name == "nt":
                import msvcrt
                msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS when we exit, however we exit
        except OSError:
            raise UserError(f"another run (process {lock.read().strip() or '?'}) is using {out}: "
                            "wait for it to end, or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not (args.resume or args.overwrite or args.eval_only):
            if "checkpoint.pt" in found:
                raise UserError(f"{out} already holds a run ({', '.join(found)}): continue it with --resume, "
                                "choose another --out, or replace it with --overwrite")
            raise UserError(f"{out} already holds the files of a run that saved no checkpoint ({', '.join(found)}): "
                            "replace them with --overwrite, or choose another --out")
        yield found if args.overwrite else []


def clear_old_run(out, found):
    """--overwrite: delete the earlier run's files, now that the new run starts."""
    for name in found:
        (out / name).unlink(missing_ok=True)


def eval_only(args, device):
    paths = [Path(p) for p in args.prefix or [Path(args.out) / "prefix.safetensors"]]
    for path in paths:
        if not path.exists():
            raise UserError(f"no prefix file at {path}: train one first, or point --prefix at one")
    files = evaluate.read_files(paths)
    meta = files[0][3]
    args.model = args.model or meta.get("model", "gpt2-xl")
    fill_split_settings(args, meta)  # the first file's split, unless told otherwise
    config = config_of(args.model)  # a small file: every prefix is checked against it before the model loads
    for path, _, _, file_meta in files:
        check_fits(file_meta, config, path)
    cli.note_if_slow(args.model, device)
    pairs, split, shots, record = load_data(args)
    for path, _, _, file_meta in files:
        evaluate.check_split(file_meta, args, record)
    held_out = evaluate.evaluation_pairs([pairs[i] for i in split.held], args.max_len, args.eval_size)
    examples = [pairs[i] for i in shots]
    evaluate.check_few_shot_room(examples, held_out, config.n_positions, args.shots)
    model = mini_gpt2.from_pretrained(args.model, device=device, dtype=cli.DTYPES[args.dtype])
    evaluate.run(args, model, files, examples, held_out, record)
    return 0


class LossNotFinite(UserError):
    pass


LOG_HEADER = ["step", "loss", "lr", "tokens", "seconds", "val_loss"]


def open_log(path, resume_step):
    """
    log.csv, one row per step (and a row 0 for the validation loss before training). On resume
    it keeps exactly the rows up to the checkpoint's step (rows a crash left after it, and a
    half-written last row, are dropped).
    """
    rows = []
    if resume_step and path.exists():
        try:
            with open(path, newline="", encoding="utf-8") as f:
                table = list(csv.reader(f))
        except (OSError, ValueError, csv.Error) as e:
            problem = os_problem(e, path, "reading") if isinstance(e, OSError) else f"{path} is not a log train.py wrote"
            raise UserError(f"{problem}; move it away and --resume again") from None
        if not table or table[0] != LOG_HEADER:
            raise UserError(f"{path} is not a log train.py wrote; move it away and --resume again")
        whole = [r for r in table[1:] if len(r) == len(LOG_HEADER) and r[0].isdigit() and r[4]]
        rows = [r for r in whole if int(r[0]) <= resume_step]
    with atomic_write(path, "w") as f:
        csv.writer(f).writerows([LOG_HEADER] + rows)
    try:
        return open(path, "a", newline="", encoding="utf-8")
    except OSError as e:
        raise UserError(os_problem(e, path, "writing")) from None


def write_prefix(path, prefixes, model, args, meta, step, val_loss):
    """A prefix file, with what it was trained for (meta) and how it scored on the validation slice."""
    save_prefixes(path, prefixes.fold(), NAMES, model.config, args.method, **meta, step=step, val_loss=f"{val_loss:.4f}")


def prefix_metadata(args, record, split):
    """What a prefix file records of its run: the model, the training settings, and the split it was kept from."""
    return {"model": args.model, "steps": args.steps, "lr": args.lr, "batch": args.batch_size, "reparam": args.reparam,
            "init": args.init, "data": str(Path(args.data).resolve()) if args.data else "kaggle", "rows": args.rows,
            "heldout": args.heldout, "val_size": args.val_size, "seed": args.seed, "data_sha256": record["data_sha256"],
            "heldout_pairs": len(split.held), "val_pairs": len(split.val)}


def train_loop(args, model, prefixes, optimizer, batches, val_examples, state, device, meta, data_sha256):
    """
    Optimizer steps from the checkpoint's step (0 for a new run) to args.steps; returns the step
    reached, the validation losses [(step, loss)] and None, or the exit status if Ctrl-C or a
    signal stopped it. Every --eval-every steps and at the end the validation loss is computed and
    logged, and a prefix better than any before is written to prefix.safetensors. Ctrl-C or a crash
    saves a checkpoint of the last completed step first (a step cut short is dropped whole); a loss
    that is not finite stops the run without overwriting the last good checkpoint.
    """
    out = Path(args.out)
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.csv"
    step = saved = state["step"] if state else 0
    seconds_before = state.get("seconds", 0.0) if state else 0.0  # the time column continues on resume
    history = [tuple(v) for v in state.get("val_history", [])] if state else []  # [(step, validation loss)]
    log_file = open_log(log_path, step)
    log = csv.writer(log_file)
    bar = tqdm(total=args.steps, initial=step, desc="training", unit="step")
    t0, tokens_seen, shapes = time.time(), 0, []
    unlogged = None  # a completed step's log row, while its validation runs

    def validate():
        v = validation_loss(model, prefixes, val_examples, args, device)
        if math.isfinite(v) and all(v < best for _, best in history):
            write_prefix(out / "prefix.safetensors", prefixes, model, args, meta, step, v)
        history.append((step, v))
        bar.set_postfix_str(f"val {v:.3f}")
        return f"{v:.4f}"

    def write_log(row):
        try:
            log.writerow(row)
            log_file.flush()
        except OSError as e:
            raise UserError(os_problem(e, log_path, "writing")) from None

    def validates_at(k):
        return k == 0 or k % args.eval_every == 0 or k == args.steps

    try:
        # Where training starts from (step 0), or a resumed run whose last validation was cut short.
        if validates_at(step) and not (history and history[-1][0] == step):
            write_log([step, "", "", 0, f"{seconds_before:.1f}", validate()])
        while step < args.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            step_examples = batches[step]
            loss = mean_loss(model, prefixes, step_examples, args.method, args.max_batch_tokens, device, backward=True,
                             grad_checkpoint=args.grad_checkpoint, shapes=shapes)
            norm = torch.nn.utils.clip_grad_norm_(prefixes.parameters(), 1.0)
            loss_value, norm = torch.stack([loss, norm.float()]).tolist()  # the step's one wait for the GPU
            tokens = sum(len(src) + len(tgt) for src, tgt, _, _ in step_examples)
            if not (math.isfinite(loss_value) and math.isfinite(norm)):
                what = f"the loss became {loss_value}" if not math.isfinite(loss_value) else f"the gradient became {norm}"
                todo = (f"the last good checkpoint (step {saved}) is {checkpoint_path}: --resume with a lower --lr"
                        if saved else "nothing was saved: run again with a lower --lr and --overwrite")
                raise LossNotFinite(f"{what} at step {step + 1}; stopped, and {todo}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens
            elapsed = time.time() - t0
            unlogged = [step, f"{loss_value:.4f}", f"{lr_at(step - 1, args):.3g}", tokens, f"{seconds_before + elapsed:.1f}"]
            write_log(unlogged + [validate() if validates_at(step) else ""])
            unlogged = None
            bar.set_postfix_str(f"loss {loss_value:.3f}, val {history[-1][1]:.3f}, {tokens_seen / elapsed:.0f} tokens/s")
            bar.update(1)
            if step % args.save_every == 0 or step == args.steps:
                save_checkpoint(checkpoint_path, prefixes, optimizer, step, seconds_before + elapsed, history, args,
                                data_sha256)
                saved = step
    except BaseException as e:
        bar.close()
        if isinstance(e, LossNotFinite):
            log_file.close()
            raise
        if step > saved:  # a checkpoint of the last completed step, if the disk lets us
            optimizer.zero_grad(set_to_none=True)
            try:
                if unlogged:  # its validation was cut short: log the step without it (a resume validates it)
                    write_log(unlogged + [""])
                save_checkpoint(checkpoint_path, prefixes, optimizer, step, seconds_before + time.time() - t0, history,
                                args, data_sha256)
                saved = step
            except UserError:
                pass
        log_file.close()
        if saved:
            kept = f"{checkpoint_path} holds step {saved}: continue with the same command and --resume"
        else:
            kept = "no step was completed, so nothing was saved"
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, SIGTERM or SIGHUP (cli.Stopped)
            print(f"\n{cli.stop_word(e)} at step {step}; {kept}", file=sys.stderr)
            return step, history, cli.stop_status(e)
        if isinstance(e, torch.OutOfMemoryError) and shapes:
            rows, length = shapes[-1]
            raise UserError(f"out of GPU memory in a forward pass of {rows} x {length} = {rows * length} tokens; try "
                            f"--max-batch-tokens {max(1, args.max_batch_tokens // 2)}, or --grad-checkpoint. "
                            f"Stopped at step {step}; {kept}") from None
        if isinstance(e, (UserError, OSError)):
            problem = os_problem(e, e.filename or "a file", "using") if isinstance(e, OSError) else str(e)
            raise UserError(f"{problem}. Stopped at step {step}; {kept}") from None
        print(f"\nstopped by an error at step {step}; {kept}", file=sys.stderr)
        raise
    bar.close()
    log_file.close()
    return step, history, None


def report_best(out, prefixes, model, args, meta, history):
    """
    After the last step: prefix.safetensors holds the prefix with the lowest validation loss; the
    last one goes to prefix-last.safetensors if it is another. Say which is which, and whether the
    validation loss was still falling.
    """
    best_step, best = min(history, key=lambda sv: (sv[1], sv[0]))
    last_step, last = history[-1]
    last_path = out / "prefix-last.safetensors"
    if best_step != last_step:
        write_prefix(last_path, prefixes, model, args, meta, last_step, last)
        print(f"prefixes: {out / 'prefix.safetensors'} is the best (step {best_step}, validation loss {best:.4f}); "
              f"{last_path} is the last (step {last_step}, validation loss {last:.4f})")
    else:
        last_path.unlink(missing_ok=True)  # from an earlier end of this run, if it was resumed for more steps
        print(f"prefixes: {out / 'prefix.safetensors'}, the last and the best (step {best_step}, validation loss {best:.4f})")
    if len(history) >= 2 and last < history[-2][1]:
        print(f"note: the validation loss was still falling at the end ({history[-2][1]:.4f} at step {history[-2][0]}, "
              f"{last:.4f} at step {last_step}): more --steps may help")
    if plots.loss_png(out / "log.csv", out / "loss.png"):
        print(f"loss curves: {out / 'loss.png'}")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    device = args.device
    with run_folder(out, args) as replaced:
        if args.eval_only:
            return eval_only(args, device)
        args.model = args.model or "gpt2-xl"
        cli.note_if_slow(args.model, device)
        return train(args, out, device, replaced)


def train(args, out, device, replaced):
    state = read_checkpoint(out / "checkpoint.pt", args) if args.resume else None
    config = config_of(args.model)  # a small file: checked before the large ones load
    n_positions = config.n_positions
    if args.max_len > n_positions:
        raise UserError(f"--max-len {args.max_len}: a sequence length of at most {n_positions} fits this model")
    taken = METHODS[args.method].positions(args.prefix_len)
    if args.prefix_len > n_positions or taken + args.max_len > n_positions:
        with_prompts = f" (the two prompts take {taken} positions, plus --max-len {args.max_len})" if taken else ""
        raise UserError(f"--prefix-len {args.prefix_len}: too long a prefix length for this model's {n_positions} "
                        f"positions{with_prompts}")
    if args.warmup > args.steps:
        print(f"note: --warmup {args.warmup} is longer than --steps {args.steps}: the learning rate rises to "
              f"{lr_at(args.steps - 1, args):.3g} at the last step and never reaches the peak {args.lr:g}")

    pairs, split, shots, record = load_data(args)
    if state:
        check_same_data(state, record, out / "checkpoint.pt")
    if not split.train:
        raise UserError("no pair is left to train on: every pair is held out, for validation, or a (near-)duplicate "
                        "of a held-out or validation pair")
    examples, too_long = make_examples([pairs[i] for i in split.train], args.max_len)
    val_examples, _ = make_examples([pairs[i] for i in split.val], args.max_len)
    if not examples or not val_examples:
        raise UserError(f"every {'training' if not examples else 'validation'} pair is longer than --max-len "
                        f"{args.max_len} tokens")
    held_out = evaluate.evaluation_pairs([pairs[i] for i in split.held], args.max_len, args.eval_size)
    if not args.no_eval:
        evaluate.check_few_shot_room([pairs[i] for i in shots], held_out, n_positions, args.shots)
    print(f"training examples: {len(examples)} (both directions; {too_long} longer than {args.max_len} tokens skipped); "
          f"validation examples: {len(val_examples)}")
    model = mini_gpt2.from_pretrained(args.model, device=device, dtype=cli.DTYPES[args.dtype])
    model.requires_grad_(False)  # GPT-2 stays frozen: only the prefixes learn

    method = METHODS[args.method]
    if args.init == "words":
        init = method.init_from_words(model, NAMES, args.prefix_len)
    else:
        init = method.init_random(model, NAMES, args.prefix_len, torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)  # the MLP of --reparam starts random
    prefixes = Prefixes(init, reparam=args.reparam).to(device)
    optimizer = torch.optim.AdamW(prefixes.parameters(), lr=args.lr, weight_decay=0.0)
    if state:
        try:
            prefixes.load_state_dict(state["prefixes"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{out / 'checkpoint.pt'} does not fit these settings ({str(e).splitlines()[0]}); "
                            "start a new run with --overwrite, or use another --out") from None
        print(f"resuming at step {state['step']} of {args.steps}")
    n_params = sum(p.numel() for p in prefixes.parameters())
    how = "input-embedding prompts" if args.method == "prompt" else "prefixes, through the MLP" if args.reparam else "prefixes"
    print(f"model {args.model} on {device} in {args.dtype}, frozen; training {n_params:,} parameters: {how}, "
          f"{args.prefix_len} virtual tokens each, peak learning rate {args.lr:g}")

    clear_old_run(out, replaced)  # the new run starts here: only now may --overwrite replace the old one's files
    write_bytes(out / "split.json", json.dumps(record, indent=1).encode())
    meta = prefix_metadata(args, record, split)
    batches = Batches(examples, args.batch_size, args.seed)
    step, history, stopped = train_loop(args, model, prefixes, optimizer, batches, val_examples, state, device, meta,
                                        record["data_sha256"])
    if stopped:
        return stopped
    report_best(out, prefixes, model, args, meta, history)
    if not args.no_eval:
        try:
            evaluate.run(args, model, evaluate.read_files([out / "prefix.safetensors"]), [pairs[i] for i in shots],
                         held_out, record)
        except KeyboardInterrupt as e:
            print(f"\n{cli.stop_word(e)} in the evaluation; the training is complete and saved in {out}: the same "
                  "command with --eval-only runs the comparison", file=sys.stderr)
            return cli.stop_status(e)
    return 0


if __name__ == "__main__":
    cli.run(main)
