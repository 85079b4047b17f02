"""LLM judges on real models: SmolLM2-135M-Instruct (a real pretrained instruct model shipped in
a PyPI wheel), the random tiny Qwen2.5-VL (no mass on any label: explicit failures), and a tiny
model trained for a few seconds to answer in the rubric's format, also served over real HTTP on
loopback as an OpenAI-compatible endpoint with log-probs -- with injected faults."""

import os
import time

import numpy as np
import pytest
import torch

from conftest import engine_config
from vpref.data.manifest import load_manifest
from vpref.data.schema import read_records
from vpref.data.world import perturb
from vpref.errors import WorkFailed
from vpref.judges.base import ResponseView, SampleView
from vpref.judges.engines.hf import ChatLM
from vpref.judges.engines.loopback import ModelServer
from vpref.judges.engines.openai import OpenAIChat
from vpref.judges.llm import LLMJudge
from vpref.judges.reference import ReferenceJudge
from vpref.judges.rubric import load_rubric

CAPTION = "There are two shapes. First, a red circle appears and moves left. Last, a blue square appears and stays still."
SAMPLE = SampleView("s1", "What colour is the circle?", "The circle is red.", CAPTION, "colour")
ANSWERS = [ResponseView("good", "The circle is red."), ResponseView("bad", "The circle is green.")]
# Judge actors are Ray workers: they see the environment the local cluster started with, so the
# key of the end-to-end build is set when pytest imports this module (before any ray.init).
E2E_KEY = "sk-e2e-9f3a7c1d-never-written"
os.environ.setdefault("VPREF_E2E_KEY", E2E_KEY)


def _check_accounting(judge, judgments, responses=ANSWERS):
    """Every response gets exactly one judgment: expected scores from distributions, or an
    explicit failure with its reason -- never a silent number."""
    assert [j.response_id for j in judgments] == [r.response_id for r in responses]
    aspects = set(judge.spec.aspects)
    for j in judgments:
        assert j.rubric_version == judge.rubric_version and j.raw
        if j.ok:
            assert set(j.scores) == aspects and all(1 <= v <= 5 for v in j.scores.values())
            assert j.overall == pytest.approx(sum(j.scores.values()) / len(j.scores), abs=1e-3)
            for a in aspects:
                dist = j.distributions[a]
                assert sum(dist.values()) == pytest.approx(1.0, abs=1e-4)
                assert j.scores[a] == pytest.approx(sum(int(k) * p for k, p in dist.items()), abs=1e-3)
                assert j.label_mass[a] >= judge.min_label_mass
        else:
            assert j.overall is None and j.scores == {} and j.failure and j.error


@pytest.fixture(scope="module")
def smol():
    from vpref.models.smollm2 import smollm2_checkpoint

    try:
        return ChatLM.load(smollm2_checkpoint())
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_smollm2_distributional_judge_scores_every_answer(smol):
    """Free text fails with SmolLM2 (it copies the placeholders); its label distribution after the
    prefill does not: every judgment is ok, with distribution, label mass and expected score."""
    judge = LLMJudge(smol, "vlfeedback")
    assert judge.name == "llm:SmolLM2-135M-Instruct" and judge.mode == "distribution"
    judgments = judge.score(SAMPLE, ANSWERS)
    _check_accounting(judge, judgments)
    assert all(j.ok and j.path == "logprobs" for j in judgments)
    # Pairwise: SmolLM2 puts ~3% of its mass on A/B after "Winner: " (it writes "<A or B>"), and
    # what it puts there goes to position A in both orders: a counted low-mass failure, both
    # orders' probabilities kept, symmetrised to ~0.5.
    v = judge.compare(SAMPLE, *ANSWERS)
    assert v.path == "logprobs" and set(v.probs_ab) == set(v.probs_ba) == {"A", "B"}
    assert v.p_first == pytest.approx((v.probs_ab["A"] + v.probs_ba["B"]) / 2, abs=1e-5)
    assert v.ok or (v.failure == "low_mass" and "label mass" in v.error and v.preferred is None)
    assert v.consistent == (v.ok and (v.winner_ab == "A") != (v.winner_ba == "A"))
    # a rationale is asked after the scores: it cannot change them
    with_why = LLMJudge(smol, "vlfeedback", rationale=True, max_new_tokens=12).score(SAMPLE, ANSWERS[:1])[0]
    assert with_why.rationale and with_why.scores == judgments[0].scores


def test_random_tiny_model_judgments_are_explicit_failures(tiny_ckpt):
    lm = ChatLM.load(tiny_ckpt)
    judge = LLMJudge(lm, "mmaipv")
    judgments = judge.score(SAMPLE, ANSWERS)
    _check_accounting(judge, judgments)
    for j in judgments:  # the distributions are kept on the failure record, for inspection
        assert not j.ok and j.failure == "low_mass" and "below judge.min_label_mass" in j.error
        assert j.attempts == 1 and set(j.distributions) == set(judge.spec.aspects)
        assert max(j.label_mass.values()) < 0.25
    text = LLMJudge(lm, "mmaipv", mode="text", max_parse_retries=1, max_new_tokens=12).score(SAMPLE, ANSWERS)
    assert all(not j.ok and j.failure == "unparsed" and j.attempts == 2 and j.path == "text" for j in text)


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
    text = LLMJudge(trained_judge, "mmaipv", mode="text", max_parse_retries=1, max_new_tokens=40)
    judgments = text.score(SAMPLE, ANSWERS * 4)
    assert sum(j.ok for j in judgments) >= 6  # most answers parse now
    dist = LLMJudge(trained_judge, "mmaipv")
    judgments = dist.score(SAMPLE, ANSWERS)
    _check_accounting(dist, judgments)
    assert all(j.ok and min(j.label_mass.values()) > 0.5 for j in judgments)


def test_malformed_judge_output_is_counted_nothing_is_lost_and_the_queue_pushes_back(
        ray_local, world, sft_zoo, tiny_ckpt, tmp_path):
    """An LLM judge with no mass on any label (the random tiny model): each response gets a failure
    record with its reason, no pair is invented, and the slow judge throttles the generators
    through the bounded queue instead of letting the backlog grow."""
    from vpref.build import DataEngine

    cfg = engine_config(world, sft_zoo, tmp_path, "judge.kind=llm", f"judge.model={tiny_ckpt}",
                        "judge.pool.max=1", "judge.pool.batch_size=4", "build.queue_size=6",
                        "build.max_judge_failure_rate=1.0")  # all fail here: count them all, do not stop early
    samples = load_manifest(world / "train.jsonl").samples[:40]
    engine = DataEngine(cfg, tmp_path / "state")
    try:
        with pytest.raises(WorkFailed, match="no pairs") as e:  # a build that made no pair exits non-zero
            engine.build(samples, tmp_path / "data")
        res = e.value.result
    finally:
        engine.shutdown()
    st = res.status
    assert st["complete"] and st["responses"] == st["judged"] == st["judge_failures"] == 3 * 40
    assert st["pairs"] == 0
    judgments = read_records(tmp_path / "data", "judgments")
    assert len(judgments) == 120 and all(not j.ok and j.failure == "low_mass" and j.raw for j in judgments)
    assert {j.judge for j in judgments} == {f"llm:{tiny_ckpt.name}"}
    # Backpressure: persisted-but-unjudged responses never exceed the queue bound plus what is in
    # hands (one executing batch per generator: 8x2 + 8x1 responses, one judge batch of 4).
    backlog = max(r - j for _, r, j, _, _ in res.timeline)
    assert max(d for *_, d, _ in res.timeline) <= 6
    assert backlog <= 6 + 16 + 8 + 4 < 120


# --------------------------------------------------------------------------- endpoint judges


@pytest.fixture()
def served(trained_judge):
    """The trained tiny judge behind an OpenAI-compatible endpoint on loopback (real HTTP)."""
    server = ModelServer(trained_judge)
    yield server
    server.shutdown()


def test_endpoint_judge_reads_the_distributions_the_hf_engine_computes(served, trained_judge, monkeypatch):
    monkeypatch.setenv("VPREF_TEST_KEY", "sk-test")
    api = OpenAIChat(served.base_url, "tiny-judge", "VPREF_TEST_KEY", concurrency=2, prefill="continue")
    judge = LLMJudge(api, "mmaipv")
    assert judge.name == "llm:tiny-judge"
    got = judge.score(SAMPLE, ANSWERS)
    _check_accounting(judge, got)
    want = LLMJudge(trained_judge, "mmaipv").score(SAMPLE, ANSWERS)
    for g, w in zip(got, want):  # teacher forcing vs reading the reply's top-20: one distribution
        assert g.ok and g.path == "logprobs" and g.requests >= 1 and g.input_tokens > 0
        for a in w.distributions:
            assert g.distributions[a] == pytest.approx(w.distributions[a], abs=5e-3)
    assert set(served.auth) == {"Bearer sk-test"}
    # any endpoint (no prefill): one request per judgment, read along the reply it writes
    n = served.requests
    plain = LLMJudge(OpenAIChat(served.base_url, "tiny-judge", concurrency=2), "mmaipv").score(SAMPLE, ANSWERS)
    assert served.requests - n == 2 and all(j.ok and j.requests == 1 for j in plain)


def test_endpoint_faults_are_retried_and_nothing_is_lost(served):
    """429 with Retry-After, 500, a dropped connection, malformed JSON and a hang past the timeout
    are each retried (the 429 after the time it asks for); a reply without log-probs is parsed
    strictly instead, and says so."""
    served.faults = ["429:1", "500", "drop", "malformed", "hang:2.5", "nologprobs"]
    api = OpenAIChat(served.base_url, "tiny-judge", concurrency=1, timeout_s=1.5, retries=5, backoff_s=0.01,
                     prefill="continue")
    t0 = time.perf_counter()
    first, second = LLMJudge(api, "mmaipv").score(SAMPLE, ANSWERS)
    assert time.perf_counter() - t0 >= 1.0 + 1.5  # Retry-After, then the timeout
    assert api.retry_causes == {"rate_limited": 1, "server_error": 1, "connection": 1, "malformed": 1, "timeout": 1}
    assert first.ok and first.path == "text" and all(set(d.values()) <= {0.0, 1.0} for d in first.distributions.values())
    assert second.ok and second.path == "logprobs"


def test_an_endpoint_that_keeps_failing_opens_the_breaker(served):
    served.faults = ["500"] * 40
    api = OpenAIChat(served.base_url, "tiny-judge", concurrency=1, retries=1, backoff_s=0.01, breaker_failures=2)
    judgments = LLMJudge(api, "mmaipv").score(SAMPLE, ANSWERS * 3)
    assert [j.response_id for j in judgments] == ["good", "bad"] * 3  # every answer has its record
    assert [j.failure for j in judgments] == ["endpoint"] * 2 + ["circuit_open"] * 4
    assert served.requests == 4  # 2 requests x 2 attempts; then nothing is sent
    assert all(served.base_url in j.error and "HTTP 500" in j.error and not j.ok for j in judgments)
    assert "circuit open" in judgments[-1].error and "not sent" in judgments[-1].error


def test_an_unreachable_endpoint_is_a_clear_error_and_a_failure_record():
    import socket

    from vpref.actors.judge import failed_items
    from vpref.judges.engines.openai import EndpointError

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    api = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", retries=1, timeout_s=2, backoff_s=0.01)
    with pytest.raises(EndpointError, match=f"127.0.0.1:{port}/v1/chat/completions failed after 2 attempts"):
        api.chat(["hello"])  # chat() raises: its callers (free-text judges, evaluation) record it
    judge = LLMJudge(api, "mmaipv")
    [j] = judge.score(SAMPLE, ANSWERS[:1])  # the scoring path records it per answer
    assert not j.ok and j.failure == "endpoint" and "cannot connect" in j.error
    items = [{"kind": "response", "response_id": "r1", "sample_id": "s1"},
             {"kind": "pair", "verdict_id": "v1", "sample_id": "s1", "first_id": "a", "second_id": "b"}]
    js, vs = failed_items(judge, items, "judge error: EndpointError: down")
    assert [(j.response_id, j.ok, j.overall, j.error) for j in js] == [("r1", False, None, "judge error: EndpointError: down")]
    assert [(v.verdict_id, v.ok, v.preferred) for v in vs] == [("v1", False, None)]


def test_the_shared_rate_limit_spaces_requests():
    from vpref.judges.engines.ratelimit import RateLimiter

    now = [0.0]
    lim = RateLimiter(requests_per_minute=60, tokens_per_minute=600, burst_s=2, clock=lambda: now[0])
    assert [lim.reserve(5) for _ in range(2)] == [0.0, 0.0]  # a burst of two seconds' quota
    assert lim.reserve(5) == pytest.approx(1.0)  # then one request a second
    assert lim.reserve(100) == pytest.approx(9.5)  # 100 tokens at 10/s, 5 of them still in the bucket
    now[0] += 30
    lim.settle(-50)  # the last request used 50 tokens fewer than reserved
    assert lim.reserve(0) == 0.0


def test_judge_actors_share_one_rate_limit(ray_local):
    """Two handles on one endpoint (two judge actors) draw from one named bucket actor."""
    from vpref.judges.engines.ratelimit import SharedLimit

    a, b = SharedLimit("http://h/v1|m", 60, None), SharedLimit("http://h/v1|m", 60, None)
    waits = [h._call("reserve", 0) for h in (a, b) * 5]  # ten seconds' quota at one a second
    assert waits == [0.0] * 10
    assert b._call("reserve", 0) == pytest.approx(1.0, abs=0.05) and a._call("reserve", 0) == pytest.approx(2.0, abs=0.05)
    assert SharedLimit("http://other/v1|m", 60, None)._call("reserve", 0) == 0.0


@pytest.mark.slow
def test_endpoint_build_with_generated_captions_is_cached_and_never_writes_the_key(
        ray_local, world, sft_zoo, served, tmp_path, capfd):
    """A manifest without captions, the zoo's captioner writing them (3 clips per video), an endpoint
    judge behind a shared rate limit: every judgment ok or an explicit failure, pairs carry the
    distributions, the card has the judge's usage and cost; a second identical build sends zero
    requests; the API key appears in no output and no log."""
    import json

    from vpref.build import DataEngine
    from vpref.data.card import write_card

    samples = [s for s in load_manifest(world / "train.jsonl").samples if s.family != "describe"][:4]
    (tmp_path / "nocap.jsonl").write_text("".join(json.dumps({"id": s.id, "video": s.video, "question": s.question,
                                                              "answer": s.answer, "meta": s.meta}) + "\n"
                                                  for s in samples))
    samples = load_manifest(tmp_path / "nocap.jsonl", world).samples
    assert samples and not any(s.caption for s in samples)
    zoo = (f"zoo=[{{name: policy, path: '{sft_zoo}/policy', policy: true, batch_size: 8, resources: {{num_cpus: 0.5}},"
           f" sampling: {{temperature: 1.0, n: 2, max_new_tokens: 12}}}},"
           f" {{name: cap, path: '{sft_zoo}/other', role: captioner, batch_size: 8, resources: {{num_cpus: 0.5}},"
           f" sampling: {{temperature: 0.0, max_new_tokens: 12}}}}]")
    cfg = engine_config(world, sft_zoo, tmp_path, zoo, "judge.kind=llm", "judge.backend=openai",
                        "judge.model=tiny-judge", f"judge.api_base={served.base_url}", "judge.api_prefill=continue",
                        "judge.api_key_env=VPREF_E2E_KEY", f"judge.api_cache_dir={tmp_path / 'cache'}",
                        "judge.api_requests_per_minute=6000", "judge.price_input_per_mtok=2.5",
                        "judge.price_output_per_mtok=10", "judge.pool.max=1", "pairs.min_margin=0.0")
    engine = DataEngine(cfg, tmp_path / "state")
    try:
        first = engine.build(samples, tmp_path / "b1")
        sent = served.requests
        second = engine.build(samples, tmp_path / "b2")
    finally:
        engine.shutdown()
    assert sent > 0 and served.requests == sent  # the second build was answered by the cache alone
    assert first.status["complete"] and second.status["complete"] and first.status["judged"] == 8
    caps = [json.loads(line) for line in (tmp_path / "b1" / "captions.jsonl").read_text().splitlines()]
    assert {c["video"] for c in caps} == {s.video for s in samples}
    assert all(c["clips"] == 3 and len(c["parts"]) == 3 and c["caption"].startswith("Part 1 of 3: ") for c in caps)
    assert sorted(i for c in caps for i in c["samples"]) == sorted(s.id for s in samples)  # the provenance
    plan = json.loads((tmp_path / "b1" / "plan.json").read_text())
    assert {v["caption"] for v in plan["samples"].values()} == {c["caption"] for c in caps}  # the judge's context
    j1 = sorted(read_records(tmp_path / "b1", "judgments"), key=lambda j: j.response_id)
    j2 = sorted(read_records(tmp_path / "b2", "judgments"), key=lambda j: j.response_id)
    assert all(j.ok or (j.failure and j.error) for j in j1) and sum(j.ok for j in j1) >= 6
    assert [j.overall for j in j1] == [j.overall for j in j2]
    assert all(j.cache_hit and j.requests == 0 and j.cost_usd == 0 for j in j2)
    assert sum(j.cost_usd for j in j1) > 0 and all(j.input_tokens > 0 for j in j1 if j.ok)
    pairs = read_records(tmp_path / "b1", "pairs")
    assert pairs and all(set(p.chosen_distributions) == {"relevance", "accuracy", "clarity"} for p in pairs)
    stats = write_card(tmp_path / "b1", first.summary())
    usage = stats["judge"]["usage"]
    assert usage["requests"] >= 8 and usage["input_tokens"] > 0 and usage["cost_usd"] > 0
    assert stats["judge"]["generated_captions"]["questions"] == len(samples)
    assert "## Judge" in (tmp_path / "b1" / "README.md").read_text()
    assert f"Endpoint usage: {usage['requests']} requests" in (tmp_path / "b1" / "README.md").read_text()
    assert write_card(tmp_path / "b2")["judge"]["usage"]["cache_hits"] == 8
    # the key: sent to the endpoint, written nowhere
    assert set(served.auth) == {f"Bearer {E2E_KEY}"}
    out, err = capfd.readouterr()
    assert E2E_KEY not in out + err
    import ray

    logs = ray._private.worker._global_node.get_session_dir_path()
    for root in (tmp_path, logs):
        for p in __import__("pathlib").Path(root).rglob("*"):
            if p.is_file() and p.stat().st_size < 50_000_000:
                data = p.read_bytes()
                assert E2E_KEY.encode() not in data, p
                if p.suffix == ".gz":
                    import gzip

                    assert E2E_KEY.encode() not in gzip.decompress(data), p
