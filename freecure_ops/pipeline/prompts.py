"""The foundation (FD) prompt from a personalized (PD) prompt: the same words without the identity's trigger words
(a DreamBooth token such as "sks", PhotoMaker's "img"), e.g. "a photo of sks man with red hair" -> "a photo of
man with red hair". Whole words only, any case; the spacing left behind is tidied ("sks, smiling" leaves no
stray comma before "smiling"). Nothing else changes: the attribute words FASA masks stay where they were."""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["foundation_prompt", "identity_words_problem"]


def identity_words_problem(words) -> str | None:
    """What is wrong with ``words`` as identity trigger words (None: nothing): each a non-empty string of
    letters, digits, ``_ - < > .`` (textual-inversion tokens such as ``<alice>`` included), no spaces."""
    if isinstance(words, str) or not isinstance(words, Iterable):
        return f"expected a list of words, got {type(words).__name__}"
    for w in words:
        if not isinstance(w, str) or not re.fullmatch(r"[\w<>.\-]+", w):
            return f"{w!r} is not one word (letters, digits, _ - < > .)"
    return None


def foundation_prompt(prompt: str, identity_words: Iterable[str]) -> str:
    """``prompt`` without the whole-word occurrences of ``identity_words`` (case-insensitive), spacing tidied;
    ``prompt`` unchanged when it names none of them."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = list(identity_words)
    problem = identity_words_problem(words)
    if problem:
        raise ValueError(f"identity_words: {problem}")
    if not words:
        return prompt
    # a word's edges are where no other word character (or token bracket) touches it: "sks" is not in "asks"
    pattern = r"(?<![\w<>\-])(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + \
        r")(?![\w<>\-])"
    out, n = re.subn(pattern, "", prompt, flags=re.IGNORECASE)
    if not n:
        return prompt
    out = re.sub(r"[ \t]{2,}", " ", out)               # the gap a removed word leaves
    out = re.sub(r"[ \t]+([,.;:!?)\]])", r"\1", out)    # no space before punctuation it left behind
    out = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", out)   # "a, sks, man" -> "a, man", not "a,, man"
    return out.strip(" \t,;:")
