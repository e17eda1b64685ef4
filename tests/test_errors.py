"""
Nothing lost, nothing cryptic: every bad file, folder, argument or fault ends in one line that says
what is wrong, and the files of earlier work stay byte for byte as they were.
"""

import csv
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from machinery import cli
import mini_gpt2
import prefix
from machinery import learned_file
from methods import prompt
import train
import translate
from mini_gpt2 import UserError, files
from machinery import run_folder
from machinery.run_folder import RUN_FILES
from tests.conftest import HANG, ROOT, fail_in_step, load_learned, make_checkpoint, one_line_error, run, train_args
from tests.http_server import Hub


def snapshot(folder):
    """Every file in a folder, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def finished_run(tiny_ckpt, csv_file, tmp_path_factory):
    """A finished 6-step run (checkpoint, log, prefix), copied by the tests that then damage it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval")) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def full_disk(monkeypatch, module, after=0):
    """Make files opened for writing by `module` fail with ENOSPC once `after` bytes went through."""
    real_open = open
    written = {"n": 0}

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, b):
            if written["n"] + len(b) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written["n"] += len(b)
            return self.f.write(b)

        def writable(self):
            return True

        def flush(self):
            self.f.flush()

        def fileno(self):
            return self.f.fileno()

        def close(self):
            super().close()  # flushes, so before the file it wraps is closed
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if any(c in mode for c in "wa") else f

    monkeypatch.setattr(module, "open", fake_open, raising=False)


# ----------------------------------------------------------------------------- 1. files read

@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "folder"])
def test_damaged_model_file_is_one_line(tiny_ckpt, csv_file, tmp_path, call, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt[0], folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.unlink()
    if damage == "folder":
        weights.mkdir()
    else:
        weights.write_bytes({"truncated": good[:len(good) // 2], "random": os.urandom(5000), "empty": b""}[damage])
    line = one_line_error(call(train.main, *train_args(folder, csv_file, tmp_path / "out")))
    problem = "is a folder, not a safetensors file" if damage == "folder" else "is not a readable safetensors file"
    assert f"{weights} {problem}" in line and "replace it with the file as released" in line


@pytest.mark.parametrize("text,problem", [("{not json", "not a valid config.json"), ("[1, 2]", "not a JSON object"),
                                          ('{"n_layer": "two"}', "wrong n_layer"), (b"\xff\xfe\x00", "not a valid")])
def test_broken_config_json_is_named(tiny_ckpt, csv_file, tmp_path, call, text, problem):
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt[0], folder)
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_line_error(call(train.main, *train_args(folder, csv_file, tmp_path / "out")))
    assert str(folder / "config.json") in line and problem in line


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "other pickle"])
def test_damaged_checkpoint_on_resume(run_copy, tiny_ckpt, csv_file, call, damage):
    ck = run_copy / "checkpoint.pt"
    good = ck.read_bytes()
    if damage == "other pickle":
        torch.save({"weights": torch.zeros(3)}, ck)
    else:
        ck.write_bytes({"truncated": good[:len(good) // 2], "empty": b"", "random": os.urandom(4000)}[damage])
    before = snapshot(run_copy)
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--resume", "--no-eval")))
    assert str(ck) in line and ("damaged" in line or "not a checkpoint" in line) and "--overwrite" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("part", ["prefixes", "optimizer"])
def test_a_checkpoint_whose_numbers_do_not_fit_is_one_line(run_copy, tiny_ckpt, csv_file, call, part):
    ck = run_copy / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    if part == "prefixes":
        state["prefixes"] = {k: v[..., :-1] for k, v in state["prefixes"].items()}  # one number short per row
    else:
        state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"] * 2
    torch.save(state, ck)
    before = snapshot(run_copy)
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--resume", "--no-eval", "--steps", 8))
    line = one_line_error(r)
    assert line.startswith(f"error: {ck} does not fit these settings (") and "start a new run with --overwrite" in line
    assert "resuming at step" not in r.stdout and snapshot(run_copy) == before


def test_a_resumed_run_says_where_it_resumes(run_copy, tiny_ckpt, csv_file, call):
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--resume", "--no-eval", "--steps", 8))
    assert r.returncode == 0 and "resuming at step 6 of 8" in r.stdout


def write_prefix(path, model_config, kv=None, **meta):
    kv = torch.zeros(2, 2, 2, 5, 3, 16) if kv is None else kv
    prefix.save(path, prefix.Prefixes(kv), model_config, **meta)
    return path


@pytest.fixture(scope="module")
def tiny_config(tiny_ckpt):
    return mini_gpt2.load.config_of(tiny_ckpt[0])


@pytest.mark.parametrize("damage,problem", [
    ("truncated", "not a readable safetensors file"), ("random", "not a readable safetensors file"),
    ("no metadata", "lacks the metadata"), ("wrong tensor name", "no tensor named 'prefixes'"),
    ("shape disagrees", "but its metadata says"), ("folder", "is a folder"), ("nan", "NaN or inf"),
    ("inf", "NaN or inf")])
def test_bad_prefix_file_is_refused_in_one_line(tiny_ckpt, tiny_config, tmp_path, call, damage, problem):
    path = tmp_path / "p.safetensors"
    good = write_prefix(tmp_path / "good.safetensors", tiny_config, model=str(tiny_ckpt[0])).read_bytes()
    meta = {"method": "prefix", "names": json.dumps(prefix.NAMES), "n_layer": "2", "n_head": "5", "n_embd": "80",
            "prefix_len": "3"}
    if damage == "truncated":
        path.write_bytes(good[:len(good) - 100])
    elif damage == "random":
        path.write_bytes(os.urandom(3000))
    elif damage == "no metadata":
        save_file({"prefixes": torch.zeros(2, 2, 2, 5, 3, 16)}, path)
    elif damage == "wrong tensor name":
        save_file({"prefix": torch.zeros(2, 2, 2, 5, 3, 16)}, path, metadata=meta)
    elif damage == "shape disagrees":
        save_file({"prefixes": torch.zeros(2, 2, 2, 5, 4, 16)}, path, metadata=meta)
    elif damage == "folder":
        path.mkdir()
    else:  # values that are not finite, written past prefix.save (which refuses them)
        save_file({"prefixes": torch.full((2, 2, 2, 5, 3, 16), float(damage))}, path, metadata=meta)
    line = one_line_error(call(translate.main, "--prefix", path, "--model", tiny_ckpt[0], "Bonjour"))
    assert str(path) in line and problem in line
    r = call(train.main, "--eval-only", "--prefix", path, "--model", tiny_ckpt[0], "--out", tmp_path / "o")
    assert problem in one_line_error(r)


def test_prefixes_that_are_not_finite_are_never_written(tmp_path, tiny_config):
    path = write_prefix(tmp_path / "p.safetensors", tiny_config)
    before = path.read_bytes()
    with pytest.raises(UserError, match="NaN or inf"):
        write_prefix(path, tiny_config, kv=torch.full((2, 2, 2, 5, 3, 16), float("nan")))
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("content,problem", [
    ("folder", "is a folder"), ("latin-1", "is not UTF-8 text"), ("", "header naming the columns en and fr"),
    ("binary", "is not UTF-8 text"), ("zip", "is a zip archive: unzip it")])
def test_bad_csv_is_one_line(tiny_ckpt, tmp_path, call, content, problem):
    path = tmp_path / "pairs.csv"
    if content == "folder":
        path.mkdir()
    elif content == "latin-1":
        path.write_bytes("en,fr\nSummer,Été\nCoffee,Café\n".encode("latin-1"))
    elif content == "binary":
        path.write_bytes(bytes(range(256)) * 20)
    elif content == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:  # the Kaggle download, not unzipped
            z.writestr("en-fr.csv", "en,fr\n" + "Hello,Bonjour\n" * 1000)
    else:
        path.write_text(content)
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], path, tmp_path / "out")))
    assert str(path) in line and problem in line


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "utf-8:strict"}, {"LC_ALL": "C", "LANG": "C"}])
def test_stdin_that_is_not_utf8_is_one_line(tiny_ckpt, tiny_config, tmp_path, env):
    """Also in the C locale, where Python would let the bad bytes through as escapes."""
    path = write_prefix(tmp_path / "p.safetensors", tiny_config, model=str(tiny_ckpt[0]))
    plain = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LC_ALL", "LANG", "PYTHONUTF8")}
    r = subprocess.run([sys.executable, str(ROOT / "translate.py"), "--prefix", str(path)], input="Été\n".encode("latin-1"),
                       capture_output=True, cwd=ROOT, env=plain | env, timeout=HANG)
    r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())
    assert "the text on stdin is not UTF-8" in one_line_error(r) and not r.stdout


# ----------------------------------------------------------------------------- 2. folders written

def test_os_problems_read_as_one_line():
    p = "/data/x.csv"
    assert files.os_problem(PermissionError(13, "Permission denied"), p, "reading") == f"permission denied while reading {p}"
    assert files.os_problem(OSError(errno.ENOSPC, "No space"), p, "writing").startswith(f"no space left on the device while writing {p}")
    assert files.os_problem(IsADirectoryError(21, "Is a directory"), p, "reading") == f"{p} is a folder, not a file"


def test_out_that_is_a_file_is_refused_before_anything_loads(csv_file, tmp_path, call):
    out = tmp_path / "out"
    out.write_text("not a folder")
    line = one_line_error(call(train.main, *train_args(tmp_path / "no-such-model", csv_file, out)))
    assert "--out" in line and str(out) in line  # the model (missing here) was not even looked at


def validation_losses(monkeypatch, losses):
    """Make the validation losses from here on come from `losses`, to decide when a new best prefix is written."""
    losses = iter(losses)
    monkeypatch.setattr(train, "validation_loss", lambda *a: next(losses))


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    out = tmp_path / "run"
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--steps", 2)).returncode == 0
    before = snapshot(out)
    validation_losses(monkeypatch, [99.0, 99.0])  # no better prefix: only the checkpoint is written
    full_disk(monkeypatch, files, after=2000)  # room for the log's rows, not for a checkpoint
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--resume", "--steps", 4))
    line = one_line_error(r)
    assert f"no space left on the device while writing {out / 'checkpoint.pt'}" in line
    assert f"{out / 'checkpoint.pt'} holds step 2" in line and "--resume" in line
    after = snapshot(out)
    assert [after[k] == before[k] for k in ("checkpoint.pt", "prefix.safetensors")] == [True, True]
    assert not list(out.glob("*.tmp"))


def test_full_disk_when_a_better_prefix_comes_keeps_the_previous_one(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    out = tmp_path / "run"
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--steps", 2)).returncode == 0
    before = snapshot(out)
    validation_losses(monkeypatch, [0.5, 0.4])  # better than any so far: prefix.safetensors is rewritten
    full_disk(monkeypatch, files, after=1000)  # room for the log's rows, not for the prefix file
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--resume", "--steps", 4))
    line = one_line_error(r)
    assert f"no space left on the device while writing {out / 'prefix.safetensors'}" in line
    assert f"{out / 'checkpoint.pt'} holds step 2" in line
    after = snapshot(out)
    assert [after[k] == before[k] for k in ("checkpoint.pt", "prefix.safetensors")] == [True, True]
    assert not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------- 3. the download cache

@pytest.fixture
def hub(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "ckpt", layout="hub")
    server = Hub()
    for name in ("model.safetensors", "config.json"):
        server.files[name] = (tmp_path / "ckpt" / name).read_bytes()
    server.small.add("config.json")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("MINI_GPT2_CACHE", str(tmp_path / "cache"))
    yield server
    server.close()


def test_a_cached_file_damaged_later_is_named(hub, tmp_path):
    mini_gpt2.from_pretrained("gpt2", device="cpu")
    cached = tmp_path / "cache" / "openai-community--gpt2" / "model.safetensors"
    record = json.loads(cached.with_name("model.safetensors.verified").read_text())
    assert record["size"] == len(hub.files["model.safetensors"]) and len(record["sha256"]) == 64
    with open(cached, "r+b") as f:
        f.truncate(record["size"] - 1000)
    n = len(hub.log)
    with pytest.raises(UserError, match=f"{cached} is {record['size'] - 1000} bytes, but {record['size']} were "
                                        "downloaded and verified.*delete it"):
        mini_gpt2.from_pretrained("gpt2", device="cpu")
    assert len(hub.log) == n  # the cache was checked, nothing was fetched


@pytest.mark.parametrize("damage", ["longer", "shorter"])
def test_a_cached_file_of_another_size_is_caught_either_way(hub, tmp_path, damage):
    mini_gpt2.from_pretrained("gpt2", device="cpu")
    cached = tmp_path / "cache" / "openai-community--gpt2" / "model.safetensors"
    size = cached.stat().st_size
    with open(cached, "r+b") as f:
        f.seek(0, os.SEEK_END) if damage == "longer" else f.truncate(size - 1)
        f.write(b"\0" if damage == "longer" else b"")
    with pytest.raises(UserError, match=f"{cached} is {size + 1 if damage == 'longer' else size - 1} bytes, but {size} "
                                        "were downloaded and verified"):
        mini_gpt2.from_pretrained("gpt2", device="cpu")


@pytest.mark.parametrize("record", ['{"size": "SIZE"}', '{"size": SIZE.0}', "not json"])
def test_a_verified_record_not_as_written_is_called_damaged(hub, tmp_path, record):
    mini_gpt2.from_pretrained("gpt2", device="cpu")
    cached = tmp_path / "cache" / "openai-community--gpt2" / "model.safetensors"
    verified = cached.with_name("model.safetensors.verified")
    verified.write_text(record.replace("SIZE", str(cached.stat().st_size)))
    with pytest.raises(UserError) as e:
        mini_gpt2.from_pretrained("gpt2", device="cpu")
    assert str(e.value) == (f"{verified} is damaged: delete it and {cached}, and run again to download the file anew")


def test_full_disk_while_downloading_leaves_no_finished_file(hub, tmp_path, monkeypatch):
    from mini_gpt2 import download

    full_disk(monkeypatch, download, after=100_000)
    with pytest.raises(UserError, match="no space left on the device while downloading to .*incomplete.*resumes"):
        mini_gpt2.from_pretrained("gpt2", device="cpu")
    folder = tmp_path / "cache" / "openai-community--gpt2"
    assert not (folder / "model.safetensors").exists()
    have = (folder / "model.safetensors.incomplete").stat().st_size
    monkeypatch.setattr(download, "open", open)
    mini_gpt2.from_pretrained("gpt2", device="cpu")  # resumes from the bytes that made it to disk
    assert [e[2] for e in hub.log if e[0] == "GET" and e[1].startswith("/cdn/model")][-1] == f"bytes={have}-"
    assert (folder / "model.safetensors").read_bytes() == hub.files["model.safetensors"]


def test_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("MINI_GPT2_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never reached
    with pytest.raises(UserError, match="a folder on its path is a file; set MINI_GPT2_CACHE to a folder you can write"):
        mini_gpt2.from_pretrained("gpt2", device="cpu")


# ----------------------------------------------------------------------------- 4. never destroy a run

def test_a_new_run_does_not_replace_an_old_one(run_copy, tiny_ckpt, csv_file, call):
    before = snapshot(run_copy)
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--no-eval")))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(run_copy) == before
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--no-eval", "--overwrite", "--seed", 1))
    assert r.returncode == 0, r.stderr
    assert snapshot(run_copy)["prefix.safetensors"] != before["prefix.safetensors"]


def test_overwrite_replaces_every_file_of_the_earlier_run_once_the_new_one_starts(tiny_ckpt, csv_file, tmp_path, call,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    validation_losses(monkeypatch, [5.0, 4.0, 1.0, 3.0])  # steps 0, 2, 4, 6: the best is not the last
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, out)).returncode == 0
    others = ("prompt.safetensors", "prompt-last.safetensors", "lora.safetensors", "lora-last.safetensors", "model",
              "model-last")  # the other methods' own
    assert [name for name in RUN_FILES if not (out / name).exists() and name not in others] == []  # every file it writes
    before = snapshot(out)
    for cannot_start in (["--model", tmp_path / "no-such-model"], ["--data", tmp_path / "no-such.csv"]):
        line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--overwrite", *cannot_start)))
        assert "no-such" in line and snapshot(out) == before  # a new run that cannot start replaces nothing
    validation_losses(monkeypatch, [5.0, 4.0])  # steps 0 and 2: the last is the best
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--overwrite", "--no-eval", "--steps", 2))
    assert r.returncode == 0, r.stderr
    assert sorted(snapshot(out)) == ["checkpoint.pt", "log.csv", "loss.png", "prefix.safetensors", "split.json"]
    assert [r["step"] for r in csv.DictReader(open(out / "log.csv"))] == ["0", "1", "2"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError("a bug"), "nan"])
def test_overwrite_gives_the_earlier_run_back_if_the_new_one_stops_before_its_first_checkpoint(run_copy, tiny_ckpt,
                                                                                               csv_file, call,
                                                                                               monkeypatch, stop):
    before = snapshot(run_copy)
    fail_in_step(monkeypatch, 1, stop)  # the first step: nothing of the new run to show
    args = train_args(tiny_ckpt[0], csv_file, run_copy, "--overwrite", "--no-eval", "--seed", 1)
    if isinstance(stop, RuntimeError):
        with pytest.raises(RuntimeError):  # a bug keeps its traceback
            train.main(args)
    else:
        r = call(train.main, *args)
        assert r.returncode == (130 if stop is KeyboardInterrupt else 1), r.stderr
        assert f"nothing was saved; the earlier run's files are back in {run_copy}" in r.stderr, r.stderr
    assert snapshot(run_copy) == before and not (run_copy / ".earlier-run").exists()


def test_overwrite_lets_the_earlier_run_go_once_the_new_one_has_a_checkpoint(run_copy, tiny_ckpt, csv_file, call,
                                                                            monkeypatch):
    before = snapshot(run_copy)
    fail_in_step(monkeypatch, 3, KeyboardInterrupt)  # steps 1 and 2 done, no checkpoint yet (--save-every 100)
    args = train_args(tiny_ckpt[0], csv_file, run_copy, "--overwrite", "--no-eval", "--seed", 1, "--save-every", 100)
    r = call(train.main, *args)
    assert r.returncode == 130 and f"{run_copy / 'checkpoint.pt'} holds step 2" in r.stderr, r.stderr
    assert torch.load(run_copy / "checkpoint.pt", weights_only=True)["step"] == 2 and not (run_copy / ".earlier-run").exists()
    assert snapshot(run_copy)["checkpoint.pt"] != before["checkpoint.pt"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError(errno.EXDEV, "Invalid cross-device link")])
def test_a_stop_while_the_earlier_run_is_set_aside_leaves_every_file_where_it_was(run_copy, tiny_ckpt, csv_file, call,
                                                                                 monkeypatch, stop):
    from machinery import run_folder

    before, real, moves = snapshot(run_copy), os.replace, []

    def replace(src, dst):  # the second file's move is where the stop (or the failure) comes
        moves.append(src)
        if len(moves) == 2:
            raise stop
        return real(src, dst)

    monkeypatch.setattr(run_folder.os, "replace", replace)
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--overwrite", "--no-eval", "--seed", 1))
    assert r.returncode == (130 if stop is KeyboardInterrupt else 1), r.stderr
    assert snapshot(run_copy) == before and not (run_copy / ".earlier-run").exists()


def test_a_discarded_earlier_run_left_by_a_stop_is_no_obstacle(run_copy, tiny_ckpt, csv_file, call):
    """A stop while the earlier run was being deleted leaves it renamed: nobody's files, deleted by the next run."""
    (run_copy / ".earlier-run-discarded").mkdir()
    (run_copy / ".earlier-run-discarded" / "log.csv").write_text("step\n")
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--resume", "--no-eval", "--steps", 8))
    assert r.returncode == 0, r.stderr
    assert not (run_copy / ".earlier-run-discarded").exists()


def test_ctrl_c_after_the_last_step_says_what_is_kept(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    from machinery import run_folder

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.Run, "_finish", interrupted)
    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval"))
    assert r.returncode == 130
    assert f"interrupted at step 6; {out / 'checkpoint.pt'} holds step 6: continue with the same command and --resume" \
        in r.stderr, r.stderr
    monkeypatch.undo()
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--resume"))  # the advice works
    assert r.returncode == 0 and "the last and the best" in r.stdout, r.stderr


def test_an_earlier_run_left_aside_is_named_not_lost(run_copy, tiny_ckpt, csv_file, call):
    """A run killed (-9) before its first checkpoint leaves the earlier run aside: the next run names where it is."""
    (run_copy / ".earlier-run").mkdir()
    shutil.move(run_copy / "checkpoint.pt", run_copy / ".earlier-run" / "checkpoint.pt")
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--resume", "--no-eval")))
    assert f"{run_copy / '.earlier-run'} holds the files of a run that --overwrite had moved aside" in line
    assert (run_copy / ".earlier-run" / "checkpoint.pt").exists()


def test_a_folder_left_by_a_run_that_saved_no_checkpoint_is_not_offered_to_resume(tiny_ckpt, csv_file, tmp_path,
                                                                                 call, monkeypatch):
    out = tmp_path / "run"
    fail_in_step(monkeypatch, 1, RuntimeError("a bug"))
    with pytest.raises(RuntimeError):
        train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval"))
    monkeypatch.undo()
    assert (out / "split.json").exists() and not (out / "checkpoint.pt").exists()
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval")))
    assert "holds the files of a run that saved no checkpoint" in line and "--overwrite" in line and "--resume" not in line
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--resume")))
    assert "no checkpoint" in line and "--overwrite" in line
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--overwrite")).returncode == 0


def test_resume_refuses_data_that_changed_under_the_run(tiny_ckpt, csv_file, tmp_path, call):
    data_file, out = tmp_path / "pairs.csv", tmp_path / "run"
    shutil.copy(csv_file, data_file)
    assert call(train.main, *train_args(tiny_ckpt[0], data_file, out, "--no-eval", "--steps", 2)).returncode == 0
    before = snapshot(out)
    lines = data_file.read_text().splitlines(keepends=True)
    for edited in (lines[:1] + lines[2:3] + lines[1:2] + lines[3:],  # two rows swapped
                   lines[:5] + ["The sea is green.,La mer est verte.\n"] + lines[6:]):  # a row edited
        data_file.write_text("".join(edited))
        line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], data_file, out, "--no-eval", "--resume",
                                                           "--steps", 4)))
        assert "--resume: the data changed since" in line and str(data_file) in line
        assert snapshot(out) == before


def test_ctrl_c_in_the_last_validation_stops_there_and_resume_finishes_the_run(tiny_ckpt, csv_file, tmp_path, call,
                                                                               monkeypatch):
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, straight, "--no-eval")).returncode == 0
    real, calls = train.validation_loss, {"n": 0}

    def validation_loss(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # steps 0, 2, 4, then the last one, 6
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "validation_loss", validation_loss)
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out))
    assert r.returncode == 130, r.stderr
    assert f"interrupted at step 6; {out / 'checkpoint.pt'} holds step 6: continue with the same command and --resume" \
        in r.stderr
    assert "prefixes:" not in r.stdout and not (out / "results.json").exists()  # no report, no comparison
    monkeypatch.undo()
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--resume", "--no-eval"))
    assert r.returncode == 0, r.stderr
    for name in ("prefix.safetensors", "prefix-last.safetensors"):  # as if never stopped
        assert (out / name).exists() == (straight / name).exists()
        if (out / name).exists():
            (a, _, meta_a), (b, _, meta_b) = load_learned(out / name), load_learned(straight / name)
            speed = lambda meta: {k: v for k, v in meta.items() if k != "tokens_per_s"}  # noqa: E731  (a timing)
            assert torch.equal(a, b) and speed(meta_a) == speed(meta_b)
    val = [[(row["step"], row["val_loss"]) for row in csv.DictReader(open(d / "log.csv")) if row["val_loss"]]
           for d in (straight, out)]
    assert val[0] == val[1] and val[0][-1][0] == "6"
    assert [row["step"] for row in csv.DictReader(open(out / "log.csv"))] == [str(k) for k in range(7)]  # a row a step


def test_a_signal_in_a_validation_then_resume_leaves_one_row_a_step(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    """SIGHUP while step 2 is validated: the step is saved without its validation; --resume validates it in its own row."""
    out, real, calls = tmp_path / "run", train.validation_loss, {"n": 0}

    def validation_loss(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # steps 0, then 2
            stop_signal("SIGHUP")
        return real(*args)

    monkeypatch.setattr(train, "validation_loss", validation_loss)
    args = train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--save-every", 100, "--eval-every", 2)
    r = call(train.main, *args)
    assert r.returncode == 129 and f"hung up at step 2; {out / 'checkpoint.pt'} holds step 2" in r.stderr, r.stderr
    monkeypatch.undo()
    assert call(train.main, *args, "--resume").returncode == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [row["step"] for row in rows] == [str(k) for k in range(7)]
    assert all(row["val_loss"] for row in rows if row["step"] in ("0", "2", "4", "6")) and rows[2]["loss"]


def test_a_second_ctrl_c_while_the_checkpoint_is_written_waits_for_it(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    """Ctrl-C, then another while the checkpoint is being written (and SIGTERM): no traceback, a whole checkpoint, one line."""
    real = files.write_bytes

    def write_bytes(path, data):
        if path.name == "checkpoint.pt":
            os.kill(os.getpid(), signal.SIGINT)  # delivered here and now: Python runs the handler at once
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, data)

    monkeypatch.setattr(run_folder, "write_bytes", write_bytes)
    fail_in_step(monkeypatch, 3, KeyboardInterrupt)
    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--save-every", 100))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        f"interrupted at step 2; {out / 'checkpoint.pt'} holds step 2: continue with the same command and --resume"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_sigterm_saves_the_last_step_and_says_so(tiny_ckpt, csv_file, tmp_path):
    """A real SIGTERM (kill, docker stop, a cluster's preemption) mid-run, sent once step 1 is logged."""
    out = tmp_path / "run"
    args = train_args(tiny_ckpt[0], csv_file, out, "--steps", 100000, "--save-every", 100000, "--no-eval")
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})

    def logged():
        return [row["step"] for row in csv.DictReader(open(out / "log.csv"))] if (out / "log.csv").exists() else []

    try:
        while "1" not in logged() and p.poll() is None:
            time.sleep(0.05)  # waits for the run to be under way; what is checked does not depend on how long
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=HANG)
    finally:
        p.kill()
    r = subprocess.CompletedProcess(args, p.returncode, "", err)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] >= 1
    assert r.returncode == 143 and f"terminated at step {state['step']}; {out / 'checkpoint.pt'} holds step " \
        f"{state['step']}: continue with the same command and --resume" in err and "Traceback" not in err, err
    assert logged()[-1] == str(state["step"])


def stop_signal(name):
    """What the signal does once cli.run has installed its handler, raised here and now (no race with a real signal)."""
    signum = getattr(signal, name)
    signal.getsignal(signum)(signum, None)


def test_sighup_is_handled_as_ctrl_c(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    fail_in_step(monkeypatch, 3, lambda: stop_signal("SIGHUP"))
    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--save-every", 100))
    assert r.returncode == 129 and f"hung up at step 2; {out / 'checkpoint.pt'} holds step 2" in r.stderr, r.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_sigterm_in_the_comparison_says_the_training_is_kept(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    monkeypatch.setattr(train.comparison, "evaluate", lambda *a, **k: stop_signal("SIGTERM"))
    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out))
    assert r.returncode == 143 and f"terminated in the evaluation; the training is complete and saved in {out}" in r.stderr
    r = call(train.main, "--eval-only", "--out", out, "--eval-size", 1)
    # outside training too: one line that says what was kept, and the shell's status
    assert r.returncode == 143 and r.stderr.strip() == "terminated; nothing was saved"


def test_two_runs_in_one_folder_do_not_both_proceed(tiny_ckpt, csv_file, tmp_path):
    out = tmp_path / "run"
    args = train.parse_args(train_args(tiny_ckpt[0], csv_file, out))
    with train.Run(out, vars(args)):  # this process holds --out, as a running training would
        line = one_line_error(run("train.py", *train_args(tiny_ckpt[0], csv_file, out, "--no-eval")))
        assert f"another run (process {os.getpid()}) is using {out}" in line
    assert not (out / "checkpoint.pt").exists()


def test_a_crashed_runs_lock_file_does_not_block(tiny_ckpt, csv_file, tmp_path, call):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("999999")  # left by a process that is gone
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--steps", 1))
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- 5. recovery advice is true

def test_ctrl_c_before_the_first_step_claims_no_checkpoint(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    fail_in_step(monkeypatch, 1, KeyboardInterrupt)
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, tmp_path / "run"))
    assert r.returncode == 130
    assert "interrupted at step 0; no step was completed, so nothing was saved" in r.stderr
    assert "saved" not in r.stderr.replace("nothing was saved", "") and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_crash_in_the_first_step_claims_no_checkpoint(tiny_ckpt, csv_file, tmp_path, capsys, monkeypatch):
    fail_in_step(monkeypatch, 1, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "run"))
    assert "stopped by an error at step 0; no step was completed, so nothing was saved" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_ctrl_c_in_the_evaluation_says_the_training_is_kept(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.comparison, "evaluate", interrupted)
    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out))
    assert r.returncode == 130
    assert f"interrupted in the evaluation; the training is complete and saved in {out}" in r.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6 and (out / "prefix.safetensors").exists()
    monkeypatch.undo()
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--eval-only"))  # the advice works
    assert r.returncode == 0, r.stderr
    assert (out / "results.json").exists()


def test_prefixes_that_became_nan_are_never_checkpointed(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):  # step 3 leaves NaN in the prefixes, its loss still finite
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--save-every", 1)))
    assert "the prefixes hold NaN or inf values at step 3" in line and f"{out / 'checkpoint.pt'} holds step 2" in line
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["prefixes"].values())
    assert int(load_learned(out / "prefix.safetensors")[2]["step"]) <= 2


def test_nan_in_the_first_step_advice_works(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    out = tmp_path / "run"
    fail_in_step(monkeypatch, 1, "nan")
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval")))
    assert "loss became nan at step 1" in line and "nothing was saved: run again with a lower --lr and --overwrite" in line
    assert not (out / "checkpoint.pt").exists()
    monkeypatch.undo()
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--lr", 0.01, "--overwrite"))
    assert r.returncode == 0, r.stderr


def test_after_a_nan_resume_takes_a_lower_lr(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    out = tmp_path / "run"
    fail_in_step(monkeypatch, 5, "nan")
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval")))
    assert "last good checkpoint (step 4)" in line and "--resume with a lower --lr" in line
    monkeypatch.undo()
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--resume", "--lr", 0.01))
    assert r.returncode == 0, r.stderr
    assert "note: resuming with --lr 0.01 (the run so far used 0.05)" in r.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["lr"] == 0.01

    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--resume", "--batch-size", 2)))
    assert "other settings (--batch-size 4)" in line  # the data order would change: refused
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--resume", "--max-batch-tokens", 20))
    assert r.returncode == 0 and "note: resuming with --max-batch-tokens 20 (the run so far used 3072)" in r.stdout


def test_resume_accepts_the_same_paths_written_differently(run_copy, tiny_ckpt, csv_file, call, monkeypatch):
    monkeypatch.chdir(tiny_ckpt[0].parent)
    relative_model = f"{tiny_ckpt[0].name}/"  # relative, with a trailing slash
    r = call(train.main, *train_args(relative_model, csv_file, str(run_copy) + "/", "--no-eval", "--resume",
                                     "--steps", 7))
    assert r.returncode == 0, r.stderr
    assert "note: resuming with --steps 7 (the run so far used 6)" in r.stdout


def test_log_on_resume_keeps_exactly_the_rows_up_to_the_checkpoint(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    out = tmp_path / "run"
    fail_in_step(monkeypatch, 4, KeyboardInterrupt)
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--save-every", 100)).returncode == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    # as if a crash had left rows past the checkpoint, the last one half-written (values no real
    # step of this run could log, so that keeping them could not pass for a coincidence)
    with open(out / "log.csv", "a") as f:
        f.write("4,99.9999,0.05,80,99999.9,\n5,11.0")
    monkeypatch.undo()
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--resume")).returncode == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[4]["loss"] != "99.9999"
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[-1] < 99999  # time goes on from the checkpoint's


def test_log_that_is_not_a_log_is_named_on_resume(run_copy, tiny_ckpt, csv_file, call):
    (run_copy / "log.csv").write_bytes(os.urandom(2000))
    before = snapshot(run_copy)
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, run_copy, "--no-eval", "--resume")))
    assert str(run_copy / "log.csv") in line and "move it away" in line
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------- 6. arguments up front

@pytest.mark.parametrize("args,problem", [
    (["--heldout", "-1"], "argument --heldout: -1 is not a whole number of at least 0"),
    (["--warmup", "-5"], "argument --warmup"), (["--lr", "0"], "argument --lr: 0 is not a positive finite number"),
    (["--lr", "nan"], "argument --lr"), (["--lr", "inf"], "argument --lr"), (["--lr", "-1e-3"], "argument --lr"),
    (["--steps", "0"], "argument --steps"), (["--device", "cuda:1"], "argument --device: cuda:1"),
    (["--device", "mps"], "argument --device: mps"), (["--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["--heldout", "0"], "--heldout 0 leaves nothing to evaluate"), (["--resume", "--overwrite"], "give one of them"),
    (["--eval-only", "--overwrite"], "--resume and --overwrite do not apply"), (["--prefix", "p.safetensors"], "--eval-only"),
    (["--method", "prompt", "--reparam"], "does not apply to --method prompt"),
    (["--lr", "1e38"], "--lr 1e+38: AdamW moves every number by about the rate per step"),
    (["--seed", "99999999999999999999999"], "argument --seed: 99999999999999999999999 is not a whole number that fits"),
    (["--seed", "-9223372036854775809"], "argument --seed")])
def test_train_arguments_are_checked_first(call, tmp_path, args, problem):
    r = call(train.main, "--model", tmp_path / "not-loaded", "--out", tmp_path / "o", *args)
    assert problem in one_line_error(r, status=2)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,problem", [
    (["--temperature", "nan"], "argument --temperature"), (["--temperature", "-1"], "argument --temperature"),
    (["--top-k", "5"], "--top-k has no effect with greedy decoding"), (["--device", "cuda:1"], "argument --device"),
    (["--device", "mps"], "argument --device"), (["--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["--seed", "99999999999999999999999"], "argument --seed")])
def test_translate_arguments_are_checked_first(call, tmp_path, args, problem):
    r = call(translate.main, "--prefix", tmp_path / "not-read.safetensors", *args, "Bonjour")
    assert problem in one_line_error(r, status=2)


def test_a_prefix_length_that_does_not_fit_says_so(tiny_ckpt, csv_file, tmp_path, call):
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, tmp_path / "o", "--prefix-len", 2000)))
    assert "--prefix-len 2000: too long a prefix length for this model's 1024 positions" in line
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, tmp_path / "o", "--method", "prompt",
                                                       "--prefix-len", 500)))
    assert "--prefix-len 500: too long a prefix length for this model's 1024 positions (the two prompts take 1000 " \
           "positions, plus --max-len 128)" in line


def test_a_prefix_for_another_model_is_refused_before_the_model_loads(finished_run, csv_file, tmp_path, call):
    other = tmp_path / "other"
    make_checkpoint(other, n_layer=3)
    (other / "model.safetensors").write_bytes(b"never read")  # only its config.json may be looked at
    want = "but this model has 3 layers"
    line = one_line_error(call(translate.main, "--prefix", finished_run / "prefix.safetensors", "--model", other, "Bonjour"))
    assert str(finished_run / "prefix.safetensors") in line and want in line
    line = one_line_error(call(train.main, *train_args(other, csv_file, tmp_path / "eval", "--eval-only", "--prefix",
                                                         finished_run / "prefix.safetensors")))
    assert str(finished_run / "prefix.safetensors") in line and want in line


def test_a_max_len_that_does_not_fit_says_so(tiny_ckpt, csv_file, tmp_path, call):
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, tmp_path / "o", "--max-len", 2000)))
    assert "--max-len 2000: a sequence length of at most 1024 fits this model" in line


def test_the_widest_seeds_and_the_smallest_temperature_work(finished_run, call):
    prefix_file = finished_run / "prefix.safetensors"
    greedy = call(translate.main, "--prefix", prefix_file, "--max-new-tokens", 4, "Bonjour", "Merci beaucoup")
    for seed in ("18446744073709551615", "-9223372036854775808"):
        r = call(translate.main, "--prefix", prefix_file, "--max-new-tokens", 4, "--temperature", "1e-320", "--seed", seed,
                 "Bonjour", "Merci beaucoup")
        assert r.returncode == 0 and r.stdout == greedy.stdout, r.stderr  # a temperature that small is greedy


def test_a_few_shot_prompt_longer_than_the_model_is_refused_before_it_loads(tiny_ckpt, tiny_config, tmp_path, call):
    path = tmp_path / "long.csv"
    words = "the committee will meet again next week to review the report of the".split()
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("en", "fr")] + [(f"{i} " + " ".join(words * 2), f"{i} " + " ".join(words[::-1] * 2))
                                                  for i in range(100)])
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt[0], folder)
    (folder / "model.safetensors").write_bytes(b"never read")  # refused before the weights load
    pfile = write_prefix(tmp_path / "p.safetensors", tiny_config, model=str(folder), data=str(path))
    line = one_line_error(call(train.main, "--eval-only", "--prefix", pfile, "--shots", 40, "--out", tmp_path / "o"))
    assert line.startswith("error: --shots 40: the examples take") and "lower --shots" in line
    line = one_line_error(call(train.main, *train_args(folder, path, tmp_path / "t", "--shots", 40)))
    assert line.startswith("error: --shots 40: the examples take")  # a training run finds out before it trains


def test_what_was_cut_to_fit_is_said_and_recorded(tiny_ckpt, csv_file, tmp_path, call):
    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--val-size", 50, "--warmup", 10))
    assert r.returncode == 0, r.stderr
    assert "note: --heldout 4 is more than a tenth of the 36 pairs: 3 are used" in r.stdout
    assert "note: --val-size 50 is more than a tenth of the 36 pairs: 3 are used" in r.stdout
    assert "note: --warmup 10 is longer than --steps 6: the learning rate rises to 0.03 at the last step and never " \
           "reaches the peak 0.05" in r.stdout
    meta = load_learned(out / "prefix.safetensors")[2]
    assert (meta["heldout"], meta["heldout_pairs"], meta["val_size"], meta["val_pairs"]) == ("4", "3", "50", "3")
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert (settings["heldout"], settings["heldout_pairs"]) == (4, 3)


def test_duplicates_are_not_called_too_long(tiny_ckpt, tmp_path, call):
    path = tmp_path / "same.csv"
    path.write_text("en,fr\n" + "Thank you.,Merci.\n" * 30)
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], path, tmp_path / "o")))
    assert "(near-)duplicate of a held-out or validation pair" in line and "longer" not in line


# ----------------------------------------------------------------------------- 8. the CPU note

def test_eval_only_notes_only_the_model_it_loads(tiny_ckpt, tiny_config, csv_file, tmp_path, call):
    path = write_prefix(tmp_path / "p.safetensors", tiny_config, model=str(tiny_ckpt[0]))
    r = call(train.main, "--eval-only", "--prefix", path, "--data", csv_file, "--heldout", 4, "--eval-size", 1,
             "--device", "cpu", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "note:" not in r.stderr


def test_eval_only_names_the_learned_files_data_when_it_is_gone(tiny_config, tmp_path, call):
    gone = tmp_path / "moved-away.csv"
    path = write_prefix(tmp_path / "p.safetensors", tiny_config, data=str(gone))
    line = one_line_error(call(train.main, "--eval-only", "--learned", path, "--out", tmp_path / "o"))
    assert line == f"error: {gone}, the data the learned file was trained on, is not there: give it with --data"


def test_the_cpu_note(capsys):
    cli.note_if_slow("gpt2-xl", "cpu")
    cli.note_if_slow("gpt2", "cpu")
    cli.note_if_slow("gpt2-xl", "cuda:0")
    assert capsys.readouterr().err.count("note:") == 1


def never_read_model(tiny_ckpt, tmp_path):
    """A copy of the tiny checkpoint whose weights cannot be read: what is refused with it is refused before they load."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt[0], folder)
    (folder / "model.safetensors").write_bytes(b"never read")
    return folder


def test_prompts_that_leave_the_comparison_no_room_are_refused_before_the_model_loads(tiny_ckpt, csv_file, tmp_path, call):
    folder = never_read_model(tiny_ckpt, tmp_path)
    # 2 x 495 + --max-len 32 fit the 1024 positions for training; the longest held-out sentence and its translation do not
    line = one_line_error(call(train.main, *train_args(folder, csv_file, tmp_path / "o", "--method", "prompt",
                                                       "--prefix-len", 495, "--max-len", 32)))
    assert line.startswith("error: --prefix-len 495: the prompts take 990 positions") and "add --no-eval" in line


def test_a_prompt_file_that_leaves_the_comparison_no_room_is_refused_before_the_model_loads(tiny_ckpt, tiny_config,
                                                                                            csv_file, tmp_path, call):
    folder = never_read_model(tiny_ckpt, tmp_path)
    pfile = tmp_path / "prompt.safetensors"
    prompt.save(pfile, prefix.Prefixes(torch.zeros(2, 495, tiny_config.n_embd)), tiny_config, model=str(folder),
                data=str(csv_file))
    line = one_line_error(call(train.main, "--eval-only", "--prefix", pfile, "--max-len", 32, "--out", tmp_path / "o"))
    assert line.startswith(f"error: {pfile}: the prompts take 990 positions") and "leave this file out" in line


@pytest.mark.parametrize("method", ["lora", "finetune"])
def test_a_max_len_that_leaves_no_room_for_the_zero_shot_prompt_says_so(tiny_ckpt, csv_file, tmp_path, call, method):
    folder = never_read_model(tiny_ckpt, tmp_path)
    line = one_line_error(call(train.main, *train_args(folder, csv_file, tmp_path / "o", "--method", method,
                                                       "--max-len", 1020)))
    assert line.startswith("error: --max-len 1020: with the zero-shot prompt's") and "fits this model" in line


def test_translate_with_no_file_says_to_train_one_even_beside_a_fine_tuned_weights_file(tmp_path, call, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a model.safetensors of train.py's fine-tuning right here is not a --model given
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"), metadata={"method": "finetune"})
    line = one_line_error(call(translate.main, "Bonjour"))
    assert line == f"error: no prefix file at {translate.DEFAULT_PREFIX}: train one first with `python train.py` " \
        "(or point --learned at one)"


# ----------------------------------------------------------------------------- 6. nothing overwritten, nothing garbage

def test_a_comparison_never_replaces_another_ones_results(tiny_ckpt, csv_file, tiny_config, tmp_path, call):
    out = tmp_path / "run"
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, out)).returncode == 0  # a run and its comparison
    other = write_prefix(tmp_path / "other.safetensors", tiny_config, model=str(tiny_ckpt[0]))
    before = snapshot(out)
    line = one_line_error(call(train.main, "--eval-only", "--out", out, "--learned", other, "--eval-size", 2))
    assert f"{out} holds the results of another comparison" in line and "choose another --out" in line, line
    assert snapshot(out) == before
    r = call(train.main, "--eval-only", "--out", out, "--eval-size", 2)  # its own comparison again: allowed, and said
    assert r.returncode == 0 and f"note: {out} holds this comparison's results already; they are replaced" in r.stdout


def test_the_same_comparison_from_another_folder_is_the_same_and_unreadable_results_are_named(
        tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    out = tmp_path / "run"
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval")).returncode == 0
    monkeypatch.chdir(tmp_path)
    assert call(train.main, "--eval-only", "--out", "run", "--eval-size", 2).returncode == 0  # --out as a relative path
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = call(train.main, "--eval-only", "--out", out, "--eval-size", 2)
    assert r.returncode == 0 and f"note: {out} holds this comparison's results already" in r.stdout, r.stderr
    (out / "results.json").write_text('{"settings": {"fi')  # cut short
    line = one_line_error(call(train.main, "--eval-only", "--out", out, "--eval-size", 2))
    assert line == (f"error: {out / 'results.json'} is not a comparison's results that can be read: move it (and "
                    "results.md, bleu.png) away, or choose another --out")


def nan_model_folder(tiny_ckpt, folder):
    """A fine-tuned model folder as train.py writes one, but with a NaN in one weight (written past finetune.save)."""
    model = mini_gpt2.from_pretrained(tiny_ckpt[0], device="cpu")
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state["h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    meta = learned_file.describe("finetune", prefix.NAMES, model.config, model=str(tiny_ckpt[0]))
    mini_gpt2.save_pretrained(folder, state, model.config, meta)
    return folder


def test_a_fine_tuned_folder_with_nan_is_refused_in_one_line(tiny_ckpt, csv_file, tmp_path, call):
    folder = nan_model_folder(tiny_ckpt, tmp_path / "model")
    for r in (call(translate.main, "--model", folder, "Bonjour"),
              call(translate.main, "--learned", folder, "Bonjour"),
              call(train.main, "--eval-only", "--learned", folder, "--data", csv_file, "--out", tmp_path / "o",
                   "--eval-size", 2)):
        line = one_line_error(r)
        assert f"{folder / 'model.safetensors'} holds NaN or inf values (in transformer.h.1.mlp.c_fc.weight)" in line, line
        assert "the fine-tuning that wrote it went wrong: train again" in line
    assert not (tmp_path / "o" / "results.json").exists()


def test_a_damaged_model_folder_is_named_whatever_else_is_given(tiny_ckpt, tmp_path, call):
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt[0], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # cut short
    line = one_line_error(call(translate.main, "--model", folder, "Bonjour"))  # no --learned: not a missing prefix file
    assert f"{weights} is not a readable safetensors file" in line, line


@pytest.mark.parametrize("error", [ValueError("numpy.dtype size changed, may indicate binary incompatibility"),
                                   RuntimeError("font cache is broken"),
                                   ImportError("libgfortran.so.5: cannot open shared object file"),
                                   ModuleNotFoundError("No module named 'numpy._core'", name="numpy._core")])
def test_optional_packages_failing_in_any_way_are_a_note_before_the_work(tiny_ckpt, csv_file, tmp_path, call,
                                                                           monkeypatch, error):
    from machinery import cli

    real = cli.importlib.import_module

    def import_module(name, *a):
        if name.split(".")[0] in ("sacrebleu", "matplotlib"):
            raise error
        return real(name, *a)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    monkeypatch.setattr(cli, "_noted", set())
    out = tmp_path / "run"
    fail_in_step(monkeypatch, 1, KeyboardInterrupt)  # stopped before any step: the notes came before the work
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out))
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert r.returncode == 130 and len(notes) == 2, r.stderr
    assert all(f"is installed but fails to import ({type(error).__name__}: " in n for n in notes)
    monkeypatch.undo()
    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--overwrite"))  # and on to the end, without them
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "sacreBLEU and chrF++: not computed" in (out / "results.md").read_text()
    assert not (out / "loss.png").exists() and not (out / "bleu.png").exists()


def test_a_picture_that_fails_to_draw_is_a_note(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError("no fonts")))
    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out))
    assert r.returncode == 0 and "note: matplotlib failed to draw loss.png (OSError: no fonts)" in r.stderr, r.stderr
    assert (out / "results.md").exists() and not (out / "bleu.png").exists()


def test_messages_name_the_file_or_option_and_the_fix(tiny_ckpt, tiny_config, tmp_path, call):
    same = tmp_path / "same.csv"
    same.write_text("en,fr\n" + "The cat sleeps.,Le chat dort.\n" * 200)
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], same, tmp_path / "o")))
    assert line.startswith(f"error: {same}: no pair is left to train on") and "give more (and different) pairs" in line
    pfile = write_prefix(tmp_path / "p.safetensors", tiny_config, model=str(tiny_ckpt[0]))
    line = one_line_error(call(translate.main, "--learned", pfile, "--max-new-tokens", 1000000000, "Bonjour"))
    n = len(prefix.encode_sentence("Bonjour"))
    assert line == f"error: --max-new-tokens 1000000000: input 1 is {n} tokens, so at most {1024 - n} new tokens fit " \
                   "GPT-2's 1024 positions"


def test_a_stop_in_the_comparison_is_the_last_line(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    """Progress bars on: the comparison's bar is closed before the line that says what was kept."""
    import tqdm.std

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", tqdm.std.tqdm.__dict__["__init__"].func)  # bars on (conftest's off)
    monkeypatch.setenv("TQDM_DISABLE", "")
    real = train.comparison.translate_all

    def translate_all(*args):  # a sentence done, then Ctrl-C
        args[-1].update(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.comparison, "translate_all", translate_all)
    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out))
    shown = [line for line in re.split(r"[\r\n]", r.stderr) if line.strip()]
    assert r.returncode == 130 and shown[-1].startswith("interrupted in the evaluation"), shown[-3:]
    assert real  # (the real one, put back by monkeypatch)


def test_under_torchrun_the_comparisons_bar_counts_each_sentence_once(monkeypatch):
    """Process 0's bar, 2 processes, 5 batches of 4 sentences and 2: 18 sentences, counted as 18."""
    from machinery import dist

    counted = []

    class Bar:
        def update(self, n):
            counted.append(n)

    monkeypatch.setattr(dist, "world", 2)
    monkeypatch.setattr(dist, "together", lambda fn: fn())
    monkeypatch.setattr(dist, "gather", lambda items: [items])
    texts = [f"phrase {i}" for i in range(18)]
    train.comparison.translate_all(lambda texts, *a, **k: texts, texts, "fr", "en", list(range(18)), 4, Bar())
    assert sum(counted) == 18 and len(counted) == 3  # process 0 decodes batches 0, 2 and 4 of the 5
