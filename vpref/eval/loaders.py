"""Loaders for the released benchmark files, into vpref manifests the suites read.

    Video-ChatGPT generic / temporal  JSON list of {video_name, Q, A}
    Video-ChatGPT consistency         JSON list of {video_name, Q1, Q2, A}       (Q2 -> meta.question2)
    MSVD-QA                           JSON list of {video_id, id, question, answer}, plus
                                      youtube_mapping.txt lines "<clip name> vid<video_id>"
    MSRVTT-QA                         JSON list of {video_id, id, question, answer}; videos video<id>.*
    TGIF-QA (FrameQA)                 tab-separated, header: gif_name, question, answer, vid_id, key, type
    ActivityNet-QA                    *_q.json [{video_name, question, question_id}] and
                                      *_a.json [{answer, type, question_id}]; videos v_<name>.* or <name>.*
                                      (also the q/a pair files Video-LLaVA ships for MSVD, MSRVTT, TGIF)

Each loader writes a JSONL manifest (video paths relative to it) and loads it back through
`vpref.data.manifest.load_manifest`, the one validation; a row whose video is missing, or whose
fields are not there, is set aside with its reason (returned, and written next to the manifest as
`<name>.rejects.jsonl`).  From the command line:

    python -m vpref.eval.loaders msvd --out data/bench/msvd.jsonl --videos /data/MSVD/YouTubeClips \\
        --annotations test_qa.json --mapping youtube_mapping.txt --root /data
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

from vpref.data.manifest import Manifest, Reject, append_rejects, load_manifest

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif")


class VideoIndex:
    """Video files of a folder by stem (one directory listing, not a stat per question)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"video folder not found: {self.folder}")
        self.by_stem: dict[str, Path] = {}
        for p in sorted(self.folder.iterdir()):
            if p.suffix.lower() in VIDEO_EXTS and p.stem not in self.by_stem:
                self.by_stem[p.stem] = p

    def find(self, *stems: str) -> Path | None:
        return next((self.by_stem[s] for s in stems if s in self.by_stem), None)

    def missing(self, *stems: str) -> str:
        return f"no video {' or '.join(repr(s) for s in stems)} ({'/'.join(VIDEO_EXTS)}) in {self.folder}"


def _read_json_list(path: str | Path, what: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); expected the {what} file") from None
    if isinstance(data, dict):  # some copies are keyed by id
        data = list(data.values())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {what} rows, got {type(data).__name__}")
    return data


def _fields(row, need: tuple[str, ...]) -> str | None:
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, expected an object"
    missing = [k for k in need if row.get(k) in (None, "")]
    return f"missing field(s) {missing}" if missing else None


def write_rows(out: str | Path, rows: list[dict], rejects: list[Reject], root: str | Path | None = None) -> Manifest:
    """Write manifest rows (absolute video paths made relative to the manifest) and load them back
    through the manifest validation; rejects (the loader's and the validation's) go next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "video": os.path.relpath(Path(r["video"]).resolve(), base)}) + "\n")
    if root is None:  # the narrowest folder holding the manifest and every video
        root = os.path.commonpath([str(base)] + [str(Path(r["video"]).resolve().parent) for r in rows])
    m = load_manifest(out, root)
    m.rejects[:0] = rejects
    rej = out.with_suffix(".rejects.jsonl")
    rej.unlink(missing_ok=True)
    append_rejects(rej, m.rejects)
    return m


def _qa_row(id_: str, video: Path, question: str, answer: str, meta: dict) -> dict:
    return {"id": id_, "video": str(video), "question": str(question).strip(), "answer": str(answer).strip(),
            "meta": meta}


def videochatgpt(qa_file, video_dir, kind: str, out, captions_file=None, root=None) -> Manifest:
    """Video-ChatGPT's generic / temporal / consistency QA file.  `captions_file` (optional): the
    videos' detailed descriptions, {video_name: text} or [{video_name, caption|description}]."""
    if kind not in ("generic", "temporal", "consistency"):
        raise ValueError(f"kind must be generic, temporal or consistency, got {kind!r}")
    videos = VideoIndex(video_dir)
    captions = _captions(captions_file) if captions_file else {}
    need = ("video_name", "Q1", "Q2", "A") if kind == "consistency" else ("video_name", "Q", "A")
    rows, rejects, seen = [], [], {}
    for n, row in enumerate(_read_json_list(qa_file, f"Video-ChatGPT {kind} QA"), start=1):
        why = _fields(row, need)
        video = None if why else videos.find(str(row["video_name"]))
        if why is None and video is None:
            why = videos.missing(str(row["video_name"]))
        if why:
            rejects.append(Reject(str(qa_file), n, None, why, row))
            continue
        name = str(row["video_name"])
        k = seen[name] = seen.get(name, -1) + 1  # items are keyed by video name + a repeat counter
        meta = {"set": f"vcgpt_{kind}", "video_name": name, "source_row": n}
        q = row["Q1"] if kind == "consistency" else row["Q"]
        if kind == "consistency":
            meta["question2"] = str(row["Q2"]).strip()
        r = _qa_row(f"{name}-{kind}-{k}", video, q, row["A"], meta)
        if name in captions:
            r["caption"] = captions[name]
        rows.append(r)
    return write_rows(out, rows, rejects, root)


def _captions(path) -> dict[str, str]:
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    return {str(r["video_name"]): str(r.get("caption") or r.get("description")) for r in data}


def msvd_qa(annotations, mapping_file, video_dir, out, root=None) -> Manifest:
    """MSVD-QA: `video_id` is an index into youtube_mapping.txt ("<clip name> vid<id>" per line)."""
    mapping = {}
    for line in Path(mapping_file).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith("vid"):
            mapping[parts[1][3:]] = parts[0]
    return _id_qa(annotations, video_dir, out, "msvd-qa", lambda vid: [mapping.get(vid, f"<vid{vid} not in mapping>")],
                  root)


def msrvtt_qa(annotations, video_dir, out, root=None) -> Manifest:
    """MSRVTT-QA: `video_id` N is the file video<N>.*"""
    return _id_qa(annotations, video_dir, out, "msrvtt-qa", lambda vid: [f"video{vid}"], root)


def _id_qa(annotations, video_dir, out, name: str, stems, root) -> Manifest:
    videos = VideoIndex(video_dir)
    rows, rejects = [], []
    for n, row in enumerate(_read_json_list(annotations, f"{name} annotation"), start=1):
        why = _fields(row, ("video_id", "id", "question", "answer"))
        cand = [] if why else stems(str(row["video_id"]))
        video = None if why else videos.find(*cand)
        if why is None and video is None:
            why = videos.missing(*cand)
        if why:
            rejects.append(Reject(str(annotations), n, None, why, row))
            continue
        rows.append(_qa_row(f"{name}-{row['id']}", video, row["question"], row["answer"],
                            {"set": name, "video_id": str(row["video_id"])}))
    return write_rows(out, rows, rejects, root)


def tgif_frameqa(tsv_file, video_dir, out, root=None) -> Manifest:
    """TGIF-QA FrameQA (what Video-ChatGPT evaluates): GIF files named by `gif_name`."""
    videos = VideoIndex(video_dir)
    rows, rejects = [], []
    path = Path(tsv_file)
    if not path.is_file():
        raise FileNotFoundError(f"TGIF-QA question file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or "gif_name" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a tab-separated file whose header names gif_name, question, "
                             f"answer (got {reader.fieldnames})")
        for n, row in enumerate(reader, start=2):
            why = _fields(row, ("gif_name", "question", "answer"))
            video = None if why else videos.find(row["gif_name"])
            if why is None and video is None:
                why = videos.missing(row["gif_name"])
            if why:
                rejects.append(Reject(str(path), n, None, why, row))
                continue
            key = row.get("key") or row.get("vid_id") or str(n)
            rows.append(_qa_row(f"tgif-qa-{key}-{n}", video, row["question"], row["answer"],
                                {"set": "tgif-qa", "gif_name": row["gif_name"], "type": row.get("type")}))
    return write_rows(out, rows, rejects, root)


def activitynet_qa(q_file, a_file, video_dir, out, name: str = "activitynet-qa", root=None) -> Manifest:
    """ActivityNet-QA's question and answer files, joined on `question_id`; also the q/a pairs
    Video-LLaVA ships for MSVD / MSRVTT / TGIF (pass `name`)."""
    videos = VideoIndex(video_dir)
    answers = {}
    for row in _read_json_list(a_file, f"{name} answer"):
        if isinstance(row, dict) and "question_id" in row:
            answers[str(row["question_id"])] = row
    rows, rejects = [], []
    for n, row in enumerate(_read_json_list(q_file, f"{name} question"), start=1):
        why = _fields(row, ("video_name", "question", "question_id"))
        a = None if why else answers.get(str(row["question_id"]))
        if why is None and (a is None or a.get("answer") in (None, "")):
            why = f"no answer for question_id {row['question_id']!r} in {a_file}"
        stems = [] if why else [str(row["video_name"]), f"v_{row['video_name']}"]
        video = None if why else videos.find(*stems)
        if why is None and video is None:
            why = videos.missing(*stems)
        if why:
            rejects.append(Reject(str(q_file), n, None, why, row))
            continue
        rows.append(_qa_row(f"{name}-{row['question_id']}", video, row["question"], a["answer"],
                            {"set": name, "type": a.get("type"), "video_name": str(row["video_name"])}))
    return write_rows(out, rows, rejects, root)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vpref.eval.loaders", description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["vcgpt-generic", "vcgpt-temporal", "vcgpt-consistency", "msvd", "msrvtt",
                                     "tgif", "activitynet"])
    ap.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    ap.add_argument("--videos", required=True, help="folder of the benchmark's video files")
    ap.add_argument("--annotations", help="QA / annotation / question file")
    ap.add_argument("--answers", help="activitynet: the *_a.json answer file")
    ap.add_argument("--mapping", help="msvd: youtube_mapping.txt")
    ap.add_argument("--captions", help="Video-ChatGPT: detailed descriptions per video (for grounded / win rate)")
    ap.add_argument("--root", help="data root the manifest's videos must stay inside (default: common folder)")
    a = ap.parse_args(argv)
    if a.kind.startswith("vcgpt-"):
        m = videochatgpt(a.annotations, a.videos, a.kind.split("-")[1], a.out, a.captions, a.root)
    elif a.kind == "msvd":
        m = msvd_qa(a.annotations, a.mapping, a.videos, a.out, a.root)
    elif a.kind == "msrvtt":
        m = msrvtt_qa(a.annotations, a.videos, a.out, a.root)
    elif a.kind == "tgif":
        m = tgif_frameqa(a.annotations, a.videos, a.out, a.root)
    else:
        m = activitynet_qa(a.annotations, a.answers, a.videos, a.out, root=a.root)
    print(m.summary() + (f"; rejects in {Path(a.out).with_suffix('.rejects.jsonl')}" if m.rejects else ""))
    return 0 if m.samples else 1


if __name__ == "__main__":
    raise SystemExit(main())
