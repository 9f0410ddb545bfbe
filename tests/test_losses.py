"""Each loss on a small hand-computed example; gradients reach only the learnable prompt."""
import math

import torch

from clip_prompt import CoOp
from losses import cross_entropy, dynamic_candidate_loss, dynamic_candidates, pseudo_label_loss


def manual_ce(logits, targets):
    total = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        total += -(row[t] - math.log(sum(math.exp(v) for v in row)))
    return total / len(logits)


def test_cross_entropy_eq2():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([2, 0])
    expected = (-(3 - math.log(math.e + math.e ** 2 + math.e ** 3)) - (1 - math.log(math.e + 2))) / 2
    assert abs(cross_entropy(logits, labels).item() - expected) < 1e-6


def test_dynamic_candidates_eq5():
    labels = torch.tensor([5, 2, 5, 7])
    cand, target = dynamic_candidates(labels, dedup=True)
    assert cand.tolist() == [2, 5, 7] and target.tolist() == [1, 0, 1, 2]  # H = 3 unique classes
    cand, target = dynamic_candidates(labels, dedup=False)
    assert cand.tolist() == [5, 2, 5, 7] and target.tolist() == [0, 1, 2, 3]  # official: one row per image


def test_dynamic_candidate_loss_eq6_by_hand():
    # 3 images of classes 7, 2, 7 over a 10-class label space; text features of every class are one-hot rows
    text = torch.eye(10)[:, :4] + 0.1  # (10, 4), not normalised on purpose: the loss only sees logits
    img = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    labels = torch.tensor([7, 2, 7])
    cand, target = dynamic_candidates(labels)  # [2, 7]
    logits = img @ text[cand].t()  # (3, 2): only the candidates are scored
    loss = dynamic_candidate_loss(logits, target)
    assert abs(loss.item() - manual_ce(logits, target)) < 1e-6
    # the same images scored over all 10 classes give a different (larger) loss: the candidate set matters
    assert loss.item() < cross_entropy(img @ text.t(), labels).item()


def test_ar_dedup_flag_changes_the_loss_when_a_class_repeats():
    text = torch.eye(10, 8) + 0.05  # class c's text feature points along axis c
    labels = torch.tensor([3, 1, 3, 6])
    img = text[labels]  # each image matches its own class best
    values = []
    for dedup in (True, False):
        cand, target = dynamic_candidates(labels, dedup)
        values.append(dynamic_candidate_loss(10 * img @ text[cand].t(), target).item())
    # official variant: the two images of class 3 each see their class twice, capping p at 1/2 (+log 2 / 2 on average)
    assert values[1] - values[0] > 0.3
    labels = torch.tensor([3, 1, 0, 6])  # without repeats the two variants agree (same candidates, other order)
    img = text[labels]
    same = [dynamic_candidate_loss(10 * img @ text[c].t(), t).item()
            for c, t in (dynamic_candidates(labels, d) for d in (True, False))]
    assert abs(same[0] - same[1]) < 1e-5


def test_pseudo_label_loss_eq8_by_hand():
    logits = torch.tensor([[0.2, 1.5, -0.3], [2.0, 0.1, 0.0]])
    pseudo = torch.tensor([1, 0])
    assert abs(pseudo_label_loss(logits, pseudo).item() - manual_ce(logits, pseudo)) < 1e-6


def test_gradients_reach_only_the_prompt(tiny_clip):
    names = ["red circle", "red square", "blue circle", "blue square", "green circle"]
    coop = CoOp(tiny_clip, names)
    labels = torch.tensor([0, 3, 4])
    cand, target = dynamic_candidates(labels)
    out = coop(torch.randn(3, 3, 32, 32), cand)
    assert out.logits.shape == (3, 3)
    dynamic_candidate_loss(out.logits, target).backward()
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.parameters())
