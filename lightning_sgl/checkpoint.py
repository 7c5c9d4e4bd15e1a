"""Checkpoint directories that are whole or absent: staged writes, an integrity manifest, an
atomic publish, and verification before anything is loaded.

A checkpoint directory is written into a *staging* directory beside it
(``<parent>/.<name>.partial``), completed with a ``manifest.json`` listing every file with its
size and SHA-256, and only then published under its name:

- on Linux by ``renameat2(RENAME_EXCHANGE)``, which swaps the staged and the previous directory
  in one step: at every instant ``<name>`` is either the previous complete checkpoint or the
  new complete one;
- elsewhere (or on a file system without the exchange) by two renames, previous -> ``.<name>.old``
  and staged -> ``<name>``; a crash between them leaves the previous one at ``.<name>.old``, which
  :func:`resolve` finds.

:func:`verify` re-reads every listed file and raises :class:`CheckpointCorruptError` naming the
first file that is missing, truncated or altered, before a byte of it is used.

Cost: writing adds one read of every file (the checksums; each rank hashes its own shards);
loading reads every file once more for the verification.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import tempfile

__all__ = ["MANIFEST", "CheckpointCorruptError", "atomic_write", "staging_dir", "file_digest",
           "write_manifest",
           "verify", "publish", "resolve"]

MANIFEST = "manifest.json"
FORMAT = "lightning_sgl.checkpoint/1"
_CHUNK = 1 << 22


class CheckpointCorruptError(ValueError):
    """A checkpoint file is missing, truncated or altered (its checksum does not match)."""


def staging_dir(path: str) -> str:
    """Where the checkpoint ``path`` is written before it is published."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.partial")


def _old_dir(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.old")


def file_digest(path: str) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """``with atomic_write(path) as f: ...`` writes ``path`` whole or not at all: into a
    temporary file in the same folder, flushed and fsync'ed, then renamed over ``path`` (a crash
    or an exception leaves the previous file, and no temporary one)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def write_manifest(folder: str, files: dict[str, dict], info: dict | None = None) -> None:
    """Write ``folder/manifest.json`` (temp file, fsync, rename): the last file of a checkpoint.

    ``files`` maps each file name (relative to ``folder``) to its :func:`file_digest`."""
    payload = {"format": FORMAT, "files": dict(sorted(files.items())), "info": info or {}}
    with atomic_write(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(payload, f, indent=1)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointCorruptError(
            f"Invalid checkpoint {folder!r}: no {MANIFEST} (the save did not complete, or the "
            "directory is not a lightning-sgl checkpoint)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointCorruptError(f"Invalid checkpoint: {path} is not readable ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorruptError(
            f"Invalid checkpoint: {path} has format {manifest.get('format')!r} "
            f"(expected {FORMAT!r})" if isinstance(manifest, dict) else
            f"Invalid checkpoint: {path} is not a manifest")
    return manifest


def verify(folder: str, names: list[str] | None = None) -> dict:
    """Check the files of checkpoint ``folder`` against its manifest (all, or only ``names``);
    returns the manifest. Raises :class:`CheckpointCorruptError` naming the first bad file."""
    manifest = read_manifest(folder)
    files = manifest["files"]
    for name in (sorted(files) if names is None else names):
        expected = files.get(name)
        path = os.path.join(folder, name)
        if expected is None:
            raise CheckpointCorruptError(f"Invalid checkpoint: {path} is not in {MANIFEST}")
        if not os.path.isfile(path):
            raise CheckpointCorruptError(f"Invalid checkpoint: {path} is missing")
        size = os.path.getsize(path)
        if size != expected["size"]:
            raise CheckpointCorruptError(
                f"Invalid checkpoint: {path} has {size} bytes, {MANIFEST} says "
                f"{expected['size']} (truncated or replaced)")
        got = file_digest(path)["sha256"]
        if got != expected["sha256"]:
            raise CheckpointCorruptError(
                f"Invalid checkpoint: {path} is corrupt (sha256 {got[:16]}..., {MANIFEST} says "
                f"{expected['sha256'][:16]}...)")
    return manifest


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); ``False`` where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
        return False  # the file system (or kernel) cannot exchange: fall back
    raise OSError(err, os.strerror(err), b)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def publish(staged: str, path: str) -> None:
    """Make the complete staged directory the checkpoint ``path`` (see module docstring); the
    previous checkpoint at ``path`` is removed once the new one is in place."""
    parent = os.path.dirname(os.path.abspath(path))
    _fsync_dir(staged)
    if os.path.lexists(path):
        if _exchange(staged, path):
            _fsync_dir(parent)
            _remove(staged)  # now the previous checkpoint
            return
        old = _old_dir(path)
        _remove(old)
        os.rename(path, old)
        os.rename(staged, path)
        _fsync_dir(parent)
        _remove(old)
        return
    os.rename(staged, path)
    _fsync_dir(parent)
    _remove(_old_dir(path))  # left by an interrupted fallback publish: superseded now


def resolve(path: str) -> str:
    """``path``, or the previous complete checkpoint left at ``.<name>.old`` by a crash between
    the two renames of the fallback publish."""
    if os.path.lexists(path):
        return path
    old = _old_dir(path)
    if os.path.isfile(os.path.join(old, MANIFEST)):
        return old
    return path


def discard_staging(path: str) -> None:
    """Remove what an interrupted save of ``path`` left behind."""
    _remove(staging_dir(path))
