"""
The data: English-French sentence pairs from the Kaggle "en-fr-translation-dataset" (22.5M pairs
from Canadian government sites; one CSV, header `en,fr`), read as a stream so that only the first
rows are ever touched.

With no file at hand, `fetch_kaggle` downloads the dataset's zip from Kaggle's public API and
decompresses it as it arrives, stopping after the rows it needs: a run reads megabytes of the
multi-gigabyte archive, not all of it. Set KAGGLE_API_ENDPOINT to use another server (the tests
serve a zip from 127.0.0.1 this way).

The split is fixed by a seed (see `split`): held-out pairs for the final comparison, a validation
slice to watch training with, the rest to train on; no held-out or validation sentence, nor one
that differs from it only in case, punctuation or spacing, is ever trained on. `load` does it all
and says, by CSV line, what each pair is for. Turning pairs into token ids is train.py's.
"""

import base64
import codecs
import csv
import hashlib
import itertools
import json
import os
import random
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import requests
from tqdm import tqdm

from mini_gpt2.download import TIMEOUT, DownloadError, cache_dir, cached, make_cache_folder, publish
from mini_gpt2.files import UserError, os_problem

KAGGLE_DATASET = "dhruvildave/en-fr-translation-dataset"
KAGGLE_ENDPOINT = "https://www.kaggle.com"
DEFAULT_ROWS = 200_000  # the reference experiment used the first 200,000 pairs


def read_pairs(path, limit=DEFAULT_ROWS):
    """
    The first `limit` good (en, fr) pairs of a CSV with columns en and fr, streamed.
    Returns (pairs, lines, skipped): the CSV line each pair starts on (the header is line 1), and
    how many rows were skipped (a missing or empty side, or a row the CSV reader could not parse).
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a BOM, if any, is dropped
            return parse_pairs(f, limit, str(path))
    except UnicodeDecodeError as e:
        if e.object[:4] == b"PK\x03\x04":
            raise UserError(f"{path} is a zip archive: unzip it and pass the CSV inside with --data") from None
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8) and pass that file") from None
    except OSError as e:
        raise UserError(f"{os_problem(e, path, 'reading')}; --data takes a CSV file with columns en,fr") from None


def parse_pairs(lines, limit, source="the data", bar=None):
    rows = csv.reader(lines)
    try:
        header = [h.strip().lower() for h in next(rows)]
        en, fr = header.index("en"), header.index("fr")
    except UnicodeDecodeError:
        raise
    except (StopIteration, ValueError, csv.Error):
        raise UserError(f"{source}: the first line must be a header naming the columns en and fr") from None
    pairs, starts, skipped = [], [], 0
    while len(pairs) < limit:
        start = rows.line_num + 1
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error:
            skipped += 1
            continue
        if not row:  # a blank line
            continue
        if len(row) <= max(en, fr) or not row[en].strip() or not row[fr].strip():
            skipped += 1
            continue
        pairs.append((row[en].strip(), row[fr].strip()))
        starts.append(start)
        if bar is not None:
            bar.update(1)
    return pairs, starts, skipped


def fingerprint(pairs):
    """The sha256 of the pairs read: what identifies the data of a run, however the file is named."""
    h = hashlib.sha256()
    for en, fr in pairs:
        h.update(f"{en}\t{fr}\n".encode())
    return h.hexdigest()


def normalise(text):
    """Case folded, accents kept, punctuation and spacing collapsed: "L'été,  déjà !" -> "l été déjà"."""
    return " ".join(re.findall(r"\w+", text.casefold()))


@dataclass
class Split:
    """What each pair is for, as indices into the pairs read."""
    held: list = field(default_factory=list)     # held out for the final comparison
    val: list = field(default_factory=list)      # the validation slice: watched during training, never trained on
    train: list = field(default_factory=list)
    dropped: list = field(default_factory=list)  # (near-)duplicates of a held-out or validation pair: unused


def split(pairs, heldout=1000, val_size=200, seed=0):
    """
    A seeded shuffle of the pairs: the first `heldout` (at most a tenth of the data) are held out,
    the next `val_size` (at most a tenth too) are the validation slice, the rest train. A pair
    whose English or French is the same as a held-out pair's, once normalised (see `normalise`), is
    neither validated nor trained on; one that matches a validation pair is not trained on. Corpora
    crawled from the web hold many such near-copies, which would otherwise leak the test into training.
    """
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    en, fr = [normalise(e) for e, _ in pairs], [normalise(f) for _, f in pairs]

    def not_like(indices, candidates):
        seen_en, seen_fr = {en[i] for i in indices}, {fr[i] for i in indices}
        return [i for i in candidates if en[i] not in seen_en and fr[i] not in seen_fr]

    n_held, n_val = min(heldout, len(pairs) // 10), min(val_size, len(pairs) // 10)
    held, rest = order[:n_held], order[n_held:]
    candidates = not_like(held, rest)
    val = candidates[:n_val]
    train = not_like(val, candidates[n_val:])
    dropped = sorted(set(rest) - set(val) - set(train))
    return Split(held, val, train, dropped)


# What fixes the split; train.py --eval-only takes them from the prefix file unless given.
SPLIT_DEFAULTS = {"rows": DEFAULT_ROWS, "heldout": 1000, "val_size": 200, "seed": 0}


def split_settings(given, meta):
    """
    The split settings {rows, heldout, val_size, seed, data}: those `given` (None: not given), else
    a learned file's metadata `meta` if it has them, else the defaults.
    """
    settings = {name: given[name] if given[name] is not None else int(meta[name]) if name in meta else default
                for name, default in SPLIT_DEFAULTS.items()}
    settings["data"] = given["data"]
    if given["data"] is None and meta.get("data", "kaggle") != "kaggle":
        settings["data"] = meta["data"]
        if not Path(meta["data"]).exists():
            raise UserError(f"{meta['data']}, the data the learned file was trained on, is not there: give it with --data")
    return settings


def few_shot_indices(pairs, candidates, shots, seed):
    """
    `shots` real, aligned pairs for the few-shot prompt, as indices among `candidates` (the
    training side of the split), the same for a given seed; no two alike (see `normalise`), and
    short one-line ones if there are any.
    """
    seen, distinct = set(), []
    for i in candidates:
        key = (normalise(pairs[i][0]), normalise(pairs[i][1]))
        if key not in seen:
            seen.add(key)
            distinct.append(i)
    short = [i for i in distinct if len(pairs[i][0]) <= 200 and len(pairs[i][1]) <= 200
             and "\n" not in pairs[i][0] + pairs[i][1]]
    pool = short or distinct
    return random.Random(f"shots-{seed}").sample(pool, min(shots, len(pool)))


def load(path, rows, heldout, val_size, seed, shots):
    """
    Read the pairs (the Kaggle data if `path` is None) and split them. -> (pairs, split, shot
    indices, record): `record` says, by CSV line, what each pair is for (train.py writes it to
    split.json, the comparison to results.json), and identifies the data read.
    """
    path = path or fetch_kaggle(rows)
    pairs, lines, skipped = read_pairs(path, rows)
    if len(pairs) < 2:
        raise UserError(f"{path}: found {len(pairs)} usable pairs; training needs more")
    s = split(pairs, heldout, val_size, seed)
    for flag, asked, got in (("--heldout", heldout, s.held), ("--val-size", val_size, s.val)):
        if len(got) < asked:
            print(f"note: {flag} {asked} is more than a tenth of the {len(pairs)} pairs: {len(got)} are used")
    few = few_shot_indices(pairs, s.train, shots, seed)
    record = {"data": str(path), "rows_read": len(pairs), "data_sha256": fingerprint(pairs), "seed": seed,
              "lines": "the CSV line each pair starts on (the header is line 1)",
              "heldout": [lines[i] for i in s.held], "validation": [lines[i] for i in s.val],
              "few_shot": [lines[i] for i in few], "dropped_near_duplicates": [lines[i] for i in s.dropped],
              "train_pairs": len(s.train)}
    print(f"data: {len(pairs)} pairs from {path} ({skipped} empty or broken rows skipped): {len(s.held)} held out, "
          f"{len(s.val)} for validation, {len(s.train)} to train, {len(s.dropped)} dropped as "
          f"(near-)duplicates of held-out or validation pairs")
    return pairs, s, few, record


# ----------------------------------------------------------------------------- Kaggle download

def kaggle_url():
    endpoint = os.environ.get("KAGGLE_API_ENDPOINT") or KAGGLE_ENDPOINT
    return f"{endpoint.rstrip('/')}/api/v1/datasets/download/{KAGGLE_DATASET}"


def kaggle_auth():
    """(user, key) from KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json; None if there are none."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return os.environ["KAGGLE_USERNAME"], os.environ["KAGGLE_KEY"]
    path = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle") / "kaggle.json"
    try:
        creds = json.loads(path.read_text())
        return creds["username"], creds["key"]
    except (OSError, ValueError, KeyError):
        return None


def fetch_kaggle(rows=DEFAULT_ROWS):
    """The first `rows` pairs of the Kaggle dataset as a small local CSV (cached). Returns its path."""
    dest = cache_dir() / "en-fr" / f"en-fr-first-{rows}.csv"
    if cached(dest):
        return dest
    url = kaggle_url()
    headers = {}
    if auth := kaggle_auth():
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    manual = (f"download it by hand from {KAGGLE_ENDPOINT}/datasets/{KAGGLE_DATASET}, unzip it, "
              f"and pass the CSV with --data en-fr.csv")
    make_cache_folder(dest.parent)
    part = dest.with_name(dest.name + ".incomplete")
    try:
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
            if r.status_code != 200:
                raise DownloadError(f"could not download {url} (HTTP {r.status_code}); {manual}")
            text = codecs.iterdecode(unzip_first_file(r.iter_content(1 << 16)), "utf-8-sig")
            with open(part, "w", encoding="utf-8", newline="") as f, tqdm(total=rows, unit=" rows", desc="en-fr") as bar:
                out = csv.writer(f)
                out.writerow(["en", "fr"])
                pairs, _, _ = parse_pairs(_lines(text), rows, url, bar)
                out.writerows(pairs)
    except requests.RequestException as e:
        raise DownloadError(f"could not download {url} ({type(e).__name__}); {manual}") from None
    except (zlib.error, ValueError, UserError) as e:  # UnicodeDecodeError is a ValueError
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url} did not give a readable zip of the dataset ({e}); {manual}") from None
    except OSError as e:
        part.unlink(missing_ok=True)
        raise UserError(os_problem(e, part, "writing")) from None
    return publish(part, dest)


def _lines(text_chunks):
    """Text chunks -> lines, each with its newline (as the csv module wants)."""
    rest = ""
    for chunk in text_chunks:
        *lines, rest = (rest + chunk).split("\n")
        for line in lines:
            yield line + "\n"
    if rest:
        yield rest


def unzip_first_file(chunks):
    """
    Decompress the first file of a zip archive from a stream of bytes, as they arrive.

    A zip normally is read from its end (the directory), which a stream does not have yet. But
    each file is also preceded by a "local header" (signature PK\\x03\\x04, then fixed fields,
    the name and an extra field) and a deflate stream knows where it ends, so the first file can
    be read front to back.
    """
    chunks = iter(chunks)
    buf = _at_least(b"", chunks, 30)
    sig, _, flags, method, _, _, _, csize, _, name_len, extra_len = struct.unpack("<IHHHHHIIIHH", buf[:30])
    if sig != 0x04034B50:
        raise ValueError("not a zip file")
    buf = _at_least(buf, chunks, 30 + name_len + extra_len)[30 + name_len + extra_len:]
    pieces = itertools.chain([buf], chunks)  # the file's data, from its first byte on
    if method == 0 and not flags & 8:  # stored, size known
        remaining = csize
        for piece in pieces:
            piece = piece[:remaining]
            yield piece
            remaining -= len(piece)
            if not remaining:
                return
    elif method == 8:  # deflate
        d = zlib.decompressobj(-15)
        for piece in pieces:
            yield d.decompress(piece)
            if d.eof:
                return
    else:
        raise ValueError(f"zip compression method {method} is not supported")


def _at_least(buf, chunks, n):
    """`buf` extended from the stream until it holds n bytes."""
    while len(buf) < n:
        chunk = next(chunks, None)
        if chunk is None:
            raise ValueError("the archive ended early")
        buf += chunk
    return buf
