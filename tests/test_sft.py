import numpy as np
import torch

from vpref.config import load_config
from vpref.data.manifest import load_manifest
from vpref.data.world import is_correct
from vpref.models.video_lm import VideoLM
from vpref.train.sft import noisy_answers, run_sft


def test_sft_trains_saves_reloads_and_reports_per_family(world, tmp_path):
    cfg = load_config(None, [
        f"data.root={world}", f"data.train={world}/train.jsonl", f"data.dev={world}/dev.jsonl",
        f"sft.out={tmp_path}/sft", "sft.batch_size=8", "sft.warmup_steps=2", "sft.lr=5e-3",
        "sft.members=[{name: policy, size: 0.2m, steps: 40}, {name: same, size: 0.2m, steps: 0, init_from: policy},"
        " {name: noisy, size: 0.2m, steps: 5, label_noise: 1.0, seed: 3},"
        " {name: llava, family: llava_onevision, size: 0.2m, steps: 5, seed: 4}]",
    ])
    report = run_sft(cfg)
    pol = report["members"]["policy"]
    first, last = pol["loss_first_last"]
    assert last < first / 2  # it learns
    assert set(pol["dev_accuracy"]) >= {"colour", "count", "describe", "qa", "all"}
    assert all(0.0 <= v <= 1.0 for v in pol["dev_accuracy"].values())
    # Each member is an HF checkpoint that reloads through the normal path.
    a, b = VideoLM.load(tmp_path / "sft" / "policy"), VideoLM.load(tmp_path / "sft" / "same")
    # init_from starts from the named member's weights (0 steps: exactly them).
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    noisy = VideoLM.load(tmp_path / "sft" / "noisy")
    assert not torch.equal(noisy.model.lm_head.weight, a.model.lm_head.weight)
    assert (tmp_path / "sft" / "sft.json").is_file()
    # A member of another family: same vocabulary, its own processor and model class.
    llava = VideoLM.load(tmp_path / "sft" / "llava")
    assert report["members"]["llava"]["model_type"] == llava.kind == "llava_onevision"
    assert type(llava.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert llava.tokenizer.get_vocab() == a.tokenizer.get_vocab()


def test_label_noise_makes_answers_wrong_at_the_requested_rate(world):
    samples = [s for s in load_manifest(world / "train.jsonl").samples if s.family != "describe"]
    assert noisy_answers(samples, 0.0, np.random.default_rng(0)) == [s.answer for s in samples]
    noisy = noisy_answers(samples, 1.0, np.random.default_rng(0))
    assert all(n != s.answer for s, n in zip(samples, noisy))
    # One world word changes; when it is the word the question asks about, the label is wrong.
    assert np.mean([not is_correct(s.family, n, s.answer) for s, n in zip(samples, noisy)]) > 0.4
    half = noisy_answers(samples, 0.5, np.random.default_rng(0))
    rate = np.mean([h != s.answer for s, h in zip(samples, half)])
    assert 0.3 < rate < 0.7
