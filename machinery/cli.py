"""
What train.py and translate.py share: argument checks, and the one place where a failure the user
can fix (mini_gpt2.UserError, or an OSError from a file) becomes one line instead of a traceback.
"""

import argparse
import importlib
import math
import os
import signal
import sys

import torch

from machinery import dist
import mini_gpt2
from mini_gpt2 import UserError
from mini_gpt2.fast import why
from mini_gpt2.files import os_problem


# What `kill`, `docker stop`, a cluster's preemption (SIGTERM) and a closed terminal (SIGHUP) send.
STOP_SIGNALS = {"SIGTERM": "terminated", "SIGHUP": "hung up"}


class Stopped(KeyboardInterrupt):
    """
    SIGTERM or SIGHUP, raised wherever the program is, as Ctrl-C raises KeyboardInterrupt: so every
    `except KeyboardInterrupt` (which saves a checkpoint and says so in one line) handles all three.
    """

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def stop_word(e):
    """How a KeyboardInterrupt (or Stopped) ended the program: "interrupted", "terminated", "hung up"."""
    return STOP_SIGNALS[signal.Signals(e.signum).name] if isinstance(e, Stopped) else "interrupted"


def stop_status(e):
    """The exit status the shell expects: 128 + the signal's number (Ctrl-C: SIGINT, 130)."""
    return 128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT)


def stop_signals():
    """Ctrl-C's SIGINT and the stop signals this system has (Windows has no SIGHUP)."""
    return [signal.SIGINT] + [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]


def _stop(signum, frame):
    """The first Ctrl-C or stop signal, raised where the program is; from here on, any other is ignored (ignore_stops)."""
    ignore_stops()
    raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


def ignore_stops():
    """
    The program is stopping: a second Ctrl-C, or torchrun's SIGTERM to every process, must not cut
    short the checkpoint being saved or the line that says what was kept. (cli.run puts the handlers
    back when it ends.)
    """
    for s in stop_signals():
        signal.signal(s, signal.SIG_IGN)


class Quiet(Exception):
    """End with this exit status and no word: under torchrun, for a process whose failure process 0 tells."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


def run(main):
    """Run a script's main(): its return value is the exit status; a UserError or OSError is one line."""
    previous = {s: signal.signal(s, _stop) for s in stop_signals()}
    try:  # (under torchrun, only process 0's words are seen: dist.setup)
        sys.exit(main())
    except Quiet as e:
        sys.exit(e.status)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a file or folder the code did not expect to fail
        print(f"error: {os_problem(e, e.filename or 'a file', 'using')}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # before a training run started, or outside one
        ignore_stops()
        print(f"\n{stop_word(e)}; nothing was saved", file=sys.stderr)
        sys.exit(stop_status(e))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        dist.close()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its error in one line (`train.py: error: ...`, exit status 2), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


# ----------------------------------------------------------------------------- argparse types
# argparse calls these on the text given; ArgumentTypeError becomes its usual error (exit status 2).

def _number(kind, ok, what):
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return x
    return parse


positive_int = _number(int, lambda x: x >= 1, "a whole number of at least 1")
natural_int = _number(int, lambda x: x >= 0, "a whole number of at least 0")
positive_float = _number(float, lambda x: math.isfinite(x) and x > 0, "a positive finite number")
natural_float = _number(float, lambda x: math.isfinite(x) and x >= 0, "a finite number of at least 0")
seed = _number(int, lambda x: -2**63 <= x < 2**64, "a whole number that fits in 64 bits (what PyTorch's seeds take)")


def device(text):
    """--device: cpu, cuda, cuda:N or mps, and only one this machine has."""
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text}: PyTorch sees no CUDA GPU on this machine (try cpu)")
        if d.index is not None and d.index >= n:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA GPU{'s' * (n > 1)}, cuda:0 to cuda:{n - 1}")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this machine has no Apple GPU that PyTorch can use (try cpu)")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: use cpu, cuda, cuda:N or mps")
    return str(d)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MODEL = "gpt2-xl"  # the model the scripts load unless told otherwise


def add_device_args(ap):
    ap.add_argument("--device", type=device, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    ap.add_argument("--dtype", choices=list(DTYPES),
                    help="precision of the model's weights (default: bfloat16 on a CUDA GPU that has it, else float32)")


def settle_device(ap, device, dtype):
    """--device and --dtype (a name in DTYPES) filled in where not given, and checked to go together: -> both."""
    device = device or mini_gpt2.default_device()
    has_bf16 = mini_gpt2.default_dtype(device) == torch.bfloat16 or torch.device(device).type != "cuda"
    if dtype == "bfloat16" and not has_bf16:
        ap.error(f"--dtype bfloat16: {device} has no bfloat16 arithmetic; use float32")
    if dtype is None:
        if torch.device(device).type == "cuda" and not has_bf16:
            print(f"note: {device} has no bfloat16 arithmetic, so the weights are float32 (twice the memory)",
                  file=sys.stderr)
        dtype = str(mini_gpt2.default_dtype(device)).removeprefix("torch.")
    return device, dtype


_noted = set()


def optional(name):
    """
    An optional package (sacrebleu, matplotlib): the module, or None. Not installed, what it adds is
    left out and the outputs say so; installed but failing to import in any other way, one note too.
    """
    package = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name + ".").startswith(e.name + "."):  # it, or the package it is in, is not installed
            return None
        problem = e  # another module it needs is missing: a broken install
    except Exception as e:  # a broken install: anything at all
        problem = e
    if package not in _noted:  # once a package
        _noted.add(package)
        print(f"note: {name} is installed but fails to import ({why(problem)}); going on without it", file=sys.stderr)
    return None


def try_optional_packages():
    """
    sacrebleu and matplotlib, tried before any work: a broken install is one note, before the work,
    not a failure after it. Under torchrun, before the processes join, by process 0, which speaks for all.
    """
    if os.environ.get("RANK", "0") == "0":
        for name in ("sacrebleu", "matplotlib", "matplotlib.pyplot"):
            optional(name)


def note_if_slow(model, device):
    """A large model on the CPU works, but the user should know what they are in for."""
    if torch.device(device).type == "cpu" and model in ("gpt2-large", "gpt2-xl"):
        print(f"note: {model} on the CPU is slow (seconds per word, days of training); "
              "on a CPU, try --model gpt2", file=sys.stderr)
