"""Where ``--model``, ``--parser-weights`` and ``--clip`` come from, resolved in the checks, before anything
loads, the way diffusers resolves weights (:mod:`freecure_ops.hub`): an existing local file or folder is used
as is; anything else is a Hugging Face Hub reference, downloaded into the Hugging Face cache at ``--revision``
(default ``main``) unless downloads are off (``--offline`` or ``HF_HUB_OFFLINE=1``: the cache alone). A Hub
reference that cannot be had is one line naming the flag. Everything after the checks reads the resolved
local path (the snapshot folder of the Hub commit), so a run loads what was checked and fingerprinted."""
from __future__ import annotations

import importlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import CLIError
from .model_files import model_path_problem

__all__ = ["Weights", "is_local", "resolve_model", "resolve_parser", "resolve_clip", "parser_is_file", "hub_reason",
           "resolve_run_weights"]

#: names of single weights files (what --parser-weights takes as a BiSeNet checkpoint)
_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


@dataclass(frozen=True)
class Weights:
    """A resolved weights reference: ``spec`` as given, ``path`` the local file or folder to read (for a Hub
    reference: in the cache's ``snapshots/<commit>/``), ``commit`` the Hub commit (None for local paths)."""

    spec: str
    path: Path
    hub: bool = False
    revision: str | None = None
    commit: str | None = None
    variant: str | None = None

    def record(self) -> dict:
        """What the outputs record about these weights (freecure.json, job.json, eval.json)."""
        out = {"spec": self.spec, "path": str(self.path)}
        if self.hub:
            out.update(source="hub", revision=self.revision or "main", commit=self.commit)
        else:
            out["source"] = "local"
        if self.variant is not None:
            out["variant"] = self.variant
        return out

    def key(self) -> str:
        """The text that names these weights in a batch fingerprint: the path for a local one without a
        variant (what fingerprints held before Hub references), else the spec, the commit (a branch, a tag and
        the commit they point at are the same weights) and the variant."""
        if not self.hub and self.variant is None:
            return str(self.path)
        return json.dumps(dict(spec=self.spec, commit=self.commit, variant=self.variant), sort_keys=True)


def _looks_local(spec: str) -> bool:
    """Text that can only mean a local path (a Hub id is never absolute and never starts with ``~`` or ``.``)."""
    return os.path.isabs(spec) or spec.startswith(("~", "./", "../", ".\\", "..\\")) or spec in (".", "..")


def is_local(spec: str) -> bool:
    """Whether ``spec`` is meant as a local path: it exists here, or only a local path can be written so."""
    return Path(spec).expanduser().exists() or _looks_local(spec)


def _commit(path: Path) -> str | None:
    """The commit of a path inside a Hugging Face cache snapshot (``.../snapshots/<commit>/...``)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return parts[i + 1]
    return None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_reason(e: Exception, *, offline: bool | None, kind: str, repo: str | None = None,
               revision: str | None = None) -> str:
    """A Hub lookup's exception as the rest of one line (after ``--flag SPEC: ``). ``kind``: "folder" or
    "file" (what a local path would have been); ``offline``: the --offline flag (None: not given)."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    from ..hub import is_offline

    cause = e.__cause__  # diffusers: "Cannot load model ...: not fully cached ..." from the Hub's own error
    if type(e) is OSError and isinstance(cause, Exception) and (
            isinstance(cause, (HfHubHTTPError, OfflineModeIsEnabled)) or _is_connection_error(cause)):
        e = cause
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    what = f"Hub repository {repo}" if repo else "Hub repository"
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if is_offline(offline):
            why = "--offline" if offline else "HF_HUB_OFFLINE=1 is set"
            at = f" at revision {revision}" if revision else ""
            return (f"not a local {kind}, and not (completely) in the Hugging Face cache ({_cache_dir()}){at}; "
                    f"downloads are off ({why}): download it once online, or pass a local {kind}")
        return f"the Hub could not be reached, and it is not in the Hugging Face cache ({_cache_dir()})"
    if isinstance(e, GatedRepoError):
        return f"the {what} is gated: accept its terms on the Hub and log in (hf auth login)"
    if isinstance(e, RepositoryNotFoundError):
        return f"not a local {kind}, and there is no {what} (or it is private: log in with hf auth login)"
    if isinstance(e, RevisionNotFoundError):
        return f"the {what} has no revision {revision!r}"
    if isinstance(e, EntryNotFoundError):
        return f"the {what}{f' at revision {revision}' if revision else ''} has no such file: {first}"
    if isinstance(e, HfHubHTTPError):
        return f"the Hub refused: {first}"
    if isinstance(e, HFValidationError):
        return f"not a local {kind}, nor a Hub id of the form org/name ({first})"
    if _is_connection_error(e):
        return f"the Hub could not be reached ({first}), and it is not in the Hugging Face cache ({_cache_dir()})"
    return first


def _is_connection_error(e: BaseException) -> bool:
    return type(e).__module__.startswith(("requests", "httpx", "httpcore", "urllib3")) \
        or isinstance(e, (ConnectionError, TimeoutError))


def _lookup_errors() -> tuple:
    """The exceptions a Hub lookup raises for a reference that cannot be had (not programming errors)."""
    errors: list = [OSError, ValueError]  # huggingface_hub's errors are OSError/ValueError subclasses
    for mod, name in (("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError")):
        try:
            errors.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):  # pragma: no cover
            pass
    return tuple(errors)


def _check_revision(flag: str, revision: str | None, rev_flag: str, spec: str) -> None:
    if revision is not None:
        raise CLIError(f"{rev_flag} {revision}: only used with a Hub reference ({flag} {spec} is a local path)")


def _prefix(flag: str, spec: str, rev_flag: str, revision: str | None) -> str:
    return f"{flag} {spec}" + (f" {rev_flag} {revision}" if revision else "")


@contextmanager
def _quiet_download(quiet: bool):
    """While a Hub reference resolves: diffusers' and huggingface_hub's notes off (a miss is our one line; a
    cached fallback needs no note), and their progress bars too under --quiet."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    libs = [hub_logging]
    for name in ("transformers", "diffusers"):  # imported inside: their import-time notes are off too
        try:
            libs.append(importlib.import_module(f"{name}.utils.logging"))
        except ImportError:  # pragma: no cover  (freecure eval needs transformers only)
            pass
    levels = [lib.get_verbosity() for lib in libs]
    bars = quiet and not are_progress_bars_disabled()
    for lib in libs:
        lib.set_verbosity_error()
    if bars:
        disable_progress_bars()
    try:
        yield
    finally:
        for lib, level in zip(libs, levels):
            lib.set_verbosity(level)
        if bars:
            enable_progress_bars()


def resolve_model(spec: str, *, revision: str | None = None, variant: str | None = None,
                  offline: bool | None = None, quiet: bool = False) -> Weights:
    """``--model``: a local pipeline folder, or a Hub id resolved to its snapshot folder with
    ``DiffusionPipeline.download`` (the files ``from_pretrained`` would fetch for ``variant``: downloaded
    unless offline). Raises CLIError naming ``--model`` (``--revision``, ``--variant``)."""
    if variant is not None and not variant.strip():
        raise CLIError("--variant must not be empty (e.g. --variant fp16)")
    if revision is not None and not revision.strip():
        raise CLIError("--revision must not be empty")
    problem = model_path_problem(spec)
    if problem:
        raise CLIError(f"--model {spec}: {problem}")
    local = Path(spec).expanduser()
    if local.is_dir():
        _check_revision("--model", revision, "--revision", spec)
        ref = Weights(spec, local, variant=variant)
    else:
        from ..hub import is_offline

        kwargs = dict(revision=revision, local_files_only=is_offline(offline))
        if variant is not None:
            kwargs["variant"] = variant
        try:
            with _quiet_download(quiet):
                from diffusers import DiffusionPipeline

                folder = Path(DiffusionPipeline.download(spec, **kwargs))
        except _lookup_errors() as e:
            from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

            if "model_index.json" in str(e) and (not isinstance(e, LocalEntryNotFoundError) and
                                                 isinstance(e, (EntryNotFoundError, OSError))):
                folder = None  # the repository (or its cached snapshot) is there, without model_index.json
            else:
                reason = hub_reason(e, offline=offline, kind="folder", repo=spec, revision=revision)
                raise CLIError(f"{_prefix('--model', spec, '--revision', revision)}: {reason}") from None
        if folder is None or not (folder / "model_index.json").is_file():
            raise CLIError(f"{_prefix('--model', spec, '--revision', revision)}: the Hub repository has no "
                           "model_index.json; it is not a diffusers pipeline")
        ref = Weights(spec, folder, hub=True, revision=revision, commit=_commit(folder) or folder.name,
                      variant=variant)
    if variant is not None and not any(f".{variant}." in p.name for p in ref.path.rglob("*")):
        raise CLIError(f"--variant {variant}: {ref.path} has no {variant} weights (files named *.{variant}.*); "
                       "leave --variant out for the default weights")
    return ref


def parser_is_file(spec: str) -> bool:
    """Whether ``--parser-weights`` names one weights file (a BiSeNet checkpoint) rather than a model (a
    SegFormer folder or Hub id): the rule of :func:`freecure_ops.pipeline.parsers.load_face_parser`."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return False
    if local.exists() or _looks_local(spec):
        return True
    return spec.replace("\\", "/").count("/") >= 2 or spec.lower().endswith(_FILE_SUFFIXES)


def resolve_parser(spec: str, *, revision: str | None = None, offline: bool | None = None,
                   quiet: bool = False) -> Weights:
    """``--parser-weights``: a BiSeNet checkpoint (a local file, or the Hub file ``org/name/79999_iter.pth``,
    downloaded unless offline) or a SegFormer face-parsing model (a local folder, or a Hub id whose
    ``config.json`` is looked up here; its weights download when it loads, pinned to the commit found here).
    A checkpoint's first bytes are checked. Raises CLIError naming ``--parser-weights``."""
    from .args import parser_weights_problem

    if revision is not None and not revision.strip():
        raise CLIError("--parser-revision must not be empty")
    local = Path(spec).expanduser()
    if local.exists() or _looks_local(spec):
        _check_revision("--parser-weights", revision, "--parser-revision", spec)
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise CLIError(f"--parser-weights {spec}: a folder without config.json; expected a BiSeNet "
                               "checkpoint file or a SegFormer face-parsing model folder (save_pretrained)")
            return Weights(spec, local)
        problem = parser_weights_problem(local)
        if problem:
            raise CLIError(f"--parser-weights {spec}: {problem}")
        return Weights(spec, local)
    from huggingface_hub import hf_hub_download

    from ..hub import is_offline, split_file_spec

    where = _prefix("--parser-weights", spec, "--parser-revision", revision)
    if parser_is_file(spec):
        try:
            repo, filename = split_file_spec(spec)
        except ValueError:
            raise CLIError(f"{where}: no such local file, nor a Hub file of the form org/name/79999_iter.pth (the "
                           "BiSeNet checkpoint), nor a SegFormer model id org/name") from None
    else:
        repo, filename = spec, "config.json"
    try:
        with _quiet_download(quiet):
            path = Path(hf_hub_download(repo, filename, revision=revision, local_files_only=is_offline(offline)))
    except _lookup_errors() as e:
        kind = "file" if filename != "config.json" else "folder"
        raise CLIError(f"{where}: {hub_reason(e, offline=offline, kind=kind, repo=repo, revision=revision)}") \
            from None
    commit = _commit(path)
    if parser_is_file(spec):
        problem = parser_weights_problem(path)
        if problem:
            raise CLIError(f"{where}: {problem}")
        return Weights(spec, path, hub=True, revision=revision, commit=commit)
    return Weights(spec, path.parent, hub=True, revision=revision, commit=commit)


def resolve_clip(spec: str, *, revision: str | None = None, offline: bool | None = None,
                 quiet: bool = False) -> Weights:
    """``--clip``: a local CLIP folder (``config.json``), or a Hub id whose ``config.json`` is looked up here
    (the model and processor load pinned to the commit found). Raises CLIError naming ``--clip``."""
    if revision is not None and not revision.strip():
        raise CLIError("--clip-revision must not be empty")
    local = Path(spec).expanduser()
    if local.exists() or _looks_local(spec):
        _check_revision("--clip", revision, "--clip-revision", spec)
        if not local.is_dir() or not (local / "config.json").is_file():
            raise CLIError(f"--clip {spec}: expected a local CLIP folder with config.json (saved with "
                           "save_pretrained) or a Hub id such as openai/clip-vit-large-patch14")
        return Weights(spec, local)
    from huggingface_hub import hf_hub_download

    from ..hub import is_offline

    where = _prefix("--clip", spec, "--clip-revision", revision)
    try:
        with _quiet_download(quiet):
            path = Path(hf_hub_download(spec, "config.json", revision=revision, local_files_only=is_offline(offline)))
    except _lookup_errors() as e:
        raise CLIError(f"{where}: {hub_reason(e, offline=offline, kind='folder', repo=spec, revision=revision)}") \
            from None
    return Weights(spec, path.parent, hub=True, revision=revision, commit=_commit(path))


def resolve_run_weights(args):
    """``--model`` (None when not given) and ``--parser-weights`` (None without it) of ``generate`` / ``sweep``
    as :class:`Weights`, after ``--height`` / ``--width`` / ``--layers`` are checked against the model's
    configs. A local parser is checked before any download; a Hub parser resolves last."""
    from .model_files import check_model_flags

    offline = args.offline or None
    parser = model = None
    if args.parser_weights is not None and is_local(args.parser_weights):
        parser = resolve_parser(args.parser_weights, revision=args.parser_revision, offline=offline)
    if args.model is not None:
        model = resolve_model(args.model, revision=args.revision, variant=args.variant, offline=offline,
                              quiet=args.quiet)
        check_model_flags(args, model.path)
    if args.parser_weights is not None and parser is None:
        parser = resolve_parser(args.parser_weights, revision=args.parser_revision, offline=offline,
                                quiet=args.quiet)
    return model, parser
