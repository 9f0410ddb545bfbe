"""Top-1 pseudo-labels for the unlabeled new-class images of MAO's new step (MAO §3.3, Eq. (7)).

The teacher is frozen. Paper default (Table 5's best): foundation CLIP, zero-shot with "a photo of a {}." over the
new class names. The official code instead uses the base-step prompt learner re-targeted to the new classes
(train.py --pseudo_labeler tuned). Either way the teacher's text features are computed once per run, and when the
teacher's image encoder is plain frozen CLIP and the student's forward already produced those features (CoOp),
they are reused: "shared-parameter CLIP", no second image forward.
"""
import torch


def assign_pseudo_labels(image_features, text_features, logit_scale=100.0):
    """t^_n = argmax_{c in C_n} softmax(<f(i_n), g(c)> / tau) -- Eq. (7). Features (B, E), (N, E) normalised."""
    probs = (logit_scale * image_features @ text_features.t()).softmax(dim=-1)  # (B, N)
    return probs.argmax(dim=-1)  # Eq. (7)


class PseudoLabeler:
    """Wraps a frozen teacher learner (zero-shot CLIP or the base-step prompt) over the new classes."""

    def __init__(self, teacher):
        self.teacher = teacher.eval()
        with torch.no_grad():
            self.text_features = teacher.encode_text()  # (N, E), once per run
        self.logit_scale = teacher.clip.logit_scale.exp().item()

    @torch.no_grad()
    def __call__(self, images, frozen_image_features=None):
        """Pseudo-labels (B,) for a batch; reuses frozen CLIP image features when the teacher's encoder is CLIP's."""
        if frozen_image_features is not None and self.teacher.frozen_image_encoder:
            img = frozen_image_features
        else:
            img = self.teacher.encode_image(images)
        return assign_pseudo_labels(img.float(), self.text_features, self.logit_scale)

    @torch.no_grad()
    def label_dataset(self, loader, device):
        """Pseudo-labels of every item once, on un-augmented views (train.py --pseudo_label_every epoch)."""
        labels = torch.empty(len(loader.dataset), dtype=torch.long)
        for images, _, idx in loader:
            labels[idx] = self(images.to(device)).cpu()
        return labels
