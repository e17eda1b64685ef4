"""
GPT-2's byte-level BPE tokenizer, through tiktoken (the same merges OpenAI released).

Any text, in any script, round-trips exactly: BPE runs over UTF-8 bytes, so "é" or "’" become one
or two tokens but never an unknown token.
"""

from functools import cache

import requests
import tiktoken

from .download import DownloadError

EOT = 50256  # <|endoftext|>: GPT-2 saw it between documents; we use it to end a translation


@cache
def _enc():
    # tiktoken downloads its two files on first use and caches them ($TIKTOKEN_CACHE_DIR).
    try:
        return tiktoken.get_encoding("gpt2")
    except requests.RequestException as e:
        raise DownloadError(f"could not fetch GPT-2's tokenizer files ({type(e).__name__}); on a machine without "
                            "internet, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files") from None


def encode(text):
    """Text -> list of token ids. "<|endoftext|>" written in the text stays plain text."""
    return _enc().encode_ordinary(text)


def decode(ids):
    """List of token ids -> text."""
    return _enc().decode(list(ids))


def ids_containing(substring):
    """Every token id whose text contains `substring` (e.g. all the tokens that hold a newline)."""
    enc = _enc()
    return [i for i in range(enc.n_vocab) if substring in enc.decode_single_token_bytes(i).decode("utf-8", "replace")]
