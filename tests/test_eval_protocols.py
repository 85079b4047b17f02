"""The suites' judging protocols: each reply format parsed by its paper's rule, templates as data
(drop-in replacements, versions), the reference judge's dimensions on the world's grammar, and
each aggregation against a hand computation -- the LLM path through a real engine (OpenAIChat
over loopback HTTP) replying with scripted judgments, including unparseable ones."""

import json
import re

import pytest

from vpref.data.manifest import Sample
from vpref.eval import protocols as P
from vpref.eval.judge import Item, LLMSuiteJudge, ReferenceSuiteJudge
from vpref.eval.suites import EvalSets, SuiteContext, run_suite


def test_video_chatgpt_reply_is_a_dict_string_read_with_literal_eval_and_int_truncation():
    assert P.parse_score_dict("{'score': 4.8}") == {"score": 4}  # int(): 4.8 -> 4, as the papers aggregate
    assert P.parse_score_dict("{'score': '3'}") == {"score": 3}
    assert P.parse_score_dict("```python\n{'score': 5}\n```") == {"score": 5}
    for bad, why in [("Score: 4", "not a Python dict"), ("{'pred': 1}", "no 'score'"), ("{'score': 7}", "outside"),
                     ("[4]", "not a dict"), ("", "empty"), ("{'score': 'high'}", "not a number")]:
        with pytest.raises(P.ReplyError, match=why):
            P.parse_score_dict(bad)


def test_zero_shot_yes_no_rule():
    assert P.parse_yes_no_dict("{'pred': 'yes', 'score': 4.9}") == {"pred": "yes", "score": 4}
    assert P.parse_yes_no_dict("{'pred': 'No', 'score': 1}")["pred"] == "no"
    assert P.parse_yes_no_dict("{'pred': 'not sure', 'score': 2}")["pred"] == "no"  # 'no' in 'not': the scripts' rule
    assert P.parse_yes_no_dict("{'pred': 'maybe', 'score': 2}")["pred"] == "neither"
    with pytest.raises(P.ReplyError, match="no 'pred'"):
        P.parse_yes_no_dict("{'score': 2}")


def test_llava_hound_score_line_then_majority_vote():
    assert P.parse_hound_score("It names the right colour.\nScore: 4")["score"] == 4.0
    got = P.parse_hound_score("I would give 3, maybe 5, ok 3 out of it")
    assert got == {"score": 3.0, "how": "majority vote"}
    with pytest.raises(P.ReplyError):
        P.parse_hound_score("no numbers at all")  # the original defaulted to 1; vpref records a failure
    with pytest.raises(P.ReplyError, match="outside"):
        P.parse_hound_score("Score: 9")


def test_mt_bench_verdict_tags():
    assert P.parse_verdict("B is vague. [[A]]") == {"winner": "A"}
    assert P.parse_verdict("[[C]]") == {"winner": "tie"}
    with pytest.raises(P.ReplyError):
        P.parse_verdict("A is better")


def test_templates_render_system_and_user_and_drop_in_replacements_change_the_version(tmp_path):
    t = P.Templates()
    system, user = t.render("vcgpt_consistency", {"question1": "Q one?", "question2": "Q two?", "answer": "A.",
                                                  "prediction1": "p1", "prediction2": "p2"})
    assert system and "Q one?" in user and "Q two?" in user  # both questions (VLM-RLAIF's copy passed Q1 twice)
    with pytest.raises(ValueError, match="needs"):
        t.render("grounded_hound", {"question": "q", "answer": "a", "prediction": "p"})  # no caption
    long = " ".join(["word"] * 300)
    _, user = t.render("grounded_hound", {"caption": "c", "question": "q", "answer": "a", "prediction": long})
    assert user.count("word") == 256  # LLaVA-Hound cuts the prediction to 256 words
    # a user's own prompt file, without blocks, replaces vpref's wording for that protocol only
    (tmp_path / "zeroshot_qa.j2").write_text("{%- set prefill = \"{'pred': \" -%}Q={{ question }} A={{ answer }} "
                                             "P={{ prediction }}")
    mine = P.Templates(tmp_path)
    assert mine.render("zeroshot_qa", {"question": "q", "answer": "a", "prediction": "p"}) == ("", "Q=q A=a P=p")
    assert mine.version("zeroshot_qa") != t.version("zeroshot_qa")
    assert mine.version("vcgpt_detail") == t.version("vcgpt_detail")
    assert mine.answer_format("zeroshot_qa") == ("{'pred': ", ("yes", "no"))
    assert P.protocol("vcgpt_detail").from_label_probs({"3": 0.5, "4": 0.3, "0": 0.2}) == \
        {"score": 3, "expected": pytest.approx(2.7)}


def _item(family, prediction, answer, question="q?", caption=None, **kw):
    return {"family": family, "prediction": prediction, "answer": answer, "question": question, "caption": caption,
            **kw}


def test_reference_dimensions_on_the_world_grammar():
    from vpref.eval import reference_dims as R

    cap = "There are two shapes. First, a red circle appears and moves left. Last, a blue square appears and stays still."
    # QA: the asked value decides correctness; a wrong value 0, no value 1
    qa = dict(question="What colour is the square?", answer="The square is blue.")
    assert R.correctness(_item("colour", "The square is blue.", **qa))["score"] == 5
    assert R.correctness(_item("colour", "It is red.", **qa))["score"] == 0
    assert R.correctness(_item("colour", "A shape.", **qa))["score"] == 1
    assert R.detail(_item("colour", "The square is blue.", **qa))["score"] == 5
    assert R.detail(_item("colour", "blue", **qa))["score"] == 3
    assert R.context(_item("colour", "blue", **qa))["score"] == 5
    assert R.context(_item("colour", "The green triangle.", **qa))["score"] == 0
    # describe: facts; precision-weighted correctness, recall as detail
    half = "There are two shapes. A red circle appears."
    assert R.correctness(_item("describe", cap, cap))["score"] == 5
    assert R.detail(_item("describe", half, cap))["score"] == int(5 * 2 / 7)  # 2 of the caption's 7 facts
    assert R.correctness(_item("describe", half, cap))["score"] == int(5 * 1.25 * (2 / 7) / (0.25 + 2 / 7))
    assert R.temporal(_item("order", "The red circle appears first.", "The red circle appears first."))["score"] == 5
    # consistency: both right 5, one right 2, agreeing on a wrong value 1
    c = dict(answer="The square is blue.", question1="q1", question2="q2")
    assert R.consistency(_item("colour", None, prediction1="blue", prediction2="Blue.", **c))["score"] == 5
    assert R.consistency(_item("colour", None, prediction1="blue", prediction2="red", **c))["score"] == 2
    assert R.consistency(_item("colour", None, prediction1="red", prediction2="red", **c))["score"] == 1
    assert R.zeroshot(_item("colour", "blue", "The square is blue."))["pred"] == "yes"
    assert R.grounded(_item("colour", "The blue square.", "The square is blue.", caption=cap))["score"] == 5.0
    assert R.grounded(_item("colour", "The square is blue, next to a triangle.", "The square is blue.",
                            caption=cap))["score"] == 4.0  # right, but names a shape the caption lacks: -1
    assert R.grounded(_item("colour", "It is blue or green.", "The square is blue.", caption=cap))["score"] == 2.0
    pair = dict(question="q", answer="The square is blue.", caption=cap, family="colour")
    assert R.pairwise({**pair, "response_a": "blue", "response_b": "red"})["winner"] == "A"
    assert R.pairwise({**pair, "response_a": "red", "response_b": "blue"})["winner"] == "B"
    assert R.pairwise({**pair, "response_a": "blue", "response_b": "It is blue."})["winner"] == "tie"


# --------------------------------------------------------------------------- the LLM text path


def _route(prompt: str) -> str:
    """Which scripted reply a prompt gets: its prediction (or first prediction), or for a pairwise
    prompt 'answer A|answer B'."""
    pair = re.search(r"\[Answer A\]\n(\S+).*\[Answer B\]\n(\S+)", prompt, re.S)
    if pair:
        return f"{pair.group(1)}|{pair.group(2)}"
    return re.search(r"Predicted answer(?: to question 1)?: (\S+)", prompt).group(1)


@pytest.fixture
def scripted_endpoint():
    """A real OpenAI-compatible endpoint on loopback: `script[key]` lists the replies to the prompt
    routed to `key`, one per time it is asked (the last one repeats)."""
    from vpref.models.openai_chat import OpenAIChat, serve_loopback

    script, asked = {}, []

    def reply(body, request):
        key = _route(body["messages"][0]["content"])
        asked.append(key)
        replies = script[key]
        return replies[min(asked.count(key), len(replies)) - 1]

    server, url = serve_loopback(reply)
    try:
        yield script, asked, OpenAIChat(url, "scripted-judge", concurrency=2, retries=0)
    finally:
        server.shutdown()


def _qa_set(preds):
    return [Sample(f"s{i}", f"/v{i}.mp4", f"question {i}?", "answer", None, {"family": "colour"})
            for i in range(len(preds))]


def test_zero_shot_accounting_with_an_llm_judge_yes_no_neither_and_failures(scripted_endpoint):
    script, asked, engine = scripted_endpoint
    script.update({
        "p0": ["{'pred': 'yes', 'score': 4.8}"],  # int -> 4
        "p1": ["{'pred': 'yes', 'score': 5}"],
        "p2": ["{'pred': 'no', 'score': 1}"],
        "p3": ["{'pred': 'unclear', 'score': 3}"],  # neither: kept in the score, out of the accuracy
        "p4": ["I think it is fine", "{'pred': 'no', 'score': 2}"],  # re-asked once, then parsed
        "p5": ["nonsense"] * 5,  # never parses: a failure record after 1 + 2 attempts
    })
    preds = ["p0", "p1", "p2", "p3", "p4", "p5"]
    samples = _qa_set(preds)
    judge = LLMSuiteJudge(engine, max_retries=2, batch_size=4)
    answers = {(s.video, s.question): p for s, p in zip(samples, preds)}
    metrics, rows = run_suite("zeroshot", EvalSets(qa={"toy": samples}), SuiteContext(judge, answers, reps=200))
    m = metrics["sets"]["toy"]
    assert (m["yes"], m["no"], m["neither"], m["failed"]) == (2, 2, 1, 1)
    assert m["accuracy"]["value"] == pytest.approx(2 / 4)  # yes / (yes + no)
    assert m["score"]["value"] == pytest.approx((4 + 5 + 1 + 3 + 2) / 5) and m["score"]["n"] == 5
    assert asked.count("p4") == 2 and asked.count("p5") == 3 and asked.count("p0") == 1
    failed = next(r for r in rows if r["item_id"] == "s5")
    assert not failed["ok"] and failed["raw"] == "nonsense" and "after 3 attempts" in failed["error"]
    assert metrics["version"].startswith("zeroshot@")


def test_grounded_mean_share_and_the_papers_fallback(scripted_endpoint):
    script, _, engine = scripted_endpoint
    script.update({"p0": ["Right colour.\nScore: 4"], "p1": ["Wrong.\nScore: 2"], "p2": ["Mostly. Score: 3.5"],
                   "p3": ["between 2 and 5, I say 5"], "p4": ["no idea"]})
    preds = ["p0", "p1", "p2", "p3", "p4"]
    samples = [Sample(f"s{i}", f"/v{i}.mp4", f"q{i}?", "answer", "a caption", {"family": "colour"})
               for i in range(len(preds))]
    answers = {(s.video, s.question): p for s, p in zip(samples, preds)}
    metrics, _ = run_suite("grounded", EvalSets(qa={"toy": samples}),
                           SuiteContext(LLMSuiteJudge(engine, max_retries=0), answers, reps=200))
    m = metrics["sets"]["toy"]
    assert m["score"]["value"] == pytest.approx((4 + 2 + 3.5 + 5) / 4) and m["score"]["failed"] == 1
    assert m["share_ge3"]["value"] == pytest.approx(3 / 4)
    assert m["score_failures_as_1"]["value"] == pytest.approx((4 + 2 + 3.5 + 5 + 1) / 5)  # LLaVA-Hound's figure


def test_video_chatgpt_aggregation_per_dimension_and_mean_of_five(scripted_endpoint):
    script, _, engine = scripted_endpoint
    # a prediction gets the same score in every dimension's template
    script.update({"good": ["{'score': 5}"], "mid": ["{'score': 3.9}"], "bad": ["{'score': 0}"],
                   "x": ["{'score': 2}"]})
    gen = [Sample(f"g{i}", f"/g{i}.mp4", f"g{i}?", "a", None, {"family": "describe"}) for i in range(3)]
    tem = [Sample(f"t{i}", f"/t{i}.mp4", f"t{i}?", "a", None, {"family": "order"}) for i in range(2)]
    con = [Sample("c0", "/c0.mp4", "c0?", "a", None, {"family": "colour", "question2": "c0 again?"})]
    answers = {("/g0.mp4", "g0?"): "good", ("/g1.mp4", "g1?"): "mid", ("/g2.mp4", "g2?"): "bad",
               ("/t0.mp4", "t0?"): "good", ("/t1.mp4", "t1?"): "good",
               ("/c0.mp4", "c0?"): "x", ("/c0.mp4", "c0 again?"): "y"}
    metrics, _ = run_suite("videochatgpt", EvalSets(gen, tem, con),
                           SuiteContext(LLMSuiteJudge(engine, max_retries=0), answers, reps=200))
    d = metrics["dimensions"]
    for dim in ("correctness", "detail", "context"):
        assert d[dim]["value"] == pytest.approx((5 + 3 + 0) / 3) and d[dim]["failed"] == 0  # 3.9 -> 3
    assert d["temporal"]["value"] == 5 and d["consistency"]["value"] == 2
    assert metrics["mean"]["value"] == pytest.approx((3 * (8 / 3) + 5 + 2) / 5)
    lo, hi = metrics["mean"]["ci95"]
    assert lo <= metrics["mean"]["value"] <= hi


def test_win_rate_suite_judges_both_orders_and_applies_the_tie_rules(scripted_endpoint):
    script, asked, engine = scripted_endpoint
    verdicts = {  # model answer -> (verdict with the model as A, verdict with the model as B)
        "m-win": ("[[A]]", "[[B]]"), "m-loss": ("[[B]]", "[[A]]"), "m-biased": ("[[A]]", "[[A]]"),
        "m-tie": ("[[C]]", "[[B]]"), "m-broken": ("[[A]]", "no verdict"),
    }
    model = ["m-win", "m-loss", "m-biased", "m-tie", "m-broken", "same"]
    base = ["b0", "b1", "b2", "b3", "b4", "same"]  # the last pair is identical: a tie without asking
    for m, b in zip(model[:5], base):
        script[f"{m}|{b}"], script[f"{b}|{m}"] = [verdicts[m][0]], [verdicts[m][1]]
    samples = [Sample(f"w{i}", f"/w{i}.mp4", f"w{i}?", "ref", "caption", {"family": "colour"}) for i in range(6)]
    key = [(s.video, s.question) for s in samples]
    ctx = SuiteContext(LLMSuiteJudge(engine, max_retries=0), dict(zip(key, model)), dict(zip(key, base)), "base",
                       winrate_sets=("generic",), reps=200)
    metrics, rows = run_suite("winrate", EvalSets(generic=samples), ctx)
    assert (metrics["wins"], metrics["losses"], metrics["ties"], metrics["identical"], metrics["dropped"]) == \
        (1, 1, 3, 1, 1)
    assert metrics["win_rate"]["value"] == pytest.approx((1 + 0.5 * 3) / 5) and metrics["win_rate"]["n"] == 5
    assert len(rows) == len(asked) == 2 * 5  # identical answers were not sent to the judge
    assert metrics["lc_win_rate"]["value"] is not None


def test_reference_judge_records_missing_inputs_as_failures():
    judge = ReferenceSuiteJudge()
    r = judge.rate("grounded_hound", [Item("x", _item("colour", "blue", "The square is blue."))])  # no caption
    assert not r[0].ok and "caption" in r[0].error


def test_an_engine_that_fails_gives_failure_records_not_an_exception():
    class Down:
        path = "down"

        def chat(self, prompts, max_new_tokens, temperature, seed):
            raise ConnectionError("endpoint 127.0.0.1:9 refused")

    ratings = LLMSuiteJudge(Down()).rate("vcgpt_detail", [Item("a", _item("colour", "p", "a")),
                                                         Item("b", _item("colour", "p", "a"))])
    assert [r.ok for r in ratings] == [False, False] and "refused" in ratings[0].error
    json.dumps([r.to_json() for r in ratings])  # failure records go to eval_ratings.jsonl as they are


def test_distributional_suite_judge_reads_the_protocols_labels_through_the_scoring_seam(tiny_ckpt):
    """eval.judge.mode=distribution on a real (random tiny) HF model: the value is the most likely
    of the labels after the template's prefill, the expectation and the label mass are kept, and a
    mass under the threshold is a failure record with its cause."""
    from vpref.eval.judge import DistributionalSuiteJudge
    from vpref.judges.engines.hf import ChatLM

    engine = ChatLM.load(tiny_ckpt)
    items = [Item("a", _item("colour", "p", "a")), Item("b", _item("shape", "q", "b"))]
    ratings = DistributionalSuiteJudge(engine, min_mass=0.0).rate("vcgpt_correctness", items)
    assert all(r.ok for r in ratings)
    for r in ratings:
        probs = eval(r.raw)  # the renormalised distribution over "0".."5"
        assert sorted(probs) == [str(i) for i in range(6)] and abs(sum(probs.values()) - 1) < 1e-3
        assert r.value["score"] == int(max(probs, key=probs.get))
        assert abs(r.value["expected"] - sum(int(k) * v for k, v in probs.items())) < 1e-3
        assert 0 < r.value["label_mass"] <= 1
    strict = DistributionalSuiteJudge(engine, min_mass=1.0).rate("vcgpt_correctness", items)
    assert [r.ok for r in strict] == [False, False] and all(r.error.startswith("low_mass") for r in strict)
    judge = DistributionalSuiteJudge(engine)
    assert judge.version("vcgpt_correctness").endswith("+dist") and judge.name.startswith("llm:")
