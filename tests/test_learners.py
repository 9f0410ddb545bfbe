"""The learner contract (docs/learners.md) over all six learners, and CoCoOp / KgCoOp bit-exact to their released
forwards, which are written out here (KaiyangZhou/CoOp trainers/cocoop.py, htyao89/KgCoOp trainers/kgcoop.py)."""
import ast
import os

import clip
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP

from clip_prompt import CoCoOp, KgCoOp, TextPath, build_learner, frozen_clip
from conftest import run_train
from dpc import DualPrompt, stage2_loss
from losses import dynamic_candidate_loss, dynamic_candidates

NAMES = ["red circle", "red_square", "blue triangle", "green star", "purple ring"]
LEARNERS = ["coop", "maple", "ivlp", "promptsrc", "cocoop", "kgcoop"]


def released_text_encoder(model, prompts, tokens):
    """The TextEncoder of the released trainers: positions, CLIP's transformer, ln_final, [EOS] @ projection."""
    x = prompts + model.positional_embedding.type(model.dtype)
    x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = model.ln_final(x).type(model.dtype)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def released_prompts(model, names, n_ctx=4):
    """prefix / suffix embeddings and tokens as the released PromptLearners build them from 'a photo of a'."""
    tokens = torch.cat([clip.tokenize("a photo of a " + n.replace("_", " ") + ".") for n in names])
    with torch.no_grad():
        emb = model.token_embedding(tokens).type(model.dtype)
    return emb[:, :1], emb[:, 1 + n_ctx:], tokens


def test_cocoop_is_bit_exact_to_the_released_forward(exact, tiny_clip):
    torch.manual_seed(1)
    ours = CoCoOp(tiny_clip, NAMES).train()
    with torch.no_grad():  # a trained-looking state: context and meta-net away from their initialisation
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 0])
    ctx = ours.ctx.detach().clone().requires_grad_(True)
    meta = {k: v.detach().clone().requires_grad_(True) for k, v in ours.meta_net.state_dict().items()}
    prefix, suffix, tokens = released_prompts(tiny_clip, NAMES)
    # released CustomCLIP.forward
    image_features = tiny_clip.visual(images.type(tiny_clip.dtype))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    bias = F.linear(F.relu(F.linear(image_features, meta["linear1.weight"], meta["linear1.bias"])),
                    meta["linear2.weight"], meta["linear2.bias"]).unsqueeze(1)  # (B, 1, D)
    ctx_shifted = ctx.unsqueeze(0) + bias  # (B, M, D)
    logits = []
    for ctx_i, imf_i in zip(ctx_shifted, image_features):
        pts_i = torch.cat([prefix, ctx_i.unsqueeze(0).expand(len(NAMES), -1, -1), suffix], dim=1)
        text_features = released_text_encoder(tiny_clip, pts_i, tokens)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits.append(tiny_clip.logit_scale.exp() * imf_i @ text_features.t())
    ref_logits = torch.stack(logits)
    ref_loss = F.cross_entropy(ref_logits, labels)
    ref_loss.backward()
    out = ours(images)
    loss = F.cross_entropy(out.logits, labels)
    loss.backward()
    assert torch.equal(out.logits, ref_logits) and torch.equal(loss, ref_loss)
    assert torch.equal(ours.ctx.grad, ctx.grad)
    for k, v in ours.meta_net.named_parameters():
        assert torch.equal(v.grad, meta[k].grad), k


def test_kgcoop_is_bit_exact_to_the_released_forward(exact, tiny_clip):
    torch.manual_seed(2)
    template = "a photo of a {}, a type of pet."
    ours = KgCoOp(tiny_clip, NAMES, template=template).train()
    with torch.no_grad():
        ours.ctx.add_(0.05 * torch.randn_like(ours.ctx))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 2, 2])
    ctx = ours.ctx.detach().clone().requires_grad_(True)
    prefix, suffix, tokens = released_prompts(tiny_clip, NAMES)
    with torch.no_grad():  # PromptLearner.__init__: frozen CLIP on the dataset template, normalised
        old = tiny_clip.encode_text(torch.cat([clip.tokenize(template.format(c.replace("_", " "))) for c in NAMES]))
        old = old / old.norm(dim=-1, keepdim=True)
    # released CustomCLIP.forward and the trainer's loss, W = 8.0
    prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(len(NAMES), -1, -1), suffix], dim=1)
    image_features = tiny_clip.visual(images.type(tiny_clip.dtype))
    text_features = released_text_encoder(tiny_clip, prompts, tokens)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    ref_logits = tiny_clip.logit_scale.exp() * image_features @ text_features.t()
    score = 1.0 - torch.mean(torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text_features, old / old.norm(dim=-1, keepdim=True)))
    ref_loss = F.cross_entropy(ref_logits, labels) + 8.0 * score
    ref_loss.backward()
    out = ours(images)
    loss = F.cross_entropy(out.logits, labels) + sum(out.losses.values())  # how every training step adds it
    loss.backward()
    assert torch.equal(out.logits, ref_logits) and torch.equal(loss, ref_loss)
    assert torch.equal(ours.ctx.grad, ctx.grad)
    assert KgCoOp(tiny_clip, NAMES, template="{} texture.").template == "a photo of a {}, a type of texture."


def test_parameter_counts_at_vit_b16_widths():
    b16 = frozen_clip(CLIP(embed_dim=512, image_resolution=32, vision_layers=1, vision_width=768, vision_patch_size=16,
                           context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                           transformer_layers=1))
    n = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    # CoCoOp: ctx 4 x 512 + Linear(512, 32) + Linear(32, 512)
    assert n(CoCoOp(b16, NAMES)) == 2048 + (512 * 32 + 32) + (32 * 512 + 512) == 35_360
    # KgCoOp trains its context only: the released meta-net (Linear(512, 512)) and 512-d bias vector are built
    # with requires_grad False and never called, so they are not built here
    assert n(KgCoOp(b16, NAMES)) == 2048


# -- the contract, over all six learners ----------------------------------------------------------------------------

def learner(name, model, names=NAMES):
    torch.manual_seed(0)
    return build_learner(name, model, names, n_ctx=2 if name == "maple" else 4, depth=2)


@pytest.mark.parametrize("name", LEARNERS)
def test_contract(tiny_clip, name):
    images = torch.randn(4, 3, 32, 32)
    m = learner(name, tiny_clip).eval()
    # 1. before training it is zero-shot CLIP where its paper says so: CoOp and KgCoOp start from "a photo of a"
    zs = build_learner("zsclip", tiny_clip, NAMES, template="a photo of a {}.")
    with torch.no_grad():
        same = torch.allclose(m(images).logits, zs(images).logits, atol=1e-4)
    assert same == (name in ("coop", "kgcoop")), name
    # 2. re-targeting keeps the learned tensors
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    state = m.learned_state()
    m.set_classnames(["orange cross", "yellow square"])
    assert all(torch.equal(state[k], v) for k, v in m.learned_state().items())
    m.set_classnames(NAMES)
    # 3. the learned state round-trips through a checkpoint file
    other = learner(name, tiny_clip).eval()
    other.load_learned(state)
    with torch.no_grad():
        assert torch.equal(m(images).logits, other(images).logits)
    # 4. a MAO base-step batch runs: logits over the batch's candidates only, its own losses finite
    m.train()
    labels = torch.tensor([3, 0, 4, 0])
    candidates, targets = dynamic_candidates(labels)  # Eq. 5
    out = m(images, candidates)
    assert out.logits.shape == (4, 3)
    loss = dynamic_candidate_loss(out.logits, targets) + sum(out.losses.values())  # Eq. 6 + its own
    loss.backward()
    grads, tiny_clip.text_path = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, TextPath(
        "prefix", True)
    m.zero_grad()  # --recompute_text: the text tower recomputed in the backward pass, the very same gradients
    out = m(images, candidates)
    (dynamic_candidate_loss(out.logits, targets) + sum(out.losses.values())).backward()
    tiny_clip.text_path = TextPath("prefix", False)
    assert all(torch.equal(p.grad, grads[n]) for n, p in m.named_parameters() if p.requires_grad), name
    # 5. gradients reach only the learnable tensors, every one of them
    assert all(p.grad is None for p in tiny_clip.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters() if p.requires_grad), \
        [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # 6. a DPC stage-2 step runs, P stays, and the new-class prompt at omega_n = 0 is exactly stage 1
    m.zero_grad()
    dual = DualPrompt(m, omega_b=0.2).train()
    opt = torch.optim.SGD([p for p in dual.parameters() if p.requires_grad], lr=0.1)
    loss, parts = stage2_loss(dual, images, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert "l_cl" in parts and all(torch.equal(state[k], v.cpu()) for k, v in dual.frozen_prompt().items())
    assert all(torch.equal(state[k], v) for k, v in dual.mix(0.0, others="stage1").items())
    assert any(not torch.equal(state[k], v) for k, v in dual.mix(1.0).items())


def test_the_learners_module_imports_nothing_of_mao_or_dpc():
    path = os.path.join(os.path.dirname(__file__), "..", "clip_prompt.py")
    imported = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"sampler", "losses", "pseudolabel", "dpc", "train", "eval"}, imported


def test_cocoop_under_dpc_duplicates_its_context_and_trains_its_meta_net_directly(tiny_clip):
    m = learner("cocoop", tiny_clip)
    dual = DualPrompt(m, omega_b=0.2)
    assert dual.prompt == ["ctx"] and len(dual.names) == 5  # ctx + two Linear layers
    with torch.no_grad():
        for p in dual.stored.values():
            p.add_(1.0)
    P, base, new = dual.frozen_prompt(), dual.mix(0.2), dual.mix(0.0, others="stage1")
    assert torch.allclose(base["ctx"], 0.2 * (P["ctx"] + 1) + 0.8 * P["ctx"])  # the context is mixed
    assert torch.equal(base["meta_net.linear1.weight"], P["meta_net.linear1.weight"] + 1)  # trained directly
    assert torch.equal(new["meta_net.linear1.weight"], P["meta_net.linear1.weight"])  # new classes: stage 1's


@pytest.mark.parametrize("backbone,method", [("cocoop", "mao"), ("cocoop", "dpc"), ("kgcoop", "mao"),
                                             ("kgcoop", "dpc"), ("kgcoop", "none")])
def test_mao_and_dpc_run_unchanged_on_the_new_learners(tmp_path, demo_root, tiny_clip_path, backbone, method):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--backbone", backbone, "--method", method,
                         "--epochs", "2", "--dpc_epochs", "1", "--shots", "4")
    assert 0 <= res["hm"] <= 100
    log = open(os.path.join(out, "log.txt")).read()
    if backbone == "kgcoop" and method != "none":
        assert " kg " in log  # its own loss is logged beside MAO's / DPC's
    if method == "dpc":
        assert res["new"] == res["new_stage1"]
    import eval as evaluation
    again = evaluation.evaluate_checkpoints(out, overrides=dict(workers=0))
    assert again["base"] == res["base"] and again["new"] == res["new"]
