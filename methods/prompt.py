"""
Prompt tuning, the method of the experiment this project reproduces (`--method prompt`): learned
vectors in the input embedding space, beside prefix.py's learned keys/values for comparison.

A prompt is P vectors n_embd wide (GPT-2 XL: 1,600 numbers per virtual token), fed in where token
embeddings would go:

    [start_french] Bon j our ! ... S ully . [start_english] Hello ! ... S ully . <|endoftext|>

Only the first layer sees them as they are; every later layer sees what the layers below made of
them, as for any token. They have queries, take positions like tokens (so source + target get
1024 - 2P of GPT-2's positions), and the target prompt's last vector predicts the first target
word. The names below are prefix.py's, for the same things.
"""

import torch

import prefix
from machinery import learned_file
from mini_gpt2 import EOT
from mini_gpt2.generate import generate
from prefix import NAMES, Prefixes, check_room, example, init_word_ids  # noqa: F401  (example: the prefixes' layout)

WHAT = "input-embedding prompts, {P} virtual tokens each"
LEARNED = "prompts"
FILES = ("prompt.safetensors", "prompt-last.safetensors")
LR = 3e-2
FROZEN = True
LEARNS_TOKENS = True
POSITIONS_PER_VIRTUAL_TOKEN = 2  # a row holds both prompts: 2P positions
PROMPT_POSITIONS = 0


@torch.no_grad()
def init_from_words(model, names, prefix_len):
    """Start each prompt from the embeddings of the real word's tokens: the model then reads the word itself."""
    return torch.stack([model.wte(torch.tensor(init_word_ids(name, prefix_len), device=model.wte.weight.device))
                        for name in names]).float()


@torch.no_grad()
def init_random(model, names, prefix_len, generator=None):
    """Random prompts, drawn at the scale of the model's token embeddings."""
    scale = model.wte.weight.float().std()
    return torch.randn(len(names), prefix_len, model.config.n_embd, generator=generator).to(scale.device) * scale


def start(model, how):
    """The prompts at their start (a prefix.Start): from the words, or random."""
    if how.init == "words":
        prompts = init_from_words(model, NAMES, how.prefix_len)
    else:
        prompts = init_random(model, NAMES, how.prefix_len, torch.Generator().manual_seed(how.seed))
    return Prefixes(prompts).to(model.wte.weight.device)


def prompt_hidden(model, prompts, batch, grad_checkpoint=False):
    """
    The training forward over the same Batch as prefix.prefix_hidden: each row becomes

        [source prompt, P vectors] source [target prompt, P vectors] target, then padding

    with the vectors fed in place of token embeddings, causal attention, and positions counted
    through the prompts too. prompts: (n_prefixes, P, C). Returns the hidden states (B, 2P + T, C)
    and the Batch in that layout: a dummy token at each prompt slot, the lengths shifted by the
    prompts, so that train.target_loss finds the targets (the target prompt's last vector predicts
    the first).
    """
    idx, src_len, seq_len, src_prefix, tgt_prefix = batch[:5]
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
    return h, batch._replace(idx=tokens, src_len=src_len + 2 * P, seq_len=seq_len + 2 * P)


def hidden(model, prompts, batch, grad_checkpoint=False):
    """The training forward of the method: `prompts` (a prefix.Prefixes) on a Batch (see prompt_hidden)."""
    return prompt_hidden(model, prompts(), batch, grad_checkpoint)


@torch.no_grad()
def translate_ids(model, prompts, sources, src_prefix, tgt_prefix, max_new_tokens, **decoding):
    """Decoding with prompts: [source prompt] source [target prompt] is the prompt, the vectors fed as they are."""
    limits = [max_new_tokens] * len(sources) if isinstance(max_new_tokens, int) else max_new_tokens
    P = prompts.size(1)
    check_room(model.config.n_positions, sources, limits, taken=2 * P)
    vectors = prompts.to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    device = model.wte.weight.device
    embeds = [torch.cat([vectors[sp], model.wte(torch.tensor(s, device=device)), vectors[tp]])
              for s, sp, tp in zip(sources, src_prefix, tgt_prefix)]
    rows = [[0] * P + s + [0] * P for s in sources]  # the ids of the slots: the prompts' are not read
    return generate(model, rows, limits, stop_ids=(EOT,), embeds=embeds, **decoding)


def translator(model, prompts):
    """How a file of prompts translates: as prefix.translator, decoding with translate_ids above."""
    return prefix.translator(model, prompts, translate_ids)


def save(path, prompts, config, **metadata):
    learned = prompts.fold()
    learned_file.save(path, {"prefixes": learned}, "prompt", NAMES, config, prefix_len=learned.size(1), **metadata)


def load(path, meta):
    C, P = learned_file.numbers(path, meta, "n_embd", "prefix_len")
    return learned_file.tensors(path, meta, {"prefixes": (len(NAMES), P, C)})["prefixes"]
