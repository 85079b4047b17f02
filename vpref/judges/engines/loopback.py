"""OpenAI-compatible chat-completions servers on 127.0.0.1 for tests and benchmarks (real HTTP).

* `serve_model(lm)`: a real Hugging Face model (`ChatLM`) behind the endpoint, serving what vLLM's
  server serves: greedy or sampled replies, `logprobs` with `top_logprobs` (raw, unscaled),
  `continue_final_message` prefill, `usage`.  `faults` injects failures request by request:
  ``"429:<retry-after s>"``, ``"500"``, ``"hang:<s>"`` (answer only after s seconds), ``"drop"``
  (close the connection without a reply), ``"malformed"`` (HTTP 200 with broken JSON),
  ``"nologprobs"`` (a reply without log-probs), ``"ok"``.
* `serve_loopback(reply)`: the endpoint answers `reply(body, request)` as the assistant message (a
  stub for benchmarks that measure the pipeline rather than a model).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, payload: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout): nothing to do
            pass

    def log_message(self, *args):
        pass


def _start(handler_cls) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def serve_loopback(reply):
    """An endpoint answering each POST with `reply(body, request)` as the assistant message, where
    `body` is the parsed JSON request and `request` the handler (its `path` and `headers`).  Returns
    (server, base URL); stop it with `server.shutdown()`."""

    class Handler(_Handler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = reply(body, self)
            self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())

    return _start(Handler)


class ModelServer:
    """A `ChatLM` served as an OpenAI-compatible endpoint; `requests` counts the POSTs it received,
    `auth` the Authorization headers it saw, `faults` the failures still to inject (in order)."""

    def __init__(self, lm, faults: list[str] | None = None, model_name: str | None = None):
        self.lm = lm
        self.model_name = model_name
        self.faults = list(faults or [])
        self.requests = 0
        self.auth: list[str | None] = []
        self._lock = threading.Lock()  # one model: one generation at a time
        server = self

        class Handler(_Handler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests += 1
                    server.auth.append(self.headers.get("Authorization"))
                    fault = server.faults.pop(0) if server.faults else "ok"
                kind, _, arg = fault.partition(":")
                if kind == "429":
                    return self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": arg or "1"})
                if kind == "500":
                    return self._send(500, b'{"error": {"message": "internal error"}}')
                if kind == "drop":
                    self.close_connection = True
                    return None
                if kind == "malformed":
                    return self._send(200, b'{"choices": [{"message": ')
                if kind == "hang":
                    time.sleep(float(arg or 5))
                out = server.complete(body, logprobs=kind != "nologprobs" and body.get("logprobs"))
                return self._send(200, json.dumps(out).encode())

        self.server, self.base_url = _start(Handler)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def complete(self, body: dict, logprobs: bool) -> dict:
        import torch

        lm = self.lm
        msgs = body["messages"]
        prompt = next(m["content"] for m in msgs if m["role"] == "user")
        prefill = msgs[-1]["content"] if body.get("continue_final_message") and msgs[-1]["role"] == "assistant" else ""
        ids = lm.encode(lm.render(prompt, prefill))
        x = torch.tensor([ids])
        temp = float(body.get("temperature") or 0.0)
        kw = dict(max_new_tokens=int(body.get("max_tokens") or 16), pad_token_id=lm.tokenizer.pad_token_id,
                  eos_token_id=lm.eos_ids, output_logits=True, return_dict_in_generate=True,
                  do_sample=temp > 0, **({"temperature": temp, "top_p": 0.95} if temp > 0 else {}))
        with self._lock:
            torch.manual_seed(int(body.get("seed") or 0))
            with torch.no_grad():
                out = lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **lm._extra(x), **kw)
        new = out.sequences[0, len(ids):].tolist()
        finish = "length"
        if new and new[-1] in lm.eos_ids:  # like the API: the stop token is not part of the reply
            new, finish = new[:-1], "stop"
        dec = lambda i: lm.tokenizer.decode([i])  # noqa: E731
        content = []
        for step, tid in enumerate(new):
            entry = {"token": dec(tid)}
            if logprobs:
                lp = out.logits[step][0].float().log_softmax(-1)
                k = int(body.get("top_logprobs") or 0)
                top = torch.topk(lp, k) if k else None
                entry.update(logprob=float(lp[tid]), top_logprobs=[] if top is None else [
                    {"token": dec(int(i)), "logprob": float(v)} for v, i in zip(top.values, top.indices)])
            content.append(entry)
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(e["token"] for e in content)},
                  "finish_reason": finish, "logprobs": {"content": content} if logprobs else None}
        return {"object": "chat.completion", "model": self.model_name or body.get("model"), "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new) + (finish == "stop"),
                          "total_tokens": len(ids) + len(new) + (finish == "stop")}}


def serve_model(lm, faults: list[str] | None = None) -> ModelServer:
    return ModelServer(lm, faults)
