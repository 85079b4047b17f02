"""The vLLM generator backend (GPU only) and the LLM judges' vLLM chat engine.

`VLLMBackend` implements the `GeneratorBackend` interface of `vpref.actors.backends` on one vLLM
`LLM` engine (vLLM 0.30-0.33, V1 engine), for any registered model family vLLM takes video for:

* `generate`: ONE `LLM.generate` call over every request.  Prompts are the token ids of
  `chat_prompt(processor, question)` (the one place prompts are built: the checkpoint's chat
  template with one video placeholder, which vLLM's run of the HF processor expands exactly as
  vpref's HF path does) with one video item `(frames, metadata)`.  The metadata fixes the sampled
  fps, so Qwen2.5-VL's temporal positions and Qwen3-VL's timestamps are the HF path's; the
  family adds what else vLLM needs (Qwen2/2.5-VL: min/max pixels in `mm_processor_kwargs`).
* `load_weights`: in place (same engine, same processes), ONE `collective_rpc` into
  `VPrefWorkerExtension.vpref_load_checkpoint` (`vpref.actors.vllm_weights`), which reads the
  checkpoint's safetensors files inside every worker and runs vLLM's layerwise in-place reload.
  The family's vision tower is skipped when its tensors are byte-identical to the weights the
  engine holds (or when the caller says so); then the prefix cache and the encoder cache are reset.
* `sleep` / `wake_up`: free the GPU for a colocated trainer (needs `enable_sleep_mode`).

Nothing here imports vLLM at module level: this module is imported on CPU machines (tests, the
driver).  Pure helpers (metadata, engine arguments, sampling arguments) are module functions so
CPU tests check them without vLLM.  Where the engine runs (GPU checks, tensor-parallel placement
groups, Ray actor options) is `vpref.actors.vllm_hosting`; checkpoint inspection and the worker
extension are `vpref.actors.vllm_weights`.  Both are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vpref.actors.backends import GenRequest
from vpref.actors.vllm_hosting import (  # noqa: F401 (re-exported)
    check_gpus,
    import_vllm,
    prepare_ray_env,
    require_gpus,
    tp_bundles,
    tp_env_changes,
    vllm_actor_options,
)
from vpref.actors.vllm_weights import (  # noqa: F401 (re-exported)
    ARCH_KEYS,
    VISION_ARCH_KEYS,
    VISION_PREFIXES,
    WORKER_EXTENSION,
    VPrefWorkerExtension,
    _tensor_index,
    architecture,
    check_same_architecture,
    checkpoint_num_params,
    decide_skip_vision,
    files_signature,
    safetensors_header,
    vision_tensor_names,
    vision_tensors_equal,
)
from vpref.models.families import family_of
from vpref.models.families.qwen2_vl import video_pixel_kwargs  # noqa: F401 (re-exported)
from vpref.models.generation import Completion
from vpref.models.processor import DEFAULT_FPS
from vpref.models.video_lm import adds_special_tokens, chat_prompt, end_of_turn_id, video_metadata  # noqa: F401

# Benchmark knob: "1" makes VLLMBackend ignore end-of-turn tokens (fixed-length outputs).
IGNORE_EOS_ENV = "VPREF_VLLM_IGNORE_EOS"
# Top-p of the LLM judges' sampled retries (the HF ChatLM uses the same).
CHAT_TOP_P = 0.95
_SEED_RANGE = 2**31 - 2**16  # request seeds stay int32 even after vLLM adds the sample index


# --------------------------------------------------------------------------- prompts and video


def second_per_grid_ts(metadata: Mapping, temporal_patch_size: int = 2) -> float:
    """What transformers' Qwen2.5-VL processor derives from the metadata (VideoMetadata.sampled_fps)."""
    idx, total, fps = metadata.get("frames_indices"), metadata.get("total_num_frames"), metadata.get("fps")
    sampled = (fps or DEFAULT_FPS) if idx is None or total is None or fps is None else len(idx) / total * fps
    return temporal_patch_size / sampled


def frames_array(frames) -> np.ndarray:
    x = np.ascontiguousarray(frames, dtype=np.uint8)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got shape {x.shape}")
    return x


def video_prompt(processor, request: GenRequest, mm_processor_kwargs: dict | None = None) -> dict:
    """One vLLM prompt: the chat prompt's token ids (one video placeholder, which vLLM expands)
    plus the video and its metadata.  Tokenised like the HF path (`adds_special_tokens`).
    `processor`: the checkpoint's transformers processor (its chat template and tokenizer)."""
    frames = frames_array(request.frames)
    t, h, w = frames.shape[:3]
    text = chat_prompt(processor, request.question)
    tok = processor.tokenizer
    ids = tok(text, add_special_tokens=adds_special_tokens(tok, text))["input_ids"]
    prompt = {"prompt_token_ids": list(ids),
              "multi_modal_data": {"video": (frames, video_metadata(t, h, w, request.fps))}}
    if mm_processor_kwargs:
        prompt["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    return prompt


def stop_token_ids(tokenizer, path: str | Path | None = None, chat_template: str | None = None) -> list[int]:
    """End-of-turn ids: the chat template's end-of-turn token (what the HF path stops on), the
    tokenizer's eos and the checkpoint generation_config's eos ids."""
    ids = set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(im_end, int) and im_end >= 0 and im_end != unk:
        ids.add(im_end)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    if chat_template or getattr(tokenizer, "chat_template", None):
        ids.add(end_of_turn_id(tokenizer, chat_template))
    gen = Path(path) / "generation_config.json" if path else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)])
    return sorted(ids)


# --------------------------------------------------------------------------- sampling and outputs


def request_seed(seed: int, index: int) -> int:
    """A reproducible, well-spread seed for request `index` of a call seeded `seed` (vLLM gives
    sample k of a request seed + k, so consecutive seeds would overlap between requests)."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_RANGE


def sampling_kwargs(sampling, seed: int, index: int, stop_ids: Sequence[int] = (),
                    ignore_eos: bool = False) -> tuple[dict, int]:
    """SamplingParams arguments for request `index`, and how many times to repeat its outputs.

    temperature 0 is greedy; vLLM refuses n > 1 when greedy, and HF returns n identical
    answers, so greedy asks for one and repeats it n times."""
    greedy = sampling.temperature == 0
    kw = {
        "n": 1 if greedy else sampling.n,
        "temperature": 0.0 if greedy else float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),
        "max_tokens": int(sampling.max_new_tokens),
        "seed": request_seed(seed, index),
        "skip_special_tokens": True,
    }
    if ignore_eos:
        kw["ignore_eos"] = True
    elif stop_ids:
        kw["stop_token_ids"] = list(stop_ids)
    return kw, sampling.n if greedy else 1


def chat_sampling_kwargs(max_new_tokens: int, temperature: float, seed: int, index: int,
                         stop_ids: Sequence[int] = ()) -> dict:
    """SamplingParams arguments of one judge prompt: greedy at 0, else top-p 0.95 (as ChatLM)."""
    kw = {"n": 1, "temperature": float(temperature), "top_p": CHAT_TOP_P if temperature > 0 else 1.0,
          "max_tokens": int(max_new_tokens), "seed": request_seed(seed, index), "skip_special_tokens": True}
    if stop_ids:
        kw["stop_token_ids"] = list(stop_ids)
    return kw


def to_completion(text: str, token_ids: Sequence[int], finish_reason: str | None,
                  stop_ids: Sequence[int] = ()) -> Completion:
    """A vpref Completion from a vLLM CompletionOutput's fields.  vLLM keeps the stop token in
    token_ids; the HF path does not count it, so neither does this."""
    ids = list(token_ids)
    if finish_reason == "stop" and ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    reason = finish_reason if finish_reason in ("stop", "length") else "error"
    return Completion(text.strip(), len(ids), reason)


# --------------------------------------------------------------------------- engine arguments


def _base_engine_kwargs(path: str | Path, dtype: str, vcfg) -> dict:
    """What every vpref engine sets from its VLLMConfig: model, parallelism, memory, sleep mode."""
    tp = vcfg.tensor_parallel_size
    kw = {
        "model": str(path),
        "tokenizer": str(path),
        "dtype": dtype,
        "tensor_parallel_size": tp,
        "distributed_executor_backend": "ray" if tp > 1 else "uni",
        "gpu_memory_utilization": vcfg.gpu_memory_utilization,
        "enable_sleep_mode": vcfg.enable_sleep_mode,
        "enforce_eager": vcfg.enforce_eager,
    }
    if vcfg.max_model_len:
        kw["max_model_len"] = vcfg.max_model_len
    return kw


def engine_kwargs(path: str | Path, dtype: str, vcfg, family=None) -> dict:
    """`vllm.LLM(**engine_kwargs(...))` for a video generator: the VLLMConfig, plus what the
    checkpoint's family adds (Qwen2/2.5-VL: its min/max pixels, so vLLM's frame resize is vpref's)."""
    family = family or family_of(path)
    kw = {
        **_base_engine_kwargs(path, dtype, vcfg),
        "limit_mm_per_prompt": {"image": 0, "video": vcfg.limit_videos_per_prompt},
        "worker_extension_cls": WORKER_EXTENSION,
    }
    mm = family.vllm_engine_mm_kwargs(path)
    if mm:
        kw["mm_processor_kwargs"] = mm
    return kw


def chat_engine_kwargs(path: str | Path, dtype: str, vcfg, multimodal: bool) -> dict:
    """`vllm.LLM(**...)` for a text-only judge; a video model's vision inputs are switched off so
    no memory is reserved for its encoder."""
    kw = _base_engine_kwargs(path, dtype, vcfg)
    if multimodal:
        kw["limit_mm_per_prompt"] = {"image": 0, "video": 0}
    return kw


# --------------------------------------------------------------------------- the backends


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class VLLMBackend:
    """A video generator on one vLLM engine (GPU only).  See the module docstring."""

    def __init__(self, path: str | Path, dtype: str = "bfloat16", vcfg=None):
        vllm = import_vllm()
        from vpref.config import VLLMConfig

        vcfg = vcfg if vcfg is not None else VLLMConfig()
        self.family = family_of(path)  # a clear error for an unsupported model_type
        if not self.family.vllm_video:
            raise ValueError(f"{path}: vLLM takes no video input for {self.family.model_type}; use backend: hf")
        require_gpus(vcfg.tensor_parallel_size)
        prepare_ray_env(vcfg.tensor_parallel_size)
        self.path, self.dtype, self.vcfg, self.kind = str(path), dtype, vcfg, self.family.model_type
        self.arch = architecture(path)  # what every later checkpoint must match
        self.processor = self.family.load_processor(path)  # the genuine one: vLLM's environment has torchvision
        self.tokenizer = self.processor.tokenizer
        self.stop_ids = stop_token_ids(self.tokenizer, path, self.processor.chat_template)
        self._signature = files_signature(path)  # the files the engine's weights come from
        self.ignore_eos = os.environ.get(IGNORE_EOS_ENV) == "1"
        self._vllm = vllm
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**engine_kwargs(path, dtype, vcfg, self.family))
        self.startup_seconds = time.perf_counter() - t0
        self._weights_valid = True  # False after sleep(level=2) until the next load_weights
        self._asleep: set[str] = set()  # tags still asleep
        self.reloads = 0
        self._params: dict[str, int] = {}

    # ------------------------------------------------------------------ generation

    def build_prompts(self, requests: list[GenRequest]) -> list[dict]:
        return [video_prompt(self.processor, r, self.family.vllm_prompt_mm_kwargs(self.path, len(r.frames)))
                for r in requests]

    def sampling_params(self, sampling, seed: int, count: int) -> tuple[list, int]:
        """One SamplingParams per request, and the greedy repeat factor."""
        made = [sampling_kwargs(sampling, seed, i, self.stop_ids, self.ignore_eos) for i in range(count)]
        return [self._vllm.SamplingParams(**kw) for kw, _ in made], (made[0][1] if made else 1)

    def generate(self, requests: list[GenRequest], sampling, seed: int) -> list[list[Completion]]:
        """`sampling.n` completions per request, in request order, from one LLM.generate call."""
        self._check_awake()
        if not requests:
            return []
        params, repeat = self.sampling_params(sampling, seed, len(requests))
        outs = self.llm.generate(self.build_prompts(requests), params, use_tqdm=False)
        result = []
        for o in outs:
            comps = [to_completion(c.text, c.token_ids, c.finish_reason, self.stop_ids)
                     for c in sorted(o.outputs, key=lambda c: c.index)]
            result.append(comps * repeat)
        return result

    def _check_awake(self) -> None:
        if self._asleep:
            raise RuntimeError(f"the vLLM engine is asleep ({sorted(self._asleep)}); call wake_up() first")
        if not self._weights_valid:
            raise RuntimeError("the engine holds no complete weights (discarded by sleep(level=2), or a "
                               "load_weights failed); call load_weights(...) (after wake_up(['weights']))")

    # ------------------------------------------------------------------ weights

    def load_weights(self, checkpoint_dir: str, skip_vision: bool | None = None) -> dict:
        """Load a checkpoint into the running engine (same engine object and processes).

        `skip_vision`: None compares the new vision tower with the one held (byte-identical ->
        keep it); True/False forces.  Returns counts and timings (rank 0's counts)."""
        if "weights" in self._asleep:
            raise RuntimeError("the engine's weight memory is asleep; call wake_up(['weights']) before load_weights")
        checkpoint_dir = str(checkpoint_dir)
        t0 = time.perf_counter()
        check_same_architecture(self.arch, checkpoint_dir)
        prefixes = self.family.vision_prefixes
        skip, reason = decide_skip_vision(skip_vision, self._weights_valid, self.path, checkpoint_dir,
                                          self._signature, prefixes)
        signature = files_signature(checkpoint_dir)  # before reading: what the engine will hold
        t1 = time.perf_counter()
        try:
            per_rank = self.llm.collective_rpc("vpref_load_checkpoint",
                                               args=(checkpoint_dir, list(prefixes) if skip else []))
        except Exception:  # a partial load leaves mixed weights: refuse to generate until a load succeeds
            self._weights_valid, self._signature = False, None
            raise
        t2 = time.perf_counter()
        self.reset_caches()
        self.path, self._weights_valid, self._signature = checkpoint_dir, True, signature
        self.reloads += 1
        r0 = per_rank[0]
        return {"tensors": r0["loaded"], "skipped_tensors": r0["skipped"], "bytes": r0["bytes"],
                "skip_vision": skip, "skip_reason": reason, "mode": r0["mode"], "ranks": len(per_rank),
                "decide_seconds": t1 - t0, "rpc_seconds": t2 - t1,
                "worker_seconds": max(r["seconds"] for r in per_rank), "seconds": time.perf_counter() - t0}

    def reset_caches(self) -> None:
        """Forget everything computed with the old weights: prefix KV blocks and vision embeddings."""
        self.llm.reset_prefix_cache()
        engine = self.llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):  # scheduler + runner encoder caches (vLLM >= ~0.2x)
            engine.reset_encoder_cache()

    # ------------------------------------------------------------------ sleep mode

    def sleep(self, level: int = 1) -> dict:
        """Free GPU memory for a colocated trainer.  1: weights to CPU, KV cache dropped; 2: both
        dropped (load_weights after wake_up(['weights'])); 0: pause scheduling only (vLLM 0.33)."""
        if level >= 1 and not self.vcfg.enable_sleep_mode:
            raise RuntimeError("sleep(level>=1) needs vllm.enable_sleep_mode: true in the member's config")
        t0 = time.perf_counter()
        self.llm.sleep(level=level)
        self._asleep = {"scheduling"} if level == 0 else {"weights", "kv_cache", "scheduling"}
        if level >= 2:
            self._weights_valid = False
        return {"level": level, "seconds": time.perf_counter() - t0}

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Re-allocate `tags` ("weights", "kv_cache", "scheduling"; None: all).  True when fully
        awake.  After level 2: wake_up(['weights']) -> load_weights(dir) -> wake_up(['kv_cache'])."""
        fully = self.llm.wake_up(tags)  # bool in vLLM 0.33, None before
        if tags is None or fully:
            self._asleep = set()
        else:
            self._asleep -= set(tags)
            if fully is None and self._asleep <= {"scheduling"}:  # no "scheduling" tag before 0.33
                self._asleep = set()
        return not self._asleep

    # ------------------------------------------------------------------ info

    def info(self) -> dict:
        if self.path not in self._params:
            self._params[self.path] = checkpoint_num_params(self.path)
        return {"backend": "vllm", "path": self.path, "device": "cuda", "dtype": self.dtype,
                "params": self._params[self.path], "vllm_version": getattr(self._vllm, "__version__", "?"),
                "tensor_parallel_size": self.vcfg.tensor_parallel_size, "engine_id": id(self.llm),
                "reloads": self.reloads, "asleep": sorted(self._asleep),
                "startup_seconds": round(self.startup_seconds, 2)}


def __getattr__(name):  # VLLMChat moved to the judges' engines; imported lazily (it imports this module)
    if name == "VLLMChat":
        from vpref.judges.engines.vllm import VLLMChat

        return VLLMChat
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
