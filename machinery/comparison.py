"""
The comparison: learned prefixes (or prompts) against zero-shot and 3-shot prompting of the same
frozen GPT-2, by BLEU, on held-out pairs, in both directions.

3-shot prompting gives the model three real translation pairs from the training split, then the
sentence to translate, and lets it continue greedily until the end of the line:

    fr: <French>
    en: <English>

    fr: <French>
    en: <English>

    fr: <French>
    en: <English>

    fr: <the sentence>
    en:

(with en/fr swapped for English to French); zero-shot is the same with no examples. Every method
decodes greedily with the same length limit. BLEU is NLTK's, on tokens made by `bleu_tokens`
(words and punctuation marks apart).

    python train.py --eval-only --learned runs/prefix [runs/prompt/prompt.safetensors ...]

train.py runs `run` after training, and with --eval-only, alone.
"""

import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from tqdm import tqdm

import methods
from machinery import cli, dist, plots
from machinery.cli import positive_int
from methods import METHODS
from methods.prompting import DIRECTIONS, FewShot, few_shot_head, few_shot_tail
from mini_gpt2 import UserError, encode, fast
from mini_gpt2.files import write_bytes
from prefix import encode_sentence, fits, max_new_tokens_for

N_EXAMPLES = 5  # examples per direction in results.md
RESAMPLES = 1000  # of the paired bootstrap


class Pair(NamedTuple):
    """A held-out pair: its sentences {"en": ..., "fr": ...}, and their tokens as translation reads them."""
    text: dict
    ids: dict


def add_args(ap):
    g = ap.add_argument_group("evaluation (prefix files against zero- and few-shot prompting)")
    g.add_argument("--eval-only", action="store_true", help="skip training; evaluate the files given by --learned")
    g.add_argument("--learned", "--prefix", nargs="+", help="for --eval-only: files of what train.py learned, of any "
                   "--method (prefix.safetensors, lora.safetensors, ...), fine-tuned model folders, or training runs' "
                   "--out folders, each a row of the table (default: --out's own)")
    g.add_argument("--eval-size", type=positive_int, default=500, help="held-out pairs to evaluate, each both ways (default %(default)s)")
    g.add_argument("--shots", type=positive_int, default=3, help="examples in the few-shot prompt (default %(default)s)")
    g.add_argument("--eval-batch-size", type=positive_int, default=16, help="sentences decoded together (default %(default)s)")


# ----------------------------------------------------------------------------- BLEU

def bleu_tokens(text):
    """Words and single punctuation marks, case kept: "L'été, déjà." -> L ' été , déjà ."""
    return re.findall(r"\w+|[^\w\s]", text)


def bleu_scores(hypotheses, references):
    """
    BLEU of hypotheses against one reference each, in percent:
    corpus: NLTK corpus BLEU (4-grams), the headline figure;
    sentence_smoothed: the mean of sentence BLEU with smoothing method 1 (no zero for a missing 4-gram);
    sentence_whitespace: the mean of unsmoothed sentence BLEU on whitespace tokens, as the original
    experiment computed it (a sentence with no matching 4-gram scores 0).
    """
    hyp, ref = [bleu_tokens(h) for h in hypotheses], [[bleu_tokens(r)] for r in references]
    smooth = SmoothingFunction().method1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns about every sentence without some n-gram
        scores = {
            "corpus": corpus_bleu(ref, hyp),
            "sentence_smoothed": sum(sentence_bleu(r, h, smoothing_function=smooth) for r, h in zip(ref, hyp)) / len(hyp),
            "sentence_whitespace": sum(sentence_bleu([r.split()], h.split()) for r, h in zip(references, hypotheses)) / len(hyp),
        }
    return {k: 100 * v for k, v in scores.items()}


def mt_metrics():
    """
    What machine-translation papers report (Post, 2018): sacreBLEU's corpus BLEU and chrF++, with its
    defaults (its own 13a tokens, not ours), as metric objects {name: metric}; {} without sacrebleu.
    The scores and their signatures both come from these very objects.
    """
    sacrebleu = cli.optional("sacrebleu")
    return {} if sacrebleu is None else {"sacrebleu": sacrebleu.BLEU(), "chrf++": sacrebleu.CHRF(word_order=2)}


def mt_scores(hypotheses, references, metrics):
    """Each of mt_metrics()'s corpus scores of the hypotheses against one reference each, in percent."""
    return {name: m.corpus_score(hypotheses, [references]).score for name, m in metrics.items()}


def signatures(metrics):
    """What each metric computed its scores with (after its first score: a signature also says how many references)."""
    return {name: str(m.get_signature()) for name, m in metrics.items()} or None


def bleu_stats(hypotheses, references):
    """
    Each sentence's counts for corpus BLEU on bleu_tokens, as NLTK's corpus_bleu takes them:
    (N, 10) = matched and counted n-grams for n = 1..4 (counted at least 1, as NLTK does), then
    the hypothesis' and the reference's length. Corpus BLEU is a function of their sums.
    """
    rows = []
    for h, r in zip(hypotheses, references):
        h, r = bleu_tokens(h), bleu_tokens(r)
        row = []
        for n in (1, 2, 3, 4):
            hc, rc = Counter(zip(*[h[i:] for i in range(n)])), Counter(zip(*[r[i:] for i in range(n)]))
            row.append(sum(min(c, rc[g]) for g, c in hc.items()))
            row.append(max(1, sum(hc.values())))
        rows.append(row[0::2] + row[1::2] + [len(h), len(r)])
    return np.array(rows, dtype=np.float64)


def bleu_from_stats(sums):
    """Corpus BLEU in percent from summed bleu_stats (..., 10): 0 if some n-gram order matched nothing."""
    matched, counted, c, r = sums[..., :4], sums[..., 4:8], sums[..., 8], sums[..., 9]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.exp(np.log(matched / counted).mean(-1))
        brevity = np.where(c > r, 1.0, np.exp(1 - r / np.maximum(c, 1e-9)))
    return 100 * np.where((matched > 0).all(-1) & (c > 0), brevity * precision, 0.0)


def paired_bootstrap(hyps, baseline, references, seed, resamples=RESAMPLES):
    """
    Corpus BLEU of `hyps` minus that of `baseline` on the same references, and its 95% interval
    (Koehn, 2004): the sentences resampled with replacement `resamples` times, both systems on
    each sample, the 2.5th and 97.5th percentiles of the differences. Seeded: the same each run.
    """
    a, b = bleu_stats(hyps, references), bleu_stats(baseline, references)
    picks = np.random.default_rng(seed).integers(0, len(references), size=(resamples, len(references)))
    differences = bleu_from_stats(a[picks].sum(1)) - bleu_from_stats(b[picks].sum(1))
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"delta": float(bleu_from_stats(a.sum(0)) - bleu_from_stats(b.sum(0))), "delta_low": float(low),
            "delta_high": float(high)}


# ----------------------------------------------------------------------------- the evaluation

def translate_all(translate, texts, source, target, limits, batch_size, bar=None):
    """
    Every text through `translate` (a method's translator), in batches of similar lengths (shortest
    first); results in the texts' order. Under torchrun each process decodes every world-th batch,
    the very batches one process would, and all of them get every result.
    """
    order = sorted(range(len(texts)), key=lambda i: limits[i])
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    graphs = fast.Graphs()  # on a GPU, batches of one size and similar lengths replay one captured step

    def mine():
        done = {}
        for j, rows in enumerate(dist.share(batches)):
            pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
            done |= dict(zip(rows, translate(pick(texts), source, target, pick(limits), graphs=graphs)))
            if bar is not None:  # this batch, and those the other processes decode beside it
                bar.update(sum(map(len, batches[j * dist.world:(j + 1) * dist.world])))
        return done

    out = [None] * len(texts)
    for done in dist.gather(dist.together(mine)):
        for i, text in done.items():
            out[i] = text
    return out


def evaluate(translators, pairs, batch_size, baseline=None, seed=0, metrics=None):
    """
    Translate the held-out pairs (Pair) both ways with each row's translator {name: translator};
    score each direction and both together (with mt_metrics' `metrics` too), and every other row
    against `baseline` (a name among them: paired_bootstrap with `seed`). Returns (scores, outputs).
    """
    scores, outputs, metrics = {}, {}, mt_metrics() if metrics is None else metrics
    with tqdm(total=2 * len(translators) * len(pairs), desc="evaluating", unit=" sentences") as bar:  # closed if stopped
        for source, target in DIRECTIONS:
            texts = [p.text[source] for p in pairs]
            limits = [max_new_tokens_for(p.ids[source]) for p in pairs]  # the same limit for every row
            for name, translate in translators.items():
                outputs[(name, source, target)] = translate_all(translate, texts, source, target, limits, batch_size, bar)
    for name in translators:
        for direction in [f"{s}->{t}" for s, t in DIRECTIONS] + ["both"]:
            picked = [(s, t) for s, t in DIRECTIONS if direction in (f"{s}->{t}", "both")]
            refs = [p.text[t] for s, t in picked for p in pairs]
            hyps = [h for s, t in picked for h in outputs[(name, s, t)]]
            row = scores[f"{name} {direction}"] = bleu_scores(hyps, refs) | mt_scores(hyps, refs, metrics) | {"pairs": len(refs)}
            if baseline and name != baseline:
                row |= paired_bootstrap(hyps, [h for s, t in picked for h in outputs[(baseline, s, t)]], refs, seed)
    return scores, outputs


# The score columns of the table: header -> key in results.json's scores; the terminal shows the first, the
# sacreBLEU and chrF++ ones (the whole table is in results.md).
SCORES = {"corpus BLEU": "corpus", "mean sentence BLEU (smoothed)": "sentence_smoothed",
          "mean sentence BLEU (whitespace, unsmoothed)": "sentence_whitespace", "sacreBLEU": "sacrebleu", "chrF++": "chrf++"}
ON_THE_TERMINAL = ("corpus BLEU", "sacreBLEU", "chrF++")
ABOUT = {"trainable parameters": "trainable_params", "file": "file_size", "training tokens/s": "tokens_per_s",
         "training peak memory": "peak_memory"}
WIDTH = 20  # the terminal table's longest row name: it fits 100 columns


def table(scores, about=None, baseline="3-shot", terminal=False):
    """
    A Markdown table: method x direction, every score (terminal: the three MT papers report, in at
    most 100 columns), the difference from `baseline` with its interval, and per method (`about`
    {row: {...}}; not on the terminal) what it learned, its file's size, its run's speed and memory.
    """
    columns = [h for h in SCORES if h in ON_THE_TERMINAL or not terminal]
    extra = [] if terminal else list(ABOUT)
    headers = ["method", "direction", "pairs", *columns, f"corpus BLEU - {baseline} [95% CI]", *extra]
    lines = ["| " + " | ".join(headers) + " |", "|---|---|" + "---:|" * (len(headers) - 2)]
    for key, s in scores.items():
        method, direction = key.rsplit(" ", 1)
        if terminal and len(method) > WIDTH:
            method = method[:WIDTH - 1] + "…"
        delta = f"{s['delta']:+.2f} [{s['delta_low']:+.2f}, {s['delta_high']:+.2f}]" if "delta" in s else "-"
        a = (about or {}).get(key.rsplit(" ", 1)[0], {})
        cells = [method, direction, str(s["pairs"]), *(f"{s[SCORES[h]]:.2f}" if SCORES[h] in s else "-" for h in columns),
                 delta, *(str(a.get(ABOUT[h], "-")) for h in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    if "sacrebleu" not in next(iter(scores.values())):
        lines.append("\nsacreBLEU and chrF++: not computed, sacrebleu is not installed (pip install sacrebleu)")
    return "\n".join(lines)


def what_was_compared(settings):
    """The model, the data and how much of it, in a line: for results.md and bleu.png."""
    return (f"{settings['model']}, {Path(settings['data']).name} ({settings['rows_read']:,} pairs read), {settings['eval_size']} held-out pairs "
            f"each way")


def about_file(path, meta):
    """What the table says of a file's method: how many numbers it learned, the file's size, the run's speed and memory."""
    path = Path(path)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size
    peak = meta.get("peak_memory_gib")
    return {"trainable_params": f"{int(meta['trainable_params']):,}" if meta.get("trainable_params") else "-",
            "file_size": f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 2**10:,.0f} KiB",
            "tokens_per_s": f"{int(meta['tokens_per_s']):,}" if meta.get("tokens_per_s") else "-",
            "peak_memory": f"{peak} GiB" if peak else "-"}


def write_reports(out, scores, outputs, examples, prompts, pairs, settings, about, signed):
    """results.json (everything), results.md (the table, the pictures, examples) and bleu.png."""
    out = Path(out)
    names = list(dict.fromkeys(k[0] for k in outputs))  # the methods, in order
    samples = {f"{s}->{t}": [{"source": p.text[s], "reference": p.text[t]} | {n: outputs[(n, s, t)][i] for n in names}
                             for i, p in enumerate(pairs)]
               for s, t in DIRECTIONS}
    settings = dict(settings)
    split = settings.pop("split")
    results = {"scores": scores, "settings": settings, "few_shot_examples": [{"en": e, "fr": f} for e, f in examples],
               # as the model read it, per direction; each sentence followed as " <sentence>\n<target>:"
               "few_shot_prompts": prompts,
               "tokenisation": "BLEU on words and single punctuation marks (regex \\w+|[^\\w\\s]), case kept; "
                               "sentence_whitespace: str.split(); sacrebleu and chrf++: sacreBLEU's own",
               "sacrebleu_signatures": signed, "about": about,
               "delta": f"corpus BLEU minus the baseline's on the same sentences, with the 95% interval of {RESAMPLES} paired "
                        f"bootstrap resamples (seed {settings['seed']})",
               "split": split, "translations": samples}
    write_bytes(out / "results.json", json.dumps(results, ensure_ascii=False, indent=2).encode())

    learned = "".join(f"\n- {f['row']}: `{f['path']}`, {f['metadata'].get('steps', '?')} steps of "
                      f"{f['metadata'].get('batch', '?')} sequences on {Path(f['metadata'].get('data', '?')).name}"
                      for f in settings["files"])
    md = [f"# {' against '.join(names)}", "",
          f"{what_was_compared(settings)}: greedy decoding, at most twice the source length plus 8 tokens. BLEU in percent "
          f"(NLTK; words and punctuation marks as tokens), sacreBLEU and chrF++ with sacreBLEU's own tokens "
          f"({(signed or {}).get('sacrebleu', 'not installed')}); the difference from the baseline with its 95% "
          f"paired-bootstrap interval ({RESAMPLES} resamples). What was learned:{learned or ' nothing (prompting only)'}",
          "", table(scores, about, f"{settings['shots']}-shot"), ""]
    pictures = [(plots.bleu_png(scores, out / "bleu.png", f"Corpus BLEU: {what_was_compared(settings)}"),
                 "BLEU by method and direction")]
    pictures += [(out / "loss.png" if (out / "loss.png").exists() else None, "training and validation loss")]
    md += [f"![{what}]({path.name})\n" for path, what in pictures if path]
    md += ["## Examples", ""]
    for direction, rows in samples.items():
        md += [f"### {direction}", ""]
        for row in rows[:N_EXAMPLES]:
            md += [f"- source: {row['source']}", f"  - reference: {row['reference']}"]
            md += [f"  - {n}: {row[n]}" for n in names] + [""]
    write_bytes(out / "results.md", "\n".join(md).encode())
    return out / "results.json", out / "results.md"


def read_files(paths):
    """
    Each file (or fine-tuned model folder), read and checked once: [(path, learned, metadata)]
    (methods.load). A training run's --out stands for its best file.
    """
    return [(Path(path), *methods.load(path)) for path in map(methods.best_file_in, paths)]


def evaluation_pairs(held_out, max_len, eval_size):
    """
    The first `eval_size` held-out (en, fr) pairs that fit --max-len as training examples must
    (prefix.fits; longer ones are left out, as in training), as Pairs.
    """
    pairs = []
    for en, fr in held_out:
        ids = {"en": encode_sentence(en), "fr": encode_sentence(fr)}
        if fits(ids["en"], ids["fr"], max_len):
            pairs.append(Pair({"en": en, "fr": fr}, ids))
    if len(pairs) < len(held_out):
        print(f"evaluation: {len(held_out) - len(pairs)} held-out pairs longer than --max-len {max_len} left out")
    if not pairs:
        raise UserError("no held-out pair to evaluate")
    return pairs[:eval_size]


def held_out_and_examples(pairs, split, shots, max_len, eval_size, n_positions, n_shots):
    """
    The held-out Pairs to translate and the few-shot examples (en, fr) of data.load's `split` and
    `shots`, checked to fit GPT-2's positions together (n_shots: the --shots asked for).
    """
    held_out = evaluation_pairs([pairs[i] for i in split.held], max_len, eval_size)
    examples = [pairs[i] for i in shots]
    check_few_shot_room(examples, held_out, n_positions, n_shots)
    return held_out, examples


def check_few_shot_room(examples, pairs, n_positions, shots):
    """A one-line error, before the model loads, if the few-shot prompt and a translation pass GPT-2's positions."""
    shots_ = [{"en": e, "fr": f} for e, f in examples]
    for source, target in DIRECTIONS:
        head = len(encode(few_shot_head(shots_, source, target)))
        longest = max(len(encode(few_shot_tail(p.text[source], target))) + max_new_tokens_for(p.ids[source])
                      for p in pairs)
        if head + longest > n_positions:
            raise UserError(f"--shots {shots}: the examples take {head} positions, and with the longest held-out sentence "
                            f"and its translation the {source}->{target} prompt needs {head + longest}, more than GPT-2's "
                            f"{n_positions}: lower --shots")


def check_prompt_room(pairs, n_positions, taken, who, fix):
    """
    A one-line error, before the model loads, if learned prompts (`taken` positions: 2P), the
    longest held-out sentence and its translation would pass GPT-2's positions. (The zero-shot
    prompt of lora and finetune is checked with the few-shot ones: check_few_shot_room.)
    """
    longest = max(len(p.ids[s]) + max_new_tokens_for(p.ids[s]) for p in pairs for s in ("en", "fr"))
    if taken + longest > n_positions:
        raise UserError(f"{who}: the prompts take {taken} positions, and with the longest held-out sentence and its "
                        f"translation the comparison needs {taken + longest}, more than GPT-2's {n_positions}: {fix}")


def run(model, learned_files, examples, pairs, out, batch_size, settings):
    """
    Evaluate zero-shot and few-shot prompting with `examples` ((en, fr) pairs), and each learned
    file (read_files; made for this model), on the same held-out pairs (evaluation_pairs),
    `batch_size` sentences at a time: print the table; write results.json (with `settings`, whose
    "split" is data.load's record), results.md and bleu.png to `out`.
    """
    few_shot = FewShot(model, examples)
    baseline = f"{len(examples)}-shot"
    translators = {"0-shot": FewShot(model, []), baseline: few_shot}
    files, about = [], {"0-shot": {"trainable_params": "0"}, baseline: {"trainable_params": "0"}}
    for path, learned, meta in learned_files:
        row = meta["method"] if meta["method"] not in translators else f"{meta['method']} ({path})"
        translators[row] = METHODS[meta["method"]].translator(model, learned)
        files.append({"row": row, "path": str(Path(path).absolute()), "method": meta["method"], "metadata": meta})
        about[row] = about_file(path, meta)
    metrics = mt_metrics()
    with torch.no_grad():
        scores, outputs = evaluate(translators, pairs, batch_size, baseline, settings["seed"], metrics)
    settings = {"model": settings["model"], "files": files, "eval_size": len(pairs), "shots": len(examples),
                "rows_read": settings["split"]["rows_read"]} | settings
    prompts = {f"{s}->{t}": few_shot.prompt(s, t) for s, t in DIRECTIONS}
    if not dist.is_main():  # process 0 writes and prints
        return scores
    paths = write_reports(out, scores, outputs, examples, prompts, pairs, settings, about, signatures(metrics))
    print("\n" + table(scores, about, baseline, terminal=True) + "\n")
    print(f"results: {paths[0]} and {paths[1]} (the whole table)")
    return scores


def check_results(out, paths):
    """
    --eval-only into a folder that holds results: only the same comparison (the same learned files)
    may replace them, and a note says so; another one would lose rows, and is refused in one line.
    """
    found = Path(out) / "results.json"
    if not found.exists():
        return
    rows = lambda files: sorted(str(Path(f).resolve()) for f in files)  # noqa: E731
    try:
        earlier = rows(f["path"] for f in json.loads(found.read_text(encoding="utf-8"))["settings"]["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{found} is not a comparison's results that can be read: move it (and results.md, bleu.png) "
                        f"away, or choose another --out") from None
    if earlier != rows(paths):
        raise UserError(f"{out} holds the results of another comparison ({found}): its table would lose its rows; "
                        f"choose another --out, or move its results.json, results.md and bleu.png away first")
    print(f"note: {out} holds this comparison's results already; they are replaced by the new ones")


def check_split(meta, rows, heldout, seed, split):
    """Warn if the held-out pairs may not be the ones this file was kept from. split: data.load's record."""
    now = {"rows": str(rows), "heldout": str(heldout), "seed": str(seed)}
    differ = [f"--{k} {meta[k]}" for k in now if k in meta and meta[k] != now[k]]
    if meta.get("data_sha256", split["data_sha256"]) != split["data_sha256"]:
        differ.insert(0, f"data ({meta.get('data', '?')})")
    if differ:
        print(f"warning: the {meta['method']} was trained with other {', '.join(differ)}: its held-out pairs may differ "
              "from these")


def settings_of(model, seed, rows, heldout, max_len, record):
    """What results.json records of train.py's settings, with the split (data.load's record)."""
    return {"model": model, "seed": seed, "data": record["data"], "rows": rows, "heldout": heldout,
            "heldout_pairs": len(record["heldout"]), "max_len": max_len, "split": record}
