"""The vLLM generator backend (GPU only), the LLM judges' vLLM chat engine, and their Ray hosting.

`VLLMBackend` implements the `GeneratorBackend` interface of `vpref.actors.backends` on one vLLM
`LLM` engine (vLLM 0.30-0.33, V1 engine):

* `generate`: ONE `LLM.generate` call over every request.  Prompts are the token ids of
  `chat_prompt(tokenizer, question)` (the one place prompts are built) with one video item
  `(frames, metadata)`; the metadata fixes the sampled fps, so Qwen2.5-VL's temporal positions
  (`second_per_grid_ts = temporal_patch_size / sampled_fps`, 24 fps when unknown) are the ones
  vpref's HF path uses, and `mm_processor_kwargs` carries the checkpoint's min/max pixels so
  vLLM resizes frames exactly as `VideoPreprocessor` does.
* `load_weights`: in place (same engine, same processes), ONE `collective_rpc` into
  `VPrefWorkerExtension.vpref_load_checkpoint`, which reads the checkpoint's safetensors files
  inside every worker and runs vLLM's layerwise in-place reload.  The vision tower is skipped
  when its tensors are byte-identical to the weights the engine holds (or when the caller
  says so); then the prefix cache and the encoder cache are reset.
* `sleep` / `wake_up`: free the GPU for a colocated trainer (needs `enable_sleep_mode`).

Nothing here imports vLLM at module level: this module is imported on CPU machines (tests, the
driver) and inside vLLM's worker processes (the extension class).  Pure helpers (metadata,
engine arguments, sampling arguments, the vision-skip decision, Ray options) are module
functions so CPU tests check them without vLLM.

Hosting in Ray (see `vllm_actor_options`):

* tensor_parallel_size == 1: the actor takes the GPU itself (`num_gpus=1`, or the configured
  fraction) and the engine runs with the "uni" executor in its own engine-core subprocess.
* tensor_parallel_size == k > 1: the actor takes `num_gpus=0` and is scheduled into bundle 0 of
  a STRICT_PACK placement group of k one-GPU bundles with
  `placement_group_capture_child_tasks=True`.  vLLM finds that group
  (`ray.util.get_current_placement_group()`), and with `distributed_executor_backend="ray"`
  places one worker per bundle.  Before the engine is built, `prepare_ray_env` sets
  `VLLM_RAY_BUNDLE_INDICES=0,..,k-1`, drops the actor's (empty) `CUDA_VISIBLE_DEVICES`, and
  sets `RAY_ADDRESS` so the engine-core subprocess joins this cluster rather than starting one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vpref.actors.backends import GenRequest
from vpref.models.generation import Completion
from vpref.models.processor import DEFAULT_FPS, VideoPreprocessor

# Checkpoint name prefixes of the vision tower: transformers 5 / original Qwen layout ("visual.")
# and the transformers 4.5x layout ("model.visual.").
VISION_PREFIXES: tuple[str, ...] = ("visual.", "model.visual.")
# Qualified name vLLM resolves in every worker process (must be a string, not a class).
WORKER_EXTENSION = "vpref.actors.vllm_backend.VPrefWorkerExtension"
# Benchmark knob: "1" makes VLLMBackend ignore end-of-turn tokens (fixed-length outputs).
IGNORE_EOS_ENV = "VPREF_VLLM_IGNORE_EOS"
# Top-p of the LLM judges' sampled retries (the HF ChatLM uses the same).
CHAT_TOP_P = 0.95
_SEED_RANGE = 2**31 - 2**16  # request seeds stay int32 even after vLLM adds the sample index
_LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


# --------------------------------------------------------------------------- environment


def import_vllm():
    """The vllm module, or an ImportError that says what to install and where."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vllm backend needs vLLM (0.30-0.33), which is not installed here: on a GPU machine run "
            "`pip install 'vpref[gpu]'` (vLLM pins its own torch/transformers; use a separate environment "
            f"from the CPU one), or use backend: hf.  ({e})"
        ) from e
    return vllm


def check_gpus(tp: int, visible_gpus: int, placement_group_gpus: float | None) -> None:
    """Raise a clear RuntimeError when this engine cannot get the GPUs it needs.

    `visible_gpus`: CUDA devices this process sees.  `placement_group_gpus`: GPUs in the Ray
    placement group this process was scheduled into (None: not in one)."""
    if placement_group_gpus is not None and tp > 1:
        if placement_group_gpus < tp:
            raise RuntimeError(
                f"tensor_parallel_size={tp} needs {tp} GPU bundles in the actor's placement group, it has "
                f"{placement_group_gpus:g} GPUs; create the actor with vllm_actor_options(member)")
        return
    if visible_gpus == 0:
        raise RuntimeError(
            "the vllm backend needs a CUDA GPU and this process sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run it on a GPU node, give the "
            "Ray actor a GPU (vllm_actor_options(member)), or use backend: hf on CPU")
    if visible_gpus < tp and placement_group_gpus is None:
        try:
            import ray

            if ray.is_initialized():  # vLLM's Ray executor will ask the cluster for the GPUs
                return
        except ImportError:
            pass
        raise RuntimeError(f"tensor_parallel_size={tp} needs {tp} GPUs; this process sees {visible_gpus}")


def _current_placement_group():
    try:
        import ray
        from ray.util import get_current_placement_group
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return get_current_placement_group()


def require_gpus(tp: int) -> None:
    import torch

    pg = _current_placement_group()
    pg_gpus = sum(b.get("GPU", 0) for b in pg.bundle_specs) if pg is not None else None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_gpus(tp, visible, pg_gpus)


def tp_env_changes(tp: int, placement_group_bundles: int | None, gcs_address: str | None,
                   env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Environment for a tensor-parallel engine inside a Ray actor: (variables to set, to remove).

    The engine-core subprocess must join this Ray cluster (RAY_ADDRESS), and with a placement
    group the Ray executor must use bundles 0..tp-1 while the num_gpus=0 actor's empty
    CUDA_VISIBLE_DEVICES must not leak into the workers."""
    if tp <= 1:
        return {}, []
    set_vars: dict[str, str] = {}
    unset: list[str] = []
    if gcs_address and not env.get("RAY_ADDRESS"):
        set_vars["RAY_ADDRESS"] = gcs_address
    if placement_group_bundles is not None:
        if placement_group_bundles < tp:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} placement group bundles, "
                             f"the actor's group has {placement_group_bundles}")
        if not env.get("VLLM_RAY_BUNDLE_INDICES"):
            set_vars["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(i) for i in range(tp))
        unset += [k for k in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES") if k in env]
    return set_vars, unset


def prepare_ray_env(tp: int) -> dict[str, str]:
    """Apply `tp_env_changes` to this process (call before the engine is built)."""
    gcs = None
    try:
        import ray

        if ray.is_initialized():
            gcs = ray.get_runtime_context().gcs_address
    except ImportError:
        pass
    pg = _current_placement_group()
    set_vars, unset = tp_env_changes(tp, len(pg.bundle_specs) if pg is not None else None, gcs, os.environ)
    for k in unset:
        os.environ.pop(k, None)
    os.environ.update(set_vars)
    return set_vars


# --------------------------------------------------------------------------- Ray hosting


def tp_bundles(tp: int, num_cpus: float, custom: Mapping[str, float] | None = None) -> list[dict[str, float]]:
    """Placement-group bundles of a tensor-parallel engine: one GPU each; the actor's CPUs and
    custom resources in bundle 0 (where the actor itself is scheduled)."""
    first = {"GPU": 1.0, **({"CPU": float(num_cpus)} if num_cpus else {}), **dict(custom or {})}
    return [first] + [{"GPU": 1.0} for _ in range(tp - 1)]


def vllm_actor_options(member, resources=None, label_selector: dict | None = None) -> dict:
    """Ray actor options for an actor hosting a vLLM engine (a GeneratorActor with backend vllm,
    or a judge with judge.backend vllm).

    `member`: a ZooMember (its `vllm` and `resources` are used) or anything with `.vllm`; pass
    `resources` (a ResourcesConfig) for a JudgeConfig (`cfg.pool.resources`).  Merge the result
    with the name/namespace/restart options: `RemoteGenerator.options(name=..., **opts)`.

    TP == 1: the actor takes the GPU (num_gpus from resources, at least a share of one).
    TP > 1: a STRICT_PACK placement group of TP one-GPU bundles is created here; the actor takes
    num_gpus=0 and bundle 0, capturing child tasks so vLLM's workers land in the group.  The
    group lives as long as the job; remove it (`ray.util.remove_placement_group(
    opts["scheduling_strategy"].placement_group)`) when the actor is retired for good.
    `label_selector` (vpref.actors.placement) goes on every bundle of that group."""
    r = resources if resources is not None else member.resources
    tp = member.vllm.tensor_parallel_size
    custom = dict(r.custom) or None
    if tp == 1:
        return {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus if r.num_gpus > 0 else 1, "resources": custom}
    from ray.util import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from vpref.actors.placement import bundle_selectors

    pg = placement_group(tp_bundles(tp, r.num_cpus, custom), strategy="STRICT_PACK",
                         bundle_label_selector=bundle_selectors(label_selector, tp))
    return {
        "num_cpus": r.num_cpus,
        "num_gpus": 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
    }


# --------------------------------------------------------------------------- prompts and video


def video_metadata(num_frames: int, height: int, width: int, fps: float | None) -> dict:
    """vLLM's per-video metadata (required by Qwen2.5-VL) for frames already sampled at `fps`.

    Every frame is used (frames_indices = all of them), so transformers' sampled_fps is `fps`
    and second_per_grid_ts = temporal_patch_size / fps, as in `VideoPreprocessor`; unknown fps
    -> 24, what transformers assumes.  Keys are `transformers.video_utils.VideoMetadata` fields
    (+ do_sample_frames, which vLLM strips): any other key would be a TypeError in vLLM."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    f = float(fps) if fps else DEFAULT_FPS
    if f <= 0:
        f = DEFAULT_FPS
    return {"total_num_frames": int(num_frames), "fps": f, "duration": num_frames / f,
            "frames_indices": list(range(int(num_frames))), "width": int(width), "height": int(height),
            "do_sample_frames": False}


def second_per_grid_ts(metadata: Mapping, temporal_patch_size: int = 2) -> float:
    """What transformers' Qwen2.5-VL processor derives from the metadata (VideoMetadata.sampled_fps)."""
    idx, total, fps = metadata.get("frames_indices"), metadata.get("total_num_frames"), metadata.get("fps")
    sampled = (fps or DEFAULT_FPS) if idx is None or total is None or fps is None else len(idx) / total * fps
    return temporal_patch_size / sampled


def video_pixel_kwargs(pre: VideoPreprocessor, num_frames: int | None = None) -> dict[str, int]:
    """min/max pixels that make vLLM's resize (`smart_resize` with these bounds) equal
    `pre.resized_hw`.  With `cap_pixels_per_frame` the bound depends on the frame count, so pass
    `num_frames` (per-prompt kwargs); without it the engine-level bounds are enough."""
    max_pixels = pre.max_pixels
    if pre.cap_pixels_per_frame and num_frames:
        factor = pre.patch_size * pre.merge_size
        total = int(pre.max_video_tokens * factor * factor * 0.9)
        max_pixels = max(min(max_pixels, total * pre.temporal_patch_size // num_frames), int(pre.min_pixels * 1.05))
    return {"min_pixels": int(pre.min_pixels), "max_pixels": int(max_pixels)}


def frames_array(frames) -> np.ndarray:
    x = np.ascontiguousarray(frames, dtype=np.uint8)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got shape {x.shape}")
    return x


def video_prompt(tokenizer, pre: VideoPreprocessor, request: GenRequest) -> dict:
    """One vLLM prompt: the chat prompt's token ids (one video placeholder, which vLLM expands)
    plus the video and its metadata.  Tokenised like the HF path (no added special tokens)."""
    from vpref.models.video_lm import chat_prompt

    frames = frames_array(request.frames)
    t, h, w = frames.shape[:3]
    ids = tokenizer(chat_prompt(tokenizer, request.question), add_special_tokens=False)["input_ids"]
    prompt = {"prompt_token_ids": list(ids),
              "multi_modal_data": {"video": (frames, video_metadata(t, h, w, request.fps))}}
    if pre.cap_pixels_per_frame:
        prompt["mm_processor_kwargs"] = video_pixel_kwargs(pre, t)
    return prompt


def stop_token_ids(tokenizer, path: str | Path | None = None) -> list[int]:
    """End-of-turn ids: <|im_end|> (what the HF path stops on), the tokenizer's eos and the
    checkpoint generation_config's eos ids."""
    ids = set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(im_end, int) and im_end >= 0 and im_end != unk:
        ids.add(im_end)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
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


def engine_kwargs(path: str | Path, dtype: str, vcfg, pre: VideoPreprocessor | None = None) -> dict:
    """`vllm.LLM(**engine_kwargs(...))` for a video generator (from VLLMConfig + the checkpoint's
    preprocessor config, so vLLM's frame resize matches vpref's)."""
    pre = pre or VideoPreprocessor.from_pretrained(path)
    return {
        **_base_engine_kwargs(path, dtype, vcfg),
        "limit_mm_per_prompt": {"image": 0, "video": vcfg.limit_videos_per_prompt},
        "mm_processor_kwargs": video_pixel_kwargs(pre),
        "worker_extension_cls": WORKER_EXTENSION,
    }


def chat_engine_kwargs(path: str | Path, dtype: str, vcfg, multimodal: bool) -> dict:
    """`vllm.LLM(**...)` for a text-only judge; a video model's vision inputs are switched off so
    no memory is reserved for its encoder."""
    kw = _base_engine_kwargs(path, dtype, vcfg)
    if multimodal:
        kw["limit_mm_per_prompt"] = {"image": 0, "video": 0}
    return kw


# --------------------------------------------------------------------------- checkpoint inspection


def safetensors_header(file: str | Path) -> tuple[dict, int]:
    """(tensor entries, offset of the data section) of a safetensors file, without reading data."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _tensor_index(folder: str | Path, prefixes: tuple[str, ...] | None) -> dict[str, tuple[Path, str, tuple, int, int]]:
    """name -> (file, dtype, shape, absolute start, end) of the tensors (with these prefixes)."""
    from vpref.train.checkpoint import safetensor_files

    out = {}
    for file in safetensor_files(folder):
        header, base = safetensors_header(file)
        for name, e in header.items():
            if prefixes is None or name.startswith(prefixes):
                a, b = e["data_offsets"]
                out[name] = (file, e["dtype"], tuple(e["shape"]), base + a, base + b)
    return out


def vision_tensor_names(folder: str | Path, prefixes: tuple[str, ...] = VISION_PREFIXES) -> list[str]:
    return sorted(_tensor_index(folder, prefixes))


def checkpoint_num_params(folder: str | Path) -> int:
    """Parameters stored in a checkpoint (from the safetensors headers; tied weights once)."""
    return sum(int(np.prod(shape)) for _, _, shape, _, _ in _tensor_index(folder, None).values())


def _same_bytes(fa: Path, a0: int, fb: Path, b0: int, n: int, chunk: int = 64 << 20) -> bool:
    with open(fa, "rb") as xa, open(fb, "rb") as xb:
        xa.seek(a0)
        xb.seek(b0)
        while n > 0:
            k = min(chunk, n)
            if xa.read(k) != xb.read(k):
                return False
            n -= k
    return True


def vision_tensors_equal(old: str | Path, new: str | Path, prefixes: tuple[str, ...] = VISION_PREFIXES) -> bool:
    """True when `new`'s vision-tower tensors are byte-identical to `old`'s (same names, dtypes,
    shapes, bytes).  Headers first (free); then the bytes, stopping at the first difference, so
    a changed tower costs one chunk and an unchanged one a read of both towers (page cache: the
    new checkpoint was just written).  No vision tensors in either -> False (nothing to keep)."""
    a, b = _tensor_index(old, prefixes), _tensor_index(new, prefixes)
    if not a or set(a) != set(b):
        return False
    for name, (fa, dt, shape, a0, a1) in a.items():
        fb, dt_b, shape_b, b0, b1 = b[name]
        if dt != dt_b or shape != shape_b or a1 - a0 != b1 - b0:
            return False
    for name, (fa, _, _, a0, a1) in a.items():
        fb, _, _, b0, _ = b[name]
        if not _same_bytes(fa, a0, fb, b0, a1 - a0):
            return False
    return True


def files_signature(folder: str | Path) -> list[tuple[str, int, int, int]]:
    """(name, size, mtime_ns, inode) of a checkpoint's weight files: changes when they are rewritten."""
    from vpref.train.checkpoint import safetensor_files

    out = []
    for f in safetensor_files(folder):
        st = f.stat()
        out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def decide_skip_vision(requested: bool | None, weights_valid: bool, current: str | Path | None,
                       new: str | Path, current_signature: list | None = None,
                       prefixes: tuple[str, ...] = VISION_PREFIXES) -> tuple[bool, str]:
    """Whether a reload may keep the engine's vision tower, and why.

    `requested`: the caller's choice (None: decide by comparing the checkpoints).
    `weights_valid`: False after sleep(level=2) or a failed load: no weights to keep.
    `current`: the folder the engine's weights came from; `current_signature`: its
    `files_signature` when they were loaded -- if the folder was rewritten since, its files no
    longer describe the engine's weights and nothing is skipped."""
    if not weights_valid:
        if requested:
            raise ValueError("skip_vision=True, but the engine holds no complete weights (discarded by "
                             "sleep(level=2) or a failed load); the vision tower must be loaded too")
        return False, "engine weights discarded (sleep level 2) or incomplete (failed load)"
    if requested is not None:
        return bool(requested), "caller"
    if current is None or current_signature is None:
        return False, "weights held by the engine unknown"
    try:
        if files_signature(current) != current_signature:
            return False, f"{current} was rewritten since it was loaded"
        if Path(current).resolve() == Path(new).resolve():
            return bool(vision_tensor_names(new, prefixes)), "same checkpoint"
        same = vision_tensors_equal(current, new, prefixes)
    except (OSError, ValueError) as e:  # the old checkpoint is gone or unreadable: load everything
        return False, f"cannot compare with {current}: {e}"
    return same, "vision tensors unchanged" if same else "vision tensors changed"


ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size")
VISION_ARCH_KEYS = ("depth", "hidden_size", "num_heads", "out_hidden_size", "patch_size")


def architecture(folder: str | Path) -> dict:
    """The shape-defining config fields of a checkpoint (text at the top level or in text_config)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    text = {**cfg, **(cfg.get("text_config") or {})}
    vision = cfg.get("vision_config") or {}
    out = {"model_type": cfg.get("model_type")}
    out.update({k: text.get(k) for k in ARCH_KEYS})
    out.update({f"vision.{k}": vision.get(k) for k in VISION_ARCH_KEYS})
    return out


def check_same_architecture(current: str | Path | Mapping, new: str | Path) -> None:
    """An in-place reload needs the same architecture; say which fields differ.  `current`: a
    checkpoint folder or its `architecture(...)`."""
    a = dict(current) if isinstance(current, Mapping) else architecture(current)
    b = architecture(new)
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    if diff:
        raise ValueError(f"{new} cannot be loaded in place into this engine: architecture differs "
                         f"(engine, checkpoint) {dict(sorted(diff.items()))}; start a new engine instead")


# --------------------------------------------------------------------------- worker extension


@contextlib.contextmanager
def _quiet_logger(name: str, enabled: bool):
    log = logging.getLogger(name)
    level = log.level
    if enabled:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class VPrefWorkerExtension:
    """Mixed into vLLM's GPU Worker (worker_extension_cls); `self` is the Worker.

    vLLM asserts that no attribute of an extension exists on its Worker (which already has
    reload_weights, update_weights, sleep, ...), so every name here starts with `vpref_`."""

    def vpref_load_checkpoint(self, checkpoint_dir: str, skip_prefixes: Sequence[str] = ()) -> dict:
        """Load a HF safetensors folder in place, skipping tensors with `skip_prefixes`.

        Every TP rank reads the files itself (vLLM's loaders shard).  vLLM >= 0.2x: its layerwise
        in-place `reload_weights(weights_iterator=...)` (keeps CUDA-graph storage, resets the
        runner's encoder/mm caches); older: `model.load_weights`.  Layers whose tensors were
        skipped keep their current weights."""
        import inspect

        import torch
        from safetensors import safe_open

        from vpref.train.checkpoint import safetensor_files

        t0 = time.perf_counter()
        skip = tuple(skip_prefixes or ())
        stats = {"loaded": 0, "skipped": 0, "bytes": 0}
        files = safetensor_files(checkpoint_dir)

        def weights():
            for file in files:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                        if skip and name.startswith(skip):
                            stats["skipped"] += 1
                            continue
                        t = f.get_tensor(name)
                        stats["loaded"] += 1
                        stats["bytes"] += t.numel() * t.element_size()
                        yield name, t

        from vllm.config import set_current_vllm_config

        runner = self.model_runner
        runner_reload = getattr(runner, "reload_weights", None)
        params = inspect.signature(runner_reload).parameters if callable(runner_reload) else {}
        # vLLM logs "<Layer>: Failed to load weights" for every skipped layer; expected here.
        with (_quiet_logger(_LAYERWISE_LOGGER, bool(skip)), set_current_vllm_config(self.vllm_config),
              torch.no_grad()):
            if "weights_iterator" in params:
                kw = {"weights_iterator": weights()}
                if "is_checkpoint_format" in params:
                    kw["is_checkpoint_format"] = True
                runner_reload(**kw)
                mode = "layerwise_reload"
            else:
                model = runner.get_model() if hasattr(runner, "get_model") else runner.model
                model.load_weights(weights())
                for reset in ("reset_encoder_cache", "reset_mm_cache"):
                    if callable(getattr(runner, reset, None)):
                        getattr(runner, reset)()
                mode = "load_weights"
        torch.cuda.synchronize()
        if stats["loaded"] == 0:
            raise ValueError(f"{checkpoint_dir}: no tensors loaded (skipped {stats['skipped']})")
        return {"rank": int(getattr(self, "rank", 0)), "mode": mode, "seconds": time.perf_counter() - t0, **stats}


# --------------------------------------------------------------------------- the backends


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class VLLMBackend:
    """A video generator on one vLLM engine (GPU only).  See the module docstring."""

    def __init__(self, path: str | Path, dtype: str = "bfloat16", vcfg=None):
        vllm = import_vllm()
        from vpref.config import VLLMConfig
        from vpref.models.video_lm import SUPPORTED, model_type

        vcfg = vcfg if vcfg is not None else VLLMConfig()
        kind = model_type(path)
        if kind not in SUPPORTED:
            raise ValueError(f"{path}: model_type {kind!r} is not a supported video LLM family {sorted(SUPPORTED)}")
        require_gpus(vcfg.tensor_parallel_size)
        prepare_ray_env(vcfg.tensor_parallel_size)
        self.path, self.dtype, self.vcfg, self.kind = str(path), dtype, vcfg, kind
        self.arch = architecture(path)  # what every later checkpoint must match
        self.preprocessor = VideoPreprocessor.from_pretrained(path)
        self.tokenizer = _tokenizer(path)
        self.stop_ids = stop_token_ids(self.tokenizer, path)
        self._signature = files_signature(path)  # the files the engine's weights come from
        self.ignore_eos = os.environ.get(IGNORE_EOS_ENV) == "1"
        self._vllm = vllm
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**engine_kwargs(path, dtype, vcfg, self.preprocessor))
        self.startup_seconds = time.perf_counter() - t0
        self._weights_valid = True  # False after sleep(level=2) until the next load_weights
        self._asleep: set[str] = set()  # tags still asleep
        self.reloads = 0
        self._params: dict[str, int] = {}

    # ------------------------------------------------------------------ generation

    def build_prompts(self, requests: list[GenRequest]) -> list[dict]:
        return [video_prompt(self.tokenizer, self.preprocessor, r) for r in requests]

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
        skip, reason = decide_skip_vision(skip_vision, self._weights_valid, self.path, checkpoint_dir,
                                          self._signature)
        signature = files_signature(checkpoint_dir)  # before reading: what the engine will hold
        t1 = time.perf_counter()
        try:
            per_rank = self.llm.collective_rpc("vpref_load_checkpoint",
                                               args=(checkpoint_dir, list(VISION_PREFIXES) if skip else []))
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


class VLLMChat:
    """Text-only chat on a vLLM engine for LLM judges: `chat(prompts, ...) -> list[str]`.

    Same contract as `vpref.models.text_lm.ChatLM`: one user turn per prompt through the
    tokenizer's chat template, greedy at temperature 0, else top-p 0.95."""

    def __init__(self, path: str | Path, dtype: str = "bfloat16", vcfg=None):
        vllm = import_vllm()
        from vpref.config import VLLMConfig
        from vpref.models.video_lm import SUPPORTED

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

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> list[str]:
        if not prompts:
            return []
        params = [self._vllm.SamplingParams(**chat_sampling_kwargs(max_new_tokens, temperature, seed, i, self.stop_ids))
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": self.prompt_ids(p)} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]
