"""ExPO (model extrapolation, arXiv 2404.16792): theta = theta_dpo + alpha * (theta_dpo - theta_ref).

Every tensor, computed in fp32 and cast back to its dtype, saved as a new HF checkpoint.  With
the LoRA recipe (adapters trained on a merged ref) theta_dpo - theta_ref is exactly the adapter
delta, so this is the same operation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vpref.train.checkpoint import load_state_dict, save_state_dict


def extrapolate_state(dpo: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    if set(dpo) != set(ref):
        diff = sorted(set(dpo) ^ set(ref))
        raise ValueError(f"checkpoints hold different tensors (e.g. {diff[:3]}): extrapolation needs the same model")
    out = {}
    for k, d in dpo.items():
        r = ref[k]
        if d.shape != r.shape:
            raise ValueError(f"{k}: shape {tuple(d.shape)} vs reference {tuple(r.shape)}")
        if not d.is_floating_point():
            out[k] = d.clone()
            continue
        d32, r32 = d.to(torch.float32), r.to(torch.float32)
        out[k] = (d32 + alpha * (d32 - r32)).to(d.dtype)
    return out


def extrapolate(dpo_dir: str | Path, ref_dir: str | Path, alpha: float, out_dir: str | Path) -> Path:
    """Write the extrapolated checkpoint (config/tokenizer/preprocessor copied from `dpo_dir`)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return save_state_dict(extrapolate_state(load_state_dict(dpo_dir), load_state_dict(ref_dir), alpha), dpo_dir,
                           out_dir)


def mix(a_dir: str | Path, b_dir: str | Path, weight_a: float, out_dir: str | Path) -> Path:
    """weight_a * a + (1 - weight_a) * b for every tensor (TR-DPO's soft reference update)."""
    a, b = load_state_dict(a_dir), load_state_dict(b_dir)
    out = {k: (weight_a * a[k].float() + (1 - weight_a) * b[k].float()).to(a[k].dtype)
           if a[k].is_floating_point() else a[k].clone() for k in a}
    return save_state_dict(out, a_dir, out_dir)
