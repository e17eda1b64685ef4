"""
The whole comparison: LoRA and full fine-tuning beside prefixes and prompts, through the same
training path; their files; one --eval-only with every row; the scores MT papers report, with a
paired bootstrap against 3-shot.
"""

import json

import pytest
import torch

from machinery import comparison
from methods import finetune
from methods import lora
from methods import prompting
import train
import translate
from mini_gpt2 import EOT, decode, encode, from_pretrained, save_pretrained
from prefix import Example, Start
from tests.conftest import load_learned, one_line_error, train_args
from tests.test_prefix import examples, train_on_examples
from train import make_batch, target_loss


@pytest.fixture
def model(tiny_ckpt):
    return from_pretrained(tiny_ckpt[0], device="cpu").requires_grad_(False)


def trained_lora(model, seed=0):
    """A LoRA as if trained: B no longer zero."""
    learned = lora.lora_start(model, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        learned.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return learned


IDX = torch.tensor([encode(" Bonjour! Je m'appelle Sully.")[:10], encode(" Hello! My name is Sully, hi.")[:10]])


# ----------------------------------------------------------------------------- LoRA

def test_lora_starts_as_the_frozen_model_exactly_and_changes_it_once_trained(model):
    learned = lora.lora_start(model, generator=torch.Generator().manual_seed(0))
    assert float(learned.B.detach().abs().sum()) == 0 and float(learned.A.detach().abs().sum()) > 0
    assert learned.scale == lora.ALPHA / lora.RANK == 8
    with torch.no_grad():
        frozen = model(IDX)
        with lora.attached(model, learned):
            assert torch.equal(model(IDX), frozen)
        with lora.attached(model, trained_lora(model)):
            assert not torch.allclose(model(IDX), frozen)
        assert torch.equal(model(IDX), frozen)  # detached again


def test_only_a_and_b_move(model):
    learned = lora.lora_start(model, generator=torch.Generator().manual_seed(0))
    losses = train_on_examples(model, learned, lora.hidden, 20, lr=0.01)
    assert losses[-1] < losses[0] and float(learned.B.detach().abs().sum()) > 0


def test_merging_a_and_b_into_the_weights_gives_the_same_logits(tiny_ckpt, model):
    learned = trained_lora(model)
    with torch.no_grad(), lora.attached(model, learned):
        apart = model(IDX)
    merged = lora.merge(from_pretrained(tiny_ckpt[0], device="cpu"), learned)
    with torch.no_grad():
        assert torch.allclose(merged(IDX), apart, atol=1e-4)


def test_a_merged_lora_is_transformers_gpt2_with_those_weights(tiny_ckpt, model, tmp_path):
    """Independently: the merged weights, saved in the hub's layout, through transformers' GPT-2."""
    from transformers import GPT2LMHeadModel

    learned = trained_lora(model)
    with torch.no_grad(), lora.attached(model, learned):
        ours = model(IDX)
    merged = lora.merge(from_pretrained(tiny_ckpt[0], device="cpu"), learned)
    save_pretrained(tmp_path, dict(merged.named_parameters()), merged.config)
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()(IDX).logits
    assert (ours - theirs).abs().max() <= 1e-4


def decoded_by_the_training_forward(model, hidden, learned, source, limit):
    """Greedy decoding by the training forward itself: the whole sequence again at every token."""
    out = []
    while len(out) < limit:
        batch = make_batch([Example(source, out + [EOT], 0, 1)], "cpu")
        with torch.no_grad():
            h, _ = hidden(model, learned, batch)
            logits = model.logits(h[0, len(source) - 1 + len(out)])
        token = logits.argmax().item()
        if token == EOT or "\n" in decode([token]):
            break
        out.append(token)
    return out


@pytest.mark.parametrize("method", ["lora", "finetune"])
def test_the_training_forward_is_the_decoding(tiny_ckpt, model, method):
    """Both read a translation as the zero-shot prompt continued: decoding gives what the training forward ranks first."""
    if method == "lora":
        learned, hidden = trained_lora(model), lora.hidden
        row = lora.translator(model, learned)
    else:
        learned, hidden = finetune.start(model, Start(4, "words", False, 0)), finetune.hidden
        row = prompting.FewShot(model, [])
    texts = ["Bonjour! Je m'appelle Sully.", "Merci"]
    got = row(texts, "fr", "en", [8, 8])
    for text, line in zip(texts, got):
        source = prompting.zero_shot_ids(text, "fr", "en")
        want = decoded_by_the_training_forward(model, hidden, learned, source, 8)
        assert line == decode(want).strip(), (text, line)


def test_lora_files_round_trip_and_are_checked(model, tmp_path):
    from methods import METHODS

    learned = trained_lora(model)
    path = tmp_path / "lora.safetensors"
    METHODS["lora"].save(path, learned, model.config, model="tiny")
    loaded, names, meta = load_learned(path)
    assert torch.equal(loaded.A, learned.A) and torch.equal(loaded.B, learned.B) and loaded.scale == learned.scale
    assert (meta["method"], meta["rank"], meta["alpha"]) == ("lora", str(lora.RANK), str(lora.ALPHA))
    with torch.no_grad():
        learned.B[0, 0, 0, 0] = float("nan")
    from mini_gpt2 import UserError

    with pytest.raises(UserError, match="NaN or inf"):
        METHODS["lora"].save(path, learned, model.config)


# ----------------------------------------------------------------------------- full fine-tuning

def test_bfloat16_fine_tuning_keeps_float32_masters(tiny_ckpt):
    model = from_pretrained(tiny_ckpt[0], device="cpu", dtype=torch.bfloat16)
    learned = finetune.start(model, Start(4, "words", False, 0))
    opt = torch.optim.AdamW(learned.parameters(), lr=1e-3)
    assert all(p.dtype == torch.float32 for p in learned.parameters())
    for _ in range(2):
        loss = target_loss(model, *finetune.hidden(model, learned, make_batch(examples(), "cpu")))
        loss.backward()
        assert all(p.grad is None for p in model.parameters())  # each gradient went to its master
        assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in learned.parameters())
        opt.step()
        opt.zero_grad()
    learned()
    state = learned.state()
    assert all(torch.equal(p, state[n].to(torch.bfloat16)) for n, p in model.named_parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim)


@pytest.fixture(scope="module")
def finetuned(tiny_ckpt, csv_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    args = train_args(tiny_ckpt[0], csv_file, out, "--method", "finetune", "--steps", 2, "--lr", 1e-3, "--no-eval")
    assert train.main(args) == 0
    return out


def test_a_fine_tuned_folder_loads_in_mini_gpt2_and_in_transformers_alike(finetuned, tiny_ckpt):
    from transformers import GPT2LMHeadModel

    folder = finetuned / "model"
    ours = from_pretrained(folder, device="cpu")
    theirs = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        a, b = ours(IDX), theirs(IDX).logits
        moved = (a - from_pretrained(tiny_ckpt[0], device="cpu")(IDX)).abs().max()
    assert (a - b).abs().max() <= 1e-4 and moved > 1e-3  # the same logits, and not the model it started from
    meta = load_learned(folder)[2]
    assert meta["method"] == "finetune" and int(meta["step"]) in (0, 1, 2) and "val_loss" in meta


def test_translate_py_with_lora_and_fine_tuned_models(finetuned, tiny_ckpt, csv_file, tmp_path, call):
    r = call(translate.main, "--model", finetuned / "model", "--max-new-tokens", 4, "Bonjour", "Hello")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    assert call(translate.main, "--prefix", finetuned, "--max-new-tokens", 4, "Bonjour").stdout == \
        call(translate.main, "--model", finetuned / "model", "--max-new-tokens", 4, "Bonjour").stdout  # --out stands for it
    out = tmp_path / "lora"
    assert train.main(train_args(tiny_ckpt[0], csv_file, out, "--method", "lora", "--steps", 2, "--no-eval")) == 0
    r = call(translate.main, "--prefix", out / "lora.safetensors", "--max-new-tokens", 4, "Bonjour")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stderr


def test_method_arguments(call, tmp_path):
    assert train.parse_args(["--method", "lora"]).lr == lora.LR == 2e-4
    assert train.parse_args(["--method", "finetune"]).lr == finetune.LR
    r = call(train.main, "--method", "lora", "--reparam", "--out", tmp_path / "o")
    assert "it does not apply to --method lora" in one_line_error(r, status=2)


# ----------------------------------------------------------------------------- one table, scored as MT is scored

def test_one_eval_only_gives_all_six_rows(tiny_ckpt, csv_file, finetuned, tmp_path, call):
    runs = {}
    for method in ("prefix", "prompt", "lora"):
        runs[method] = tmp_path / method
        assert train.main(train_args(tiny_ckpt[0], csv_file, runs[method], "--method", method, "--steps", 2,
                                     "--no-eval")) == 0
    r = call(train.main, "--eval-only", "--prefix", runs["prefix"] / "prefix.safetensors", runs["prompt"], runs["lora"],
             finetuned / "model", "--eval-size", 2, "--out", tmp_path / "all")
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    rows = ["0-shot", "3-shot", "prefix", "prompt", "lora", "finetune"]
    assert list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in results["scores"])) == rows
    for row in rows:
        assert f"| {row} | both | 4 |" in r.stdout
    about = results["about"]
    assert about["lora"]["trainable_params"] == f"{2 * 2 * lora.RANK * (80 + 80):,}"  # 2 layers x (q, v) x r x (C + C)
    assert about["finetune"]["file_size"].endswith("MiB") and about["prefix"]["tokens_per_s"] != "-"
    assert results["sacrebleu_signatures"]["sacrebleu"].startswith("nrefs:1|")
    assert all("delta_low" in s for k, s in results["scores"].items() if not k.startswith("3-shot"))
    zero_shot = [row["0-shot"] for rows_ in results["translations"].values() for row in rows_]
    assert [row["finetune"] for rows_ in results["translations"].values() for row in rows_] != zero_shot  # its own weights


HYPS = ["Hello! My name is Sully, hello.", "Thanks.", "Where is the train station?", "I like cheese and bread",
        "It rains today.", "See you tomorrow, friend.", "The cat is sleeping.", "We are very late!"]
BASE = ["Hello, I am Sully.", "Thank you very much.", "Where the station?", "I like cheese, and bread.",
        "It is raining.", "See you.", "The cat sleeps.", "We late."]
REFS = ["Hello! My name is Sully.", "Thank you.", "Where is the station?", "I like cheese, and bread.",
        "It is raining today.", "See you tomorrow.", "The cat sleeps.", "We are late."]


def test_the_bootstrap_counts_are_nltks_corpus_bleu():
    """Summed per-sentence counts give NLTK's corpus BLEU, a hypothesis shorter than 4 tokens included."""
    for hyps in (HYPS, BASE):
        want = comparison.bleu_scores(hyps, REFS)["corpus"]
        assert float(comparison.bleu_from_stats(comparison.bleu_stats(hyps, REFS).sum(0))) == pytest.approx(want, abs=1e-9)


def test_the_paired_bootstrap_is_seeded_and_holds_the_observed_difference():
    a = comparison.paired_bootstrap(HYPS, BASE, REFS, seed=3)
    assert a == comparison.paired_bootstrap(HYPS, BASE, REFS, seed=3) != comparison.paired_bootstrap(HYPS, BASE, REFS, seed=4)
    observed = comparison.bleu_scores(HYPS, REFS)["corpus"] - comparison.bleu_scores(BASE, REFS)["corpus"]
    assert a["delta"] == pytest.approx(observed) and a["delta_low"] <= observed <= a["delta_high"]
    assert a["delta_low"] < a["delta_high"]  # eight sentences: a wide interval
    same = comparison.paired_bootstrap(HYPS, HYPS, REFS, seed=3)
    assert same == {"delta": 0.0, "delta_low": 0.0, "delta_high": 0.0}


@pytest.mark.filterwarnings("ignore::UserWarning")  # NLTK's, for samples without some n-gram
def test_the_paired_bootstrap_is_nltks_corpus_bleu_on_each_resample():
    """The interval computed again sample by sample with NLTK, on the documented draws: numpy's default_rng(seed)."""
    import numpy as np

    picks = np.random.default_rng(5).integers(0, len(REFS), size=(1000, len(REFS)))
    corpus = lambda hyps, idx: comparison.bleu_scores([hyps[i] for i in idx], [REFS[i] for i in idx])["corpus"]  # noqa: E731
    differences = [corpus(HYPS, idx) - corpus(BASE, idx) for idx in picks]
    low, high = np.percentile(differences, [2.5, 97.5])
    ours = comparison.paired_bootstrap(HYPS, BASE, REFS, seed=5)
    assert ours["delta_low"] == pytest.approx(low, abs=1e-6) and ours["delta_high"] == pytest.approx(high, abs=1e-6)


def test_sacrebleu_and_chrf_are_the_librarys_own():
    """With its own tokens: on French, where they and ours (l ' été) part ways, too."""
    import sacrebleu

    french = (["J'aime l'été, vraiment.", "C'est l'heure-là."], ["J'aime l'été, c'est vrai.", "C'est l'heure."])
    for hyps, refs in ((HYPS, REFS), french):
        s = comparison.mt_scores(hyps, refs, comparison.mt_metrics())
        assert s["sacrebleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
        assert s["chrf++"] == sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
        assert 0 < s["chrf++"] < 100 and s["sacrebleu"] != comparison.bleu_scores(hyps, refs)["corpus"]


def test_without_sacrebleu_the_table_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    metrics = comparison.mt_metrics()
    assert metrics == {} and comparison.mt_scores(HYPS, REFS, metrics) == {} and comparison.signatures(metrics) is None
    scores = {"0-shot both": comparison.bleu_scores(HYPS, REFS) | {"pairs": 8}}
    assert "sacrebleu is not installed (pip install sacrebleu)" in comparison.table(scores)


def test_bfloat16_fine_tuning_in_several_passes_is_the_float32_step_and_saves_the_masters(tiny_ckpt, tmp_path):
    """Every pass's gradient reaches the float32 masters (added, not replaced), and what is saved are those masters."""
    from methods import finetune as method

    exs, grads = examples(), {}
    assert len(train.micro_batches(exs, 20)) >= 2
    for dtype, budget in ((torch.float32, 10**6), (torch.bfloat16, 20)):  # one pass; two or more
        model = from_pretrained(tiny_ckpt[0], device="cpu", dtype=dtype)
        tuned = method.start(model, Start(4, "words", False, 0))
        train.mean_loss(model, method, tuned, exs, train.Packing(budget), backward=True)
        grads[dtype] = torch.cat([m.grad.flatten() for m in tuned.masters.values()])
    g32, g16 = grads[torch.float32], grads[torch.bfloat16]
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99 and abs(g16.norm() / g32.norm() - 1) < 0.05
    torch.optim.AdamW(tuned.parameters(), lr=1e-2).step()  # the bfloat16 model's masters move
    method.save(tmp_path / "model", tuned, model.config)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model" / "model.safetensors")
    masters = tuned.state()
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert torch.equal(saved["transformer.wte.weight"], masters["wte.weight"])
    assert torch.equal(saved["transformer.h.1.mlp.c_fc.weight"], masters["h.1.mlp.c_fc.weight"].t())  # Conv1D layout
    assert not torch.equal(masters["wte.weight"].to(torch.bfloat16).float(), masters["wte.weight"])  # finer than bf16
