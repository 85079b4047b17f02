"""The synthetic video-QA world's language: scenes, their facts, and the text that states them.

A scene is one to three coloured shapes that appear one after another and move.  This module
is the one home of the world's grammar: it writes questions, reference answers and detailed
captions from a scene, and it reads facts back out of free text (an answer, a caption) so that
answers can be scored exactly (`extract_value`) and judged against the caption (`parse_facts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (60, 100, 250),
    "yellow": (240, 220, 40),
    "purple": (170, 70, 220),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "still")
NUMBERS = {1: "one", 2: "two", 3: "three"}
ORDINALS = ("first", "second", "third")
FAMILIES = ("colour", "shape", "direction", "count", "order", "describe")

_WORD2NUM = {v: k for k, v in NUMBERS.items()}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    motion: str
    appear: int  # frame index at which the shape appears
    x: float  # start centre (pixels)
    y: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in order of appearance
    num_frames: int
    size: int
    fps: int

    def facts(self) -> frozenset:
        return scene_facts(self.objects)


# --------------------------------------------------------------------------- writing text


def motion_phrase(motion: str) -> str:
    return "stays still" if motion == "still" else f"moves {motion}"


def caption(scene: Scene) -> str:
    """A detailed caption that states every fact of the scene (the judge's context)."""
    objs = scene.objects
    n = len(objs)
    head = f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n > 1 else ''}."
    if n == 1:
        return f"{head} A {objs[0].name} appears and {motion_phrase(objs[0].motion)}."
    parts = [head]
    for i, o in enumerate(objs):
        lead = "First," if i == 0 else ("Last," if i == n - 1 else "Then")
        parts.append(f"{lead} a {o.name} appears and {motion_phrase(o.motion)}.")
    return " ".join(parts)


QUESTION_TEMPLATES = {
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "direction": ("Which way does the {name} move?", "In which direction does the {name} move?"),
    "count": ("How many shapes are in the video?", "How many shapes appear?"),
    "order": ("Which shape appears first?", "Which shape is the first to appear?"),
    "describe": ("Describe the video in detail.", "What happens in the video?"),
}


def question_and_answer(scene: Scene, family: str, target: int, template: int = 0) -> tuple[str, str]:
    """The question of `family` about object `target` and its reference answer."""
    o = scene.objects[target]
    q = QUESTION_TEMPLATES[family][template].format(shape=o.shape, colour=o.colour, name=o.name)
    n = len(scene.objects)
    if family == "colour":
        a = f"The {o.shape} is {o.colour}."
    elif family == "shape":
        a = f"The {o.colour} object is a {o.shape}."
    elif family == "direction":
        a = f"The {o.name} {motion_phrase(o.motion)}."
    elif family == "count":
        a = f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n > 1 else ''}."
    elif family == "order":
        a = f"The {scene.objects[0].name} appears first."
    elif family == "describe":
        a = caption(scene)
    else:
        raise ValueError(f"unknown question family {family!r}; known: {FAMILIES}")
    return q, a


# --------------------------------------------------------------------------- reading text

_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def scene_facts(objects) -> frozenset:
    """Facts as tuples: ('count', n), ('object', colour, shape), ('motion', colour, shape, m),
    ('order', colour, shape, rank)."""
    facts = {("count", len(objects))}
    for i, o in enumerate(objects):
        facts |= {("object", o.colour, o.shape), ("motion", o.colour, o.shape, o.motion)}
        if len(objects) > 1:  # a lone shape has no order to state
            facts.add(("order", o.colour, o.shape, ORDINALS[i]))
    return frozenset(facts)


def parse_facts(text: str) -> frozenset:
    """Facts stated in free text written in the world's grammar (captions, answers).

    Mentions of "<colour> <shape>" introduce an object; motion and order words that follow a
    mention (up to the next mention) attach to it.  "First/Then/Last" before a mention give
    its rank.  Text that states nothing parseable yields an empty set, never an error.
    """
    w = words(text)
    facts = set()
    for i in range(len(w) - 2):
        if w[i] == "there" and w[i + 1] in ("is", "are") and w[i + 2] in _WORD2NUM:
            facts.add(("count", _WORD2NUM[w[i + 2]]))
    mentions = [i for i in range(len(w) - 1) if w[i] in COLOURS and w[i + 1] in SHAPES]
    rank_seen = 0
    for k, i in enumerate(mentions):
        colour, shape = w[i], w[i + 1]
        facts.add(("object", colour, shape))
        end = mentions[k + 1] if k + 1 < len(mentions) else len(w)
        tail = w[i + 2 : end]
        for m in ("left", "right", "up", "down"):
            if m in tail and "moves" in tail:
                facts.add(("motion", colour, shape, m))
        if "still" in tail or ("not" in tail and "move" in tail):
            facts.add(("motion", colour, shape, "still"))
        lead = w[max(0, i - 3) : i]
        if "first" in lead or ("first" in tail and "appears" in tail):
            facts.add(("order", colour, shape, "first"))
            rank_seen = 1
        elif "then" in lead or "second" in lead:
            rank_seen = max(rank_seen + 1, 2)
            facts.add(("order", colour, shape, ORDINALS[min(rank_seen, 3) - 1]))
        elif "last" in lead:
            facts.add(("order", colour, shape, "last"))
    # "last" is relative: resolve it against the count when the text states one.
    counts = [f[1] for f in facts if f[0] == "count"]
    resolved = set()
    for f in facts:
        if f[0] == "order" and f[3] == "last":
            n = counts[0] if counts else None
            f = ("order", f[1], f[2], ORDINALS[n - 1]) if n else f
        resolved.add(f)
    return frozenset(resolved)


def extract_value(family: str, text: str):
    """The one value an answer gives for a question family, or None if it gives none or several.

    colour/shape/direction/count: the single colour / shape / motion / number word;
    order: the single "<colour> <shape>" named; describe: the set of facts stated.
    """
    w = words(text)
    if family == "describe":
        return parse_facts(text)
    if family == "order":
        named = {(w[i], w[i + 1]) for i in range(len(w) - 1) if w[i] in COLOURS and w[i + 1] in SHAPES}
        return next(iter(named)) if len(named) == 1 else None
    vocab = {
        "colour": set(COLOURS),
        "shape": set(SHAPES),
        "direction": set(MOTIONS),
        "count": set(_WORD2NUM),
    }.get(family)
    if vocab is None:
        raise ValueError(f"unknown question family {family!r}; known: {FAMILIES}")
    if family == "direction" and "not" in w and "move" in w:
        w = w + ["still"]
    found = {x for x in w if x in vocab}
    return next(iter(found)) if len(found) == 1 else None


def is_correct(family: str, response: str, reference: str) -> bool:
    """Exact match on the value the family asks for (describe: the same set of facts)."""
    got = extract_value(family, response)
    return got is not None and got == extract_value(family, reference)


_CATEGORIES = (tuple(COLOURS), SHAPES, MOTIONS, tuple(NUMBERS.values()))


def perturb(text: str, rng) -> str:
    """The same sentence with one world word (colour, shape, motion, number) swapped for another
    of its kind: a plausible wrong answer, for label noise."""
    tokens = re.split(r"(\W+)", text)
    slots = [(i, cat) for i, t in enumerate(tokens) for cat in _CATEGORIES if t.lower() in cat]
    if not slots:
        return text
    i, cat = slots[int(rng.integers(len(slots)))]
    choices = [w for w in cat if w != tokens[i].lower()]
    tokens[i] = choices[int(rng.integers(len(choices)))]
    return "".join(tokens)
