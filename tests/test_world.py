import json

import numpy as np
import pytest

from vpref.data.manifest import load_manifest
from vpref.data.synth import SynthSpec, position, radius, synthesize
from vpref.data.video import read_frames
from vpref.data.world import (COLOURS, FAMILIES, Obj, extract_value, is_correct, parse_facts, perturb,
                              scene_facts)


def _objs(scene):
    return [Obj(**o) for o in scene["objects"]]


def test_captions_state_every_fact_and_answers_are_self_consistent(world):
    scenes = json.loads((world / "scenes.json").read_text())
    samples = [s for split in ("train", "dev", "test") for s in load_manifest(world / f"{split}.jsonl").samples]
    assert {s.family for s in samples} == set(FAMILIES)
    for s in samples:
        facts = scene_facts(_objs(scenes[s.meta["video_id"]]))
        assert parse_facts(s.caption) == facts, s.caption
        assert is_correct(s.family, s.answer, s.answer)
        if s.family == "describe":
            assert extract_value("describe", s.answer) == facts


def test_splits_are_disjoint_by_video_and_deterministic(world, tmp_path):
    vids = {split: {s.meta["video_id"] for s in load_manifest(world / f"{split}.jsonl").samples}
            for split in ("train", "dev", "test")}
    assert not (vids["train"] & vids["dev"]) and not (vids["train"] & vids["test"]) and not (vids["dev"] & vids["test"])
    assert sum(map(len, vids.values())) == 30
    again = synthesize(tmp_path / "again", SynthSpec(n=30, seed=7))
    assert (tmp_path / "again" / "train.jsonl").read_text().replace(str(tmp_path / "again"), "") == \
        (world / "train.jsonl").read_text().replace(str(world), "")
    assert again["questions"]["test"] == json.loads((world / "synth.json").read_text())["questions"]["test"]
    other = synthesize(tmp_path / "other", SynthSpec(n=30, seed=8))
    assert (tmp_path / "other" / "scenes.json").read_text() != (world / "scenes.json").read_text()
    assert other["videos"] == {"train": 21, "dev": 3, "test": 6}


def test_videos_show_the_scene(world):
    """Decoded frames hold each shape's colour at the scene's position, from its appearance on."""
    scenes = json.loads((world / "scenes.json").read_text())
    checked = 0
    for vid, sc in list(scenes.items())[:10]:
        frames = read_frames(world / "videos" / f"{vid}.mp4", sc["num_frames"])
        assert frames.shape[0] == sc["num_frames"]
        for o in _objs(sc):
            for t in (o.appear, sc["num_frames"] - 1):
                x, y = position(o, t, sc["num_frames"], sc["size"])
                got = frames[t, int(y), int(x)].astype(int)
                assert np.abs(got - np.array(COLOURS[o.colour])).max() < 40, (vid, o, t, got)
                checked += 1
            if o.appear > 0:  # not there before it appears
                x, y = position(o, o.appear, sc["num_frames"], sc["size"])
                before = frames[0, int(y), int(x)].astype(int)
                assert np.abs(before - np.array(COLOURS[o.colour])).max() > 40
    assert checked >= 20
    assert radius(64) == pytest.approx(7.0)


@pytest.mark.parametrize("family,text,value", [
    ("colour", "The circle is red.", "red"),
    ("colour", "It is red or blue.", None),  # two answers are no answer
    ("colour", "I don't know.", None),
    ("shape", "The red object is a triangle.", "triangle"),
    ("direction", "The blue square moves up.", "up"),
    ("direction", "The blue square does not move.", "still"),
    ("direction", "The blue square stays still.", "still"),
    ("count", "There are three shapes.", 3 and "three"),
    ("order", "The green circle appears first.", ("green", "circle")),
    ("order", "The green circle and the red square.", None),
])
def test_extract_value(family, text, value):
    assert extract_value(family, text) == value


def test_describe_is_judged_on_facts_not_wording():
    ref = "There are two shapes. First, a red circle appears and moves left. Last, a blue square appears and stays still."
    same = "There are two shapes. First, a red circle appears and moves left. Then a blue square appears and stays still."
    wrong = "There are two shapes. First, a red circle appears and moves right. Last, a blue square appears and stays still."
    assert is_correct("describe", same, ref)
    assert not is_correct("describe", wrong, ref)
    assert ("motion", "red", "circle", "right") in parse_facts(wrong)


def test_perturb_swaps_exactly_one_world_word():
    rng = np.random.default_rng(0)
    text = "The red circle moves left."
    for _ in range(20):
        out = perturb(text, rng)
        diff = [(a, b) for a, b in zip(text.split(), out.split()) if a != b]
        assert len(diff) == 1 and out != text
    assert perturb("Nothing to change here.", rng) == "Nothing to change here."
