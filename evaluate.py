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

    python train.py --eval-only --prefix runs/prefix/prefix.safetensors [runs/prompt/prefix.safetensors ...]

train.py runs `run` after training; `--eval-only` runs `eval_only`, the comparison alone.
"""

import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from tqdm import tqdm

import cli
import data
import mini_gpt2
import plots
from cli import positive_int
from methods import translate
from mini_gpt2 import UserError, encode
from mini_gpt2.files import write_bytes
from prefix import encode_sentence, fits, max_new_tokens_for
from prompting import DIRECTIONS, FewShot, few_shot_head, few_shot_tail
from mini_gpt2.load import config_of
from prefix_file import check_fits, load_prefixes

N_EXAMPLES = 5  # examples per direction in results.md


class Pair(NamedTuple):
    """A held-out pair: its sentences {"en": ..., "fr": ...}, and their tokens as translation reads them."""
    text: dict
    ids: dict


def add_args(ap):
    g = ap.add_argument_group("evaluation (prefix files against zero- and few-shot prompting)")
    g.add_argument("--eval-only", action="store_true", help="skip training; evaluate the prefix files given by --prefix")
    g.add_argument("--prefix", nargs="+", help="prefix (or prompt) files for --eval-only, each a row of the table "
                   "(default: --out/prefix.safetensors)")
    g.add_argument("--eval-size", type=positive_int, default=500, help="held-out pairs to evaluate, each both ways (default 500)")
    g.add_argument("--shots", type=positive_int, default=3, help="examples in the few-shot prompt (default 3)")
    g.add_argument("--eval-batch-size", type=positive_int, default=16, help="sentences decoded together (default 16)")


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


# ----------------------------------------------------------------------------- the methods compared

class Prefix:
    """Translation with a prefix file of either method."""

    def __init__(self, model, learned, names, method="prefix"):
        self.model, self.learned, self.names, self.method = model, learned, names, method

    def __call__(self, texts, sources, source, target, limits):
        return translate(self.model, self.learned, self.names, self.method, sources, [target] * len(sources), limits)


# ----------------------------------------------------------------------------- the evaluation

def translate_all(method, texts, sources, source, target, limits, batch_size, bar=None):
    """
    Every text (and its tokens, `sources`) through `method`, in batches of similar lengths (shortest
    first); results in the texts' order.
    """
    order = sorted(range(len(texts)), key=lambda i: limits[i])
    out = [None] * len(texts)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        for i, text in zip(rows, method(pick(texts), pick(sources), source, target, pick(limits))):
            out[i] = text
        if bar is not None:
            bar.update(len(rows))
    return out


def evaluate(methods, pairs, batch_size):
    """Translate the held-out pairs (Pair) both ways with each method {name: method}. Returns (scores, outputs)."""
    scores, outputs = {}, {}
    bar = tqdm(total=2 * len(methods) * len(pairs), desc="evaluating", unit=" sentences")
    for source, target in DIRECTIONS:
        texts, sources = [p.text[source] for p in pairs], [p.ids[source] for p in pairs]
        limits = [max_new_tokens_for(s) for s in sources]  # the same limit for every method
        for name, method in methods.items():
            outputs[(name, source, target)] = translate_all(method, texts, sources, source, target, limits, batch_size,
                                                            bar)
    bar.close()
    for name in methods:
        all_h, all_r = [], []
        for source, target in DIRECTIONS:
            refs = [p.text[target] for p in pairs]
            hyps = outputs[(name, source, target)]
            scores[f"{name} {source}->{target}"] = bleu_scores(hyps, refs) | {"pairs": len(pairs)}
            all_h, all_r = all_h + hyps, all_r + refs
        scores[f"{name} both"] = bleu_scores(all_h, all_r) | {"pairs": 2 * len(pairs)}
    return scores, outputs


def table(scores):
    """A Markdown table: method x direction."""
    lines = ["| method | direction | pairs | corpus BLEU | mean sentence BLEU (smoothed) | mean sentence BLEU (whitespace, unsmoothed) |",
             "|---|---|---:|---:|---:|---:|"]
    for key, s in scores.items():
        method, direction = key.rsplit(" ", 1)
        lines.append(f"| {method} | {direction} | {s['pairs']} | {s['corpus']:.2f} | {s['sentence_smoothed']:.2f} | "
                     f"{s['sentence_whitespace']:.2f} |")
    return "\n".join(lines)


def write_reports(out, scores, outputs, examples, prompts, pairs, settings):
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
                               "sentence_whitespace: str.split()",
               "split": split, "translations": samples}
    write_bytes(out / "results.json", json.dumps(results, ensure_ascii=False, indent=2).encode())

    md = [f"# {' against '.join(names)}", "",
          f"Model `{settings['model']}`, {settings['eval_size']} held-out pairs each way, greedy decoding, at most "
          f"twice the source length plus 8 tokens. BLEU in percent (NLTK; words and punctuation marks as tokens).",
          "", table(scores), ""]
    pictures = [(plots.bleu_png(scores, out / "bleu.png"), "BLEU by method and direction")]
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
    """Each prefix (or prompt) file, read and checked once: [(path, tensor, names, metadata)]."""
    return [(Path(path), *load_prefixes(path)) for path in paths]


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


def run(model, prefix_files, examples, pairs, out, batch_size, settings):
    """
    Evaluate zero-shot and few-shot prompting with `examples` ((en, fr) pairs), and each prefix file
    (read_files; made for this model), on the same held-out pairs (evaluation_pairs), `batch_size`
    sentences at a time: print the table; write results.json (with `settings`, whose "split" is
    data.load's record), results.md and bleu.png to `out`.
    """
    few_shot = FewShot(model, examples)
    methods = {"0-shot": FewShot(model, []), f"{len(examples)}-shot": few_shot}
    files = []
    for path, learned, names, meta in prefix_files:
        row = meta["method"] if meta["method"] not in methods else f"{meta['method']} ({path})"
        methods[row] = Prefix(model, learned, names, meta["method"])
        files.append({"row": row, "path": str(path), "method": meta["method"], "metadata": meta})
    with torch.no_grad():
        scores, outputs = evaluate(methods, pairs, batch_size)
    settings = {"model": settings["model"], "files": files, "eval_size": len(pairs), "shots": len(examples)} | settings
    prompts = {f"{s}->{t}": few_shot.prompt(s, t) for s, t in DIRECTIONS}
    paths = write_reports(out, scores, outputs, examples, prompts, pairs, settings)
    print("\n" + table(scores) + "\n")
    print(f"results: {paths[0]} and {paths[1]}")
    return scores


def check_split(meta, rows, heldout, seed, split):
    """Warn if the held-out pairs may not be the ones this prefix was kept from. split: data.load's record."""
    now = {"rows": str(rows), "heldout": str(heldout), "seed": str(seed)}
    differ = [f"--{k} {meta[k]}" for k in now if k in meta and meta[k] != now[k]]
    if meta.get("data_sha256", split["data_sha256"]) != split["data_sha256"]:
        differ.insert(0, f"data ({meta.get('data', '?')})")
    if differ:
        print(f"warning: the prefix was trained with other {', '.join(differ)}: its held-out pairs may differ from these")


def settings_of(args, record):
    """What results.json records of train.py's settings, with the split (data.load's record)."""
    return {"model": args.model, "seed": args.seed, "data": record["data"], "rows": args.rows, "heldout": args.heldout,
            "heldout_pairs": len(record["heldout"]), "max_len": args.max_len, "split": record}


def eval_only(args, out):
    """
    train.py --eval-only (`args`: its command line): the comparison alone, on the prefix files given
    (default: --out's own), with the model and split they were made with unless told otherwise.
    """
    paths = [Path(p) for p in args.prefix or [Path(out) / "prefix.safetensors"]]
    for path in paths:
        if not path.exists():
            raise UserError(f"no prefix file at {path}: train one first, or point --prefix at one")
    files = read_files(paths)
    meta = files[0][3]
    args.model = args.model or meta.get("model", cli.DEFAULT_MODEL)
    data.fill_split_settings(args, meta)  # the first file's split, unless told otherwise
    config = config_of(args.model)  # a small file: every prefix is checked against it before the model loads
    for path, _, _, file_meta in files:
        check_fits(file_meta, config, path)
    cli.note_if_slow(args.model, args.device)
    pairs, split, shots, record = data.load(args.data, args.rows, args.heldout, args.val_size, args.seed, args.shots)
    for _, _, _, file_meta in files:
        check_split(file_meta, args.rows, args.heldout, args.seed, record)
    held_out = evaluation_pairs([pairs[i] for i in split.held], args.max_len, args.eval_size)
    examples = [pairs[i] for i in shots]
    check_few_shot_room(examples, held_out, config.n_positions, args.shots)
    model = mini_gpt2.from_pretrained(args.model, device=args.device, dtype=cli.DTYPES[args.dtype])
    run(model, files, examples, held_out, out, args.eval_batch_size, settings_of(args, record))
    return 0
