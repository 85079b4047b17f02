"""An LLM judge engine behind an OpenAI-compatible chat-completions endpoint (a hosted API such as
GPT-4o, or a vLLM / SGLang server).  Standard library only.

Scoring: a request asks for `logprobs` with `top_logprobs` (<= 20) and the label distribution is
read where the reply reaches the prefill (`reading.py`); a label outside the top-k has p = 0 and
the judge's mass check catches it.  A reply without log-probs is parsed strictly instead (path
"text").  A rubric's aspects are all read along ONE greedy reply (one request per judgment).

Production: requests of a batch run concurrently up to `concurrency` per actor; a shared rate
limit (requests and tokens per minute) holds across all judge actors; 429, 5xx, timeouts, dropped
connections and malformed replies are retried with exponential backoff and jitter, honouring
`Retry-After`; an endpoint that keeps failing opens a circuit breaker, after which requests fail
fast as explicit failure records naming the endpoint and the cause; usage and cost are counted
per judgment and in Ray metrics; replies are kept in a persistent cache so a repeated build sends
no request twice.  The API key is read from the named environment variable only and never
appears in a message, a log or an output.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from vpref.judges.engines.reading import Reply, read_step
from vpref.judges.engines.transport import CircuitOpen, EndpointError, Transport
from vpref.judges.scoring import (Chain, LabelDist, LabelQuery, LabelScores, Usage, sequential_chains,
                                  to_distribution)

__all__ = ["CircuitOpen", "EndpointError", "OpenAIChat"]


@lru_cache(maxsize=None)
def endpoint_metrics() -> dict:
    from ray.util.metrics import Counter

    tags = ("judge", "model")
    return {
        "requests": Counter("vpref_judge_requests_total", "endpoint requests by outcome", tag_keys=(*tags, "outcome")),
        "retries": Counter("vpref_judge_retries_total", "endpoint retries by cause", tag_keys=(*tags, "cause")),
        "tokens": Counter("vpref_judge_tokens_total", "endpoint tokens", tag_keys=(*tags, "direction")),
        "cost": Counter("vpref_judge_cost_usd_total", "endpoint cost in USD", tag_keys=tags),
        "cache_hits": Counter("vpref_judge_cache_hits_total", "judgments answered from the cache", tag_keys=tags),
    }


class OpenAIChat:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout_s: float = 60.0, retries: int = 3, *, prefill: str = "none", top_logprobs: int = 20,
                 backoff_s: float = 0.5, backoff_max_s: float = 30.0, breaker_failures: int = 5,
                 breaker_cooldown_s: float = 60.0, requests_per_minute: float | None = None,
                 tokens_per_minute: float | None = None, price_input_per_mtok: float = 0.0,
                 price_output_per_mtok: float = 0.0, cache_dir: str | None = None, name: str = ""):
        if not base_url:
            raise ValueError("an OpenAI-compatible judge needs judge.api_base, e.g. http://127.0.0.1:8000/v1")
        if prefill not in ("none", "continue"):
            raise ValueError(f"judge.api_prefill must be none or continue, got {prefill!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.path = model  # what LLMJudge names the judge after
        self.name = name or model  # the metrics' judge tag (a judge actor's name)
        self.concurrency = concurrency
        self.prefill, self.top_logprobs = prefill, top_logprobs
        self.prices = (price_input_per_mtok, price_output_per_mtok)
        # the key: read from the named variable only, sent in the Authorization header only
        self.transport = Transport(self.url, os.environ.get(api_key_env, ""), timeout_s, retries, backoff_s,
                                   backoff_max_s, breaker_failures, breaker_cooldown_s,
                                   on_retry=lambda cause: self._metric("retries", 1, cause=cause))
        self.limit = None
        if requests_per_minute or tokens_per_minute:
            from vpref.judges.engines.ratelimit import SharedLimit

            self.limit = SharedLimit(self.url + "|" + model, requests_per_minute, tokens_per_minute)
        self.cache = None
        if cache_dir:
            from vpref.judges.engines.cache import JudgmentCache

            self.cache = JudgmentCache(cache_dir)
        self._pool = ThreadPoolExecutor(max_workers=concurrency)
        self._lock = threading.Lock()
        self.totals = Usage()  # everything this engine sent and saved

    @classmethod
    def from_config(cls, cfg, name: str = "") -> "OpenAIChat":
        return cls(cfg.api_base, cfg.model, cfg.api_key_env, cfg.api_concurrency, cfg.api_timeout_s, cfg.api_retries,
                   prefill=cfg.api_prefill, top_logprobs=cfg.api_top_logprobs, backoff_s=cfg.api_backoff_s,
                   backoff_max_s=cfg.api_backoff_max_s, breaker_failures=cfg.api_breaker_failures,
                   breaker_cooldown_s=cfg.api_breaker_cooldown_s, requests_per_minute=cfg.api_requests_per_minute,
                   tokens_per_minute=cfg.api_tokens_per_minute, price_input_per_mtok=cfg.price_input_per_mtok,
                   price_output_per_mtok=cfg.price_output_per_mtok, cache_dir=cfg.api_cache_dir, name=name)

    def __repr__(self):  # never the key
        return f"OpenAIChat({self.url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ one request

    @property
    def retry_causes(self) -> dict[str, int]:
        return self.transport.retry_causes

    def _metric(self, name: str, value: float, **tags) -> None:
        try:
            endpoint_metrics()[name].inc(value, tags={"judge": self.name, "model": self.model, **tags})
        except Exception:  # metrics must never fail a judgment
            pass

    def _body(self, prompt: str, prefill: str, max_tokens: int, temperature: float, seed: int,
              logprobs: bool) -> tuple[dict, str]:
        """(request body, assistant text the reply continues)."""
        messages = [{"role": "user", "content": prompt}]
        body = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                "temperature": float(temperature), "seed": int(seed)}
        sent = ""
        if prefill and self.prefill == "continue":
            sent = prefill  # as given (the scoring paths drop a trailing space: the model writes it)
            messages.append({"role": "assistant", "content": sent})
            body.update(continue_final_message=True, add_generation_prompt=False)
        if logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body, sent

    def request(self, prompt: str, prefill: str = "", max_tokens: int = 16, temperature: float = 0.0, seed: int = 0,
                logprobs: bool = True, tag: str = "") -> tuple[Reply, Usage]:
        """One chat completion (from the cache when it was asked before).  Raises EndpointError."""
        body, sent = self._body(prompt, prefill, max_tokens, temperature, seed, logprobs)
        key = self.cache.key(self.model, tag, body) if self.cache is not None else None
        cached = self.cache.get(key) if key else None
        if cached is not None:
            self._metric("cache_hits", 1)
            with self._lock:
                self.totals = self.totals.add(Usage(cache_hits=1))
            return Reply.from_json(cached, sent), Usage(cache_hits=1)
        self.transport.breaker.check(self.url)  # before the rate limit: an open circuit spends no quota
        estimate = len(prompt) // 4 + int(max_tokens)
        if self.limit is not None:
            self.limit.acquire(estimate)
        try:
            reply = self.transport.post(body)
        except EndpointError:
            self._metric("requests", 1, outcome="failed")
            raise
        u = reply.get("usage") or {}
        usage = Usage(requests=1, input_tokens=int(u.get("prompt_tokens") or 0),
                      output_tokens=int(u.get("completion_tokens") or 0))
        usage.cost_usd = (usage.input_tokens * self.prices[0] + usage.output_tokens * self.prices[1]) / 1e6
        if self.limit is not None:
            self.limit.settle(usage.input_tokens + usage.output_tokens - estimate)
        self._metric("requests", 1, outcome="ok")
        self._metric("tokens", usage.input_tokens, direction="input")
        self._metric("tokens", usage.output_tokens, direction="output")
        if usage.cost_usd:
            self._metric("cost", usage.cost_usd)
        with self._lock:
            self.totals = self.totals.add(usage)
        keep = Reply.keep(reply)
        if key:
            self.cache.put(key, keep)
        return Reply.from_json(keep, sent), usage

    # ------------------------------------------------------------------ text

    def chat(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Replies to one user turn each; raises EndpointError when a request fails for good."""
        return self.complete(prompts, [""] * len(prompts), max_new_tokens, temperature, seed)

    def complete(self, prompts: list[str], prefills: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """The reply after each prefill (api_prefill none: the reply after the prefill's last line when
        the model wrote it, else the whole reply)."""
        def one(pf):
            p, f = pf
            reply, _ = self.request(p, f, max_new_tokens, temperature, seed, logprobs=False)
            text = reply.text
            if f and self.prefill == "none":
                head = f.strip().splitlines()[-1] if f.strip() else ""
                i = text.find(head) if head else -1
                text = text[i + len(head):] if i >= 0 else text
            elif f:
                text = text[len(reply.prefix):]
            return text.strip()

        return list(self._pool.map(one, zip(prompts, prefills)))

    # ------------------------------------------------------------------ scoring

    def _failed(self, e: EndpointError, raw=None) -> LabelScores:
        return LabelScores({}, error=str(e), failure="circuit_open" if isinstance(e, CircuitOpen) else "endpoint",
                           raw=raw)

    def _max_tokens(self, steps) -> int:
        """Enough tokens to reach the last label (a token is at least one character).  A continued
        prefill is already written: the reply needs only the text after it, so a query deep into a
        rubric asks for a few tokens, not for the length of everything before it (output tokens are
        what an API bills most and what a server spends its decode steps on)."""
        cont = self.prefill == "continue"
        need = sum((0 if cont and k == 0 else len(before)) + max(map(len, labels))
                   for k, (before, labels) in enumerate(steps)) + 4
        return min(512, need + (0 if cont else 16))

    def _one(self, q: LabelQuery) -> LabelScores:
        """One query.  continue: the prefill goes without its trailing spaces, so the model writes
        the space itself (merged into the label, " 5", or alone); a lone space the reply did not take
        is asked for once more, prefilled with it, so both spellings are counted."""
        cont = self.prefill == "continue"
        sent = q.prefill.rstrip(" ") if cont else q.prefill
        max_tokens = self._max_tokens([(q.prefill, q.labels)])
        try:
            reply, usage = self.request(q.prompt, sent, max_tokens, tag=q.tag)
        except EndpointError as e:
            return self._failed(e)
        header = q.prefill.strip().splitlines()[-1].strip() if q.prefill.strip() else ""
        start = max(0, len(reply.prefix) - len(header)) if cont else 0
        step = read_step(reply, header, q.labels, start)
        probs = dict(step.probs or {})
        spaces = [(w, p) for w, p in (step.unseen or []) if not w.strip()]
        if cont and step.reached and spaces:
            w, p = max(spaces, key=lambda x: x[1])
            try:
                more, u2 = self.request(q.prompt, sent + w, max_tokens, tag=q.tag)
            except EndpointError as e:
                return self._failed(e, reply.text)
            usage = usage.add(u2)
            after = read_step(more, "", q.labels, 0)
            if any(v > 0 for v in probs.values()):
                # the tokeniser merges the space into labels (" 5"): both spellings of "writes ' 5'"
                # count, as the HF engine scores the merged token from before the space
                for lbl, v in (after.probs or {}).items():
                    probs[lbl] = probs.get(lbl, 0.0) + p * v
            else:
                # no merged label token at all: the tokeniser keeps the space apart, and the HF
                # engine (tokenising in context) then scores the labels *after* the prefill's space;
                # so does this, instead of multiplying in p(the model writes a lone space here)
                probs = dict(after.probs or {})
        return LabelScores(probs, path=reply.path, raw=reply.text, usage=usage,
                           error=None if step.reached else step.note, failure="" if step.reached else "unparsed")

    def label_logprobs(self, queries: list[LabelQuery]) -> list[LabelScores]:
        return list(self._pool.map(self._one, queries))

    def label_chains(self, chains: list[Chain], min_mass: float = 0.0) -> list[list[LabelDist]]:
        return list(self._pool.map(lambda c: self._chain(c, min_mass), chains))

    def _chain(self, chain: Chain, min_mass: float) -> list[LabelDist]:
        """Every step read along one greedy reply.  With a continue-capable endpoint, steps the reply
        did not follow (a missing header, or a label other than the most likely one) are asked again
        one by one, prefilled with the most likely labels -- what the HF engine computes."""
        steps = chain.steps
        first = steps[0][0].rstrip(" ") if self.prefill == "continue" else steps[0][0]
        try:
            reply, usage = self.request(chain.prompt, first, self._max_tokens(steps), tag=chain.tag)
        except EndpointError as e:
            err = self._failed(e)
            return [to_distribution(err, labels) for _, labels in steps]
        out: list[LabelDist] = []
        pos = max(0, len(reply.prefix) - len(first.strip())) if self.prefill == "continue" else 0
        written = ""  # the reply with the most likely labels, up to the next step
        for k, (before, labels) in enumerate(steps):
            header = before.strip()
            step = read_step(reply, header, labels, pos)
            scores = LabelScores(step.probs or {}, path=reply.path, raw=reply.text if k == 0 else None,
                                 usage=usage if k == 0 else Usage(), error=None if step.reached else step.note,
                                 failure="" if step.reached else "unparsed")
            d = to_distribution(scores, labels, min_mass)
            missed = sum(p for w, p in (step.unseen or []) if not w.strip())  # a lone space it did not write
            follows = step.reached and d.mode is not None and step.greedy == d.mode and missed < 1e-3
            if not follows and self.prefill == "continue" and reply.path == "logprobs":
                rest = sequential_chains(_InThisThread(self), [Chain(chain.prompt, steps[k:], chain.tag)], min_mass,
                                         start=[(written, [])])[0]
                if k == 0:  # the first request is still paid for
                    rest[0].usage, rest[0].raw = usage.add(rest[0].usage), rest[0].raw or reply.text
                return out + rest
            out.append(d)
            if not step.reached:  # the rest of the reply cannot be located either
                for _, lbls in steps[k + 1:]:
                    out.append(to_distribution(LabelScores({}, path=reply.path, error=f"not read: {step.note}",
                                                           failure="unparsed"), lbls))
                return out
            written += before + (d.mode or "")
            pos = step.end
        return out


class _InThisThread:
    """The engine's queries run in the calling thread: a chain already holds one of the pool's
    threads, and waiting on the same pool from inside it could deadlock."""

    def __init__(self, engine: OpenAIChat):
        self.engine = engine

    def label_logprobs(self, queries: list[LabelQuery]) -> list[LabelScores]:
        return [self.engine._one(q) for q in queries]
