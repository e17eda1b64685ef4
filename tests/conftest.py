"""Shared fixtures: tiny GPT-2 checkpoints with random weights, written in the official file format."""

import csv
import functools
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tqdm
from safetensors.torch import save_file

# Progress bars off, so that stderr holds only what the tests check: in scripts run as processes
# (tqdm reads TQDM_DISABLE when imported) and in this one (imported already).
os.environ["TQDM_DISABLE"] = "1"
tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)

# The GPT-2 tokenizer files, prefilled for machines without internet.
_cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _cache.exists():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """No test reaches the real hub or Kaggle: those that download start their own server and point here at it."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("KAGGLE_API_ENDPOINT", "http://127.0.0.1:9")


def make_checkpoint(folder, n_layer=2, n_head=5, n_embd=80, n_positions=1024, vocab_size=50257,
                    layout="save_pretrained", seed=0):
    """
    A GPT-2 with random weights, saved by transformers' save_pretrained (the `transformer.`
    key layout) or rewritten in the hub's original layout (no prefix, `h.N.attn.bias` buffers).
    The weights are drawn wide (not GPT-2's tiny init) so that every matrix matters, and not
    symmetric, so a missed transpose shows. Returns the transformers model, in eval mode.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    folder = Path(folder)
    model.save_pretrained(folder)
    if layout == "hub":
        path = folder / "model.safetensors"
        from safetensors.torch import load_file

        sd = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
        for i in range(n_layer):
            sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, n_positions, n_positions).tril()
        save_file(sd, path, metadata={"format": "pt"})
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(folder, transformers model) of a tiny random GPT-2 with the real vocabulary."""
    folder = tmp_path_factory.mktemp("tiny")
    return folder, make_checkpoint(folder)


ROOT = Path(__file__).resolve().parents[1]
# A script that runs this long has hung: several times the slowest one takes on two busy cores beside another suite.
HANG = 1800
PAIRS = [("Hello! My name is Sully.", "Bonjour! Je m'appelle Sully."), ("Thank you.", "Merci."),
         ("Where is the station?", "Où est la gare ?"), ("I like cheese, and bread.", "J'aime le fromage, et le pain."),
         ("It is raining today.", "Il pleut aujourd'hui."), ("See you tomorrow.", "À demain."),
         ("The cat sleeps.", "Le chat dort."), ("We are late.", "Nous sommes en retard."),
         ("Open the window, please.", "Ouvre la fenêtre, s'il te plaît."), ("He reads a book.", "Il lit un livre."),
         ("Good night.", "Bonne nuit."), ("The sea is blue.", "La mer est bleue.")]


@pytest.fixture(scope="session")
def csv_file(tmp_path_factory):
    """A small en,fr CSV of real sentence pairs (with repeats, as real data has)."""
    path = tmp_path_factory.mktemp("data") / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["en", "fr"])
        w.writerows(PAIRS * 3)
    return path


def run(script, *args, stdin=None, timeout=HANG):
    """Run one of the project's scripts as a user would, in a fresh process (timeout: a hung one fails, None: no limit)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=timeout)


@pytest.fixture
def call(capsys, monkeypatch):
    """
    Run a script's main() through cli.run in this process, as the script does (faster than `run`):
    call(train.main, *args) -> CompletedProcess-like (returncode, stdout, stderr).
    """
    from machinery import cli

    def call(main, *args, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        try:
            cli.run(lambda: main([str(a) for a in args]))
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


def one_line_error(r, status=1):
    """Assert that a run failed with `status` (2: an argument) and said why in one line; return it."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") if status == 1 else ".py: error: " in lines[0], r.stderr
    return lines[0]


def train_args(ckpt, csv_file, out, *extra):
    """A short training run on the tiny checkpoint: 6 steps of 4 sequences (one forward pass each), a checkpoint every 2."""
    return [str(a) for a in ["--model", ckpt, "--data", csv_file, "--out", out, "--steps", 6, "--batch-size", 4,
                             "--prefix-len", 3, "--warmup", 2, "--lr", 0.05, "--save-every", 2, "--heldout", 4,
                             "--eval-size", 2, *extra]]


def fail_in_step(monkeypatch, n, error):
    """
    Make training step n (counting from 1 in this process) fail: raise `error` (or call it, if it is
    a function), or with error="nan" let the step compute its gradient but return a NaN loss.
    Validation passes are left alone.
    """
    import train

    real, calls = train.mean_loss, {"n": 0}

    def mean_loss(*args, backward=False, **kwargs):
        if backward:
            calls["n"] += 1
            if calls["n"] == n and error != "nan":
                if callable(error) and not isinstance(error, type) and not isinstance(error, BaseException):
                    error()
                raise error
        loss = real(*args, backward=backward, **kwargs)
        return loss * float("nan") if backward and calls["n"] == n else loss

    monkeypatch.setattr(train, "mean_loss", mean_loss)


def load_learned(path):
    """methods.load, with the names the file records: (learned, names, metadata)."""
    import json

    import methods

    learned, meta = methods.load(path)
    return learned, json.loads(meta["names"]), meta


def translate(model, learned, method, texts, targets, limits, **decoding):
    """Each text into its target language ("en" or "fr") with the method's translator, in the texts' order."""
    from methods import METHODS

    translate = METHODS[method].translator(model, learned)
    out = [None] * len(texts)
    for target in ("en", "fr"):
        rows = [i for i, t in enumerate(targets) if t == target]
        if rows:
            source = "fr" if target == "en" else "en"
            for i, text in zip(rows, translate([texts[i] for i in rows], source, target, [limits[i] for i in rows],
                                               **decoding)):
                out[i] = text
    return out
