"""
The methods prefix-tuning (prefix.py) is compared with, each a module that defines prefix.py's
names (WHAT, FILES, LR, ..., start, example, hidden, translator, save, load), and prompting the
frozen model, the baseline they all face (prompting.py):

- prompt (prompt.py, the reference experiment): learned vectors in place of input embeddings;
- lora (lora.py, Hu et al.): a low-rank change of the attention's query and value weights;
- finetune (finetune.py): every weight.

METHODS is the table of all four; everything else (data, batches, the loss, the training loop,
checkpoints, the comparison) is one path for all of them. A fifth method is a file here and a
line in METHODS.
"""

from pathlib import Path

import prefix
from machinery import learned_file
from methods import finetune, lora, prompt

METHODS = {"prefix": prefix, "prompt": prompt, "lora": lora, "finetune": finetune}


def load(path):
    """A file (or fine-tuned model folder) of what train.py learned, of any method, checked -> (learned, metadata)."""
    meta = learned_file.metadata(path, prefix.NAMES, METHODS)
    return METHODS[meta["method"]].load(path, meta), meta


def best_file_in(path):
    """`path`, or if it is a training run's --out, the best file of what was learned there."""
    path = Path(path)
    if path.is_dir() and not (path / "model.safetensors").exists():
        found = [path / m.FILES[0] for m in METHODS.values() if (path / m.FILES[0]).exists()]
        if found:
            return found[0]
    return path
