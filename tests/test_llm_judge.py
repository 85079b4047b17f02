"""LLM judges on real models: SmolLM2-135M-Instruct (a real pretrained instruct model shipped in
a PyPI wheel), the random tiny Qwen2.5-VL (every answer malformed), and a tiny model trained
for a few seconds to answer in the rubric's format (the success path)."""

import numpy as np
import pytest
import torch

from conftest import engine_config
from vpref.data.manifest import load_manifest
from vpref.data.schema import read_records
from vpref.data.world import perturb
from vpref.judges.base import ResponseView, SampleView
from vpref.judges.llm import LLMJudge
from vpref.judges.reference import ReferenceJudge
from vpref.judges.rubric import load_rubric
from vpref.models.text_lm import ChatLM

CAPTION = "There are two shapes. First, a red circle appears and moves left. Last, a blue square appears and stays still."
SAMPLE = SampleView("s1", "What colour is the circle?", "The circle is red.", CAPTION, "colour")
ANSWERS = [ResponseView("good", "The circle is red."), ResponseView("bad", "The circle is green.")]


def _check_accounting(judge, judgments):
    """Every response gets exactly one judgment: scores in range, or an explicit failure."""
    assert [j.response_id for j in judgments] == [r.response_id for r in ANSWERS]
    for j in judgments:
        assert j.raw is not None and j.rubric_version == judge.rubric_version
        if j.ok:
            assert set(j.scores) == set(judge.spec.aspects) and all(1 <= v <= 5 for v in j.scores.values())
            assert j.overall == pytest.approx(sum(j.scores.values()) / len(j.scores), abs=1e-3)
        else:
            assert j.overall is None and j.scores == {} and j.error.startswith("unparseable after")
            assert j.attempts == 1 + judge.max_parse_retries  # retried, then recorded


def test_smollm2_pretrained_instruct_model_as_judge():
    from vpref.models.smollm2 import smollm2_checkpoint

    try:
        path = smollm2_checkpoint()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    lm = ChatLM.load(path)
    assert lm.chat(["What is the capital of France? Answer in one sentence."], 16)[0].count("Paris") == 1
    judge = LLMJudge(lm, "vlfeedback", max_parse_retries=1, max_new_tokens=48)
    assert judge.name == "llm:SmolLM2-135M-Instruct"
    _check_accounting(judge, judge.score(SAMPLE, ANSWERS))
    v = judge.compare(SAMPLE, *ANSWERS)
    assert v.raw.count("---") == 1  # both orders were asked
    assert v.consistent == (v.ok and (v.winner_ab == "A") != (v.winner_ba == "A"))
    assert v.ok or v.error.startswith("unparseable")


def test_random_tiny_model_answers_are_all_recorded_as_failures(tiny_ckpt):
    judge = LLMJudge(ChatLM.load(tiny_ckpt), "mmaipv", max_parse_retries=2, max_new_tokens=24)
    judgments = judge.score(SAMPLE, ANSWERS)
    _check_accounting(judge, judgments)
    assert not any(j.ok for j in judgments)


@pytest.fixture(scope="module")
def trained_judge(tiny_ckpt, world, tmp_path_factory):
    """The tiny model taught for a few seconds to answer judge prompts in the rubric format, with
    scores taken from the reference judge (a distilled judge)."""
    from transformers import AutoModelForImageTextToText

    lm = ChatLM.load(tiny_ckpt)
    lm.model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt)  # a private copy to train
    rubric, ref = load_rubric("mmaipv"), ReferenceJudge()
    rng = np.random.default_rng(0)
    rows = []
    for s in load_manifest(world / "train.jsonl").samples:
        view = SampleView(s.id, s.question, s.answer, s.caption, s.family)
        for text in (s.answer, perturb(s.answer, rng)):
            a = ref.aspects(view, text)
            target = (f"Relevance: {a['detail']}\nAccuracy: {a['correctness']}\nClarity: {a['concision']}\n"
                      "Rationale: compared with the description.")
            prompt = rubric.render(question=s.question, response=text, context=s.caption, reference=s.answer)
            rows.append((prompt, target))
    tok, model = lm.tokenizer, lm.model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        batch = [rows[i] for i in rng.choice(len(rows), 8, replace=False)]
        ids, labels = [], []
        for prompt, target in batch:
            p = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            t_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
            ids.append(p_ids + t_ids)
            labels.append([-100] * len(p_ids) + t_ids)
        width = max(map(len, ids))
        x = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids])
        y = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
        loss = model(input_ids=x, attention_mask=attn, labels=y, mm_token_type_ids=torch.zeros_like(x)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return lm


def test_a_judge_that_follows_the_format_yields_scores(trained_judge):
    judge = LLMJudge(trained_judge, "mmaipv", max_parse_retries=1, max_new_tokens=40)
    judgments = judge.score(SAMPLE, ANSWERS * 4)
    assert sum(j.ok for j in judgments) >= 6  # most answers parse now
    for j in judgments:
        if j.ok:
            assert set(j.scores) == {"relevance", "accuracy", "clarity"} and 1 <= j.overall <= 5


def test_malformed_judge_output_is_counted_nothing_is_lost_and_the_queue_pushes_back(
        ray_local, world, sft_zoo, tiny_ckpt, tmp_path):
    """An LLM judge whose every answer is malformed (the random tiny model): each response gets a
    failure record with its raw text, no pair is invented, and the slow judge throttles the
    generators through the bounded queue instead of letting the backlog grow."""
    from vpref.build import DataEngine

    cfg = engine_config(world, sft_zoo, tmp_path, "judge.kind=llm", f"judge.model={tiny_ckpt}",
                        "judge.max_parse_retries=1", "judge.max_new_tokens=16", "judge.pool.max=1",
                        "judge.pool.batch_size=4", "build.queue_size=6")
    samples = load_manifest(world / "train.jsonl").samples[:40]
    engine = DataEngine(cfg, tmp_path / "state")
    try:
        res = engine.build(samples, tmp_path / "data")
    finally:
        engine.shutdown()
    st = res.status
    assert st["complete"] and st["responses"] == st["judged"] == st["judge_failures"] == 3 * 40
    assert st["pairs"] == 0
    judgments = read_records(tmp_path / "data", "judgments")
    assert len(judgments) == 120 and all(not j.ok and j.raw is not None and j.attempts == 2 for j in judgments)
    assert {j.judge for j in judgments} == {f"llm:{tiny_ckpt.name}"}
    # Backpressure: persisted-but-unjudged responses never exceed the queue bound plus what is in
    # hands (one executing batch per generator: 8x2 + 8x1 responses, one judge batch of 4).
    backlog = max(r - j for _, r, j, _, _ in res.timeline)
    assert max(d for *_, d, _ in res.timeline) <= 6
    assert backlog <= 6 + 16 + 8 + 4 < 120


@pytest.fixture()
def served_judge(trained_judge):
    """The trained tiny judge served over HTTP on loopback as an OpenAI-compatible endpoint."""
    import threading

    from vpref.models.openai_chat import serve_loopback

    lock = threading.Lock()
    seen = []

    def reply(body, request):
        seen.append((request.path, body["model"], request.headers.get("Authorization")))
        with lock:  # one model, one request at a time
            return trained_judge.chat([body["messages"][0]["content"]], body["max_tokens"], body["temperature"],
                                      body.get("seed", 0))[0]

    server, base = serve_loopback(reply)
    yield base, seen
    server.shutdown()


def test_openai_compatible_endpoint_judge(served_judge, monkeypatch):
    from vpref.models.openai_chat import OpenAIChat

    base, seen = served_judge
    monkeypatch.setenv("VPREF_TEST_KEY", "sk-test")
    judge = LLMJudge(OpenAIChat(base, "tiny-judge", "VPREF_TEST_KEY", concurrency=2), "mmaipv", max_parse_retries=1,
                     max_new_tokens=40)
    judgments = judge.score(SAMPLE, ANSWERS * 3)
    assert judge.name == "llm:tiny-judge" and sum(j.ok for j in judgments) >= 4
    assert seen[0] == ("/v1/chat/completions", "tiny-judge", "Bearer sk-test")


def test_an_unreachable_endpoint_is_a_clear_error_and_a_failure_record():
    import socket

    from vpref.actors.judge import failed_items
    from vpref.models.openai_chat import EndpointError, OpenAIChat

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    judge = LLMJudge(OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", retries=1, timeout_s=2), "mmaipv")
    with pytest.raises(EndpointError, match=f"127.0.0.1:{port}/v1/chat/completions failed after 2 attempts"):
        judge.score(SAMPLE, ANSWERS[:1])
    items = [{"kind": "response", "response_id": "r1", "sample_id": "s1"},
             {"kind": "pair", "verdict_id": "v1", "sample_id": "s1", "first_id": "a", "second_id": "b"}]
    js, vs = failed_items(judge, items, "judge error: EndpointError: down")
    assert [(j.response_id, j.ok, j.overall, j.error) for j in js] == [("r1", False, None, "judge error: EndpointError: down")]
    assert [(v.verdict_id, v.ok, v.preferred) for v in vs] == [("v1", False, None)]
