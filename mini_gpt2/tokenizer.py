"""
GPT-2's byte-level BPE tokenizer, through tiktoken (the same merges OpenAI released).

Any text, in any script, round-trips exactly: BPE runs over UTF-8 bytes, so "é" or "’" become one
or two tokens but never an unknown token.
"""

import hashlib
from functools import cache

import requests
import tiktoken

from .download import DownloadError

EOT = 50256  # <|endoftext|>: GPT-2 saw it between documents; we use it to end a translation
# What tiktoken fetches on first use and caches in $TIKTOKEN_CACHE_DIR, each under the SHA-1 of its URL.
FILES = [f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}" for name in ("vocab.bpe", "encoder.json")]


@cache
def encoding():
    """GPT-2's tiktoken encoding, loaded once: nothing is read or fetched before the first text is tokenized."""
    try:
        return tiktoken.get_encoding("gpt2")
    except requests.RequestException as e:
        cached = ", ".join(f"{url.rsplit('/', 1)[1]} as {hashlib.sha1(url.encode()).hexdigest()}" for url in FILES)
        raise DownloadError(f"could not fetch GPT-2's tokenizer files ({type(e).__name__}); without internet, set "
                            f"TIKTOKEN_CACHE_DIR to a folder that holds them as tiktoken caches them: {cached}") from None


def encode(text):
    """Text -> list of token ids. "<|endoftext|>" written in the text stays plain text."""
    return encoding().encode_ordinary(text)


def decode(ids):
    """List of token ids -> text."""
    return encoding().decode(list(ids))


def ids_containing(substring):
    """Every token id whose text contains `substring` (e.g. all the tokens that hold a newline)."""
    enc = encoding()
    return [i for i in range(enc.n_vocab) if substring in enc.decode_single_token_bytes(i).decode("utf-8", "replace")]
