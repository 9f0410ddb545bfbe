"""DPC: the symmetric loss by hand, the parallel prompt (P frozen, P' trained, weighting-decoupling exact at
omega 0 and 1, the released update as SGD at lr / omega by hand), DPC's per-image ranking, and end to end."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_prompt import build_learner
from conftest import run_train
from dpc import DualPrompt, ImageTextRanking, symmetric_contrastive_loss
from sampler import HardNegativeBatchSampler, class_neighbours

NAMES = ["red circle", "red square", "blue triangle", "green star"]


def test_symmetric_contrastive_loss_by_hand():
    L = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = (-math.log(math.e ** 2 / (math.e ** 2 + 1)) - math.log(math.e ** 3 / (math.e + math.e ** 3))) / 2
    cols = (-math.log(math.e ** 2 / (math.e ** 2 + math.e)) - math.log(math.e ** 3 / (1 + math.e ** 3))) / 2
    assert symmetric_contrastive_loss(L).item() == pytest.approx((rows + cols) / 2, abs=1e-6)
    assert symmetric_contrastive_loss(L).item() != pytest.approx(F.cross_entropy(L, torch.arange(2)).item())


def _stage1(tiny_clip, backbone="coop"):
    torch.manual_seed(3)
    m = build_learner(backbone, tiny_clip, NAMES, n_ctx=2, depth=2)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # a "trained" P that differs from the initialisation
    return m


@pytest.mark.parametrize("backbone", ["coop", "maple"])
def test_stage2_leaves_P_bit_identical_and_mixes_exactly(tiny_clip, backbone):
    learner = _stage1(tiny_clip, backbone)
    P = learner.learned_state()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref_logits = learner.eval()(images).logits  # stage-1 logits
    dual = DualPrompt(learner, omega_b=0.2).train()
    opt = torch.optim.SGD([p for p in dual.parameters() if p.requires_grad], lr=0.5)
    assert {id(p) for p in dual.parameters() if p.requires_grad} == {id(p) for p in dual.stored.values()}
    for _ in range(3):
        loss = symmetric_contrastive_loss(dual(images, torch.tensor([0, 1, 2, 3])).logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(P[n], dual.frozen_prompt()[n]) for n in P)  # the frozen copy is untouched
    assert all(torch.equal(P[n], dict(dual.learner.named_parameters())[n].detach()) for n in P)
    assert any(not torch.equal(P[n], dual.mix(1.0)[n]) for n in P)  # P' moved
    # omega_n = 0: new-class logits are stage 1's exactly
    fresh = build_learner(backbone, tiny_clip, NAMES, n_ctx=2, depth=2).eval()
    fresh.load_learned(dual.mix(0.0))
    with torch.no_grad():
        assert torch.equal(fresh(images).logits, ref_logits)
        # omega_b = 1: base-class logits come from P' alone, i.e. what the trained forward computes
        fresh.load_learned(dual.mix(1.0))
        assert torch.allclose(fresh(images).logits, dual.eval()(images).logits, atol=1e-5)
        mid = dual.mix(0.2)
    assert all(torch.allclose(mid[n], 0.2 * dual.mix(1.0)[n] + 0.8 * P[n], atol=1e-6) for n in P)


def test_released_update_is_sgd_on_P_prime_at_lr_over_omega(tiny_clip):
    """The released trainer's update, written out here by hand: three SGD steps with momentum at lr 0.002 and weight
    decay 5e-4 move P' exactly as plain SGD at lr 0.002 / 0.2 = 0.01 with weight decay 0.2 * 5e-4 = 1e-4 would."""
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    w, lr, wd, mu = 0.2, 0.002, 5e-4, 0.9
    dual = DualPrompt(_stage1(tiny_clip), omega_b=w, param="released").train()
    opt = torch.optim.SGD([p for p in dual.parameters() if p.requires_grad], lr=lr, momentum=mu, weight_decay=wd)
    ref = DualPrompt(_stage1(tiny_clip), omega_b=w, param="direct").train()  # same P, P' = P
    p_hand, buf = ref.stored["ctx"].detach().clone(), None
    for _ in range(3):
        opt.zero_grad()
        symmetric_contrastive_loss(dual(images, labels).logits).backward()
        opt.step()
        # by hand: the gradient of L_CL at the current P', then SGD with momentum at lr / w, weight decay w * wd
        with torch.no_grad():
            ref.stored["ctx"].copy_(p_hand)
        ref.stored["ctx"].grad = None
        symmetric_contrastive_loss(ref(images, labels).logits).backward()
        d = ref.stored["ctx"].grad + w * wd * p_hand
        buf = d if buf is None else mu * buf + d
        p_hand = p_hand - (lr / w) * buf
    moved = dual.mix(1.0)["ctx"] - dual.frozen_prompt()["ctx"]
    assert moved.abs().max() > 1e-4  # P' moved
    assert torch.allclose(dual.mix(1.0)["ctx"], p_hand, atol=1e-6, rtol=0)
    assert torch.allclose(dual.learned_state()["ctx"], p_hand, atol=1e-6, rtol=0)  # the stored tensor is P' itself
    # without weight decay, the paper's direct update at the same lr moves P' exactly w times as far (5x less)
    direct = DualPrompt(_stage1(tiny_clip), omega_b=w, param="direct").train()
    opt = torch.optim.SGD([p for p in direct.parameters() if p.requires_grad], lr=lr, momentum=mu)
    opt.zero_grad()
    symmetric_contrastive_loss(direct(images, labels).logits).backward()
    opt.step()
    one = DualPrompt(_stage1(tiny_clip), omega_b=w, param="released").train()
    opt = torch.optim.SGD([p for p in one.parameters() if p.requires_grad], lr=lr, momentum=mu)
    opt.zero_grad()
    symmetric_contrastive_loss(one(images, labels).logits).backward()
    opt.step()
    P = direct.frozen_prompt()["ctx"]
    step_direct, step_released = direct.mix(1.0)["ctx"] - P, one.mix(1.0)["ctx"] - P
    assert torch.allclose(step_released, step_direct / w, rtol=1e-3, atol=1e-7)


class _FakeLearner(nn.Module):
    """Fixed features: image i of class y is closest to the text rows listed in RANK[y]."""
    text_per_image = False
    def __init__(self, text, image_of_label):
        super().__init__()
        self.clip = nn.Module()
        self.clip.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.text, self.image_of_label, self.classnames = text, image_of_label, NAMES

    def encode_text(self, class_ids=None):
        return self.text

    def encode_image(self, images):
        return self.image_of_label[images[:, 0, 0, 0].long()]


def test_dpc_ranking_follows_the_prompt_not_minilm(minilm):
    mini = class_neighbours(NAMES, 2, minilm)
    assert mini[0, 1].item() == 1  # MiniLM: "red circle" is closest to "red square"
    text = torch.eye(4)
    # under the frozen prompt, an image of "red circle" looks most like "green star" after itself
    image_of_label = torch.tensor([[1.0, 0.1, 0.2, 0.9], [0.1, 1.0, 0.8, 0.0], [0.0, 0.8, 1.0, 0.1],
                                   [0.9, 0.0, 0.1, 1.0]])
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    images = torch.tensor(labels, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    ds = torch.utils.data.TensorDataset(images, torch.tensor(labels), torch.arange(len(labels)))
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    fake = _FakeLearner(text, image_of_label)
    table = ImageTextRanking(fake, loader, 2, "cpu")(0)
    assert table[:, 1].tolist() == [3, 3, 2, 2, 1, 1, 0, 0]
    sampler = HardNegativeBatchSampler(labels, ImageTextRanking(fake, loader, 2, "cpu"), b=1, seed=0)
    with pytest.raises(RuntimeError, match="set_epoch"):
        next(iter(sampler))
    sampler.set_epoch(0)
    for batch in sampler:
        anchor, negatives = labels[batch[0]], [labels[i] for i in batch[1:]]
        assert negatives == [table[batch[0], 1].item()]  # the prompt's neighbour, never MiniLM's
        if anchor == 0:
            assert negatives == [3] and mini[0, 1].item() not in negatives


@pytest.mark.parametrize("backbone", ["coop", "maple", "promptsrc"])
def test_dpc_end_to_end(tmp_path, demo_root, tiny_clip_path, backbone):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--backbone", backbone, "--method", "dpc",
                         "--epochs", "1", "--dpc_epochs", "2", "--depth", "2")
    for f in ("prompt.pt", "parallel_prompt.pt", "base_prompt.pt", "new_prompt.pt", "results.json", "dpc_last.pt"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["method"] == "dpc"
    assert saved["new"] == saved["new_stage1"]  # omega_n = 0: the new classes see exactly P
    ck = {k: torch.load(os.path.join(out, f"{k}.pt"), weights_only=False)["learned"]
          for k in ("prompt", "parallel_prompt", "base_prompt", "new_prompt")}
    for n, P in ck["prompt"].items():
        assert torch.equal(ck["new_prompt"][n], P)  # P saved by stage 1 is what new classes use
        assert torch.allclose(ck["base_prompt"][n], 0.2 * ck["parallel_prompt"][n] + 0.8 * P, atol=1e-6)
    assert any(not torch.equal(ck["parallel_prompt"][n], P) for n, P in ck["prompt"].items())  # stage 2 trained


def test_dpc_from_an_existing_backbone_checkpoint(tmp_path, demo_root, tiny_clip_path):
    _, out = run_train(tmp_path / "a", demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")
    res, out2 = run_train(tmp_path / "b", demo_root, tiny_clip_path, "--method", "dpc", "--dpc_epochs", "1",
                          "--init_from", os.path.join(out, "prompt.pt"), "--dpc_base_infer", "parallel")
    with open(os.path.join(out, "results.json")) as f:
        none = json.load(f)
    assert res["new"] == none["new"] and res["base_stage1"] == none["base"]  # stage 1 reused, not retrained
    assert not os.path.exists(os.path.join(out2, "prompt.pt"))
    par = torch.load(os.path.join(out2, "parallel_prompt.pt"), weights_only=False)["learned"]
    base = torch.load(os.path.join(out2, "base_prompt.pt"), weights_only=False)["learned"]
    assert all(torch.equal(par[n], base[n]) for n in par)  # official code: base classes scored with P' alone


def test_dpc_official_recipe_end_to_end(tmp_path, demo_root, tiny_clip_path):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--method", "dpc", "--recipe", "official",
                         "--epochs", "1", "--dpc_epochs", "2")
    assert res["recipe"] == "official" and res["variant"]["recipe"] == "official"
    assert res["args"]["dpc_param"] == "released" and res["args"]["dpc_backbone_losses"] == 0
    ck = {k: torch.load(os.path.join(out, f"{k}.pt"), weights_only=False)["learned"]
          for k in ("prompt", "parallel_prompt", "base_prompt", "new_prompt")}
    assert torch.equal(ck["base_prompt"]["ctx"], ck["parallel_prompt"]["ctx"])  # base classes: P' alone
    assert torch.equal(ck["new_prompt"]["ctx"], ck["prompt"]["ctx"])  # omega_n = 0: exactly P
    assert not torch.equal(ck["parallel_prompt"]["ctx"], ck["prompt"]["ctx"])
