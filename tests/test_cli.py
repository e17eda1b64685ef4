"""train.py and translate.py as a user runs them, on a tiny random checkpoint and a small CSV."""

import csv
import json

import pytest
import torch

from machinery import data
import prefix
import train
from mini_gpt2 import UserError
from tests.conftest import fail_in_step, load_learned, one_line_error, run, train_args

def test_train_then_translate(tiny_ckpt, csv_file, tmp_path):
    out = tmp_path / "run"
    r = run("train.py", *train_args(tiny_ckpt[0], csv_file, out))
    assert r.returncode == 0, r.stderr
    assert f"prefixes: {out / 'prefix.safetensors'}" in r.stdout
    assert "| 3-shot | both | 4 |" in r.stdout and (out / "results.json").exists()  # then the comparison
    held = json.loads((out / "split.json").read_text())["heldout"]
    pairs, lines, _ = data.read_pairs(csv_file)
    held_texts = {text for line in held for text in pairs[lines.index(line)]}
    translations = json.loads((out / "results.json").read_text())["translations"]
    assert all(row["source"] in held_texts for rows in translations.values() for row in rows)  # held out, not trained on
    kv, names, meta = load_learned(out / "prefix.safetensors")
    assert kv.shape == (2, 2, 2, 5, 3, 16) and meta["model"] == str(tiny_ckpt[0])
    log = list(csv.DictReader(open(out / "log.csv")))
    assert [int(row["step"]) for row in log] == [0, 1, 2, 3, 4, 5, 6]

    r = run("translate.py", "--prefix", out / "prefix.safetensors", "--max-new-tokens", 5,
            "Bonjour! Je m'appelle Sully.", "Hello there, my friend.")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2
    r = run("translate.py", "--prefix", out / "prefix.safetensors", "--max-new-tokens", 5, "--to", "fr",
            stdin="Good night.\n\nThe sea is blue.\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")[:-1]
    assert len(lines) == 3 and lines[1] == ""  # one line out per line in, blank for blank


def test_resume_reproduces_the_uninterrupted_run(tiny_ckpt, csv_file, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert train.main(train_args(tiny_ckpt[0], csv_file, straight, "--no-eval", "--eval-every", 1)) == 0

    interrupted = tmp_path / "interrupted"
    fail_in_step(monkeypatch, 4, KeyboardInterrupt)
    assert train.main(train_args(tiny_ckpt[0], csv_file, interrupted, "--no-eval", "--eval-every", 1)) == 130
    assert torch.load(interrupted / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    assert train.main(train_args(tiny_ckpt[0], csv_file, interrupted, "--resume", "--no-eval", "--eval-every", 1)) == 0

    for name in ("prefix.safetensors", "prefix-last.safetensors"):
        assert (straight / name).exists() == (interrupted / name).exists()
        if (straight / name).exists():
            a, _, meta_a = load_learned(straight / name)
            b, _, meta_b = load_learned(interrupted / name)
            assert torch.equal(a, b) and meta_a["step"] == meta_b["step"]
    logs = [list(csv.DictReader(open(d / "log.csv"))) for d in (straight, interrupted)]
    assert [int(row["step"]) for row in logs[1]] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["val_loss"] for r in logs[0]] == [r["val_loss"] for r in logs[1]]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_ckpt, csv_file, tmp_path, monkeypatch):
    fail_in_step(monkeypatch, 5, "nan")
    with pytest.raises(UserError, match=r"loss became nan at step 5.*last good checkpoint \(step 4\)"):
        train.main(train_args(tiny_ckpt[0], csv_file, tmp_path, "--no-eval"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4


def test_bad_inputs_give_one_line_errors(tiny_ckpt, csv_file, tmp_path):
    ckpt = tiny_ckpt[0]
    assert "train one first with `python train.py`" in one_line_error(run("translate.py", "--prefix", tmp_path / "none", "Bonjour"))
    assert "missing.csv does not exist" in one_line_error(run("train.py", *train_args(ckpt, tmp_path / "missing.csv", tmp_path / "o")))
    bad = tmp_path / "bad.csv"
    bad.write_text("english;french\nHello;Bonjour\n")
    assert "header naming the columns en and fr" in one_line_error(run("train.py", *train_args(ckpt, bad, tmp_path / "o")))
    assert "no checkpoint" in one_line_error(run("train.py", *train_args(ckpt, csv_file, tmp_path / "o", "--resume")))
    assert "neither a model size" in one_line_error(run("train.py", *train_args(tmp_path / "nomodel", csv_file, tmp_path / "o")))

    # a prefix for a 2-layer model, loaded into a 3-layer one; and an input longer than the context
    other = tmp_path / "other"
    from tests.conftest import make_checkpoint
    make_checkpoint(other, n_layer=3, n_head=4, n_embd=64)
    pfile = tmp_path / "p.safetensors"
    model_config = train.mini_gpt2.from_pretrained(ckpt, device="cpu").config
    prefix.save(pfile, prefix.Prefixes(torch.zeros(2, 2, 2, 5, 3, 16)), model_config, model=str(ckpt))
    assert "but this model has 3 layers" in one_line_error(run("translate.py", "--prefix", pfile, "--model", other, "Bonjour"))
    assert "input 2 is" in one_line_error(run("translate.py", "--prefix", pfile, "Bonjour", "mot " * 400))
    assert "nothing to translate" in one_line_error(run("translate.py", "--prefix", pfile, stdin=""))


def test_help():
    for script in ("train.py", "translate.py"):
        r = run(script, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.parametrize("text,lang", [("Bonjour! Je m'appelle Sully.", "fr"), ("Hello! My name is Sully.", "en"),
                                       ("Où est la gare ?", "fr"), ("Where is the station?", "en"),
                                       ("Cela est fait, en partie, pour répondre aux besoins des sénateurs.", "fr"),
                                       ("This is done, in part, to meet the needs of senators.", "en")])
def test_guess_language(text, lang):
    import translate
    assert translate.guess_language(text) == lang


def test_without_the_tokenizer_files_help_works_and_the_rest_is_one_line(tiny_ckpt, csv_file, tmp_path, monkeypatch):
    """No tokenizer files and no way to fetch them (an empty cache, a proxy that refuses): nothing breaks before it speaks."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    for proxy in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    for script in ("train.py", "translate.py"):
        r = run(script, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout and not r.stderr, r.stderr
    pfile = tmp_path / "p.safetensors"  # prefixes for the tiny model, written without the tokenizer
    prefix.save(pfile, prefix.Prefixes(torch.zeros(2, 2, 2, 5, 3, 16)), train.config_of(tiny_ckpt[0]), model=str(tiny_ckpt[0]))
    for r in (run("train.py", *train_args(tiny_ckpt[0], csv_file, tmp_path / "run")),
              run("translate.py", "--learned", pfile, "Bonjour")):
        line = one_line_error(r)
        assert "set TIKTOKEN_CACHE_DIR to a folder that holds them" in line, line
        assert "vocab.bpe as 6d1cbeee0f20b3d9449abfede4726ed8212e3aee" in line and "encoder.json as 6c7ea1a7e38e3" in line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing began
