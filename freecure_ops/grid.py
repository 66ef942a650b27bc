"""``freecure manifest``: the paper's evaluation grid as a batch manifest.

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
import string
from pathlib import Path

__all__ = ["add_arguments", "run", "paper_grid", "PHRASES", "TEMPLATES"]

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
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,99}$")


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
        if not _ID_RE.match(ident):
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
                    row["reference"] = str(Path(references[ident]).absolute())
                rows.append(row)
    return rows


def add_arguments(sub) -> None:
    from pathlib import Path as _P

    g = sub.add_parser("manifest", help="write the paper's evaluation grid as a batch manifest",
                       description="Identities x prompts (1, 2, 3 attributes from the attribute vocabulary) x "
                                   "methods (baseline, freecure), seeds fixed.")
    g.add_argument("--identity", action="append", default=[], metavar="ID=CLASS",
                   help="an identity and its class word, e.g. alice=woman (repeat)")
    g.add_argument("--identities", type=_P, help="CSV with columns id,class[,reference] (instead of / besides "
                                                 "--identity)")
    g.add_argument("--reference", action="append", default=[], metavar="ID=IMAGE",
                   help="reference image of an identity (recorded for freecure eval)")
    g.add_argument("--prompts", type=int, default=20, help="prompts per identity (the paper: 20)")
    g.add_argument("--counts", default="1,2,3", help="attributes per prompt, cycled (default 1,2,3)")
    g.add_argument("--attributes", default=",".join(PHRASES), help=f"attribute kinds (default {','.join(PHRASES)})")
    g.add_argument("--templates", type=_P, help="file with one template per line ({subject}, {attributes})")
    g.add_argument("--pd-subject", default="sks {class}", help="subject with the identity ({id}, {class})")
    g.add_argument("--fd-subject", default="{class}", help="subject without the identity ({id}, {class})")
    g.add_argument("--methods", default="baseline,freecure")
    g.add_argument("--seed", type=int, default=0, help="first seed; also draws the prompt set")
    g.add_argument("--out", required=True, type=_P, help="manifest file to write (.jsonl, or .csv)")


def _pairs(items, flag, where=None) -> dict:
    """``ID=VALUE`` items -> dict; ``where`` (id -> the flag text that gave it) is filled for messages. Ids
    are compared ignoring case: they name job folders, which batch compares that way."""
    from .cli import CLIError

    out, folded = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise CLIError(f"{flag} {item}: expected ID={'CLASS' if flag == '--identity' else 'IMAGE'}")
        if key.lower() in folded:
            first = folded[key.lower()]
            raise CLIError(f"{flag} {item}: {key!r} given twice" if first == key else
                           f"{flag} {item}: {key!r} and {first!r} differ only in case (ids name job folders)")
        out[key], folded[key.lower()] = value, key
        if where is not None:
            where[key] = f"{flag} {item}"
    return out


def _read_templates(path: Path) -> list[str]:
    """Templates from ``--templates FILE``, each checked as ``str.format`` will use it (one line naming the
    file and line: an unknown ``{foo}``, a positional ``{0}``, a lone brace)."""
    from .cli import CLIError

    if not path.is_file():
        raise CLIError(f"--templates {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--templates {path}: not readable as UTF-8 text ({e})") from None
    templates = []
    for n, t in enumerate(lines, 1):
        if not t.strip():
            continue
        where = f"--templates {path} line {n}"
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
            unknown = [f for f in fields if f not in ("subject", "attributes")]
            if unknown:
                raise CLIError(f"{where}: unknown placeholder {{{unknown[0]}}} (only {{subject}} and {{attributes}}; "
                               "write {{ and }} for literal braces)")
            t.format(subject="s", attributes="a")
        except (ValueError, AttributeError, TypeError, KeyError, IndexError) as e:
            raise CLIError(f"{where}: not a valid template ({e}; write {{{{ and }}}} for literal braces)") from None
        if "subject" not in fields or "attributes" not in fields:
            raise CLIError(f"{where}: a template needs {{subject}} and {{attributes}}")
        found = _attributes_in(t.format(subject="", attributes=""))
        if found:
            raise CLIError(f"{where}: the template itself names the attribute(s) {found}")
        templates.append(t.strip())
    if not templates:
        raise CLIError(f"--templates {path}: no templates in the file")
    return templates


def _attributes_in(text: str) -> list:
    from .pipeline.attributes import find_attributes

    return find_attributes(text)


def run(args) -> int:
    import csv

    from .cli import CLIError
    from .manifest import write_manifest
    from .outputs import output_dir_problem

    given: dict[str, str] = {}  # identity -> the flag (or file line) that named it, for messages
    identities = _pairs(args.identity, "--identity", given)
    references = _pairs(args.reference, "--reference")
    if args.identities is not None:
        if not args.identities.is_file():
            raise CLIError(f"--identities {args.identities}: no such file")
        with open(args.identities, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"id", "class"} <= set(reader.fieldnames):
                raise CLIError(f"--identities {args.identities}: line 1: the header needs the columns id and class")
            for row in reader:
                n = reader.line_num
                if not (row.get("id") or "").strip() or not (row.get("class") or "").strip():
                    raise CLIError(f"--identities {args.identities}: line {n}: missing id or class")
                clash = [i for i in identities if i.lower() == row["id"].lower()]
                if clash:
                    raise CLIError(f"--identities {args.identities}: line {n}: identity {row['id']!r} given twice"
                                   + ("" if clash[0] == row["id"] else f" (as {clash[0]!r}; ids ignore case)"))
                identities[row["id"]] = row["class"]
                given[row["id"]] = f"--identities {args.identities}: line {n}"
                if (row.get("reference") or "").strip():
                    references.setdefault(row["id"], (args.identities.parent / row["reference"]).as_posix())
    if not identities:
        raise CLIError("give at least one --identity ID=CLASS (or --identities FILE)")
    for ident, ref in references.items():
        if ident not in identities:
            raise CLIError(f"--reference {ident}={ref}: no such identity")
        if not Path(ref).expanduser().is_file():
            raise CLIError(f"--reference {ident}={ref}: no such file")
    templates = TEMPLATES if args.templates is None else _read_templates(args.templates)
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for flag, items in (("--attributes", attributes), ("--methods", methods)):
        twice = sorted({a for a in items if items.count(a) > 1})
        if twice:
            raise CLIError(f"{flag} {getattr(args, flag[2:])}: {', '.join(twice)} given twice")
        if not items:
            raise CLIError(f"{flag} {getattr(args, flag[2:])!r}: empty; give "
                           + ("baseline and/or freecure" if flag == "--methods" else "attribute kinds, e.g. hair,eye"))
    try:
        counts = [int(c) for c in args.counts.split(",") if c.strip()]
    except ValueError:
        raise CLIError(f"--counts {args.counts}: expected comma-separated integers, e.g. 1,2,3") from None
    for flag, text in (("--pd-subject", args.pd_subject), ("--fd-subject", args.fd_subject)):
        try:
            text.format(id="x", **{"class": "y"})
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            raise CLIError(f"{flag} {text}: only {{id}} and {{class}} can be filled in ({e})") from None
        found = _attributes_in(text.replace("{id}", "").replace("{class}", ""))
        if found:
            raise CLIError(f"{flag} {text}: the subject names the attribute(s) {found}; prompts must name only "
                           "the attributes drawn")
    for ident, cls in identities.items():  # a class word such as "redhead" would add an attribute to every prompt
        found = _attributes_in(f"{ident} {cls}")
        if found:
            raise CLIError(f"{given.get(ident, '--identity')}: the identity or class word names the attribute(s) "
                           f"{found}; prompts must name only the attributes drawn")
    problem = output_dir_problem(args.out.parent if str(args.out.parent) else Path("."))
    if problem or args.out.is_dir():
        raise CLIError(f"--out {args.out}: {problem or 'is a folder; give a file name (.jsonl or .csv)'}")
    try:
        rows = paper_grid(identities, prompts=args.prompts, counts=counts,
                          attributes=attributes, templates=templates, pd_subject=args.pd_subject,
                          fd_subject=args.fd_subject, methods=methods, seed=args.seed,
                          references=references)
    except ValueError as e:
        msg = str(e)
        flag = ("--counts" if "counts" in msg else "--attributes" if "attribute(s)" in msg else
                "--prompts" if msg.startswith("prompts") else "--methods" if msg.startswith("method") else
                "--identity" if msg.startswith("identity") else "--templates")
        raise CLIError(f"{flag}: {msg}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(args.out, rows)
    print(f"freecure manifest: wrote {len(rows)} jobs ({len(identities)} identities x {args.prompts} prompts x "
          f"{len(rows) // max(1, len(identities) * args.prompts)} methods) to {args.out}")
    return 0
