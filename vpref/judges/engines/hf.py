"""A language model used through text alone, on Hugging Face transformers: the LLM judges' HF engine.

Any causal LM works (SmolLM2, Llama, Qwen2.5; a Qwen2-VL / Qwen2.5-VL checkpoint reads the video
through its caption only).  Two ways to use it:

* `chat` / `complete`: generate a reply (free-text judges, rationales, evaluation templates).
* `label_logprobs` / `continuation_logprobs`: teacher forcing, no generation.  Candidates are
  tokenised in context (`vpref.judges.scoring`), the fewest sequences that cover every candidate
  token are run right-padded in batches, and only the needed positions are projected to the
  vocabulary (`logits_to_keep`).
* `label_chains`: a rubric's aspects one after another on one KV cache per judgment: the prompt
  is run once, each later aspect only adds its few tokens (the cache is cropped back to where
  the next prefill's tokens differ), so a judgment costs about one prompt forward in all.
"""

from __future__ import annotations

from collections import Counter

import torch

from vpref.judges.scoring import (Chain, LabelDist, LabelQuery, LabelScores, candidate_ids, common_prefix,
                                  complete_probs, plan_rows, to_distribution)
from vpref.models.families import SUPPORTED as VIDEO_FAMILIES
from vpref.models.families import get_family, model_type


class ChatLM:
    max_batch_tokens = 4096  # tokens per scoring forward (rows x longest row)
    max_batch_rows = 16

    def __init__(self, model, tokenizer, path: str, kind: str):
        self.model, self.tokenizer, self.path, self.kind = model, tokenizer, str(path), kind
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
                        if isinstance(i, int) and i >= 0]
        self.stats = Counter()  # forward_calls, sequences, tokens, generate_calls, decode_steps

    @classmethod
    def load(cls, path, dtype: str = "float32", device: str = "cpu", require_chat: bool = True) -> "ChatLM":
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        kind = model_type(path)
        auto = AutoModelForImageTextToText if kind in VIDEO_FAMILIES else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        if require_chat and not tok.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template; an LLM judge needs an instruct model")
        return cls(model, tok, path, kind)

    # ------------------------------------------------------------------ text

    def render(self, prompt: str, prefill: str = "") -> str:
        """The model's input text: one user turn, then the assistant's reply so far."""
        if not self.tokenizer.chat_template:  # a base LM: plain text
            return f"{prompt}\n{prefill}"
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True) + prefill

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _extra(self, ids: torch.Tensor) -> dict:
        # a video LLM run on text only: every token is of type text (families whose forward takes token types)
        wants = self.kind in VIDEO_FAMILIES and get_family(self.kind).mm_token_types
        return {"mm_token_type_ids": torch.zeros_like(ids)} if wants else {}

    # ------------------------------------------------------------------ generation

    def chat(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> list[str]:
        """One user turn per prompt; the assistant's replies."""
        return self.complete(prompts, [""] * len(prompts), max_new_tokens, temperature, seed)

    def complete(self, prompts: list[str], prefills: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """The assistant's reply continued after each prefill (the prefill itself not included)."""
        if not prompts:
            return []
        texts = [self.render(p, f) for p, f in zip(prompts, prefills)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        enc.update(self._extra(enc["input_ids"]))
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            kw.update(do_sample=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        self.stats["generate_calls"] += 1
        self.stats["decode_steps"] += int(new.shape[1])
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    # ------------------------------------------------------------------ teacher forcing

    def label_logprobs(self, queries: list[LabelQuery]) -> list[LabelScores]:
        plans = [candidate_ids(self.encode, self.render(q.prompt, q.prefill), q.labels) for q in queries]
        lps = self._candidate_logprobs(plans)
        return [LabelScores(dict(zip(q.labels, complete_probs(full, start, lp))))
                for q, (full, start), lp in zip(queries, plans, lps)]

    def continuation_logprobs(self, items: list[tuple[str, str]]) -> list[list[float]]:
        """Per-token log p(continuation | context) for each (context text, continuation), plain text
        (no chat template; `render` gives a chat prompt when one is wanted)."""
        plans = [candidate_ids(self.encode, ctx, [c]) for ctx, c in items]
        return [lp[0] for lp in self._candidate_logprobs(plans)]

    def label_chains(self, chains: list[Chain], min_mass: float = 0.0) -> list[list[LabelDist]]:
        return [self._chain(c, min_mass) for c in chains]

    def _chain(self, chain: Chain, min_mass: float) -> list[LabelDist]:
        cache, cached = None, []  # the KV cache and the token ids it holds
        reply, dists = "", []
        for k, (before, labels) in enumerate(chain.steps):
            prefill = reply + before
            full, start = candidate_ids(self.encode, self.render(chain.prompt, prefill), labels)
            rows, which = plan_rows(full, start)
            got: list[dict] = []
            for row in rows:  # logits at positions start-1 .. len-1 of each row
                keep = cache is not None and common_prefix(cached, row) > 0
                c = min(common_prefix(cached, row), start - 1) if keep else 0
                if keep and cache.get_seq_length() > c:
                    cache.crop(c - cache.get_seq_length())  # (transformers 5: minus the tokens to drop)
                ids = torch.tensor([row[c:]], device=self.model.device)
                pos = list(range(start - 1 - c, len(row) - c))
                # explicit positions: a video LLM would otherwise reuse the rope offsets its last
                # generate() stored (for another batch)
                where = torch.arange(c, len(row), device=ids.device)[None]
                with torch.no_grad():
                    out = self.model(input_ids=ids, past_key_values=cache if keep else None, use_cache=True,
                                     position_ids=where, logits_to_keep=torch.tensor(pos, device=ids.device),
                                     **self._extra(ids))
                cache, cached = out.past_key_values, row
                logp = out.logits[0].float().log_softmax(-1)
                got.append({c + p: logp[i] for i, p in enumerate(pos)})
                self.stats["forward_calls"] += 1
                self.stats["sequences"] += 1
                self.stats["tokens"] += len(row) - c
            lps = [[float(got[r][t - 1][f[t]]) for t in range(start, len(f))] for f, r in zip(full, which)]
            d = to_distribution(LabelScores(dict(zip(labels, complete_probs(full, start, lps)))), labels, min_mass)
            dists.append(d)
            if d.mode is None:
                break
            reply = prefill + d.mode
        while len(dists) < len(chain.steps):
            dists.append(LabelDist(chain.steps[len(dists)][1], {}, 0.0, False, "logprobs",
                                   error="not asked: an earlier step had no label", failure="unparsed"))
        return dists

    def _candidate_logprobs(self, plans) -> list[list[list[float]]]:
        """For each plan (full ids per candidate, start): the log-probs of each candidate's tokens."""
        rows, needs, where = [], [], []  # needs[r]: {(position, target)}; where[plan][cand]: (row, positions)
        for full, start in plans:
            prow, which = plan_rows(full, start)
            base = len(rows)
            rows += prow
            needs += [set() for _ in prow]
            entry = []
            for f, r in zip(full, which):
                pts = [(t - 1, f[t]) for t in range(start, len(f))]
                needs[base + r].update(pts)
                entry.append((base + r, pts))
            where.append(entry)
        got = self._run(rows, needs)
        return [[[got[r][p] for p in pts] for r, pts in entry] for entry in where]

    def _run(self, rows: list[list[int]], needs: list[set]) -> list[dict]:
        """Log-probs of target tokens at given positions of each row: [{(pos, target): logprob}]."""
        out: list[dict] = [{} for _ in rows]
        order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
        batch: list[int] = []
        for r in order + [None]:
            full = batch and (r is None or len(batch) >= self.max_batch_rows
                              or (len(batch) + 1) * len(rows[r]) > self.max_batch_tokens)
            if full:
                self._forward(batch, rows, needs, out)
                batch = []
            if r is not None:
                batch.append(r)
        return out

    def _forward(self, batch: list[int], rows, needs, out) -> None:
        width = max(len(rows[r]) for r in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, :len(rows[r])] = torch.tensor(rows[r])
            attn[b, :len(rows[r])] = 1
        positions = sorted({p for r in batch for p, _ in needs[r]})
        index = {p: k for k, p in enumerate(positions)}
        dev = self.model.device
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(dev), attention_mask=attn.to(dev),
                                logits_to_keep=torch.tensor(positions, device=dev),
                                **self._extra(ids.to(dev))).logits
        logp = logits.float().log_softmax(-1)
        for b, r in enumerate(batch):
            for p, t in needs[r]:
                out[r][(p, t)] = float(logp[b, index[p], t])
        self.stats["forward_calls"] += 1
        self.stats["sequences"] += len(batch)
        self.stats["tokens"] += int(attn.sum())
