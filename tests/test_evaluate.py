"""The comparison's scores: each BLEU by hand and against sacreBLEU and NLTK, the few-shot prompt, --eval-only end to end."""

import json
import math
import re

import pytest
import torch

from machinery import data
from machinery import comparison
from methods import prompting
import methods
import prefix
import mini_gpt2
from mini_gpt2 import from_pretrained
from tests.conftest import PAIRS, run


def test_bleu_hand_checked_cases():
    s = comparison.bleu_scores(["Le chat dort sur le tapis."], ["Le chat dort sur le tapis."])
    assert s["corpus"] == pytest.approx(100) and s["sentence_smoothed"] == pytest.approx(100)
    assert s["sentence_whitespace"] == pytest.approx(100)
    assert comparison.bleu_scores(["un deux trois quatre"], ["five six seven eight"])["corpus"] == 0

    # a b c d e f against a b c d x f: 1-grams 5/6, 2-grams 3/5 (ab bc cd), 3-grams 2/4 (abc bcd),
    # 4-grams 1/3 (abcd); same length, so no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    by_hand = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert by_hand == pytest.approx(53.73, abs=0.01)
    s = comparison.bleu_scores(["a b c d e f"], ["a b c d x f"])
    assert s["corpus"] == pytest.approx(by_hand) and s["sentence_whitespace"] == pytest.approx(by_hand)


def test_bleu_tokens_split_punctuation():
    assert comparison.bleu_tokens("L'été, déjà.") == ["L", "'", "été", ",", "déjà", "."]


def test_few_shot_prompt_layout():
    shots = [{"en": "Thank you.", "fr": "Merci."}, {"en": "Good night.", "fr": "Bonne nuit."}]
    assert prompting.few_shot_prompt(shots, "Le chat dort.", "fr", "en") == (
        "fr: Merci.\nen: Thank you.\n\nfr: Bonne nuit.\nen: Good night.\n\nfr: Le chat dort.\nen:")
    assert prompting.few_shot_prompt(shots[:1], "The cat sleeps.", "en", "fr") == (
        "en: Thank you.\nfr: Merci.\n\nen: The cat sleeps.\nfr:")


def test_few_shot_examples_are_aligned_training_pairs_never_held_out():
    pairs = [(f"English {i % 40}", f"Français {i % 40}") for i in range(400)]  # with duplicates
    split = data.split(pairs, heldout=30, val_size=10, seed=3)
    shots = data.few_shot_indices(pairs, split.train, 3, seed=3)
    assert shots == data.few_shot_indices(pairs, split.train, 3, seed=3) and len(shots) == 3
    assert set(shots) <= set(split.train)
    assert all(pairs[i][0].split()[1] == pairs[i][1].split()[1] for i in shots)  # each example's two sides match


def test_eval_only_end_to_end_with_both_methods(tiny_ckpt, csv_file, tmp_path):
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    g = torch.Generator().manual_seed(0)
    files = {"prefix": tmp_path / "A.safetensors", "prompt": tmp_path / "B.safetensors"}
    for method, path in files.items():
        learned = methods.METHODS[method].init_random(model, prefix.NAMES, 3, g)
        methods.METHODS[method].save(path, prefix.Prefixes(learned), model.config, model=str(tiny_ckpt[0]),
                                     data=str(csv_file), rows=200000, heldout=8, seed=0)
    r = run("train.py", "--eval-only", "--prefix", files["prefix"], files["prompt"], "--data", csv_file, "--heldout", 8,
            "--eval-size", 3, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for row in ("| 0-shot | fr->en | 3 |", "| 3-shot | both | 6 |", "| prefix | fr->en | 3 |", "| prompt | en->fr | 3 |"):
        assert row in r.stdout
    assert "warning" not in r.stdout  # same split settings as the files were made with

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = ("0-shot", "3-shot", "prefix", "prompt")
    keys = [f"{m} {d}" for m in rows for d in ("fr->en", "en->fr", "both")]
    assert list(results["scores"]) == keys  # in this order: the baselines, then the files
    for key in keys:
        figures = results["scores"][key]
        mt = {"sacrebleu", "chrf++"} | ({"delta", "delta_low", "delta_high"} if not key.startswith("3-shot") else set())
        assert set(figures) == {"corpus", "sentence_smoothed", "sentence_whitespace", "pairs"} | mt
        assert all(math.isfinite(v) for v in figures.values())
    assert [(f["row"], f["method"], f["path"]) for f in results["settings"]["files"]] == \
        [(m, m, str(path)) for m, path in files.items()]
    assert results["settings"]["model"] == str(tiny_ckpt[0]) and results["settings"]["eval_size"] == 3

    # the evaluated sentences are held out: neither trained on nor used as a few-shot example
    pairs = data.read_pairs(csv_file)[0]
    split = data.split(pairs, heldout=8, seed=0)
    evaluated = {row["source"] for rows in results["translations"].values() for row in rows}
    shots = {s for ex in results["few_shot_examples"] for s in ex.values()}
    assert evaluated and evaluated <= {s for i in split.held for s in pairs[i]}
    assert not evaluated & ({s for i in split.train + split.val for s in pairs[i]} | shots)
    assert all(set(rows) <= set(row) for rows_ in results["translations"].values() for row in rows_)

    md = (tmp_path / "out" / "results.md").read_text()
    assert "| method | direction | pairs | corpus BLEU" in md and "- source:" in md and "  - prompt:" in md
    for key, s in results["scores"].items():  # the table shows each figure in its own column
        method, direction = key.rsplit(" ", 1)
        row = (f"| {method} | {direction} | {s['pairs']} | {s['corpus']:.2f} | {s['sentence_smoothed']:.2f} | "
               f"{s['sentence_whitespace']:.2f} |")
        printed = f"| {method} | {direction} | {s['pairs']} | {s['corpus']:.2f} | {s['sacrebleu']:.2f} | {s['chrf++']:.2f} |"
        assert row in md and printed in r.stdout  # the terminal's table: the three scores MT papers report
    check_by_header(read_table(r.stdout), results["scores"], results["about"])  # the printed table, read back
    check_by_header(read_table(md[md.index("| method |"):]), results["scores"], results["about"])  # and results.md's
    at = {fr: en for en, fr in pairs} | {en: fr for en, fr in pairs}
    assert all(row["reference"] == at[row["source"]] for rows_ in results["translations"].values() for row in rows_)

    r = run("train.py", "--eval-only", "--prefix", files["prefix"], "--data", csv_file, "--heldout", 6,
            "--eval-size", 2, "--out", tmp_path / "out2")
    assert r.returncode == 0 and "warning: the prefix was trained with other --heldout" in r.stdout


def test_zero_shot_is_the_prompt_with_no_examples():
    assert prompting.few_shot_prompt([], "Le chat dort.", "fr", "en") == "fr: Le chat dort.\nen:"


# ----------------------------------------------------------------------------- each BLEU, by hand and independently

def test_corpus_bleu_pools_the_counts_of_all_sentences():
    # "a b c d" exactly, and "a b c d e f" against "a b c d x f": pooled 1-grams 9/10, 2-grams 6/8,
    # 3-grams 4/6, 4-grams 2/4, same lengths: BLEU = (9/10 * 6/8 * 4/6 * 2/4) ** (1/4), which is not
    # the mean of the two sentences' BLEU ((1 + 0.5373) / 2 = 0.7686)
    s = comparison.bleu_scores(["a b c d", "a b c d e f"], ["a b c d", "a b c d x f"])
    assert s["corpus"] == pytest.approx(100 * (9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25)  # 68.87
    assert s["sentence_smoothed"] == pytest.approx(100 * (1 + (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25) / 2)


def test_the_smoothed_sentence_bleu_gives_a_missing_4gram_a_tenth():
    # "a b c x" against "a b c d": 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1, which NLTK's
    # smoothing method 1 counts as 0.1/1; unsmoothed, the sentence scores 0
    s = comparison.bleu_scores(["a b c x"], ["a b c d"])
    assert s["sentence_smoothed"] == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 0.1) ** 0.25)  # 39.76
    assert s["sentence_whitespace"] < 1e-10 and s["corpus"] < 1e-10  # NLTK returns a tiny number for 0


def test_the_whitespace_sentence_bleu_splits_on_spaces_only():
    # Whitespace tokens: "mat ." against "mat.": 1-grams 5/7, 2-grams 4/6, 3-grams 3/5, 4-grams 2/4,
    # the hypothesis longer (no brevity penalty); the regex tokens of both are the same, 100
    s = comparison.bleu_scores(["the cat sat on the mat ."], ["the cat sat on the mat."])
    assert s["sentence_whitespace"] == pytest.approx(100 * (5 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)  # 61.48
    assert s["corpus"] == pytest.approx(100) and s["sentence_smoothed"] == pytest.approx(100)


# Each at least 4 tokens: for a shorter one, NLTK counts 1 where it has no 4-gram at all (sacreBLEU 0),
# so their corpus BLEU part ways there.
HYPOTHESES = ["Hello! My name is Sully, hello.", "Thanks you so much.", "Where is the train station?", "I like cheese and bread",
              "It rains today.", "See you tomorrow, friend.", "The cat is sleeping.", "We are very late!"]
REFERENCES = [en for en, _ in PAIRS[:8]]


@pytest.mark.filterwarnings("ignore::UserWarning")  # NLTK's, for sentences without some n-gram
def test_bleu_agrees_with_sacrebleu_and_nltk_called_directly():
    import sacrebleu
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    s = comparison.bleu_scores(HYPOTHESES, REFERENCES)
    join = lambda texts: [" ".join(comparison.bleu_tokens(t)) for t in texts]  # noqa: E731  the same tokens
    theirs = sacrebleu.corpus_bleu(join(HYPOTHESES), [join(REFERENCES)], tokenize="none", smooth_method="none",
                                   force=True)
    assert 0 < s["corpus"] < 100 and s["corpus"] == pytest.approx(theirs.score, abs=1e-9)
    tok = comparison.bleu_tokens
    smooth = SmoothingFunction().method1
    mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    assert s["sentence_smoothed"] == pytest.approx(
        mean([sentence_bleu([tok(r)], tok(h), smoothing_function=smooth) for h, r in zip(HYPOTHESES, REFERENCES)]))
    assert s["sentence_whitespace"] == pytest.approx(
        mean([sentence_bleu([r.split()], h.split()) for h, r in zip(HYPOTHESES, REFERENCES)]))


def test_both_directions_is_the_corpus_bleu_of_all_their_sentences_together():
    pairs = PAIRS[:4]
    answers = {"en": HYPOTHESES[:4], "fr": ["Bonjour! Je suis Sully.", "Merci beaucoup.", "Où est la gare?", "J'aime le pain."]}

    class Fixed:
        def __call__(self, texts, source, target, limits, **decoding):
            return [answers[target][[p[{"en": 0, "fr": 1}[source]] for p in pairs].index(t)] for t in texts]

    scores, _ = comparison.evaluate({"fixed": Fixed()}, comparison.evaluation_pairs(pairs, 128, 4), 2)
    refs = {"en": [en for en, _ in pairs], "fr": [fr for _, fr in pairs]}
    for target, source in (("en", "fr"), ("fr", "en")):
        h, r = answers[target], refs[target]
        assert scores[f"fixed {source}->{target}"] == comparison.bleu_scores(h, r) | comparison.mt_scores(h, r, comparison.mt_metrics()) | {"pairs": 4}
    h, r = answers["en"] + answers["fr"], refs["en"] + refs["fr"]
    assert scores["fixed both"] == comparison.bleu_scores(h, r) | comparison.mt_scores(h, r, comparison.mt_metrics()) | {"pairs": 8}
    assert len({scores[f"fixed {d}"]["corpus"] for d in ("fr->en", "en->fr", "both")}) == 3  # all three differ


def test_held_out_pairs_longer_than_training_allowed_are_not_evaluated(capsys):
    held = [("Thank you.", "Merci."), ("word " * 40, "mot " * 40), ("Good night.", "Bonne nuit.")]
    pairs = comparison.evaluation_pairs(held, 64, 10)  # 41 + 41 + <|endoftext|> tokens do not fit 64
    assert [p.text["en"] for p in pairs] == ["Thank you.", "Good night."]
    assert pairs[0].ids == {"en": prefix.encode_sentence("Thank you."), "fr": prefix.encode_sentence("Merci.")}
    assert "1 held-out pairs longer than --max-len 64 left out" in capsys.readouterr().out
    assert len(comparison.evaluation_pairs(held, 64, 1)) == 1  # and --eval-size of them


def test_the_zero_shot_prompt_takes_the_positions_it_says():
    """ZERO_SHOT_TOKENS, written out (nothing is tokenized at import), is what the tokenizer counts: the empty sentence's."""
    assert prompting.ZERO_SHOT_TOKENS == max(len(prompting.zero_shot_ids("", s, t)) for s, t in prompting.DIRECTIONS)
    for text in ("Bonjour", "Il pleut.", "« Oui »"):
        for s, t in prompting.DIRECTIONS:
            extra = len(prompting.zero_shot_ids(text, s, t)) - len(prefix.encode_sentence(text))
            assert 0 <= extra <= prompting.ZERO_SHOT_TOKENS


# ----------------------------------------------------------------------------- every printed figure, by its header

# What each column holds, written out here rather than read from comparison.py.
BY_HEADER = {"corpus BLEU": "corpus", "mean sentence BLEU (smoothed)": "sentence_smoothed",
             "mean sentence BLEU (whitespace, unsmoothed)": "sentence_whitespace", "sacreBLEU": "sacrebleu",
             "chrF++": "chrf++"}
ABOUT_BY_HEADER = {"trainable parameters": "trainable_params", "file": "file_size", "training tokens/s": "tokens_per_s",
                   "training peak memory": "peak_memory"}
FRENCH = ["Bonjour! Je suis Sully.", "Merci beaucoup.", "Où est la gare?", "J'aime le pain, et le fromage.",
          "Il pleut aujourd'hui.", "À demain, mon ami.", "Le chat dort bien.", "Nous sommes très en retard."]


class Answers:
    """A translator that answers from a table: {target language: [the answer for pair i]}."""

    def __init__(self, answers, pairs):
        self.answers, self.pairs = answers, pairs

    def __call__(self, texts, source, target, limits, **decoding):
        at = [p[{"en": 0, "fr": 1}[source]] for p in self.pairs]
        return [self.answers[target][at.index(t)] for t in texts]


def scored(seed=5):
    """A comparison of two rows on the first 8 pairs, the baseline and a better one, scored with sacrebleu's metrics."""
    pairs = PAIRS[:8]
    base = Answers({"en": [h.split(",")[0] for h in HYPOTHESES], "fr": [f.split(",")[0] for f in FRENCH]}, pairs)
    better = Answers({"en": HYPOTHESES, "fr": FRENCH}, pairs)
    held = comparison.evaluation_pairs(pairs, 128, 8)
    scores, outputs = comparison.evaluate({"3-shot": base, "better": better}, held, 3, "3-shot", seed)
    return scores, outputs, held


def read_table(text):
    """The first Markdown table in `text`: one {header: cell} a row."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def check_by_header(rows, scores, about):
    """Each cell of each row is its figure in results.json's scores (or about), as its header says; intervals low to high."""
    for row in rows:
        s = scores[f"{row['method']} {row['direction']}"]
        assert int(row["pairs"]) == s["pairs"]
        for header, key in BY_HEADER.items():
            if header in row:
                assert row[header] == f"{s[key]:.2f}", (header, row)
        (delta,) = [cell for header, cell in row.items() if header.startswith("corpus BLEU - ")]
        if "delta" in s:
            d, low, high = map(float, re.fullmatch(r"([-+][\d.]+) \[([-+][\d.]+), ([-+][\d.]+)\]", delta).groups())
            assert (d, low, high) == (round(s["delta"], 2), round(s["delta_low"], 2), round(s["delta_high"], 2))
            assert low <= d <= high
        for header, key in ABOUT_BY_HEADER.items():
            if header in row:
                assert row[header] == str(about.get(row["method"], {}).get(key, "-"))


def test_every_column_of_both_tables_is_its_figure_by_its_header():
    scores, _, _ = scored()
    about = {"better": {"trainable_params": "1,234", "file_size": "5 KiB", "tokens_per_s": "100", "peak_memory": "1.5 GiB"}}
    for terminal in (True, False):
        rows = read_table(comparison.table(scores, about, "3-shot", terminal=terminal))
        assert len(rows) == 6 and all(scores[f"better {d}"]["delta_low"] < scores[f"better {d}"]["delta_high"]
                                      for d in ("fr->en", "en->fr", "both"))  # intervals wide enough to tell ends apart
        check_by_header(rows, scores, about)
        shown = {h for h in rows[0] if h in BY_HEADER}
        assert shown == ({"corpus BLEU", "sacreBLEU", "chrF++"} if terminal else set(BY_HEADER))
        assert terminal or set(ABOUT_BY_HEADER) <= set(rows[0])


def test_the_both_rows_interval_resamples_the_pooled_sentences_of_both_directions():
    """The "both" row by hand: both directions' sentences in one corpus, 1,000 draws of it, NLTK's BLEU on each."""
    import numpy as np

    scores, outputs, held = scored(seed=7)
    hyps = outputs[("better", "fr", "en")] + outputs[("better", "en", "fr")]
    base = outputs[("3-shot", "fr", "en")] + outputs[("3-shot", "en", "fr")]
    refs = [p.text["en"] for p in held] + [p.text["fr"] for p in held]
    picks = np.random.default_rng(7).integers(0, len(refs), size=(1000, len(refs)))
    corpus = lambda texts, idx: comparison.bleu_scores([texts[i] for i in idx], [refs[i] for i in idx])["corpus"]  # noqa: E731
    low, high = np.percentile([corpus(hyps, idx) - corpus(base, idx) for idx in picks], [2.5, 97.5])
    both = scores["better both"]
    assert both["delta_low"] == pytest.approx(low, abs=1e-6) and both["delta_high"] == pytest.approx(high, abs=1e-6)
    assert both["delta"] == pytest.approx(corpus(hyps, range(16)) - corpus(base, range(16)))


def test_the_signatures_are_those_of_the_metrics_that_scored(tiny_ckpt, tmp_path, monkeypatch):
    """Whatever sacreBLEU's metrics are set to, results.json's signatures are theirs and so are the scores."""
    import sacrebleu

    monkeypatch.setattr(comparison, "mt_metrics", lambda: {"sacrebleu": sacrebleu.BLEU(lowercase=True),
                                                           "chrf++": sacrebleu.CHRF(word_order=0)})
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    held = comparison.evaluation_pairs(PAIRS[:2], 128, 2)
    record = {"data": "pairs.csv", "rows_read": 12, "heldout": [2, 3], "data_sha256": "x"}
    comparison.run(model, [], PAIRS[4:5], held, tmp_path, 2, comparison.settings_of("tiny", 0, 12, 2, 128, record))
    results = json.loads((tmp_path / "results.json").read_text())
    signed = results["sacrebleu_signatures"]
    assert "case:lc" in signed["sacrebleu"] and "nw:0" in signed["chrf++"], signed
    rows = results["translations"]["fr->en"]
    hyps, refs = [r["0-shot"] for r in rows], [r["reference"] for r in rows]
    assert results["scores"]["0-shot fr->en"]["chrf++"] == sacrebleu.CHRF(word_order=0).corpus_score(hyps, [refs]).score


def test_a_few_shot_prompt_read_through_the_examples_cache_is_the_whole_prompt(tiny_ckpt, monkeypatch):
    """The first answer token's logits, from FewShot's cache of the examples and the sentence after it, are the whole prompt's."""
    from mini_gpt2.generate import prefill

    model = from_pretrained(tiny_ckpt[0], device="cpu")
    few = prompting.FewShot(model, [("Thank you.", "Merci."), ("The cat sleeps.", "Le chat dort.")])
    texts = ["Où est la gare ?", "Il pleut aujourd'hui, et il fait froid."]
    seen = []

    def first_logits(model, prompts, limits, *, past_kv=None, past_valid=None, past_positions=None, **decoding):
        h, _, _, _ = prefill(model, prompts, past_kv, past_valid, past_positions, 1)
        seen.append(model.logits(h[:, -1]))
        return [[] for _ in prompts]

    monkeypatch.setattr(prompting, "generate", first_logits)
    few(texts, "fr", "en", [5, 5])
    with torch.no_grad():
        for text, logits in zip(texts, seen[0]):
            whole = model(torch.tensor([mini_gpt2.encode(prompting.few_shot_prompt(few.examples, text, "fr", "en"))]))
            assert torch.allclose(logits, whole[0, -1], atol=1e-4), (logits - whole[0, -1]).abs().max()
