"""Hostile face-parser checkpoints are refused before anything sized by the file is built (issue 11 item 9)."""
from __future__ import annotations

import pytest
import torch

from freecure_ops.pipeline.face_parser import MAX_CLASSES, BiSeNet, BiSeNetParser


def _huge(shape):
    """A tensor of an absurd shape that costs 4 bytes on disk and in memory (stride 0 over one element)."""
    return torch.zeros(1).expand(*shape)


@pytest.fixture(scope="module")
def good_state():
    return BiSeNet(19).state_dict()


@pytest.mark.parametrize("key,shape", [
    ("conv_out.conv_out.weight", (10 ** 12, 256, 1, 1)),     # the class count read from the head: 1e12
    ("conv_out.conv_out.weight", (MAX_CLASSES + 1, 256, 1, 1)),
    ("conv_out.conv_out.weight", (19, 10 ** 9, 1, 1)),
    ("ffm.convblk.conv.weight", (10 ** 10, 512, 1, 1)),        # any other tensor
])
def test_absurd_shapes_are_refused_before_building(tmp_path, good_state, key, shape, monkeypatch):
    state = dict(good_state)
    state[key] = _huge(shape)
    path = tmp_path / "hostile.pth"
    torch.save(state, path)
    built = []
    real_init = BiSeNet.__init__

    def spy(self, n_classes=19):
        built.append((n_classes, torch.get_default_device()))
        real_init(self, n_classes)

    monkeypatch.setattr(BiSeNet, "__init__", spy)
    with pytest.raises(ValueError, match="not a BiSeNet"):
        BiSeNetParser.from_checkpoint(path)
    assert all(dev.type == "meta" for _, dev in built)        # only the shape check's skeleton
    assert all(n <= MAX_CLASSES for n, _ in built)


def test_n_classes_argument_is_bounded(tmp_path, good_state):
    torch.manual_seed(0)  # building the net initializes weights from the global RNG before loading
    path = tmp_path / "ok.pth"
    torch.save(good_state, path)
    with pytest.raises(ValueError, match="^n_classes"):
        BiSeNetParser.from_checkpoint(path, n_classes=10 ** 12)
    assert BiSeNetParser.from_checkpoint(path, input_size=64).net.n_classes == 19
