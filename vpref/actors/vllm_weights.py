"""vLLM checkpoints and in-place reloads: safetensors inspection without reading tensor data
(parameter counts, vision-tower comparison, file signatures), the decision whether a reload may
keep the engine's vision tower, the architecture guard, and the worker extension that runs the
reload inside every vLLM worker process (`VPrefWorkerExtension`, named by WORKER_EXTENSION).

Imported inside vLLM's worker processes: no vLLM import at module level."""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Checkpoint name prefixes of Qwen's vision tower: transformers 5 / original Qwen layout
# ("visual.") and the transformers 4.5x layout ("model.visual."); other families name theirs
# (`Family.vision_prefixes`).
VISION_PREFIXES: tuple[str, ...] = ("visual.", "model.visual.")
# Qualified name vLLM resolves in every worker process (must be a string, not a class).
WORKER_EXTENSION = "vpref.actors.vllm_weights.VPrefWorkerExtension"
_LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


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
# Qwen's vision configs say depth / num_heads, SigLIP / CLIP / InternViT ones num_hidden_layers /
# num_attention_heads: a key a family does not use is None on both sides.
VISION_ARCH_KEYS = ("depth", "num_hidden_layers", "hidden_size", "num_heads", "num_attention_heads", "out_hidden_size",
                    "patch_size", "image_size")


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
