import math

import pytest
import torch

from vpref.train.losses import dpo_loss

# Two pairs: policy/ref sequence log-probs (summed over answer tokens) and answer lengths.
PC, PR = torch.tensor([-4.0, -10.0]), torch.tensor([-6.0, -9.0])
RC, RR = torch.tensor([-5.0, -10.0]), torch.tensor([-5.0, -10.0])
NC, NR = torch.tensor([4.0, 5.0]), torch.tensor([2.0, 10.0])
# h = (pc - rc) - (pr - rr) = (1 - (-1), 0 - 1) = (2, -1)
H = [2.0, -1.0]


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_dpo_by_hand():
    out = dpo_loss(PC, PR, RC, RR, "sigmoid", beta=0.1)
    want = [-logsig(0.1 * h) for h in H]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(want) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])
    m = out.metrics()
    assert m["rewards/margin"] == pytest.approx(((0.1 + 0.1) + (0.0 - 0.1)) / 2) and m["rewards/accuracy"] == 0.5


def test_conservative_dpo_label_smoothing_by_hand():
    out = dpo_loss(PC, PR, RC, RR, "sigmoid", beta=0.5, label_smoothing=0.1)
    want = [-(0.9) * logsig(0.5 * h) - 0.1 * logsig(-0.5 * h) for h in H]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-6)


def test_robust_dpo_by_hand():
    out = dpo_loss(PC, PR, RC, RR, "robust", beta=0.5, label_smoothing=0.2)
    want = [(-(0.8) * logsig(0.5 * h) + 0.2 * logsig(-0.5 * h)) / 0.6 for h in H]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-6)


def test_ipo_uses_per_token_averages():
    out = dpo_loss(PC, PR, RC, RR, "ipo", beta=0.25, chosen_tokens=NC, rejected_tokens=NR)
    h_avg = [1 / 4 - (-1) / 2, 0 / 5 - 1 / 10]
    want = [(h - 1 / (2 * 0.25)) ** 2 for h in h_avg]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="needs chosen_tokens"):
        dpo_loss(PC, PR, RC, RR, "ipo")


def test_hinge_by_hand():
    out = dpo_loss(PC, PR, RC, RR, "hinge", beta=0.6)
    assert out.losses.tolist() == pytest.approx([max(0, 1 - 0.6 * h) for h in H])


def test_nll_term_adds_per_token_nll_of_chosen():
    base = dpo_loss(PC, PR, RC, RR, "sigmoid", beta=0.1)
    out = dpo_loss(PC, PR, RC, RR, "sigmoid", beta=0.1, chosen_tokens=NC, nll_coef=0.5)
    nll = (4 / 4 + 10 / 5) / 2
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.5 * nll, rel=1e-6)


def test_gradient_moves_chosen_up_and_rejected_down():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, "sigmoid", beta=0.1).loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descending the loss raises chosen, lowers rejected


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        dpo_loss(PC, PR, RC, RR, "kto")
