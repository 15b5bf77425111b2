"""Math answer checking: pull the answer out of a completion, read it as an exact number, compare with the gold one.

Numbers are read as `fractions.Fraction`, so "0.5", "1/2", "\\frac{1}{2}" and "\\frac12" are one value. What
`parse_number` accepts, after stripping spaces, one `\\boxed{...}` wrapper, `$` signs and trailing periods:

    integers and decimals      "-3", "+4", "3.50", ".5", "\u22123" (a Unicode minus sign)
    thousands separators       "1,234", "1,234,567.5"   (groups of exactly three digits; "3,4" is not a number)
    fractions                  "3/4", "-3/4", "1.5/3", "\\frac{3}{4}", "\\dfrac{3}{4}", "\\frac34", "-\\frac{3}{4}"
    percentages                "50%" reads as 50, not 0.5: "%" is a unit like "$", and GSM8K-style gold answers
                               that are percentages are written without the sign ("What percent...? #### 50").

Anything else (units, words, exponents such as "1e3", mixed numbers "1 1/2", more than 100 characters) is not a
number; `answers_equal` then compares normalised strings.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\boxed\s*\{(.*)\}", re.DOTALL)
_DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SLASH = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*/\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))")
_GROUP = r"(?:\{\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*\}|(\d))"  # \frac{12}{5} or the one-digit shorthand \frac34
_LATEX_FRAC = re.compile(r"([-+]?)\s*\\[dt]?frac\s*" + _GROUP + r"\s*" + _GROUP)
_INTEGER = re.compile(r"[-+]?\d+")
MAX_NUMBER_CHARS = 100


def extract_tag(text: str, tag: str = "answer") -> str | None:
    """The stripped content of the last complete <tag>...</tag> in `text`, or None when there is none.

    "Last" means: the last closing tag and the nearest opening tag before it, so a stray earlier "<answer>" is
    not swallowed into the answer.
    """
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = text.rfind(f"<{tag}>", 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(tag) + 2:close].strip()


def extract_xml_answer(text: str) -> str | None:
    """The stripped content of the last <answer>...</answer>, or None.

    Unlike the GSM8K recipe this is based on (which falls back to the whole text), a completion without a complete
    answer tag has no answer: a bare "72" earns no correctness reward.
    """
    return extract_tag(text, "answer")


def extract_hash_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution: the text after the last "####", commas and "$" removed; else None."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].replace(",", "").replace("$", "").strip()
    return answer or None


def parse_number(text: str | None) -> Fraction | None:
    """`text` as an exact number (see the module docstring for the forms), or None when it is not one."""
    if text is None:
        return None
    s = _unwrap(str(text))
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    if m := _SLASH.fullmatch(s):
        return _divide(Fraction(m[1]), Fraction(m[2]))
    if m := _LATEX_FRAC.fullmatch(s):
        numerator = Fraction(m[2] or m[3])
        value = _divide(numerator, Fraction(m[4] or m[5]))
        return -value if m[1] == "-" and value is not None else value
    return None


def is_integer_answer(text: str | None) -> bool:
    """True for an optional sign followed by digits only ("42", "-3"); "1,000", "5.0" and "5." are not."""
    return text is not None and _INTEGER.fullmatch(text.strip()) is not None


def answers_equal(pred: str | None, gold: str | None, rel_tol: float = 1e-6) -> bool:
    """Whether a predicted answer means the gold one.

    Both numbers: equal when exactly equal; when either is not an integer, also when they differ by at most
    `rel_tol` relative to the larger magnitude (so "0.3333333" == "1/3", but "3.33" != "10/3" and "1000001" !=
    "1000000"). Otherwise the normalised strings (lower case, single spaces, no "$", no trailing period, no
    \\boxed{}) are compared. None (no answer) equals nothing.
    """
    if pred is None or gold is None:
        return False
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        if p == g:
            return True
        if p.denominator == 1 and g.denominator == 1:
            return False
        return abs(p - g) <= rel_tol * max(abs(p), abs(g))
    return _normalise(str(pred)) == _normalise(str(gold))


def _unwrap(s: str) -> str:
    s = s.strip()
    if m := _BOXED.fullmatch(s):
        s = m[1]
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("\u2212", "-").strip()
    s = s.rstrip(". ")
    if s.endswith("%"):
        s = s[:-1].strip()
    return s


def _divide(numerator: Fraction, denominator: Fraction) -> Fraction | None:
    return None if denominator == 0 else numerator / denominator


def _normalise(s: str) -> str:
    s = s.strip()
    if m := _BOXED.fullmatch(s):
        s = m[1]
    s = s.replace("\\$", "").replace("$", "")
    return " ".join(s.lower().split()).rstrip(". ")
