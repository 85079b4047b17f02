import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vpref.data.manifest import append_rejects, decode_samples, load_manifest


@pytest.fixture()
def data_root(tmp_path, world):
    """A data root holding two real videos, a manifest beside them, and a file outside the root."""
    import shutil

    root = tmp_path / "root"
    (root / "videos").mkdir(parents=True)
    vids = sorted((world / "videos").glob("*.mp4"))[:2]
    for v in vids:
        shutil.copy(v, root / "videos" / v.name)
    (tmp_path / "outside.mp4").write_bytes(vids[0].read_bytes())
    return root, [v.name for v in vids]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


def test_good_rows_pass_and_bad_rows_are_set_aside_with_reasons(data_root):
    root, (v1, v2) = data_root
    rows = [
        {"id": "a", "video": f"videos/{v1}", "question": "What colour is the circle?", "answer": "red"},
        {"id": "b", "video": f"videos/{v2}", "question": "How many shapes?", "caption": "Two shapes.",
         "meta": {"family": "count"}},
        {"id": "a", "video": f"videos/{v2}", "question": "dup?"},  # duplicate id
        {"id": "c", "video": f"videos/{v1}", "question": "   "},  # empty question
        {"id": "d", "video": "../outside.mp4", "question": "escape?"},  # escapes the data root
        {"id": "e", "video": "videos/nope.mp4", "question": "missing?"},  # no such file
        "{not json",
        {"id": "f", "video": f"videos/{v1}", "question": "q", "colour": "red"},  # unknown field
        {"id": "g", "video": f"videos/{v1}", "question": "q", "meta": [1]},  # meta not an object
        [1, 2],
    ]
    path = root / "m.jsonl"
    _write_jsonl(path, rows)
    m = load_manifest(path)
    assert [s.id for s in m.samples] == ["a", "b"]
    assert m.samples[1].meta == {"family": "count"} and m.samples[1].caption == "Two shapes."
    assert m.samples[0].video == str((root / "videos" / v1).resolve())
    assert m.counts() == {"rows": 10, "ok": 2, "rejected": 8}
    reasons = {r.row: r.reason for r in m.rejects}
    assert "duplicate id 'a' (first seen at row 1)" in reasons[3]
    assert "field 'question' must be a non-empty string" in reasons[4]
    assert "escapes the data root" in reasons[5]
    assert "video file not found" in reasons[6]
    assert "invalid JSON" in reasons[7]
    assert "unknown field(s) ['colour']" in reasons[8]
    assert "field 'meta' must be an object" in reasons[9]
    assert "row is a list" in reasons[10]
    # The rejects file keeps every rejected row with its reason: nothing is lost.
    out = root / "out" / "rejects.jsonl"
    assert append_rejects(out, m.rejects) == 8
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert {s["row"] for s in saved} == set(range(3, 11))
    assert saved[0]["raw"]["question"] == "dup?" and saved[0]["source"] == str(path)


def test_a_wider_data_root_allows_sibling_folders(data_root):
    root, (v1, _) = data_root
    path = root / "m.jsonl"
    _write_jsonl(path, [{"id": "d", "video": "../outside.mp4", "question": "q"}])
    assert load_manifest(path).counts()["ok"] == 0
    assert load_manifest(path, data_root=root.parent).counts()["ok"] == 1


def test_parquet_manifest(data_root):
    root, (v1, v2) = data_root
    table = pa.Table.from_pylist([
        {"id": "a", "video": f"videos/{v1}", "question": "q1", "answer": None, "caption": None,
         "meta": json.dumps({"family": "colour"})},
        {"id": "b", "video": f"videos/{v2}", "question": "", "answer": None, "caption": None, "meta": None},
    ])
    pq.write_table(table, root / "m.parquet")
    m = load_manifest(root / "m.parquet")
    assert [s.id for s in m.samples] == ["a"] and m.samples[0].family == "colour"
    assert m.rejects[0].id == "b"


def test_unusable_manifest_paths_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_manifest(tmp_path / "missing.jsonl")
    (tmp_path / "m.csv").write_text("id,video\n")
    with pytest.raises(ValueError, match="must be .jsonl or .parquet"):
        load_manifest(tmp_path / "m.csv")


def test_corrupt_videos_are_rejected_at_decode_and_the_rest_go_on(data_root):
    root, (v1, v2) = data_root
    (root / "videos" / "corrupt.mp4").write_bytes(b"\x00" * 500)
    path = root / "m.jsonl"
    _write_jsonl(path, [
        {"id": "a", "video": f"videos/{v1}", "question": "q"},
        {"id": "b", "video": "videos/corrupt.mp4", "question": "q"},
        {"id": "c", "video": f"videos/{v1}", "question": "q2"},
    ])
    ok, clips, rejects = decode_samples(load_manifest(path).samples, 4)
    assert [s.id for s in ok] == ["a", "c"] and len(clips) == 1  # one decode for two questions
    assert rejects[0].id == "b" and "corrupt.mp4" in rejects[0].reason
