"""
Full fine-tuning (`--method finetune`): every weight of GPT-2 learns, the baseline Li & Liang
compared prefix-tuning with. A translation reads as LoRA's does (lora.py): the zero-shot prompt
continued, so a fine-tuned model is zero-shot prompting with other weights.

The optimizer keeps float32 master weights and states whatever the compute dtype. With float32
weights the model's own are the masters. With bfloat16 weights the model computes in bfloat16:
each weight's gradient goes to its float32 master as soon as it is complete (and the bfloat16
one is freed), AdamW steps the masters, and the first pass after a step copies them into the
model. Memory, per parameter: master 4 bytes, its gradient 4, AdamW's two moments 8, the
bfloat16 copy 2: 18 bytes, 16 in float32. For GPT-2 XL (1.56B) that is 26 GiB (23 GiB) before
any activation, of which fine-tuning keeps about 1.5 times as many as the other methods (README).

What is saved is a model folder in the hub's layout (mini_gpt2.save_pretrained: model.safetensors
and config.json, the float32 masters), which mini_gpt2.from_pretrained, translate.py --model and
transformers all load.
"""

import json

import torch
import torch.nn as nn

from mini_gpt2 import UserError, save_pretrained
from methods.prompting import causal_hidden


class FullModel(nn.Module):
    """The learned numbers of full fine-tuning: every weight of `model`, as float32 masters."""

    def __init__(self, model):
        super().__init__()
        model.requires_grad_(True)
        self.model = [model]  # a list, not a submodule: what is learned is the masters below
        named = dict(model.named_parameters())  # wte once: lm_head shares it
        self.separate = model.wte.weight.dtype != torch.float32
        if self.separate:
            self.masters = nn.ParameterDict({key(n): nn.Parameter(p.detach().float().clone()) for n, p in named.items()})
            for n, p in named.items():
                p.register_post_accumulate_grad_hook(self.to_master(self.masters[key(n)]))
        else:
            self.masters = nn.ParameterDict({key(n): p for n, p in named.items()})  # the model's own

    @staticmethod
    def to_master(master):
        def hook(p):  # the pass's gradient, added to the master's in float32; the bfloat16 one freed
            master.grad = p.grad.float() if master.grad is None else master.grad + p.grad.float()
            p.grad = None
        return hook

    @torch.no_grad()
    def forward(self):
        """Before a pass: the masters, as the optimizer left them, into the model's weights (if they changed since)."""
        if not self.separate:  # the masters are the model's own weights
            return self
        changed = tuple(m._version for m in self.masters.values())  # in-place updates count up a tensor's version
        if changed != getattr(self, "copied", None):
            for n, p in self.model[0].named_parameters():
                p.copy_(self.masters[key(n)])
            self.copied = changed
        return self

    def state(self):
        """The weights by the model's names, in float32."""
        return {n.replace("__", "."): m for n, m in self.masters.items()}


def key(name):
    return name.replace(".", "__")  # ParameterDict's keys may hold no dots


def start(model):
    return FullModel(model)


def finetune_hidden(model, learned, idx, src_len, seq_len, src_prefix, tgt_prefix, grad_checkpoint=False):
    """The training forward: the zero-shot layout, the model's own weights learning."""
    return causal_hidden(model, idx, src_len, seq_len, grad_checkpoint)


def save(path, learned, config, names, **metadata):
    """The fine-tuned model, as a folder in the hub's layout; what it is and how it was made in model.safetensors' header."""
    if not all(bool(torch.isfinite(m).all()) for m in learned.masters.values()):
        raise UserError(f"the weights hold NaN or inf values; {path} was not written")
    meta = {"method": "finetune", "names": json.dumps(list(names)), "n_layer": config.n_layer, "n_head": config.n_head,
            "n_embd": config.n_embd, "model_vocab": config.vocab_size}
    save_pretrained(path, learned.state(), config, meta | metadata)
