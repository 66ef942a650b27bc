"""``freecure manifest``: write the paper's evaluation grid (:mod:`freecure_ops.grid`) as a batch manifest.

    freecure manifest --identity alice=woman --identity bob=man --reference alice=refs/alice.jpg \\
                      --reference bob=refs/bob.jpg --prompts 20 --out grid.jsonl
"""
from __future__ import annotations

import string
from pathlib import Path

from ..grid import PHRASES, TEMPLATES, paper_grid
from ..outputs import output_dir_problem
from .args import user_path
from .errors import CLIError

__all__ = ["add_arguments", "run"]


def add_arguments(sub) -> None:
    g = sub.add_parser("manifest", help="write the paper's evaluation grid as a batch manifest",
                       description="Identities x prompts (1, 2, 3 attributes from the attribute vocabulary) x "
                                   "methods (baseline, freecure), seeds fixed.")
    g.add_argument("--identity", action="append", default=[], metavar="ID=CLASS",
                   help="an identity and its class word, e.g. alice=woman (repeat)")
    g.add_argument("--identities", type=user_path, help="CSV with columns id,class[,reference] (instead of / besides "
                                                 "--identity)")
    g.add_argument("--reference", action="append", default=[], metavar="ID=IMAGE",
                   help="reference image of an identity (recorded for freecure eval)")
    g.add_argument("--prompts", type=int, default=20, help="prompts per identity (the paper: 20)")
    g.add_argument("--counts", default="1,2,3", help="attributes per prompt, cycled (default 1,2,3)")
    g.add_argument("--attributes", default=",".join(PHRASES), help=f"attribute kinds (default {','.join(PHRASES)})")
    g.add_argument("--templates", type=user_path, help="file with one template per line ({subject}, {attributes})")
    g.add_argument("--pd-subject", default="sks {class}", help="subject with the identity ({id}, {class})")
    g.add_argument("--fd-subject", default="{class}", help="subject without the identity ({id}, {class})")
    g.add_argument("--methods", default="baseline,freecure")
    g.add_argument("--seed", type=int, default=0, help="first seed; also draws the prompt set")
    g.add_argument("--out", required=True, type=user_path, help="manifest file to write (.jsonl, or .csv)")


def _pairs(items, flag, where=None) -> dict:
    """``ID=VALUE`` items -> dict; ``where`` (id -> the flag text that gave it) is filled for messages. Ids
    are compared ignoring case: they name job folders, which batch compares that way."""
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
    from ..pipeline.attributes import find_attributes

    return find_attributes(text)


def run(args) -> int:
    import csv

    from ..manifest import write_manifest

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
                    ref = args.identities.parent / Path(row["reference"]).expanduser()
                    references.setdefault(row["id"], ref.as_posix())
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
