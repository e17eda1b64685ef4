"""
GPT-2's byte-level BPE tokenizer, through tiktoken (the same merges OpenAI released).

Any text, in any script, round-trips exactly: BPE runs over UTF-8 bytes, so "é" or "’" become one
or two tokens but never an unknown token.
"""

from functools import cache

import tiktoken

EOT = 50256  # <|endoftext|>: GPT-2 saw it between documents; we use it to end a translation


@cache
def _enc():
    # tiktoken downloads its two files on first use and caches them ($TIKTOKEN_CACHE_DIR).
    return tiktoken.get_encoding("gpt2")


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
