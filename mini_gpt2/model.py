"""
GPT-2, the whole model in one file.

    tokens -> wte + wpe -> [ln_1 -> attention -> + -> ln_2 -> MLP -> +] x n_layer -> ln_f -> lm_head

Shapes in the comments: B batch, T new tokens, S = past + T keys, C = n_embd,
nh = n_head, hd = head dim (C // nh).

The attention keeps a per-layer cache of past keys and values. Those entries need not come from
tokens: prefix-tuning (prefix.py) puts learned keys/values there, which is why attention also
takes an explicit mask, and the model explicit position ids.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024  # the longest sequence the learned position table covers
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d):
        """Read the fields we use from a Hugging Face config.json (extra keys are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# The four released sizes; the one place these numbers live.
CONFIGS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),         # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}


class KVCache:
    """
    One layer's keys and values during generation, in buffers made once for `capacity` entries:
    each step writes its new entry in place, where torch.cat would copy the whole cache, in every
    layer, at every step.
    """

    def __init__(self, B, n_head, capacity, head_dim, device, dtype):
        self.k = torch.empty(B, n_head, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.len = 0

    def update(self, k, v):
        """Append keys/values (B, nh, T, hd); return all of them so far, each (B, nh, len, hd)."""
        T = k.size(2)
        self.k[:, :, self.len:self.len + T] = k
        self.v[:, :, self.len:self.len + T] = v
        self.len += T
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


def mask_bias(visible, dtype):
    """
    A bool mask (True where a query may look) as what attention adds to its scores: 0, or the
    most negative finite number (not -inf, which turns a row that sees nothing into NaN; the
    callers give every query at least its own key anyway). Its rows are laid out 16 numbers apart
    at least, as fused attention kernels want them. Made once per forward pass, not in every layer.
    """
    S = visible.size(-1)
    bias = torch.zeros(*visible.shape[:-1], -(-S // 16) * 16, dtype=dtype, device=visible.device)[..., :S]
    return bias.masked_fill_(~visible, torch.finfo(dtype).min)


def attention(q, k, v, mask=None):
    """
    softmax(q k^T / sqrt(hd) + mask) v, written out: every query (B, nh, T, hd) against every key
    (B, nh, S, hd) -> (B, nh, T, hd). mask as in CausalSelfAttention.forward.
    """
    # (B, nh, T, hd) @ (B, nh, hd, S) -> (B, nh, T, S), scaled by 1/sqrt(hd); scaling q is the same,
    # and cheaper than scaling the (T, S) scores
    att = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)
    if mask is not None:
        att = att + mask  # masked scores sink to the most negative number: softmax gives them ~0
    att = F.softmax(att, dim=-1, dtype=torch.float32).to(v.dtype)
    return att @ v  # (B, nh, T, S) @ (B, nh, S, hd) -> (B, nh, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        # On a GPU, PyTorch's fused kernel computes `attention` without writing the (T, S) scores
        # to memory (softmax in float32 inside it, too): for GPT-2 XL training that is faster and
        # gigabytes smaller. False: the written-out function there as well (benchmarks compare them).
        self.fused_on_gpu = True

    def forward(self, x, past=None, mask=None):
        """
        x:    (B, T, C) the new tokens
        past: keys/values placed before these tokens: None, or (k, v) each (B, nh, P, hd), or a
              KVCache holding P entries, which these tokens' keys/values are written into
        mask: None (every key visible), or what to add to the scores (B or 1, 1, T, S): 0 where a
              query may look, the most negative number where it may not (see mask_bias)
        returns (B, T, C) and this layer's keys/values, S = P + T of them: (k, v) or the KVCache
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # split the channels into heads: (B, T, C) -> (B, nh, T, hd)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if isinstance(past, KVCache):
            k, v = past.update(k, v)
            present = past
        else:
            if past is not None:  # e.g. a learned prefix, through which gradients must flow
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
            present = (k, v)

        if q.is_cuda and self.fused_on_gpu:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.c_proj(y), present


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form differs a little.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block: normalise, then add each sub-layer's output to the residual."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, past=None, mask=None):
        a, kv = self.attn(self.ln_1(x), past, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv

    def output(self, x, past=None, mask=None):
        """The block's output without its keys/values (what activation checkpointing keeps)."""
        return self(x, past, mask)[0]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # learned position embeddings
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # GPT-2 reads out with its input embedding matrix

    def hidden(self, idx, past_kv=None, attn_mask=None, position_ids=None, grad_checkpoint=False, embeds=None):
        """
        The model up to ln_f, plus the cache. Callers that want only some positions' logits
        (generation, the training loss) take `logits` of just those.

        idx:          (B, T) token ids
        past_kv:      None, or per layer (k, v) each (B, nh, P, hd), or per layer a KVCache
        attn_mask:    None for plain causal attention after the past, else bool (B, T, P + T)
        position_ids: None for P, P+1, ... (the past are earlier tokens), else (B, T) or (T,)
        grad_checkpoint: keep only each block's input for backward and recompute the rest then
                      (less memory, one more forward pass of compute); no cache is returned
        embeds:       None, or (B, T, C) vectors to feed in place of wte(idx): e.g. learned prompt
                      vectors among the tokens' embeddings
        returns (B, T, C) and the new cache: per layer (k, v) each (B, nh, P + T, hd), or the KVCache
        """
        B, T = idx.shape
        if past_kv is None:
            P = 0
        else:
            P = past_kv[0].len if isinstance(past_kv[0], KVCache) else past_kv[0][0].size(2)
        if position_ids is None:
            if P + T > self.config.n_positions:
                raise ValueError(f"{P + T} positions, but GPT-2 has only {self.config.n_positions}")
            position_ids = torch.arange(P, P + T, device=idx.device)
        if attn_mask is not None:
            mask = mask_bias(attn_mask[:, None], self.wte.weight.dtype)  # (B, 1, T, S): the same for every head
        elif T > 1:
            # causal: query t sees every past entry and the new tokens up to itself
            mask = mask_bias(torch.ones(T, P + T, dtype=torch.bool, device=idx.device).tril(diagonal=P),
                             self.wte.weight.dtype)
        else:
            mask = None  # one new token may look at everything

        x = (self.wte(idx) if embeds is None else embeds) + self.wpe(position_ids)  # (B, T, C)
        if grad_checkpoint and torch.is_grad_enabled():
            # Keeping the blocks' keys/values would hold every layer's until the pass ends: we don't.
            for i, block in enumerate(self.h):
                x = checkpoint(block.output, x, None if past_kv is None else past_kv[i], mask, use_reentrant=False)
            return self.ln_f(x), None
        present = []
        for i, block in enumerate(self.h):
            x, kv = block(x, None if past_kv is None else past_kv[i], mask)
            present.append(kv)
        return self.ln_f(x), present

    def logits(self, h):
        """
        lm_head in float32, on the hidden states given (B..., C) -> (B..., vocab_size). GPT-2's
        logits are tens in magnitude, where bfloat16 steps by 0.25: rounded to it, they would blur
        the loss and flip near-ties in decoding.
        """
        if self.lm_head.weight.dtype == torch.float32:
            return F.linear(h.float(), self.lm_head.weight)
        from . import fast  # speed: weights in bfloat16 give float32 logits without a float32 copy of wte per call
        return fast.float32_logits(self, h)

    def forward(self, idx, past_kv=None, attn_mask=None, position_ids=None):
        """Logits (B, T, vocab_size) for every position, in float32."""
        return self.logits(self.hidden(idx, past_kv, attn_mask, position_ids)[0])
