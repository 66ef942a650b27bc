"""BiSeNet face parser: checkpoint layout, strict loading without pickled code, the label-map contract.

All on random weights (no checkpoint is downloaded), with a 64x64 network input to stay fast."""
import ast
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from freecure_ops.pipeline import face_parser
from freecure_ops.pipeline.face_parser import BISENET_CELEBAMASK_LABELS, BiSeNet, BiSeNetParser, load_state_dict_file

SIZE = 64  # network input for tests (the checkpoint's own is 512)


def _random_net(n_classes=19, seed=0):
    torch.manual_seed(seed)
    net = BiSeNet(n_classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the round trip covers the buffers too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return _random_net()


@pytest.fixture(scope="module")
def ckpt(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("bisenet") / "79999_iter.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(net):
    """A parser over the in-memory net, never saved or loaded."""
    return BiSeNetParser(net, input_size=SIZE)


@pytest.fixture(scope="module")
def parser(ckpt):
    return BiSeNetParser.from_checkpoint(ckpt, input_size=SIZE)


def _rand(*shape, seed=0):
    """torch.rand from a seeded generator (tests never draw from the global RNG)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _image(h=40, w=50, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------
# architecture = the 79999_iter.pth layout
# ---------------------------------------------------------------------------------------------------------

def test_state_dict_keys_and_shapes_of_the_checkpoint(net):
    sd = net.state_dict()
    expected = {
        "cp.resnet.conv1.weight": (64, 3, 7, 7),
        "cp.resnet.bn1.running_var": (64,),
        "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
        "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "cp.resnet.layer2.0.downsample.1.weight": (128,),
        "cp.resnet.layer4.1.conv2.weight": (512, 512, 3, 3),
        "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
        "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
        "cp.arm16.bn_atten.running_mean": (128,),
        "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
        "cp.conv_head32.conv.weight": (128, 128, 3, 3),
        "cp.conv_head16.bn.bias": (128,),
        "cp.conv_avg.conv.weight": (128, 512, 1, 1),
        "ffm.convblk.conv.weight": (256, 256, 1, 1),
        "ffm.conv1.weight": (64, 256, 1, 1),
        "ffm.conv2.weight": (256, 64, 1, 1),
        "conv_out.conv.conv.weight": (256, 256, 3, 3),
        "conv_out.conv_out.weight": (19, 256, 1, 1),
        "conv_out16.conv.conv.weight": (64, 128, 3, 3),
        "conv_out16.conv_out.weight": (19, 64, 1, 1),
        "conv_out32.conv_out.weight": (19, 64, 1, 1),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"cp", "ffm", "conv_out", "conv_out16", "conv_out32"}  # no sp.*, no fc
    assert not any(".fc." in k for k in sd)
    assert not any(k.startswith("cp.resnet.layer1.0.downsample") for k in sd)  # 64 -> 64, stride 1
    # 13.3 M parameters, about 53 MB in fp32, like the published 79999_iter.pth
    assert 13_200_000 < sum(p.numel() for p in net.parameters()) < 13_400_000


def test_no_torchvision_and_no_download(monkeypatch):
    tree = ast.parse(pathlib.Path(face_parser.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torchvision" not in imported

    def no_network(*args, **kwargs):
        raise AssertionError("the face parser tried to download something")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    BiSeNetParser(_random_net(), input_size=SIZE)(_image(32, 32))


def test_forward_heads(net):
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, out16, out32 = net(x, return_aux=True)
        assert torch.equal(out, net(x))
    for t in (out, out16, out32):
        assert t.shape == (1, 19, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------

def test_round_trip_identical_state_and_outputs(net, parser, reference):
    loaded = parser.net.state_dict()
    original = net.state_dict()
    assert loaded.keys() == original.keys()
    for k in original:
        assert torch.equal(loaded[k], original[k]), k
    img = _image()
    assert torch.equal(parser(img), reference(img))
    assert torch.equal(parser.logits(img), reference.logits(img))
    assert not parser.net.training
    assert parser.labels is BISENET_CELEBAMASK_LABELS


def test_preprocessing_matches_an_independent_computation(parser, net):
    img = _rand(3, SIZE, SIZE)  # already at the network size: no resize
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        expected = net(((img - mean) / std)[None])
    torch.testing.assert_close(parser.logits(img), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(parser(img), expected.argmax(1)[0])


def test_label_map_resized_back_with_nearest(parser):
    h, w = 40, 50
    img = _rand(3, h, w)
    small = parser.logits(img).argmax(1)[0]  # [SIZE, SIZE]
    rows = [i * SIZE // h for i in range(h)]
    cols = [j * SIZE // w for j in range(w)]
    expected = small[rows][:, cols]
    assert torch.equal(parser(img), expected)
    # the resize to the network input is bilinear (antialiased) over [0, 1] RGB
    resized = F.interpolate(img[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(parser.logits(resized[0]), parser.logits(img))


@pytest.mark.parametrize("kind", ["pil", "pil_gray", "numpy", "tensor", "batch", "list"])
def test_output_contract_for_input_kinds(parser, kind):
    arr = _image(40, 50)
    if kind == "pil":
        x, shape = Image.fromarray(arr), (40, 50)
    elif kind == "pil_gray":
        x, shape = Image.fromarray(arr).convert("L"), (40, 50)
    elif kind == "numpy":
        x, shape = arr, (40, 50)
    elif kind == "tensor":
        x, shape = torch.from_numpy(arr).permute(2, 0, 1).float() / 255, (40, 50)
    elif kind == "batch":
        x, shape = _rand(2, 3, 40, 50), (2, 40, 50)
    else:
        x, shape = [Image.fromarray(arr), Image.fromarray(_image(40, 50, seed=2))], (2, 40, 50)
    out = parser(x)
    assert out.shape == shape and out.dtype == torch.int64 and out.device.type == "cpu"
    assert int(out.min()) >= 0 and int(out.max()) < 19


def test_input_kinds_agree(parser):
    arr = _image(37, 45)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    a = parser(Image.fromarray(arr))
    assert torch.equal(a, parser(arr))
    assert torch.equal(a, parser(t))
    assert torch.equal(a, parser(t[None])[0])
    assert torch.equal(parser([arr, arr]), torch.stack([a, a]))


def test_dtype_and_device_arguments(ckpt):
    torch.manual_seed(0)  # from_checkpoint builds a randomly initialised BiSeNet before loading
    p = BiSeNetParser.from_checkpoint(str(ckpt), device="cpu", dtype=torch.bfloat16, input_size=SIZE)
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu"
    out = p(_rand(3, 40, 50))
    assert out.shape == (40, 50) and out.dtype == torch.int64


def test_state_dict_wrappers_and_old_batchnorm(net, reference, tmp_path):
    torch.manual_seed(0)  # from_checkpoint builds a randomly initialised BiSeNet before loading
    sd = net.state_dict()
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    no_nbt = tmp_path / "old.pth"  # old PyTorch checkpoints have no num_batches_tracked
    torch.save({k: v for k, v in sd.items() if "num_batches_tracked" not in k}, no_nbt)
    img = _image()
    ref = reference(img)
    for path in (wrapped, no_nbt):
        assert torch.equal(BiSeNetParser.from_checkpoint(path, input_size=SIZE)(img), ref)


def test_safetensors_round_trip(net, tmp_path):
    torch.manual_seed(0)  # from_checkpoint builds a randomly initialised BiSeNet before loading
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "bisenet.safetensors"
    st.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    p = BiSeNetParser.from_checkpoint(path, input_size=SIZE)
    for k, v in net.state_dict().items():
        assert torch.equal(p.net.state_dict()[k], v)


def test_other_class_count_is_read_from_the_checkpoint(tmp_path):
    path = tmp_path / "five.pth"
    torch.save(_random_net(5).state_dict(), path)
    p = BiSeNetParser.from_checkpoint(path, input_size=SIZE)
    assert p.net.n_classes == 5 and p.labels is None
    assert int(p(_image()).max()) < 5
    with pytest.raises(ValueError, match="shape mismatches.*conv_out.conv_out.weight"):
        BiSeNetParser.from_checkpoint(path, n_classes=19, input_size=SIZE)


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "79999_iter.pth"
    with pytest.raises(FileNotFoundError, match="79999_iter.pth"):
        BiSeNetParser.from_checkpoint(path)
    with pytest.raises(ValueError, match="directory"):
        BiSeNetParser.from_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="path"):
        BiSeNetParser.from_checkpoint(123)


def test_mismatched_keys_are_named(net, tmp_path):
    torch.manual_seed(0)  # from_checkpoint builds a randomly initialised BiSeNet before loading
    sd = dict(net.state_dict())
    del sd["cp.arm16.conv_atten.weight"]
    sd["sp.conv1.conv.weight"] = torch.zeros(64, 3, 7, 7)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as info:
        BiSeNetParser.from_checkpoint(path)
    msg = str(info.value)
    assert "bad.pth" in msg and "cp.arm16.conv_atten.weight" in msg and "sp.conv1.conv.weight" in msg
    assert "missing" in msg and "unexpected" in msg


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="state dict"):
        BiSeNetParser.from_checkpoint(path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pth"):
        load_state_dict_file(junk)


def _leave_a_mark(path):  # what a malicious pickle would run on load
    pathlib.Path(path).write_text("pickled code ran")
    return {}


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_leave_a_mark, (self.marker,))


def test_pickled_objects_are_refused_and_not_executed(net, tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": net.state_dict(), "extra": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="weights_only"):
        BiSeNetParser.from_checkpoint(path)
    assert not marker.exists()
    # a plain pickle load would have run it: the test payload is real
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------
# bad input names the argument
# ---------------------------------------------------------------------------------------------------------

def test_bad_images(parser):
    with pytest.raises(TypeError, match="image"):
        parser(_image().astype(np.float32))
    with pytest.raises(ValueError, match="image"):
        parser(_image()[..., :2].copy())
    with pytest.raises(TypeError, match="image"):
        parser(torch.randint(0, 255, (3, 8, 8), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="image"):
        parser(_rand(4, 40, 50))
    with pytest.raises(ValueError, match=r"image.*\[0, 1\]"):
        parser(_rand(3, 40, 50) * 2 - 1)
    with pytest.raises(ValueError, match="image"):
        parser([])
    with pytest.raises(ValueError, match="image"):
        parser([_image(40, 50), _image(41, 50)])
    with pytest.raises(TypeError, match="image"):
        parser("face.png")


def test_bad_constructor_arguments():
    net = _random_net()
    with pytest.raises(ValueError, match="input_size"):
        BiSeNetParser(net, input_size=16)
    with pytest.raises(TypeError, match="input_size"):
        BiSeNetParser(net, input_size=(64, 64.0))
    with pytest.raises(TypeError, match="dtype"):
        BiSeNetParser(net, dtype=torch.int64)
    with pytest.raises(TypeError, match="net"):
        BiSeNetParser("79999_iter.pth")
    with pytest.raises(ValueError, match="labels"):
        BiSeNetParser(net, labels={"hair": 19})
    with pytest.raises(ValueError, match="n_classes"):
        BiSeNet(1)
