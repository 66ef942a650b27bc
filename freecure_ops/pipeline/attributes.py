"""Attribute masks for FASA and template prompts for APG.

The chain is ``prompt -> attributes -> label ids (per parser) -> mask``:

* :class:`AttributeVocabulary` maps attribute names (``"hair"``, ``"eye"``, ``"glasses"``, ...) to trigger
  words and finds them in a prompt by whole-word matching (case and punctuation insensitive; regular plurals
  of a trigger match it; "eyeglasses", "eyebrows" or "eyelashes" never match "eye"). Users extend it.
* A *label table* maps attribute names to the class ids of one particular face parser.
  :data:`BISENET_ATTRIBUTE_LABELS` is the table of the BiSeNet CelebAMask-HQ checkpoint (SPEC.md); another
  parser brings its own table, or its own name -> id label dict via :func:`label_table_for`.
* :func:`attribute_mask` turns a label map (``[H, W]`` or ``[B, H, W]`` integer ids, the output of any face
  parser callable) into a binary or soft mask: the union over attributes, optional per-attribute weights,
  dilation (max-pool) and feathering (Gaussian blur).
* :func:`template_prompt` removes the attribute phrases from a prompt (the APG template prompt).

Matching rules (:meth:`AttributeVocabulary.find`)
--------------------------------------------------
A prompt is split into words (letters/digits, with inner apostrophes and hyphens) and punctuation. A word
matches a trigger when, lower-cased and without a possessive ``'s``, it equals the trigger or a regular
plural of it (``+s``, ``+es``, ``y -> ies``). Plurals are generated from triggers, never stripped from
words, so "glass" does not match "glasses" and "eyes" matches "eye". Triggers may be several words
("ear ring"); the longest match wins. A hyphenated word matches as a whole, else by its last part
("eye-glasses" -> glasses, "red-haired" -> hair via "haired", "t-shirt" -> cloth). A trigger word directly
followed by another trigger is a noun modifier, not a match of its own ("eye glasses", "cat-eye
sunglasses" are glasses only).

Template prompt rule (:func:`template_prompt`)
----------------------------------------------
For each occurrence of a removed attribute, its *phrase* is removed: the trigger, the run of pre-modifiers
directly before it (colour, shade, length, texture and shape words of the vocabulary's ``modifiers``, hyphen
compounds such as "jet-black" or "shoulder-length", other trigger words, commas between such modifiers),
then an optional "pair(s) of", then an optional determiner ("a", "the", "her", "two", ...) unless the
trigger is an adjective form ending in "-ed" ("a red-haired woman" -> "a woman"). Then the remaining
words are tidied, repeatedly until nothing changes:

* a separator group (commas and/or "and", "or", "&") at the start or end of the prompt or of a clause
  (next to ``. ; : ! ?``, brackets), or right after a determiner, is dropped; groups that became adjacent
  merge into one (keeping its last conjunction, with a comma before it if there was one);
* a linker word (``with, wearing, has, having, in, who, that, ...``) followed by nothing, by a clause end or
  by a comma is dropped ("a man with glasses, smiling" -> "a man, smiling");
* a conjunction directly after a linker is dropped, an empty conjunct ("a woman with blue eyes and a
  smile" -> "a woman with a smile");
* sentence punctuation left at the start or doubled, and brackets left empty, are dropped.

So "a man with red hair and glasses" -> "a man"; "a photo of a woman wearing a red hat, smiling" -> "a
photo of a woman, smiling". Text that is not removed keeps its spelling and spacing (a removed first word
passes its capital on); a prompt with nothing to remove comes back unchanged.

Limits: post-modifiers are not recognised ("hair in a bun" loses only "hair"; "a man whose hair is red"
-> "a man whose is red"; "a man with his eyes closed" -> "a man with closed"), nor are coordinations
that a linker shares with a non-attribute ("a man with red hair and a woman" -> "a man with a woman"),
nor participles after the phrase ("a man with a hat smiling" -> "a man with smiling"): write such prompts
with pre-modifiers and commas, or pass an explicit template prompt.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

from .face_parser import BISENET_CELEBAMASK_LABELS
from freecure_ops.masks import resize_mask_to_grid

__all__ = [
    "DEFAULT_ATTRIBUTE_TRIGGERS",
    "DEFAULT_MODIFIERS",
    "DEFAULT_LINKERS",
    "DEFAULT_ATTRIBUTE_PARTS",
    "BISENET_ATTRIBUTE_LABELS",
    "AttributeMatch",
    "AttributeVocabulary",
    "DEFAULT_VOCABULARY",
    "find_attributes",
    "template_prompt",
    "label_table_for",
    "attribute_label_ids",
    "label_mask",
    "attribute_mask",
    "mask_from_prompt",
    "union_masks",
    "dilate_mask",
    "feather_mask",
    "resize_mask",
]

# ----------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------

#: attribute -> trigger words (singular; regular plurals are matched automatically).
DEFAULT_ATTRIBUTE_TRIGGERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "hair": ("hair", "haired", "hairstyle", "hairdo", "haircut", "ponytail", "pigtail", "braid", "bangs",
             "fringe", "dreadlock", "afro", "mohawk", "curls"),
    "eye": ("eye", "eyed", "iris"),
    "glasses": ("glasses", "eyeglasses", "sunglasses", "spectacles", "goggles", "monocle",
                "bespectacled"),
    "eyebrow": ("eyebrow", "brow"),
    "ear": ("ear",),
    "earring": ("earring", "ear ring", "ear stud"),
    "nose": ("nose",),
    "mouth": ("mouth", "lip", "lipstick", "teeth", "tooth"),
    "skin": ("skin", "complexion", "freckle"),
    "neck": ("neck",),
    "necklace": ("necklace", "choker", "pendant"),
    "hat": ("hat", "cap", "beanie", "beret", "fedora", "helmet", "headscarf", "turban", "bonnet", "crown",
            "tiara", "headband", "hood"),
    "cloth": ("shirt", "t-shirt", "tshirt", "blouse", "dress", "jacket", "coat", "suit", "sweater",
              "hoodie", "jumper", "cardigan", "vest", "tank top", "crop top", "uniform", "outfit", "clothes",
              "clothing", "robe", "gown", "tuxedo", "blazer", "kimono"),
})

_COLOURS = (
    "red black white blue green brown gray grey yellow orange purple violet pink silver gold golden blonde "
    "blond brunette auburn ginger copper platinum strawberry chestnut turquoise teal cyan magenta hazel amber "
    "crimson scarlet navy beige maroon lavender lilac rainbow multicolored multicoloured colorful colourful "
    "pastel neon dyed bleached ombre highlighted emerald sapphire ruby jet ash honey caramel chocolate "
    "reddish bluish blueish greenish brownish greyish grayish yellowish pinkish purplish whitish blackish "
    "fiery icy snowy olive tan"
)
_SHADES = "light dark bright pale deep vivid vibrant dull shiny glossy matte faded sparkling glowing"
_SHAPES = (
    "long short medium cropped buzzed shaved bald curly wavy straight frizzy messy tousled slicked spiky "
    "braided permed sleek silky fluffy voluminous thick thin big large small tiny huge round square oval "
    "rectangular almond narrow wide oversized rimless tinted mirrored polarized reflective aviator retro "
    "vintage classic fancy elegant stylish cool modern reading heavy delicate dangling hoop stud pearl "
    "diamond beaded leather wool woolen woollen knitted straw cowboy baseball bucket top floppy pointed "
    "wide-brimmed sharp bushy arched full plump glossy sparkly smoky piercing expressive striking "
    "beautiful pretty gorgeous lovely nice cute"
)
#: words removed together with an attribute noun directly after them (see :func:`template_prompt`).
DEFAULT_MODIFIERS: frozenset[str] = frozenset((_COLOURS + " " + _SHADES + " " + _SHAPES).split()) | {
    "salt-and-pepper"}
#: last parts of hyphen compounds that make them modifiers ("shoulder-length", "black-rimmed").
_MODIFIER_HEADS = frozenset(
    "length colored coloured rimmed framed brimmed toned tinted dyed styled shaped sized lensed".split())
#: words that introduce attribute phrases; dropped when left introducing nothing.
DEFAULT_LINKERS: frozenset[str] = frozenset(
    "with wearing wears wear worn has have having had sporting sports featuring showing in who that".split())
_DETERMINERS = frozenset(
    "a an the his her their its my your our some one two three four several this that these those".split())
_CONJUNCTIONS = frozenset(("and", "or", "&", "plus", "nor"))
_COMMAS = frozenset((",",))
_HARD = frozenset(".;:!?()[]{}|")
_BRACKETS = {"(": ")", "[": "]", "{": "}"}
_SENTENCE_END = frozenset(".;:!?")

_TOKEN_RE = re.compile(r"[^\W_]+(?:['\u2019\-][^\W_]+)*|\S")


def _norm(word: str) -> str:
    w = word.lower().replace("\u2019", "'")
    if w.endswith("'s"):
        w = w[:-2]
    return w


def _plurals(word: str) -> set[str]:
    forms = {word + "s", word + "es"}
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    return forms


def _check_words(name: str, words) -> tuple[str, ...]:
    if isinstance(words, str):
        words = (words,)
    if not isinstance(words, Iterable):
        raise TypeError(f"{name} must be a string or an iterable of strings, got {type(words).__name__}")
    out = []
    for w in words:
        if not isinstance(w, str):
            raise TypeError(f"{name} must hold strings, got {type(w).__name__}")
        w = " ".join(_norm(p) for p in _TOKEN_RE.findall(w.strip()))
        if not w:
            raise ValueError(f"{name} must not hold empty words")
        out.append(w)
    return tuple(out)


@dataclass(frozen=True)
class AttributeMatch:
    """One occurrence of an attribute's trigger: ``prompt[start:end] == text``."""

    attribute: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class _Tok:
    text: str
    start: int
    end: int
    norm: str
    is_word: bool


def _tokenize(prompt: str) -> list[_Tok]:
    toks = []
    for m in _TOKEN_RE.finditer(prompt):
        text = m.group(0)
        is_word = text[0].isalnum()
        toks.append(_Tok(text, m.start(), m.end(), _norm(text) if is_word else text, is_word))
    return toks


class AttributeVocabulary:
    """Attribute -> trigger words, plus the modifier and linker words used by :func:`template_prompt`.

    ``AttributeVocabulary()`` is the default vocabulary; ``AttributeVocabulary({"hair": ["hair"]},
    modifiers=..., linkers=...)`` a custom one. :meth:`extend` returns a copy with more attributes or more
    trigger words for existing ones. A trigger word may belong to one attribute only (ValueError otherwise).
    Instances are immutable.
    """

    def __init__(self, triggers: Mapping[str, Iterable[str]] | None = None, *,
                 modifiers: Iterable[str] | None = None, linkers: Iterable[str] | None = None):
        if triggers is None:
            triggers = DEFAULT_ATTRIBUTE_TRIGGERS
        if not isinstance(triggers, Mapping):
            raise TypeError(f"triggers must be a mapping of attribute name -> trigger words, "
                            f"got {type(triggers).__name__}")
        table: dict[str, tuple[str, ...]] = {}
        for attr, words in triggers.items():
            if not isinstance(attr, str) or not attr.strip():
                raise TypeError(f"triggers: attribute names must be non-empty strings, got {attr!r}")
            table[attr] = tuple(dict.fromkeys(_check_words(f"triggers[{attr!r}]", words)))
            if not table[attr]:
                raise ValueError(f"triggers[{attr!r}] must hold at least one word")
        self._triggers = MappingProxyType(table)
        self._modifiers = frozenset(_check_words("modifiers", DEFAULT_MODIFIERS if modifiers is None
                                                 else modifiers))
        self._linkers = frozenset(_check_words("linkers", DEFAULT_LINKERS if linkers is None else linkers))
        # index: tuple of words -> attribute. Explicit triggers first (clashes are errors), plurals after.
        index: dict[tuple[str, ...], str] = {}
        for attr, words in table.items():
            for w in words:
                key = tuple(w.split(" "))
                if key in index and index[key] != attr:
                    raise ValueError(f"triggers: the word {w!r} is given for both {index[key]!r} and {attr!r}")
                index[key] = attr
        for attr, words in table.items():
            for w in words:
                key = tuple(w.split(" "))
                for plural in _plurals(key[-1]):
                    index.setdefault(key[:-1] + (plural,), attr)
        self._index = index
        self._max_len = max((len(k) for k in index), default=1)

    # -- views -------------------------------------------------------------------------------------------
    @property
    def triggers(self) -> Mapping[str, tuple[str, ...]]:
        return self._triggers

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self._triggers)

    @property
    def modifiers(self) -> frozenset[str]:
        return self._modifiers

    @property
    def linkers(self) -> frozenset[str]:
        return self._linkers

    def __contains__(self, attribute) -> bool:
        return attribute in self._triggers

    def __repr__(self) -> str:
        return f"AttributeVocabulary({dict(self._triggers)!r})"

    def extend(self, triggers: Mapping[str, Iterable[str]] | None = None, *,
               modifiers: Iterable[str] = (), linkers: Iterable[str] = ()) -> AttributeVocabulary:
        """A copy with ``triggers`` added (new attributes, or more words for existing ones) and more
        modifier / linker words."""
        if triggers is None:
            triggers = {}
        if not isinstance(triggers, Mapping):
            raise TypeError(f"triggers must be a mapping of attribute name -> trigger words, "
                            f"got {type(triggers).__name__}")
        merged = {a: list(ws) for a, ws in self._triggers.items()}
        for attr, words in triggers.items():
            merged.setdefault(attr, []).extend(_check_words(f"triggers[{attr!r}]", words))
        return AttributeVocabulary(merged, modifiers=self._modifiers | set(_check_words("modifiers", modifiers)),
                                   linkers=self._linkers | set(_check_words("linkers", linkers)))

    def restrict(self, attributes: Iterable[str]) -> AttributeVocabulary:
        """A copy that knows only ``attributes``."""
        attributes = self._check_attributes("attributes", attributes)
        return AttributeVocabulary({a: self._triggers[a] for a in attributes}, modifiers=self._modifiers,
                                   linkers=self._linkers)

    def _check_attributes(self, name: str, attributes) -> tuple[str, ...]:
        if isinstance(attributes, str):
            attributes = (attributes,)
        if not isinstance(attributes, Iterable):
            raise TypeError(f"{name} must be an attribute name or an iterable of names, "
                            f"got {type(attributes).__name__}")
        attributes = tuple(attributes)
        unknown = [a for a in attributes if a not in self._triggers]
        if unknown:
            raise ValueError(f"{name}: unknown attribute(s) {unknown}; this vocabulary knows "
                             f"{list(self._triggers)} (add words with AttributeVocabulary.extend)")
        return attributes

    # -- matching ----------------------------------------------------------------------------------------
    def _match_at(self, toks: list[_Tok], i: int) -> tuple[str, int] | None:
        """(attribute, number of tokens) of the longest trigger starting at token i, if any."""
        if not toks[i].is_word:
            return None
        for length in range(min(self._max_len, len(toks) - i), 0, -1):
            window = toks[i:i + length]
            if not all(t.is_word for t in window):
                continue
            key = tuple(t.norm for t in window)
            if key in self._index:
                return self._index[key], length
        word = toks[i].norm
        if "-" in word:  # a hyphen compound matches by its last part ("eye-glasses", "red-haired")
            head = (word.rsplit("-", 1)[1],)
            if head in self._index:
                return self._index[head], 1
        return None

    def _is_modifier(self, tok: _Tok) -> bool:
        if not tok.is_word:
            return False
        w = tok.norm
        if w in self._modifiers or (w,) in self._index:
            return True
        if "-" in w:
            parts = w.split("-")
            return (parts[-1] in self._modifiers or parts[-1] in _MODIFIER_HEADS or (parts[-1],) in self._index
                    or all(p in self._modifiers for p in parts))
        return False

    def _find(self, toks: list[_Tok]) -> list[tuple[str, int, int]]:
        """(attribute, first token, end token) of each occurrence, in order."""
        found = []
        i = 0
        while i < len(toks):
            hit = self._match_at(toks, i)
            if hit is None:
                i += 1
                continue
            attr, length = hit
            j = i + length
            # a trigger directly followed by another trigger is a noun modifier ("eye glasses")
            if j < len(toks) and self._match_at(toks, j) is not None:
                i = j
                continue
            found.append((attr, i, j))
            i = j
        return found

    def find(self, prompt: str) -> list[AttributeMatch]:
        """Every occurrence of a trigger in ``prompt``, in order."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        toks = _tokenize(prompt)
        return [AttributeMatch(a, toks[i].start, toks[j - 1].end, prompt[toks[i].start:toks[j - 1].end])
                for a, i, j in self._find(toks)]

    def attributes_in(self, prompt: str) -> list[str]:
        """The attributes named in ``prompt``, each once, in order of first appearance."""
        return list(dict.fromkeys(m.attribute for m in self.find(prompt)))


DEFAULT_VOCABULARY = AttributeVocabulary()


def _vocab(vocabulary) -> AttributeVocabulary:
    if vocabulary is None:
        return DEFAULT_VOCABULARY
    if isinstance(vocabulary, AttributeVocabulary):
        return vocabulary
    if isinstance(vocabulary, Mapping):
        return AttributeVocabulary(vocabulary)
    raise TypeError(f"vocabulary must be an AttributeVocabulary, a mapping of attribute -> trigger words, or "
                    f"None, got {type(vocabulary).__name__}")


def find_attributes(prompt: str, vocabulary: AttributeVocabulary | Mapping | None = None) -> list[str]:
    """The attributes named in ``prompt`` (each once, in order of first appearance)."""
    return _vocab(vocabulary).attributes_in(prompt)


# ----------------------------------------------------------------------------------------------------------
# Template prompt (APG)
# ----------------------------------------------------------------------------------------------------------

def _phrase_start(vocab: AttributeVocabulary, toks: list[_Tok], i: int, removed: list[bool]) -> int:
    """First token of the attribute phrase whose trigger starts at token i."""
    j = i
    while j > 0:
        prev = toks[j - 1]
        if removed[j - 1]:
            break
        if vocab._is_modifier(prev):
            j -= 1
        elif (prev.text == "," and j >= 2 and j < i and vocab._is_modifier(toks[j - 2])
              and (toks[j - 2].norm,) not in vocab._index):
            j -= 1  # "long, curly hair": a comma between modifiers (not after another attribute's noun)
        else:
            break
    if j >= 2 and toks[j - 1].norm == "of" and toks[j - 2].norm in ("pair", "pairs"):
        j -= 2
    # a determiner goes with a noun phrase, not with an adjective form ("a red-haired woman" keeps "a")
    if j >= 1 and toks[j - 1].norm in _DETERMINERS and not removed[j - 1] and not toks[i].norm.endswith("ed"):
        j -= 1
    return j


def _kind(vocab: AttributeVocabulary, tok: _Tok) -> str:
    if tok.text in _COMMAS:
        return "comma"
    if tok.norm in _CONJUNCTIONS:
        return "conj"
    if tok.text in _HARD:
        return "hard"
    if tok.is_word and tok.norm in vocab.linkers:
        return "linker"
    if tok.is_word and tok.norm in _DETERMINERS:
        return "det"
    return "word"


def _tidy(vocab: AttributeVocabulary, toks: list[_Tok]) -> list[_Tok]:
    toks = list(toks)
    changed = True
    while changed:
        changed = False
        kinds = [_kind(vocab, t) for t in toks]
        n = len(toks)
        i = 0
        while i < n:
            k = kinds[i]
            if k in ("comma", "conj"):
                j = i
                while j < n and kinds[j] in ("comma", "conj"):
                    j += 1
                group = kinds[i:j]
                before = kinds[i - 1] if i > 0 else "hard"
                after = kinds[j] if j < n else "hard"
                if before in ("hard", "det") or after == "hard":
                    del toks[i:j]
                    changed = True
                    break
                if before == "linker" and "conj" in group:  # an empty conjunct: "with [] and a smile"
                    last_conj = max(n_ for n_, g in enumerate(group) if g == "conj")
                    del toks[i:i + last_conj + 1]
                    changed = True
                    break
                if j - i > 1:  # merge: keep the last conjunction (with a comma before it if there was one)
                    if "conj" in group:
                        last = i + max(n_ for n_, g in enumerate(group) if g == "conj")
                        keep = [toks[last]]
                        if "comma" in kinds[i:last]:
                            keep.insert(0, toks[i + kinds[i:last].index("comma")])
                    else:
                        keep = [toks[i]]
                    if len(keep) < j - i:
                        toks[i:j] = keep
                        changed = True
                        break
                i = j
                continue
            if k == "hard" and toks[i].text in _SENTENCE_END and (i == 0 or toks[i - 1].text in _SENTENCE_END):
                del toks[i]  # sentence punctuation left at the start or doubled
                changed = True
                break
            if k == "linker":
                after = kinds[i + 1] if i + 1 < n else "hard"
                if after in ("hard", "comma"):
                    del toks[i]
                    changed = True
                    break
            if toks[i].text in _BRACKETS and i + 1 < n and toks[i + 1].text == _BRACKETS[toks[i].text]:
                del toks[i:i + 2]  # brackets left empty
                changed = True
                break
            i += 1
    return toks


def template_prompt(prompt: str, attributes: Iterable[str] | str | None = None,
                    vocabulary: AttributeVocabulary | Mapping | None = None) -> str:
    """``prompt`` without the phrases of ``attributes`` (all attributes found when None): the APG template
    prompt. The rule is in this module's docstring; e.g. "a man with red hair and glasses" -> "a man"."""
    vocab = _vocab(vocabulary)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    wanted = set(vocab.attributes if attributes is None else vocab._check_attributes("attributes", attributes))
    toks = _tokenize(prompt)
    removed = [False] * len(toks)
    for attr, i, j in vocab._find(toks):
        if attr not in wanted:
            continue
        for t in range(_phrase_start(vocab, toks, i, removed), j):
            removed[t] = True
    if not any(removed):
        return prompt
    kept_idx = [t for t in range(len(toks)) if not removed[t]]
    kept = _tidy(vocab, [toks[t] for t in kept_idx])
    # rebuild from the original text: each kept token keeps the whitespace that preceded it
    out = []
    for n_, tok in enumerate(kept):
        if n_ > 0:
            prev = kept[n_ - 1]
            gap = prompt[prev.end:tok.start]
            if prev.end == tok.start or gap.isspace():
                out.append(gap)
            else:
                lead = re.match(r"\s*", prompt[:tok.start][::-1]).group(0)[::-1]
                out.append(lead if lead or not (prev.is_word and tok.is_word) else " ")
        out.append(tok.text)
    result = "".join(out).strip()
    if result and toks and kept and kept[0] is not toks[0] and toks[0].text[:1].isupper():
        result = result[0].upper() + result[1:]
    return result


# ----------------------------------------------------------------------------------------------------------
# Label tables
# ----------------------------------------------------------------------------------------------------------

#: attribute -> CelebAMask-HQ part names; resolved to ids through a parser's name -> id labels.
DEFAULT_ATTRIBUTE_PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "hair": ("hair",),
    "eye": ("l_eye", "r_eye"),
    "glasses": ("eye_g",),
    "eyebrow": ("l_brow", "r_brow"),
    "ear": ("l_ear", "r_ear"),
    "earring": ("ear_r",),
    "nose": ("nose",),
    "mouth": ("mouth", "u_lip", "l_lip"),
    "skin": ("skin",),
    "neck": ("neck",),
    "necklace": ("neck_l",),
    "hat": ("hat",),
    "cloth": ("cloth",),
})


def label_table_for(labels: Mapping[str, int],
                    parts: Mapping[str, Iterable[str]] | None = None) -> Mapping[str, tuple[int, ...]]:
    """The label table (attribute -> class ids) of a parser whose classes are ``labels`` (name -> id), with
    ``parts`` (attribute -> part names, default :data:`DEFAULT_ATTRIBUTE_PARTS`). Attributes whose parts
    the parser lacks are left out; a parser with CelebAMask-HQ part names in another order needs only its
    ``labels``."""
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, int)
                                                  and not isinstance(v, bool) for k, v in labels.items()):
        raise TypeError("labels must be a mapping of part name (str) -> class id (int)")
    parts = DEFAULT_ATTRIBUTE_PARTS if parts is None else parts
    if not isinstance(parts, Mapping):
        raise TypeError(f"parts must be a mapping of attribute -> part names, got {type(parts).__name__}")
    table = {}
    for attr, names in parts.items():
        names = (names,) if isinstance(names, str) else tuple(names)
        if names and all(n in labels for n in names):
            table[attr] = tuple(sorted({labels[n] for n in names}))
    return MappingProxyType(table)


#: attribute -> class ids of the BiSeNet CelebAMask-HQ checkpoint (hair 17, eye 4 5, glasses 6, ...).
BISENET_ATTRIBUTE_LABELS: Mapping[str, tuple[int, ...]] = label_table_for(BISENET_CELEBAMASK_LABELS)


def _check_table(label_table) -> Mapping[str, tuple[int, ...]]:
    if label_table is None:
        return BISENET_ATTRIBUTE_LABELS
    if not isinstance(label_table, Mapping):
        raise TypeError(f"label_table must be a mapping of attribute -> class ids, got "
                        f"{type(label_table).__name__}")
    return label_table


def attribute_label_ids(attributes: Iterable[str] | str, label_table: Mapping[str, Iterable[int]] | None = None,
                        *, strict: bool = True) -> tuple[int, ...]:
    """Sorted class ids of the union of ``attributes`` in ``label_table`` (default: BiSeNet CelebAMask-HQ).
    An attribute the table lacks raises ValueError, or is skipped when ``strict=False``."""
    return tuple(sorted({i for ids in _ids_per_attribute(attributes, label_table, strict).values() for i in ids}))


def _ids_per_attribute(attributes, label_table, strict) -> dict[str, tuple[int, ...]]:
    table = _check_table(label_table)
    if isinstance(attributes, str):
        attributes = (attributes,)
    if not isinstance(attributes, Iterable):
        raise TypeError(f"attributes must be an attribute name or an iterable of names, "
                        f"got {type(attributes).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    out = {}
    for a in attributes:
        if not isinstance(a, str):
            raise TypeError(f"attributes must hold strings, got {type(a).__name__}")
        if a not in table:
            if strict:
                raise ValueError(f"attributes: {a!r} is not in the parser's label table (which has "
                                 f"{sorted(table)}); add it to the table or pass strict=False to skip it")
            continue
        ids = table[a]
        ids = (ids,) if isinstance(ids, int) else tuple(ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"label_table[{a!r}] must hold non-negative int class ids, got {ids!r}")
        out[a] = ids
    return out


# ----------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------

def _check_label_map(label_map) -> torch.Tensor:
    if isinstance(label_map, np.ndarray):
        if not np.issubdtype(label_map.dtype, np.integer):
            raise TypeError(f"label_map must hold integer class ids, got numpy dtype {label_map.dtype}")
        label_map = torch.from_numpy(label_map.astype(np.int64))
    if not isinstance(label_map, torch.Tensor):
        raise TypeError(f"label_map must be a torch.Tensor or numpy array of class ids, "
                        f"got {type(label_map).__name__}")
    if label_map.dtype.is_floating_point or label_map.dtype.is_complex or label_map.dtype == torch.bool:
        raise TypeError(f"label_map must hold integer class ids, got {label_map.dtype}")
    if label_map.dim() not in (2, 3):
        raise ValueError(f"label_map must have shape [H, W] or [B, H, W], got {tuple(label_map.shape)}")
    return label_map


def _check_mask(name: str, mask) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    if mask.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [H, W] or [B, H, W], got {tuple(mask.shape)}")
    return mask


def label_mask(label_map, label_ids: Iterable[int]) -> torch.Tensor:
    """Bool mask of the pixels whose class is in ``label_ids`` (same shape and device as ``label_map``)."""
    label_map = _check_label_map(label_map)
    if isinstance(label_ids, int):
        label_ids = (label_ids,)
    ids = list(label_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"label_ids must hold ints, got {ids!r}")
    if not ids:
        return torch.zeros_like(label_map, dtype=torch.bool)
    return torch.isin(label_map, torch.tensor(ids, dtype=label_map.dtype, device=label_map.device))


def union_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Union of masks of one shape: logical or when all are bool, else the elementwise max (as float)."""
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence) or len(masks) == 0:
        raise ValueError("masks must be a non-empty sequence of mask tensors")
    masks = [_check_mask(f"masks[{i}]", m) for i, m in enumerate(masks)]
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1:
        raise ValueError(f"masks must all have one shape, got {sorted(shapes)}")
    if all(m.dtype == torch.bool for m in masks):
        out = masks[0].clone()
        for m in masks[1:]:
            out |= m.to(out.device)
        return out
    dtype = next(m.dtype for m in masks if m.dtype.is_floating_point)
    out = masks[0].to(dtype).clone()
    for m in masks[1:]:
        out = torch.maximum(out, m.to(device=out.device, dtype=dtype))
    return out


def _as_nchw(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (mask[None, None] if mask.dim() == 2 else mask[:, None]), mask.dim() == 2


def _from_nchw(x: torch.Tensor, was_2d: bool) -> torch.Tensor:
    return x[0, 0] if was_2d else x[:, 0]


def dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate by ``radius`` pixels with a square (2r+1)x(2r+1) window (max-pool; greyscale dilation for a
    float mask). Same dtype and shape; ``radius=0`` returns a copy."""
    mask = _check_mask("mask", mask)
    if isinstance(radius, bool) or not isinstance(radius, int):
        raise TypeError(f"radius must be an int, got {type(radius).__name__}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0:
        return mask.clone()
    x, was_2d = _as_nchw(mask)
    xf = x.float() if mask.dtype == torch.bool else x
    y = F.max_pool2d(xf, kernel_size=2 * radius + 1, stride=1, padding=radius)
    y = _from_nchw(y, was_2d)
    return y > 0.5 if mask.dtype == torch.bool else y


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def feather_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soften edges with a separable Gaussian blur of std ``sigma`` pixels (kernel radius ceil(3 sigma),
    normalized, edge pixels replicated beyond the border). Returns a float mask (float32 for a bool input)
    with values in [0, 1] for inputs in [0, 1]; ``sigma=0`` only converts."""
    mask = _check_mask("mask", mask)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
        raise TypeError(f"sigma must be a finite real number, got {sigma!r}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    dtype = torch.float32 if mask.dtype == torch.bool else mask.dtype
    x, was_2d = _as_nchw(mask.to(dtype))
    if sigma == 0:
        return _from_nchw(x, was_2d).clone()
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    k = _gaussian_kernel(float(sigma), mask.device, compute)
    r = (k.numel() - 1) // 2
    y = x.to(compute)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return _from_nchw(y, was_2d).to(dtype)


_RESIZE_MODES = ("nearest", "area", "bilinear")


def resize_mask(mask: torch.Tensor, size, mode: str = "nearest") -> torch.Tensor:
    """Resize a mask ``[H, W]`` / ``[B, H, W]`` to ``size = (h, w)`` (need not be square).

    ``"nearest"`` (default, keeps the dtype; bool stays bool) is :func:`freecure_ops.masks.resize_mask_to_grid`
    without the flattening: output row i takes source row ``floor(i * H / h)`` (torch's and OpenCV's
    nearest rule), likewise for columns. ``"area"`` and ``"bilinear"`` give float masks (coverage fractions /
    interpolation).
    """
    mask = _check_mask("mask", mask)
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        raise TypeError(f"size must be a (height, width) pair of ints, got {size!r}")
    if min(size) < 1:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    if mode not in _RESIZE_MODES:
        raise ValueError(f"mode must be one of {_RESIZE_MODES}, got {mode!r}")
    if mode == "nearest":
        return resize_mask_to_grid(mask, int(size[0]), int(size[1])).reshape(*mask.shape[:-2], *size)
    x, was_2d = _as_nchw(mask)
    xf = x.float() if mask.dtype == torch.bool else x
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return _from_nchw(F.interpolate(xf, size=tuple(size), mode=mode, **kwargs), was_2d)


def attribute_mask(label_map, attributes: Iterable[str] | str,
                   label_table: Mapping[str, Iterable[int]] | None = None, *,
                   weights: Mapping[str, float] | None = None, dilate: int = 0, feather: float = 0.0,
                   strict: bool = True) -> torch.Tensor:
    """The mask of ``attributes`` on a parser's ``label_map`` (``[H, W]`` or ``[B, H, W]`` class ids).

    Per attribute, the pixels whose class is one of its ids in ``label_table`` (default
    :data:`BISENET_ATTRIBUTE_LABELS`); union over attributes. ``weights`` (attribute -> value in [0, 1],
    missing ones 1) makes a soft mask: each pixel gets the largest weight of the attributes covering it.
    Then ``dilate`` pixels of max-pool dilation, then Gaussian feathering of std ``feather`` pixels.
    Returns bool when there are no weights and no feathering, else float32, on the label map's device.
    """
    label_map = _check_label_map(label_map)
    per_attr = _ids_per_attribute(attributes, label_table, strict)
    if isinstance(dilate, bool) or not isinstance(dilate, int) or dilate < 0:
        raise ValueError(f"dilate must be an int >= 0 (pixels), got {dilate!r}")
    if (isinstance(feather, bool) or not isinstance(feather, (int, float)) or not math.isfinite(feather)
            or feather < 0):
        raise ValueError(f"feather must be a finite number >= 0 (Gaussian std in pixels), got {feather!r}")
    if weights is not None:
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping of attribute -> float, got {type(weights).__name__}")
        for a, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) <= 1.0:
                raise ValueError(f"weights[{a!r}] must be a number in [0, 1], got {w!r}")
        soft = torch.zeros(label_map.shape, dtype=torch.float32, device=label_map.device)
        for a, ids in per_attr.items():
            w = float(weights.get(a, 1.0))
            soft = torch.maximum(soft, label_mask(label_map, ids).float() * w)
        mask = soft
    else:
        ids = sorted({i for v in per_attr.values() for i in v})
        mask = label_mask(label_map, ids)
    if dilate:
        mask = dilate_mask(mask, dilate)
    if feather:
        mask = feather_mask(mask, feather)
    return mask


def mask_from_prompt(label_map, prompt: str, *, vocabulary: AttributeVocabulary | Mapping | None = None,
                     label_table: Mapping[str, Iterable[int]] | None = None, **mask_kwargs) -> torch.Tensor:
    """:func:`attribute_mask` of the attributes :func:`find_attributes` finds in ``prompt`` (all False/zero
    when it names none). ``mask_kwargs``: ``weights``, ``dilate``, ``feather``, ``strict``."""
    return attribute_mask(label_map, find_attributes(prompt, vocabulary), label_table, **mask_kwargs)
