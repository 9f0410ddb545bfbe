"""Losses of prompt tuning and of MAO's Alterable Regularization (MAO, ICME 2025, arXiv 2503.18160v1).

    Eq. (2)  L_CE       = -sum_i c_i log p(y | I)            over all classes C            (the backbones' loss)
    Eq. (5)  C~'_b      = unique classes of the hard-negative batch, text features L2-normalised
    Eq. (6)  L_CE^base  = CE over the candidates C~'_b only     ("dynamic candidate", reg-B, base step)
    Eq. (8)  L_CE^new   = CE over all new classes C_n with Top-1 pseudo-labels t^_n (reg-N, new step)
    DPC      L_CL       = symmetric image<->text contrastive loss over a hard-negative batch (DPC §3.2; the
                          summary we have gives no equation numbers, so it is cited by name)

p(y | I) itself (Eq. (3)) is the backbone's prediction and lives in clip_prompt.py. Every function takes tensors,
never a model, so these losses compose with any backbone: MAO only decides which classes are candidates and which
labels are targets. The backbone's own extra losses are added unchanged by train.py ("other possible loss
functions in the prompt tuning backbones are maintained unchanged", MAO §3.2):

    PromptSRC §3.2 (arXiv 2307.06948): L_SCL = 25 * L1(text, frozen text) + 10 * L1(image, frozen image)
                                              + KL(frozen logits || prompted logits)
    PromptSRC §3.3: Gaussian prompt aggregation weights over epochs (train.py averages the prompts with them)
"""
import math

import torch
import torch.nn.functional as F


def cross_entropy(logits, labels):
    """L_CE = -sum_i c_i log p(y | I), averaged over the batch -- Eq. (2). logits (B, C), labels (B,)."""
    return F.cross_entropy(logits, labels)  # Eq. (2)


def dynamic_candidates(labels, dedup=True):
    """The candidate set C~'_b of a hard-negative batch and each image's target index into it -- Eq. (5).

    dedup=True (paper): the H unique classes of the batch; targets index into them.
    dedup=False (official code): one candidate row per image, in batch order, duplicates kept; target of row j is j.
    The L2 normalisation of Eq. (5) is the backbone's own (encode_text returns normalised features).
    Returns (candidate class ids (H,), targets (B',)).
    """
    if dedup:
        candidates, targets = torch.unique(labels, return_inverse=True)  # Eq. (5): H <= b*K classes
        return candidates, targets
    # NOTE(deviation): the official code does not de-duplicate; a repeated class gives identical columns
    return labels, torch.arange(len(labels), device=labels.device)


def dynamic_candidate_loss(logits, targets):
    """L_CE^base = -sum_{i=1..H} c_i log p(y | I_b) with only C~'_b as candidates -- Eq. (6). logits (B', H)."""
    return F.cross_entropy(logits, targets)  # Eq. (6)


def pseudo_label_loss(logits, pseudo_labels):
    """L_CE^new = -sum_{i=1..N} c_i log p(y = t^_n | I_n) over all new classes C_n -- Eq. (8). logits (B, N)."""
    return F.cross_entropy(logits, pseudo_labels)  # Eq. (8)


def symmetric_contrastive_loss(logits):
    """DPC's L_CL (DPC §3.2, METHODS.md B5) = 1/2 [CE(L, arange) + CE(L^T, arange)] over a hard-negative batch.

    logits L (B', B'): image j against the text of image k's class (one text row per image, in batch order), so
    the matching pair is on the diagonal; rows are image->text, columns text->image.
    """
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))  # DPC L_CL


# -----------------------------------------------------------------------------
# PromptSRC's self-regulation (a backbone loss: kept unchanged under MAO)

def self_regulating_losses(reg, text_weight=25.0, image_weight=10.0):
    """PromptSRC's three consistency terms from the tensors its forward returns (PromptSRC §3.2).

    text:   mean |t - t0| over all C x E entries of the normalised prompted / frozen-template text features
    image:  mean |v - v0| over all B x E entries of the normalised prompted / frozen image features
    logits: sum of p0 * (log p0 - log p) over the batch and all C classes, divided by B * C (the official reduction)
    """
    text = F.l1_loss(reg["text"], reg["text_target"])
    image = F.l1_loss(reg["image"], reg["image_target"])
    logp, logp0 = F.log_softmax(reg["logits"], -1), F.log_softmax(reg["logits_target"], -1)
    kl = F.kl_div(logp, logp0, reduction="sum", log_target=True) / reg["logits"].numel()
    return {"scl_text": text_weight * text, "scl_image": image_weight * image, "scl_kl": kl}


def gpa_weights(epochs, mean, std):
    """Gaussian prompt aggregation: w_e proportional to N(e; mean, std^2) for epochs e = 1..E, summing to 1."""
    w = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    return [x / sum(w) for x in w]
