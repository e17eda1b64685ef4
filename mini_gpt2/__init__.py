"""mini_gpt2: a small, readable GPT-2 that loads OpenAI's weights. Read model.py first."""

from .download import DownloadError
from .files import UserError
from .generate import generate
from .load import default_device, default_dtype, from_pretrained, save_pretrained
from .model import CONFIGS, GPT, GPTConfig
from .tokenizer import EOT, decode, encode

__all__ = ["CONFIGS", "GPT", "GPTConfig", "from_pretrained", "save_pretrained", "generate", "encode", "decode", "EOT",
           "DownloadError", "UserError", "default_device", "default_dtype"]
