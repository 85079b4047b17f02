"""Checkpoint I/O: HF safetensors folders are the currency between rounds (from_pretrained and
vLLM both load them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def safetensor_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    return files


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in safetensor_files(folder):
        sd.update(load_file(f))
    return sd


def live_tensors_by_file_name(model) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers keyed by the names they have *on disk*.

    transformers 5 renames keys on load (Qwen2.5-VL files say `model.layers.0...`, LLaVA-OneVision
    and InternVL files `language_model.model.layers.0...`, the modules `model.language_model.
    layers.0...`) and back on save; this applies the same reverse mapping save_pretrained uses,
    and checks that every tensor is the live one (a pure rename, as it is for every registered
    family), so copying into it updates the model in place.
    """
    live = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion

        on_disk = revert_weight_conversion(model, dict(live))
    except ImportError:  # older transformers: file names are module names
        on_disk = dict(live)
    ptrs = {t.data_ptr() for t in live.values()}
    converted = [k for k, t in on_disk.items() if t.data_ptr() not in ptrs]
    if converted:
        raise ValueError(f"{type(model).__name__}: tensors {converted[:3]} are converted, not renamed, on save; "
                         "in-place reload is not supported for this family, reload with from_pretrained")
    return on_disk


def load_weights_into(model, folder: str | Path, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Copy a checkpoint's tensors into a live model in place (no new model object).

    Returns the file names loaded.  Tied weights absent from the file (lm_head with tied
    embeddings) are fine; any other mismatch is an error naming the tensors.
    """
    sd = {k: v for k, v in load_state_dict(folder).items() if not k.startswith(skip_prefixes)}
    own = live_tensors_by_file_name(model)
    unknown = sorted(set(sd) - set(own))
    if unknown:
        raise ValueError(f"{folder}: tensors not in the model: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    with torch.no_grad():
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{folder}: {k} has shape {tuple(v.shape)}, the model has {tuple(own[k].shape)}")
            own[k].copy_(v)
    return sorted(sd)


def copy_checkpoint_files(src: str | Path, dst: str | Path) -> None:
    """Copy the non-weight files (config, tokenizer, chat template, preprocessor) of a checkpoint."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def save_state_dict(sd: dict[str, torch.Tensor], like: str | Path, dst: str | Path) -> Path:
    """Write tensors as a checkpoint folder shaped like `like` (same config, tokenizer, ...)."""
    from safetensors.torch import save_file

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    copy_checkpoint_files(like, tmp)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst
