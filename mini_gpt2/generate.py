"""
Text generation with a KV cache: the prompt runs through the model once, then each step feeds
only the newest token and reads everything earlier from the cache.

Prompts of different lengths share a batch by left-padding: the pads sit before the prompt, are
masked out as keys, and do not count as positions, so each row computes exactly what it would
compute alone.
"""

import torch
import torch.nn.functional as F

from .model import KVCache
from .tokenizer import EOT


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=0.0, top_k=None, stop_ids=(EOT,),
             past_kv=None, past_valid=None, past_positions=None, generator=None, embeds=None):
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
    head = model.lm_head.weight.float()  # float32 logits, as GPT.logits computes them, with wte converted once
    logits = F.linear(h[:, -1].float(), head)  # (B, vocab): only the last position predicts
    device = logits.device
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    limit = torch.tensor(limits, device=device)
    all_valid = bool(keys_valid.all())
    for step in range(max(limits)):
        tok = _pick(logits, temperature, top_k, generator)  # (B,)
        done |= torch.isin(tok, stop) | (limit <= step)
        tok = tok.masked_fill(done, EOT)  # finished rows keep running on a harmless token
        new = tok.tolist()
        finished = done.tolist()
        for b in range(B):
            if not finished[b]:
                out[b].append(new[b])
        if all(finished) or step == max(limits) - 1:
            break
        # One step: feed the new tokens, attend to everything cached that is real.
        mask = None
        if not all_valid:
            keys_valid = torch.cat([keys_valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
            mask = keys_valid[:, None, :]
        h, cache = model.hidden(tok[:, None], cache, mask, next_pos[:, None])
        logits = F.linear(h[:, -1].float(), head)
        next_pos = next_pos + 1
    return out


def _pick(logits, temperature, top_k, generator):
    if not temperature:
        return logits.argmax(-1)
    # In float64 (a temperature such as 1e-320 is 0 in float32), shifted so that the largest is 0:
    # divided by a tiny temperature the others go to -inf (greedy, in effect), never to +inf or NaN.
    logits = logits.double()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


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
    h, cache = model.hidden(idx, past_kv, keys_valid[:, None, :] & causal, pos, embeds=vectors)
    return h, cache, keys_valid, start + valid.sum(1)
