"""
Translate between French and English with the prefixes train.py learned (or what another
--method learned: --learned names its file).

    python translate.py "Bonjour! Je m'appelle Sully."          # -> English
    python translate.py "Hello! My name is Sully." "Merci."     # each to the other language
    cat sentences.txt | python translate.py --to fr             # one line in, one line out
    python translate.py --learned runs/lora "Merci."            # with what a run of --method lora learned

The language of each input is guessed (--to overrides); the model is the one the file was
trained for unless --model says otherwise. Every input is checked before the model loads.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

import methods
import mini_gpt2
from machinery import cli
from machinery.cli import natural_float, positive_int
from machinery.learned_file import check_fits
from methods import METHODS
from mini_gpt2 import UserError, fast
from mini_gpt2.load import config_of, metadata_of
from prefix import check_room, encode_sentence, max_new_tokens_for

DEFAULT_PREFIX = Path("runs/prefix/prefix.safetensors")  # where train.py writes its prefixes

FRENCH_HINTS = set("le la les un une des du de et est je tu il elle nous vous ils elles ne pas que qui au aux "
                   "ce cette son sa ses mon ma mes pour dans sur avec c'est j'ai suis sont été très bonjour merci "
                   "oui non où".split())
ENGLISH_HINTS = set("the a an and is are was were i you he she we they not that which of to in on for with "
                    "it this my your his her be have has do does hello thanks yes no where".split())


def guess_language(text):
    """'fr' or 'en', from common words and French accents: crude, but these are the only two choices."""
    words = re.findall(r"[\w']+", text.lower())
    fr = sum(w in FRENCH_HINTS for w in words) + 2 * len(re.findall(r"[àâçéèêëîïôûùüœ]", text.lower()))
    en = sum(w in ENGLISH_HINTS for w in words)
    return "fr" if fr > en else "en"


def read_stdin():
    """The lines on stdin, decoded as UTF-8 whatever the locale (which may let bad bytes through as escapes)."""
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise UserError("the text on stdin is not UTF-8: convert it (e.g. iconv -f latin1 -t utf-8)") from None
    return lines[:-1] if lines[-1] == "" else lines  # the last line's newline ends it; it starts no empty one


def main(argv=None):
    ap = cli.ArgumentParser(prog="translate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", nargs="*", help="phrases to translate (default: one per line from stdin)")
    ap.add_argument("--to", choices=["en", "fr"], help="target language (default: the other one)")
    ap.add_argument("--learned", "--prefix", help=f"the file of what train.py learned, of any --method "
                    f"(prefix.safetensors, lora.safetensors, ...), its run's --out folder, or a fine-tuned model folder "
                    f"(default {DEFAULT_PREFIX}, or --model if that is a fine-tuned model)")
    ap.add_argument("--model", help="model size or checkpoint folder (default: the one the learned file was trained for); a "
                    "model folder that train.py --method finetune wrote translates by itself")
    ap.add_argument("--max-new-tokens", type=positive_int,
                    help="longest translation in tokens (default: twice the input, plus 8)")
    ap.add_argument("--temperature", type=natural_float, default=0.0, help="0 = greedy (default); higher samples more freely")
    ap.add_argument("--top-k", type=positive_int, help="with --temperature: sample only from the k most likely tokens")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="inputs translated together (default %(default)s)")
    cli.add_device_args(ap)
    ap.add_argument("--seed", type=cli.seed, help="seed for sampling")
    args = ap.parse_args(argv)
    args.device, args.dtype = cli.settle_device(ap, args.device, args.dtype)
    if args.top_k is not None and args.temperature == 0:
        ap.error("--top-k has no effect with greedy decoding: give --temperature above 0 too")

    path = methods.best_file_in(args.learned or (args.model if finetuned(args.model) else DEFAULT_PREFIX))
    if not path.exists():
        raise UserError(f"no prefix file at {path}: train one first with `python train.py` "
                        "(or point --learned at one)")
    texts = args.text or read_stdin()
    if not texts:
        raise UserError("nothing to translate: give phrases as arguments or one per line on stdin")

    learned, meta = methods.load(path)
    method = METHODS[meta["method"]]
    if method.FROZEN:
        name = args.model or meta.get("model", cli.DEFAULT_MODEL)
    else:  # the folder is the model itself, and translates by itself
        name, learned = path, None
    config = config_of(name)
    check_fits(meta, config, path)  # before the (large) model loads, as are the inputs
    todo = [i for i, t in enumerate(texts) if t.strip()]  # a blank line in gives a blank line out
    sources = {i: encode_sentence(texts[i]) for i in todo}
    limits = {i: args.max_new_tokens or max_new_tokens_for(sources[i]) for i in todo}
    taken = method.POSITIONS_PER_VIRTUAL_TOKEN * int(meta.get("prefix_len", 0)) + method.PROMPT_POSITIONS
    check_room(config.n_positions, list(sources.values()), list(limits.values()), taken=taken,
               numbers=[i + 1 for i in todo], option="--max-new-tokens" if args.max_new_tokens else None)
    cli.note_if_slow(str(name), args.device)
    model = mini_gpt2.from_pretrained(name, device=args.device, dtype=cli.DTYPES[args.dtype])
    translate = method.translator(model, learned)
    graphs = fast.Graphs()  # on a GPU, batches of one size and similar lengths replay one captured step
    generator = None
    if args.seed is not None:
        generator = torch.Generator(model.wte.weight.device).manual_seed(args.seed)

    for b in range(0, len(texts), args.batch_size):
        lines = [""] * len(texts[b:b + args.batch_size])
        targets = {i: args.to or ("en" if guess_language(texts[i]) == "fr" else "fr")
                   for i in todo if b <= i < b + args.batch_size}
        for target in ("en", "fr"):  # each direction of the batch as one
            rows = [i for i, t in targets.items() if t == target]
            if rows:
                out = translate([texts[i] for i in rows], "fr" if target == "en" else "en", target,
                                [limits[i] for i in rows], temperature=args.temperature, top_k=args.top_k,
                                generator=generator, graphs=graphs)
                for i, text in zip(rows, out):
                    lines[i - b] = text.replace("\n", " ")
        print("\n".join(lines), flush=True)
    return 0


def finetuned(path):
    """Whether --model `path` is a model folder that train.py --method finetune wrote (a damaged one is named in one line)."""
    return bool(path) and Path(path).exists() and metadata_of(path).get("method") == "finetune"


if __name__ == "__main__":
    cli.run(main)
