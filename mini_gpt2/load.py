"""
Load OpenAI's released GPT-2 weights (as the Hugging Face hub stores them) into our model, and
save a model in the same layout (a fine-tuned one, say).

Two things to know about those files:
- They come in two key layouts: the hub's original files name tensors `h.0.attn.c_attn.weight`
  and carry `h.N.attn.bias` (a saved causal-mask buffer, not a weight); `save_pretrained` writes
  `transformer.h.0.attn.c_attn.weight`. We accept both.
- OpenAI's code used "Conv1D" layers, a linear layer whose weight is stored [in, out]. nn.Linear
  keeps [out, in], so those four matrices per block are transposed on the way in.
"""

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .download import hub_download, in_cache
from .files import UserError, os_problem, write_bytes
from .model import CONFIGS, GPT, GPTConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some files carry


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device):
    """bfloat16 on a CUDA GPU that computes in it (compute capability 8.0 on: A100, RTX 30xx, H100, ...), else float32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def resolve(name_or_path):
    """A size name, a folder, or a .safetensors file -> (weights file, config.json or None)."""
    p = Path(name_or_path)
    if name_or_path in CONFIGS and not p.exists():
        repo = f"openai-community/{name_or_path}"
        return hub_download(repo, "model.safetensors"), hub_download(repo, "config.json")
    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.exists():
            raise UserError(f"{p} holds no model.safetensors")
    elif p.suffix == ".safetensors" and p.exists():
        weights = p
    else:
        raise UserError(f"{name_or_path!r} is neither a model size ({', '.join(CONFIGS)}) nor a folder or .safetensors file")
    config = weights.parent / "config.json"
    return weights, (config if config.exists() else None)


def read_config(config_file):
    """A Hugging Face config.json -> GPTConfig, or a one-line error that names the file."""
    try:
        d = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(os_problem(e, config_file, "reading")) from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{config_file} is not a valid config.json ({e}); {_fix(config_file)}") from None
    if not isinstance(d, dict):
        raise UserError(f"{config_file} is not a GPT-2 config.json (not a JSON object); {_fix(config_file)}")
    kinds = {int: int, float: (int, float)}
    bad = [f.name for f in fields(GPTConfig) if f.name in d and not isinstance(d[f.name], kinds[f.type])]
    if bad:
        raise UserError(f"{config_file} is not a GPT-2 config.json (wrong {', '.join(bad)}); {_fix(config_file)}")
    config = GPTConfig.from_dict(d)
    sizes = (config.n_layer, config.n_head, config.n_embd, config.n_positions, config.vocab_size)
    if min(sizes) < 1 or config.n_embd % config.n_head:
        raise UserError(f"{config_file} gives impossible sizes {sizes}; {_fix(config_file)}")
    return config


def metadata_of(path):
    """A model folder or .safetensors file on this disk: its weights' header metadata; an unreadable one, one line naming it."""
    weights, _ = resolve(path)
    with _open(weights) as f:
        return f.metadata() or {}


def config_of(name_or_path):
    """The model's sizes, without loading (or downloading) its weights."""
    if name_or_path in CONFIGS and not Path(name_or_path).exists():
        return CONFIGS[name_or_path]
    weights, config_file = resolve(name_or_path)
    if config_file is not None:
        return read_config(config_file)
    with _open(weights) as f:
        return _guess_config(f, {_canonical(k): k for k in f.keys()}, weights)


def _open(weights):
    """safe_open, with a one-line error for a file that is not whole safetensors."""
    if weights.is_dir():
        raise UserError(f"{weights} is a folder, not a safetensors file; {_fix(weights)}")
    try:
        return safe_open(weights, framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e}); {_fix(weights)}") from None


def _fix(path, metadata=None):
    """What to do about a damaged model file (its safetensors metadata, if it could be read: what wrote it)."""
    if (metadata or {}).get("method") == "finetune":
        return "the fine-tuning that wrote it went wrong: train again (with a lower --lr), or use another model"
    if in_cache(path):
        return f"delete {path} and run again to download it anew"
    return "replace it with the file as released on the Hugging Face hub (openai-community/<size>)"


def from_pretrained(name_or_path, device=None, dtype=None):
    """
    Build a GPT from released weights: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (downloaded
    from the hub and cached), a folder with model.safetensors and config.json, or a .safetensors
    file. Default: bfloat16 on CUDA, float32 on CPU.
    """
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    weights, config_file = resolve(name_or_path)
    with _open(weights) as f:
        names = {_canonical(k): k for k in f.keys() if not k.endswith(NOT_WEIGHTS)}
        if config_file is not None:
            config = read_config(config_file)
        else:
            config = _guess_config(f, names, weights)

        # Build on the meta device: shapes only, no memory, no random init thrown away.
        with torch.device("meta"):
            model = GPT(config)
        expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
        names.pop("lm_head.weight", None)  # tied to wte: nothing to load
        missing, unexpected = sorted(expected.keys() - names.keys()), sorted(names.keys() - expected.keys())
        if missing or unexpected:
            raise UserError(f"{weights}: missing tensors {_few(missing)}, unexpected tensors {_few(unexpected)}; "
                            f"{_fix(weights)}")

        # One tensor at a time: read, transpose if Conv1D, move to the target dtype and device.
        # get_tensor maps the file rather than reading it, and .t() is a view (nn.Linear's matmul
        # reads a transposed weight just as fast), so in float32 on the CPU nothing is copied.
        state = {}
        for name, key in names.items():
            try:
                t = f.get_tensor(key)
            except SafetensorError as e:
                raise UserError(f"{weights}: tensor {key} cannot be read ({e}); {_fix(weights)}") from None
            if name.endswith(CONV1D):
                t = t.t()
            if t.shape != expected[name]:
                raise UserError(f"{weights}: {key} has shape {tuple(t.shape)}, expected {tuple(expected[name])}")
            state[name] = t.to(device=device, dtype=dtype)
        # as every file of numbers this project reads is checked; one flag a tensor, read once (on a GPU: one wait)
        finite = torch.stack([torch.isfinite(t).all() for t in state.values()]).tolist()
        if not all(finite):
            key = names[list(state)[finite.index(False)]]
            raise UserError(f"{weights} holds NaN or inf values (in {key}); {_fix(weights, f.metadata())}")
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.wte.weight  # assign=True replaced wte.weight: tie again
    return model.eval()


def save_pretrained(folder, state, config, metadata=None):
    """
    Write weights (our names, as GPT.named_parameters gives them) as a model folder in the hub's
    layout, as transformers' save_pretrained would: model.safetensors (the `transformer.` names,
    Conv1D weights [in, out], lm_head left to the tie) and config.json. Each file is written whole
    or not at all; `metadata` goes in the safetensors header. Returns the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(os_problem(e, folder, "creating")) from None
    tensors = {"transformer." + name: (t.t() if name.endswith(CONV1D) else t).detach().cpu().contiguous()
               for name, t in state.items() if name != "lm_head.weight"}
    meta = {"format": "pt"} | {k: str(v) for k, v in (metadata or {}).items()}
    write_bytes(folder / "model.safetensors", save(tensors, metadata=meta))
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
          "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1, "n_ctx": config.n_positions}
    hf |= {f.name: getattr(config, f.name) for f in fields(GPTConfig)}
    write_bytes(folder / "config.json", json.dumps(hf, indent=2).encode())
    return folder


def _canonical(key):
    return key.removeprefix("transformer.")


def _few(names):
    return "none" if not names else ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _guess_config(f, names, weights):
    """No config.json: read the sizes off the tensors and recognise one of the released models."""
    if "wte.weight" not in names:
        raise UserError(f"{weights} holds no GPT-2 weights (no wte.weight)")
    vocab, n_embd = f.get_slice(names["wte.weight"]).get_shape()
    n_layer = len({n.split(".")[1] for n in names if n.startswith("h.")})
    for config in CONFIGS.values():
        if (config.n_layer, config.n_embd, config.vocab_size) == (n_layer, n_embd, vocab):
            return config
    raise UserError(f"{weights}: not a released GPT-2 size; put its config.json beside it")

