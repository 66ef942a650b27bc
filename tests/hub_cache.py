"""A pre-filled Hugging Face cache for offline tests of Hub references (shared by the hub, parser and CLI tests).

:class:`HubCache` writes repositories in the cache layout huggingface_hub reads::

    <root>/models--org--name/refs/<branch or tag>      (the commit hash)
    <root>/models--org--name/snapshots/<commit>/<files>

(files are copied into the snapshot; huggingface_hub's symlinks into ``blobs/`` are an optimisation it does
not need to read). :func:`offline_hub` points huggingface_hub at such a cache with ``HF_HUB_OFFLINE=1``: the
environment for subprocesses, and huggingface_hub's constants (read once at its import) for this process.
It also makes any network connection fail the test, so an accidental download cannot pass unnoticed.

Usage in a test module::

    from hub_cache import HubCache, offline_hub

    def test_x(tmp_path, monkeypatch):
        cache = HubCache(tmp_path / "hub")
        commit = cache.add("org/parser", {"79999_iter.pth": ckpt_path})
        offline_hub(monkeypatch, cache.root)
        ...
"""
from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path


class HubCache:
    """A Hugging Face hub cache folder that tests fill with tiny repositories."""

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def add(self, repo_id: str, files, *, refs=("main",), commit: str | None = None) -> str:
        """Add one commit of ``repo_id`` holding ``files`` (a folder to copy whole, or a mapping of path in the
        repo -> source file, folder or bytes) and point ``refs`` (branch/tag names) at it. Returns the commit
        hash (derived from the repo id and the file names unless given)."""
        if isinstance(files, (str, Path)):
            src = Path(files)
            files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file()}
        if commit is None:
            n_before = len(list(self.repo_dir(repo_id).glob("snapshots/*")))  # each add is a new commit
            commit = hashlib.sha1(f"{repo_id}|{'|'.join(sorted(files))}|{n_before}".encode()).hexdigest()
        snap = self.repo_dir(repo_id) / "snapshots" / commit
        for name, src in files.items():
            dst = snap / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            elif Path(src).is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copyfile(src, dst)
        (self.repo_dir(repo_id) / "refs").mkdir(parents=True, exist_ok=True)
        for ref in refs:
            (self.repo_dir(repo_id) / "refs" / ref).write_text(commit)
        return commit

    def mark_missing(self, repo_id: str, commit: str, filename: str) -> None:
        """Record that ``filename`` does not exist at ``commit`` (what huggingface_hub notes after a 404)."""
        marker = self.repo_dir(repo_id) / ".no_exist" / commit / filename
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def offline_hub(monkeypatch, root, *, offline: bool = True) -> None:
    """Point huggingface_hub (and diffusers / transformers, which read its constants) at the cache ``root``,
    with ``HF_HUB_OFFLINE`` on (or off), for the rest of the test; network connections fail the test."""
    from huggingface_hub import constants

    root = str(root)
    monkeypatch.setenv("HF_HOME", str(Path(root).parent / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", root)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)

    def no_network(self, *args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection to {args[0] if args else '?'}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
