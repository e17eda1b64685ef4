"""
Fetch files over HTTP into a local cache: streamed, resumable, verified.

The Hugging Face hub answers `/<repo>/resolve/main/<file>` for a large file with a redirect to
its CDN, and tells the file's size and sha256 in the `X-Linked-Size` and `X-Linked-Etag` headers.
We read those first, download to `<name>.incomplete` (continuing it with an HTTP Range request
if an earlier try was cut off), check size and sha256, and only then rename to the final name:
the cache never holds a broken file under a name that looks finished. Beside it, `<name>.verified`
records the size and sha256 that were checked, and every later use checks the size again, so a
file damaged in the cache is named instead of trusted.
"""

import hashlib
import json
import os
import time
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests
from tqdm import tqdm

from .files import UserError, os_problem, write_bytes

HF_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 16
TIMEOUT = 30  # seconds without a byte before we give up on a connection
RETRIES = 5  # how many times a dropped download is resumed before failing


class DownloadError(UserError):
    """A download failed; the message is one line, fit to show the user as it is."""


def cache_dir():
    """Where downloads go: $MINI_GPT2_CACHE, else ~/.cache/mini_gpt2."""
    return Path(os.environ.get("MINI_GPT2_CACHE") or Path.home() / ".cache" / "mini_gpt2")


def in_cache(path):
    """True if `path` lies in the download cache (so deleting it means downloading it again)."""
    return Path(path).resolve().is_relative_to(cache_dir().resolve())


def make_cache_folder(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{os_problem(e, folder, 'creating the download folder')}; "
                        "set MINI_GPT2_CACHE to a folder you can write") from None


def cached(dest):
    """
    `dest` if it is in the cache and still what was verified when it was published, None if it is
    not there yet. A file whose size changed since is an error that names it.
    """
    dest = Path(dest)
    if not dest.exists():
        return None
    record = dest.with_name(dest.name + ".verified")
    damaged = f"{record} is damaged: delete it and {dest}, and run again to download the file anew"
    try:
        want = json.loads(record.read_text())["size"]
    except FileNotFoundError:
        return dest  # placed there by hand: nothing to check against
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(damaged) from None
    if type(want) is not int:  # a size written as "123" or 1.5 was not written by publish()
        raise UserError(damaged)
    have = dest.stat().st_size
    if have != want:
        raise UserError(f"{dest} is {have} bytes, but {want} were downloaded and verified: it was damaged since; "
                        f"delete it and run again to download it anew")
    return dest


def publish(part, dest, sha256=None):
    """Record `part`'s size and sha256 beside `dest`, then rename `part` to `dest`."""
    record = {"size": part.stat().st_size, "sha256": sha256 or sha256_of(part, dest.name)}
    write_bytes(dest.with_name(dest.name + ".verified"), json.dumps(record).encode())
    os.replace(part, dest)
    return dest


def hub_url(repo, filename):
    """The URL of a file in a hub repository ($HF_ENDPOINT replaces the hub, as in Hugging Face's tools)."""
    endpoint = os.environ.get("HF_ENDPOINT") or HF_ENDPOINT
    return f"{endpoint.rstrip('/')}/{repo}/resolve/main/{filename}"


def hub_download(repo, filename):
    """Download one file of a hub repository into the cache (if not there yet) and return its path."""
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return download(hub_url(repo, filename), cache_dir() / repo.replace("/", "--") / filename, headers)


def download(url, dest, headers=None, what=None):
    """Download `url` to `dest` unless it is already there. Returns `dest` (a Path)."""
    dest = Path(dest)
    if cached(dest):
        return dest
    make_cache_folder(dest.parent)
    headers = dict(headers or {})
    hint = f"download {url} by hand (e.g. in a browser) and save it as {dest}"
    try:
        return _download(url, dest, headers, what or dest.name)
    except DownloadError as e:
        raise DownloadError(f"{e}; {hint}") from None
    except requests.RequestException as e:
        reason = type(e).__name__ if isinstance(e, requests.ConnectionError) else str(e).splitlines()[0]
        raise DownloadError(f"could not download {url} ({reason}); {hint}") from None


def _download(url, dest, headers, what):
    # 1. Ask where the file lives and what it should be, without fetching it yet.
    r = requests.head(url, headers=headers, allow_redirects=False, timeout=TIMEOUT)
    if r.is_redirect:
        location = urljoin(url, r.headers["Location"])
        if urlparse(location).netloc != urlparse(url).netloc:
            headers.pop("Authorization", None)  # the token is for the hub, not for its CDN
    elif r.ok:
        location = url
    else:
        raise DownloadError(f"could not download {url} (HTTP {r.status_code})")
    header = "X-Linked-Size" if r.headers.get("X-Linked-Size") or r.is_redirect else "Content-Length"
    size = r.headers.get(header)
    if size is not None:
        if not size.strip().isdigit():  # what a server sends is input like any other
            raise DownloadError(f"{url}: the server's {header} header ({size!r}) is not a number of bytes")
        size = int(size)
        if size == 0:
            raise DownloadError(f"{url}: the server answered with an empty file")
    sha256 = (r.headers.get("X-Linked-Etag") or "").removeprefix("W/").strip('"') or None
    if sha256 and len(sha256) != 64:  # a small file's ETag is a git hash, not a sha256
        sha256 = None

    # 2. Fetch into dest.incomplete, resuming whatever an earlier try left there.
    part = dest.with_name(dest.name + ".incomplete")
    for attempt in range(RETRIES + 1):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have == size:
            break
        try:
            _fetch(location, part, have, size, headers, what)
            break
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout):
            if attempt == RETRIES:
                raise
            time.sleep(min(2**attempt, 10) * 0.1)

    # 3. Verify, then publish under the final name.
    have = part.stat().st_size
    if size is not None and have != size:
        part.unlink()
        raise DownloadError(f"{url}: got {have} bytes, expected {size}")
    if sha256:
        got = sha256_of(part, what)
        if got != sha256:
            part.unlink()
            raise DownloadError(f"{url}: sha256 {got} does not match the published {sha256}")
    return publish(part, dest, sha256)


def _fetch(url, part, have, size, headers, what):
    """One GET, appending to `part` from byte `have` on."""
    h = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
    with requests.get(url, headers=h, stream=True, timeout=TIMEOUT) as r:
        if r.status_code == 416 and size is None:  # we already have everything
            return
        if r.status_code not in (200, 206):
            raise DownloadError(f"could not download {url} (HTTP {r.status_code})")
        if r.status_code == 200:
            have = 0  # the server ignored our Range: start again
        length = r.headers.get("Content-Length", "")
        total = size or (have + int(length) if length.isdigit() else None)  # for the progress bar only
        try:
            with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=what
            ) as bar:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except requests.RequestException:  # an OSError too, but the network's: retried by the caller
            raise
        except OSError as e:  # what was written stays in `part`: the next run resumes from there
            raise UserError(f"{os_problem(e, part, 'downloading to')} (the download resumes there when run again; "
                            "MINI_GPT2_CACHE moves the cache to another disk)") from None


def sha256_of(path, what="file"):
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1024, desc=f"checking {what}", leave=False
    ) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()
