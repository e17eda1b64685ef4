"""
Prefix-tuning (Li & Liang, 2021): steer a frozen GPT-2 with learned keys and values. This file is
the method and its decoding; prompt.py, lora.py and finetune.py are the others, methods.py the
table of what they do differently, learned_file.py the file they are saved in, train.py the training.

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
"""

import math

import torch
import torch.nn as nn

from mini_gpt2 import EOT, UserError, encode
from mini_gpt2.generate import generate, prefill

NAMES = ("[start_french]", "[start_english]")  # an example's prefixes are indices into this
LANGUAGES = {"[start_french]": "fr", "[start_english]": "en"}
INIT_WORDS = {"[start_french]": "French:", "[start_english]": "English:"}  # real words to start from


def encode_sentence(text):
    """A sentence's tokens, with a leading space as words have inside a text; training and decoding agree."""
    return encode(" " + text.strip())


def fits(source, target, max_len):
    """The one length rule, for training, validation and evaluation: source + target + <|endoftext|> within max_len."""
    return len(source) + len(target) + 1 <= max_len


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


def init_word_ids(name, prefix_len, words=INIT_WORDS):
    """The tokens of the real word a prefix starts from, repeated to fill P slots: " French: French:..." """
    word = " " + words[name]
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


def as_past(kv_rows):
    """(B, L, 2, nh, P, hd) -> the model's cache format: one (k, v) per layer, each (B, nh, P, hd)."""
    # unbind, not indexing: its backward stacks the pieces once, where indexing would build a
    # zero-filled gradient of the whole tensor for each of the 2 * n_layer pieces
    return [tuple(layer.unbind(1)) for layer in kv_rows.unbind(1)]


def prefix_hidden(model, kv, idx, src_len, seq_len, src_prefix, tgt_prefix, grad_checkpoint=False):
    """
    The training forward: one pass over a right-padded batch of (source, target) sequences, both
    directions mixed (train.make_batch).

    kv:         (n_prefixes, L, 2, nh, P, hd)
    idx:        (B, T) source tokens, then target tokens, then padding
    src_len:    (B,) source length;  seq_len: (B,) source + target length
    src_prefix, tgt_prefix: (B,) which prefix each row starts with / switches to
    returns the hidden state before lm_head (B, T, C), and idx, src_len, seq_len as they are (the
    prompt method changes them: see prompt.prompt_hidden; train.target_loss takes either)

    Keys in every layer: [every prefix, n_prefixes * P] [the T tokens]. The prefixes are the same
    for every row (expanded views, not copies per row); the mask decides which of them a row sees.
    """
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
    return h, idx, src_len, seq_len


# ----------------------------------------------------------------------------- decoding

def max_new_tokens_for(source_ids):
    """The default length limit of a translation: twice the source, plus a little for short ones."""
    return 2 * len(source_ids) + 8


def check_room(n_positions, sources, limits, taken=0, numbers=None):
    """
    A one-line error for an input whose translation (and `taken` positions of prompts) would pass
    GPT-2's positions. numbers: how to number the inputs in the message (default 1, 2, ...).
    """
    for i, (s, m) in enumerate(zip(sources, limits)):
        if taken + len(s) + m > n_positions:
            prompts = f" and {taken} for the prompts" if taken else ""
            raise UserError(f"input {numbers[i] if numbers else i + 1} is {len(s)} tokens; with {m} for the "
                            f"translation{prompts} that passes GPT-2's {n_positions} positions")


@torch.no_grad()
def translate_ids(model, kv, sources, src_prefix, tgt_prefix, max_new_tokens, **sampling):
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
                    past_valid=keys_valid, past_positions=[len(h) for h in head], **sampling)
