"""The paper's evaluation grid as batch manifest rows (``freecure manifest`` writes them).

    freecure manifest --identity alice=woman --identity bob=man --reference alice=refs/alice.jpg \\
                      --reference bob=refs/bob.jpg --prompts 20 --out grid.jsonl

Identities x prompts x methods. The prompt set is drawn once (deterministically from ``--seed``) and used for
every identity: prompt ``i`` asks for ``counts[i % len(counts)]`` attributes (1, 2, 3 by default), distinct
attributes from the attribute vocabulary (:mod:`freecure_ops.pipeline.attributes`; ``--attributes``), each as one
phrase of :data:`PHRASES` ("red hair", "blue eyes", "glasses", ...), put into a template
(:data:`TEMPLATES`, or ``--templates FILE``: one per line with ``{subject}`` and ``{attributes}``). The PD
prompt names the subject with the identity (``--pd-subject``, default ``"sks {class}"``; ``{id}`` and
``{class}`` are filled in), the FD prompt and the scoring prompt without it (``--fd-subject``, default
``"{class}"``). Each (identity, prompt) gets one fixed seed, ``seed + identity_index * prompts + i``, shared
by its ``baseline`` and ``freecure`` jobs, so the two methods start from the same noise. Every generated
prompt is checked: the attributes found in it are exactly the ones drawn.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

__all__ = ["paper_grid", "PHRASES", "TEMPLATES"]

#: attribute -> phrases (each names exactly that attribute)
PHRASES = {
    "hair": ("red hair", "blonde hair", "black hair", "white hair", "pink hair", "blue hair", "green hair",
             "purple hair", "silver hair", "curly hair"),
    "eye": ("blue eyes", "green eyes", "brown eyes", "red eyes", "purple eyes", "amber eyes", "grey eyes"),
    "glasses": ("glasses", "sunglasses", "round glasses", "red glasses"),
    "hat": ("a red hat", "a black hat", "a straw hat", "a cowboy hat", "a baseball cap", "a beanie"),
    "earring": ("gold earrings", "pearl earrings", "silver earrings"),
    "necklace": ("a pearl necklace", "a gold necklace", "a silver necklace"),
}
TEMPLATES = (
    "a photo of a {subject} with {attributes}",
    "a portrait of a {subject} with {attributes}",
    "a close-up photo of a {subject} with {attributes}",
    "a photo of a {subject} with {attributes}, in a park",
    "a selfie of a {subject} with {attributes}",
    "a photo of a {subject} with {attributes}, looking at the camera",
)
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,99}")  # fullmatch: "$" would let "a1\n" in


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def paper_grid(identities: dict[str, str], *, prompts: int = 20, counts=(1, 2, 3), attributes=None,
               templates=TEMPLATES, pd_subject: str = "sks {class}", fd_subject: str = "{class}",
               methods=("baseline", "freecure"), seed: int = 0, references: dict | None = None,
               vocabulary=None) -> list[dict]:
    """Manifest rows (dicts) for identities (id -> class word, e.g. ``{"alice": "woman"}``); see the module
    docstring. ValueError for an impossible request (more attributes than kinds, a template without its
    fields, a prompt whose attributes are not the ones drawn)."""
    from .pipeline.attributes import find_attributes

    attributes = list(attributes or PHRASES)
    for name, items in (("attribute", attributes), ("method", list(methods))):
        twice = sorted({a for a in items if items.count(a) > 1})
        if twice:  # a repeated method would write duplicate job ids; a repeated attribute skews the draw
            raise ValueError(f"{name}(s) {twice} given twice")
    if not methods:
        raise ValueError("methods must be baseline and/or freecure, got none")
    folded = {}
    for ident in identities:  # ids name folders and are compared ignoring case, as batch does
        if ident.lower() in folded:
            raise ValueError(f"identity {ident!r} and {folded[ident.lower()]!r} differ only in case (they name "
                             "job folders)")
        folded[ident.lower()] = ident
    unknown = [a for a in attributes if a not in PHRASES]
    if unknown:
        raise ValueError(f"no phrases for attribute(s) {unknown} (known: {', '.join(PHRASES)})")
    counts = list(counts)
    if not counts or any(c < 1 or c > len(attributes) for c in counts):
        raise ValueError(f"attribute counts must be between 1 and {len(attributes)} (the attributes given), got "
                         f"{counts}")
    if prompts < 1:
        raise ValueError(f"prompts must be >= 1, got {prompts}")
    for t in templates:
        if "{subject}" not in t or "{attributes}" not in t:
            raise ValueError(f"template {t!r} must contain {{subject}} and {{attributes}}")
    for m in methods:
        if m not in ("baseline", "freecure"):
            raise ValueError(f"methods must be baseline and/or freecure, got {m!r}")
    for ident in identities:
        if not _ID_RE.fullmatch(ident):
            raise ValueError(f"identity {ident!r}: use letters, digits, '.' or '-' (it names job folders)")
    rng = random.Random(seed)
    drawn = []
    for i in range(prompts):
        k = counts[i % len(counts)]
        kinds = rng.sample(attributes, k)
        phrases = [rng.choice(PHRASES[a]) for a in kinds]
        drawn.append((templates[rng.randrange(len(templates))], kinds, _join(phrases)))
    rows = []
    for j, (ident, cls) in enumerate(identities.items()):
        fields = {"id": ident, "class": cls}
        pd_sub, fd_sub = pd_subject.format(**fields), fd_subject.format(**fields)
        for i, (template, kinds, phrase) in enumerate(drawn):
            pd = template.format(subject=pd_sub, attributes=phrase)
            fd = template.format(subject=fd_sub, attributes=phrase)
            for text in (pd, fd):
                found = find_attributes(text, vocabulary)
                if sorted(found) != sorted(kinds):
                    raise ValueError(f"prompt {text!r} names the attributes {found}, not the {kinds} drawn: change "
                                     "the template or subject so that they name no attribute themselves")
            for method in methods:
                row = dict(id=f"{ident}_p{i:02d}_{method}", identity=ident, method=method, prompt=pd, fd_prompt=fd,
                           eval_prompt=fd, seed=seed + j * prompts + i, n_attributes=len(kinds), attributes=kinds)
                if references and ident in references:
                    row["reference"] = str(Path(references[ident]).expanduser().absolute())
                rows.append(row)
    return rows
