"""DPC: Dual-Prompt Collaboration (Li et al., CVPR 2025, arXiv 2503.13443), a plug-in on any learner.

DPC never changes the backbone. Stage 1 is the backbone trained as published on the base classes,
giving its prompt P (train.py). Stage 2, this file, in the paper's order:
  1. parallel prompt P'   a copy of P trained while P stays frozen (DPC §3.1)          DualPrompt
  2. Dynamic Hard         each anchor image's Top-K base classes under frozen P, by    ImageTextRanking
     Negative Optimizer   image-text similarity, re-ranked every epoch; the batches come
     (DHNO)               from MAO's batch builder with this ranking
  3. L_CL                 symmetric image<->text contrastive loss (DPC §3.2)           symmetric_contrastive_loss
  4. weighting-           base classes: omega_b P' + (1 - omega_b) P; new classes:     decoupled_prompts
     decoupling           omega_n P' + (1 - omega_n) P (omega_n -> 0: the backbone)
"Prompt" means the tensors a learner lists in prompt_names (its context, typically), or every learnable
tensor when it lists none (MaPLe's prompts and couplings). Its other learnable tensors train directly in
stage 2, as the released PromptKD+DPC trains those that are not context; base classes use their trained
values, new classes stage 1's. The paper summary we have numbers no equations, so parts are cited by
name. Where the released code (JREion/DPC) differs: docs/deviations.md; each difference is a flag.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_prompt import class_logits, class_texts

# -----------------------------------------------------------------------------
# 1. The parallel prompt P' beside the frozen P (DPC §3.1; METHODS.md B2)


class DualPrompt(nn.Module):
    """P (the stage-1 prompt, frozen) and the parallel prompt P' (trained, P' = P at the
    start), around any learner.

    The backbone is untouched: its forward runs with P' substituted for its learnable tensors
    (functional_call). param='direct' (paper): the trained tensor is P' itself, at the
    stage-2 learning rate. param='released' (the released CoOp+DPC trainer): it stores M and
    runs the forward on F^-1(M) = (M - (1 - w) P) / w (w = omega_b), but its P is M's own
    storage (the parameter is made from the loaded P without a copy), so P moves with M: the
    forward computes (M - (1 - w) M) / w = M while autograd treats P as a constant. P' = M is
    therefore trained directly with its gradient scaled by 1 / w: SGD at lr / w, its weight
    decay acting at the plain lr (equivalently lr / w with weight decay w * wd; 5x the lr at
    w = 0.2). Below: the same arithmetic, with the aliasing made explicit as M.detach()."""

    def __init__(self, learner, omega_b=0.2, param="direct", restart=()):
        super().__init__()
        if param not in ("direct", "released"):
            raise ValueError(f"param must be 'direct' or 'released', not '{param}'")
        if param == "released" and not 0 < omega_b <= 1:
            raise ValueError(f"--dpc_param released divides by omega_b; it needs 0 < omega_b <= 1 (got {omega_b})")
        own, state = dict(learner.named_parameters()), learner.learned_state()
        self.names = [n for n in state if n in own]  # P: the learned tensors (any frozen prompt too)
        # state that no gradient trains but a forward updates (PromptKD's BatchNorm statistics): stage
        # 1's values are kept for the classes scored with stage 1's tensors
        self.kept = {n: v for n, v in state.items() if n not in own}
        self.prompt = [n for n in self.names if learner.prompt_names is None or n in learner.prompt_names]
        self.omega_b, self.param = omega_b, param
        for n in self.names:
            self.register_buffer("P__" + self._key(n), own[n].detach().clone())  # P, frozen
        # P' starts as P; the tensors in `restart` from N(0, 0.02) instead, as a fresh build draws them (the
        # released PromptKD+DPC's stage 2 never loads its deep prompts: --dpc_vision_deep, --dpc_text_deep)
        self.stored = nn.ParameterDict({self._key(n): nn.Parameter(
            own[n].detach().clone() if n not in restart else torch.empty_like(own[n]).normal_(std=0.02))
            for n in self.names})
        self.learner = learner.requires_grad_(False)  # holds P; the forward substitutes P'

    @staticmethod
    def _key(name):
        return name.replace(".", "__")  # ParameterDict keys may not hold dots

    def frozen_prompt(self):
        """Stage 1's learned state: P, and the other tensors as stage 1 left them."""
        return dict({n: getattr(self, "P__" + self._key(n)) for n in self.names}, **self.kept)

    def parallel_prompt(self):
        """The learner's tensors as the stage-2 forward uses them (differentiable): P' and the rest."""
        M, w = {n: self.stored[self._key(n)] for n in self.names}, self.omega_b
        if self.param == "released":
            M.update({n: (M[n] - (1 - w) * M[n].detach()) * (1 / w) for n in self.prompt})  # F^-1(M)
        return M

    def mix(self, omega, others="trained"):
        """omega P' + (1 - omega) P for the prompt, the other tensors as stage 2 trained them (or as
        stage 1 left them: others='stage1'); detached, on the CPU: a state for learner.load_learned."""
        P, Q = self.frozen_prompt(), self.parallel_prompt()
        rest = dict(Q, **self.updated()) if others == "trained" else P
        out = {n: omega * Q[n] + (1 - omega) * P[n] if n in self.prompt else rest[n] for n in P}
        return {n: v.detach().cpu().clone() for n, v in out.items()}

    def updated(self):
        """The state a stage-2 forward updated in place (kept apart in self.kept at the start)."""
        return {n: v for n, v in self.learner.learned_state().items() if n in self.kept}

    def forward(self, images, class_ids=None):
        return torch.func.functional_call(self.learner, self.parallel_prompt(), (images, class_ids), strict=False)

    def learned_state(self):  # the stored trainable tensors (P' itself in both modes), for resume
        return dict({n: self.stored[self._key(n)].detach().cpu().clone() for n in self.names},
                    **self.updated())

    def load_learned(self, state):
        if set(state) != set(self.names) | set(self.kept):
            raise ValueError(f"checkpoint tensors {sorted(state)} do not match {sorted(self.names)}")
        with torch.no_grad():
            for n in self.names:
                p = self.stored[self._key(n)]
                p.copy_(state[n].to(p.device, p.dtype))
        if self.kept:  # the learner's own updated state, its learned tensors as stage 1 left them
            self.learner.load_learned(dict(self.frozen_prompt(), **{n: state[n] for n in self.kept}))


# -----------------------------------------------------------------------------
# 2. DHNO's ranking: each training image's Top-K base classes under the frozen prompt P (METHODS.md B4)

class ImageTextRanking:
    """The neighbour source HardNegativeBatchSampler asks every epoch: for every training image, on a
    fresh augmented view (loader of (image, label, index)), the K base classes the frozen stage-1
    learner (P) scores highest, as an (N, K) table; the logits are ranked directly (softmax keeps
    their order)."""

    def __init__(self, learner, loader, K, device):
        self.learner, self.loader, self.K, self.device = learner, loader, K, device
        self.num_classes = len(learner.classnames)

    @torch.no_grad()
    def __call__(self, epoch):
        learner = self.learner
        was_training = learner.training
        learner.eval()
        texts = class_texts(learner)  # (C, E), once (None: the learner's texts depend on the image)
        table = torch.empty(len(self.loader.dataset), self.K, dtype=torch.long)
        for images, _, idx in self.loader:
            table[idx] = class_logits(learner, images.to(self.device), texts).topk(self.K, dim=1).indices.cpu()
        learner.train(was_training)
        return table


# -----------------------------------------------------------------------------
# 3. L_CL: the symmetric contrastive loss over a hard-negative batch (DPC §3.2; METHODS.md B5)

def symmetric_contrastive_loss(logits):
    """L_CL = 1/2 [CE(L, arange) + CE(L^T, arange)] over a hard-negative batch.

    logits L (B', B'): image j against the text of image k's class (one text row per image, in batch
    order), so the matching pair is on the diagonal; rows are image->text, columns text->image."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))  # DPC L_CL


def stage2_loss(dual, images, labels, backbone_losses=True):
    """One stage-2 step: P' scores each image against its batch's classes, one text row per image
    (B', B'), and L_CL is added to the backbone's own other losses (the paper's "parallel to other
    backbone losses") unless backbone_losses is False (the released code: L_CL only). Returns
    (loss, {name: value}) for logging."""
    out = dual(images, labels)  # labels double as the text rows: image k's class, in batch order
    cl = symmetric_contrastive_loss(out.logits)
    extra = out.losses if backbone_losses else {}
    return cl + sum(extra.values()), {"l_cl": cl.item(), **{k: v.item() for k, v in extra.items()}}


# -----------------------------------------------------------------------------
# 4. Weighting-decoupling at inference (DPC §3.3; METHODS.md B3)

def decoupled_prompts(dual, omega_b, omega_n, base_infer="mixed"):
    """{'parallel': P', 'base': the prompt for base classes, 'new': the one for new classes}.

    base = omega_b P' + (1 - omega_b) P (paper), or P' alone (base_infer='parallel', the released
    code); new = omega_n P' + (1 - omega_n) P with the other tensors at stage 1's values, exactly
    stage 1 at omega_n = 0: new classes keep the backbone's accuracy."""
    parallel = dual.mix(1.0)
    base = parallel if base_infer == "parallel" else dual.mix(omega_b)
    return {"parallel": parallel, "base": base, "new": dual.mix(omega_n, others="stage1")}
