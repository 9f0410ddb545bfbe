"""Top-1 pseudo-labels (Eq. (7)) from frozen zero-shot CLIP, reusing the student's frozen image features."""
import torch

from clip_prompt import CoOp, ZeroShotCLIP
from pseudolabel import PseudoLabeler, assign_pseudo_labels

NEW = ["yellow circle", "yellow square", "green triangle", "red triangle"]


def test_eq7_is_the_argmax_of_zero_shot_logits(tiny_clip):
    zs = ZeroShotCLIP(tiny_clip, NEW, "a photo of a {}.")
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        logits = zs(images).logits
    labels = PseudoLabeler(zs)(images)
    assert torch.equal(labels, logits.argmax(-1))


def test_assign_on_toy_features():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert assign_pseudo_labels(100 * img @ txt.t()).tolist() == [1, 0, 0]


def test_frozen_image_features_are_reused_only_for_a_frozen_encoder(tiny_clip):
    images = torch.randn(6, 3, 32, 32)
    labeler = PseudoLabeler(ZeroShotCLIP(tiny_clip, NEW))
    student = CoOp(tiny_clip, NEW)
    out = student(images)
    assert torch.equal(labeler(images, out.frozen_image_features), labeler(images))
    calls = []
    labeler.teacher.encode_image = lambda x: calls.append(1) or torch.zeros(len(x), 64)
    labeler(images, out.frozen_image_features)
    assert calls == []  # CoOp's image features are plain CLIP's: no second image forward
    labeler.teacher.frozen_image_encoder = False  # a prompted teacher encoder must run itself
    labeler(images, out.frozen_image_features)
    assert calls == [1]


def test_tuned_teacher_differs_from_zero_shot(tiny_clip):
    """--pseudo_labeler tuned (base-step prompt) labels with its own prompt, so it can disagree with CLIP."""
    images = torch.randn(32, 3, 32, 32)
    tuned = CoOp(tiny_clip, NEW)
    with torch.no_grad():
        tuned.ctx.add_(2.0 * torch.randn_like(tuned.ctx))
    a = PseudoLabeler(ZeroShotCLIP(tiny_clip, NEW))(images)
    b = PseudoLabeler(tuned)(images)
    assert not torch.equal(a, b)
