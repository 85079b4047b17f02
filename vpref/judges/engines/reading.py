"""Reading label probabilities off an endpoint's reply (OpenAI `logprobs` / `top_logprobs`).

An endpoint cannot be teacher-forced, so the distribution is read where the reply itself reaches
the prefill (its header, e.g. "Accuracy:"): at that position the top-k alternatives are token
strings with log-probs.  A label's probability is the sum over the alternatives that spell it:

* leading whitespace belongs to no label: " 4" spells "4", and a lone " " continues the label in
  the next token; where no alternative merges a space into a label (tokenisers that keep the
  space apart), the next token's labels are read given the lone space, as the HF engine does;
* a label is complete when nothing can extend it into a longer label ("1" when "10" is also a
  label), or when the text after it is not a letter or digit ("4\\n", "4}");
* an alternative that is only the start of a label (" " before "4", "1" before "10") can be
  followed only along the tokens the reply actually generated: its other continuations are
  unseen, so their probability counts as missing mass -- as does every label outside the top-k.
  `StepRead.unseen` lists them; the endpoint engine asks once more, prefilled with a lone space
  the reply did not take (tokenisers that write " 5" as " " + "5" make that the common case).

A reply without log-probs (some providers) is parsed strictly instead: the label written after the
header has p = 1 (path "text").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from vpref.judges.parsing import JudgeParseError, parse_label


@dataclass
class Reply:
    prefix: str  # assistant text the request sent (continue_final_message), "" otherwise
    generated: str
    tokens: list[tuple[str, float, list[tuple[str, float]]]] | None  # (token, logprob, top-k) per position
    finish_reason: str | None = None

    @property
    def path(self) -> str:
        return "logprobs" if self.tokens is not None else "text"

    @property
    def text(self) -> str:
        return self.prefix + self.generated

    @staticmethod
    def keep(reply: dict) -> dict:
        """What a chat-completions reply is kept as (in the cache): text, log-probs, finish reason."""
        choice = reply["choices"][0]
        lp = (choice.get("logprobs") or {}).get("content")
        tokens = None
        if isinstance(lp, list) and lp:
            tokens = [[t["token"], float(t["logprob"]),
                       [[a["token"], float(a["logprob"])] for a in (t.get("top_logprobs") or [])]] for t in lp]
        return {"content": (choice.get("message") or {}).get("content") or "", "tokens": tokens,
                "finish_reason": choice.get("finish_reason")}

    @classmethod
    def from_json(cls, kept: dict, prefix: str = "") -> "Reply":
        tokens = kept.get("tokens")
        if tokens is not None:
            tokens = [(t, lp, [(a, alp) for a, alp in top]) for t, lp, top in tokens]
            generated = "".join(t for t, _, _ in tokens)  # offsets must match the tokens exactly
        else:
            generated = kept.get("content") or ""
        return cls(prefix, generated, tokens, kept.get("finish_reason"))


@dataclass
class StepRead:
    reached: bool  # the header was found and is followed by a position to read
    probs: dict[str, float] | None
    greedy: str | None  # the label the reply itself wrote there (None: not a label)
    end: int  # where the header ends in the reply text (the next step searches from here)
    note: str = ""
    unseen: list[tuple[str, float]] = None  # label beginnings at the first position the reply did not take


def _starts(labels, t: str) -> list[str]:
    return [lbl for lbl in labels if lbl.startswith(t) and lbl != t]


def _begins_label(t: str, labels) -> bool:
    """`t` is a label, the start of one, or a label followed by more text."""
    return bool(t) and any(lbl.startswith(t) or t.startswith(lbl) for lbl in labels)


def _walk(tokens, j: int, q: str, labels, consumed: str, weight: float, stopped: bool, out: dict,
          unseen: list | None = None) -> None:
    tok, lp, top = tokens[j]
    alternatives: dict[str, float] = defaultdict(float)  # token text -> probability (ids with one text add up)
    for s, alp in top:
        alternatives[s] += math.exp(alp)
    if tok not in alternatives:  # the generated token is always one of them
        alternatives[tok] = math.exp(lp)
    last = j + 1 >= len(tokens)
    # a tokeniser with no merged " 5" here keeps the space apart: the label is read *after* the
    # space the reply wrote, given it (what the HF engine scores, tokenising "Accuracy: 5" in
    # context), rather than multiplying in p(the model writes a lone space) -- which a small judge
    # that would rather write words gives little, and every such read was a low-mass failure
    merged = not consumed and any(a[len(q):][:1].isspace() and _begins_label(a[len(q):].strip(), labels)
                                  for a in alternatives if a.startswith(q))
    for s, ps in alternatives.items():
        if not s.startswith(q):
            continue
        r = s[len(q):]
        p = weight * ps
        if not consumed:
            r = r.lstrip()
            if not r:  # whitespace only: the label starts later, seen only along the reply
                if s == tok and not last:
                    given = s[len(q):] == " " and not merged
                    _walk(tokens, j + 1, "", labels, "", weight if given else p, stopped, out)
                elif unseen is not None and s != tok:
                    unseen.append((consumed + s[len(q):], p))
                continue
        t = consumed + r
        longer = _starts(labels, t)
        done = [lbl for lbl in labels if t.startswith(lbl) and len(t) > len(lbl) and not t[len(lbl)].isalnum()]
        if t in labels and not longer:
            out[t] += p
        elif done and not longer:
            out[max(done, key=len)] += p
        elif (longer or t in labels) and s == tok:  # undecided: follow the reply's own next token
            if not last:
                _walk(tokens, j + 1, "", labels, t, p, stopped, out)
            elif t in labels and stopped:  # the reply ended right after it
                out[t] += p
        elif (longer or t in labels) and unseen is not None:
            unseen.append((t, p))
        # anything else is not a label: its probability is missing mass


def read_step(reply: Reply, header: str, labels, start: int = 0) -> StepRead:
    """The label distribution where `header` ends, searching the reply text from `start`."""
    full = reply.text
    if header:
        idx = full.find(header, start)
        if idx < 0:
            return StepRead(False, None, None, start,
                            f"the reply does not contain {header!r} (it says {reply.generated[:80]!r})")
        end = idx + len(header)
    else:
        end = max(start, len(reply.prefix))
    if end < len(reply.prefix) and not reply.prefix[end:].strip():
        end = len(reply.prefix)  # the prefill ends with the header and a space: the reply starts with the label
    try:
        greedy = parse_label(full[end:], labels)
    except JudgeParseError:
        greedy = None
    if reply.tokens is None:
        if greedy is None:
            after = full[end:].strip().splitlines()[0][:40] if full[end:].strip() else "nothing"
            return StepRead(False, None, None, end, f"text reply: after {header!r} it says {after!r}, not one of "
                                                    f"{', '.join(labels)}")
        return StepRead(True, {greedy: 1.0}, greedy, end)
    if end < len(reply.prefix):
        return StepRead(False, None, greedy, end, f"{header!r} is inside the prefill, not in the reply")
    pos = len(reply.prefix)
    for j, (tok, _, _) in enumerate(reply.tokens):
        if pos <= end < pos + len(tok):
            out: dict = defaultdict(float)
            unseen: list = []
            _walk(reply.tokens, j, full[pos:end], labels, "", 1.0, reply.finish_reason == "stop", out, unseen)
            return StepRead(True, {lbl: out.get(lbl, 0.0) for lbl in labels}, greedy, end, unseen=unseen)
        pos += len(tok)
    return StepRead(False, None, greedy, end, f"the reply ends after {header!r}")
