"""
Text generation with a KV cache: the prompt runs through the model once (`prefill`), then each
step picks every row's next token, writes its keys/values into the cache and reads everything
earlier from it (`decode`), until each row stops.

Prompts of different lengths share a batch by left-padding: the pads sit before the prompt, are
masked out as keys, and do not count as positions, so each row computes exactly what it would
compute alone.
"""

import torch

from . import fast
from .model import KVCache
from .tokenizer import EOT


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=0.0, top_k=None, stop_ids=(EOT,),
             past_kv=None, past_valid=None, past_positions=None, generator=None, embeds=None, graphs=None):
    """
    prompts:        list of token-id lists, lengths may differ
    max_new_tokens: int, or one int per prompt
    temperature:    0 for greedy; else sample from softmax(logits / temperature), over the top_k if given
    stop_ids:       a row ends when it produces one of these (it is not returned)
    past_kv, past_valid, past_positions: an optional cache placed before the prompts (e.g. a prefix):
                    per layer (k, v) each (B, nh, P, hd), or a KVCache with room for the rest; which
                    of its P entries are real (B, P) bool; how many positions they used (B,) ints,
                    where the prompt's positions start
    embeds:         None, or per prompt a (len(prompt), C) tensor fed in place of its tokens'
                    embeddings (learned prompt vectors among words, say); its ids then only count
    graphs:         on a GPU, a fast.Graphs that keeps its captured steps for later calls
    returns one list of new token ids per prompt
    """
    B, n_pos = len(prompts), model.config.n_positions
    limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    starts = [0] * B if past_positions is None else [int(p) for p in past_positions]
    for p, s, m in zip(prompts, starts, limits):
        if len(p) == 0:
            raise ValueError("empty prompt")
        if s + len(p) + m > n_pos:
            raise ValueError(f"{s + len(p)} prompt positions + {m} new tokens is more than GPT-2's {n_pos} positions")

    h, cache, keys_valid, next_pos = prefill(model, prompts, past_kv, past_valid, past_positions, max(limits), embeds)
    # -- speed enters here (fast.py): on a GPU the same steps, each replayed as one captured CUDA graph
    if fast.uses_graphs(h.device):
        return fast.decode(model, h[:, -1], cache, keys_valid, next_pos, limits, stop_ids, temperature, top_k,
                           generator, graphs)
    return decode(model, h[:, -1], cache, keys_valid, next_pos, limits, stop_ids, temperature, top_k, generator)


def prefill(model, prompts, past_kv=None, past_valid=None, past_positions=None, room=0, embeds=None):
    """
    Run left-padded prompts through the model at once, after an optional cache (see generate),
    into a KVCache per layer with `room` entries to spare. Query t sees the real keys up to itself.
    embeds: as in generate.
    Returns the hidden states (B, T, C) (None if every prompt is empty), the caches, which of
    their keys are real (B, S), and each row's next position (B,).
    """
    device, dtype = model.wte.weight.device, model.wte.weight.dtype
    c = model.config
    B, T = len(prompts), max(len(p) for p in prompts)
    if past_kv is None or not isinstance(past_kv[0], KVCache):
        P = 0 if past_kv is None else past_kv[0][0].size(2)
        caches = [KVCache(B, c.n_head, P + T + room, c.head_dim, device, dtype) for _ in range(c.n_layer)]
        for cache, kv in zip(caches, past_kv or []):
            cache.update(*kv)
        past_kv = caches
    idx = torch.zeros(B, T, dtype=torch.long, device=device)
    valid = torch.zeros(B, T, dtype=torch.bool, device=device)  # which entries are real tokens
    vectors = None if embeds is None else torch.zeros(B, T, c.n_embd, device=device, dtype=dtype)
    for b, p in enumerate(prompts):
        if p:
            idx[b, T - len(p):] = torch.tensor(p, device=device)
            valid[b, T - len(p):] = True
            if vectors is not None:
                vectors[b, T - len(p):] = embeds[b]
    start = torch.tensor([0] * B if past_positions is None else list(past_positions), device=device)
    pos = start[:, None] + (valid.cumsum(1) - 1).clamp(min=0)  # pads get a dummy position, unused
    if past_valid is None:
        past_valid = torch.ones(B, past_kv[0].len, dtype=torch.bool, device=device)
    keys_valid = torch.cat([past_valid, valid], dim=1)  # (B, S)
    if T == 0:
        return None, past_kv, keys_valid, start
    S = keys_valid.size(1)
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
    sees = keys_valid[:, None, :] & causal
    sees[:, range(T), range(S - T, S)] = True  # a pad sees its own key, never nothing (its output is not used)
    h, cache = model.hidden(idx, past_kv, sees, pos, embeds=vectors)
    return h, cache, keys_valid, start + valid.sum(1)


@torch.no_grad()
def decode(model, h, cache, keys_valid, next_pos, limits, stop_ids=(EOT,), temperature=0.0, top_k=None, generator=None):
    """
    The tokens after a prefill, one step at a time. h (B, C): the prompt's last hidden state;
    cache: a KVCache per layer with room for max(limits) more entries; keys_valid (B, S): which of
    its entries are real; next_pos (B,): each row's next position. Returns one list of new token
    ids per row: each ends before a stop id, or at its limit.
    """
    B = h.size(0)
    logits = model.logits(h)  # (B, vocab), float32
    out, done = [[] for _ in range(B)], [False] * B
    pos = next_pos.clone()
    for t in range(max(limits)):
        tok = pick(logits, temperature, top_k, generator)  # every row's next token (B,)
        for b, token in enumerate(tok.tolist()):
            done[b] = done[b] or token in stop_ids or t >= limits[b]
            if not done[b]:
                out[b].append(token)
        if all(done) or t == max(limits) - 1:
            break
        keys_valid = torch.cat([keys_valid, keys_valid.new_ones(B, 1)], dim=1)  # the new token's key is real
        h, cache = model.hidden(tok[:, None], cache, keys_valid[:, None, :], pos[:, None])  # its keys/values: cached
        logits = model.logits(h[:, -1])
        # the next position, but for a finished row (or one at its limit): it stays within GPT-2's positions
        pos += torch.tensor([not done[b] and t + 1 < limits[b] for b in range(B)], device=pos.device)
    return out


def pick(logits, temperature, top_k, generator):
    """The next token of each row (B,): the most likely, or drawn from softmax(logits / temperature) over the top_k."""
    if not temperature:
        return logits.argmax(-1)
    # In float64 (a temperature such as 1e-320 is 0 in float32; Apple's GPUs have no float64), shifted
    # so that the largest is 0: divided by a tiny temperature the others go to -inf, never +inf or NaN.
    logits = logits.double() if logits.device.type in ("cpu", "cuda") else logits.float()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
