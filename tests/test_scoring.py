"""The scoring seam under every LLM judge: label distributions by teacher forcing on real models
(the random tiny Qwen2.5-VL, SmolLM2's tokenizer), candidate tokenisation in context, the
terminator rule, and reading labels off an endpoint reply's top logprobs."""

import math

import pytest
import torch

from vpref.judges.engines.reading import Reply, read_step
from vpref.judges.parsing import JudgeParseError, parse_label
from vpref.judges.scoring import (Chain, LabelQuery, LabelScores, candidate_ids, common_prefix, complete_probs,
                                  label_distributions, plan_rows, sequential_chains, to_distribution)

SCALE10 = tuple(str(i) for i in range(1, 11))


@pytest.fixture(scope="module")
def tiny_lm(tiny_ckpt):
    from vpref.judges.engines.hf import ChatLM

    return ChatLM.load(tiny_ckpt)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from vpref.models.smollm2 import smollm2_checkpoint

    try:
        return AutoTokenizer.from_pretrained(smollm2_checkpoint())
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _logp(lm, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        return lm.model(input_ids=x, mm_token_type_ids=torch.zeros_like(x)).logits[0].float().log_softmax(-1)


def test_distribution_matches_a_hand_computation_on_a_tiny_model(tiny_lm):
    """Labels 1..10 after "Relevance: " on the tiny tokenizer, whatever it merges (a space into
    'Ġ1', or '10' as one token after 'Ġ'): every label's probability is recomputed here from plain
    forwards of the model over its own in-context tokens, and "1" loses what goes on to "10" when
    "10"'s tokens extend "1"'s."""
    q = LabelQuery("Rate the answer.", "Relevance: ", SCALE10)
    got = tiny_lm.label_logprobs([q])[0].probs
    text = tiny_lm.render(q.prompt, q.prefill)
    enc = tiny_lm.encode
    ids = {lbl: enc(text + lbl) for lbl in SCALE10}
    start = min(common_prefix(ids["1"], ids[lbl]) for lbl in SCALE10)  # the first token some label changes
    assert start < len(enc(text)) + 1

    def seq_p(full):
        lp = _logp(tiny_lm, full)
        return float(sum(lp[i - 1, full[i]] for i in range(start, len(full))).exp())

    want = {lbl: seq_p(ids[lbl]) for lbl in SCALE10}
    if ids["10"][:len(ids["1"])] == ids["1"]:  # "10" continues "1" token by token: the terminator rule
        want["1"] -= want["10"]
    assert max(len(ids[lbl]) - start for lbl in SCALE10) >= 2  # some label is more than one token here
    for lbl in SCALE10:
        assert got[lbl] == pytest.approx(want[lbl], rel=1e-4, abs=1e-9), lbl
    d = to_distribution(LabelScores(got), SCALE10, min_mass=0.25)
    assert d.mass == pytest.approx(sum(got.values())) and sum(d.probs.values()) == pytest.approx(1.0)
    assert d.expected == pytest.approx(sum(int(k) * p for k, p in d.probs.items()))
    assert not d.ok and d.failure == "low_mass" and "below judge.min_label_mass 0.25" in d.error  # a random model


def test_batched_scoring_and_the_cached_chain_agree_with_one_query_at_a_time(tiny_lm):
    qs = [LabelQuery("Which answer is better? " * k, "Winner: ", ("A", "B")) for k in (1, 3)]
    qs.append(LabelQuery("Rate it.", "Relevance: ", SCALE10))
    together = tiny_lm.label_logprobs(qs)
    for q, t in zip(qs, together):
        alone = tiny_lm.label_logprobs([q])[0]
        assert alone.probs == pytest.approx(t.probs, rel=1e-4, abs=1e-9)
    steps = (("Relevance: ", ("1", "2", "3")), ("\nAccuracy: ", SCALE10))
    chains = [Chain("Judge this.", steps), Chain("Judge that, please.", steps)]
    plain = sequential_chains(tiny_lm, chains)
    cached = tiny_lm.label_chains(chains)
    for a, b in zip(plain, cached):
        for x, y in zip(a, b):
            assert x.mode == y.mode and x.probs == pytest.approx(y.probs, abs=1e-5)


def test_candidates_are_tokenised_in_context(smol_tokenizer):
    enc = lambda t: smol_tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    full, start = candidate_ids(enc, "Reply.\nanswer: ", ("A", "B"))
    # the space of the prefill merges into the letter: the label tokens start one position earlier
    assert [smol_tokenizer.convert_ids_to_tokens(f[start:]) for f in full] == [["ĠA"], ["ĠB"]]
    full, start = candidate_ids(enc, "Reply.\nScore: ", ("5", "10"))
    assert [smol_tokenizer.convert_ids_to_tokens(f[start:]) for f in full] == [["5"], ["1", "0"]]
    rows, which = plan_rows(full, start)  # one sequence covers both: "5" reads its last-but-one position
    assert rows == [full[1][:-1]] and which == [0, 0]
    with pytest.raises(ValueError, match="non-empty labels"):
        LabelQuery("p", "x", ("A", ""))


def test_the_terminator_keeps_1_from_taking_the_mass_of_10():
    full = [[7, 1], [7, 1, 0], [7, 5]]  # "1", "10", "5" after the prefix [7]
    lp = [[math.log(0.6)], [math.log(0.6), math.log(0.5)], [math.log(0.3)]]
    p1, p10, p5 = complete_probs(full, 1, lp)
    assert (p1, p10, p5) == pytest.approx((0.3, 0.3, 0.3))


def test_a_chain_prefills_each_step_with_the_most_likely_labels():
    class Recorder:  # an engine that answers from a table, to see the prefills a chain asks
        def __init__(self):
            self.seen = []

        def label_logprobs(self, queries):
            self.seen += [q.prefill for q in queries]
            return [LabelScores({"4": 0.7, "2": 0.2}) if "Acc" not in q.prefill else LabelScores({"1": 0.9})
                    for q in queries]

    rec = Recorder()
    (a, b), = sequential_chains(rec, [Chain("p", (("Rel: ", ("2", "4")), ("\nAcc: ", ("1", "2"))))], 0.5)
    assert rec.seen == ["Rel: ", "Rel: 4\nAcc: "]
    assert a.ok and a.mode == "4" and a.mass == pytest.approx(0.9) and a.expected == pytest.approx((4 * .7 + 2 * .2) / .9)
    assert b.ok and b.probs == {"1": 1.0, "2": 0.0}
    empty = label_distributions(rec, [], 0.5)
    assert empty == []


def _tok(s, p, top=()):
    return (s, math.log(p), [(t, math.log(q)) for t, q in top])


def test_reading_labels_off_an_endpoints_top_logprobs():
    reply = Reply("", "Relevance: 4\nAccuracy: 2", [
        _tok("Relevance", .9), _tok(":", .9), _tok(" 4", .6, [(" 4", .6), (" 5", .3), (" <", .05)]), _tok("\n", .9),
        _tok("Accuracy", .9), _tok(":", .9), _tok(" ", .8, [(" ", .8), (" 3", .1)]), _tok("2", .5, [("2", .5), ("1", .4)]),
    ], "stop")
    labels = ("1", "2", "3", "4", "5")
    first = read_step(reply, "Relevance:", labels)
    assert first.reached and first.greedy == "4" and first.probs == pytest.approx(
        {"1": 0, "2": 0, "3": 0, "4": 0.6, "5": 0.3})  # " <" is no label: missing mass
    second = read_step(reply, "Accuracy:", labels, first.end)
    # a merged " 3", and after the lone space (the generated token) the digits of the next position
    assert second.probs == pytest.approx({"1": 0.8 * 0.4, "2": 0.8 * 0.5, "3": 0.1, "4": 0, "5": 0})
    # no merged label at all (SmolLM2 keeps the space apart): the digits are read given the space the
    # reply wrote, not times p(" ") = 0.09 (which made a low-mass failure of what HF scores at mass 0.9)
    apart = Reply("Relevance:", " 1-5", [_tok(" ", .09, [(" The", .5), (" ", .09), (" It", .08)]),
                                         _tok("1", .8, [("1", .8), ("2", .1)]), _tok("-", .9), _tok("5", .9)], "length")
    got = read_step(apart, "Relevance:", labels)
    assert got.probs == pytest.approx({"1": 0.8, "2": 0.1, "3": 0, "4": 0, "5": 0})
    ten = Reply("Score: ", "10}", [_tok("1", .7, [("1", .7), ("5", .2)]), _tok("0", .6, [("0", .6), ("}", .3)]),
                                   _tok("}", .9)], "stop")
    got = read_step(ten, "Score:", SCALE10)
    assert got.probs["10"] == pytest.approx(0.42) and got.probs["1"] == pytest.approx(0.21)  # "1}" ends "1"
    assert got.probs["5"] == pytest.approx(0.2) and sum(got.probs.values()) < 1  # what top-k hides is lost
    missing = read_step(reply, "Clarity:", labels)
    assert not missing.reached and "does not contain 'Clarity:'" in missing.note


def test_text_replies_are_parsed_strictly():
    assert read_step(Reply("", "Winner: B. It is right.", None), "Winner:", ("A", "B")).probs == {"B": 1.0}
    bad = read_step(Reply("", "Winner: <A or B>", None), "Winner:", ("A", "B"))
    assert not bad.reached and "not one of A, B" in bad.note
    assert parse_label(" **4**/5", ("1", "2", "3", "4", "5")) == "4"
    assert parse_label("10}", SCALE10) == "10"
    for text in ("4.5", "Answer A", "", "A1"):
        with pytest.raises(JudgeParseError):
            parse_label(text, ("A", "B", "4"))


def test_vllm_request_planning():
    """The vLLM engine's pure helpers (the engine itself runs only on a GPU)."""
    from vpref.judges.engines.vllm import maximal_sequences, single_token_plan

    assert single_token_plan([[1, 2, 7], [1, 2, 8]], 2) == ([1, 2], [7, 8])
    assert single_token_plan([[1, 2, 7], [1, 2, 7, 0]], 2) is None  # "1" and "10": teacher forcing rows
    rows, which = maximal_sequences([[1, 2, 7], [1, 2, 7, 0], [1, 2, 8]])
    assert rows == [[1, 2, 7, 0], [1, 2, 8]] and which == [0, 0, 1]


def test_an_endpoint_whose_tokeniser_keeps_the_space_apart_is_read_after_the_space():
    """SmolLM2-like replies over real HTTP: after "Relevance:" the model would rather write text
    (' The' 0.9) than a lone space (0.05), and no merged ' 4' token exists.  The HF engine, which
    tokenises the prefill "Relevance: " in context, scores the labels after the space token; the
    endpoint must too (before: p(space) was multiplied in, and every judgment was a low-mass failure).
    A query deep into a rubric (a long reply already prefilled) asks for a few tokens only: before,
    max_tokens grew with the prefill, up to 512 billed and decoded tokens per label read."""
    from vpref.judges.engines.loopback import ModelServer
    from vpref.judges.engines.openai import OpenAIChat

    def entry(tok, lp, top):
        return {"token": tok, "logprob": lp, "top_logprobs": [{"token": t, "logprob": v} for t, v in top]}

    bodies = []

    class Scripted(ModelServer):
        def complete(self, body, logprobs):
            bodies.append(body)
            prefill = body["messages"][-1]["content"]
            if prefill.endswith(" "):  # the second request, prefilled with the lone space
                content = [entry("4", math.log(0.6), [("4", math.log(0.6)), ("3", math.log(0.3)), ("x", math.log(0.1))]),
                           entry("\n", 0.0, [("\n", 0.0)])]
            else:
                content = [entry(" The", math.log(0.9), [(" The", math.log(0.9)), (" ", math.log(0.05))]),
                           entry(" circle", 0.0, [(" circle", 0.0)])]
            return {"choices": [{"index": 0, "finish_reason": "length", "logprobs": {"content": content},
                                 "message": {"role": "assistant", "content": "".join(e["token"] for e in content)}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": len(content)}}

    server = Scripted(None, model_name="scripted")
    try:
        api = OpenAIChat(server.base_url, "scripted", prefill="continue", concurrency=1, retries=0)
        earlier = "".join(f"Aspect {k}: 3\n" for k in range(40))  # what the chain already wrote
        got = api.label_logprobs([LabelQuery("Rate the answer.", earlier + "Relevance: ",
                                             ("1", "2", "3", "4", "5"))])[0]
    finally:
        server.shutdown()
    assert got.error is None and server.requests == 2
    assert [b["max_tokens"] for b in bodies] == [5, 5]  # the label (1 char) and 4 to spare
    assert got.probs["4"] == pytest.approx(0.6, rel=1e-6) and got.probs["3"] == pytest.approx(0.3, rel=1e-6)
    d = to_distribution(got, ("1", "2", "3", "4", "5"), min_mass=0.25)
    assert d.ok and d.mass == pytest.approx(0.9, rel=1e-6)
