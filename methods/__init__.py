"""
The ways of teaching a frozen GPT-2 to translate, side by side: what each does differently, in
one table. Everything else (data, batches, the loss, the training loop, checkpoints, evaluation)
is one path for all of them.

- prefix (prefix.py, Li & Liang): learned keys and values in every layer's attention cache;
- prompt (prompt.py, the reference experiment): learned vectors in place of input embeddings;
- lora (lora.py, Hu et al.): a low-rank change of the attention's query and value weights;
- finetune (finetune.py): every weight.

The first two learn [start_french] and [start_english] and lay a translation out around them;
the last two learn no tokens and read a translation as the zero-shot prompt continued
(prompting.py). Prompting the frozen model (0-shot, 3-shot) is the baseline they all face.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from methods import finetune
from methods import lora
from machinery import learned_file
from mini_gpt2 import decode, from_pretrained
from prefix import LANGUAGES, NAMES, Prefixes, encode_sentence, init_from_words, init_random, prefix_hidden, translate_ids
from methods.prompt import prompt_from_words, prompt_hidden, prompt_random, prompt_translate_ids
from methods.prompting import ZERO_SHOT_TOKENS, FewShot, zero_shot_ids


@dataclass(frozen=True)
class Method:
    """What differs between the methods."""
    start: Callable       # (model, prefix_len, init, reparam, seed) -> what is learned, at its start (an nn.Module)
    hidden: Callable      # the training forward over a batch (see prefix.prefix_hidden)
    source: Callable      # (text, source language, target language) -> the tokens a translation follows
    slots: Callable       # what is learned -> positions the training forward adds to each row beyond its tokens
    positions: Callable   # P -> positions a sequence takes beyond its two sentences' tokens
    translator: Callable  # (model, learned as read from its file, names) -> (texts, sources, source, target, limits)
    save: Callable        # (path, what is learned, model config, **metadata): its file
    files: tuple          # the best and the last of its files in --out
    what: str             # what is learned, in words ({P}: --prefix-len)
    frozen: bool = True   # whether GPT-2's own weights stay as they are


class Tokens(NamedTuple):
    """What the methods that learn tokens have of their own: their start from words, or random, and decoding."""
    from_words: Callable   # (model, names, P) -> the learned tensor
    random: Callable       # (model, names, P, generator) -> the same, random
    translate_ids: Callable  # (model, learned, sources, src_prefix, tgt_prefix, limits, **sampling) -> token ids


TOKENS = {"prefix": Tokens(init_from_words, init_random, translate_ids),
          "prompt": Tokens(prompt_from_words, prompt_random, prompt_translate_ids)}


def start_tokens(method):
    """start for the methods that learn tokens: from real words, or random (prefix.py, prompt.py)."""
    def start(model, prefix_len, init, reparam, seed):
        if init == "words":
            learned = TOKENS[method].from_words(model, NAMES, prefix_len)
        else:
            learned = TOKENS[method].random(model, NAMES, prefix_len, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)  # the MLP of --reparam starts random
        return Prefixes(learned, reparam=reparam).to(model.wte.weight.device)
    return start


def save_tokens(path, learned, config, method, **metadata):
    learned_file.save_prefixes(path, {"prefixes": learned.fold()}, NAMES, config, method, **metadata)


class TokenTranslator:
    """How a file of learned tokens translates: decoding with them in their layout (translate_ids)."""

    def __init__(self, method, model, learned, names):
        self.method, self.model, self.learned, self.names = method, model, learned, names

    def __call__(self, texts, sources, source, target, limits, **sampling):
        return translate(self.model, self.learned, self.names, self.method, sources, [target] * len(sources), limits,
                         **sampling)


def zero_shot_translator(model, folder, names):
    """A fine-tuned model translates as zero-shot prompting does; `folder` holds it (None: `model` is it)."""
    w = model.wte.weight
    return FewShot(model if folder is None else from_pretrained(folder, device=w.device, dtype=w.dtype), [])


METHODS = {
    "prefix": Method(start_tokens("prefix"), prefix_hidden,
                     lambda text, s, t: encode_sentence(text), lambda learned: 0, lambda P: 0,
                     lambda model, learned, names: TokenTranslator("prefix", model, learned, names),
                     lambda path, learned, config, **m: save_tokens(path, learned, config, "prefix", **m),
                     ("prefix.safetensors", "prefix-last.safetensors"), "prefixes, {P} virtual tokens each"),
    "prompt": Method(start_tokens("prompt"), prompt_hidden,
                     lambda text, s, t: encode_sentence(text), lambda learned: 2 * learned.shape[1], lambda P: 2 * P,
                     lambda model, learned, names: TokenTranslator("prompt", model, learned, names),
                     lambda path, learned, config, **m: save_tokens(path, learned, config, "prompt", **m),
                     ("prefix.safetensors", "prefix-last.safetensors"), "input-embedding prompts, {P} virtual tokens each"),
    "lora": Method(lambda model, P, init, reparam, seed: lora.start(model, generator=torch.Generator().manual_seed(seed)),
                   lora.lora_hidden, zero_shot_ids, lambda learned: 0, lambda P: ZERO_SHOT_TOKENS,
                   lambda model, learned, names: lora.Translator(model, learned),
                   lambda path, learned, config, **m: learned_file.save_prefixes(
                       path, {"lora_A": learned.A, "lora_B": learned.B}, NAMES, config, "lora", alpha=learned.alpha, **m),
                   ("lora.safetensors", "lora-last.safetensors"), "LoRA's A and B on every layer's query and value"),
    "finetune": Method(lambda model, P, init, reparam, seed: finetune.start(model), finetune.finetune_hidden,
                       zero_shot_ids, lambda learned: 0, lambda P: ZERO_SHOT_TOKENS, zero_shot_translator,
                       lambda path, learned, config, **m: finetune.save(path, learned, config, NAMES, **m),
                       ("model", "model-last"), "every weight of the model", frozen=False),
}
LEARNS_TOKENS = ("prefix", "prompt")  # the methods --prefix-len, --init and --reparam are for


def best_file_in(path):
    """`path`, or if it is a training run's --out, the best file of what was learned there."""
    path = Path(path)
    if path.is_dir() and not (path / "model.safetensors").exists():
        found = [path / m.files[0] for m in METHODS.values() if (path / m.files[0]).exists()]
        if found:
            return found[0]
    return path


def prefix_indices(names, target):
    """(source prefix, target prefix) for translating into `target` ("en" or "fr"): indices into `names`."""
    lang = {LANGUAGES[n]: i for i, n in enumerate(names)}
    return lang["fr" if target == "en" else "en"], lang[target]


@torch.no_grad()
def translate(model, learned, names, method, sources, targets, limits, **sampling):
    """
    Each source (its tokens: prefix.encode_sentence) into its target language ("en" or "fr"), in one
    batch, with learned tokens (prefixes or prompts: `method`), at most limits[i] tokens each.
    Returns the translations as text.
    """
    src_prefix, tgt_prefix = zip(*[prefix_indices(names, t) for t in targets])
    out = TOKENS[method].translate_ids(model, learned, sources, list(src_prefix), list(tgt_prefix), limits, **sampling)
    return [decode(o).strip() for o in out]
