"""DePT (dept.py) exact to its released trainers, written out here (Koorye/DePT trainers/elp_coop.py,
elp_cocoop.py, elp_kgcoop.py, elp_maple.py, optim.py): fused logits, loss and every gradient; its staged
learning rate as one SGD step; one step on every learner; a run end to end."""
import os

import clip
import pytest
import torch
import torch.nn.functional as F

import config
import eval as evaluation
import train
from conftest import near, run_train
from dept import DePT, dept_loss
from test_learners import LEARNERS, NAMES, learner, released_prompts, released_text_encoder


def perturbed(m, seed=0):
    """A trained-looking state: every learnable tensor moved away from its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def released_deep_text(model, prompts, tokens, deep):
    """The MaPLe text encoder: before block i >= 1 the compound prompt of layer i replaces tokens 1..n."""
    x = (prompts + model.positional_embedding.type(model.dtype)).permute(1, 0, 2)
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:1], deep[i - 1].unsqueeze(1).expand(-1, x.shape[1], -1), x[1 + deep[0].shape[0]:]])
        x = block(x)
    x = model.ln_final(x.permute(1, 0, 2)).type(model.dtype)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def released_deep_image(model, images, shallow, deep):
    """The MaPLe image encoder: the projected prompts appended at layer 0, replacing the last n tokens after."""
    v = model.visual
    x = v.conv1(images.type(model.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, shallow.expand(x.shape[0], -1, -1)], dim=1)).permute(1, 0, 2)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:x.shape[0] - shallow.shape[0]], deep[i - 1].unsqueeze(1).expand(-1, x.shape[1], -1)])
        x = block(x)
    return v.ln_post(x.permute(1, 0, 2)[:, 0, :]) @ v.proj


def released_features(name, model, t, images):
    """CustomCLIP._forward_feats of the released trainers, from the copied tensors t: image and text features
    before the cosine (CoCoOp's: one text set per image)."""
    n_ctx = 2 if name == "maple" else 4
    prefix, suffix, tokens = released_prompts(model, NAMES, n_ctx)
    ctx = lambda c: torch.cat([prefix, c.unsqueeze(0).expand(len(NAMES), -1, -1), suffix], dim=1)
    if name == "maple":
        deep = [t[f"text_prompts.{i}"] for i in range(len([k for k in t if k.startswith("text_prompts")]))]
        vis = [F.linear(p, t[f"projs.{i}.weight"], t[f"projs.{i}.bias"]) for i, p in enumerate(deep)]
        return (released_deep_image(model, images, F.linear(t["ctx"], t["proj.weight"], t["proj.bias"]), vis),
                released_deep_text(model, ctx(t["ctx"]), tokens, deep))
    image = model.visual(images.type(model.dtype))
    if name != "cocoop":
        return image, released_text_encoder(model, ctx(t["ctx"]), tokens)
    imf = image / image.norm(dim=-1, keepdim=True)
    bias = F.linear(F.relu(F.linear(imf, t["meta_net.linear1.weight"], t["meta_net.linear1.bias"])),
                    t["meta_net.linear2.weight"], t["meta_net.linear2.bias"])
    return image, [released_text_encoder(model, ctx(c), tokens) for c in t["ctx"].unsqueeze(0) + bias.unsqueeze(1)]


def film(x, scale, bias):  # elp_maple.FiLM
    return scale.unsqueeze(0).type(x.dtype) * x + bias.unsqueeze(0).type(x.dtype)


@pytest.mark.parametrize("name", ["coop", "cocoop", "kgcoop", "maple"])
def test_dept_is_exact_to_the_released_trainers(exact, tiny_clip, name):
    dept = DePT(perturbed(learner(name, tiny_clip))).train()
    perturbed(dept.head), perturbed(dept.image_affine, 1), perturbed(dept.text_affine, 2)
    t = {n.replace("learner.", ""): p.detach().clone().requires_grad_(True)
         for n, p in dept.named_parameters() if p.requires_grad}
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 4, 0, 1])
    img, txt = released_features(name, tiny_clip, t, images)
    imgn, scale = img / img.norm(dim=-1, keepdim=True), tiny_clip.logit_scale.exp()
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)
    if name == "cocoop":  # _forward_logits_similarity, one image at a time
        logits = torch.stack([scale * i @ norm(x).t() for i, x in zip(imgn, txt)])
    else:
        logits = scale * imgn @ norm(txt).t()
    # _forward_logits_linear_probe and _loss (w = 0.7); KgCoOp adds W * (1 - mean cosine to its frozen texts)
    i_lp = film(img, t["image_affine.scale"], t["image_affine.bias"])
    if name == "cocoop":
        t_lp = torch.stack([x[y] for x, y in zip([film(x, t["text_affine.scale"], t["text_affine.bias"])
                                                   for x in txt], labels)])
    else:
        t_lp = film(txt, t["text_affine.scale"], t["text_affine.bias"])[labels]
    lp = F.linear(torch.cat([t_lp, i_lp]), t["head.weight"], t["head.bias"])
    ref = 0.3 * F.cross_entropy(logits, labels) + 0.7 * F.cross_entropy(lp, torch.cat([labels, labels]))
    if name == "kgcoop":
        with torch.no_grad():  # PromptLearner.__init__: frozen CLIP on the dataset template, normalised
            old = tiny_clip.encode_text(clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in NAMES]))
            old = old / old.norm(dim=-1, keepdim=True)
        # NOTE: elp_kgcoop takes the cosine of the unnormalised text features, the plain KgCoOp (ours,
        # bit-exact to htyao89/KgCoOp) of the normalised ones: equal up to rounding, hence allclose below
        ref = ref + dept.learner.kg_weight * (1.0 - torch.mean(F.cosine_similarity(
            txt, old / old.norm(dim=-1, keepdim=True), dim=1, eps=1e-07)))
    loss, _ = dept_loss(dept, images, labels)
    ref.backward()
    loss.backward()
    # KgCoOp: the two cosines differ by float rounding only, 4.2e-7 of the largest entry here: 1e-6 relative
    same = torch.equal if name != "kgcoop" else near
    assert same(loss, ref)
    for n, p in dept.named_parameters():
        if p.requires_grad:
            assert same(p.grad, t[n.replace("learner.", "")].grad), n
    with torch.no_grad():  # inference on the base classes: (1 - w) cosine + w head on the image features
        fused = 0.3 * logits + 0.7 * F.linear(i_lp, t["head.weight"], t["head.bias"])
        assert torch.equal(dept.eval()(images).logits, fused)


def test_the_staged_learning_rate_is_one_sgd_step_at_lr_and_at_6_5_lr(tiny_clip):
    dept = DePT(perturbed(learner("coop", tiny_clip))).train()
    args = config.parse_args(["--backbone", "coop", "--method", "dept", "--device", "cpu"])
    opt = train.make_optimizer(dept, args.lr, args)
    lr, s = 0.0035, 6.5  # the released optim.py: lr *= s, base_lr_mult /= s, the new layers at lr
    assert [g["lr"] for g in opt.param_groups] == [lr * s * (1.0 / s), lr * s]
    before = {n: p.detach().clone() for n, p in dept.named_parameters() if p.requires_grad}
    loss, _ = dept_loss(dept, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    for n, p in dept.named_parameters():
        if p.requires_grad:  # the first step of SGD with momentum and weight decay, by hand
            step = lr * s * (1.0 / s) if n.startswith("learner.") else lr * s
            assert torch.equal(p.detach(), before[n].add(p.grad.add(before[n], alpha=5e-4), alpha=-step)), n


@pytest.mark.parametrize("name", LEARNERS)
def test_one_dept_step_on_every_learner_and_new_classes_see_the_learner_alone(tiny_clip, name):
    m = learner(name, tiny_clip)
    dept = DePT(m).train()
    loss, parts = dept_loss(dept, torch.randn(4, 3, 32, 32), torch.tensor([3, 0, 4, 0]))
    loss.backward()
    assert {"ce", "ce_head"} <= set(parts)
    assert all(p.grad is not None for p in dept.parameters() if p.requires_grad)
    images, new = torch.randn(3, 3, 32, 32), ["orange cross", "yellow square"]
    other = learner(name, tiny_clip).eval()
    other.load_learned(m.learned_state())
    dept.eval()
    with pytest.raises(ValueError, match="head scores the classes it was trained on"):
        dept.set_classnames(new)
    m.set_classnames(new), other.set_classnames(new)
    with torch.no_grad():  # the head never touches the new classes: the learner's own logits
        assert torch.equal(dept.learner(images).logits, other(images).logits)


def test_dept_run_end_to_end_keeps_its_head_for_the_base_classes_only(tmp_path, demo_root, tiny_clip_path):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--backbone", "kgcoop", "--method", "dept",
                         "--epochs", "1", "--shots", "4")
    base = torch.load(os.path.join(out, "base_prompt.pt"), weights_only=False)["learned"]
    new = torch.load(os.path.join(out, "new_prompt.pt"), weights_only=False)["learned"]
    assert base["head.head.weight"].shape[0] == 6 and not any(k.startswith("head.") for k in new)
    assert res["args"]["kg_weight"] == 2.0 and res["args"]["batch_size"] == 4  # the released recipe
    again = evaluation.evaluate_checkpoints(out, overrides=dict(workers=0))
    assert again["base"] == res["base"] and again["new"] == res["new"]
