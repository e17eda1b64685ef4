"""
Training you can trust: the validation loss, the best prefix kept, the learning-rate defaults, a
split with no near-duplicates across it, and the pictures.
"""

import csv
import json
import math
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from machinery import data, run_folder
import train
from mini_gpt2 import decode, from_pretrained
import prefix
from methods import prompt
from prefix import Example, prefix_hidden
from train import make_batch
from tests.conftest import ROOT, fail_in_step, load_learned, train_args


def log_rows(out):
    return list(csv.DictReader(open(out / "log.csv")))


def val_losses(out):
    """[(step, validation loss)] as log.csv has them."""
    return [(int(r["step"]), float(r["val_loss"])) for r in log_rows(out) if r["val_loss"]]


def fake_validation(monkeypatch, losses):
    losses = iter(losses)
    monkeypatch.setattr(train, "validation_loss", lambda *a: next(losses))


def test_validation_loss_is_the_teacher_forced_loss_on_the_slice(tiny_ckpt, csv_file, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval")) == 0
    kv, _, meta = load_learned(out / "prefix.safetensors")
    record = json.loads((out / "split.json").read_text())
    pairs, lines, _ = data.read_pairs(csv_file)
    val_pairs = [pairs[lines.index(line)] for line in record["validation"]]
    examples, _ = train.make_examples(val_pairs, 128, prefix)
    assert len(examples) == 2 * len(val_pairs)  # both directions

    model = from_pretrained(tiny_ckpt[0], device="cpu")
    total, n = 0.0, 0
    with torch.no_grad():  # one example at a time, by hand: the sum of its target tokens' cross-entropies
        for src, tgt, sp, tp in examples:
            batch = make_batch([Example(src, tgt, sp, tp)], "cpu")
            logits = model.logits(prefix_hidden(model, kv, batch))[0]
            total += F.cross_entropy(logits[len(src) - 1:len(src) + len(tgt) - 1], torch.tensor(tgt), reduction="sum").item()
            n += len(tgt)
    logged = dict(val_losses(out))[int(meta["step"])]
    assert total / n == pytest.approx(logged, abs=1e-4) and float(meta["val_loss"]) == logged


def test_nothing_near_a_held_out_or_validation_pair_is_trained_on(tiny_ckpt, tmp_path, monkeypatch):
    base = [(f"The number {w} is here, today.", f"Le nombre {w} est ici, aujourd'hui.")
            for w in ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                      "sixteen seventeen eighteen nineteen twenty").split()]
    variants = [(en.upper().replace(",", ""), fr.replace(",", " ;")) for en, fr in base]  # same once normalised
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("en", "fr")] + base + variants + base[:5])
    built = []
    real_batches = train.Batches

    def spy(examples, batch_size, seed):
        built.extend(examples)
        return real_batches(examples, batch_size, seed)

    monkeypatch.setattr(train, "Batches", spy)
    out = tmp_path / "run"
    assert train.main(train_args(tiny_ckpt[0], path, out, "--no-eval", "--steps", 1)) == 0

    record = json.loads((out / "split.json").read_text())
    pairs, lines, _ = data.read_pairs(path)
    at = {line: pair for line, pair in zip(lines, pairs)}
    kept_out = [at[line] for line in record["heldout"] + record["validation"]]
    assert record["heldout"] and record["validation"] and record["dropped_near_duplicates"]
    forbidden = {data.normalise(text) for pair in kept_out for text in pair}
    trained = {data.normalise(decode(ids).removesuffix("<|endoftext|>")) for src, tgt, _, _ in built for ids in (src, tgt)}
    assert built and not trained & forbidden
    for line in record["dropped_near_duplicates"]:
        assert {data.normalise(t) for t in at[line]} & forbidden
    roles = [record[k] for k in ("heldout", "validation", "few_shot", "dropped_near_duplicates")]
    assert not set(record["few_shot"]) & set(record["heldout"] + record["validation"] + record["dropped_near_duplicates"])
    assert sum(map(len, roles[:2] + roles[3:])) + record["train_pairs"] == len(pairs)


def check_best(out, steps):
    """prefix.safetensors is the lowest logged validation loss; prefix-last.safetensors the last, if it differs."""
    losses = val_losses(out)
    best_step, best = min(losses, key=lambda sv: (sv[1], sv[0]))
    kv, _, meta = load_learned(out / "prefix.safetensors")
    assert (int(meta["step"]), float(meta["val_loss"])) == (best_step, best)
    assert (out / "prefix-last.safetensors").exists() == (best_step != steps)
    if best_step != steps:
        last, _, last_meta = load_learned(out / "prefix-last.safetensors")
        assert int(last_meta["step"]) == steps and not torch.equal(last, kv)
    return best_step


def test_the_best_prefix_is_kept_and_the_last_beside_it(tiny_ckpt, csv_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    fake_validation(monkeypatch, [5.0, 4.0, 3.0, 3.5, 2.0, 2.5, 2.6])  # steps 0 to 6: the best is step 4
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--eval-every", 1)) == 0
    assert check_best(out, 6) == 4
    said = capsys.readouterr().out
    assert f"{out / 'prefix.safetensors'} is the best (step 4, validation loss 2.0000); " \
           f"{out / 'prefix-last.safetensors'} is the last (step 6, validation loss 2.6000)" in said
    assert "still falling" not in said


def test_a_tie_keeps_the_first_best_and_the_file_and_the_message_agree(tiny_ckpt, csv_file, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "run"
    fake_validation(monkeypatch, [5.0, 3.0, 3.0, 4.0])  # steps 0, 2, 4, 6: steps 2 and 4 tie
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval")) == 0
    assert int(load_learned(out / "prefix.safetensors")[2]["step"]) == 2
    assert f"{out / 'prefix.safetensors'} is the best (step 2, validation loss 3.0000)" in capsys.readouterr().out


def test_the_best_prefix_survives_a_resume(tiny_ckpt, csv_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fake_validation(monkeypatch, [5.0, 4.0, 1.0, 3.5])  # steps 0 to 3: the best is step 2, before the interruption
    fail_in_step(monkeypatch, 4, KeyboardInterrupt)
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--eval-every", 1)) == 130
    best_before = (out / "prefix.safetensors").read_bytes()
    monkeypatch.undo()
    fake_validation(monkeypatch, [2.0, 1.5, 1.2])  # steps 4 to 6: none beats step 2's
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--eval-every", 1, "--resume")) == 0
    assert check_best(out, 6) == 2 and (out / "prefix.safetensors").read_bytes() == best_before


def test_real_validation_losses_pick_the_best(tiny_ckpt, csv_file, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--eval-every", 1, "--lr", 0.5)) == 0
    check_best(out, 6)
    assert [s for s, _ in val_losses(out)] == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("losses,falling", [([5.0, 4.0, 3.0, 2.0], True), ([5.0, 4.0, 3.0, 3.1], False)])
def test_a_run_still_improving_says_so(tiny_ckpt, csv_file, tmp_path, capsys, monkeypatch, losses, falling):
    fake_validation(monkeypatch, losses)
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "run", "--no-eval")) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "still falling" in line]
    assert said == (["note: the validation loss was still falling at the end (3.0000 at step 4, 2.0000 at step 6): "
                     "more --steps may help"] if falling else [])


def test_a_model_that_learned_nothing_is_called_that_and_not_told_to_train_longer(tiny_ckpt, csv_file, tmp_path, capsys,
                                                                                  monkeypatch):
    chance = math.log(50257)  # 10.8249: every token alike
    fake_validation(monkeypatch, [chance + 0.03, chance + 0.01, chance - 0.01, chance - 0.02])  # still "falling"
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "run", "--no-eval")) == 0
    said = capsys.readouterr().out
    assert "note: the validation loss (10.8049) is no better than chance (10.8249, every token alike): nothing has been " \
           "learned" in said and "more --steps" not in said
    fake_validation(monkeypatch, [chance, chance - 0.2, chance - 0.3, chance - 0.4])  # a tenth below: learning
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "run2", "--no-eval")) == 0
    said = capsys.readouterr().out
    assert "chance" not in said and "more --steps may help" in said


def test_the_time_left_leaves_the_first_validation_out(tiny_ckpt, csv_file, tmp_path, monkeypatch):
    """On a clock of our own: the first validation takes 100 s, each step 1 s; the bar's elapsed time counts the steps."""
    import tqdm.std

    clock, seen = [1000.0], []
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    monkeypatch.setattr(tqdm.std.tqdm, "__init__", tqdm.std.tqdm.__dict__["__init__"].func)  # bars on (conftest's off)
    monkeypatch.setenv("TQDM_DISABLE", "")
    validations = iter([100.0, 0.0, 0.0, 0.0])

    def validation_loss(*a):
        clock[0] += next(validations)
        return 5.0

    real_step, real_loss = run_folder.Run.step_done, train.mean_loss
    monkeypatch.setattr(train, "validation_loss", validation_loss)
    monkeypatch.setattr(train, "mean_loss", lambda *a, **k: clock.__setitem__(0, clock[0] + 1) or real_loss(*a, **k))
    monkeypatch.setattr(run_folder.Run, "step_done", lambda self, step, *a: (real_step(self, step, *a),
                                                                               seen.append(self.bar.format_dict)))
    monkeypatch.setattr(run_folder, "time", types.SimpleNamespace(time=lambda: clock[0]))  # the speed's clock too
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "run", "--no-eval")) == 0
    assert [(d["n"], d["elapsed"]) for d in seen] == [(k, float(k)) for k in range(1, 7)]
    tokens = sum(int(r["tokens"]) for r in csv.DictReader(open(tmp_path / "run" / "log.csv")) if r["tokens"])
    with safe_open(str(tmp_path / "run" / "prefix-last.safetensors"), "pt") as f:  # the best is step 0's: all tie
        assert f.metadata()["tokens_per_s"] == f"{tokens / 6:.0f}"  # 6 steps of 1 s: the validation left out


def test_learning_rate_defaults_differ_as_documented():
    direct, reparam = train.parse_args([]).lr, train.parse_args(["--reparam"]).lr
    prompt_lr = train.parse_args(["--method", "prompt"]).lr
    assert (direct, reparam, prompt_lr) == (prefix.LR, prefix.REPARAM_LR, prompt.LR)
    assert direct / reparam >= 100
    assert train.parse_args(["--reparam", "--lr", "0.003"]).lr == 0.003
    doc = (ROOT / "docs" / "training.md").read_text()
    section = doc[doc.index("## Learning rates"):doc.index("## Steps, batches and passes")]
    assert f"`{direct:g}`" in section and f"`{reparam:g}`" in section and f"`{prompt_lr:g}`" in section


def is_png(path):
    import matplotlib.image

    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).ndim == 3


def test_pictures_when_matplotlib_is_installed(tiny_ckpt, csv_file, tmp_path, monkeypatch, capsys):
    """Each picture, and results.md, names the method, the model and the data; BLEU is drawn in percent."""
    import matplotlib.axes

    drawn = []  # (what was set, its value) for every axes drawn
    for name in ("set_title", "set_ylabel", "set_ylim"):
        real = getattr(matplotlib.axes.Axes, name)
        monkeypatch.setattr(matplotlib.axes.Axes, name, lambda self, *a, real=real, name=name, **k: (
            drawn.append((name, a)), real(self, *a, **k))[1])
    out = tmp_path / "run"
    assert train.main(train_args(tiny_ckpt[0], csv_file, out)) == 0
    assert is_png(out / "loss.png") and is_png(out / "bleu.png")
    md = (out / "results.md").read_text()
    assert "](bleu.png)" in md and "](loss.png)" in md
    (_, (loss_title,)), (_, (bleu_title,)) = [d for d in drawn if d[0] == "set_title"]
    for text in (loss_title, bleu_title, md):
        assert str(tiny_ckpt[0]) in text and "pairs.csv" in text, text
    assert "prefix" in loss_title and "6 steps of 4" in loss_title and "2 held-out pairs each way" in bleu_title
    assert ("set_ylabel", ("corpus BLEU (%)",)) in drawn and ("set_ylim", (0, 10.0)) in drawn  # BLEU near 0 here
    assert "- prefix: `" in md and "6 steps of 4 sequences on pairs.csv" in md
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table and max(map(len, table)) <= 100 and "the whole table" in printed


def test_bleu_bars_are_the_corpus_scores_in_percent(tmp_path, monkeypatch):
    import matplotlib.axes

    from machinery import plots

    heights, real = [], matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, *a, **k: (heights.append(list(h)),
                                                                                  real(self, x, h, *a, **k))[1])
    scores = {f"{m} {d}": {"corpus": v} for m, values in (("3-shot", (12.5, 20.0)), ("prefix", (31.25, 40.0)))
              for d, v in zip(("fr->en", "en->fr"), values)}
    assert plots.bleu_png(scores, tmp_path / "bleu.png", "BLEU") == tmp_path / "bleu.png"
    assert heights == [[12.5, 20.0], [31.25, 40.0]]


def test_no_matplotlib_no_pictures_and_nothing_fails(tiny_ckpt, csv_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as where it is missing
    out = tmp_path / "run"
    assert train.main(train_args(tiny_ckpt[0], csv_file, out)) == 0
    assert not (out / "loss.png").exists() and not (out / "bleu.png").exists()
    assert not re.search(r"!\[.*\]\(", (out / "results.md").read_text())


# ----------------------------------------------------------------------------- the schedule and the step

@pytest.fixture
def optimizer_steps(monkeypatch):
    """Each AdamW step train.py takes, as it is taken: the learning rate, the gradient's norm, how far each number moved."""
    seen, real = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        norm = torch.cat([p.grad.flatten() for p in params]).norm().item()
        out = real(self, *args, **kwargs)
        moved = max((p.detach() - b).abs().max().item() for p, b in zip(params, before))
        seen.append({"lr": self.param_groups[0]["lr"], "grad_norm": norm, "moved": moved})
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_the_learning_rate_of_the_first_a_middle_and_the_last_step(tiny_ckpt, csv_file, tmp_path, optimizer_steps):
    # --lr 0.05, --warmup 2, --steps 6: 0.05 * (k + 1) / 2 while warming up, then 0.05 * (6 - k) / 4 down to the end
    out = tmp_path / "run"
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--no-eval")) == 0
    want = [0.025, 0.05, 0.05, 0.0375, 0.025, 0.0125]
    assert [s["lr"] for s in optimizer_steps] == pytest.approx(want)
    assert [float(r["lr"]) for r in log_rows(out) if r["lr"]] == pytest.approx(want)
    # AdamW's first step moves every number with a gradient by the learning rate itself, whatever the
    # gradient's size: the rate that really reached the prefix
    assert optimizer_steps[0]["moved"] == pytest.approx(want[0], rel=1e-3)


def test_a_huge_gradient_is_clipped_before_the_step(tiny_ckpt, csv_file, tmp_path, optimizer_steps, monkeypatch):
    real = train.target_loss
    monkeypatch.setattr(train, "target_loss", lambda *a: real(*a) * 1e6)  # a gradient a million times too large
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "run", "--no-eval", "--steps", 2)) == 0
    assert len(optimizer_steps) == 2 and all(s["grad_norm"] <= 1.0 + 1e-5 for s in optimizer_steps), optimizer_steps


def test_each_epoch_is_the_data_in_a_new_order():
    examples = [Example([i], [i, 50256], 0, 1) for i in range(50)]
    batches = train.Batches(examples, 8, seed=0)
    n = 7  # steps per epoch: 50 examples in batches of 8
    epochs = [[tuple(ex[0][0] for ex in batches[k]) for k in range(e * n, (e + 1) * n)] for e in range(3)]
    for steps in epochs:
        assert sorted(i for step in steps for i in step) == list(range(50))  # every example once an epoch
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert [tuple(ex[0][0] for ex in train.Batches(examples, 8, seed=0)[k]) for k in (9, 3)] == [epochs[1][2], epochs[0][3]]


def test_a_resumed_run_sees_the_data_in_the_same_order(tiny_ckpt, csv_file, tmp_path, monkeypatch):
    """Across an epoch's end (36 examples, batches of 8: 5 steps an epoch), stopped in the second epoch."""
    seen = []
    real = train.mean_loss

    def spy(model, method, learned, examples, *args, backward=False, **kwargs):
        if backward:
            seen.append(sorted((tuple(s), tuple(t)) for s, t, _, _ in examples))
        return real(model, method, learned, examples, *args, backward=backward, **kwargs)

    monkeypatch.setattr(train, "mean_loss", spy)
    args = ["--no-eval", "--steps", 8, "--batch-size", 8, "--save-every", 100]
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "straight", *args)) == 0
    straight, seen[:] = list(seen), []
    fail_in_step(monkeypatch, 7, KeyboardInterrupt)  # wraps the spy: steps 1 to 6 complete
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "resumed", *args)) == 130
    monkeypatch.setattr(train, "mean_loss", spy)
    assert train.main(train_args(tiny_ckpt[0], csv_file, tmp_path / "resumed", *args, "--resume")) == 0
    assert len(straight) == 8 and seen == straight  # 6 steps before the interruption, 2 after it
    assert straight[5:8] != straight[0:3]  # the second epoch is in another order


@pytest.mark.parametrize("device,peak", [("cuda", "3.50"), ("cpu", None)])
def test_a_saved_file_records_the_runs_speed_and_its_gpu_memory(tmp_path, monkeypatch, device, peak):
    from machinery import run_folder

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3.5 * 2**30)
    r = run_folder.Run(tmp_path, {"device": device})
    saved = []
    r.save = lambda path, learned, **meta: saved.append((path, learned, meta))
    r.step, r.tokens_per_s = 7, lambda: "500"
    r.save_learned(tmp_path / "p.safetensors", "learned", 1.23456)
    (path, learned, meta), = saved
    assert path == tmp_path / "p.safetensors" and learned == "learned"
    assert meta.pop("peak_memory_gib", None) == peak and meta.pop("step") == 7 and meta.pop("val_loss") == "1.2346"
    assert meta.pop("tokens_per_s") == "500" and meta == {}
