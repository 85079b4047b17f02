"""Loaders turn small files in each benchmark's released format into manifests the suites read;
rows whose video is missing or whose fields are absent are set aside with the reason."""

import json

import pytest

from vpref.data.manifest import load_manifest
from vpref.eval import loaders


@pytest.fixture(scope="module")
def videos(tmp_path_factory, world):
    """A benchmark-like video folder: real clips of the test world under the benchmarks' names."""
    import shutil

    from PIL import Image

    d = tmp_path_factory.mktemp("bench") / "videos"
    d.mkdir()
    clips = sorted((world / "videos").glob("*.mp4"))
    for name, src in zip(["v_abc123", "video7", "video8", "clipA_1_10", "v_zzz"], clips):
        shutil.copy(src, d / f"{name}.mp4")
    frames = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    frames[0].save(d / "tumblr_x1.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return d


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_video_chatgpt_generic_and_consistency(tmp_path, videos):
    qa = _write(tmp_path / "generic_qa.json", [
        {"video_name": "v_abc123", "Q": "What happens?", "A": "A man cooks."},
        {"video_name": "v_abc123", "Q": "Who is there?", "A": "A man."},  # a second item of the same video
        {"video_name": "v_missing", "Q": "What?", "A": "x"},
        {"video_name": "v_zzz", "Q": "What?"},  # no answer
    ])
    caps = _write(tmp_path / "captions.json", {"v_abc123": "A man cooks pasta in a kitchen."})
    m = loaders.videochatgpt(qa, videos, "generic", tmp_path / "m" / "generic.jsonl", caps)
    assert [s.id for s in m.samples] == ["v_abc123-generic-0", "v_abc123-generic-1"]
    assert m.samples[0].caption.startswith("A man cooks") and m.samples[0].video == str(videos / "v_abc123.mp4")
    assert sorted(r.reason.split(" ")[0] for r in m.rejects) == ["missing", "no"]
    assert (tmp_path / "m" / "generic.rejects.jsonl").read_text().count("\n") == 2
    again = load_manifest(tmp_path / "m" / "generic.jsonl", videos.parent)  # what the suites load
    assert [s.question for s in again.samples] == ["What happens?", "Who is there?"]

    cons = _write(tmp_path / "consistency_qa.json", [
        {"video_name": "v_abc123", "Q1": "What is the man doing?", "Q2": "Describe the man's activity.",
         "A": "Cooking."}])
    m = loaders.videochatgpt(cons, videos, "consistency", tmp_path / "m" / "consistency.jsonl")
    s = m.samples[0]
    assert s.question == "What is the man doing?" and s.meta["question2"] == "Describe the man's activity."


def test_msvd_msrvtt_activitynet_and_tgif(tmp_path, videos):
    ann = _write(tmp_path / "msvd_test_qa.json", [
        {"answer": "dog", "id": 0, "question": "what is running?", "video_id": 3},
        {"answer": "cat", "id": 1, "question": "what sleeps?", "video_id": 4}])  # vid4 has no file
    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("clipA_1_10 vid3\nclipB_2_20 vid4\n")
    m = loaders.msvd_qa(ann, mapping, videos, tmp_path / "msvd.jsonl")
    assert [(s.id, s.answer) for s in m.samples] == [("msvd-qa-0", "dog")]
    assert m.samples[0].video.endswith("clipA_1_10.mp4") and "clipB_2_20" in m.rejects[0].reason

    ann = _write(tmp_path / "msrvtt_test_qa.json", [
        {"answer": "guitar", "id": 5, "question": "what is played?", "video_id": 7, "category_id": 3},
        {"answer": "song", "id": 6, "question": "what is sung?", "video_id": 8}])
    m = loaders.msrvtt_qa(ann, videos, tmp_path / "msrvtt.jsonl")
    assert [s.video.rsplit("/", 1)[1] for s in m.samples] == ["video7.mp4", "video8.mp4"]

    q = _write(tmp_path / "test_q.json", [{"video_name": "abc123", "question": "is it indoors", "question_id":
                                           "v_abc123_0"}, {"video_name": "abc123", "question": "what colour",
                                                           "question_id": "v_abc123_1"}])
    a = _write(tmp_path / "test_a.json", [{"answer": "yes", "type": 3, "question_id": "v_abc123_0"}])
    m = loaders.activitynet_qa(q, a, videos, tmp_path / "anet.jsonl")
    assert [s.id for s in m.samples] == ["activitynet-qa-v_abc123_0"]  # videos are stored as v_<name>
    assert m.samples[0].meta["type"] == 3 and "no answer for question_id 'v_abc123_1'" in m.rejects[0].reason

    tsv = tmp_path / "Test_frameqa_question.csv"
    tsv.write_text("gif_name\tquestion\tanswer\tvid_id\tkey\ttype\n"
                   "tumblr_x1\twhat colour is the square\tred\tgif1\t101\t2\n"
                   "tumblr_gone\twhat is it\tdog\tgif2\t102\t0\n")
    m = loaders.tgif_frameqa(tsv, videos, tmp_path / "tgif.jsonl")
    assert [s.video.rsplit("/", 1)[1] for s in m.samples] == ["tumblr_x1.gif"] and len(m.rejects) == 1


def test_bad_files_give_clear_errors(tmp_path, videos):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        loaders.msrvtt_qa(bad, videos, tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError, match="video folder not found"):
        loaders.msrvtt_qa(bad, tmp_path / "nowhere", tmp_path / "x.jsonl")
    tsv = tmp_path / "wrong.tsv"
    tsv.write_text("name,question\n")
    with pytest.raises(ValueError, match="gif_name"):
        loaders.tgif_frameqa(tsv, videos, tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="kind must be"):
        loaders.videochatgpt(bad, videos, "detail", tmp_path / "x.jsonl")


def test_command_line(tmp_path, videos):
    ann = _write(tmp_path / "a.json", [{"answer": "guitar", "id": 5, "question": "what?", "video_id": 7}])
    assert loaders.main(["msrvtt", "--out", str(tmp_path / "cli.jsonl"), "--videos", str(videos),
                         "--annotations", str(ann)]) == 0
    assert load_manifest(tmp_path / "cli.jsonl", videos.parent).samples[0].answer == "guitar"
