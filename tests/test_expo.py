import pytest
import torch
from safetensors.torch import load_file

from vpref.train.checkpoint import load_state_dict, save_state_dict
from vpref.train.expo import extrapolate, extrapolate_state, mix


def test_extrapolation_formula_on_a_toy_state_dict():
    ref = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5], dtype=torch.bfloat16),
           "step": torch.tensor([7], dtype=torch.int64)}
    dpo = {"w": torch.tensor([2.0, 2.0, 1.0]), "b": torch.tensor([1.5], dtype=torch.bfloat16),
           "step": torch.tensor([9], dtype=torch.int64)}
    out = extrapolate_state(dpo, ref, alpha=0.5)
    assert out["w"].tolist() == [2.5, 2.0, 0.0]  # 2 + 0.5 (2 - 1), 2, 1 + 0.5 (1 - 3)
    assert out["b"].dtype == torch.bfloat16 and out["b"].item() == 2.0  # computed in fp32, cast back
    assert out["step"].tolist() == [9]  # integer tensors are not extrapolated
    assert extrapolate_state(dpo, ref, 0.0)["w"].tolist() == dpo["w"].tolist()  # alpha 0: plain DPO
    with pytest.raises(ValueError, match="different tensors"):
        extrapolate_state({"w": dpo["w"]}, ref, 0.3)
    with pytest.raises(ValueError, match="shape"):
        extrapolate_state({**dpo, "w": torch.zeros(2)}, ref, 0.3)


def test_extrapolate_and_mix_checkpoint_folders(tiny_ckpt, tmp_path):
    from vpref.models.video_lm import VideoLM

    ref = load_state_dict(tiny_ckpt)
    torch.manual_seed(0)
    moved = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.items()}
    save_state_dict(moved, tiny_ckpt, tmp_path / "dpo")
    out = extrapolate(tmp_path / "dpo", tiny_ckpt, 0.3, tmp_path / "expo")
    got = load_file(out / "model.safetensors")
    for k in ref:
        assert torch.allclose(got[k], moved[k] + 0.3 * (moved[k] - ref[k]), atol=1e-6), k
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    VideoLM.load(out)  # a complete checkpoint folder
    m = load_file(mix(tmp_path / "dpo", tiny_ckpt, 0.6, tmp_path / "mix") / "model.safetensors")
    k = next(iter(ref))
    assert torch.allclose(m[k], 0.6 * moved[k] + 0.4 * ref[k], atol=1e-6)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        extrapolate(tmp_path / "dpo", tiny_ckpt, -1.0, tmp_path / "neg")
