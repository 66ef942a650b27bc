"""Attribute masks: prompt -> attributes, attributes -> parser label ids, label map -> mask, template prompts.

Expected masks are computed here independently, with plain numpy loops over pixels."""
import math

import numpy as np
import pytest
import torch

from freecure_ops.pipeline.attributes import (
    BISENET_ATTRIBUTE_LABELS,
    DEFAULT_VOCABULARY,
    AttributeVocabulary,
    attribute_label_ids,
    attribute_mask,
    dilate_mask,
    feather_mask,
    find_attributes,
    label_mask,
    label_table_for,
    mask_from_prompt,
    resize_mask,
    template_prompt,
    union_masks,
)
from freecure_ops.pipeline.face_parser import BISENET_CELEBAMASK_LABELS

# ---------------------------------------------------------------------------------------------------------
# prompt -> attributes
# ---------------------------------------------------------------------------------------------------------

MATCH_CASES = [
    ("a man wearing eyeglasses", ["glasses"]),
    ("a man wearing glasses", ["glasses"]),
    ("a woman with sunglasses and blue eyes", ["glasses", "eye"]),
    ("a woman with blue eyes", ["eye"]),
    ("a woman with one blue eye", ["eye"]),
    ("bushy eyebrows and long eyelashes, eyeliner", ["eyebrow"]),
    ("EYES, hair; Glasses!", ["eye", "hair", "glasses"]),
    ("(red hair)", ["hair"]),
    ("her hair's colour", ["hair"]),
    ("a man with grey hairs", ["hair"]),
    ("a man drinking a glass of water", []),
    ("the hatter, hairy and hairless", []),  # whole words only: no "hat" or "hair" inside other words
    ("earrings and a necklace", ["earring", "necklace"]),
    ("two ear rings", ["earring"]),  # multi-word trigger with plural; not "ear"
    ("big ears", ["ear"]),
    ("a red-haired, blue-eyed woman", ["hair", "eye"]),
    ("a man with eye glasses", ["glasses"]),  # "eye" modifies "glasses"
    ("cat-eye sunglasses", ["glasses"]),
    ("a man in a t-shirt and two hats", ["cloth", "hat"]),
    ("red lips and red lipstick", ["mouth"]),
    ("a portrait photo, studio lighting", []),
    ("", []),
]


@pytest.mark.parametrize("prompt, expected", MATCH_CASES)
def test_find_attributes(prompt, expected):
    assert find_attributes(prompt) == expected


def test_find_reports_spans():
    prompt = "A man with Eye Glasses, red HAIR and earrings."
    matches = DEFAULT_VOCABULARY.find(prompt)
    assert [m.attribute for m in matches] == ["glasses", "hair", "earring"]
    for m in matches:
        assert prompt[m.start:m.end] == m.text
    assert [m.text for m in matches] == ["Glasses", "HAIR", "earrings"]


def test_repeated_attribute_listed_once():
    assert find_attributes("hair, hair and more hair, then eyes") == ["hair", "eye"]


def test_user_extended_vocabulary():
    vocab = DEFAULT_VOCABULARY.extend({"beard": ["beard", "moustache", "mustache"], "eye": ["eyelash"]},
                                      modifiers=["bushy"])
    assert find_attributes("a man with a moustache and long eyelashes", vocab) == ["beard", "eye"]
    assert "beard" in vocab and "beard" not in DEFAULT_VOCABULARY
    assert find_attributes("long eyelashes", DEFAULT_VOCABULARY) == []  # the default is unchanged
    assert template_prompt("a man with a bushy beard and glasses", vocabulary=vocab) == "a man"


def test_custom_vocabulary_from_mapping_and_plural_rules():
    vocab = AttributeVocabulary({"pet": ["puppy", "cat"], "scarf": ["scarf"], "box": ["box"]})
    assert find_attributes("two puppies, a cat and boxes", vocab) == ["pet", "box"]
    assert find_attributes("scarfs", vocab) == ["scarf"]
    assert find_attributes("a cat", {"animal": ["cat"]}) == ["animal"]
    assert find_attributes("a man with glasses", vocab) == []  # a custom vocabulary replaces the default


def test_vocabulary_restrict():
    vocab = DEFAULT_VOCABULARY.restrict(["hair"])
    assert vocab.attributes == ("hair",)
    assert find_attributes("red hair and glasses", vocab) == ["hair"]


def test_vocabulary_bad_input():
    with pytest.raises(ValueError, match="both 'a' and 'b'"):
        AttributeVocabulary({"a": ["word"], "b": ["Word"]})
    with pytest.raises(TypeError, match="triggers"):
        AttributeVocabulary(["hair"])
    with pytest.raises(TypeError, match="triggers"):
        AttributeVocabulary({"hair": [3]})
    with pytest.raises(ValueError, match="triggers"):
        AttributeVocabulary({"hair": []})
    with pytest.raises(TypeError, match="prompt"):
        find_attributes(None)
    with pytest.raises(TypeError, match="vocabulary"):
        find_attributes("hair", vocabulary=["hair"])
    with pytest.raises(ValueError, match="attributes"):
        DEFAULT_VOCABULARY.restrict(["wings"])


# ---------------------------------------------------------------------------------------------------------
# template prompt (APG)
# ---------------------------------------------------------------------------------------------------------

TEMPLATE_CASES = [
    ("a man with red hair and glasses", None, "a man"),
    ("a man with glasses, smiling", None, "a man, smiling"),
    ("a woman with blue eyes and a smile", None, "a woman with a smile"),
    ("a woman with a smile and blue eyes", None, "a woman with a smile"),
    ("a photo of a woman wearing a red hat, smiling", None, "a photo of a woman, smiling"),
    ("portrait of a woman, blue eyes, long blonde hair, smiling", None, "portrait of a woman, smiling"),
    ("a close-up photo of a woman with blue eyes, wearing red earrings, smiling", None,
     "a close-up photo of a woman, smiling"),
    ("a man has red hair.", None, "a man."),
    ("Red hair, a woman", None, "A woman"),
    ("a man who has short curly hair", None, "a man"),
    ("a blue-eyed, red-haired woman", None, "a woman"),
    ("a woman wearing a pair of black-rimmed glasses", None, "a woman"),
    ("a man (with glasses) in a park", None, "a man in a park"),
    ("a woman with long, curly hair", None, "a woman"),
    ("a man with shoulder-length jet-black hair", None, "a man"),
    ("a girl with cat-eye sunglasses", None, "a girl"),
    ("a man with eye glasses", None, "a man"),
    ("a man in a red hat and a blue shirt", ["hat"], "a man in a blue shirt"),
    ("a man with red hair and a blue shirt", ["hair"], "a man with a blue shirt"),
    ("a man with red hair and a blue shirt", ["cloth"], "a man with red hair"),
    ("a man with red hair and glasses", "glasses", "a man with red hair"),
    ("a woman with eyeglasses and big eyes", ["eye"], "a woman with eyeglasses"),
    ("a man with red eyes, long hair", ["hair"], "a man with red eyes"),
    ("a man with red eyes, long hair", ["eye"], "a man, long hair"),  # comma read as a clause break
    ("Eyes! Hair? GLASSES.", None, ""),
    ("a man drinking a glass of water", None, "a man drinking a glass of water"),
    ("a   man,  smiling", None, "a   man,  smiling"),  # nothing to remove: unchanged, spacing kept
    ("a  man with  glasses,  smiling", None, "a  man,  smiling"),
]


@pytest.mark.parametrize("prompt, attributes, expected", TEMPLATE_CASES)
def test_template_prompt(prompt, attributes, expected):
    assert template_prompt(prompt, attributes) == expected


def test_template_prompt_drops_exactly_the_attribute_words():
    prompt = "a smiling man with short red hair and round glasses, in a park"
    out = template_prompt(prompt, ["hair", "glasses"])
    assert out == "a smiling man, in a park"
    assert find_attributes(out) == []
    for word in ("smiling", "man", "park"):
        assert word in out


def test_template_prompt_bad_input():
    with pytest.raises(ValueError, match="attributes"):
        template_prompt("a man with wings", ["wings"])
    with pytest.raises(TypeError, match="prompt"):
        template_prompt(b"a man with glasses")


# ---------------------------------------------------------------------------------------------------------
# label tables
# ---------------------------------------------------------------------------------------------------------

def test_bisenet_labels_match_spec():
    spec = ("background skin l_brow r_brow l_eye r_eye eye_g l_ear r_ear ear_r nose mouth u_lip l_lip neck "
            "neck_l cloth hair hat").split()
    assert dict(BISENET_CELEBAMASK_LABELS) == {name: i for i, name in enumerate(spec)}


def test_bisenet_attribute_table():
    t = BISENET_ATTRIBUTE_LABELS
    assert t["hair"] == (17,) and t["eye"] == (4, 5) and t["glasses"] == (6,)
    assert t["eyebrow"] == (2, 3) and t["mouth"] == (11, 12, 13) and t["hat"] == (18,)
    assert t["earring"] == (9,) and t["necklace"] == (15,) and t["cloth"] == (16,) and t["ear"] == (7, 8)
    # every default attribute can be masked by the default parser
    assert set(DEFAULT_VOCABULARY.attributes) == set(t)


def test_attribute_label_ids_default_and_strict():
    assert attribute_label_ids(["hair", "eye"]) == (4, 5, 17)
    assert attribute_label_ids("glasses") == (6,)
    assert attribute_label_ids([]) == ()
    with pytest.raises(ValueError, match="beard"):
        attribute_label_ids(["hair", "beard"])
    assert attribute_label_ids(["hair", "beard"], strict=False) == (17,)


def test_label_table_of_another_parser():
    # a parser with the same part names in another order (the official CelebAMask-HQ order) and no hat
    names = "skin nose eye_g l_eye r_eye l_brow r_brow l_ear r_ear mouth u_lip l_lip hair ear_r neck_l neck cloth"
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(names.split())}}
    table = label_table_for(labels)
    assert table["hair"] == (13,) and table["glasses"] == (3,) and table["eye"] == (4, 5)
    assert "hat" not in table
    assert attribute_label_ids(["hair", "eye"], table) == (4, 5, 13)
    with pytest.raises(ValueError, match="hat"):
        attribute_label_ids(["hat"], table)
    # or a table written directly, with its own attribute names
    custom = {"hair": [3], "specs": (1, 2)}
    assert attribute_label_ids(["specs"], custom) == (1, 2)
    # custom part names
    assert dict(label_table_for({"bg": 0, "locks": 7}, parts={"hair": ["locks"], "eye": ["iris"]})) == {
        "hair": (7,)}


def test_label_table_bad_input():
    with pytest.raises(TypeError, match="labels"):
        label_table_for({"hair": "17"})
    with pytest.raises(TypeError, match="label_table"):
        attribute_label_ids(["hair"], [17])
    with pytest.raises(ValueError, match="label_table"):
        attribute_label_ids(["hair"], {"hair": [-1]})


# ---------------------------------------------------------------------------------------------------------
# label map -> mask
# ---------------------------------------------------------------------------------------------------------

def _label_map():
    """7 x 9 synthetic parse: background 0, skin 1, hair 17 on top, eyes 4/5, glasses 6, lips 12."""
    lm = np.zeros((7, 9), dtype=np.int64)
    lm[1:6, 1:8] = 1
    lm[0:2, 1:8] = 17
    lm[3, 2] = 4
    lm[3, 6] = 5
    lm[3, 3:6] = 6
    lm[5, 4] = 12
    return lm


def _expected_mask(lm, ids):
    out = np.zeros(lm.shape, dtype=bool)
    for y in range(lm.shape[0]):
        for x in range(lm.shape[1]):
            out[y, x] = int(lm[y, x]) in ids
    return out


def test_label_mask_and_union():
    lm = _label_map()
    t = torch.from_numpy(lm)
    m = attribute_mask(t, ["hair", "eye"])
    assert m.dtype == torch.bool and m.shape == (7, 9)
    assert np.array_equal(m.numpy(), _expected_mask(lm, {17, 4, 5}))
    assert int(m.sum()) == 14 + 2
    assert np.array_equal(label_mask(t, [6]).numpy(), _expected_mask(lm, {6}))
    # union of single-attribute masks == mask of the union
    parts = [attribute_mask(t, a) for a in ("hair", "eye", "glasses")]
    assert torch.equal(union_masks(parts), attribute_mask(t, ["hair", "eye", "glasses"]))
    # numpy label maps and int32 work too; no attributes -> empty mask
    assert torch.equal(attribute_mask(lm.astype(np.int32), ["hair", "eye"]), m)
    assert not attribute_mask(t, []).any()


def test_mask_with_a_custom_parser_table():
    lm = torch.tensor([[0, 3, 3], [1, 2, 0]])
    m = attribute_mask(lm, ["hair", "specs"], {"hair": [3], "specs": (1, 2)})
    assert m.tolist() == [[False, True, True], [True, True, False]]


def test_batched_label_map():
    lm = torch.from_numpy(np.stack([_label_map(), np.full((7, 9), 17)]))
    m = attribute_mask(lm, ["hair"])
    assert m.shape == (2, 7, 9)
    assert np.array_equal(m[0].numpy(), _expected_mask(_label_map(), {17}))
    assert m[1].all()


def test_soft_mask_weights():
    lm = _label_map()
    m = attribute_mask(torch.from_numpy(lm), ["hair", "eye", "glasses"], weights={"hair": 0.25, "glasses": 0.5})
    assert m.dtype == torch.float32
    expected = np.zeros(lm.shape, dtype=np.float32)
    for y in range(lm.shape[0]):
        for x in range(lm.shape[1]):
            expected[y, x] = {17: 0.25, 4: 1.0, 5: 1.0, 6: 0.5}.get(int(lm[y, x]), 0.0)
    assert np.array_equal(m.numpy(), expected)
    # union of a bool and a soft mask is the elementwise max
    u = union_masks([attribute_mask(torch.from_numpy(lm), "mouth"), m])
    expected[lm == 12] = 1.0
    assert np.array_equal(u.numpy(), expected)


def _dilate_reference(mask, r):
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            out[y, x] = mask[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].max()
    return out


@pytest.mark.parametrize("r", [1, 2])
def test_dilation(r):
    m = np.zeros((6, 10), dtype=bool)
    m[0, 0] = True  # corner: clipped at the border
    m[3, 6] = True
    got = dilate_mask(torch.from_numpy(m), r)
    assert got.dtype == torch.bool
    assert np.array_equal(got.numpy(), _dilate_reference(m, r))
    assert int(got.sum()) == (r + 1) ** 2 + min(2 * r + 1, 6 - 3 + r) * (2 * r + 1)
    soft = torch.from_numpy(m.astype(np.float32) * 0.5)
    assert np.array_equal(dilate_mask(soft, r).numpy(), _dilate_reference(m.astype(np.float32) * 0.5, r))
    assert torch.equal(dilate_mask(torch.from_numpy(m), 0), torch.from_numpy(m))


def _feather_reference(mask, sigma):
    r = max(1, math.ceil(3 * sigma))
    k1 = np.array([math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)])
    k2 = np.outer(k1, k1) / k1.sum() ** 2
    padded = np.pad(mask.astype(np.float64), r, mode="edge")
    out = np.zeros(mask.shape)
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            out[y, x] = (padded[y:y + 2 * r + 1, x:x + 2 * r + 1] * k2).sum()
    return out


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_feathering(sigma):
    m = np.zeros((12, 15), dtype=bool)
    m[3:9, 4:12] = True
    m[0:3, 0:2] = True  # touches the border
    got = feather_mask(torch.from_numpy(m), sigma)
    assert got.dtype == torch.float32 and got.shape == m.shape
    np.testing.assert_allclose(got.numpy(), _feather_reference(m, sigma), atol=1e-6)
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0 + 1e-6
    assert torch.equal(feather_mask(torch.from_numpy(m), 0), torch.from_numpy(m).float())


def test_attribute_mask_dilate_then_feather():
    lm = torch.zeros(9, 9, dtype=torch.int64)
    lm[4, 4] = 6  # glasses
    d = attribute_mask(lm, ["glasses"], dilate=1)
    assert d.dtype == torch.bool and int(d.sum()) == 9 and d[3:6, 3:6].all()
    f = attribute_mask(lm, ["glasses"], dilate=1, feather=1.0)
    np.testing.assert_allclose(f.numpy(), _feather_reference(d.numpy(), 1.0), atol=1e-6)
    assert torch.allclose(f, f.T) and torch.allclose(f, f.flip(0))  # symmetric blob


def test_mask_from_prompt():
    lm = torch.from_numpy(_label_map())
    assert torch.equal(mask_from_prompt(lm, "a man with red hair and eyeglasses"),
                       attribute_mask(lm, ["hair", "glasses"]))
    assert not mask_from_prompt(lm, "a man in a park").any()
    vocab = DEFAULT_VOCABULARY.extend({"beard": ["beard"]})
    with pytest.raises(ValueError, match="beard"):
        mask_from_prompt(lm, "a man with a beard", vocabulary=vocab)
    assert not mask_from_prompt(lm, "a man with a beard", vocabulary=vocab, strict=False).any()


# ---------------------------------------------------------------------------------------------------------
# resize (non-square)
# ---------------------------------------------------------------------------------------------------------

def _nearest_reference(mask, h, w):
    H, W = mask.shape
    rows = [i * H // h for i in range(h)]  # the nearest rule of freecure_ops.masks.resize_mask_to_grid
    cols = [j * W // w for j in range(w)]
    return mask[np.ix_(rows, cols)]


@pytest.mark.parametrize("size", [(3, 5), (4, 2), (12, 7), (16, 24), (6, 10)])
def test_resize_nearest_non_square(size):
    rng = np.random.default_rng(0)
    m = rng.random((6, 10)) > 0.5
    got = resize_mask(torch.from_numpy(m), size)
    assert got.dtype == torch.bool and got.shape == size
    assert np.array_equal(got.numpy(), _nearest_reference(m, *size))
    soft = torch.from_numpy(rng.random((2, 6, 10)).astype(np.float32))
    got_soft = resize_mask(soft, size)
    assert got_soft.shape == (2, *size)
    for b in range(2):
        assert np.array_equal(got_soft[b].numpy(), _nearest_reference(soft[b].numpy(), *size))


def test_resize_area_non_square():
    m = torch.zeros(4, 6, dtype=torch.bool)
    m[0, 0] = m[0, 1] = m[1, 0] = True  # 3 of the top-left 2x2 block
    m[2:4, 4:6] = True
    got = resize_mask(m, (2, 3), mode="area")
    assert got.dtype == torch.float32
    assert got.tolist() == [[0.75, 0.0, 0.0], [0.0, 0.0, 1.0]]


# ---------------------------------------------------------------------------------------------------------
# bad input names the argument
# ---------------------------------------------------------------------------------------------------------

def test_mask_bad_input():
    lm = torch.from_numpy(_label_map())
    with pytest.raises(TypeError, match="label_map"):
        attribute_mask(lm.float(), ["hair"])
    with pytest.raises(TypeError, match="label_map"):
        attribute_mask([[1, 2]], ["hair"])
    with pytest.raises(ValueError, match="label_map"):
        attribute_mask(lm.flatten(), ["hair"])
    with pytest.raises(ValueError, match="weights"):
        attribute_mask(lm, ["hair"], weights={"hair": 1.5})
    with pytest.raises(ValueError, match="radius"):
        dilate_mask(lm == 17, -1)
    with pytest.raises(TypeError, match="radius"):
        dilate_mask(lm == 17, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        feather_mask(lm == 17, -1.0)
    with pytest.raises(TypeError, match="mask"):
        feather_mask(lm, 1.0)
    with pytest.raises(ValueError, match="masks"):
        union_masks([lm == 17, (lm == 17)[:3]])
    with pytest.raises(ValueError, match="masks"):
        union_masks([])
    with pytest.raises(TypeError, match="size"):
        resize_mask(lm == 17, 4)
    with pytest.raises(ValueError, match="size"):
        resize_mask(lm == 17, (0, 4))
    with pytest.raises(ValueError, match="mode"):
        resize_mask(lm == 17, (2, 4), mode="cubic")
    with pytest.raises(ValueError, match="dilate"):
        attribute_mask(lm, ["hair"], dilate=-2)
    with pytest.raises(ValueError, match="feather"):
        attribute_mask(lm, ["hair"], feather=float("nan"))
    with pytest.raises(TypeError, match="strict"):
        attribute_mask(lm, ["hair"], strict="yes")
