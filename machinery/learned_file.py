"""
The file of what a method learned: for prefixes, prompts and LoRA one safetensors file (tensors
"prefixes", or "lora_A" and "lora_B") with metadata that says what it is (the method, the two
names, the model's sizes, P or LoRA's rank and alpha) and how it was made (the training
settings, the step, its validation loss, the run's speed and memory). A fine-tuned model is a
folder in the hub's layout instead (methods/finetune.py), its metadata in the header of its
model.safetensors. Reading one checks it whole: a file that is damaged, not one train.py wrote,
or holds NaN or inf is a one-line error.

Each method's module saves and loads its own (prefix.save, prefix.load, ...) through these
functions; methods.load reads any of them.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialise

from mini_gpt2 import UserError
from mini_gpt2.files import os_problem, write_bytes

FIX = "train again, or point --learned at a file (or fine-tuned model folder) that train.py wrote"


def finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def describe(method, names, config, **metadata):
    """The metadata of a learned file, as strings: what it is, and what it was made for and how."""
    meta = {"method": method, "names": json.dumps(list(names)), "n_layer": str(config.n_layer),
            "n_head": str(config.n_head), "n_embd": str(config.n_embd), "model_vocab": str(config.vocab_size)}
    return meta | {k: str(v) for k, v in metadata.items()}


def save(path, tensors, method, names, config, **metadata):
    """One safetensors file of `tensors` {name: tensor}, float32, with describe()'s metadata; never NaN or inf."""
    if not finite(tensors.values()):
        raise UserError(f"the {method} numbers hold NaN or inf values; {path} was not written")
    data = {k: t.detach().float().cpu().contiguous() for k, t in tensors.items()}
    write_bytes(path, serialise(data, metadata=describe(method, names, config, **metadata)))


def weights_of(path):
    """The safetensors file that holds a learned file's metadata: itself, or a model folder's model.safetensors."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def metadata(path, names, methods):
    """
    The metadata of the learned file at `path`, checked: written by train.py, for these `names`, by
    one of these `methods` (names).
    """
    path, weights = Path(path), weights_of(path)
    if path.is_dir() and not weights.exists():
        raise UserError(f"{path} is a folder, not a file of what train.py learned; {FIX}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata()
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); {FIX}") from None
    except OSError as e:
        raise UserError(f"{os_problem(e, path, 'reading')}; {FIX}") from None
    try:
        ok = json.loads(meta["names"]) == list(names) and meta["method"] in methods
        sizes = [int(meta[k]) for k in ("n_layer", "n_head", "n_embd")]
        ok = ok and min(sizes) >= 1 and sizes[2] % sizes[1] == 0
    except (TypeError, KeyError, ValueError):  # TypeError: no metadata at all
        ok = False
    if not ok:
        raise UserError(f"{path} lacks the metadata train.py writes (method, names, sizes); {FIX}")
    return meta


def numbers(path, meta, *keys, kind=int):
    """Numbers from a learned file's metadata (its sizes, P, LoRA's rank): one line if one is missing or not a number."""
    try:
        return [kind(meta[k]) for k in keys]
    except (KeyError, ValueError):
        raise UserError(f"{path} lacks the metadata train.py writes (method, names, sizes); {FIX}") from None


def tensors(path, meta, shapes):
    """The tensors of a learned file, by name, each of the shape `shapes` gives and finite; else one line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in shapes if k not in keys]
            if missing:
                raise UserError(f"{path} holds no tensor named {missing[0]!r} ({', '.join(sorted(keys)) or 'none'}); {FIX}")
            found = {k: f.get_tensor(k) for k in shapes}
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); {FIX}") from None
    except OSError as e:
        raise UserError(f"{os_problem(e, path, 'reading')}; {FIX}") from None
    for k, want in shapes.items():
        if tuple(found[k].shape) != want:
            raise UserError(f"{path}: its tensor has shape {tuple(found[k].shape)}, but its metadata says {want} "
                            f"(--method {meta['method']}); {FIX}")
    if not finite(found.values()):
        raise UserError(f"{path} holds NaN or inf values (the training diverged); {FIX}")
    return found


def check_fits(meta, model_config, path):
    """A one-line error if a file's metadata says it was made for another model size."""
    want = (model_config.n_layer, model_config.n_head, model_config.n_embd)
    have = (int(meta["n_layer"]), int(meta["n_head"]), int(meta["n_embd"]))
    if have != want:
        made_for = meta.get("model", "another model")
        raise UserError(f"{path} was trained for {made_for} ({have[0]} layers, {have[1]} heads, width {have[2]}), "
                        f"but this model has {want[0]} layers, {want[1]} heads, width {want[2]}")
