"""Losses of prompt tuning and of MAO's Alterable Regularization (MAO, ICME
2025, arXiv 2503.18160v1).

    Eq. (2)  L_CE       = -sum_i c_i log p(y | I) over all classes C         (the backbones' loss)
    Eq. (5)  C~'_b      = the unique classes of a hard-negative batch, text features L2-normalised
    Eq. (6)  L_CE^base  = CE over the candidates C~'_b only   ("dynamic candidate", reg-B, base step)
    Eq. (8)  L_CE^new   = CE over all new classes C_n with Top-1 pseudo-labels t^_n   (reg-N, new step)

p(y | I) itself (Eq. (3)) is the backbone's prediction and lives in clip_prompt.py. Every
function takes tensors, never a model, so these losses compose with any backbone: MAO only
decides which classes are candidates and which labels are targets. A backbone's own extra
losses (PromptSRC's self-regulation) come out of its forward and train.py adds them unchanged
("other possible loss functions in the prompt tuning backbones are maintained unchanged", MAO
§3.2). DPC's L_CL lives in dpc.py."""
import math

import torch
import torch.nn.functional as F


def cross_entropy(logits, labels):
    """L_CE = -sum_i c_i log p(y | I), the batch mean -- Eq. (2). logits (B, C), labels (B,)."""
    return F.cross_entropy(logits, labels)  # Eq. (2)


def dynamic_candidates(labels, dedup=True):
    """The candidate set C~'_b of a hard-negative batch and each image's index into it -- Eq. (5).

    dedup=True (paper): the H unique classes of the batch; targets index into them.
    dedup=False (released code): one candidate row per image, in batch order, duplicates kept; the
    target of row j is j. The L2 normalisation of Eq. (5) is the backbone's own (encode_text's).
    Returns (candidate class ids (H,), targets (B',)).
    """
    if dedup:
        candidates, targets = torch.unique(labels, return_inverse=True)  # Eq. (5): H <= b*K classes
        return candidates, targets
    # NOTE(deviation): the released code does not de-duplicate; a repeated class gives equal columns
    return labels, torch.arange(len(labels), device=labels.device)


def dynamic_candidate_loss(logits, targets):
    """L_CE^base = -sum_{i=1..H} c_i log p(y | I_b), only C~'_b as candidates -- Eq. (6). (B', H)"""
    return F.cross_entropy(logits, targets)  # Eq. (6)


def pseudo_label_loss(logits, pseudo_labels):
    """L_CE^new = -sum_{i=1..N} c_i log p(y = t^_n | I_n) over all new classes -- Eq. (8). (B, N)"""
    return F.cross_entropy(logits, pseudo_labels)  # Eq. (8)


def gpa_weights(epochs, mean, std):
    """PromptSRC's Gaussian prompt aggregation (§3.3): w_e proportional to N(e; mean, std^2) for
    epochs e = 1..E, summing to 1; the prompts end as sum_e w_e * (prompts after epoch e)."""
    w = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    return [x / sum(w) for x in w]
