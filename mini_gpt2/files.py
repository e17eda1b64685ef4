"""
Files that are never left half-written, and failures told in one line.

A failure the user can fix (a missing or damaged file, a full disk, a folder they cannot write, a
dropped connection) is raised as a `UserError`: its message is one line that names the file, says
what is wrong and what to do. The scripts print it and exit (cli.run). Anything else is a bug and
keeps its traceback.
"""

import errno
import os
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A failure the user can fix; the message is one line, fit to print as it is."""


def os_problem(e, path, doing):
    """One line for an OSError met while `doing` ("writing", "reading", ...) `path`."""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while {doing} {path}: free some space there and run again"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded while {doing} {path}: free some space there and run again"
    if isinstance(e, PermissionError):
        return f"permission denied while {doing} {path}"
    if isinstance(e, IsADirectoryError):
        return f"{path} is a folder, not a file"
    if isinstance(e, NotADirectoryError):
        return f"{path}: a folder on its path is a file"
    if isinstance(e, FileNotFoundError):
        return f"{path} does not exist"
    return f"{doing} {path} failed: {e.strerror or e}"


@contextmanager
def atomic_write(path, mode="wb"):
    """
    Open `path` for writing through a temporary file that replaces it only once everything is
    written: a crash, Ctrl-C or a full disk leaves the previous file as it was, never a half-written
    one. The data is on the disk (fsync) before the rename, so a power cut cannot leave it empty.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(os_problem(e, path, "writing")) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path, data):
    """Write `data` to `path` atomically (see atomic_write)."""
    with atomic_write(path) as f:
        f.write(data)
