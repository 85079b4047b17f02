"""The judging protocols of the evaluation suites: one template, one reply format, one parser each.

Templates are data (`vpref/eval/templates/<protocol>.j2`, Jinja2 with a `system` and a `user`
block; a file without blocks is all user prompt).  `eval.judge.templates_dir` puts a folder of
same-named files in front of the built-in ones, so a user holding a paper's original prompt can
drop it in.  A template's version is the hash of the text actually used.

Each protocol parses its reply with the protocol's own rule -- Video-ChatGPT and zero-shot QA: a
Python dict string read with `ast.literal_eval`, `int()` truncation; LLaVA-Hound: `Score: N`,
else a majority vote over the numbers; MT-Bench: `[[A]]` / `[[B]]` / `[[C]]` -- and raises
`ReplyError` naming what is wrong when the reply has no judgment (the judge re-asks, then records
a failure).

Distributional scoring (probabilities over score labels after a prefilled reply, the judges'
next API) plugs in through `prefill`, `labels` and `from_label_probs`: a template may override
the first two with `{% set prefill = ... %}` / `{% set labels = [...] %}`.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"


class ReplyError(ValueError):
    """A judge reply that carries no judgment in the protocol's format; the message says why."""


# --------------------------------------------------------------------------- parsing rules

_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def _literal_dict(text: str) -> dict:
    """The reply as a Python dict (what the papers' scripts do with ast.literal_eval).  Lenient
    only on a surrounding markdown code fence."""
    if not text or not text.strip():
        raise ReplyError("empty reply")
    body = _FENCE.sub("", text.strip()).strip()
    try:
        value = ast.literal_eval(body)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ReplyError(f"not a Python dict string: {body[:60]!r}") from None
    if not isinstance(value, dict):
        raise ReplyError(f"a {type(value).__name__}, not a dict: {body[:60]!r}")
    return value


def _int_score(d: dict, lo: int, hi: int) -> int:
    if "score" not in d:
        raise ReplyError(f"no 'score' key in {sorted(map(str, d))}")
    try:
        score = int(d["score"])  # int() truncates 4.8 -> 4, as the papers' aggregation does
    except (TypeError, ValueError):
        raise ReplyError(f"score {d['score']!r} is not a number int() reads") from None
    if not lo <= score <= hi:
        raise ReplyError(f"score {score} outside {lo}-{hi}")
    return score


def parse_score_dict(text: str) -> dict:
    """Video-ChatGPT's five dimensions: {'score': N}, N in 0..5 after int()."""
    return {"score": _int_score(_literal_dict(text), 0, 5)}


def parse_yes_no_dict(text: str) -> dict:
    """Zero-shot QA: {'pred': 'yes'|'no', 'score': N}.  As Video-ChatGPT counts it, 'yes' in the
    lower-cased pred is a yes, else 'no' in it is a no, else it is neither (kept, and left out of
    the accuracy)."""
    d = _literal_dict(text)
    if "pred" not in d:
        raise ReplyError(f"no 'pred' key in {sorted(map(str, d))}")
    pred = str(d["pred"]).lower()
    verdict = "yes" if "yes" in pred else ("no" if "no" in pred else "neither")
    return {"pred": verdict, "score": _int_score(d, 0, 5)}


_SCORE_LINE = re.compile(r"Score:\s*(\d+\.?\d*)")
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?![\d.])")


def parse_hound_score(text: str) -> dict:
    """LLaVA-Hound: the first 'Score: N' (1-5); else the most frequent number 1-5 in the reply.
    (The original falls back to 1 when neither is found; vpref re-asks and then records a failure,
    and reports the fallback figure separately.)"""
    if not text or not text.strip():
        raise ReplyError("empty reply")
    found = _SCORE_LINE.findall(text)
    if found:
        score = float(found[0])
        if not 1 <= score <= 5:
            raise ReplyError(f"Score {score:g} outside 1-5")
        return {"score": score, "how": "score line"}
    numbers = [float(x) for x in _NUMBER.findall(text) if 1 <= float(x) <= 5]
    if not numbers:
        raise ReplyError("no 'Score: N' line and no number 1-5")
    counts = Counter(numbers)
    top = max(counts.values())
    return {"score": next(x for x in numbers if counts[x] == top), "how": "majority vote"}


def parse_verdict(text: str) -> dict:
    """MT-Bench's pairwise verdict: [[A]], [[B]] or [[C]] (tie), looked for in that order."""
    if not text or not text.strip():
        raise ReplyError("empty reply")
    for tag, winner in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if tag in text:
            return {"winner": winner}
    raise ReplyError("no [[A]], [[B]] or [[C]] verdict")


# --------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    name: str  # = template file stem
    inputs: tuple[str, ...]  # the fields its template uses
    parse: Callable[[str], dict]
    prefill: str | None = None  # distributional hook: the reply prefix that precedes the label
    labels: tuple[str, ...] | None = None  # ... and the labels whose probabilities are read
    words_limit: dict | None = None  # fields cut to this many words before rendering
    reply_tokens: int = 32  # how long a reply may be (a dict string is short; an explanation is not)

    def from_label_probs(self, probs: dict[str, float]) -> dict:
        """A judgment from probabilities over `labels` (the distributional path): the most likely
        label as the protocol's value, and the expectation kept alongside."""
        if not probs:
            raise ReplyError("no label probabilities")
        best = max(probs, key=probs.get)
        total = sum(probs.values()) or 1.0
        if self.parse is parse_verdict:
            return {"winner": {"C": "tie"}.get(best, best),
                    "preference": (probs.get("A", 0) + 0.5 * probs.get("C", 0)) / total}
        if self.parse is parse_yes_no_dict:
            return {"pred": best, "p_yes": probs.get("yes", 0) / total}
        return {"score": int(best), "expected": sum(float(k) * v for k, v in probs.items()) / total}


_QA = ("question", "answer", "prediction")
_SCORES_0_5 = tuple(str(i) for i in range(6))

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("vcgpt_correctness", _QA, parse_score_dict, "{'score': ", _SCORES_0_5),
    Protocol("vcgpt_detail", _QA, parse_score_dict, "{'score': ", _SCORES_0_5),
    Protocol("vcgpt_context", _QA, parse_score_dict, "{'score': ", _SCORES_0_5),
    Protocol("vcgpt_temporal", _QA, parse_score_dict, "{'score': ", _SCORES_0_5),
    Protocol("vcgpt_consistency", ("question1", "question2", "answer", "prediction1", "prediction2"),
             parse_score_dict, "{'score': ", _SCORES_0_5),
    Protocol("zeroshot_qa", _QA, parse_yes_no_dict, "{'pred': '", ("yes", "no")),
    Protocol("grounded_hound", ("caption",) + _QA, parse_hound_score, "Score: ", ("1", "2", "3", "4", "5"),
             words_limit={"prediction": 256}, reply_tokens=160),
    Protocol("winrate_pairwise", ("caption", "question", "answer", "response_a", "response_b"), parse_verdict,
             "[[", ("A", "B", "C"), reply_tokens=160),
)}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown judging protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------- templates


class Templates:
    """Template files of the protocols: `templates_dir` (if given) in front of the built-in ones."""

    def __init__(self, templates_dir: str | Path | None = None):
        dirs = [Path(templates_dir)] if templates_dir else []
        for d in dirs:
            if not d.is_dir():
                raise FileNotFoundError(f"eval.judge.templates_dir {d} is not a folder of <protocol>.j2 files")
        self.dirs = dirs + [TEMPLATE_DIR]
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(d) for d in self.dirs]),
                                      undefined=jinja2.StrictUndefined, keep_trailing_newline=False)

    def path(self, name: str) -> Path:
        for d in self.dirs:
            if (d / f"{name}.j2").is_file():
                return d / f"{name}.j2"
        raise FileNotFoundError(f"no template {name}.j2 in {[str(d) for d in self.dirs]}")

    def version(self, name: str) -> str:
        return f"{name}@{hashlib.sha1(self.path(name).read_bytes()).hexdigest()[:10]}"

    def suite_version(self, suite: str, names) -> str:
        h = hashlib.sha1(b"".join(self.path(n).read_bytes() for n in names)).hexdigest()[:10]
        return f"{suite}@{h}"

    def render(self, name: str, fields: dict) -> tuple[str, str]:
        """(system, user) messages of protocol `name` filled with `fields`."""
        p = protocol(name)
        values = {k: fields.get(k) for k in p.inputs}
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise ValueError(f"protocol {name} needs {missing}")
        for k, n in (p.words_limit or {}).items():
            values[k] = " ".join(str(values[k]).split()[:n])
        t = self.env.get_template(f"{name}.j2")
        if "user" not in t.blocks:
            return "", t.render(**values).strip()
        ctx = t.new_context(values)
        system = "".join(t.blocks["system"](ctx)).strip() if "system" in t.blocks else ""
        return system, "".join(t.blocks["user"](ctx)).strip()

    def answer_format(self, name: str) -> tuple[str | None, tuple[str, ...] | None]:
        """(prefill, labels) for the distributional path: the template's own `{% set %}` values,
        else the protocol's."""
        p = protocol(name)
        module = self.env.get_template(f"{name}.j2").make_module({k: "" for k in p.inputs})
        labels = getattr(module, "labels", None)
        return getattr(module, "prefill", p.prefill), tuple(labels) if labels else p.labels


@lru_cache(maxsize=8)
def templates(templates_dir: str | None = None) -> Templates:
    return Templates(templates_dir)


def as_one_prompt(system: str, user: str) -> str:
    """The text engines in vpref take one user turn: the system text goes first."""
    return f"{system}\n\n{user}" if system else user
