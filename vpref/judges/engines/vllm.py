"""The LLM judges' vLLM engine (GPU only; vLLM 0.30-0.33, V1 engine).

Same contract as the HF `ChatLM`: `chat` / `complete` through the tokenizer's chat template
(greedy at temperature 0, else top-p 0.95), and the scoring seam by teacher forcing:

* every label one token after a shared prefix (the usual scale "1".."5" after "Score: "): ONE
  request per query on the prefix with `max_tokens=1` and `logprob_token_ids` = the labels' tokens
  (exact log-probs of exactly those ids; raw, unadjusted by sampling settings);
* otherwise (multi-token labels, "1" beside "10"): each candidate sequence as a prompt with
  `prompt_logprobs=0`, which returns the log-prob of every prompt token.

Tokenisation in context, the common start and the terminator rule are `vpref.judges.scoring`'s,
shared with the HF engine.  Not run in CI (no GPU there): the CPU tests cover the request
planning; `tests/test_vllm_backend.py` runs it on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from vpref.actors.vllm_backend import (_tokenizer, chat_engine_kwargs, chat_sampling_kwargs, import_vllm,
                                       prepare_ray_env, require_gpus, stop_token_ids)
from vpref.judges.scoring import LabelQuery, LabelScores, candidate_ids, complete_probs


def single_token_plan(full: list[list[int]], start: int) -> tuple[list[int], list[int]] | None:
    """(shared prefix, one token per label) when each label is one token after the common start."""
    if all(len(f) == start + 1 for f in full):
        return full[0][:start], [f[start] for f in full]
    return None


def maximal_sequences(full: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Candidate sequences to send as prompts (one that is a prefix of another is covered by it)."""
    order = sorted(range(len(full)), key=lambda i: -len(full[i]))
    rows: list[list[int]] = []
    which = [0] * len(full)
    for i in order:
        hit = next((r for r, row in enumerate(rows) if row[:len(full[i])] == full[i]), None)
        if hit is None:
            hit = len(rows)
            rows.append(full[i])
        which[i] = hit
    return rows, which


def _logprob(entry, token_id: int, what: str) -> float:
    if entry is None or token_id not in entry:
        raise RuntimeError(f"vLLM returned no log-prob for token {token_id} of the {what}")
    v = entry[token_id]
    return float(getattr(v, "logprob", v))


class VLLMChat:
    """Text-only chat and label scoring on a vLLM engine for LLM judges."""

    def __init__(self, path: str | Path, dtype: str = "bfloat16", vcfg=None):
        vllm = import_vllm()
        from vpref.config import VLLMConfig
        from vpref.models.families import SUPPORTED

        vcfg = vcfg if vcfg is not None else VLLMConfig()
        require_gpus(vcfg.tensor_parallel_size)
        prepare_ray_env(vcfg.tensor_parallel_size)
        self.path, self.dtype, self.vcfg = str(path), dtype, vcfg
        self.tokenizer = _tokenizer(path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template; an LLM judge needs an instruct model")
        cfg = Path(path) / "config.json"
        self.kind = json.loads(cfg.read_text()).get("model_type", "?") if cfg.is_file() else "?"
        self.stop_ids = stop_token_ids(self.tokenizer, path)
        self._vllm = vllm
        self.llm = vllm.LLM(**chat_engine_kwargs(path, dtype, vcfg, multimodal=self.kind in SUPPORTED))
        try:  # exact log-probs of chosen ids ("tracked token logprobs"); older releases lack it
            vllm.SamplingParams(max_tokens=1, logprob_token_ids=[0])
            self.token_ids_logprobs = True
        except TypeError:
            self.token_ids_logprobs = False

    def render(self, prompt: str, prefill: str = "") -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True) + prefill

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.encode(self.render(prompt))

    def chat(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> list[str]:
        return self.complete(prompts, [""] * len(prompts), max_new_tokens, temperature, seed)

    def complete(self, prompts: list[str], prefills: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        if not prompts:
            return []
        params = [self._vllm.SamplingParams(**chat_sampling_kwargs(max_new_tokens, temperature, seed, i, self.stop_ids))
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": self.encode(self.render(p, f))} for p, f in zip(prompts, prefills)],
                                 params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]

    # ------------------------------------------------------------------ teacher forcing

    def _token_logprobs(self, plans) -> list[list[list[float]]]:
        """Log-probs of each candidate's tokens after the common start, for each (full ids, start)."""
        SP = self._vllm.SamplingParams
        prompts, params, reads = [], [], []  # reads[i]: how to get plan i's answer from its outputs
        for full, start in plans:
            single = single_token_plan(full, start) if self.token_ids_logprobs else None
            if single is not None:
                prefix, toks = single
                reads.append(("single", len(prompts), toks))
                prompts.append({"prompt_token_ids": prefix})
                params.append(SP(max_tokens=1, temperature=0.0, logprob_token_ids=list(dict.fromkeys(toks))))
            else:
                rows, which = maximal_sequences(full)
                reads.append(("rows", len(prompts), which))
                for row in rows:
                    prompts.append({"prompt_token_ids": row})
                    params.append(SP(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        result = []
        for (full, start), (how, at, info) in zip(plans, reads):
            if how == "single":
                entry = outs[at].outputs[0].logprobs[0]
                result.append([[_logprob(entry, t, "label")] for t in info])
            else:
                per = []
                for f, r in zip(full, info):
                    plp = outs[at + r].prompt_logprobs
                    per.append([_logprob(plp[t], f[t], "candidate") for t in range(start, len(f))])
                result.append(per)
        return result

    def label_logprobs(self, queries: list[LabelQuery]) -> list[LabelScores]:
        plans = [candidate_ids(self.encode, self.render(q.prompt, q.prefill), q.labels) for q in queries]
        return [LabelScores(dict(zip(q.labels, complete_probs(full, start, lp))))
                for q, (full, start), lp in zip(queries, plans, self._token_logprobs(plans))]

    def continuation_logprobs(self, items: list[tuple[str, str]]) -> list[list[float]]:
        """Per-token log p(continuation | context) for each (context text, continuation), plain text
        (no chat template; `render` gives a chat prompt when one is wanted)."""
        plans = [candidate_ids(self.encode, ctx, [c]) for ctx, c in items]
        return [lp[0] for lp in self._token_logprobs(plans)]
