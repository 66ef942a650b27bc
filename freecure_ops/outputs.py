"""Output folders and files for the command-line tools: check a folder before any work, write files atomically.

Standard library only (imported before anything heavy)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["output_dir_problem", "atomic_write", "atomic_write_text"]


def output_dir_problem(path) -> str | None:
    """Why files cannot be written into the folder ``path`` (created on demand), or None when they can.

    Checks what writing will need, without creating anything: ``path`` is a folder or can be created (no
    file on the way), and the folder (or its nearest existing ancestor) accepts a new file (a real probe:
    a temporary file is created and removed, so read-only file systems and permissions are caught, also for
    root)."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.exists():
        if not p.is_dir():
            return "it exists and is not a folder"
        probe_dir = p
    else:
        anc = p.parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            return f"{anc} is a file, so no folder can be created under it"
        probe_dir = anc
    try:
        fd, name = tempfile.mkstemp(dir=probe_dir, prefix=".freecure-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        where = "" if probe_dir == p else f" ({probe_dir}, where it would be created)"
        return f"not writable{where}: {e.strerror or e}"
    return None


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path`` (readers never see
    a half-written file; a failed write leaves the old file, or none). Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
