"""
The file of what a method learned: for prefixes, prompts and LoRA one safetensors file (tensors
"prefixes", or "lora_A" and "lora_B") with metadata that says what it is (the method, the two
names, the model's sizes, P or LoRA's rank and alpha) and how it was made (the training
settings, the step, its validation loss, the run's speed and memory). A fine-tuned model is a
folder in the hub's layout instead (finetune.py), its metadata in the header of its
model.safetensors. Reading one checks it whole: a file that is damaged, not one train.py wrote,
or holds NaN or inf is a one-line error.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from methods import lora
from mini_gpt2 import UserError
from mini_gpt2.files import os_problem, write_bytes
from prefix import NAMES

KINDS = ("prefix", "prompt", "lora", "finetune")


def save_prefixes(path, learned, names, model_config, method="prefix", **metadata):
    """
    One safetensors file: `learned` a tensor (the prefixes or prompts, as they are used) or a dict
    of tensors by name (LoRA's), and what they were made for.
    """
    tensors = learned if isinstance(learned, dict) else {"prefixes": learned}
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise UserError(f"the prefixes hold NaN or inf values; {path} was not written")
    meta = {"method": method, "names": json.dumps(list(names)), "n_layer": str(model_config.n_layer),
            "n_head": str(model_config.n_head), "n_embd": str(model_config.n_embd),
            "model_vocab": str(model_config.vocab_size)}
    if method == "lora":
        meta["rank"] = str(tensors["lora_A"].size(2))
    else:
        meta["prefix_len"] = str(tensors["prefixes"].shape[4 if method == "prefix" else 1])
    meta.update({k: str(v) for k, v in metadata.items()})
    write_bytes(path, save({k: t.detach().float().cpu().contiguous() for k, t in tensors.items()}, metadata=meta))


def expected_shapes(meta):
    """The tensors a file of this metadata must hold, by name and shape."""
    n, L, nh, C = len(json.loads(meta["names"])), int(meta["n_layer"]), int(meta["n_head"]), int(meta["n_embd"])
    if C % nh:
        raise ValueError
    if meta["method"] == "lora":
        r = int(meta["rank"])
        float(meta["alpha"])
        return {"lora_A": (L, 2, r, C), "lora_B": (L, 2, C, r)}
    P = int(meta["prefix_len"])
    return {"prefixes": (n, L, 2, nh, P, C // nh) if meta["method"] == "prefix" else (n, P, C)}


def load_prefixes(path):
    """
    Read a file of what was learned -> (learned, names, metadata), checked (see above):
    metadata["method"] says which kind it is, and `learned` is the tensor of prefixes or prompts,
    a lora.LoRA, or for a fine-tuned model its folder (too large to read here: from_pretrained
    loads it). check_fits then says whether it fits a model.
    """
    path = Path(path)
    fix = "train again, or point --prefix at a file (or fine-tuned model folder) that train.py wrote"
    weights = path / "model.safetensors" if path.is_dir() else path
    if path.is_dir() and not weights.exists():
        raise UserError(f"{path} is a folder, not a prefix file; {fix}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta, keys = f.metadata(), set(f.keys())
            shapes = _expected(meta, path, fix)
            if meta["method"] == "finetune":
                return path, json.loads(meta["names"]), meta
            missing = [k for k in shapes if k not in keys]
            if missing:
                raise UserError(f"{path} holds no tensor named {missing[0]!r} ({', '.join(sorted(keys)) or 'none'}); {fix}")
            tensors = {k: f.get_tensor(k) for k in shapes}
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); {fix}") from None
    except OSError as e:
        raise UserError(f"{os_problem(e, path, 'reading')}; {fix}") from None
    for k, want in shapes.items():
        if tuple(tensors[k].shape) != want:
            raise UserError(f"{path}: its tensor has shape {tuple(tensors[k].shape)}, but its metadata says {want} "
                            f"(--method {meta['method']}); {fix}")
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise UserError(f"{path} holds NaN or inf values (the training diverged); {fix}")
    names = json.loads(meta["names"])
    if meta["method"] == "lora":
        return lora.LoRA(tensors["lora_A"], tensors["lora_B"], float(meta["alpha"])), names, meta
    return tensors["prefixes"], names, meta


def _expected(meta, path, fix):
    try:
        names = json.loads(meta["names"])
        if sorted(names) != sorted(NAMES) or meta["method"] not in KINDS:
            raise ValueError
        return {} if meta["method"] == "finetune" else expected_shapes(meta)
    except (TypeError, KeyError, ValueError):  # TypeError: no metadata at all
        raise UserError(f"{path} lacks the metadata train.py writes (method, names, sizes); {fix}") from None


def check_fits(meta, model_config, path):
    """A one-line error if a file's metadata says it was made for another model size."""
    want = (model_config.n_layer, model_config.n_head, model_config.n_embd)
    have = (int(meta["n_layer"]), int(meta["n_head"]), int(meta["n_embd"]))
    if have != want:
        made_for = meta.get("model", "another model")
        raise UserError(f"{path} was trained for {made_for} ({have[0]} layers, {have[1]} heads, width {have[2]}), "
                        f"but this model has {want[0]} layers, {want[1]} heads, width {want[2]}")
