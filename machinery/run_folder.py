"""
The run's bookkeeping: everything train.py does with --out, so that train.py reads as the training.

A Run claims the folder (one process at a time; an earlier run is never replaced by accident),
checks a checkpoint before resuming from it, writes the log, the checkpoints and the learned
files, and says in one line what a stopped run kept (docs/training.md lists the files). The
checkpoint holds all that --resume needs: the learned numbers, the optimizer, the step, the
validation losses so far, the settings, the sha256 of the data. log.csv has a row per step, with
val_loss where it was validated (a row of its own for a validation no step row carries: step 0,
or one a stop cut short).

Resume rules: the settings that fix the data order and the shapes (SAME_RUN) and the data itself
must be as before; those in MAY_CHANGE may change, with a note. A resumed run is the same, bit for
bit, as one never stopped: the data order of step k depends on k alone (train.Batches), and
log.csv keeps exactly the rows up to the checkpoint's step.

Under torchrun (dist.py) every process has a Run, but only process 0's writes and speaks; the
others read the checkpoint to resume from and keep count of the steps, the same way.
"""

import csv
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from machinery import cli, dist
from methods import METHODS
from mini_gpt2 import UserError
from mini_gpt2.files import atomic_write, os_problem, write_bytes

# --resume continues a run only with the settings that fix its data order and its shapes...
SAME_RUN = ("model", "data", "rows", "heldout", "val_size", "seed", "batch_size", "method", "prefix_len", "max_len",
            "reparam", "init")
# ...while these may change on the way (a lower --lr after a diverged loss, say), with a note.
MAY_CHANGE = ("steps", "lr", "warmup", "save_every", "eval_every", "grad_checkpoint", "device", "dtype",
              "max_batch_tokens", "compile")
# What a run writes to --out; a new run refuses to replace them without --overwrite.
RUN_FILES = ("checkpoint.pt", "log.csv", *(name for m in METHODS.values() for name in m.FILES), "split.json", "loss.png",
             "results.json", "results.md", "bleu.png")
LOG_HEADER = ["step", "loss", "lr", "tokens", "seconds", "val_loss"]
ASIDE = ".earlier-run"  # where --overwrite keeps the earlier run's files until the new run's first checkpoint
DISCARDED = ".earlier-run-discarded"  # ASIDE, renamed at once when it may go, then deleted (a stop mid-way leaves only this)


class LossNotFinite(Exception):
    """Raised by the training step; Run.stopped turns it into advice."""

    def __init__(self, loss, norm, step):
        super().__init__(f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient became {norm}")
        self.step = step


def flag(name):
    return "--" + name.replace("_", "-")


class Run:
    """
    --out, for one run of train.py. `settings`: the command's flags (the checkpoint records
    SAME_RUN and MAY_CHANGE). Processes other than torchrun's process 0 write nothing.
    """

    def __init__(self, out, settings):
        self.out, self.settings, self.main = Path(out), settings, dist.is_main()
        self.lock = None
        self.checkpoint_path, self.log_path = self.out / "checkpoint.pt", self.out / "log.csv"
        self.step = self.saved = 0          # the last completed step; the step checkpoint.pt holds
        self.history = []                   # [(step, validation loss)]
        self.seconds_before = 0.0           # the time of the run before a resume
        self.replaced = []                  # the files of an earlier run that --overwrite replaces
        self.set_aside = False              # whether they are all in ASIDE (until the new run's first checkpoint)
        self.row, self.log, self.bar = None, None, None
        self.t0 = self.t0_steps = time.time()
        self.tokens_seen = 0

    # ------------------------------------------------------------------------- the folder

    def __enter__(self):
        """
        Claim --out before anything large is loaded: it must be a folder we can write, no other run
        may be using it, and a new run must not replace an earlier one's files by accident.
        """
        dist.together(self._open if self.main else lambda: None)  # the others wait to hear how it went
        return self

    def _open(self):
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder: choose another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.lock = open(out / ".lock", "a+")
        except OSError as e:
            raise UserError(f"--out: {os_problem(e, out, 'creating')}") from None
        try:
            self._claim()
        except BaseException:
            self.lock.close()
            raise

    def _claim(self):
        lock, out, s = self.lock, self.out, self.settings
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
        shutil.rmtree(out / DISCARDED, ignore_errors=True)  # left by a stop while it was deleted: nobody's files now
        if (out / ASIDE).exists():
            raise UserError(f"{out / ASIDE} holds the files of a run that --overwrite had moved aside when it was stopped: "
                            f"move them back into {out} (or delete the folder), then run again")
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not (s["resume"] or s["overwrite"] or s["eval_only"]):
            if "checkpoint.pt" in found:
                raise UserError(f"{out} already holds a run ({', '.join(found)}): continue it with --resume, "
                                "choose another --out, or replace it with --overwrite")
            raise UserError(f"{out} already holds the files of a run that saved no checkpoint ({', '.join(found)}): "
                            "replace them with --overwrite, or choose another --out")
        self.replaced = found if s["overwrite"] else []

    def __exit__(self, *exc):
        for f in (self.bar, self.log, self.lock):
            if f is not None:
                f.close()

    # ------------------------------------------------------------------------- resuming

    def run_settings(self):
        """The settings a checkpoint records, with paths made absolute so that CK, CK/ and ./CK are one."""
        canonical = lambda x: str(Path(x).resolve()) if x and Path(x).exists() else x  # noqa: E731
        return {k: canonical(self.settings[k]) if k in ("model", "data") else self.settings[k] for k in SAME_RUN + MAY_CHANGE}

    def resume(self):
        """checkpoint.pt, checked: whole, from this program, and made with the same data and shapes. -> its state."""
        return dist.together(self._resume)

    def _resume(self):
        path, fix = self.checkpoint_path, "start a new run with --overwrite, or use another --out"
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
        saved, now = state["args"], self.run_settings()
        changed = [k for k in SAME_RUN if saved[k] != now[k]]
        if changed:
            was = ", ".join(f"{flag(k)} {saved[k]}" for k in changed)
            raise UserError(f"--resume: {path} was made with other settings ({was}); give the same ones, "
                            "or start a new run in another --out")
        if now["steps"] < state["step"]:
            raise UserError(f"--resume: {path} is at step {state['step']}, past --steps {now['steps']}")
        for k in MAY_CHANGE:
            if saved.get(k, now[k]) != now[k]:
                print(f"note: resuming with {flag(k)} {now[k]} (the run so far used {saved[k]})")
        self.step = self.saved = state["step"]
        self.seconds_before = state.get("seconds", 0.0)  # the time column continues
        self.history = [tuple(v) for v in state.get("val_history", [])]
        self.state = state
        return state

    def restore(self, learned, optimizer):
        """The learned numbers and the optimizer's state as the checkpoint resume() read holds them."""
        try:
            learned.load_state_dict(self.state["prefixes"])
            optimizer.load_state_dict(self.state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{self.checkpoint_path} does not fit these settings ({str(e).splitlines()[0]}); "
                            "start a new run with --overwrite, or use another --out") from None
        print(f"resuming at step {self.step} of {self.settings['steps']}")
        self.state = None  # all of it is in `learned` and `optimizer` now (for a fine-tuned GPT-2 XL, gigabytes)

    def check_data(self, record):
        """--resume only on the pairs the run started with: an edited or reshuffled CSV would change the split mid-run."""
        was = self.state.get("data_sha256", record["data_sha256"])
        if was != record["data_sha256"]:
            raise UserError(f"--resume: the data changed since {self.checkpoint_path} was saved ({record['data']} now "
                            f"gives other pairs: sha256 {record['data_sha256'][:12]}..., was {was[:12]}...); resume "
                            "with the data the run started with, or start a new run in another --out")

    # ------------------------------------------------------------------------- the run

    def start(self, record, save, files, what):
        """
        The run starts: only now does --overwrite replace the earlier run's files (until here, a
        failed start leaves them as they were). split.json gets `record`; log.csv is opened, keeping
        on resume exactly the rows up to the checkpoint's step. save(path, learned, **metadata) writes
        the file of the learned numbers as they are (the run adds its speed and memory); `files` are
        the best one's name and the last one's, `what` what they hold in a word (the method's FILES
        and LEARNED).
        """
        self.data_sha256, self.save, self.what = record["data_sha256"], save, what
        self.best_path, self.last_path = self.out / files[0], self.out / files[1]
        self.t0 = self.t0_steps = time.time()
        self.tokens_seen = 0
        dist.together(lambda: self._start(record) if self.main else None)

    def _start(self, record):
        if self.replaced:  # set aside, not deleted: a stop before the first checkpoint puts them back (_restore)
            self._set_aside()
        write_bytes(self.out / "split.json", json.dumps(record, indent=1).encode())
        rows = self._log_rows() if self.step else []
        if rows and rows[-1][0] == str(self.step) and not rows[-1][5] and self.needs_validation(self.settings["eval_every"]):
            self.row = rows.pop()[:5]  # its validation was cut short: the step's row waits for it (one row a step)
        with atomic_write(self.log_path, "w") as f:
            csv.writer(f).writerows([LOG_HEADER] + rows)
        try:
            self.log = open(self.log_path, "a", newline="", encoding="utf-8")
        except OSError as e:
            raise UserError(os_problem(e, self.log_path, "writing")) from None
        self.bar = tqdm(total=self.settings["steps"], initial=self.step, desc="training", unit="step")

    def _set_aside(self):
        """
        The earlier run's files into ASIDE, all or none: a failure or a stop part way moves back those
        already moved (a second stop is ignored by then: cli._stop), so no file is ever left in neither place.
        """
        aside = self.out / ASIDE
        try:
            aside.mkdir()
            for name in self.replaced:
                os.replace(self.out / name, aside / name)
        except BaseException as e:
            try:
                for path in aside.iterdir():
                    os.replace(path, self.out / path.name)
                aside.rmdir()
            except OSError:
                pass  # what is left in ASIDE, the next run names
            if isinstance(e, OSError):
                raise UserError(f"--overwrite: {os_problem(e, aside, 'moving the earlier run into')}") from None
            raise
        self.set_aside = True

    def _log_rows(self):
        """The rows of log.csv up to the checkpoint's step (rows a crash left after it, and a half-written one, dropped)."""
        if not self.log_path.exists():
            return []
        try:
            with open(self.log_path, newline="", encoding="utf-8") as f:
                table = list(csv.reader(f))
        except (OSError, ValueError, csv.Error) as e:
            problem = os_problem(e, self.log_path, "reading") if isinstance(e, OSError) else \
                f"{self.log_path} is not a log train.py wrote"
            raise UserError(f"{problem}; move it away and --resume again") from None
        if not table or table[0] != LOG_HEADER:
            raise UserError(f"{self.log_path} is not a log train.py wrote; move it away and --resume again")
        whole = [r for r in table[1:] if len(r) == len(LOG_HEADER) and r[0].isdigit() and r[4]]
        return [r for r in whole if int(r[0]) <= self.step]

    def save_learned(self, path, learned, val_loss):
        """The learned numbers of this step, with what they record of the run: the step, its speed and memory."""
        device = torch.device(self.settings["device"])
        peak = {"peak_memory_gib": f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"} if device.type == "cuda" else {}
        self.save(path, learned, step=self.step, val_loss=f"{val_loss:.4f}", tokens_per_s=self.tokens_per_s(), **peak)

    def seconds(self):
        return self.seconds_before + time.time() - self.t0

    def tokens_per_s(self):
        """Training speed since this process started training ("" before its first step)."""
        return f"{self.tokens_seen / (time.time() - self.t0_steps):.0f}" if self.tokens_seen else ""

    def _write(self, row):
        if not self.main:
            return
        try:
            csv.writer(self.log).writerow(row)
            self.log.flush()
        except OSError as e:
            raise UserError(os_problem(e, self.log_path, "writing")) from None

    def _flush_row(self, val_loss=""):
        if self.row:
            row, self.row = self.row, None
            self._write(row + [val_loss])

    def needs_validation(self, every):
        """Where training starts from (step 0), or a resumed run whose last validation was cut short."""
        at = self.step == 0 or self.step % every == 0 or self.step == self.settings["steps"]
        return at and not (self.history and self.history[-1][0] == self.step)

    def step_done(self, step, loss, lr, tokens, validating):
        """
        Step `step` is complete: its row goes to log.csv now, or, if `validating`, with the validation
        loss (validated); a stop before that writes it without one (stopped).
        """
        self.step = step
        self.tokens_seen += tokens
        self.row = [step, f"{loss:.4f}", f"{lr:.3g}", tokens, f"{self.seconds():.1f}"]
        if not validating:
            self._flush_row()
        if self.bar:
            val = f", val {self.history[-1][1]:.3f}" if self.history else ""
            self.bar.set_postfix_str(f"loss {loss:.3f}{val}, {self.tokens_per_s()} tokens/s")
            self.bar.update(1)

    def validated(self, val_loss, learned):
        """The validation loss of this step: logged, and a better one than any before goes to prefix.safetensors."""
        if math.isfinite(val_loss) and all(val_loss < best for _, best in self.history):  # alike on every process
            dist.together(lambda: self.save_learned(self.best_path, learned, val_loss) if self.main else None)
        self.history.append((self.step, val_loss))
        if self.row is None:  # no step row to carry it
            self.row = [self.step, "", "", 0, f"{self.seconds():.1f}"]
        self._flush_row(f"{val_loss:.4f}")
        if self.bar:
            self.bar.set_postfix_str(f"val {val_loss:.3f}")
        if self.tokens_seen == 0:  # the first validation, before any step: the time left and the speed count steps alone
            self.t0_steps = time.time()
            if self.bar:
                self.bar.unpause()

    def checkpoint(self, learned, optimizer, alone=False):
        """
        Write checkpoint.pt atomically (learned numbers that are not finite are never saved). Under
        torchrun the others wait for it, so that a failure ends them all; `alone`: process 0 by
        itself, after a stop (the others are gone or going).
        """
        self._flush_row()
        write = lambda: self._checkpoint(learned, optimizer) if self.main else None  # noqa: E731
        write() if alone else dist.together(write)
        self.saved = self.step
        if self.main and self.set_aside:  # the new run has something to show: the earlier one goes
            self.set_aside, gone = False, self.out / DISCARDED
            try:
                os.replace(self.out / ASIDE, gone)  # at once: a stop while it is deleted leaves no ASIDE behind
            except OSError:
                gone = self.out / ASIDE
            shutil.rmtree(gone, ignore_errors=True)

    def _checkpoint(self, learned, optimizer):
        if not all(bool(torch.isfinite(p).all()) for p in learned.parameters()):
            raise UserError(f"the prefixes hold NaN or inf values at step {self.step}; {self.checkpoint_path} was not "
                            "overwritten")
        buf = io.BytesIO()  # serialised in memory first: torch.save reports a failing disk as an unclear RuntimeError
        torch.save({"prefixes": learned.state_dict(), "optimizer": optimizer.state_dict(), "step": self.step,
                    "seconds": self.seconds(), "val_history": self.history, "args": self.run_settings(),
                    "data_sha256": self.data_sha256}, buf)
        write_bytes(self.checkpoint_path, buf.getbuffer())

    # ------------------------------------------------------------------------- the end

    def stopped(self, e, learned, optimizer):
        """
        The training loop ended with `e`. Ctrl-C, SIGTERM, SIGHUP or a crash first save a checkpoint of
        the last completed step (a step cut short is dropped whole), if the disk lets us; a loss that
        is not finite saves nothing, so the last good checkpoint stays. Then one line says what was
        kept: returns the exit status for an interruption, raises a UserError for what the user can
        fix, re-raises a bug.
        """
        if self.bar:
            self.bar.close()
        if not self.main:  # process 0 saves, and says what
            return cli.stop_status(e) if isinstance(e, KeyboardInterrupt) else self._quietly(e)
        cli.ignore_stops()  # a second Ctrl-C or signal must not cut short what is saved below, nor the line that says it
        if self.step > self.saved and not isinstance(e, LossNotFinite):
            optimizer.zero_grad(set_to_none=True)
            try:  # with the row of the last step, if its validation was cut short
                self.checkpoint(learned, optimizer, alone=True)
            except UserError:
                pass
        back = self._restore() if not self.saved else ""  # nothing to show: an --overwrite's earlier run comes back
        if isinstance(e, LossNotFinite):
            todo = (f"the last good checkpoint (step {self.saved}) is {self.checkpoint_path}: --resume with a lower --lr"
                    if self.saved else f"nothing was saved{back}: run again with a lower --lr and --overwrite")
            raise UserError(f"{e} at step {e.step}; stopped, and {todo}") from None
        if self.saved:
            kept = f"{self.checkpoint_path} holds step {self.saved}: continue with the same command and --resume"
        else:
            kept = f"no step was completed, so nothing was saved{back}"
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, SIGTERM or SIGHUP (cli.Stopped)
            print(f"\n{cli.stop_word(e)} at step {self.step}; {kept}", file=sys.stderr)
            return cli.stop_status(e)
        if isinstance(e, torch.OutOfMemoryError):
            e = UserError(f"out of GPU memory; try --max-batch-tokens {max(1, self.settings['max_batch_tokens'] // 2)}, "
                          "or --grad-checkpoint")
        if isinstance(e, (UserError, OSError)):
            problem = os_problem(e, e.filename or "a file", "using") if isinstance(e, OSError) else str(e)
            raise UserError(f"{problem}. Stopped at step {self.step}; {kept}") from None
        print(f"\nstopped by an error at step {self.step}; {kept}", file=sys.stderr)
        raise e

    def _restore(self):
        """Put back the files --overwrite set aside (the new run's own go): -> what to add to the stop's line."""
        aside = self.out / ASIDE
        if not self.set_aside:  # nothing set aside, or not all of it: nothing here is the new run's alone
            return ""
        try:
            for name in RUN_FILES:
                if (self.out / name).exists():
                    shutil.rmtree(self.out / name) if (self.out / name).is_dir() else (self.out / name).unlink()
            for path in aside.iterdir():
                os.replace(path, self.out / path.name)
            aside.rmdir()
        except OSError:
            return f"; the earlier run's files are in {aside}"
        return f"; the earlier run's files are back in {self.out}"

    @staticmethod
    def _quietly(e):
        """On a process other than 0: end as process 0 does, without a word (it has said it)."""
        raise e if not isinstance(e, (UserError, LossNotFinite)) else cli.Quiet(1)

    def stopped_in_comparison(self, e):
        """Ctrl-C or a signal in the comparison after training: the training is whole. Returns the exit status."""
        if not self.main:
            return cli.stop_status(e)
        print(f"\n{cli.stop_word(e)} in the evaluation; the training is complete and saved in {self.out}: the same "
              "command with --eval-only runs the comparison", file=sys.stderr)
        return cli.stop_status(e)

    def finish(self, learned, chance):
        """
        After the last step: the last prefix goes to prefix-last.safetensors if it is not the best (which
        prefix.safetensors holds). Say which is which, and whether the validation loss was still falling,
        or no better than `chance` (the loss of guessing: ln of the vocabulary's size). Under torchrun
        the others wait for it: what comes next (the comparison) reads those files.
        """
        dist.together(lambda: self._finish(learned, chance) if self.main else None)

    def _finish(self, learned, chance):
        self.bar.close()
        best_step, best = min(self.history, key=lambda sv: (sv[1], sv[0]))
        last_step, last = self.history[-1]
        best_path, last_path, what = self.best_path, self.last_path, self.what
        if best_step != last_step:
            self.save_learned(last_path, learned, last)
            print(f"{what}: {best_path} is the best (step {best_step}, validation loss {best:.4f}); "
                  f"{last_path} is the last (step {last_step}, validation loss {last:.4f})")
        else:  # one from an earlier end of this run, if it was resumed for more steps, goes
            shutil.rmtree(last_path) if last_path.is_dir() else last_path.unlink(missing_ok=True)
            print(f"{what}: {best_path}, the last and the best (step {best_step}, validation loss {best:.4f})")
        if best > chance - 0.05:  # a few hundredths from guessing, or worse: nothing to train longer for
            print(f"note: the validation loss ({best:.4f}) is no better than chance ({chance:.4f}, every token alike): "
                  "nothing has been learned (random weights, a learning rate far off, or far too few steps)")
        elif len(self.history) >= 2 and round(last, 4) < round(self.history[-2][1], 4):
            print(f"note: the validation loss was still falling at the end ({self.history[-2][1]:.4f} at step "
                  f"{self.history[-2][0]}, {last:.4f} at step {last_step}): more --steps may help")
