"""
Prefix-tuning (Li & Liang, 2021): steer a frozen GPT-2 with learned keys and values.

A prefix is P "virtual tokens". A real token would put one key and one value per head into every
layer's KV cache; a virtual token puts learned ones there directly. So a prefix is a tensor

    (n_layer, 2, n_head, P, head_dim)       2 = key, value;  GPT-2 XL: 48*2*1600 = 153,600 numbers per virtual token

and every real token after it, in every layer, can attend to it. Only these numbers are trained.

We learn two, `[start_french]` and `[start_english]`, and lay a translation out like this:

    keys (every layer):  [start_french]  Bon j our ! ... S ully .  [start_english]  Hello ! ... S ully .  <|endoftext|>
    queries:                             Bon j our ! ... S ully .                   Hello ! ... S ully .

- The source-language prefix comes first; the source tokens see it and the earlier source tokens.
- The target-language prefix comes after the source. A prefix has no query and predicts nothing,
  so the token that predicts the first target word is the source's last one (`.` above): it and
  every target token see both prefixes, the whole source and the earlier target tokens.
- Position ids: virtual tokens take none. Real tokens are numbered 0, 1, 2, ... straight through
  source and target, as if the prefixes were not there, so source + target must fit in GPT-2's
  1024 positions and the prefixes cost none of them.

Attention does not care where in the cache a key sits, only which keys a query may see and what
they hold. So training can run a whole padded batch at once, with both prefixes placed before the
tokens and a mask that encodes the rules above (`prefix_hidden`), while decoding builds the cache
in reading order (`translate_ids`): the tests check that both give the same logits.

This file is the whole method: how the prefixes start, the training forward, decoding, the file.
The methods it is compared with (methods/) define the same names, so that train.py and
translate.py treat all four alike.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from machinery import learned_file
from mini_gpt2 import EOT, UserError, decode, encode
from mini_gpt2.generate import generate, prefill

NAMES = ("[start_french]", "[start_english]")  # an example's prefixes are indices into this
LANGUAGES = ("fr", "en")  # the language each of them starts
INIT_WORDS = {"[start_french]": "French:", "[start_english]": "English:"}  # real words to start from

# What every method module defines (methods/ has the others):
WHAT = "prefixes, {P} virtual tokens each"  # what is learned, in words ({P}: --prefix-len)
LEARNED = "prefixes"  # what its files hold, in a word
FILES = ("prefix.safetensors", "prefix-last.safetensors")  # the best and the last in --out
LR = 1e-2  # the default peak learning rate (docs/training.md says why); REPARAM_LR through the MLP
REPARAM_LR = 5e-5
FROZEN = True  # GPT-2's own weights stay as they are
LEARNS_TOKENS = True  # --prefix-len and --init are for it
POSITIONS_PER_VIRTUAL_TOKEN = 0  # virtual tokens take no position ids
PROMPT_POSITIONS = 0  # a translation follows the sentence's own tokens, no prompt around them


class Sentence(NamedTuple):
    """A sentence, and its tokens as translation reads them (encode_sentence)."""
    text: str
    ids: list


class Example(NamedTuple):
    """One training sequence: source tokens, then target tokens ending in <|endoftext|>; prefixes index NAMES."""
    source: list
    target: list
    source_prefix: int
    target_prefix: int


class Batch(NamedTuple):
    """
    A training forward pass (train.make_batch): idx (B, T) the examples' tokens, right-padded;
    src_len and seq_len (B,) the source's length and the source + target's; src_prefix and
    tgt_prefix (B,) which prefix each row starts with and switches to; targets, how many target
    tokens the pass holds (a number, not a tensor: counting them would wait for the GPU).
    """
    idx: torch.Tensor
    src_len: torch.Tensor
    seq_len: torch.Tensor
    src_prefix: torch.Tensor
    tgt_prefix: torch.Tensor
    targets: int


class Start(NamedTuple):
    """How what is learned starts (train.py's --prefix-len, --init, --reparam and --seed)."""
    prefix_len: int
    init: str  # "words" or "random"
    reparam: bool
    seed: int


def encode_sentence(text):
    """A sentence's tokens, with a leading space as words have inside a text; training and decoding agree."""
    return encode(" " + text.strip())


def fits(source, target, max_len):
    """The one length rule, for training, validation and evaluation: source + target + <|endoftext|> within max_len."""
    return len(source) + len(target) + 1 <= max_len


def example(source, target, source_lang, target_lang):
    """The training sequence of a Sentence translated into another: its tokens between the two prefixes."""
    return Example(source.ids, target.ids + [EOT], LANGUAGES.index(source_lang), LANGUAGES.index(target_lang))


# ----------------------------------------------------------------------------- the learned numbers

class Prefixes(nn.Module):
    """
    The trainable numbers: calling it returns them all, (n_prefixes, n_layer, 2, n_head, P,
    head_dim) for the prefix method, (n_prefixes, P, n_embd) for the prompt method.

    Plain: that tensor is the parameter. Reparameterised (the paper's trick for stable training,
    prefix method only): each virtual token is an embedding n_embd wide, mapped to its
    2 * n_layer * n_embd numbers by an MLP (hidden 512), and that is added to the initial value.
    The MLP's last layer starts at zero, so training starts from the initialisation either way;
    `fold()` turns it into a plain tensor for saving.
    """

    def __init__(self, init, reparam=False, hidden=512):
        super().__init__()
        self.shape = tuple(init.shape)
        self.reparam = reparam
        if reparam:
            n, L, _, nh, P, hd = self.shape
            self.register_buffer("base", init.clone())
            self.embed = nn.Parameter(torch.randn(n, P, nh * hd) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(nh * hd, hidden), nn.Tanh(), nn.Linear(hidden, L * 2 * nh * hd))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        else:
            self.prefix = nn.Parameter(init.clone())

    def forward(self):
        if not self.reparam:
            return self.prefix
        n, L, _, nh, P, hd = self.shape
        delta = self.mlp(self.embed).view(n, P, L, 2, nh, hd).permute(0, 2, 3, 4, 1, 5)
        return self.base + delta

    @torch.no_grad()
    def fold(self):
        return self().detach().float().clone()


def init_word_ids(name, prefix_len):
    """The tokens of the real word a prefix starts from, repeated to fill P slots: " French: French:..." """
    word = " " + INIT_WORDS[name]
    return encode(word * math.ceil(prefix_len / len(encode(word))))[:prefix_len]


@torch.no_grad()
def init_from_words(model, names, prefix_len):
    """
    Start each prefix from the keys/values the frozen model itself makes for a real word
    ("French:" repeated to fill P slots), which the paper found far better than random.
    """
    out = []
    for name in names:
        _, cache = model.hidden(torch.tensor([init_word_ids(name, prefix_len)], device=model.wte.weight.device))
        out.append(torch.stack([torch.stack(kv) for kv in cache])[:, :, 0])  # (L, 2, nh, P, hd)
    return torch.stack(out).float()


@torch.no_grad()
def init_random(model, names, prefix_len, generator=None):
    """Random prefixes, drawn at the scale of the model's own keys/values in each layer."""
    real = init_from_words(model, names, prefix_len)
    scale = real.std(dim=(0, 3, 4, 5), keepdim=True)  # (1, L, 2, 1, 1, 1)
    return torch.randn(real.shape, generator=generator).to(real.device) * scale


def start(model, how):
    """The prefixes at their start (a Start): from the words, or random; learned directly, or through the MLP."""
    if how.init == "words":
        kv = init_from_words(model, NAMES, how.prefix_len)
    else:
        kv = init_random(model, NAMES, how.prefix_len, torch.Generator().manual_seed(how.seed))
    torch.manual_seed(how.seed)  # the MLP of --reparam starts random
    return Prefixes(kv, reparam=how.reparam).to(model.wte.weight.device)


# ----------------------------------------------------------------------------- the training forward

def as_past(kv_rows):
    """(B, L, 2, nh, P, hd) -> the model's cache format: one (k, v) per layer, each (B, nh, P, hd)."""
    # unbind, not indexing: its backward stacks the pieces once, where indexing would build a
    # zero-filled gradient of the whole tensor for each of the 2 * n_layer pieces
    return [tuple(layer.unbind(1)) for layer in kv_rows.unbind(1)]


def prefix_hidden(model, kv, batch, grad_checkpoint=False):
    """
    One pass over a right-padded Batch of (source, target) sequences, both directions mixed, with
    the prefixes kv (n_prefixes, L, 2, nh, P, hd): the hidden states before lm_head (B, T, C).

    Keys in every layer: [every prefix, n_prefixes * P] [the T tokens]. The prefixes are the same
    for every row (expanded views, not copies per row); the mask decides which of them a row sees.
    """
    idx, src_len, seq_len, src_prefix, tgt_prefix = batch[:5]
    B, T = idx.shape
    n, P = kv.size(0), kv.size(4)
    dev = idx.device
    # (n, L, 2, nh, P, hd) -> (1, L, 2, nh, n * P, hd): the prefixes side by side, one row for all
    shared = kv.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)[None].to(model.wte.weight.dtype)
    past = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in as_past(shared)]

    t = torch.arange(T, device=dev)
    query, key = t[None, :, None], t[None, None, :]  # (1, T, 1), (1, 1, T)
    sees_tokens = (key <= query) & (key < seq_len[:, None, None])  # causal, never padding: (B, T, T)
    which = torch.arange(n, device=dev).repeat_interleave(P)[None, None, :]  # (1, 1, nP): each key's prefix
    # the source prefix: always; the target prefix: from the last source token on
    sees_prefix = (which == src_prefix[:, None, None]) | (
        (which == tgt_prefix[:, None, None]) & (query >= (src_len - 1)[:, None, None]))
    mask = torch.cat([sees_prefix, sees_tokens], dim=2)  # (B, T, nP + T)

    h, _ = model.hidden(idx, past, mask, t, grad_checkpoint=grad_checkpoint)
    return h


def hidden(model, prefixes, batch, grad_checkpoint=False):
    """
    The training forward of the method: `prefixes` (a Prefixes) on a Batch. Returns the hidden
    states (B, T, C) and the Batch they lay out, as it is here (the prompt method's differs):
    train.target_loss reads the targets' predictions off them.
    """
    return prefix_hidden(model, prefixes(), batch, grad_checkpoint), batch


# ----------------------------------------------------------------------------- decoding

def max_new_tokens_for(source_ids):
    """The default length limit of a translation: twice the source, plus a little for short ones."""
    return 2 * len(source_ids) + 8


def check_room(n_positions, sources, limits, taken=0, numbers=None, option=None):
    """
    A one-line error for an input whose translation (and `taken` positions of prompts) would pass
    GPT-2's positions. numbers: how to number the inputs in the message (default 1, 2, ...);
    option: the command-line option that set the limits, if one did (named, with what fits).
    """
    for i, (s, m) in enumerate(zip(sources, limits)):
        if taken + len(s) + m > n_positions:
            number, prompts = numbers[i] if numbers else i + 1, f" and {taken} for the prompts" if taken else ""
            if option:
                raise UserError(f"{option} {m}: input {number} is {len(s)} tokens{prompts}, so at most "
                                f"{max(0, n_positions - taken - len(s))} new tokens fit GPT-2's {n_positions} positions")
            raise UserError(f"input {number} is {len(s)} tokens; with {m} for the translation{prompts} that passes "
                            f"GPT-2's {n_positions} positions")


@torch.no_grad()
def translate_ids(model, kv, sources, src_prefix, tgt_prefix, max_new_tokens, **decoding):
    """
    The decoding itself, on token ids. The cache is built in reading order: the source prefix,
    the source but its last token (one prefill over the left-padded batch), then the target
    prefix; the last source token is then fed as the first step of ordinary generation and
    predicts the first target token. Generation stops at <|endoftext|>.
    """
    limits = [max_new_tokens] * len(sources) if isinstance(max_new_tokens, int) else max_new_tokens
    check_room(model.config.n_positions, sources, limits)
    kv = kv.to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    head = [s[:-1] for s in sources]
    room = kv.size(4) + 1 + max(limits)  # the target prefix, the last source token, the translation
    _, cache, keys_valid, _ = prefill(model, head, as_past(kv[src_prefix]), room=room)
    for layer, (k, v) in zip(cache, as_past(kv[tgt_prefix])):
        layer.update(k, v)
    keys_valid = torch.cat([keys_valid, keys_valid.new_ones(len(sources), kv.size(4))], dim=1)
    return generate(model, [s[-1:] for s in sources], limits, stop_ids=(EOT,), past_kv=cache,
                    past_valid=keys_valid, past_positions=[len(h) for h in head], **decoding)


def translator(model, kv, translate_ids=translate_ids):
    """
    How a file of prefixes translates: a function of (texts, source language, target language,
    limits in tokens, decoding options such as temperature) -> the translations, as text.
    """
    def translate(texts, source, target, limits, **decoding):
        n = len(texts)
        out = translate_ids(model, kv, [encode_sentence(t) for t in texts], [LANGUAGES.index(source)] * n,
                            [LANGUAGES.index(target)] * n, limits, **decoding)
        return [decode(o).strip() for o in out]
    return translate


# ----------------------------------------------------------------------------- the file

def save(path, prefixes, config, **metadata):
    """The prefixes as they are used (folded, if through the MLP), with what they were made for and how."""
    kv = prefixes.fold()
    learned_file.save(path, {"prefixes": kv}, "prefix", NAMES, config, prefix_len=kv.size(4), **metadata)


def load(path, meta):
    """The prefixes of a file (its metadata `meta` read and checked: methods.load), checked whole."""
    L, nh, C, P = learned_file.numbers(path, meta, "n_layer", "n_head", "n_embd", "prefix_len")
    return learned_file.tensors(path, meta, {"prefixes": (len(NAMES), L, 2, nh, P, C // nh)})["prefixes"]
