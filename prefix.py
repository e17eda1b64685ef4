"""
Prefix-tuning (Li & Liang, 2021): steer a frozen GPT-2 with learned keys and values, and, beside
it for comparison, prompt tuning: learned vectors in the input embedding space.

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

The other method (`--method prompt`, as in the experiment this project reproduces) learns P
vectors n_embd wide per prompt (GPT-2 XL: 1,600 numbers per virtual token) and feeds them in
where token embeddings would go: [start_french] Bon j our ... [start_english] Hello ... Only the
first layer sees them as they are; every later layer sees what the layers below made of them, as
for any token. They have queries, take positions like tokens, and the target prompt's last vector
predicts the first target word. `METHODS` lists what the two do differently; all the rest (data,
batches, loss, training, files) is shared.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from mini_gpt2 import EOT, UserError, decode, encode
from mini_gpt2.files import os_problem, write_bytes
from mini_gpt2.generate import generate, prefill

NAMES = ("[start_french]", "[start_english]")
LANGUAGES = {"[start_french]": "fr", "[start_english]": "en"}
INIT_WORDS = {"[start_french]": "French:", "[start_english]": "English:"}  # real words to start from


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


def encode_sentence(text):
    """A sentence's tokens, with a leading space as words have inside a text; training and decoding agree."""
    return encode(" " + text.strip())


# ----------------------------------------------------------------------------- training forward

def prefix_hidden(model, kv, idx, src_len, seq_len, src_prefix, tgt_prefix, grad_checkpoint=False):
    """
    One forward pass over a right-padded batch of (source, target) sequences, both directions mixed.

    kv:         (n_prefixes, L, 2, nh, P, hd)
    idx:        (B, T) source tokens, then target tokens, then padding
    src_len:    (B,) source length;  seq_len: (B,) source + target length
    src_prefix, tgt_prefix: (B,) which prefix each row starts with / switches to
    returns the hidden state before lm_head (B, T, C), and idx, src_len, seq_len as they are (the
    prompt method changes them: see prompt_hidden; target_loss takes either)

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


def target_loss(model, h, idx, src_len, seq_len):
    """
    The summed cross-entropy of the target tokens (and the final <|endoftext|>), nothing else:
    position t predicts token t + 1 for t from the last source token to the one before the end.
    A sum, not a mean: the training step divides by all of its target tokens, however they were
    split into forward passes, so that every target token weighs the same.
    """
    t = torch.arange(idx.size(1) - 1, device=idx.device)[None]
    predicts_target = (t >= (src_len - 1)[:, None]) & (t < (seq_len - 1)[:, None])  # (B, T-1)
    logits = model.logits(h[:, :-1][predicts_target])  # only those rows, in float32: (N, vocab)
    return F.cross_entropy(logits, idx[:, 1:][predicts_target], reduction="sum")


def make_batch(examples, device):
    """examples: (source ids, target ids ending in EOT, source prefix index, target prefix index)."""
    T = max(len(s) + len(t) for s, t, _, _ in examples)
    idx = torch.full((len(examples), T), EOT, dtype=torch.long)
    for b, (s, t, _, _) in enumerate(examples):
        idx[b, :len(s) + len(t)] = torch.tensor(s + t)
    src_len, tgt_len, src_prefix, tgt_prefix = torch.tensor(
        [(len(s), len(t), sp, tp) for s, t, sp, tp in examples], device=device).unbind(1)
    return idx.to(device), src_len, src_len + tgt_len, src_prefix, tgt_prefix


# ----------------------------------------------------------------------------- decoding

def max_new_tokens_for(source_ids):
    """The default length limit of a translation: twice the source, plus a little for short ones."""
    return 2 * len(source_ids) + 8


def check_room(model, sources, limits, taken=0):
    """A one-line error for an input whose translation (and `taken` positions of prompts) would pass GPT-2's positions."""
    n_pos = model.config.n_positions
    for i, (s, m) in enumerate(zip(sources, limits)):
        if taken + len(s) + m > n_pos:
            prompts = f" and {taken} for the prompts" if taken else ""
            raise UserError(f"input {i + 1} is {len(s)} tokens; with {m} for the translation{prompts} that passes "
                            f"GPT-2's {n_pos} positions")


@torch.no_grad()
def translate(model, learned, names, texts, targets, max_new_tokens=None, method="prefix", **sampling):
    """
    Translate each text into its target language ("en" or "fr"), all in one batch, with learned
    prefixes (or prompts: `method`). max_new_tokens: an int, one int per text, or None for twice the
    input's length plus 8. Returns the translations.
    """
    lang = {LANGUAGES[n]: i for i, n in enumerate(names)}
    sources = [encode_sentence(text) for text in texts]
    if max_new_tokens is None:
        max_new_tokens = [max_new_tokens_for(s) for s in sources]
    out = METHODS[method].translate_ids(model, learned, sources, [lang["fr" if t == "en" else "en"] for t in targets],
                                        [lang[t] for t in targets], max_new_tokens, **sampling)
    return [decode(o).strip() for o in out]


@torch.no_grad()
def translate_ids(model, kv, sources, src_prefix, tgt_prefix, max_new_tokens, **sampling):
    """
    The decoding itself, on token ids. The cache is built in reading order: the source prefix,
    the source but its last token (one prefill over the left-padded batch), then the target
    prefix; the last source token is then fed as the first step of ordinary generation and
    predicts the first target token. Generation stops at <|endoftext|>.
    """
    limits = [max_new_tokens] * len(sources) if isinstance(max_new_tokens, int) else max_new_tokens
    check_room(model, sources, limits)
    kv = kv.to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    head = [s[:-1] for s in sources]
    room = kv.size(4) + 1 + max(limits)  # the target prefix, the last source token, the translation
    _, cache, keys_valid, _ = prefill(model, head, as_past(kv[src_prefix]), room=room)
    for layer, (k, v) in zip(cache, as_past(kv[tgt_prefix])):
        layer.update(k, v)
    keys_valid = torch.cat([keys_valid, keys_valid.new_ones(len(sources), kv.size(4))], dim=1)
    return generate(model, [s[-1:] for s in sources], limits, stop_ids=(EOT,), past_kv=cache,
                    past_valid=keys_valid, past_positions=[len(h) for h in head], **sampling)


# ----------------------------------------------------------------------------- the other method: prompts

@torch.no_grad()
def prompt_from_words(model, names, prefix_len):
    """Start each prompt from the embeddings of the real word's tokens: the model then reads the word itself."""
    return torch.stack([model.wte(torch.tensor(init_word_ids(name, prefix_len), device=model.wte.weight.device))
                        for name in names]).float()


@torch.no_grad()
def prompt_random(model, names, prefix_len, generator=None):
    """Random prompts, drawn at the scale of the model's token embeddings."""
    scale = model.wte.weight.float().std()
    return torch.randn(len(names), prefix_len, model.config.n_embd, generator=generator).to(scale.device) * scale


def prompt_hidden(model, prompts, idx, src_len, seq_len, src_prefix, tgt_prefix, grad_checkpoint=False):
    """
    The prompt method's training forward over the same batch as prefix_hidden: each row becomes

        [source prompt, P vectors] source [target prompt, P vectors] target, then padding

    with the vectors fed in place of token embeddings, causal attention, and positions counted
    through the prompts too. prompts: (n_prefixes, P, C). Returns the hidden states (B, 2P + T, C),
    the tokens in that layout (a dummy at each prompt slot) and the lengths shifted by the prompts,
    so that target_loss finds the targets: the target prompt's last vector predicts the first.
    """
    B, T = idx.shape
    n, P, C = prompts.shape
    t = torch.arange(T + 2 * P, device=idx.device)[None]  # (1, T + 2P): the slots of a row
    s = src_len[:, None]
    src_slot, tgt_slot = t < P, (t >= P + s) & (t < 2 * P + s)  # (B, T + 2P) where each prompt goes
    tokens = idx.gather(1, torch.where(t < P + s, t - P, t - 2 * P).clamp(0, T - 1))  # the rest, in order
    which = torch.where(src_slot, src_prefix[:, None] * P + t, tgt_prefix[:, None] * P + t - P - s)  # a prompt vector
    is_prompt = src_slot | tgt_slot
    embeds = model.wte(tokens)
    embeds[is_prompt] = prompts.reshape(n * P, C)[which[is_prompt]].to(embeds.dtype)

    query, key = t[:, :, None], t[:, None, :]
    mask = (key <= query) & (key < (seq_len + 2 * P)[:, None, None])  # causal, never padding: (B, T + 2P, T + 2P)
    h, _ = model.hidden(tokens, None, mask, t[0], grad_checkpoint=grad_checkpoint, embeds=embeds)
    return h, tokens, src_len + 2 * P, seq_len + 2 * P


@torch.no_grad()
def prompt_translate_ids(model, prompts, sources, src_prefix, tgt_prefix, max_new_tokens, **sampling):
    """Decoding with prompts: [source prompt] source [target prompt] is the prompt, the vectors fed as they are."""
    limits = [max_new_tokens] * len(sources) if isinstance(max_new_tokens, int) else max_new_tokens
    check_room(model, sources, limits, taken=2 * prompts.size(1))
    vectors = prompts.to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    rows = [[*vectors[sp], *s, *vectors[tp]] for s, sp, tp in zip(sources, src_prefix, tgt_prefix)]
    return generate(model, rows, limits, stop_ids=(EOT,), **sampling)


@dataclass(frozen=True)
class Method:
    """What differs between the two ways of learning [start_french] and [start_english]."""
    init_from_words: Callable  # (model, names, P) -> the learned tensor at its start
    init_random: Callable      # (model, names, P, generator) -> the same, random
    hidden: Callable           # the training forward over a batch (see prefix_hidden)
    translate_ids: Callable    # decoding
    prefix_len: Callable       # the learned tensor's shape -> P, its virtual tokens per prefix
    positions: Callable        # P -> how many of GPT-2's positions the learned vectors take in a sequence


METHODS = {
    "prefix": Method(init_from_words, init_random, prefix_hidden, translate_ids, lambda shape: shape[4], lambda P: 0),
    "prompt": Method(prompt_from_words, prompt_random, prompt_hidden, prompt_translate_ids, lambda shape: shape[1],
                     lambda P: 2 * P),
}


# ----------------------------------------------------------------------------- files

def save_prefixes(path, learned, names, model_config, method="prefix", **metadata):
    """One safetensors file for either method: the learned tensor as it is used, and what it was made for."""
    if not bool(torch.isfinite(learned).all()):
        raise UserError(f"the prefixes hold NaN or inf values; {path} was not written")
    meta = {"method": method, "names": json.dumps(list(names)), "n_layer": str(model_config.n_layer),
            "n_head": str(model_config.n_head), "n_embd": str(model_config.n_embd),
            "prefix_len": str(METHODS[method].prefix_len(learned.shape)),
            "model_vocab": str(model_config.vocab_size)}
    meta.update({k: str(v) for k, v in metadata.items()})
    write_bytes(path, save({"prefixes": learned.detach().float().cpu().contiguous()}, metadata=meta))


def load_prefixes(path, model_config=None):
    """
    Read a prefix (or prompt) file -> (tensor, names, metadata), checked: a file that is not whole,
    not one train.py wrote, or holds NaN/inf is a one-line error. metadata["method"] says which
    kind it is. With a model config, also check that it fits that model.
    """
    fix = "train again, or point --prefix at a prefix.safetensors that train.py wrote"
    if Path(path).is_dir():
        raise UserError(f"{path} is a folder, not a prefix file; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if "prefixes" not in f.keys():
                raise UserError(f"{path} holds no tensor named 'prefixes' ({', '.join(f.keys()) or 'none'}); {fix}")
            learned = f.get_tensor("prefixes")
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); {fix}") from None
    except OSError as e:
        raise UserError(f"{os_problem(e, path, 'reading')}; {fix}") from None
    try:
        names = json.loads(meta["names"])
        L, nh, C, P = (int(meta[k]) for k in ("n_layer", "n_head", "n_embd", "prefix_len"))
        meta.setdefault("method", "prefix")  # files from before there were two methods
        if sorted(names) != sorted(NAMES) or C % nh or meta["method"] not in METHODS:
            raise ValueError
    except (TypeError, KeyError, ValueError):  # TypeError: no metadata at all
        raise UserError(f"{path} lacks the metadata train.py writes (method, names, sizes); {fix}") from None
    want = (len(names), L, 2, nh, P, C // nh) if meta["method"] == "prefix" else (len(names), P, C)
    if tuple(learned.shape) != want:
        raise UserError(f"{path}: its tensor has shape {tuple(learned.shape)}, but its metadata says {want} "
                        f"(--method {meta['method']}); {fix}")
    if not bool(torch.isfinite(learned).all()):
        raise UserError(f"{path} holds NaN or inf values (the training diverged); {fix}")
    if model_config is not None:
        check_fits(meta, model_config, path)
    return learned, names, meta


def check_fits(meta, model_config, path):
    """A one-line error if a prefix file's metadata says it was made for another model size."""
    want = (model_config.n_layer, model_config.n_head, model_config.n_embd)
    have = (int(meta["n_layer"]), int(meta["n_head"]), int(meta["n_embd"]))
    if have != want:
        made_for = meta.get("model", "another model")
        raise UserError(f"{path} was trained for {made_for} ({have[0]} layers, {have[1]} heads, width {have[2]}), "
                        f"but this model has {want[0]} layers, {want[1]} heads, width {want[2]}")
