"""A rate limit shared by every judge actor of a run: requests and tokens per minute.

Two token buckets (requests, tokens), each holding `burst_s` seconds of quota, refilled
continuously.  `reserve(tokens)` takes the capacity at once -- into debt if need be -- and returns
how long the caller must wait before sending, so concurrent callers queue fairly in arrival
order.  Token use is estimated before a request and `settle`d with the real count after it.

Inside Ray the buckets live in one small named actor per endpoint in the run's namespace
(`judge-ratelimit-<endpoint>`), so all judge actors on all nodes draw from the same quota; a judge
that finds it gone (its creator was retired by the pool) makes a new one.  Outside Ray the
buckets are shared by the threads of this process.  A 429 from the endpoint is still honoured by
the retries: the buckets only keep the judges from causing most of them.
"""

from __future__ import annotations

import hashlib
import threading
import time


class RateLimiter:
    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 burst_s: float = 10.0, clock=time.monotonic):
        self.clock = clock
        self.rates = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self.capacity = {k: r / 60.0 * burst_s for k, r in self.rates.items() if r}
        self.level = dict(self.capacity)
        self.t = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        dt, self.t = now - self.t, now
        for k, cap in self.capacity.items():
            self.level[k] = min(cap, self.level[k] + dt * self.rates[k] / 60.0)

    def reserve(self, tokens: int = 0) -> float:
        """Take one request and `tokens` tokens; seconds to wait before sending."""
        with self._lock:
            self._refill()
            wait = 0.0
            for k, amount in (("requests", 1.0), ("tokens", float(tokens))):
                if k in self.level:
                    self.level[k] -= amount
                    if self.level[k] < 0:
                        wait = max(wait, -self.level[k] / (self.rates[k] / 60.0))
            return wait

    def settle(self, tokens_delta: int) -> None:
        """Correct the token estimate: positive when the request used more than reserved."""
        with self._lock:
            if "tokens" in self.level:
                self._refill()
                self.level["tokens"] = min(self.capacity["tokens"], self.level["tokens"] - tokens_delta)


_LOCAL: dict[str, RateLimiter] = {}
_LOCAL_LOCK = threading.Lock()


class SharedLimit:
    """The caller's handle on a shared limiter: `acquire(tokens)` blocks until the request may go."""

    def __init__(self, endpoint: str, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.args = (requests_per_minute, tokens_per_minute)
        self.name = "judge-ratelimit-" + hashlib.sha1(endpoint.encode()).hexdigest()[:10]
        self._actor = None
        self._local = None
        import ray

        self._ray = ray if ray.is_initialized() else None
        if self._ray is None:
            with _LOCAL_LOCK:
                self._local = _LOCAL.setdefault(self.name, RateLimiter(*self.args))

    def _handle(self, fresh: bool = False):
        if self._actor is None or fresh:
            remote = self._ray.remote(num_cpus=0)(RateLimiter)
            self._actor = remote.options(name=self.name, get_if_exists=True, max_concurrency=64).remote(*self.args)
        return self._actor

    def _call(self, method: str, *args):
        if self._local is not None:
            return getattr(self._local, method)(*args)
        try:
            return self._ray.get(getattr(self._handle(), method).remote(*args))
        except self._ray.exceptions.RayActorError:  # its owner left the pool: make it again
            return self._ray.get(getattr(self._handle(fresh=True), method).remote(*args))

    def acquire(self, tokens: int = 0) -> float:
        wait = self._call("reserve", int(tokens))
        if wait > 0:
            time.sleep(wait)
        return wait

    def settle(self, tokens_delta: int) -> None:
        if tokens_delta:
            self._call("settle", int(tokens_delta))
