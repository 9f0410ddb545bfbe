"""PromptKD exact to the released trainers, written out here (zhengli97/PromptKD trainers/promptkd.py, JREion/DPC
trainers/sple_promptkd.py): the student's logits, KD loss and gradients; DPC's stage 2 on it, intended and released;
DHNO's rankings; its size; one step of each; the best-val epoch; a shared teacher; labels never read."""
import copy
import os

import clip
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP

import config
import eval as evaluation
import rundir
import train
from clip_prompt import PromptKD, build_learner, frozen_clip, phrase_context
from conftest import near, run_train
from dpc import DualPrompt, ImageTextRanking, stage2_loss
from losses import dynamic_candidate_loss, dynamic_candidates
from test_dept import perturbed, released_deep_image, released_deep_text
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


def test_student_logits_kd_loss_and_gradients_are_the_released_ones(exact, tiny_clip, teacher):
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


@pytest.mark.parametrize("start", ["intended", "released"])
def test_dpc_stage2_on_promptkd_from_the_intended_and_the_released_start(exact, tiny_clip, teacher, start):
    """sple_promptkd.py's update (--dpc_param released, L_CL only), from the start its comments intend (stage 1's deep
    vision prompts, the teacher's deep text prompts) or the released one: VLPromptLearner_SPLE.__init__ writes them
    into transformer.ctx_list[i + 1], which no block reads, so both start as build_model's N(0, 0.02) and train."""
    w, released = 0.2, start == "released"
    kd = student(tiny_clip, teacher).train()
    t, bn = copies(kd)
    M = kd.text_ctx.detach().clone().requires_grad_(True)
    if released:
        kd.own_text_prompts()
    restart = [n for n in kd.learned_tensors() if released and n.startswith(("vis_prompts.", "text_prompts."))]
    dual = DualPrompt(kd, omega_b=w, param="released", restart=restart).train()
    assert dual.prompt == ["text_ctx"] and set(dual.kept) == {f"projector.1.{k}" for k in (
        "running_mean", "running_var", "num_batches_tracked")}
    deep_text = [teacher.text_prompts[0]]
    if released:  # the fresh prompts, as the stage-2 forward sees them: N(0, 0.02) draws, not stage 1's
        t["vis_prompts.0"] = dual.stored["vis_prompts__0"].detach().clone().requires_grad_(True)
        deep_text = [dual.stored["text_prompts__0"].detach().clone().requires_grad_(True)]
        assert not torch.equal(t["vis_prompts.0"], kd.vis_prompts[0]) and 0.01 < deep_text[0].std() < 0.03
        assert torch.equal(dual.frozen_prompt()["text_prompts.0"], teacher.text_prompts[0])  # P: the teacher's
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 2])
    # CustomSPLECLIP.forward in training: VLPromptLearner_SPLE's converse ctx through the (teacher's) text encoder
    ctx = (M - (1 - w) * M.detach()) * (1 / w)
    pre, suf, eot = teacher.token_prefix, teacher.token_suffix, teacher.eot
    prompts = torch.cat([pre, ctx.unsqueeze(0).expand(pre.shape[0], -1, -1), suf], dim=1)
    text = released_deep_text(tiny_clip, prompts, torch.nn.functional.one_hot(eot, 77), deep_text)[labels.tolist()]
    text = text / text.norm(dim=-1, keepdim=True)
    logits = tiny_clip.logit_scale.exp() * released_student(tiny_clip, t, bn, images) @ text.t()
    ids = torch.arange(4)
    ref = (F.cross_entropy(logits, ids) + F.cross_entropy(logits.t(), ids)) / 2
    loss, parts = stage2_loss(dual, images, labels, backbone_losses=False)
    ref.backward()
    loss.backward()
    # the released text path (a one-hot [EOS] pick, every class then the rows) runs other kernels: equal to rounding.
    # Gradients as one vector: the bias before BatchNorm has a gradient of 0, up to rounding
    assert near(loss, ref) and set(parts) == {"l_cl"}
    ours = [dual.stored["text_ctx"].grad] + [dual.stored[n.replace(".", "__")].grad for n in t]  # the vision
    refs = [M.grad] + [t[n].grad for n in t]  # prompts and the projector: trained directly, as released
    if released:  # the text encoder's deep prompt trains too
        ours, refs = ours + [dual.stored["text_prompts__0"].grad], refs + [deep_text[0].grad]
    assert near(ours, refs, rel=1e-5)  # 1e-6 in the loss grows through both towers (over 1e-6 here without AVX)


def test_dhno_ranks_with_p_or_with_the_teacher_trained_or_as_released(exact, tiny_clip, teacher):
    kd = student(tiny_clip, teacher)
    images = torch.randn(6, 3, 32, 32)
    loader = torch.utils.data.DataLoader(list(zip(images, torch.zeros(6), torch.arange(6))), batch_size=3)
    with torch.no_grad():  # in eval mode, as DHNO ranks (the projector's BatchNorm on its running statistics)
        by_p = (kd.eval().encode_image(images) @ kd.encode_text().t()).topk(2, dim=1).indices  # the student, P
        # parse_sple_batch_train: the teacher's image features against its base texts (intended: its trained ctx)
        img = teacher.encode_image(images)
        by_teacher = (img @ teacher.encode_text().t()).topk(2, dim=1).indices
        # released: CustomCLIP_teacher's context is ctx_x, which the non-strict load_state_dict never fills, so
        # it ranks with VLPromptLearner's "a photo of a" initialisation
        ids = clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
        with torch.no_grad():
            emb = tiny_clip.token_embedding(ids)
        text = released_deep_text(tiny_clip, emb, ids, list(teacher.text_prompts))
        by_init = (img @ F.normalize(text, dim=-1).t()).topk(2, dim=1).indices
    ranker = copy.deepcopy(teacher, {id(tiny_clip): tiny_clip})
    ranker.ctx.data.copy_(phrase_context(tiny_clip, "a photo of a", 4))
    assert torch.equal(ImageTextRanking(kd, loader, 2, "cpu")(0), by_p)  # the paper (the default)
    assert torch.equal(ImageTextRanking(teacher, loader, 2, "cpu")(0), by_teacher)  # --dpc_ranker teacher
    assert torch.equal(ImageTextRanking(ranker, loader, 2, "cpu")(0), by_init)  # and --dpc_ranker_ctx init
    assert not torch.equal(by_p, by_teacher) and not torch.equal(by_teacher, by_init)  # they can be told apart


def test_size_at_vit_b16_widths_is_the_released_students():
    """ViT-B/16 (vision width 768, embed 512) distilled from a 768-wide teacher (ViT-L/14's output width):
    VPT 4 x 768, 8 deep VPT 4 x 768, VPT_image_trans 512 -> 768 -> 768 with BatchNorm."""
    shape = dict(image_resolution=32, vision_patch_size=16, context_length=77, vocab_size=49408, vision_layers=1,
                 transformer_layers=1)
    b16 = frozen_clip(CLIP(embed_dim=512, vision_width=768, transformer_width=512, transformer_heads=8, **shape))
    l14 = frozen_clip(CLIP(embed_dim=768, vision_width=64, transformer_width=768, transformer_heads=12, **shape))
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
    seen = []  # what --best_val scores after each epoch: the base classes' few-shot val split
    real_accuracy = train.accuracy
    monkeypatch.setattr(train, "accuracy", lambda m, loader, device, desc: (
        seen.extend(loader.dataset.items) if desc == "val" else None) or real_accuracy(m, loader, device, desc))
    res, out = run_train(tmp_path / "a", demo_root, tiny_clip_path, *kd)
    monkeypatch.undo()
    val = train.subsample_classes(train.fewshot_splits("demo", demo_root, 8, 1)[0], "base")[0]["val"]
    assert seen == val and res["cost"]["backbone"]["kept_epoch"] == 1
    log = open(os.path.join(out, "log.txt")).read()
    assert "(kd " in log and " ce " not in log and "kept epoch 1 of 1" in log  # its own loss only
    assert "decoded 48 of the 240 training images once" in log  # the 192 it distils on stream, whatever the budget
    real = train.read_splits

    def scrambled(*a):  # every training label replaced: the student must not notice
        splits, image_dir = real(*a)
        return dict(splits, train=[(p, 0, c) for p, _, c in splits["train"]]), image_dir
    monkeypatch.setattr(train, "read_splits", scrambled)
    _, out2 = run_train(tmp_path / "b", demo_root, tiny_clip_path, *kd)
    monkeypatch.undo()
    a, b = (torch.load(os.path.join(o, "prompt.pt"), weights_only=False)["learned"] for o in (out, out2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    real, seen = train.HardNegativeBatchSampler, {}  # DPC as released: stage 2's start, ranking and fallback
    monkeypatch.setattr(train, "HardNegativeBatchSampler", lambda *a, **k: seen.update(k) or real(*a, **k))
    res, out = run_train(tmp_path / "e", demo_root, tiny_clip_path, *kd[:4], "--method", "dpc", "--recipe", "official",
                         "--dpc_epochs", "1", *kd[6:])
    monkeypatch.undo()
    assert seen["fallback_high"] == 6 - 1 and seen["released"]  # sple_promptkd.py draws randint(1, C - 1)
    ck = {f: torch.load(os.path.join(out, f), weights_only=False)["learned"] for f in ("base_prompt.pt",
                                                                                        "new_prompt.pt")}
    taught = torch.load(os.path.join(teacher, "prompt.pt"), weights_only=False)["learned"]["text_prompts.0"]
    assert torch.equal(ck["new_prompt.pt"]["text_prompts.0"], taught)  # new classes: stage 1's, the teacher's
    assert not torch.equal(ck["base_prompt.pt"]["text_prompts.0"], taught)  # base classes: trained from fresh
    again = evaluation.evaluate_checkpoints(out)  # the prompt files reload, text prompts and all
    assert (again["base"], again["new"]) == (res["base"], res["new"])
    other = run_train(tmp_path / "c", demo_root, tiny_clip_path, *flags, "--shots", "4", "--subsample", "all")[1]
    with pytest.raises(ValueError, match="trained on other classes"):
        run_train(tmp_path / "d", demo_root, tiny_clip_path, *kd[:2], "--teacher", other, *kd[4:])
    assert not os.path.exists(tmp_path / "d" / "run")


def test_learners_sharing_a_teacher_leave_it_whole(tiny_clip, teacher):
    """Students score other classes as rows of the teacher's class list, which none changes."""
    a, b = student(tiny_clip, teacher, NAMES[:3]), student(tiny_clip, teacher, NAMES[3:])
    before = a.eval().encode_text().clone()
    b.set_classnames(NAMES[1:4])
    c = student(tiny_clip, teacher, NAMES[3:])
    assert teacher.classnames == NAMES and torch.equal(a.encode_text(), before)
    assert torch.equal(c.kd_text, a.kd_text) and c.kd_text.shape[0] == len(NAMES)
    with pytest.raises(ValueError, match="its teacher's classes only"):
        b.set_classnames(["a class the teacher never saw"])


def test_best_val_keeps_the_best_epoch_and_a_tie_keeps_the_earlier(tmp_path, tiny_clip):
    learner = build_learner("coop", tiny_clip, NAMES[:3])
    data = [(torch.randn(3, 32, 32), torch.tensor(i % 3), torch.tensor(i)) for i in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    args = config.parse_args(["--dataset", "demo", "--device", "cpu", "--out", str(tmp_path), "--warmup_epochs", "0"])
    scores, states, cost = iter([50.0, 70.0, 60.0, 70.0]), [], {}

    def select():  # a val score after each epoch, and the state it scored
        states.append(learner.learned_state())
        return next(scores)
    loss = lambda b: (learner(b[0]).logits.logsumexp(1).mean(), {})
    train.train_stage("base", learner, loader, loss, 4, args, rundir.make_log(str(tmp_path / "log.txt")), cost,
                      select=select)
    assert cost["kept_epoch"] == 2 and torch.equal(learner.learned_state()["ctx"], states[1]["ctx"])
    assert not torch.equal(states[1]["ctx"], states[3]["ctx"])  # epoch 4 tied with 2 and moved on: not kept
