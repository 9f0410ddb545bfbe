"""Top-1 pseudo-labels for the unlabeled new-class images of MAO's new step (MAO §3.3, Eq. (7)).

The teacher is frozen. Paper default (Table 5's best): foundation CLIP, zero-shot with "a photo
of a {}." over the new class names. The released code uses the base-step prompt re-targeted to
the new classes instead (train.py --pseudo_labeler tuned). Either way the teacher's text
features are computed once per run, and when its image encoder is plain frozen CLIP and the
student's forward already made those features (CoOp), they are reused: "shared-parameter CLIP",
no second image forward."""
import torch

from clip_prompt import class_texts
from data import hide_labels


def assign_pseudo_labels(logits):
    """t^_n = argmax_{c in C_n} softmax(<f(i_n), g(c)> / tau) -- Eq. (7); teacher logits (B, N)."""
    return logits.softmax(dim=-1).argmax(dim=-1)  # Eq. (7)


class PseudoLabeler:
    """A frozen teacher learner (zero-shot CLIP or the base-step prompt) over the new classes."""

    def __init__(self, teacher):
        self.teacher = teacher.eval()
        with torch.no_grad():
            self.text_features = class_texts(teacher)  # (N, E) once; None: per image
        self.logit_scale = teacher.clip.logit_scale.exp().item()

    @torch.no_grad()
    def __call__(self, images, frozen_image_features=None):
        """Pseudo-labels (B,) of a batch; frozen CLIP image features are reused when the teacher's
        encoder is CLIP's own."""
        if self.text_features is None:  # a teacher whose class texts depend on the image scores it
            return assign_pseudo_labels(self.teacher(images).logits)
        if frozen_image_features is not None and self.teacher.frozen_image_encoder:
            img = frozen_image_features
        else:
            img = self.teacher.encode_image(images)
        return assign_pseudo_labels(self.logit_scale * img.float() @ self.text_features.t())

    @torch.no_grad()
    def label_dataset(self, loader, device):
        """Pseudo-labels of every item once, on un-augmented views (--pseudo_label_every epoch)."""
        labels = torch.empty(len(loader.dataset), dtype=torch.long)
        for images, _, idx in loader:
            labels[idx] = self(images.to(device)).cpu()
        return labels


# -----------------------------------------------------------------------------
# How good the labels were: a diagnostic from the hidden labels, never part of the loss

def hidden_label_agreement(items):
    """agreement(idx, pseudo): the share of a batch's pseudo-labels equal to the hidden labels."""
    hidden = torch.tensor([y for _, y, _ in items])
    return lambda idx, pseudo: (pseudo.cpu() == hidden[idx]).float().mean().item()


def pseudo_label_quality(args, labeler, data, loaders, stats, fixed, log):
    """How often the new step's pseudo-labels equal the hidden labels: those it trained on, and those
    of the un-augmented views."""
    device = torch.device(args.device)
    hidden = torch.tensor([y for _, y, _ in data.new["train"]])
    once = fixed.cpu() if fixed is not None else labeler.label_dataset(
        loaders.test(hide_labels(data.new["train"]), data.decoded["new"]), device)
    steps = stats["steps"]
    q = {"once_unaugmented": 100 * (once == hidden).float().mean().item(),
         "used_in_training": 100 * stats["sums"]["pl_acc"] / steps if steps else None,
         "mode": args.pseudo_label_every}
    trained = "-" if q["used_in_training"] is None else f"{q['used_in_training']:.1f} %"
    log(f"pseudo-labels agree with the hidden labels: {trained} of those trained on "
        f"({'online, augmented views' if fixed is None else 'once, un-augmented views'}), "
        f"{q['once_unaugmented']:.1f} % on un-augmented views")
    return q
