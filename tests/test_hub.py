"""Weights like diffusers (issue 18): local paths as is, Hub references from a pre-filled cache under
HF_HUB_OFFLINE=1 (tests/hub_cache.py), revision pins, one-line errors. Nothing here touches the network: the
cache fixture makes any connection fail the test."""
from __future__ import annotations

import pytest
import torch

from hub_cache import HubCache, offline_hub
from freecure_ops import hub
from freecure_ops.hub import WeightsNotFoundError, is_offline, pretrained_kwargs, resolve_file, split_file_spec
from freecure_ops.pipeline.face_parser import BiSeNet, BiSeNetParser
from tiny_pipes import IMAGE, tiny_clip, tiny_sd_pipe

SIZE = 64


def _bisenet_ckpt(path, seed):
    torch.manual_seed(seed)
    torch.save(BiSeNet(19).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Source files and folders for the cache: two BiSeNet checkpoints, two tiny SD pipelines, a tiny CLIP."""
    root = tmp_path_factory.mktemp("hub_src")
    out = {"ckpt_a": _bisenet_ckpt(root / "a.pth", 1), "ckpt_b": _bisenet_ckpt(root / "b.pth", 2)}
    for name, seed in (("sd_a", 0), ("sd_b", 5)):
        tiny_sd_pipe(seed).save_pretrained(root / name)
        out[name] = root / name
    out["clip"] = tiny_clip(root / "clip")
    return out


@pytest.fixture
def cache(tmp_path, files, monkeypatch):
    """The offline cache: org/parser (main -> b, tag v1 -> a), org/tiny-sd (main -> sd_b, v1 -> sd_a),
    org/tiny-clip. ``cache.commits`` holds the commit hashes."""
    c = HubCache(tmp_path / "hub")
    c.commits = {
        "parser_a": c.add("org/parser", {"weights/79999_iter.pth": files["ckpt_a"]}, refs=("v1",)),
        "parser_b": c.add("org/parser", {"weights/79999_iter.pth": files["ckpt_b"]}),
        "sd_a": c.add("org/tiny-sd", files["sd_a"], refs=("v1",)),
        "sd_b": c.add("org/tiny-sd", files["sd_b"]),
        "clip": c.add("org/tiny-clip", files["clip"]),
    }
    offline_hub(monkeypatch, c.root)
    return c


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------
# resolve_file
# ---------------------------------------------------------------------------------------------------------

def test_local_file_is_used_as_is(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "empty_cache")
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert resolve_file(str(f)) == f
    assert resolve_file(f) == f
    monkeypatch.chdir(tmp_path)
    assert resolve_file("w.pth").resolve() == f.resolve()


def test_hub_file_from_the_cache_and_revision_pins(cache, files):
    main = resolve_file("org/parser/weights/79999_iter.pth")
    assert main.read_bytes() == files["ckpt_b"].read_bytes()
    assert cache.commits["parser_b"] in main.parts
    for rev in ("v1", cache.commits["parser_a"]):
        pinned = resolve_file("org/parser/weights/79999_iter.pth", revision=rev)
        assert pinned.read_bytes() == files["ckpt_a"].read_bytes() != files["ckpt_b"].read_bytes()
    assert resolve_file("org/parser/weights/79999_iter.pth", revision="main") == main


@pytest.mark.parametrize("spec,revision", [("org/parser/weights/other.pth", None),
                                           ("org/missing/79999_iter.pth", None),
                                           ("org/parser/weights/79999_iter.pth", "v2")])
def test_missing_from_the_cache_is_one_line(cache, spec, revision):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_file(spec, revision=revision)
    msg = str(info.value)
    assert "\n" not in msg and spec in msg and "HF_HUB_OFFLINE=1" in msg and str(cache.root) in msg
    assert "not in the Hugging Face cache" in msg
    assert (f"revision {revision!r}" in msg) == (revision is not None)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_offline_argument_without_the_env(cache, monkeypatch):
    offline_hub(monkeypatch, cache.root, offline=False)
    assert not is_offline() and is_offline(True) and not is_offline(False)
    with pytest.raises(WeightsNotFoundError, match=r"offline=True was asked"):
        resolve_file("org/parser/weights/nope.pth", offline=True)
    assert resolve_file("org/parser/weights/79999_iter.pth", offline=True).is_file()


def test_env_wins_over_offline_false(cache):
    assert is_offline(False) and is_offline(None)
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE=1"):
        resolve_file("org/parser/weights/nope.pth", offline=False)


def test_bad_specs(tmp_path, cache):
    with pytest.raises(ValueError, match="folder"):
        resolve_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_file(tmp_path / "nope.pth")               # a Path is always local
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_file(str(tmp_path / "nope.pth"))          # so is an absolute path
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_file("./nope/x/y.pth")
    for bad in ("79999_iter.pth", "org/79999_iter.pth", "org//x.pth", "org/repo/../x.pth", "org/re po/x.pth",
                "org/a--b/x.pth"):
        with pytest.raises(ValueError, match="spec"):
            resolve_file(bad)
    for bad in (None, 3, "", "  "):
        with pytest.raises(TypeError, match="spec"):
            resolve_file(bad)
    with pytest.raises(TypeError, match="revision"):
        resolve_file("org/parser/weights/79999_iter.pth", revision=3)
    with pytest.raises(TypeError, match="offline"):
        resolve_file("org/parser/weights/79999_iter.pth", offline="yes")
    assert split_file_spec("org/name/sub/dir/f.pth") == ("org/name", "sub/dir/f.pth")


def _http_error(cls, status):
    import importlib

    from huggingface_hub import errors

    # the HTTP client whose responses huggingface_hub's errors carry (httpx2 in huggingface_hub 2.x)
    client = importlib.import_module(errors.Response.__module__.split(".")[0])
    response = client.Response(status, request=client.Request("GET", "https://huggingface.co/x"))
    return cls("boom\nmore lines", response=response)


@pytest.mark.parametrize("error,expected", [
    ("RepositoryNotFoundError", "no Hub repository 'org/parser'"),
    ("GatedRepoError", "gated"),
    ("RevisionNotFoundError", "no revision 'dev'"),
    ("RemoteEntryNotFoundError", "has no file 'weights/x.pth'"),
    ("HfHubHTTPError", "refused the download: boom"),
])
def test_hub_errors_online_are_one_line(tmp_path, monkeypatch, error, expected):
    """Online errors of the Hub client (simulated: no network in tests) become one line."""
    from huggingface_hub import errors

    offline_hub(monkeypatch, tmp_path / "hub", offline=False)
    cls = getattr(errors, error)
    status = {"GatedRepoError": 403, "HfHubHTTPError": 500}.get(error, 404)

    def fake_download(repo_id, filename, **kwargs):
        assert kwargs["local_files_only"] is False and kwargs["revision"] == "dev"
        raise _http_error(cls, status)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_file("org/parser/weights/x.pth", revision="dev")
    assert expected in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# from_pretrained kwargs: diffusers pipelines and transformers CLIP from the cache
# ---------------------------------------------------------------------------------------------------------

def test_pretrained_kwargs(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hub", offline=False)
    assert pretrained_kwargs() == {"local_files_only": False}
    assert pretrained_kwargs(revision="v1", variant="fp16", offline=True) == {
        "local_files_only": True, "revision": "v1", "variant": "fp16"}
    offline_hub(monkeypatch, tmp_path / "hub", offline=True)
    assert pretrained_kwargs(offline=False) == {"local_files_only": True}
    for bad in (dict(revision=""), dict(variant=16), dict(offline=1)):
        with pytest.raises(TypeError, match=next(iter(bad))):
            pretrained_kwargs(**bad)


def test_diffusion_pipeline_from_the_cache_with_revision_pins(cache, files):
    from diffusers import DiffusionPipeline

    expected = {rev: DiffusionPipeline.from_pretrained(str(files[name])) for rev, name in (("main", "sd_b"),
                                                                                            ("v1", "sd_a"))}
    assert not _same_state(expected["main"].unet, expected["v1"].unet)
    pipe = DiffusionPipeline.from_pretrained("org/tiny-sd", **pretrained_kwargs())
    assert _same_state(pipe.unet, expected["main"].unet) and _same_state(pipe.vae, expected["main"].vae)
    for rev in ("v1", cache.commits["sd_a"]):
        pinned = hub.load_pretrained(DiffusionPipeline, "org/tiny-sd", revision=rev)
        assert _same_state(pinned.unet, expected["v1"].unet)


def test_missing_pipeline_offline_is_one_line(cache):
    from diffusers import DiffusionPipeline

    for spec, rev in (("org/not-cached", None), ("org/tiny-sd", "v9")):
        with pytest.raises(WeightsNotFoundError) as info:
            hub.load_pretrained(DiffusionPipeline, spec, revision=rev)
        msg = str(info.value)
        assert "\n" not in msg and spec in msg and "HF_HUB_OFFLINE=1" in msg and str(cache.root) in msg


def test_clip_from_the_cache(cache, files, monkeypatch):
    from transformers import AutoProcessor, CLIPModel

    model = hub.load_pretrained(CLIPModel, "org/tiny-clip")
    assert _same_state(model, CLIPModel.from_pretrained(str(files["clip"])))
    monkeypatch.setenv("HOME", str(files["clip"].parent))  # a folder named with ~ is local, not a Hub id
    assert _same_state(hub.load_pretrained(CLIPModel, "~/" + files["clip"].name), model)
    processor = AutoProcessor.from_pretrained("org/tiny-clip", **pretrained_kwargs())
    assert processor.image_processor.crop_size == {"height": IMAGE, "width": IMAGE}
    with pytest.raises(WeightsNotFoundError, match="org/no-clip"):
        hub.load_pretrained(CLIPModel, "org/no-clip")
    with pytest.raises(TypeError, match="cls"):
        hub.load_pretrained(model, "org/tiny-clip")
    with pytest.raises(TypeError, match="spec"):
        hub.load_pretrained(CLIPModel, None)


def test_local_folder_errors_are_the_librarys(tmp_path, cache):
    """A local folder is never reported as a cache miss: its own error comes through."""
    from transformers import CLIPModel

    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError) as info:
        hub.load_pretrained(CLIPModel, str(tmp_path / "empty"))
    assert not isinstance(info.value, WeightsNotFoundError)


# ---------------------------------------------------------------------------------------------------------
# the BiSeNet face parser from a Hub file
# ---------------------------------------------------------------------------------------------------------

def test_bisenet_parser_from_the_cache(cache, files):
    torch.manual_seed(0)  # from_checkpoint builds a randomly initialised BiSeNet before loading
    want_a = BiSeNetParser.from_checkpoint(files["ckpt_a"], input_size=SIZE)
    want_b = BiSeNetParser.from_checkpoint(files["ckpt_b"], input_size=SIZE)
    assert not _same_state(want_a.net, want_b.net)
    got = BiSeNetParser.from_pretrained("org/parser/weights/79999_iter.pth", input_size=SIZE, device="cpu")
    assert _same_state(got.net, want_b.net) and got.input_size == (SIZE, SIZE)
    pinned = BiSeNetParser.from_pretrained("org/parser/weights/79999_iter.pth", revision="v1", input_size=SIZE)
    assert _same_state(pinned.net, want_a.net)
    local = BiSeNetParser.from_pretrained(str(files["ckpt_a"]), input_size=SIZE)
    assert _same_state(local.net, want_a.net)
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE=1"):
        BiSeNetParser.from_pretrained("org/parser/79999_iter.pth")
