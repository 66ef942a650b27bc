"""SegFormer face parser (issue 18): the BiSeNetParser call contract, labels from the model's id2label, loading
from a folder or an offline Hub cache. Tiny random SegformerForSemanticSegmentation models, built from configs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hub_cache import HubCache, offline_hub
from freecure_ops.hub import WeightsNotFoundError
from freecure_ops.pipeline.attributes import label_table_for, mask_from_prompt
from freecure_ops.pipeline.face_parser import BiSeNet, BiSeNetParser
from freecure_ops.pipeline.parsers import load_face_parser
from freecure_ops.pipeline.segformer_parser import SegFormerParser, labels_from_id2label

SIZE = 64

#: config.json id2label of jonathandinu/face-parsing (huggingface.co/jonathandinu/face-parsing, main)
FACE_PARSING_ID2LABEL = {
    0: "background", 1: "skin", 2: "nose", 3: "eye_g", 4: "l_eye", 5: "r_eye", 6: "l_brow", 7: "r_brow",
    8: "l_ear", 9: "r_ear", 10: "mouth", 11: "u_lip", 12: "l_lip", 13: "hair", 14: "hat", 15: "ear_r",
    16: "neck_l", 17: "neck", 18: "cloth"}
#: an early revision of the same config (as copied to Xenova/face-parsing): file names, another order
EARLY_ID2LABEL = {
    0: "background", 1: "skin.png", 2: "nose.png", 3: "r_eye.png", 4: "l_eye.png", 5: "r_brow.png",
    6: "l_brow.png", 7: "r_ear.png", 8: "l_ear.png", 9: "mouth.png", 10: "u_lip.png", 11: "l_lip.png",
    12: "neck.png", 13: "hair.png", 14: "neck_l.png", 15: "cloth.png", 16: "eye_g.png", 17: "hat.png",
    18: "ear_r.png"}
PREPROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
                "image_processor_type": "SegformerImageProcessor", "image_std": [0.229, 0.224, 0.225],
                "resample": 2, "rescale_factor": 1 / 255, "size": {"height": SIZE, "width": SIZE}}


def _tiny_segformer(seed=0, id2label=FACE_PARSING_ID2LABEL):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                          decoder_hidden_size=16, num_labels=len(id2label), id2label=dict(id2label),
                          label2id={v: k for k, v in id2label.items()})
    return SegformerForSemanticSegmentation(cfg).eval()


def _save(model, folder, preprocessor=PREPROCESSOR):
    model.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("segformer")
    return {"a": _save(_tiny_segformer(0), root / "a"), "b": _save(_tiny_segformer(3), root / "b"),
            "bare": _save(_tiny_segformer(0), root / "bare", preprocessor=None)}


@pytest.fixture(scope="module")
def parser(folders):
    return SegFormerParser.from_pretrained(folders["a"])


def _image(h=40, w=50, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------
# the label map against independent computations
# ---------------------------------------------------------------------------------------------------------

def test_label_map_is_argmax_of_upsampled_logits(parser):
    img = _rand(3, 40, 50)
    x = F.interpolate(img[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = parser.model(pixel_values=(x - mean) / std).logits
    assert logits.shape == (1, 19, SIZE // 4, SIZE // 4)
    expected = F.interpolate(logits, size=(40, 50), mode="bilinear", align_corners=False).argmax(1)[0]
    got = parser(img)
    assert got.shape == (40, 50) and got.dtype == torch.int64
    assert len(torch.unique(expected)) > 2  # a map worth comparing
    assert torch.equal(got, expected)
    torch.testing.assert_close(parser.logits(img), logits, rtol=1e-5, atol=1e-5)


def test_matches_transformers_processor_and_post_processing(parser, folders):
    """At the network size (no resize), transformers' own SegformerImageProcessor and
    post_process_semantic_segmentation give the same map. Its PIL implementation where transformers has one
    (5.25 falls back to it from the plain class when torchvision is missing; 5.17 refuses both without
    torchvision, and the reference is then missing, so the test skips saying so)."""
    import transformers

    processor = getattr(transformers, "SegformerImageProcessorPil", None) or transformers.SegformerImageProcessor
    try:
        proc = processor.from_pretrained(str(folders["a"]))
    except ImportError as e:
        if "torchvision" not in str(e).lower():
            raise
        pytest.skip(f"transformers {transformers.__version__}'s {processor.__name__} needs torchvision, not installed")
    arr = _image(SIZE, SIZE, seed=4)
    inputs = proc(images=Image.fromarray(arr), return_tensors="pt")
    with torch.no_grad():
        out = parser.model(**inputs)
    expected = proc.post_process_semantic_segmentation(out, target_sizes=[(SIZE, SIZE)])[0]
    assert len(torch.unique(expected)) > 2
    assert torch.equal(parser(arr), expected.to(torch.int64))


@pytest.mark.parametrize("kind", ["pil", "numpy", "tensor", "batch", "list"])
def test_output_contract_for_input_kinds(parser, kind):
    arr = _image(40, 50)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    x, shape = {"pil": (Image.fromarray(arr), (40, 50)), "numpy": (arr, (40, 50)), "tensor": (t, (40, 50)),
                "batch": (torch.stack([t, _rand(3, 40, 50)]), (2, 40, 50)),
                "list": ([arr, arr], (2, 40, 50))}[kind]
    out = parser(x)
    assert out.shape == shape and out.dtype == torch.int64 and out.device.type == "cpu"
    single = parser(arr)
    assert torch.equal(out if out.dim() == 2 else out[0], single)


def test_bad_images(parser):
    with pytest.raises(TypeError, match="image"):
        parser("face.png")
    with pytest.raises(ValueError, match=r"image.*\[0, 1\]"):
        parser(_rand(3, 40, 50) * 2 - 1)


# ---------------------------------------------------------------------------------------------------------
# labels per parser
# ---------------------------------------------------------------------------------------------------------

def test_labels_come_from_id2label(parser):
    assert dict(parser.labels) == {v: k for k, v in FACE_PARSING_ID2LABEL.items()}
    table = label_table_for(parser.labels)
    assert table["hair"] == (13,) and table["glasses"] == (3,) and table["hat"] == (14,)
    assert table["eye"] == (4, 5) and table["earring"] == (15,) and table["necklace"] == (16,)
    assert table["mouth"] == (10, 11, 12) and table["cloth"] == (18,)
    lm = parser(_image())
    torch.testing.assert_close(mask_from_prompt(lm, "a man with red hair", label_table=table), lm == 13)


def test_early_config_names_and_order():
    labels = labels_from_id2label({str(k): v for k, v in EARLY_ID2LABEL.items()})  # JSON keys are strings
    table = label_table_for(labels)
    assert table["hair"] == (13,) and table["glasses"] == (16,) and table["hat"] == (17,) and table["eye"] == (3, 4)
    with pytest.raises(ValueError, match="both 'hair'"):
        labels_from_id2label({0: "hair", 1: "Hair.png"})
    with pytest.raises(ValueError, match="id2label"):
        labels_from_id2label({})


def test_labels_argument_and_bad_arguments():
    model = _tiny_segformer(0, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ValueError, match="labels: none of the model's class names"):
        SegFormerParser(model)
    p = SegFormerParser(model, labels={"background": 0, "skin": 1, "hair": 2}, input_size=SIZE)
    assert label_table_for(p.labels)["hair"] == (2,)
    with pytest.raises(ValueError, match="labels"):
        SegFormerParser(model, labels={"hair": 3})
    with pytest.raises(TypeError, match="labels"):
        SegFormerParser(model, labels={"hair": "2"})
    with pytest.raises(TypeError, match="model"):
        SegFormerParser(BiSeNet(19))
    with pytest.raises(TypeError, match="dtype"):
        SegFormerParser(model, labels={"hair": 2}, dtype=torch.int32)
    with pytest.raises(ValueError, match="input_size"):
        SegFormerParser(model, labels={"hair": 2}, input_size=8)
    with pytest.raises(ValueError, match="std"):
        SegFormerParser(model, labels={"hair": 2}, std=(1.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------
# preprocessing from preprocessor_config.json
# ---------------------------------------------------------------------------------------------------------

def test_preprocessor_config_is_read(folders, tmp_path):
    cfg = dict(PREPROCESSOR, size={"height": 32, "width": 48}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.25, 0.5])
    folder = _save(_tiny_segformer(0), tmp_path / "m", preprocessor=cfg)
    p = SegFormerParser.from_pretrained(folder)
    assert p.input_size == (32, 48) and p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.25, 0.5)
    assert SegFormerParser.from_pretrained(folder, input_size=SIZE).input_size == (SIZE, SIZE)
    bare = SegFormerParser.from_pretrained(folders["bare"])  # SegformerImageProcessor's defaults
    assert bare.input_size == (512, 512) and bare.std == (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------
# from the Hub (offline cache)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, folders, monkeypatch):
    c = HubCache(tmp_path / "hub")
    c.commits = {"a": c.add("org/face-parsing", folders["a"], refs=("v1",)),
                 "b": c.add("org/face-parsing", folders["b"]),
                 "bare": c.add("org/bare-parsing", folders["bare"])}
    offline_hub(monkeypatch, c.root)
    return c


def test_from_the_cache_with_revision_pins(cache, folders, parser):
    want_b = SegFormerParser.from_pretrained(folders["b"])
    assert not _same_state(want_b.model, parser.model)
    got = SegFormerParser.from_pretrained("org/face-parsing")
    assert _same_state(got.model, want_b.model) and got.input_size == (SIZE, SIZE)
    for rev in ("v1", cache.commits["a"]):
        pinned = SegFormerParser.from_pretrained("org/face-parsing", revision=rev)
        assert _same_state(pinned.model, parser.model)
        assert torch.equal(pinned(_image()), parser(_image()))


def test_missing_model_or_preprocessor_config_offline(cache):
    with pytest.raises(WeightsNotFoundError) as info:
        SegFormerParser.from_pretrained("org/not-cached")
    assert "\n" not in str(info.value) and "HF_HUB_OFFLINE=1" in str(info.value)
    # a cached model whose preprocessor config was never fetched: not silently replaced by defaults
    with pytest.raises(WeightsNotFoundError, match="preprocessor_config.json"):
        SegFormerParser.from_pretrained("org/bare-parsing")
    # once the Hub said the repo has none (huggingface_hub's .no_exist marker), the defaults apply
    cache.mark_missing("org/bare-parsing", cache.commits["bare"], "preprocessor_config.json")
    assert SegFormerParser.from_pretrained("org/bare-parsing").input_size == (512, 512)


def test_load_face_parser_picks_by_spec(cache, folders, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "79999_iter.pth"
    torch.save(BiSeNet(19).state_dict(), ckpt)
    cache.add("org/bisenet", {"79999_iter.pth": ckpt})
    assert isinstance(load_face_parser(str(ckpt)), BiSeNetParser)
    assert isinstance(load_face_parser("org/bisenet/79999_iter.pth"), BiSeNetParser)
    assert isinstance(load_face_parser(folders["a"]), SegFormerParser)
    seg = load_face_parser("org/face-parsing", revision="v1", dtype=torch.float64)
    assert isinstance(seg, SegFormerParser) and seg.dtype == torch.float64
    with pytest.raises(ValueError, match="not an existing local file"):
        load_face_parser("missing.pth")
    with pytest.raises(WeightsNotFoundError, match="org/none"):
        load_face_parser("org/none")
    with pytest.raises(TypeError, match="spec"):
        load_face_parser(None)


def test_freecure_masks_hair_with_the_segformer_ids(parser):
    """FreeCure takes the table from the parser's labels: hair is SegFormer's 13, not BiSeNet's 17."""
    from tiny_pipes import IMAGE, tiny_sd_pipe
    from freecure_ops.pipeline import FreeCure

    fc = FreeCure(tiny_sd_pipe(), parser, layers="all", empty_mask="warn")
    assert fc.label_table["hair"] == (13,) and fc.label_table["glasses"] == (3,)
    out = fc("a photo of sks man with red hair", fd_prompt="a photo of man with red hair", seed=0,
             num_inference_steps=2, height=IMAGE, width=IMAGE, output_type="pt")
    label_map = out.label_maps[0] if out.label_maps.dim() == 3 else out.label_maps
    assert torch.equal(label_map, parser(out.fd_images[0].clamp(0, 1)))
    assert (label_map == 13).any() and (label_map != 13).any()   # a mask that can tell 13 from the rest
    assert torch.equal(out.mask.bool(), label_map == 13)
