"""MaPLe and IVLP/PromptSRC: parameter counts, reductions to CoOp / CLIP, gradients at every prompted layer,
PromptSRC's losses by hand, GPA weights, and MAO plugged into both unchanged."""
import math
import os
import re

import clip
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP

from clip_prompt import (IVLP, CoOp, MaPLe, PromptSRC, build_learner, encode_image, frozen_clip,
                         self_regulating_losses)
from conftest import build_tiny_clip, run_train
from losses import gpa_weights

NAMES = ["red circle", "red square", "blue circle", "green triangle"]


@pytest.fixture(scope="module")
def b16_widths():
    """ViT-B/16's widths (text 512, vision 768) with one block per tower: enough to count prompt parameters."""
    return frozen_clip(CLIP(embed_dim=512, image_resolution=32, vision_layers=1, vision_width=768,
                            vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                            transformer_heads=8, transformer_layers=1))


@pytest.fixture(scope="module")
def deep_clip():
    return build_tiny_clip(layers=4).requires_grad_(False)  # 4 blocks per tower: every prompted layer runs


def n_learnable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_parameter_counts_at_vit_b16_widths(b16_widths):
    assert n_learnable(MaPLe(b16_widths, NAMES, n_ctx=2, depth=9)) == 3_555_072
    assert n_learnable(MaPLe(b16_widths, NAMES, n_ctx=2, depth=3)) == 1_185_024
    assert n_learnable(PromptSRC(b16_widths, NAMES, n_ctx=4, n_vis=4, depth_text=9, depth_vis=9)) == 46_080
    assert n_learnable(IVLP(b16_widths, NAMES, n_ctx=4, n_vis=4, depth_text=3, depth_vis=3)) == 15_360
    assert n_learnable(CoOp(b16_widths, NAMES)) == 2_048


def test_maple_keeps_of_a_fixed_after_two_learnable_tokens(tiny_clip):
    m = MaPLe(tiny_clip, NAMES, n_ctx=2)
    ids = clip.tokenize("a photo of a")[0]
    emb = tiny_clip.token_embedding(ids)
    assert torch.allclose(m.ctx, emb[1:3])  # "a", "photo" are learnable
    assert torch.allclose(m.token_suffix[0, :2], emb[3:5])  # "of", "a" stay in the fixed part
    assert all(torch.equal(p.weight, m.projs[0].weight) for p in m.projs)  # deep couplings start as copies


def test_depth_one_without_vision_prompts_is_coop(tiny_clip):
    ivlp = IVLP(tiny_clip, NAMES, n_ctx=4, n_vis=0, depth_text=1, depth_vis=1)
    coop = CoOp(tiny_clip, NAMES)
    with torch.no_grad():
        ivlp.ctx.add_(0.3)
        coop.ctx.copy_(ivlp.ctx)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ivlp.encode_text(), coop.encode_text())
        assert torch.equal(ivlp.encode_image(images), coop.encode_image(images))


def test_zero_length_vision_prompts_give_clips_own_image_encoder(tiny_clip):
    images = torch.randn(3, 3, 32, 32)
    ours = encode_image(tiny_clip, images, torch.zeros(0, 64), [torch.zeros(0, 64)])  # the prompted code path
    assert torch.allclose(ours, tiny_clip.encode_image(images), atol=1e-5)


def test_no_replacement_when_deep_prompt_equals_the_previous_output(deep_clip):
    """Deep-prompt plumbing: replacing slots with exactly what block i-1 produced there changes nothing."""
    images = torch.randn(2, 3, 32, 32)
    shallow = torch.randn(3, 64)
    v = deep_clip.visual
    x = v.conv1(images).reshape(2, 64, -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(2, 1, 64), x], 1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, shallow.expand(2, -1, -1)], 1)).permute(1, 0, 2)
    x = v.transformer.resblocks[0](x)
    same = x[-3:, 0]  # what block 0 produced at the prompt slots of image 0 ...
    images[1] = images[0]  # ... equals image 1's, so one deep prompt can reproduce both
    with torch.no_grad():
        a = encode_image(deep_clip, images, shallow)
        b = encode_image(deep_clip, images, shallow, [same])
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cls", ["maple", "promptsrc"])
def test_a_gradient_reaches_every_prompted_layer(deep_clip, cls):
    learner = build_learner(cls, deep_clip, NAMES, n_ctx=2 if cls == "maple" else 4, depth=4).train()
    out = learner(torch.randn(4, 3, 32, 32))
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3]))
    loss = loss + sum(out.losses.values())  # PromptSRC's own terms ({} for MaPLe)
    loss.backward()
    grads = {n: p.grad for n, p in learner.named_parameters() if p.requires_grad}
    assert len(grads) > 3 and all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    assert all(p.grad is None for p in deep_clip.parameters())


def test_promptsrc_losses_by_hand():
    t = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    t0 = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    v, v0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    z, z0 = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = self_regulating_losses(t, t0, v, v0, z, z0)
    assert out["scl_text"].item() == pytest.approx(25 * (0.2 + 0.6 + 0.6 + 0.2) / 4)
    assert out["scl_image"].item() == pytest.approx(10 * (1 + 1) / 2)
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    p0 = [1 / (1 + math.e), math.e / (1 + math.e)]
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p0, p)) / 2  # / (B * C)
    assert out["scl_kl"].item() == pytest.approx(kl, rel=1e-5)


def test_promptsrc_frozen_text_target_is_mean_of_raw_template_features(tiny_clip):
    from clip_prompt import PROMPTSRC_TEMPLATES
    assert len(PROMPTSRC_TEMPLATES) == 60 and len(set(PROMPTSRC_TEMPLATES)) == 60
    m = PromptSRC(tiny_clip, NAMES[:2], n_vis=2, depth_text=2, depth_vis=2)
    raw = torch.stack([tiny_clip.encode_text(clip.tokenize([t.format(c) for c in NAMES[:2]]))
                       for t in PROMPTSRC_TEMPLATES])
    assert torch.allclose(m.text_target, F.normalize(raw.mean(0), dim=-1), atol=1e-6)
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).losses == {}  # the teachers are used in training only


def test_gpa_weights():
    w = gpa_weights(20, 15, 1)
    assert sum(w) == pytest.approx(1.0)
    assert (w[13], w[14], w[15]) == pytest.approx((0.2420, 0.3989, 0.2420), abs=1e-4)  # epochs 14, 15, 16
    g = [math.exp(-0.5 * (e - 15) ** 2) for e in range(1, 21)]
    assert w == pytest.approx([x / sum(g) for x in g])
    assert gpa_weights(10, 15, 1)[-1] == pytest.approx(0.99592, abs=1e-5)  # MAO's 10-epoch steps: ~ the last epoch


@pytest.mark.parametrize("backbone", ["maple", "promptsrc"])
def test_mao_both_steps_on_each_backbone(tmp_path, demo_root, tiny_clip_path, backbone):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--backbone", backbone, "--epochs", "2", "--depth", "2",
                         "--anchors", "2", "--topk", "3")
    assert os.path.isfile(os.path.join(out, "base_prompt.pt")) and os.path.isfile(os.path.join(out, "new_prompt.pt"))
    assert 0 <= res["hm"] <= 100
    log = open(os.path.join(out, "log.txt")).read()
    assert "cand 6" in log and "pl_acc" in log
    if backbone == "promptsrc":
        assert "scl_text" in log and "Gaussian average" in log
    import eval as evaluation
    again = evaluation.evaluate_checkpoints(out, overrides=dict(workers=0))
    assert again["base"] == res["base"] and again["new"] == res["new"]


def test_promptsrc_baseline_with_gpa(tmp_path, demo_root, tiny_clip_path):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--backbone", "promptsrc", "--method", "none",
                         "--epochs", "2", "--depth", "2", "--gpa_mean", "1.5", "--gpa_std", "1")
    assert "Gaussian average" in open(os.path.join(out, "log.txt")).read()


LEARNERS = re.compile(r"(coop|maple|promptsrc|ivlp|zsclip|cocoop|kgcoop)", re.I)


def code_names(path):
    """Every identifier and string literal of a file, docstrings excepted (they may cite the released trainers)."""
    import ast
    tree = ast.parse(open(path).read())
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            out.append(n.value)
        elif isinstance(n, ast.Name):
            out.append(n.id)
        elif isinstance(n, ast.Attribute):
            out.append(n.attr)
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            out.append(n.name)
        elif isinstance(n, ast.alias):
            out.append(n.name)
    return out


def test_mao_and_dpc_code_names_no_learner():
    """Model-agnostic: no identifier, import or string in MAO's files or DPC's names a learner, and MAO's training
    steps in train.py never branch on the backbone."""
    root = os.path.join(os.path.dirname(__file__), "..")
    for f in ("sampler.py", "pseudolabel.py", "losses.py", "dpc.py"):
        hits = [x for x in code_names(os.path.join(root, f)) if LEARNERS.search(x)]
        assert not hits, (f, hits)
        lines = [line for line in open(os.path.join(root, f)) if re.search(r"cocoop|kgcoop", line, re.I)]
        assert not lines, (f, lines)  # not even a comment names the learners added after the paper
    import ast
    src = open(os.path.join(root, "train.py")).read()
    bodies = {n.name: ast.get_source_segment(src, n) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
    for fn in ("mao_base_step", "mao_new_step", "run_dpc"):
        body = bodies[fn]
        assert ".backbone" not in body and "isinstance" not in body, fn  # no branch on the learner


def test_only_truly_frozen_image_features_are_offered_for_reuse(tiny_clip):
    """The pseudo-labeller reuses Output.frozen_image_features as zero-shot CLIP's: a prompted image encoder
    (MaPLe, IVLP) must not offer its features; PromptSRC offers its frozen-encoder pass; CoOp its own."""
    images = torch.randn(3, 3, 32, 32)
    plain = F.normalize(encode_image(tiny_clip, images).float(), dim=-1)
    for backbone in ("maple", "ivlp"):
        m = build_learner(backbone, tiny_clip, NAMES, n_ctx=2, depth=2).train()
        assert m(images).frozen_image_features is None
    for backbone in ("coop", "promptsrc"):
        m = build_learner(backbone, tiny_clip, NAMES, n_ctx=2, depth=2).train()
        assert torch.allclose(m(images).frozen_image_features, plain, atol=1e-5)
