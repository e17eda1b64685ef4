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
any activation, of which fine-tuning keeps about 1.5 times as many as the other methods (docs/comparison.md).

What is saved is a model folder in the hub's layout (mini_gpt2.save_pretrained: model.safetensors
and config.json, the float32 masters), which mini_gpt2.from_pretrained, translate.py --model and
transformers all load. The names below are prefix.py's, for the same things.
"""

import torch
import torch.nn as nn

from machinery import learned_file
from methods.prompting import ZERO_SHOT_TOKENS, FewShot, causal_hidden
from methods.prompting import zero_shot_example as example  # noqa: F401  (a translation follows the zero-shot prompt)
from mini_gpt2 import UserError, from_pretrained, save_pretrained
from mini_gpt2.load import config_of
from prefix import NAMES

WHAT = "every weight of the model"
LEARNED = "fine-tuned model"
FILES = ("model", "model-last")  # model folders
LR = 5e-5  # Li & Liang's for fine-tuning GPT-2 (docs/training.md)
FROZEN = False
LEARNS_TOKENS = False
POSITIONS_PER_VIRTUAL_TOKEN = 0
PROMPT_POSITIONS = ZERO_SHOT_TOKENS  # the zero-shot prompt around the source


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


def start(model, how):
    """Every weight, as the model has it: `how` (a prefix.Start) has nothing to say about it."""
    return FullModel(model)


def hidden(model, tuned, batch, grad_checkpoint=False):
    """The training forward: the zero-shot layout, the model's own weights learning (tuned() puts the masters in)."""
    tuned()
    return causal_hidden(model, batch, grad_checkpoint)


def translator(model, folder):
    """A fine-tuned model translates as zero-shot prompting does: the one in `folder` (loaded as `model` is), or None: `model`."""
    w = model.wte.weight
    return FewShot(model if folder is None else from_pretrained(folder, device=w.device, dtype=w.dtype), [])


def save(path, tuned, config, **metadata):
    """The fine-tuned model, as a folder in the hub's layout; what it is and how it was made in model.safetensors' header."""
    if not learned_file.finite(tuned.masters.values()):
        raise UserError(f"the weights hold NaN or inf values; {path} was not written")
    save_pretrained(path, tuned.state(), config, learned_file.describe("finetune", NAMES, config, **metadata))


def load(path, meta):
    """A fine-tuned model folder, too large to read here (translator loads it): its config.json must give its sizes."""
    config = config_of(path)
    if [config.n_layer, config.n_head, config.n_embd] != learned_file.numbers(path, meta, "n_layer", "n_head", "n_embd"):
        raise UserError(f"{path}: its config.json gives other sizes than its model.safetensors; {learned_file.FIX}")
    return path
