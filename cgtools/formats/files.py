"""Opening inputs and writing outputs safely.

Inputs: a path, or "-" for stdin (read fully first: Parquet needs to seek to its footer).
Outputs: written to a temporary name beside the target and renamed into place on success, so a
killed command never leaves a half-written file; an existing file is kept unless `force`.
"-" writes to stdout, refused when stdout is a terminal (binary data).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from cgtools.errors import InputError, OutputError

STDIO = "-"
PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class InputFile:
    """An input, either on disk or held in memory (stdin)."""

    name: str  # path as given, or "-"
    data: bytes | None  # the bytes of stdin; None for files on disk

    @property
    def path(self) -> Path | None:
        return None if self.data is not None else Path(self.name)

    def head(self, n: int) -> bytes:
        if self.data is not None:
            return self.data[:n]
        with open(self.name, "rb") as f:
            return f.read(n)

    def sha256(self) -> str:
        h = hashlib.sha256()
        if self.data is not None:
            h.update(self.data)
        else:
            with open(self.name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()

    def display(self) -> str:
        return "<stdin>" if self.data is not None else self.name


def open_input(name: str | os.PathLike) -> InputFile:
    """Resolve an input argument; reads all of stdin for "-". Raises InputError if unusable."""
    name = os.fspath(name)
    if name == STDIO:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("no input: stdin is a terminal (pipe data in or give a file)")
        data = sys.stdin.buffer.read()
        if not data:
            raise InputError("no input: stdin is empty")
        return InputFile(STDIO, data)
    p = Path(name)
    if not p.exists():
        raise InputError(f"{name}: no such file")
    if p.is_dir():
        raise InputError(f"{name}: is a directory, expected a file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{name}: permission denied")
    return InputFile(name, None)


def check_output(name: str | os.PathLike, force: bool) -> None:
    """Fail early (before any work) if `name` cannot be written."""
    name = os.fspath(name)
    if name == STDIO:
        if sys.stdout.isatty():
            raise OutputError("refusing to write binary data to a terminal; use -o FILE or a pipe")
        return
    p = Path(name)
    if p.exists() and not force:
        raise OutputError(f"{name} exists; use --force to overwrite it")
    if p.is_dir():
        raise OutputError(f"{name} is a directory")
    if not p.parent.exists():
        raise OutputError(f"{p.parent}: no such directory")


@contextmanager
def atomic_output(name: str | os.PathLike, force: bool) -> Iterator[BinaryIO]:
    """Yield a binary stream; on success it becomes `name` (or went to stdout for "-").

    On an exception the temporary file is removed and `name` is untouched.
    """
    name = os.fspath(name)
    check_output(name, force)
    if name == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(name)
    sweep_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                if exc.filename is None:  # ENOSPC, EFBIG, EIO while writing: name the target
                    raise OutputError(f"{name}: {exc.strerror or exc}; nothing was written") from None
                raise
        publish(Path(tmp), target, force)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(name: str | os.PathLike, text: str, force: bool = True) -> None:
    """Write `text` (UTF-8) to `name` atomically, as :func:`atomic_output` does ("-" = stdout)."""
    with atomic_output(name, force) as f:
        f.write(text.encode())


def _temp_prefix(target: Path) -> str:
    """Hidden temporary name beside the target that says which process writes it."""
    return f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporaries of `target` left by writers that were killed (SIGKILL, power loss).

    Only files named by :func:`_temp_prefix` on this host whose process no longer exists are
    removed: a live writer's file (this process's, or another's) is never touched. Returns the
    removed paths.
    """
    prefix = f".{target.name}.tmp-{socket.gethostname()}-"
    removed = []
    try:
        candidates = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for path in candidates:
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def publish(tmp: Path, target: Path, force: bool) -> None:
    """Move a finished temporary file into place; without force never replaces an existing file."""
    os.chmod(tmp, 0o666 & ~_umask())
    if force:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # atomic, fails if target appeared meanwhile
    except FileExistsError:
        raise OutputError(f"{target} exists; use --force to overwrite it") from None
    except OSError:
        if target.exists():
            raise OutputError(f"{target} exists; use --force to overwrite it") from None
        os.replace(tmp, target)  # file systems without hard links
        return
    tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_kind(source: InputFile) -> str:
    """'parquet', 'safetensors' or 'unknown', from the magic bytes."""
    head = source.head(16)
    if head[:4] == PARQUET_MAGIC:
        return "parquet"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 1 << 30 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def read_safetensors_metadata(source: InputFile) -> dict[str, str]:
    """The string metadata of a safetensors file (without loading its tensors)."""
    try:
        raw = source.data if source.data is not None else None
        if raw is None:
            with open(source.name, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = f.read(n)
        else:
            (n,) = struct.unpack("<Q", raw[:8])
            header = raw[8:8 + n]
        return json.loads(header).get("__metadata__", {}) or {}
    except (struct.error, ValueError, OSError) as exc:
        raise InputError(f"{source.display()}: not a readable safetensors file ({exc})") from None
