"""
LoRA (Hu et al., 2021, `--method lora`): instead of tokens, learn a low-rank change of some of
GPT-2's own weights. A weight W (out x in) becomes

    W + (alpha / r) B A          A: r x in, B: out x r, r much smaller than in and out

on the query and value parts of every layer's attention projection (c_attn), with r = 4 and
alpha = 32: the LoRA paper's GPT-2 recipe (its E2E NLG experiments; loralib's GPT-2 example runs
lora_dim 4, lora_alpha 32 on W_q and W_v). B starts at zero, so training starts from the frozen
model exactly; A from a small uniform draw, as loralib's. GPT-2 XL: 48 layers x 2 (q, v) x
4 x (1600 + 1600) = 1,228,800 learned numbers, 4.9 MB.

There are no learned tokens, so a translation reads as the zero-shot prompt continued
(prompting.py): `fr: <source>\\nen:` then the target and <|endoftext|>, in training and in
decoding. Full fine-tuning (finetune.py) reads the same; the two differ only in what learns.
The names below are prefix.py's, for the same things.
"""

import math
from contextlib import contextmanager
from types import MethodType

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery import learned_file
from methods.prompting import ZERO_SHOT_TOKENS, FewShot, causal_hidden
from methods.prompting import zero_shot_example as example  # noqa: F401  (a translation follows the zero-shot prompt)
from prefix import NAMES

RANK, ALPHA = 4, 32

WHAT = "LoRA's A and B on every layer's query and value"
LEARNED = "LoRA"
FILES = ("lora.safetensors", "lora-last.safetensors")
LR = 2e-4  # the LoRA paper's for GPT-2 (docs/training.md)
FROZEN = True
LEARNS_TOKENS = False
POSITIONS_PER_VIRTUAL_TOKEN = 0
PROMPT_POSITIONS = ZERO_SHOT_TOKENS  # the zero-shot prompt around the source


class LoRA(nn.Module):
    """A and B for every layer's query and value: A (n_layer, 2, r, C), B (n_layer, 2, C, r); 2 = query, value."""

    def __init__(self, A, B, alpha=ALPHA):
        super().__init__()
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.alpha, self.scale = alpha, alpha / A.size(2)

    def forward(self):
        return self  # what the training forward takes: the updates themselves


def updated_c_attn(self, x):
    """A layer's c_attn with its update (self.lora_A, lora_B, lora_scale): W x + b, plus (alpha / r) B A x on q and v."""
    q, k, v = F.linear(x, self.weight, self.bias).split(x.size(-1), dim=-1)  # each (B, T, C)
    A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # (2, r, C), (2, C, r): query, value
    q = q + self.lora_scale * (x @ A[0].T) @ B[0].T  # through r numbers per token: (B, T, r) -> (B, T, C)
    v = v + self.lora_scale * (x @ A[1].T) @ B[1].T
    return torch.cat([q, k, v], dim=-1)


@contextmanager
def attached(model, lora):
    """
    Run `model` with the updates of `lora` inside (its weights stay as they are), as PEFT's LoRA
    layers do. Every layer runs the one function, its A and B beside its weights: compiled code
    (--compile) then meets the same code in every layer, and compiles it once.
    """
    for i, block in enumerate(model.h):
        c_attn = block.attn.c_attn
        c_attn.lora_A, c_attn.lora_B, c_attn.lora_scale = lora.A[i], lora.B[i], lora.scale
        c_attn.forward = MethodType(updated_c_attn, c_attn)
    try:
        yield model
    finally:
        for block in model.h:  # back to nn.Linear's
            for name in ("forward", "lora_A", "lora_B", "lora_scale"):
                delattr(block.attn.c_attn, name)


@torch.no_grad()
def merge(model, lora):
    """Fold the updates into the weights for good: W += (alpha / r) B A. The same logits, with no extra work per token."""
    C = model.config.n_embd
    for i, block in enumerate(model.h):
        w = block.attn.c_attn.weight  # (3C, C): query rows, then key rows, then value rows
        for part, rows in ((0, slice(0, C)), (1, slice(2 * C, 3 * C))):
            w[rows] += (lora.scale * lora.B[i, part].float() @ lora.A[i, part].float()).to(w.dtype)
    return model


def lora_start(model, rank=RANK, alpha=ALPHA, generator=None):
    """LoRA at its start, on the model's device: B = 0, so the model computes just what it did."""
    L, C = model.config.n_layer, model.config.n_embd
    bound = 1 / math.sqrt(C)  # loralib's kaiming_uniform_(a=sqrt(5)) for a fan-in of C
    A = (torch.rand(L, 2, rank, C, generator=generator) * 2 - 1) * bound
    return LoRA(A, torch.zeros(L, 2, C, rank), alpha).to(model.wte.weight.device)


def start(model, how):
    """LoRA at its start (a prefix.Start: A drawn from its seed), the paper's rank and alpha."""
    return lora_start(model, generator=torch.Generator().manual_seed(how.seed))


def hidden(model, lora, batch, grad_checkpoint=False):
    """The training forward: the zero-shot layout (its tokens are the examples'), with the updates attached."""
    with attached(model, lora):
        return causal_hidden(model, batch, grad_checkpoint)


def translator(model, lora):
    """Zero-shot prompting of the model with a LoRA attached: how a LoRA file translates."""
    lora = lora.to(model.wte.weight.device)
    prompting = FewShot(model, [])  # its cache of the "fr:" head is made with the updates attached

    def translate(texts, source, target, limits, **decoding):
        with attached(model, lora):
            return prompting(texts, source, target, limits, **decoding)
    return translate


def save(path, lora, config, **metadata):
    learned_file.save(path, {"lora_A": lora.A, "lora_B": lora.B}, "lora", NAMES, config, rank=lora.A.size(2),
                      alpha=lora.alpha, **metadata)


def load(path, meta):
    L, C, r = learned_file.numbers(path, meta, "n_layer", "n_embd", "rank")
    (alpha,) = learned_file.numbers(path, meta, "alpha", kind=float)
    found = learned_file.tensors(path, meta, {"lora_A": (L, 2, r, C), "lora_B": (L, 2, C, r)})
    return LoRA(found["lora_A"], found["lora_B"], alpha)
