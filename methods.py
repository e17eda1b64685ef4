"""
The ways of learning [start_french] and [start_english], side by side: what each does differently,
in one table. Everything else (data, batches, the loss, the training loop, checkpoints, files,
evaluation) is one path for all of them.

- prefix (prefix.py, Li & Liang): learned keys and values in every layer's attention cache;
- prompt (prompt.py, the reference experiment): learned vectors in place of input embeddings.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from mini_gpt2 import decode
from prefix import LANGUAGES, NAMES, Prefixes, init_from_words, init_random, prefix_hidden, translate_ids
from prompt import prompt_from_words, prompt_hidden, prompt_random, prompt_translate_ids


@dataclass(frozen=True)
class Method:
    """What differs between the methods."""
    init_from_words: Callable  # (model, names, P) -> the learned tensor at its start
    init_random: Callable      # (model, names, P, generator) -> the same, random
    hidden: Callable           # the training forward over a batch (see prefix.prefix_hidden)
    translate_ids: Callable    # decoding: (model, learned, sources, src_prefix, tgt_prefix, limits, **sampling)
    prefix_len: Callable       # the learned tensor's shape -> P, its virtual tokens per prefix
    positions: Callable        # P -> how many of GPT-2's positions the learned vectors take in a sequence


METHODS = {
    "prefix": Method(init_from_words, init_random, prefix_hidden, translate_ids, lambda shape: shape[4], lambda P: 0),
    "prompt": Method(prompt_from_words, prompt_random, prompt_hidden, prompt_translate_ids, lambda shape: shape[1],
                     lambda P: 2 * P),
}


def start(model, method, prefix_len, init="words", reparam=False, seed=0):
    """The learned numbers of `method` at their start (from real words, or random), as a Prefixes module."""
    m = METHODS[method]
    if init == "words":
        learned = m.init_from_words(model, NAMES, prefix_len)
    else:
        learned = m.init_random(model, NAMES, prefix_len, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the MLP of --reparam starts random
    return Prefixes(learned, reparam=reparam).to(model.wte.weight.device)


def prefix_indices(names, target):
    """(source prefix, target prefix) for translating into `target` ("en" or "fr"): indices into `names`."""
    lang = {LANGUAGES[n]: i for i, n in enumerate(names)}
    return lang["fr" if target == "en" else "en"], lang[target]


@torch.no_grad()
def translate(model, learned, names, method, sources, targets, limits, **sampling):
    """
    Each source (its tokens: prefix.encode_sentence) into its target language ("en" or "fr"), in one
    batch, with the learned numbers of a prefix file (`method` says which kind), at most limits[i]
    tokens each. Returns the translations as text.
    """
    src_prefix, tgt_prefix = zip(*[prefix_indices(names, t) for t in targets])
    out = METHODS[method].translate_ids(model, learned, sources, list(src_prefix), list(tgt_prefix), limits, **sampling)
    return [decode(o).strip() for o in out]
