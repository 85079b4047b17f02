"""An LLM judge engine behind an OpenAI-compatible chat completions endpoint (a hosted model such
as GPT-4o, or a vLLM / SGLang server).  Standard library only; requests of a batch run
concurrently, bounded; transport errors are retried with backoff (separately from the judge's
parse retries) and then raised, naming the endpoint."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


class EndpointError(RuntimeError):
    """The endpoint could not be reached or kept failing; the message names it and the cause."""


class OpenAIChat:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout_s: float = 60.0, retries: int = 3):
        if not base_url:
            raise ValueError("an OpenAI-compatible judge needs judge.api_base, e.g. http://127.0.0.1:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.path = model  # what LLMJudge names the judge after
        self.key = os.environ.get(api_key_env, "")
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        self._pool = ThreadPoolExecutor(max_workers=concurrency)

    def _one(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = None
        for attempt in range(1 + self.retries):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return json.loads(r.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
                if e.code < 500 and e.code != 429:  # a request error will not fix itself
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(min(8.0, 0.5 * 2**attempt))
        raise EndpointError(f"{self.url} failed after {attempt + 1} attempts: {last}")

    def chat(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> list[str]:
        return list(self._pool.map(lambda p: self._one(p, max_new_tokens, temperature, seed), prompts))


def serve_loopback(reply):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 (a free port), for tests and benchmarks:
    each POST is answered with `reply(body, request)` as the assistant message, where `body` is
    the parsed JSON request and `request` the handler (its `path` and `headers`).  Returns
    (server, base URL); stop it with `server.shutdown()`."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = reply(body, self)
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
