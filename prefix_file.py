"""
The prefix file: what a method learned, as one safetensors file with a tensor named "prefixes"
and metadata that says what it is (the method, the two names, the model's sizes, P) and how it
was made (the training settings, the step, its validation loss). Reading one checks it whole:
a file that is damaged, not one train.py wrote, or holds NaN or inf is a one-line error.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from methods import METHODS
from mini_gpt2 import UserError
from mini_gpt2.files import os_problem, write_bytes
from prefix import NAMES


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


def load_prefixes(path):
    """
    Read a prefix (or prompt) file -> (tensor, names, metadata), checked (see above);
    metadata["method"] says which kind it is. check_fits then says whether it fits a model.
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
    return learned, names, meta


def check_fits(meta, model_config, path):
    """A one-line error if a prefix file's metadata says it was made for another model size."""
    want = (model_config.n_layer, model_config.n_head, model_config.n_embd)
    have = (int(meta["n_layer"]), int(meta["n_head"]), int(meta["n_embd"]))
    if have != want:
        made_for = meta.get("model", "another model")
        raise UserError(f"{path} was trained for {made_for} ({have[0]} layers, {have[1]} heads, width {have[2]}), "
                        f"but this model has {want[0]} layers, {want[1]} heads, width {want[2]}")
