"""One endpoint, reached over HTTP: a POST of JSON with retries and a circuit breaker in front.

Retried: 429 (after its Retry-After, else backoff), 5xx, timeouts, dropped connections and
malformed replies (not JSON, no choices), with exponential backoff and equal jitter so many judge
actors do not retry in step.  Not retried: other 4xx (a request error will not fix itself).  A
request that fails after its retries counts against the breaker; `breaker_failures` in a row open
it, and until `breaker_cooldown_s` has passed every request fails at once (`CircuitOpen`), naming
the endpoint and the last cause.  The API key goes in the Authorization header only and is
scrubbed from every message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request

MAX_RETRY_AFTER_S = 600.0


class EndpointError(RuntimeError):
    """The endpoint could not be reached or kept failing; the message names it and the cause."""


class CircuitOpen(EndpointError):
    """The circuit breaker is open: the request was not sent."""


class CircuitBreaker:
    """Open after `threshold` consecutive failed requests; after `cooldown_s` one trial request is
    let through (half open): its success closes the breaker, its failure opens it again.  Requests
    that arrive while the trial is in flight wait for its outcome (up to `trial_wait_s`) rather than
    fail: a recovered endpoint then loses no judgment to the breaker."""

    def __init__(self, threshold: int, cooldown_s: float, clock=time.monotonic, trial_wait_s: float = 120.0):
        self.threshold, self.cooldown_s, self.clock, self.trial_wait_s = threshold, cooldown_s, clock, trial_wait_s
        self.failures, self.opened_at, self.trial, self.last_cause = 0, None, False, ""
        self._lock = threading.Condition()

    def _refusal(self, endpoint: str, left: float) -> CircuitOpen:
        return CircuitOpen(f"circuit open for {endpoint}: {self.failures} consecutive requests failed, last cause: "
                           f"{self.last_cause}; not sent (next trial in {max(0.0, left):.0f}s, "
                           "judge.api_breaker_cooldown_s)")

    def check(self, endpoint: str) -> None:
        with self._lock:
            if self.opened_at is None:
                return
            left = self.cooldown_s - (self.clock() - self.opened_at)
            if left > 0:
                raise self._refusal(endpoint, left)
            if not self.trial:
                self.trial = True  # half open: this request is the trial
                return
            self._lock.wait_for(lambda: not self.trial, timeout=self.trial_wait_s)
            if self.opened_at is not None:  # the trial failed (or is still out): not sent
                raise self._refusal(endpoint, self.cooldown_s - (self.clock() - self.opened_at))

    def success(self) -> None:
        with self._lock:
            self.failures, self.opened_at, self.trial = 0, None, False
            self._lock.notify_all()

    def failure(self, cause: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_cause = cause
            if self.failures >= self.threshold or self.trial:
                self.opened_at, self.trial = self.clock(), False
            self._lock.notify_all()

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header: delay seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class Transport:
    def __init__(self, url: str, key: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 backoff_max_s: float = 30.0, breaker_failures: int = 5, breaker_cooldown_s: float = 60.0,
                 on_retry=None):
        self.url, self._key = url, key
        self.timeout_s, self.retries, self.backoff_s, self.backoff_max_s = timeout_s, retries, backoff_s, backoff_max_s
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)
        self.on_retry = on_retry or (lambda cause: None)
        self.retry_causes: dict[str, int] = {}
        self._lock = threading.Lock()

    def __repr__(self):  # never the key
        return f"Transport({self.url!r})"

    def scrub(self, text) -> str:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        return text.replace(self._key, "***") if self._key else text

    def post(self, body: dict) -> dict:
        """The parsed reply; raises EndpointError (CircuitOpen when nothing was sent)."""
        try:
            reply = self._send(body)
        except EndpointError as e:
            self.breaker.failure(str(e).split(": ", 1)[-1])
            raise
        self.breaker.success()
        return reply

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server said when: wait at least that long
            return min(MAX_RETRY_AFTER_S, retry_after) * (1.0 + 0.1 * random.random())
        d = min(self.backoff_max_s, self.backoff_s * 2 ** attempt)
        return d / 2 + random.uniform(0, d / 2)  # equal jitter: spread retries of many judges

    def _send(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last, attempt = "", 0
        for attempt in range(1 + self.retries):
            retry_after, cause = None, ""
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    payload = r.read()
                reply = json.loads(payload)
                if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list) or not reply["choices"]:
                    raise ValueError(f"no choices in {self.scrub(payload[:120])!r}")
                return reply
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {self.scrub(e.read()[:200])}"
                if e.code == 429:
                    cause, retry_after = "rate_limited", retry_after_seconds(e.headers.get("Retry-After"))
                elif e.code >= 500:
                    cause = "server_error"
                else:  # a request error will not fix itself
                    break
            except (TimeoutError, socket.timeout):
                cause, last = "timeout", f"no reply within {self.timeout_s:g}s (judge.api_timeout_s)"
            except urllib.error.URLError as e:
                if isinstance(e.reason, (TimeoutError, socket.timeout)):
                    cause, last = "timeout", f"no reply within {self.timeout_s:g}s (judge.api_timeout_s)"
                else:
                    cause, last = "connection", f"cannot connect: {self.scrub(e.reason)}"
            except (ConnectionError, http.client.HTTPException) as e:
                cause, last = "connection", f"connection dropped: {type(e).__name__}: {self.scrub(e)}"
            except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                cause, last = "malformed", f"malformed reply: {self.scrub(e)}"
            with self._lock:
                self.retry_causes[cause] = self.retry_causes.get(cause, 0) + 1
            if attempt < self.retries:
                self.on_retry(cause)
                time.sleep(self._delay(attempt, retry_after))
        raise EndpointError(f"{self.url} failed after {attempt + 1} attempts: {last}")
