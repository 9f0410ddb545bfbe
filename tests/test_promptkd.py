"""PromptKD exact to the released trainers, written out here (zhengli97/PromptKD trainers/promptkd.py,
JREion/DPC trainers/sple_promptkd.py): the student's logits, the KD loss and its gradients; DPC's stage-2
loss and gradients on it; its size at ViT-B/16 widths; MAO and DPC one step; it never reads a label; a
teacher that does not fit is refused."""
import os

import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP

import train
from clip_prompt import PromptKD, build_learner
from conftest import run_train
from dpc import DualPrompt, ImageTextRanking, stage2_loss
from losses import dynamic_candidate_loss, dynamic_candidates
from test_dept import perturbed, released_deep_image
from test_learners import NAMES


@pytest.fixture
def teacher(tiny_clip):
    """A PromptSRC learner over every class, away from its initialisation, frozen."""
    torch.manual_seed(5)
    return perturbed(build_learner("promptsrc", tiny_clip, NAMES, n_ctx=4, depth=2), 7).requires_grad_(False)


def student(tiny_clip, teacher, names=NAMES[:3]):
    torch.manual_seed(6)
    return perturbed(PromptKD(tiny_clip, names, teacher, n_vis=4, depth=2), 8)


def released_student(model, t, bn, images, training=True):
    """CustomCLIP.forward: the VPT-prompted image encoder, VPT_image_trans (conv, BN, ReLU, conv), normalise."""
    x = released_deep_image(model, images, t["vis_ctx"], [t["vis_prompts.0"]])[:, :, None, None]
    x = F.conv2d(x, t["projector.0.weight"], t["projector.0.bias"])
    x = F.batch_norm(x, bn["mean"], bn["var"], t["projector.1.weight"], t["projector.1.bias"], training)
    x = F.conv2d(F.relu(x), t["projector.3.weight"], t["projector.3.bias"]).squeeze(-1).squeeze(-1)
    return x / x.norm(dim=-1, keepdim=True)


def copies(kd):
    t = {n: p.detach().clone().requires_grad_(True) for n, p in kd.named_parameters() if p.requires_grad}
    return t, dict(mean=kd.projector[1].running_mean.clone(), var=kd.projector[1].running_var.clone())


def test_student_logits_kd_loss_and_gradients_are_the_released_ones(tiny_clip, teacher):
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # CustomCLIP_teacher.forward: its prompted features, every class
        tea_img, tea_txt = teacher.encode_image(images), teacher.encode_text()
        tea_logits = tiny_clip.logit_scale.exp() * tea_img @ tea_txt.t()
    kd = student(tiny_clip, teacher).train()  # scores the first 3 classes, distils over all 5
    t, bn = copies(kd)
    img = released_student(tiny_clip, t, bn, images)
    stu_logits = tiny_clip.logit_scale.exp() * img @ tea_txt.t().detach()  # forward_backward, T = 1
    ref = F.kl_div(F.log_softmax(stu_logits / 1.0, dim=1), F.softmax(tea_logits / 1.0, dim=1),
                   reduction="sum") * (1.0 * 1.0) / stu_logits.numel()
    ref = 1000.0 * ref
    out = kd(images)
    loss = sum(out.losses.values())
    ref.backward()
    loss.backward()
    assert torch.equal(loss, ref)
    for n, p in kd.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, t[n].grad), n
    assert torch.equal(kd.projector[1].running_mean, bn["mean"])  # BatchNorm's statistics as released
    with torch.no_grad():  # test(): the student's features against the teacher's text of the classes scored
        assert torch.allclose(kd.eval()(images).logits, tiny_clip.logit_scale.exp() * released_student(
            tiny_clip, t, dict(mean=kd.projector[1].running_mean, var=kd.projector[1].running_var), images,
            training=False) @ tea_txt[:3].t(), atol=1e-5)  # BatchNorm in eval mode: its running statistics


def test_dpc_stage2_on_promptkd_is_the_released_update(tiny_clip, teacher):
    """sple_promptkd.py under --recipe official: P' is the teacher's text context (converse, aliasing its
    P), the vision prompts and projector train directly, L_CL only."""
    w = 0.2
    kd = student(tiny_clip, teacher).train()
    t, bn = copies(kd)
    M = kd.text_ctx.detach().clone().requires_grad_(True)
    dual = DualPrompt(kd, omega_b=w, param="released").train()
    assert dual.prompt == ["text_ctx"] and set(dual.kept) == {f"projector.1.{k}" for k in (
        "running_mean", "running_var", "num_batches_tracked")}
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 2])
    # CustomSPLECLIP.forward in training: VLPromptLearner_SPLE's converse ctx through the teacher's encoder
    ctx = (M - (1 - w) * M.detach()) * (1 / w)
    pre, suf, eot = teacher.token_prefix, teacher.token_suffix, teacher.eot
    x = torch.cat([pre, ctx.unsqueeze(0).expand(pre.shape[0], -1, -1), suf], dim=1) + tiny_clip.positional_embedding
    x = x.permute(1, 0, 2)
    for i, block in enumerate(tiny_clip.transformer.resblocks):
        if i == 1:  # the teacher's deep text prompt of layer 1 (depth 2)
            x = torch.cat([x[:1], teacher.text_prompts[0].unsqueeze(1).expand(-1, x.shape[1], -1), x[5:]])
        x = block(x)
    x = tiny_clip.ln_final(x.permute(1, 0, 2))
    text = (x[torch.arange(x.shape[0]), eot] @ tiny_clip.text_projection)[labels.tolist()]
    text = text / text.norm(dim=-1, keepdim=True)
    logits = tiny_clip.logit_scale.exp() * released_student(tiny_clip, t, bn, images) @ text.t()
    ids = torch.arange(4)
    ref = (F.cross_entropy(logits, ids) + F.cross_entropy(logits.t(), ids)) / 2
    loss, parts = stage2_loss(dual, images, labels, backbone_losses=False)
    ref.backward()
    loss.backward()
    assert torch.equal(loss, ref) and set(parts) == {"l_cl"}
    assert torch.equal(dual.stored["text_ctx"].grad, M.grad)
    for n in t:  # the vision prompts and the projector: trained directly, as released
        assert torch.equal(dual.stored[n.replace(".", "__")].grad, t[n].grad), n


def test_dhno_ranks_with_p_or_with_the_teacher_as_released(tiny_clip, teacher):
    kd = student(tiny_clip, teacher)
    images = torch.randn(6, 3, 32, 32)
    loader = torch.utils.data.DataLoader(list(zip(images, torch.zeros(6), torch.arange(6))), batch_size=3)
    with torch.no_grad():  # in eval mode, as DHNO ranks (the projector's BatchNorm on its running statistics)
        by_p = (kd.eval().encode_image(images) @ kd.encode_text().t()).topk(2, dim=1).indices  # the student, P
        # parse_sple_batch_train: the teacher's image features against its base texts
        by_teacher = (teacher.encode_image(images) @ teacher.encode_text().t()).topk(2, dim=1).indices
    assert torch.equal(ImageTextRanking(kd, loader, 2, "cpu")(0), by_p)  # the paper (the default)
    assert torch.equal(ImageTextRanking(teacher, loader, 2, "cpu")(0), by_teacher)  # --dpc_ranker teacher
    assert not torch.equal(by_p, by_teacher)  # the two rankings differ here, so the test can tell them apart


def test_size_at_vit_b16_widths_is_the_released_students():
    """ViT-B/16 (vision width 768, embed 512) distilled from a 768-wide teacher (ViT-L/14's output width):
    VPT 4 x 768, 8 deep VPT 4 x 768, VPT_image_trans 512 -> 768 -> 768 with BatchNorm."""
    shape = dict(image_resolution=32, vision_patch_size=16, context_length=77, vocab_size=49408, vision_layers=1,
                 transformer_layers=1)
    b16 = CLIP(embed_dim=512, vision_width=768, transformer_width=512, transformer_heads=8, **shape)
    l14 = CLIP(embed_dim=768, vision_width=64, transformer_width=768, transformer_heads=12, **shape)
    teacher = build_learner("promptsrc", l14.requires_grad_(False), NAMES, n_ctx=4, depth=1)
    kd = PromptKD(b16.requires_grad_(False), NAMES, teacher, n_vis=4, depth=9)
    n = sum(p.numel() for p in kd.parameters() if p.requires_grad)
    assert n == 3_072 + 8 * 3_072 + (512 * 768 + 768) + 2 * 768 + (768 * 768 + 768) == 1_013_760


def test_mao_and_dpc_run_one_step_on_promptkd(tiny_clip, teacher):
    kd = student(tiny_clip, teacher).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([2, 0, 1, 0])
    candidates, targets = dynamic_candidates(labels)  # Eq. 5
    out = kd(images, candidates)
    (dynamic_candidate_loss(out.logits, targets) + sum(out.losses.values())).backward()  # Eq. 6 + KD
    assert out.logits.shape == (4, 3) and "kd" in out.losses
    assert all(p.grad is not None for p in kd.parameters() if p.requires_grad)
    stage1 = kd.learned_state()
    dual = DualPrompt(kd, omega_b=0.2).train()
    opt = torch.optim.SGD([p for p in dual.parameters() if p.requires_grad], lr=0.1)
    loss, _ = stage2_loss(dual, images, labels)
    loss.backward()
    opt.step()
    assert all(torch.equal(stage1[k], v) for k, v in dual.mix(0.0, others="stage1").items())  # new classes
    assert not torch.equal(dual.mix(1.0)["text_ctx"], stage1["text_ctx"])  # P' moved
    assert not torch.equal(dual.mix(1.0)["projector.1.running_mean"], stage1["projector.1.running_mean"])


def test_promptkd_runs_never_read_a_label_and_refuse_a_teacher_that_does_not_fit(
        tmp_path, demo_root, tiny_clip_path, monkeypatch):
    flags = ["--backbone", "promptsrc", "--method", "none", "--epochs", "1", "--depth", "2"]
    _, teacher = run_train(tmp_path / "teacher", demo_root, tiny_clip_path, *flags)
    kd = ["--backbone", "promptkd", "--teacher", teacher, "--method", "none", "--epochs", "1", "--depth", "2"]
    res, out = run_train(tmp_path / "a", demo_root, tiny_clip_path, *kd)
    log = open(os.path.join(out, "log.txt")).read()
    assert "(kd " in log and " ce " not in log  # its own loss only
    real = train.read_splits

    def scrambled(*a):  # every training label replaced: the student must not notice
        splits, image_dir = real(*a)
        return dict(splits, train=[(p, 0, c) for p, _, c in splits["train"]]), image_dir
    monkeypatch.setattr(train, "read_splits", scrambled)
    _, out2 = run_train(tmp_path / "b", demo_root, tiny_clip_path, *kd)
    monkeypatch.undo()
    a, b = (torch.load(os.path.join(o, "prompt.pt"), weights_only=False)["learned"] for o in (out, out2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = run_train(tmp_path / "c", demo_root, tiny_clip_path, *flags, "--shots", "4", "--subsample", "all")[1]
    with pytest.raises(ValueError, match="trained on other classes"):
        run_train(tmp_path / "d", demo_root, tiny_clip_path, *kd[:2], "--teacher", other, *kd[4:])
    assert not os.path.exists(tmp_path / "d" / "run")
