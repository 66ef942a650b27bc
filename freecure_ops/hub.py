"""Where weights come from, resolved the way diffusers resolves them.

A spec that names an existing local file or folder is used as is. Anything else is a Hugging Face Hub
reference: a model id (``"org/name"``) for whole models, ``"org/name/path/in/repo/file.pth"`` for one file.
Hub files download into the Hugging Face cache on first use (``HF_HOME`` / ``HF_HUB_CACHE``), at
``revision`` (branch, tag or commit; default ``main``), and come from the cache afterwards. With
``offline=True`` or ``HF_HUB_OFFLINE=1`` nothing is downloaded: only the cache is read (``local_files_only``).

Offline mode is huggingface_hub's own (:func:`huggingface_hub.is_offline_mode`, read from the environment
when huggingface_hub is imported), so diffusers, transformers and this module agree on it.

Layer: library (no torch, no diffusers at import); used by the pipeline layer (face parsers) and the CLI.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["WeightsNotFoundError", "is_offline", "pretrained_kwargs", "split_file_spec", "resolve_file",
           "load_pretrained"]


class WeightsNotFoundError(FileNotFoundError):
    """Weights that could not be found: offline and not in the Hugging Face cache, or not on the Hub.
    The message is one line that says what was looked up, where, and why nothing was downloaded."""


def is_offline(offline: bool | None = None) -> bool:
    """True when downloads are off: ``offline=True`` asked, or ``HF_HUB_OFFLINE=1`` (huggingface_hub's
    setting, which also wins over ``offline=False``: the hub client would refuse the download anyway)."""
    if offline is not None and not isinstance(offline, bool):
        raise TypeError(f"offline must be a bool or None, got {type(offline).__name__}")
    from huggingface_hub import constants

    # is_offline_mode() where this huggingface_hub has it (it also sees later changes to the constant)
    env = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()
    return bool(offline) or bool(env)


def _check_optional_str(name: str, value) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise TypeError(f"{name} must be a non-empty string or None, got {value!r}")


def pretrained_kwargs(*, revision: str | None = None, variant: str | None = None,
                      offline: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for ``DiffusionPipeline.from_pretrained``, ``CLIPModel.from_pretrained`` and any other
    diffusers / transformers ``from_pretrained``: ``local_files_only`` (always set, per :func:`is_offline`),
    plus ``revision`` and ``variant`` (e.g. ``"fp16"``) when given. Local folders ignore all three."""
    _check_optional_str("revision", revision)
    _check_optional_str("variant", variant)
    kwargs: dict[str, Any] = {"local_files_only": is_offline(offline)}
    if revision is not None:
        kwargs["revision"] = revision
    if variant is not None:
        kwargs["variant"] = variant
    return kwargs


def _check_spec(spec) -> str | os.PathLike:
    if not isinstance(spec, (str, os.PathLike)) or (isinstance(spec, str) and not spec.strip()):
        raise TypeError(f"spec must be a local path or a Hub reference string, got {spec!r}")
    return spec


def _offline_reason(offline: bool | None) -> str:
    return "offline=True was asked" if offline else "HF_HUB_OFFLINE=1 is set"


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def split_file_spec(spec: str) -> tuple[str, str]:
    """``"org/name/sub/dir/file.pth"`` -> ``("org/name", "sub/dir/file.pth")``; ValueError when the text is not
    a valid repo id followed by a file path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = spec.replace("\\", "/").split("/")
    if len(parts) < 3 or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"spec {spec!r} is not an existing local file, nor a Hub reference of the form "
                         f"'org/name/filename' (or 'org/name/sub/dir/filename')")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"spec {spec!r} is not an existing local file, and {repo_id!r} is not a valid Hub repo "
                         f"id: {e}") from None
    return repo_id, filename


def resolve_file(spec: str | os.PathLike, *, revision: str | None = None,
                 offline: bool | None = None) -> Path:
    """The local path of one weights file: ``spec`` itself when it is an existing file, else the cached copy of
    the Hub file ``"org/name/filename"`` at ``revision`` (downloaded first unless offline).

    A ``pathlib.Path`` is always local. Raises FileNotFoundError for a missing local path, ValueError for a
    folder or a spec that is neither a file nor ``org/name/filename``, :class:`WeightsNotFoundError` (one line)
    when the Hub file is not in the cache while offline, or cannot be had from the Hub.
    """
    spec = _check_spec(spec)
    _check_optional_str("revision", revision)
    path = Path(os.path.expanduser(os.fspath(spec)))
    if path.is_dir():
        raise ValueError(f"spec {os.fspath(spec)!r} is a folder; expected a weights file")
    if path.is_file():
        return path
    if not isinstance(spec, str) or path.is_absolute() or spec.startswith(("~", "./", "../", ".\\", "..\\")):
        raise FileNotFoundError(f"spec {os.fspath(spec)!r}: no such file")
    repo_id, filename = split_file_spec(spec)
    local_only = is_offline(offline)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only))
    except LocalEntryNotFoundError:
        if local_only:
            raise WeightsNotFoundError(
                f"{spec!r}{at} is not in the Hugging Face cache ({_cache_dir()}) and downloads are off "
                f"({_offline_reason(offline)}): download it once online, or pass a local file") from None
        raise WeightsNotFoundError(f"{spec!r}{at}: the Hub could not be reached and the file is not in the "
                                   f"Hugging Face cache ({_cache_dir()})") from None
    except GatedRepoError:
        raise WeightsNotFoundError(f"{spec!r}: {repo_id} is gated on the Hub: accept its terms on the Hub and log "
                                   f"in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise WeightsNotFoundError(f"{spec!r}: no Hub repository {repo_id!r} (or it is private: log in with "
                                   f"hf auth login)") from None
    except RevisionNotFoundError:
        raise WeightsNotFoundError(f"{spec!r}: the Hub repository {repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise WeightsNotFoundError(f"{spec!r}: the Hub repository {repo_id}{at} has no file {filename!r}") from None
    except HfHubHTTPError as e:
        raise WeightsNotFoundError(f"{spec!r}: the Hub refused the download: {str(e).splitlines()[0]}") from None


def load_pretrained(cls, spec: str | os.PathLike, *, revision: str | None = None, variant: str | None = None,
                    offline: bool | None = None, **kwargs):
    """``cls.from_pretrained(spec, **pretrained_kwargs(...), **kwargs)`` for any diffusers / transformers class
    (``DiffusionPipeline``, ``CLIPModel``, ...), with one change: a Hub model that is missing from the cache
    while offline raises :class:`WeightsNotFoundError` (one line) instead of the library's long error."""
    if not isinstance(cls, type) or not callable(getattr(cls, "from_pretrained", None)):
        raise TypeError(f"cls must be a class with from_pretrained (DiffusionPipeline, CLIPModel, ...), got {cls!r}")
    spec = _check_spec(spec)
    load_kwargs = pretrained_kwargs(revision=revision, variant=variant, offline=offline)
    local = Path(os.path.expanduser(os.fspath(spec)))
    try:  # "~/models/x" is a folder too (the libraries would read it as a Hub id)
        return cls.from_pretrained(str(local) if local.exists() else spec, **load_kwargs, **kwargs)
    except OSError as e:
        if not load_kwargs["local_files_only"] or local.exists():
            raise
        at = f" at revision {revision!r}" if revision else ""
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise WeightsNotFoundError(
            f"{os.fspath(spec)!r}{at} is not (completely) in the Hugging Face cache ({_cache_dir()}) and downloads "
            f"are off ({_offline_reason(offline)}): download it once online, or pass a local folder "
            f"[{cls.__name__}: {first}]") from None
