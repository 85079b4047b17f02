"""The one seam between the evaluation suites and a judge: `rate(protocol, items) -> ratings`.

Every judge the suites run -- the reference judge, any LLM engine through text, and (hook) a
distributional scorer on the judges' scoring seam -- implements

    name                                   who judges (named in every table)
    version(protocol) -> str               what it judged with (template hash, or rule hash)
    rate(protocol, items) -> [Rating]      one rating per item, in order

A `Rating` is ok with the protocol's value ({'score': 4}, {'pred': 'yes', 'score': 3},
{'winner': 'A'}), or failed with the reason and the raw reply: an unparseable reply is re-asked a
bounded number of times, then becomes a failure record that the aggregation counts -- never a
silent 0 or None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from vpref.eval import reference_dims
from vpref.eval.protocols import ReplyError, as_one_prompt, protocol, templates


@dataclass(frozen=True)
class Item:
    """One thing to judge: an id and the fields the protocol's template reads (plus `family`)."""

    id: str
    fields: dict


@dataclass
class Rating:
    item_id: str
    ok: bool
    value: dict | None = None
    error: str | None = None
    raw: str | None = None
    attempts: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _missing(proto: str, item: Item) -> list[str]:
    return [k for k in protocol(proto).inputs if item.fields.get(k) is None]


class ReferenceSuiteJudge:
    """The synthetic world's deterministic judge (rules in `vpref.eval.reference_dims`)."""

    name = "reference"

    def version(self, proto: str) -> str:
        return reference_dims.VERSION

    def suite_version(self, suite: str, protocols) -> str:
        return f"{suite}/{reference_dims.VERSION}"

    def rate(self, proto: str, items: list[Item]) -> list[Rating]:
        rule = reference_dims.RULES[protocol(proto).name]
        out = []
        for it in items:
            missing = _missing(proto, it)
            if missing:
                out.append(Rating(it.id, False, error=f"item has no {missing} (protocol {proto} needs them)"))
            else:
                out.append(Rating(it.id, True, rule(it.fields), attempts=1))
        return out


class LLMSuiteJudge:
    """Any chat engine with `chat(prompts, max_new_tokens, temperature, seed) -> [str]` (ChatLM,
    OpenAIChat, VLLMChat): the protocol's template rendered, the reply parsed with the protocol's
    own rule; unparsed replies re-asked (sampled, new seed) up to `max_retries` times."""

    def __init__(self, engine, templates_dir: str | None = None, max_retries: int = 3, max_new_tokens: int | None = None,
                 temperature: float = 0.0, retry_temperature: float = 0.7, batch_size: int = 16):
        self.engine = engine
        self.templates = templates(str(templates_dir) if templates_dir else None)
        self.name = f"llm:{Path(str(engine.path)).name}"
        self.max_retries, self.max_new_tokens = max_retries, max_new_tokens
        self.temperature, self.retry_temperature, self.batch_size = temperature, retry_temperature, batch_size

    def version(self, proto: str) -> str:
        return self.templates.version(proto)

    def suite_version(self, suite: str, protocols) -> str:
        return self.templates.suite_version(suite, protocols)

    def _chat(self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            out += self.engine.chat(prompts[i:i + self.batch_size], max_new_tokens, temperature, seed=seed)
        return out

    def rate(self, proto: str, items: list[Item]) -> list[Rating]:
        p = protocol(proto)
        ratings: dict[int, Rating] = {}
        prompts: dict[int, str] = {}
        for k, it in enumerate(items):
            missing = _missing(proto, it)
            if missing:
                ratings[k] = Rating(it.id, False, error=f"item has no {missing} (protocol {proto} needs them)")
            else:
                prompts[k] = as_one_prompt(*self.templates.render(proto, it.fields))
        todo = sorted(prompts)
        for attempt in range(1 + self.max_retries):
            if not todo:
                break
            temp = self.temperature if attempt == 0 else self.retry_temperature
            try:
                replies = self._chat([prompts[k] for k in todo], self.max_new_tokens or p.reply_tokens, temp,
                                     seed=attempt)
            except Exception as e:  # the engine itself failed (an endpoint down): every item left fails
                for k in todo:
                    ratings[k] = Rating(items[k].id, False, error=f"judge engine failed: {type(e).__name__}: {e}",
                                        attempts=attempt + 1)
                return [ratings[k] for k in range(len(items))]
            still = []
            for k, text in zip(todo, replies):
                try:
                    ratings[k] = Rating(items[k].id, True, p.parse(text), raw=text, attempts=attempt + 1)
                except ReplyError as e:
                    ratings[k] = Rating(items[k].id, False, error=f"unparseable after {attempt + 1} attempts: {e}",
                                        raw=text, attempts=attempt + 1)
                    still.append(k)
            todo = still
        return [ratings[k] for k in range(len(items))]


class DistributionalSuiteJudge:
    """The distributional path on the judges' scoring seam (`vpref.judges.scoring`): the
    probability of each of the protocol's labels right after its prefilled reply (e.g.
    "{'score': " then "0".."5"; a template may override `prefill` and `labels` with `{% set %}`),
    from any engine with `label_logprobs` (HF ChatLM, vLLM, an endpoint's top logprobs).  The value
    is the most likely label (the papers' integer) and the expectation is kept alongside
    (`Protocol.from_label_probs`).  A label mass below `min_mass` is a failure record."""

    def __init__(self, engine, name: str | None = None, templates_dir: str | None = None, batch_size: int = 16,
                 min_mass: float = 0.25):
        self.engine, self.batch_size, self.min_mass = engine, batch_size, min_mass
        self.name = name or f"llm:{Path(str(engine.path)).name}"
        self.templates = templates(str(templates_dir) if templates_dir else None)

    def version(self, proto: str) -> str:
        return self.templates.version(proto) + "+dist"

    def suite_version(self, suite: str, protocols) -> str:
        return self.templates.suite_version(suite, protocols) + "+dist"

    def rate(self, proto: str, items: list[Item]) -> list[Rating]:
        from vpref.judges.scoring import LabelQuery, label_distributions

        p = protocol(proto)
        prefill, labels = self.templates.answer_format(proto)
        ratings: dict[int, Rating] = {}
        queries: dict[int, LabelQuery] = {}
        for k, it in enumerate(items):
            missing = _missing(proto, it)
            if missing:
                ratings[k] = Rating(it.id, False, error=f"item has no {missing} (protocol {proto} needs them)")
            else:
                queries[k] = LabelQuery(as_one_prompt(*self.templates.render(proto, it.fields)), prefill or "",
                                        tuple(labels), tag=self.version(proto))
        todo = sorted(queries)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            try:
                dists = label_distributions(self.engine, [queries[k] for k in chunk], self.min_mass)
            except Exception as e:  # the engine itself failed: these items fail, the rest go on
                dists = [e] * len(chunk)
            for k, d in zip(chunk, dists):
                if isinstance(d, Exception):
                    ratings[k] = Rating(items[k].id, False, error=f"judge engine failed: {type(d).__name__}: {d}")
                elif not d.ok:
                    ratings[k] = Rating(items[k].id, False, error=f"{d.failure or 'failed'}: {d.error}", raw=d.raw)
                else:
                    value = {**p.from_label_probs(d.probs), "label_mass": round(d.mass, 4)}
                    ratings[k] = Rating(items[k].id, True, value, raw=repr({lb: round(q, 4) for lb, q in d.probs.items()}))
        return [ratings[k] for k in range(len(items))]


# --------------------------------------------------------------------------- construction


def make_engine(jcfg):
    """The chat engine of an `eval.judge` config (kind llm)."""
    model = jcfg.model
    if model == "smollm2":  # the packaged SmolLM2-135M-Instruct (no model hub needed)
        from vpref.models.smollm2 import smollm2_checkpoint

        model = str(smollm2_checkpoint())
    if jcfg.backend == "openai":
        from vpref.models.openai_chat import OpenAIChat

        return OpenAIChat(jcfg.api_base, model, jcfg.api_key_env, jcfg.api_concurrency, jcfg.api_timeout_s)
    if jcfg.backend == "vllm":
        from vpref.actors.vllm_backend import VLLMChat

        return VLLMChat(model, jcfg.dtype)
    from vpref.models.text_lm import ChatLM

    return ChatLM.load(model, jcfg.dtype, device="cuda" if jcfg.num_gpus > 0 else "cpu")


def make_suite_judge(jcfg):
    """The judge an `eval.judge` config asks for, in this process."""
    if jcfg.kind == "reference":
        return ReferenceSuiteJudge()
    if jcfg.mode == "distribution":
        return DistributionalSuiteJudge(make_engine(jcfg), None, jcfg.templates_dir, jcfg.batch_size,
                                        jcfg.min_label_mass)
    return LLMSuiteJudge(make_engine(jcfg), jcfg.templates_dir, jcfg.max_retries, jcfg.max_new_tokens,
                         jcfg.temperature, jcfg.retry_temperature, jcfg.batch_size)


class _JudgeHost:
    """Hosts a suite judge in a Ray actor (an LLM judge's model loads once, where its GPU is)."""

    def __init__(self, jcfg_dict: dict):
        from vpref.config import EvalJudgeConfig

        self.judge = make_suite_judge(EvalJudgeConfig(**jcfg_dict))

    def info(self) -> dict:
        return {"name": self.judge.name}

    def version(self, proto: str) -> str:
        return self.judge.version(proto)

    def suite_version(self, suite: str, protocols) -> str:
        return self.judge.suite_version(suite, list(protocols))

    def rate(self, proto: str, items: list[Item]) -> list[Rating]:
        return self.judge.rate(proto, items)


class RemoteSuiteJudge:
    """The same interface, forwarded to a judge in a Ray actor."""

    def __init__(self, jcfg, namespace: str | None = None):
        import ray

        self._ray = ray
        self.actor = ray.remote(_JudgeHost).options(
            name="eval-judge", namespace=namespace, get_if_exists=True, num_cpus=jcfg.num_cpus,
            num_gpus=jcfg.num_gpus, max_restarts=1, max_task_retries=1).remote(jcfg.model_dump())
        self.name = ray.get(self.actor.info.remote())["name"]

    def version(self, proto: str) -> str:
        return self._ray.get(self.actor.version.remote(proto))

    def suite_version(self, suite: str, protocols) -> str:
        return self._ray.get(self.actor.suite_version.remote(suite, list(protocols)))

    def rate(self, proto: str, items: list[Item]) -> list[Rating]:
        return self._ray.get(self.actor.rate.remote(proto, items))

    def shutdown(self) -> None:
        self._ray.kill(self.actor, no_restart=True)


def suite_judge(jcfg, namespace: str | None = None, remote: bool = True):
    """The reference judge runs in the caller; an LLM judge in its own actor when Ray is up."""
    if jcfg.kind == "reference" or not remote:
        return make_suite_judge(jcfg)
    return RemoteSuiteJudge(jcfg, namespace)
