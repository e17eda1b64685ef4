"""
Data-parallel training under torchrun (dist.py), two processes on the CPU with gloo: a step is the
single process's step on the same global batch, process 0 alone writes, a run resumes with
another number of processes, a fault in one process ends both in one line, and the comparison
is shared and the same.
"""

import csv
import json
import subprocess

import pytest
import torch

import train
from tests.conftest import fail_in_step, load_learned, one_line_error, train_args
from tests.ranks import processes


def args_for(tiny_ckpt, csv_file, out, *extra):
    return train_args(tiny_ckpt[0], csv_file, out, "--steps", 4, "--batch-size", 8, "--eval-every", 2, "--heldout", 8,
                      "--eval-size", 3, "--eval-batch-size", 1, "--device", "cpu", *extra)  # 3 batches to share


@pytest.fixture
def one_thread():
    """As each of the processes runs (torchrun's default): the same arithmetic, to the last bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one(tiny_ckpt, csv_file, tmp_path_factory):
    """The single-process run the others must equal."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert train.main(args_for(tiny_ckpt, csv_file, out, "--no-eval")) == 0
    return out


def same_run(a, b):
    """Two runs' prefix files and logs (seconds aside) agree, to float32 tolerance."""
    for name in ("prefix.safetensors", "prefix-last.safetensors"):
        assert (a / name).exists() == (b / name).exists()
        if (a / name).exists():
            (x, _, ma), (y, _, mb) = load_learned(a / name), load_learned(b / name)
            assert torch.allclose(x, y, atol=1e-5) and ma["step"] == mb["step"]
    logs = [[r for r in csv.DictReader(open(d / "log.csv"))] for d in (a, b)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
    for r, s in zip(*logs):
        for k in ("loss", "val_loss"):
            assert (r[k] == s[k] == "") or float(r[k]) == pytest.approx(float(s[k]), abs=2e-4)


def test_two_processes_train_as_one(one, tiny_ckpt, csv_file, tmp_path):
    out = tmp_path / "run"
    (code0, out0, err0), (code1, out1, err1) = processes(args_for(tiny_ckpt, csv_file, out, "--no-eval"), tmp_path / "r")
    assert (code0, code1) == (0, 0), (err0, err1)
    same_run(one, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())  # nothing more
    assert "prefixes:" in out0 and out1 == "" and err1 == ""  # process 0 speaks for both


def test_a_clipped_step_under_torchrun_is_the_one_process_step(tiny_ckpt, csv_file, tmp_path, monkeypatch, one_thread):
    """Gradients a million times too large: summed over the processes first, then clipped, as one process clips its own."""
    real = train.target_loss
    monkeypatch.setattr(train, "target_loss", lambda *a: real(*a) * 1e6)
    alone = tmp_path / "alone"
    assert train.main(args_for(tiny_ckpt, csv_file, alone, "--no-eval")) == 0
    monkeypatch.undo()
    out = tmp_path / "run"
    (code0, _, err0), (code1, _, err1) = processes(args_for(tiny_ckpt, csv_file, out, "--no-eval"), tmp_path / "r",
                                                   fault=("all", None, "huge gradients"))
    assert (code0, code1) == (0, 0), (err0, err1)
    for name in ("prefix.safetensors", "prefix-last.safetensors"):  # what was learned: the same steps
        if (alone / name).exists():
            (x, _, ma), (y, _, mb) = load_learned(alone / name), load_learned(out / name)
            assert torch.allclose(x, y, atol=1e-5) and ma["step"] == mb["step"]
    losses = [[float(r["loss"]) for r in csv.DictReader(open(d / "log.csv")) if r["loss"]] for d in (alone, out)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # a million times the usual loss, to float32 rounding


def test_two_processes_compare_as_one(one, csv_file, tmp_path, call, one_thread):
    """The same file, evaluated by one process and by two: the same table, every translation the same."""
    args = ["--eval-only", "--prefix", one / "prefix.safetensors", "--eval-size", 3, "--eval-batch-size", 1]
    assert call(train.main, *args, "--out", tmp_path / "one").returncode == 0
    (code0, out0, err0), (code1, _, _) = processes(args + ["--out", tmp_path / "two"], tmp_path / "r")
    assert (code0, code1) == (0, 0), err0
    # 3 rows (0-shot, 3-shot, the prefix) x 2 directions x 3 batches of one: process 0 decodes 2 of each 3, process 1 one
    assert [int((tmp_path / "r" / f"rank{r}.decodes").read_text()) for r in (0, 1)] == [12, 6]
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert results[0]["translations"] == results[1]["translations"] and results[0]["scores"] == results[1]["scores"]
    assert "| 3-shot | both |" in out0


def test_a_run_resumes_with_another_number_of_processes(one, tiny_ckpt, csv_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fail_in_step(monkeypatch, 3, KeyboardInterrupt)  # one process, stopped after 2 steps...
    assert train.main(args_for(tiny_ckpt, csv_file, out, "--save-every", 1, "--no-eval")) == 130
    monkeypatch.undo()
    (code0, _, err0), (code1, _, _) = processes(args_for(tiny_ckpt, csv_file, out, "--save-every", 1, "--resume",
                                                         "--no-eval"), tmp_path / "ranks")  # ...two to go on
    assert (code0, code1) == (0, 0), err0
    same_run(one, out)


def test_a_fault_in_one_process_ends_both_in_one_line_with_the_last_step_kept(tiny_ckpt, csv_file, tmp_path):
    out = tmp_path / "run"
    fault = (1, 3, torch.OutOfMemoryError("CUDA out of memory"))  # process 1's third step
    (code0, _, err0), (code1, _, err1) = processes(args_for(tiny_ckpt, csv_file, out, "--save-every", 1), tmp_path / "r",
                                                   fault=fault)
    line = one_line_error(subprocess.CompletedProcess([], code0, "", err0))
    assert line.startswith("error: process 1: out of GPU memory in a forward pass of") and f"{out / 'checkpoint.pt'} holds step 2" in line
    assert code1 == 1 and err1 == ""
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("what,step", [("checkpoint", 2), ("best", 0)])
def test_a_file_process_0_cannot_write_ends_both_before_the_next_step(tiny_ckpt, csv_file, tmp_path, what, step):
    out, ranks = tmp_path / "run", tmp_path / "r"
    (code0, _, err0), (code1, _, err1) = processes(args_for(tiny_ckpt, csv_file, out, "--save-every", 1), ranks,
                                                   fault=(0, step, what))
    line = one_line_error(subprocess.CompletedProcess([], code0, "", err0))
    assert line.startswith(f"error: no space left on device for its {what}"), line
    assert code1 == 1 and err1 == ""
    assert [int((ranks / f"rank{r}.passes").read_text()) for r in (0, 1)] == [step, step]  # process 1 waited, went no further


def test_ctrl_c_in_process_0_ends_both_without_a_hang(tiny_ckpt, csv_file, tmp_path):
    out = tmp_path / "run"
    (code0, _, err0), (code1, _, err1) = processes(args_for(tiny_ckpt, csv_file, out, "--save-every", 100),
                                                   tmp_path / "r", fault=(0, 3, KeyboardInterrupt()))
    assert code0 == 130 and err0.strip() == f"interrupted at step 2; {out / 'checkpoint.pt'} holds step 2: continue " \
        "with the same command and --resume", err0
    assert code1 != 0 and err1 == ""  # it was left waiting for process 0, which ended: so did it, quietly
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_the_others_wait_for_process_0s_files_before_the_comparison(tiny_ckpt, csv_file, tmp_path, monkeypatch):
    """
    The comparison reads the files process 0 writes: the best one at a validation, the last one and
    the notes at the end (Run.finish), which every process passes together, before it goes on.
    """
    from machinery import dist
    from machinery import run_folder

    inside, seen = [], []
    real_together, real_finish = dist.together, run_folder.Run._finish

    def together(fn):
        inside.append(True)
        try:
            return real_together(fn)
        finally:
            inside.pop()

    monkeypatch.setattr(dist, "together", together)
    monkeypatch.setattr(run_folder.Run, "_finish", lambda self, *a: seen.append(bool(inside)) or real_finish(self, *a))
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "run", "--steps", 2, "--no-eval")) == 0
    assert seen == [True]


def test_a_process_gone_without_a_word_is_one_line(call):
    from machinery import dist

    def main(argv):
        raise dist.PeerGone("Connection closed by peer [127.0.0.1]:4242")

    line = one_line_error(call(main))
    assert line == "error: another process ended (Connection closed by peer [127.0.0.1]:4242)"
