"""The half-precision path the paper trains with, run on CPU: frozen CLIP in CLIP's own fp16 layout, learnable
tensors in fp32, the loss scaled (GradScaler), for every backbone under MAO and end to end through train.py."""
import os

import pytest
import torch

from clip_prompt import build_learner, load_clip
from conftest import run_train
from losses import dynamic_candidate_loss, dynamic_candidates

NAMES = ["red circle", "red square", "blue circle", "green triangle", "green star"]


def _fp16_on_cpu():
    try:
        a = torch.randn(4, 4, dtype=torch.half)
        (a @ a).sum().item()
        torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8).half(), torch.randn(2, 3, 2, 2).half())
        return None
    except RuntimeError as e:
        return str(e)


pytestmark = pytest.mark.skipif(_fp16_on_cpu() is not None,
                                reason=f"the installed torch cannot run fp16 matmuls / convolutions on CPU: {_fp16_on_cpu()}")


def test_fp16_layout_is_clips_own(tiny_clip_path):
    half = load_clip(tiny_clip_path, "cpu", "fp16")
    assert half.dtype == torch.half and half.visual.conv1.weight.dtype == torch.half
    assert half.ln_final.weight.dtype == torch.float32  # clip.model.convert_weights keeps LayerNorms in fp32
    assert load_clip(tiny_clip_path, "cpu", "auto").dtype == torch.float32  # the CPU default


@pytest.mark.parametrize("backbone", ["coop", "maple", "ivlp", "promptsrc"])
def test_mao_base_steps_train_in_fp16_with_loss_scaling(tiny_clip_path, backbone):
    model = load_clip(tiny_clip_path, "cpu", "fp16")
    learner = build_learner(backbone, model, NAMES, n_ctx=2 if backbone == "maple" else 4, depth=2).train()
    params = [p for p in learner.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32}  # master copies of the prompts stay fp32
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 3, 1, 4, 2, 3])
    scales = []
    for _ in range(4):  # the scaler may skip the first steps (overflow in the scaled fp16 backward), then steps
        candidates, targets = dynamic_candidates(labels)  # Eq. 5
        out = learner(images, candidates)
        loss = dynamic_candidate_loss(out.logits, targets) + sum(out.losses.values())  # Eq. 6 + the backbone's own
        assert torch.isfinite(loss) and out.logits.dtype == torch.float32
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert any(not torch.equal(a, p) for a, p in zip(start, params)), scales  # a step was taken
    assert all(torch.isfinite(p).all() for p in params)
    assert all(p.grad is None for p in model.parameters())  # CLIP stays frozen


def test_train_py_end_to_end_in_fp16(tmp_path, demo_root, tiny_clip_path):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2", "--precision", "fp16")
    assert res["args"]["precision"] == "fp16" and 0 <= res["hm"] <= 100
    for name in ("base_prompt.pt", "new_prompt.pt"):
        ck = torch.load(os.path.join(out, name), weights_only=False)
        assert ck["learned"]["ctx"].dtype == torch.float32
    scaler = torch.load(os.path.join(out, "base_last.pt"), weights_only=False)["scaler"]
    assert scaler["scale"] > 0  # the loss scaler's state is checkpointed for --resume
