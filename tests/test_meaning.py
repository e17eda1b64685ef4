"""
What the final table means, guarded from outside: the loss train.py reports and the translations
translate.py prints are those of the layout README documents, computed again on transformers'
GPT-2 (tests/reference.py); translations stop where they should; the few-shot examples are real,
aligned pairs of the training side.
"""

import json

import pytest
import torch
from transformers import GPT2LMHeadModel

from machinery import data
from methods import prompting
import train
import translate
from methods import lora
from mini_gpt2 import EOT, decode, encode, from_pretrained, generate, save_pretrained
from methods import METHODS
from tests import reference
from tests.conftest import load_learned, train_args

DIRECTIONS = (("fr", "en", "[start_french]", "[start_english]"), ("en", "fr", "[start_english]", "[start_french]"))


RUNS = {"prefix": [], "prompt": ["--method", "prompt"], "reparam": ["--reparam", "--lr", "0.01"],
        "lora": ["--method", "lora", "--lr", "0.01"], "finetune": ["--method", "finetune", "--lr", "0.001"]}
FILES = {"prompt": "prompt.safetensors", "lora": "lora.safetensors", "finetune": "model"}


@pytest.fixture(scope="module")
def runs(tiny_ckpt, csv_file, tmp_path_factory):
    """
    A short training run of each method (and of prefixes through the MLP), from random prefixes (so
    that the two differ clearly), on a split of their own (--seed 5: not the default's).
    """
    out = {}
    for name, extra in RUNS.items():
        out[name] = tmp_path_factory.mktemp(name) / "run"
        args = train_args(tiny_ckpt[0], csv_file, out[name], *extra, "--init", "random", "--steps", 2, "--seed", 5,
                          "--no-eval")
        assert train.main(args) == 0
    return out


def rows_by_line(csv_file):
    pairs, lines, _ = data.read_pairs(csv_file)
    return dict(zip(lines, pairs))


@pytest.mark.parametrize("run", list(RUNS))
def test_the_saved_loss_is_transformers_nll_in_the_documented_layout(runs, tiny_ckpt, csv_file, run, tmp_path):
    """prefix.safetensors' val_loss, from train.py's own examples, is the NLL transformers' GPT-2 gives in that layout."""
    path = runs[run] / FILES.get(run, "prefix.safetensors")
    learned, names, meta = load_learned(path)
    method = meta["method"]
    assert int(meta["step"]) == 2  # trained, and better than where it started
    record = json.loads((runs[run] / "split.json").read_text())
    at = rows_by_line(csv_file)
    ref = tiny_ckpt[1]
    if method == "lora":  # transformers' GPT-2 with the updates merged into its weights
        merged = lora.merge(from_pretrained(tiny_ckpt[0], device="cpu"), learned)
        save_pretrained(tmp_path / "merged", dict(merged.named_parameters()), merged.config)
        ref = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    elif method == "finetune":
        ref = GPT2LMHeadModel.from_pretrained(path).eval()
    total, n = 0.0, 0
    for line in record["validation"]:
        pair = dict(zip(("en", "fr"), at[line]))
        for source, target, sp, tp in DIRECTIONS:
            tgt = reference.sentence(pair[target]) + [EOT]
            if method in ("lora", "finetune"):  # the zero-shot prompt, then the target
                total += reference.zero_shot_nll(ref, pair[source], pair[target], source, target)
            else:
                total += reference.target_nll(ref, method, learned, names.index(sp), names.index(tp),
                                              reference.sentence(pair[source]), tgt)
            n += len(tgt)
    assert record["validation"] and method == (run if run != "reparam" else "prefix")
    assert total / n == pytest.approx(float(meta["val_loss"]), abs=1e-4)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_translate_py_is_transformers_greedy_decoding_in_that_layout(runs, tiny_ckpt, call, method):
    path = runs[method] / FILES.get(method, "prefix.safetensors")
    learned, names, _ = load_learned(path)
    texts = {"fr": ["Bonjour! Je m'appelle Sully.", "Merci."], "en": ["Where is the station?", "Good night, my friend."]}
    for source, target, sp, tp in DIRECTIONS:
        r = call(translate.main, "--prefix", path, "--to", target, "--max-new-tokens", 6,
                 *texts[source])
        assert r.returncode == 0, r.stderr
        got = r.stdout.split("\n")[:-1]
        assert len(got) == len(texts[source])
        for text, line in zip(texts[source], got):
            src, (i, j) = reference.sentence(text), (names.index(sp), names.index(tp))
            want = reference.greedy(tiny_ckpt[1], method, learned, i, j, src, 6)
            logits_after = lambda out: reference.LOGITS[method](tiny_ckpt[1], learned, i, j, src, out)[-1]  # noqa: E731
            assert reference.same_text_up_to_a_tie(want, line, logits_after), (text, line)


# ----------------------------------------------------------------------------- stopping

def forced(tiny_ckpt, position, token):
    """
    The tiny model, made to predict `token` at `position` whatever comes before: a huge position
    embedding there, along that token's embedding, outweighs everything else in the residual. The
    positions before it compute what they did (they never attend to it).
    """
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    with torch.no_grad():
        e = model.wte.weight[token]
        model.wpe.weight[position] = 1e3 * e / e.norm()
        probe = torch.randint(0, EOT, (1, position + 1), generator=torch.Generator().manual_seed(0))
        assert model(probe)[0, position].argmax().item() == token  # the construction works
    return model


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_translation_stops_at_endoftext_and_keeps_what_came_before(runs, tiny_ckpt, method):
    learned, names, _ = load_learned(runs[method] / FILES.get(method, "prefix.safetensors"))
    texts = ["Bonjour! Je m'appelle Sully.", "Il pleut aujourd'hui, et il fait froid."]
    sources = [reference.sentence(t) for t in texts]
    fr, en = names.index("[start_french]"), names.index("[start_english]")
    free = METHODS[method].translate_ids(from_pretrained(tiny_ckpt[0], device="cpu"), learned, sources, [fr, fr],
                                         [en, en], 12)
    # Target token i of a row sits at position taken + len(source) + i (the prompts' 2P positions come
    # first). The one at the longer source's first target position is made to predict <|endoftext|>:
    # that row stops after one token, the shorter one some tokens later, each with what came before.
    taken = 2 * learned.size(1) if method == "prompt" else 0
    q = taken + max(map(len, sources))
    got = METHODS[method].translate_ids(forced(tiny_ckpt, q, EOT), learned, sources, [fr, fr], [en, en], 12)
    for source, g, f in zip(sources, got, free):
        k = q - (taken + len(source)) + 1  # the tokens before the one position q predicts
        assert len(f) >= k and g == f[:k], (g, f)
    assert len(got[0]) > len(got[1]) == 1


def test_few_shot_answers_stop_at_the_end_of_their_line(tiny_ckpt):
    examples = [("Thank you.", "Merci."), ("The cat sleeps.", "Le chat dort.")]
    texts = ["Où est la gare ?", "Il pleut aujourd'hui, et il fait froid."]
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    few = prompting.FewShot(model, examples)
    prompts = [encode(prompting.few_shot_prompt(few.examples, t, "fr", "en")) for t in texts]
    free = generate(model, prompts, [12, 12], stop_ids=())  # the answers if nothing ended them
    q = max(map(len, prompts)) + 1  # the longer prompt's second answer token predicts the end of the line
    for newline in (198, 628):  # "\n" and "\n\n"
        got = prompting.FewShot(forced(tiny_ckpt, q, newline), examples)(texts, "fr", "en", [12, 12])
        for prompt, g, f in zip(prompts, got, free):
            assert g == decode(f[:q - len(prompt) + 1]).strip(), (g, f)
        assert "\n" not in "".join(got) and got[0] != got[1]


# ----------------------------------------------------------------------------- the few-shot examples

def test_few_shot_examples_are_aligned_rows_of_the_training_side(runs, csv_file, call):
    """results.json holds each direction's prompt as the model read it; each example in it is one CSV row, trained on."""
    out = runs["prefix"]
    split_before = (out / "split.json").read_bytes()
    r = call(train.main, "--eval-only", "--out", out, "--eval-size", 2)  # no --data: the prefix file's own
    assert r.returncode == 0, r.stderr
    assert (out / "split.json").read_bytes() == split_before  # the training run's record stays as it was
    results = json.loads((out / "results.json").read_text())
    record = json.loads(split_before)
    at = rows_by_line(csv_file)
    not_trained = set(record["heldout"] + record["validation"] + record["dropped_near_duplicates"])
    seen = {}
    for direction, prompt in results["few_shot_prompts"].items():
        source, target = direction.split("->")
        *blocks, last = prompt.split("\n\n")
        assert last == f"{source}:" and len(blocks) == 3
        for block in blocks:
            first, second = block.split("\n")
            assert first.startswith(f"{source}: ") and second.startswith(f"{target}: ")
            pair = {source: first[len(source) + 2:], target: second[len(target) + 2:]}
            lines = {line for line, (en, fr) in at.items() if (en, fr) == (pair["en"], pair["fr"])}
            assert lines & set(record["few_shot"]) and not lines & not_trained, (direction, pair)
            seen.setdefault(direction, set()).add((pair["en"], pair["fr"]))
    assert seen["fr->en"] == seen["en->fr"] and len(seen["fr->en"]) == 3  # the same pairs both ways
    evaluated = {(row["source"], row["reference"]) for rows in results["translations"].values() for row in rows}
    held = {pair for line in record["heldout"] for pair in (at[line], at[line][::-1])}
    assert evaluated and evaluated <= {(fr, en) for en, fr in held} | held  # the run's own held-out pairs


def test_every_row_of_the_table_is_transformers_greedy_in_its_layout(runs, tiny_ckpt, call):
    """
    The comparison's translations, each decoded again on transformers' GPT-2: 0-shot from
    "fr: <sentence>\nen:", 3-shot from the recorded prompt, the prefix row in its layout; all
    greedy, to the end of the line (prompting) or <|endoftext|> (prefixes), at most twice the
    source's tokens plus 8.
    """
    out = runs["prefix"]
    assert call(train.main, "--eval-only", "--out", out, "--eval-size", 2).returncode == 0
    results = json.loads((out / "results.json").read_text())
    learned, names, _ = load_learned(out / "prefix.safetensors")
    ref, line_ends = tiny_ckpt[1], lambda t: t == EOT or "\n" in decode([t])
    for (source, target, sp, tp), direction in zip(DIRECTIONS, ("fr->en", "en->fr")):
        for row in results["translations"][direction]:
            limit = 2 * len(reference.sentence(row["source"])) + 8
            prompts = {"0-shot": f"{source}:", "3-shot": results["few_shot_prompts"][direction]}
            for name, head in prompts.items():
                ids = encode(f"{head} {row['source']}\n{target}:")
                want = reference.greedy_text(ref, ids, limit, line_ends)
                logits_after = lambda out: ref(input_ids=torch.tensor([ids + out])).logits[0, -1]  # noqa: E731
                assert reference.same_text_up_to_a_tie(want, row[name], logits_after), (name, row)
            src, (i, j) = reference.sentence(row["source"]), (names.index(sp), names.index(tp))
            want = reference.greedy(ref, "prefix", learned, i, j, src, limit)
            logits_after = lambda out: reference.prefix_logits(ref, learned, i, j, src, out)[-1]  # noqa: E731
            assert reference.same_text_up_to_a_tie(want, row["prefix"], logits_after), row
