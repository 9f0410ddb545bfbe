"""DePT: Decoupled Prompt Tuning (Zhang et al., CVPR 2024, arXiv 2309.07439), a plug-in on any learner.

DePT never changes the backbone either. Beside the learner's cosine logits it trains a channel-adjusted
transfer (CAT) head on the base classes, so that base-specific knowledge lands in the head's channels and
the prompt keeps more of what transfers to new classes. In the paper's order:
  1. the CAT head      a channel-wise affine map (scale 1, bias 0 at the start) on the image features
                       and another on the text features, then a linear classifier over the base classes
  2. the loss          (1 - w) CE(the learner's cosine logits) + w CE(the head on the image features and
                       on the text features of the batch's labels, together); w = 0.7, and the
                       learner's own other losses unchanged (KgCoOp's, PromptSRC's)
  3. inference         base classes: (1 - w) cosine logits + w head logits; new classes: the learner's
                       cosine logits alone, the head never touches them
The head's tensors train at 6.5 x the prompt's learning rate (the released staged learning rate). The
head reads the learner's features before the cosine (Output.features, docs/learners.md). The paper's
text was not available here; every behaviour follows the released trainers (Koorye/DePT,
trainers/elp_*.py), docs/deviations.md.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_prompt import Learner


# -----------------------------------------------------------------------------
# 1. The channel-adjusted transfer head

class ChannelAffine(nn.Module):
    """x * scale + bias per channel, from the identity (the released FiLM without its sigmoid)."""

    def __init__(self, dim):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.scale.to(x.dtype) * x + self.bias.to(x.dtype)


class DePT(Learner):
    """A learner and its CAT head over the base classes. In eval mode its logits are the fused ones;
    `learner` alone scores classes the head was not trained on."""

    def __init__(self, learner, weight=0.7, lr_scale=6.5):
        super().__init__()
        E = learner.clip.text_projection.shape[1]
        self.learner, self.weight, self.lr_scale = learner, weight, lr_scale
        self.image_affine, self.text_affine = ChannelAffine(E), ChannelAffine(E)
        self.head = nn.Linear(E, len(learner.classnames))  # (C_b, E) + (C_b,)
        self.clip, self.text_per_image, self.frozen_image_encoder = learner.clip, True, False

    @property
    def classnames(self):
        return self.learner.classnames

    def set_classnames(self, names):
        if list(names) != list(self.learner.classnames):
            raise ValueError("DePT's head scores the classes it was trained on; use .learner for others")

    def head_logits(self, image_features):
        return self.head(self.image_affine(image_features))  # (B, C_b), unscaled as released

    # -------------------------------------------------------------------------
    # 3. Inference: the learner's cosine logits fused with the head's

    def forward(self, images, class_ids=None):
        out = self.learner(images, class_ids)
        if self.training:
            return out
        head = self.head_logits(out.features[0])
        head = head if class_ids is None else head[:, class_ids]
        return out._replace(logits=(1 - self.weight) * out.logits + self.weight * head)

    def learned_tensors(self):
        """The learner's, and the head's under 'head.'."""
        head = {"head." + n: p for n, p in self.named_parameters() if not n.startswith("learner.")}
        return dict(self.learner.learned_tensors(), **head)

    def param_groups(self, lr):
        """The released staged learning rate: the head at lr x lr_scale, the learner's tensors at lr
        (computed as the released optimiser does: (lr x s) x (1 / s))."""
        head = [p for n, p in self.named_parameters() if not n.startswith("learner.")]
        prompt = [p for p in self.learner.parameters() if p.requires_grad]
        return [{"params": prompt, "lr": lr * self.lr_scale * (1.0 / self.lr_scale)},
                {"params": head, "lr": lr * self.lr_scale}]


# -----------------------------------------------------------------------------
# 2. The loss

def dept_loss(dept, images, labels):
    """(1 - w) CE(cosine logits) + w CE(head on [text features of the labels; image features]) plus the
    learner's own other losses. Returns (loss, {name: value}) for logging."""
    out = dept.learner(images)  # every base class
    image, text = out.features  # before the cosine: (B, E), (C, E) or per image (B, C, E)
    if text.dim() == 2:  # the map on every class first, then the labels' rows, as released
        text = dept.text_affine(text)[labels]  # (B, E)
    else:  # CoCoOp: each image's own class texts, mapped one image at a time as released
        text = torch.stack([dept.text_affine(x)[y] for x, y in zip(text, labels)])
    head = dept.head(torch.cat([text, dept.image_affine(image)]))  # (2B, C_b)
    ce = F.cross_entropy(out.logits, labels)
    ce_head = F.cross_entropy(head, torch.cat([labels, labels]))
    w = dept.weight
    loss = (1 - w) * ce + w * ce_head + sum(out.losses.values())
    return loss, {"ce": ce.item(), "ce_head": ce_head.item(), **{k: v.item() for k, v in out.losses.items()}}
