"""Prompt tuning on the base classes: alone, with MAO, DPC or DePT; then base / new / HM evaluation.

    python train.py --backbone coop --dataset dtd --root DATA    # CoOp + MAO: base, then new step
    python train.py --backbone coop --dataset dtd --method none  # CoOp alone (MAO's Table 1)
    python train.py --backbone coop --dataset dtd --method dpc   # DPC: the backbone, then P'
    python train.py --dataset demo                               # the toy world, shipped demo CLIP

MAO (ICME 2025, arXiv 2503.18160v1) splits the backbone's epoch budget in two halves (§3.2-3.3):
the base step trains on hard-negative batches (sampler.py, Eq. (4)) with CE over each batch's
classes only (Eq. (5)-(6)); the new step trains the same prompt on *unlabeled* new-class images
with Top-1 zero-shot pseudo-labels (pseudolabel.py, Eq. (7)) and CE over all new classes (Eq.
(8)). DPC (dpc.py) trains a parallel prompt after the backbone alone; DePT (dept.py) a head beside
it. main() reads as the paper's Fig. 2: data -> frozen CLIP -> prompt learner -> {alone | MAO |
DPC | DePT} -> evaluation; each step follows, then the one explicit epoch loop (train_stage). What each
paper sets and every flag: config.py (docs/flags.md); what a run leaves on disk: rundir.py.
"""
import copy
import math
import os
import random
import sys
import time
from collections import namedtuple

import numpy as np
import torch
from tqdm import tqdm

from clip_prompt import EncodeCounter, ZeroShotCLIP, build_learner, load_clip, phrase_context
from config import parse_args
from data import (DATASETS, RESTORE, ImageList, ImageReadError, build_transforms, fewshot_splits, hide_labels,
                  load_images, read_splits, subsample_classes)
from demo import DEMO_CLIP, DEMO_NOTE
from dept import DePT, dept_loss
from dpc import DualPrompt, ImageTextRanking, decoupled_prompts, stage2_loss
from eval import accuracy, evaluate_run, load_checkpoint, load_teacher, test_loader
from losses import cross_entropy, dynamic_candidate_loss, dynamic_candidates, gpa_weights, pseudo_label_loss
from prepare import prepare, restore_hint, verify_split
from pseudolabel import PseudoLabeler, hidden_label_agreement, pseudo_label_quality
from rundir import (Meter, OutputLock, failure_line, finish, load_last, memory_gb, save_atomic, settings,
                    start_output)
from sampler import HardNegativeBatchSampler, check_settings, class_neighbours


# -----------------------------------------------------------------------------
# main: data -> frozen CLIP -> prompt learner -> {alone | MAO | DPC | DePT} -> evaluation

Data = namedtuple("Data", "image_dir base base_names new new_names distil decoded note")


def main(argv=None):
    args = parse_args(argv)
    with OutputLock(args) as lock:  # a folder holding another run, or in use, is refused first
        seed_everything(args.seed)
        data = load_data(args)  # bad input fails here, nothing written
        model = load_clip(args.clip, args.device, args.precision, bool(args.recompute_text), bool(args.full_text))
        loaders = Loaders(args, data, model.visual.input_resolution)
        learner = build_model(args, model, data)
        neighbours = class_neighbours(data.base_names, args.topk, bank=args.minilm_bank) if args.method == "mao" \
            and args.stage in ("both", "base") else None  # Eq. 4: MAO's table, once per run, for its base step
        log = start_output(args, lock, run_notes(args, data, learner))
        meter, t_train = Meter(EncodeCounter(model)), time.time()
        if args.backbone == "zsclip":
            states, extra = {"base": learner.learned_state()}, {}  # nothing to train: the template
        elif args.method == "none":
            states, extra = {"base": train_backbone(args, learner, loaders, meter, log)}, {}
        elif args.method == "mao":
            states, extra = run_mao(args, learner, data, loaders, neighbours, meter, log)
        else:
            run = run_dpc if args.method == "dpc" else run_dept
            learner, states, extra = *run(args, learner, data, loaders, meter, log), {}
        train_seconds = time.time() - t_train + meter.resumed
        with meter.phase("evaluation"):
            res = evaluate_run(args, learner, data, loaders, states)
        return finish(args, dict(res, train_seconds=train_seconds, cost=meter.cost, args=vars(args), **extra),
                      log)


# -----------------------------------------------------------------------------
# Data and the learner: every input checked before anything is written

def load_data(args):
    """The few-shot base classes (labelled) and the new classes (training images unlabeled); every
    image is checked now, so a broken one stops the run before anything is written (load_images)."""
    if args.download or args.dataset == "demo":
        prepare(args.dataset, args.root)  # fetched and laid out (the demo: written), unless it is there
    verify_split(args.dataset, args.root)  # the published split, byte for byte, or no run
    splits, image_dir = fewshot_splits(args.dataset, args.root, args.shots, args.seed)
    if args.subsample == "all":  # a cross-dataset source: all classes
        base, base_names = subsample_classes(splits, "all")
        new, new_names = {"train": [], "test": []}, []
    else:
        base, base_names = subsample_classes(splits, "base")
        new, new_names = subsample_classes(splits, "new")
        if args.new_shots != args.shots:
            few = fewshot_splits(args.dataset, args.root, args.new_shots, args.seed)[0]
            new["train"] = subsample_classes(few, "new")[0]["train"]
        if not new_names or not new["test"]:
            raise ValueError(f"{args.dataset} has no new classes / new test images to evaluate (needs >= 2 "
                             f"classes)")
    if args.best_val and not base["val"]:
        raise ValueError(f"--best_val 1 chooses the epoch on the val split's base classes, and {args.dataset} has "
                         f"none: leave it out (--best_val 0) to keep the last epoch")
    if not base["train"]:
        raise ValueError(f"{args.dataset} has no training images (a test-only dataset is an evaluation "
                         f"target: python eval.py --ckpt RUN --datasets {args.dataset})")
    if args.method == "mao" and args.stage in ("both", "new") and not new["train"]:
        raise ValueError("the new step needs unlabeled new-class training images; the new split is empty")
    distil = None  # PromptKD distils on every training image of every class, unlabeled, as released
    if args.backbone == "promptkd" and args.method in ("none", "dpc") and not args.init_from:
        distil = hide_labels(subsample_classes(read_splits(args.dataset, args.root)[0], "all")[0]["train"])
    sets = {"base": base["train"], "new": new["train"] if args.method == "mao" else [], "distil": distil or []}
    try:
        decoded, note = load_images(image_dir, sets, base["test"] + new["test"], args.cache_gb, args.workers)
    except ImageReadError as e:  # how to restore it depends on the dataset: a shipped split may not be edited
        raise ImageReadError(str(e).replace(RESTORE, restore_hint(args.dataset, args.root))) from None
    return Data(image_dir, base, base_names, new, new_names, distil, decoded, note)


class Loaders:
    """The run's DataLoaders: training images augmented (and decoded, unless cached) in workers,
    shuffled or from a batch sampler; test images with the test transform."""

    def __init__(self, args, data, resolution):
        self.args, self.data = args, data
        self.train_tf, self.test_tf = build_transforms(resolution, DATASETS[args.dataset].get("crop", (0.08, 1.0)))

    def train(self, which, items, batch_size=None, batch_sampler=None):
        a = self.args
        ds = ImageList(self.data.image_dir, items, self.train_tf, self.data.decoded[which])
        kw = dict(num_workers=a.workers, pin_memory=a.device.startswith("cuda"), persistent_workers=False)
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, **kw)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) >= batch_size,
                                           generator=torch.Generator().manual_seed(a.seed), **kw)

    def test(self, items, decoded=None):
        return test_loader(self.data.image_dir, items, self.test_tf, self.args.test_batch_size,
                           self.args.workers, decoded)


def build_model(args, model, data):
    """The prompt learner over the base classes (from --init_from if given); refuses hard-negative
    settings the base classes cannot hold."""
    layers = min(len(model.transformer.resblocks), len(model.visual.transformer.resblocks))
    if args.backbone in ("maple", "ivlp", "promptsrc") and args.depth > layers:
        print(f"--depth {args.depth} exceeds the {layers} layers of this CLIP: prompting all {layers}")
    teacher = None
    if args.backbone == "promptkd":  # refused here if its classes or its CLIP do not fit
        teacher = load_teacher(args.teacher, data.base_names + data.new_names, args.device, args.precision,
                               data.base_names, model.visual.input_resolution, model.text_path.positions == "77")
    learner = new_learner(args, model, data.base_names, teacher)
    if args.init_from:
        if args.init_from == os.path.join(args.out, "base_prompt.pt") and not os.path.isfile(args.init_from):
            raise FileNotFoundError(f"--stage new needs the base-step prompt: give --init_from or run "
                                    f"--stage base first into {args.out}")
        learner.load_learned(load_checkpoint(args.init_from, args.device)["learned"])
    if args.method == "dpc" or (args.method == "mao" and args.stage in ("both", "base")):
        check_settings(len(data.base_names), args.anchors, args.topk)  # hard-negative batches
    return learner


def learner_kwargs(args, layers=None):
    """The learner's settings; depth capped at the CLIP's layers (a smaller CLIP than ViT-B/16)."""
    kw = dict(n_ctx=args.n_ctx, ctx_init=args.ctx_init, n_vis=args.n_vis,
              depth=min(args.depth, layers or args.depth))
    if args.backbone == "promptsrc":
        kw.update(text_weight=args.text_weight, image_weight=args.image_weight)
    if args.backbone == "kgcoop":
        kw.update(kg_weight=args.kg_weight)
    if args.backbone == "promptkd":
        kw.update(kd_temperature=args.kd_temperature, kd_weight=args.kd_weight)
    return kw


def new_learner(args, model, names, teacher=None):
    layers = min(len(model.transformer.resblocks), len(model.visual.transformer.resblocks))
    return build_learner(args.backbone, model, names, template=args.template,
                         teacher=teacher, **learner_kwargs(args, layers))


def run_notes(args, data, learner):
    """The lines log.txt holds after the arguments: what this run is."""
    nparams = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    return [DEMO_NOTE] * (args.dataset == "demo" and args.clip == DEMO_CLIP) + [data.note] * bool(data.note) + [
        f"{args.backbone} on {args.dataset}: {len(data.base_names)} "
        f"{'base' if args.subsample == 'base' else 'training'} / {len(data.new_names)} new classes, "
        f"{len(data.base['train'])} labelled training images, {nparams:,} learnable parameters, "
        f"{args.device} {args.precision}"]


# -----------------------------------------------------------------------------
# The backbone alone (Table 1's baselines; DPC's stage 1): CE over all base classes, Eq. (2)-(3)

def train_backbone(args, learner, loaders, meter, log):
    device, data = torch.device(args.device), loaders.data

    def plain_loss(batch):
        images, labels, _ = batch
        out = learner(images.to(device))  # logits over all base classes
        parts = {k: v.item() for k, v in out.losses.items()}
        if data.distil is not None:  # PromptKD: its own loss only, the images unlabeled
            return sum(out.losses.values()), parts
        ce = cross_entropy(out.logits, labels.to(device))  # Eq. 2
        return ce + sum(out.losses.values()), {"ce": ce.item(), **parts}
    # --best_val: the few-shot val split of the base classes scores each epoch (never a test split)
    select = (lambda: accuracy(learner, loaders.test(data.base["val"]), device, "val")) if args.best_val else None
    with meter.phase("backbone") as cost:
        which = "distil" if data.distil is not None else "base"
        loader = loaders.train(which, data.distil or data.base["train"], args.batch_size)
        train_stage("base", learner, loader, plain_loss, args.epochs, args, log, cost, select=select)
    save_prompt(args, learner, "prompt.pt", args.subsample, args.epochs, "base")
    return learner.learned_state()


# -----------------------------------------------------------------------------
# MAO: the base step (Eq. (4)-(6)) on the first half of the budget, the new step (Eq. (7)-(8)) on the second

def run_mao(args, learner, data, loaders, neighbours, meter, log):
    """({'base': the base-step prompt, 'new': the new-step prompt}, {'pseudo_labels': their quality})."""
    base = learner.learned_state()
    if args.stage in ("both", "base"):
        base = mao_base_step(args, learner, data, loaders, neighbours, meter, log)
    if args.stage not in ("both", "new"):
        return {"base": base, "new": None}, {}
    with meter.phase("mao_new") as cost:  # the teacher's text, the labelling and the training
        labeler = pseudo_labeler(args, learner, data, base)
        new, stats, fixed = mao_new_step(args, learner, data, loaders, labeler, log, cost)
    return {"base": base, "new": new}, {"pseudo_labels": pseudo_label_quality(args, labeler, data, loaders,
                                                                              stats, fixed, log)}


def mao_base_step(args, learner, data, loaders, neighbours, meter, log):
    """Hard-negative batches (Eq. (4)) and CE over only the candidates of each batch (Eq. (5)-(6));
    the backbone's own other losses are kept unchanged."""
    device = torch.device(args.device)
    sampler = HardNegativeBatchSampler([y for _, y, _ in data.base["train"]], neighbours, args.anchors,
                                       seed=args.seed, distinct_anchors=bool(args.distinct_anchors),
                                       released=bool(args.released_batches))

    def base_step_loss(batch):
        images, labels, _ = batch
        labels = labels.to(device)
        candidates, targets = dynamic_candidates(labels, dedup=bool(args.ar_dedup))  # Eq. 5
        out = learner(images.to(device), candidates)  # only the candidates' texts
        ce = dynamic_candidate_loss(out.logits, targets)  # Eq. 6
        parts = {"ce": ce.item(), **{k: v.item() for k, v in out.losses.items()}, "cand": len(candidates)}
        return ce + sum(out.losses.values()), parts
    epochs = args.epochs if args.subsample == "all" else args.epochs // 2  # xd: base step only
    with meter.phase("mao_base") as cost:
        loader = loaders.train("base", data.base["train"], batch_sampler=sampler)
        train_stage("base", learner, loader, base_step_loss, epochs, args, log, cost)
    save_prompt(args, learner, "base_prompt.pt", args.subsample, epochs, "base")
    return learner.learned_state()


def pseudo_labeler(args, learner, data, base_state):
    """Eq. (7)'s frozen teacher over the new classes: zero-shot CLIP (paper, Table 5) or the base-step
    prompt (released code)."""
    if args.pseudo_labeler == "clip":
        return PseudoLabeler(ZeroShotCLIP(learner.clip, data.new_names, "a photo of a {}."))
    teacher = new_learner(args, learner.clip, data.new_names, getattr(learner, "teacher", None))
    teacher.load_learned(base_state)
    return PseudoLabeler(teacher.requires_grad_(False))


def mao_new_step(args, learner, data, loaders, labeler, log, cost):
    """The base-step prompt on the new class names, trained on unlabeled new-class images with Top-1
    pseudo-labels of the frozen teacher (Eq. (7)) and CE over all new classes (Eq. (8)). Returns
    (the new-step prompt, the stage's statistics, the labels of --pseudo_label_every epoch)."""
    device = torch.device(args.device)
    learner.set_classnames(data.new_names)  # the same learned tensors, new [CLASS] tokens
    unlabeled = hide_labels(data.new["train"])  # the training loop never sees new-class labels
    fixed = None  # --pseudo_label_every epoch: un-augmented views, labelled once
    if args.pseudo_label_every == "epoch":
        fixed = labeler.label_dataset(loaders.test(unlabeled, data.decoded["new"]), device).to(device)
    agreement = hidden_label_agreement(data.new["train"])  # diagnostic only, never part of the loss

    def new_step_loss(batch):
        images, _, idx = batch  # the label slot holds -1: the images are unlabeled
        images = images.to(device)
        out = learner(images)  # logits over all new classes C_n
        with torch.no_grad():
            pseudo = labeler(images, out.frozen_image_features) if fixed is None else fixed[idx.to(device)]  # Eq. 7
        ce = pseudo_label_loss(out.logits, pseudo)  # Eq. 8
        parts = {"ce": ce.item(), **{k: v.item() for k, v in out.losses.items()}, "pl_acc": agreement(idx, pseudo)}
        return ce + sum(out.losses.values()), parts
    epochs = args.epochs - args.epochs // 2 if args.stage == "both" else max(1, args.epochs // 2)
    loader = loaders.train("new", unlabeled, args.new_batch_size)
    stats = train_stage("new", learner, loader, new_step_loss, epochs, args, log, cost)
    save_prompt(args, learner, "new_prompt.pt", "new", epochs, "new")
    return learner.learned_state(), stats, fixed


# -----------------------------------------------------------------------------
# DPC: stage 1 (the backbone alone, prompt P), then stage 2 (the parallel prompt P', dpc.py)

def run_dpc(args, learner, data, loaders, meter, log):
    """(a fresh learner, {'base', 'new': the weighting-decoupled prompts, 'stage1': P})."""
    device = torch.device(args.device)
    if args.init_from:
        log(f"DPC stage 1: prompt P from {args.init_from}")
    else:
        train_backbone(args, learner, loaders, meter, log)
    restart, ranker, fallback = released_learner_start(args, learner, data.base_names)
    dual = DualPrompt(learner, args.omega_b, args.dpc_param, restart)  # P' = P at the start; P frozen inside
    ds = ImageList(data.image_dir, data.base["train"], loaders.train_tf, data.decoded["base"])  # augmented views
    views = torch.utils.data.DataLoader(ds, batch_size=args.test_batch_size, num_workers=args.workers)
    ranker = ranker or dual.learner  # DHNO ranks with frozen P (the inner learner holds it)
    ranking = ImageTextRanking(ranker, views, args.topk, device)
    sampler = HardNegativeBatchSampler([y for _, y, _ in data.base["train"]], ranking, args.anchors,
                                       seed=args.seed, distinct_anchors=bool(args.distinct_anchors),
                                       released=bool(args.released_batches), fallback_high=fallback)

    def dpc_loss(batch):
        images, labels, _ = batch
        return stage2_loss(dual, images.to(device), labels.to(device), bool(args.dpc_backbone_losses))
    with meter.phase("dpc_stage2") as cost:
        loader = loaders.train("base", data.base["train"], batch_sampler=sampler)
        train_stage("dpc", dual, loader, dpc_loss, args.dpc_epochs, args, log, cost, lr=args.dpc_lr,
                    aggregate=False)
    prompts = decoupled_prompts(dual, args.omega_b, args.omega_n, args.dpc_base_infer)
    learner = new_learner(args, learner.clip, data.base_names, getattr(learner, "teacher", None))
    for name, key in (("parallel_prompt.pt", "parallel"), ("base_prompt.pt", "base"), ("new_prompt.pt", "new")):
        learner.load_learned(prompts[key])
        # new_prompt.pt scores classes not trained on: the new half, or a cross-dataset target's
        learner.set_classnames(data.new_names if key == "new" and data.new_names else data.base_names)
        save_prompt(args, learner, name, "new" if key == "new" else args.subsample, args.dpc_epochs, "dpc")
    return learner, {"base": prompts["base"], "new": prompts["new"], "stage1": dual.frozen_prompt()}


def released_learner_start(args, learner, names):
    """(P' tensors that start from N(0, 0.02), a ranker in place of P or None, the fallback's high end): what the
    released PromptKD+DPC (sple_promptkd.py) does unlike CoOp+DPC, each behind its flag (docs/deviations.md):
    fresh deep text prompts that train, deep vision prompts never loaded, a teacher ranking with its initial
    context (its ranker names it ctx_x, so the trained one never loads), the fallback 1..C-1, not 1..C-2."""
    if args.backbone != "promptkd":
        return [], None, max(1, len(names) - 2)
    if args.dpc_text_deep == "trained":
        learner.own_text_prompts()
    restart = [n for n in learner.learned_tensors() if n.startswith("text_prompts.") or (
        args.dpc_vision_deep == "random" and n.startswith("vis_prompts."))]
    ranker, t = None, learner.teacher
    if args.dpc_ranker == "teacher":
        ranker = copy.deepcopy(t, {id(t.clip): t.clip})  # the CLIP shared, the class list its own
        ranker.set_classnames(names)
        if args.dpc_ranker_ctx == "init":
            ranker.ctx.data.copy_(phrase_context(t.clip, t.prefix, t.n_ctx))
    return restart, ranker, max(1, len(names) - 1)


# -----------------------------------------------------------------------------
# DePT: the learner and its channel-adjusted transfer head, trained together (dept.py)

def run_dept(args, learner, data, loaders, meter, log):
    """(the DePT wrapper, {'base': learner and head, 'new': the learner alone})."""
    device = torch.device(args.device)
    dept = DePT(learner, args.dept_weight, args.dept_lr_scale).to(device)
    with meter.phase("dept") as cost:
        loader = loaders.train("base", data.base["train"], args.batch_size)
        train_stage("base", dept, loader, lambda b: dept_loss(dept, b[0].to(device), b[1].to(device)),
                    args.epochs, args, log, cost)
    save_prompt(args, dept, "base_prompt.pt", args.subsample, args.epochs, "base")  # with the head
    new = learner.learned_state()
    learner.set_classnames(data.new_names or data.base_names)  # classes the head was not trained on
    save_prompt(args, learner, "new_prompt.pt", "new" if data.new_names else args.subsample, args.epochs, "base")
    learner.set_classnames(data.base_names)
    return dept, {"base": dept.learned_state(), "new": new}


# -----------------------------------------------------------------------------
# One training stage: SGD + warm-up / cosine, the explicit epoch loop, a checkpoint after every epoch

def train_stage(stage, learner, loader, loss_fn, epochs, args, log, cost, lr=None, aggregate=True, select=None):
    """Train the learner's tensors for `epochs` epochs; loss_fn(batch) -> (loss, {name: value}).
    With --gpa_mean > 0 and aggregate (PromptSRC) the prompts end as their Gaussian epoch average; with
    select (a validation score after each epoch) as the epoch that scored best (Dassl's best_val).
    Returns {seconds, load_seconds, steps, sums of the logged parts}, resumed parts included."""
    device = torch.device(args.device)
    lr0 = lr or args.lr
    opt = make_optimizer(learner, lr0, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 CLIP
    last = os.path.join(args.out, f"{stage}_last.pt")
    start, gpa, best, stats = 0, None, None, dict(seconds=0.0, load_seconds=0.0, steps=0, sums={})
    weights = gpa_weights(epochs, args.gpa_mean, args.gpa_std) if aggregate and args.gpa_mean > 0 else None
    if args.resume and os.path.isfile(last):
        ck = load_last(last, device)
        learner.load_learned(ck["learned"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start, gpa, best, stats = ck["epoch"] + 1, ck.get("gpa"), ck.get("best"), ck.get("stats", stats)
        log(f"[{stage}] resumed from {last}: " + (f"epoch {start + 1}/{epochs} next" if start < epochs
                                                   else f"all {epochs} epochs done"))
    resumed, earlier, counts = stats["seconds"], stats.get("encodings", {}), cost.pop("counts", {})
    n_it, t0, done = len(loader), time.time(), 0
    for epoch in range(start, epochs):
        t_epoch, load, before = time.time(), 0.0, dict(counts)
        lr = lr_at(epoch, epochs, args, lr0)
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch, epochs, args, g["base_lr"])
        # each epoch's randomness depends on (seed, epoch) only: a resumed run repeats a whole one
        torch.manual_seed(args.seed * 10_000 + epoch)
        random.seed(args.seed * 10_000 + epoch)
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        if loader.generator is not None:
            loader.generator.manual_seed(args.seed * 10_000 + epoch)
        learner.train()
        sums = {}
        bar = tqdm(loader, desc=f"{stage} ep {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, disable=None)
        t_wait = time.time()
        for it, batch in enumerate(bar):
            load += time.time() - t_wait
            loss, parts = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{stage}] loss is {loss.item()} at epoch {epoch + 1} it {it + 1}: train "
                                         f"again into another --out with a smaller --lr (now {lr:g}) or fp32")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            done += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
            if (it + 1) % args.log_every == 0 or it + 1 == n_it:
                eta = (time.time() - t0) / done * ((epochs - epoch - 1) * n_it + n_it - it - 1)
                avg = {k: v / (it + 1) for k, v in sums.items()}
                log(f"[{stage}] ep {epoch + 1}/{epochs} | it {it + 1}/{n_it} | loss {loss.item():.4f} "
                    f"({' '.join(f'{k} {v:.3g}' for k, v in avg.items())}) | lr {lr:.1e} | "
                    f"{(time.time() - t0) / done:.2f} s/it | eta {eta / 60:.1f}m | mem {memory_gb(device):.1f}G")
                log.scalars(stage, epoch * n_it + it + 1, dict(avg, loss=loss.item(), lr=lr))  # TensorBoard
            t_wait = time.time()
        state = learner.learned_state()
        if not all(v.isfinite().all() for v in state.values() if v.is_floating_point()):  # the last step diverged
            raise FloatingPointError(f"[{stage}] the learned tensors are not finite after epoch {epoch + 1}: train "
                                     f"again into another --out with a smaller --lr (now {lr:g}) or fp32")
        if weights is not None:  # GPA: per epoch, in fp32
            gpa = {k: (0 if gpa is None else gpa[k]) + weights[epoch] * v.float() for k, v in state.items()}
        if select is not None:
            score = select()
            log(f"[{stage}] ep {epoch + 1}/{epochs} | val accuracy {score:.2f}")
            log.scalars(stage, (epoch + 1) * n_it, {"val_accuracy": score})
            if best is None or score > best[0]:  # a tie keeps the earlier epoch, as Dassl's is_best
                best = (score, epoch, state)
        stats = dict(seconds=stats["seconds"] + time.time() - t_epoch, load_seconds=stats["load_seconds"] + load,
                     steps=stats["steps"] + len(loader), sums={k: stats["sums"].get(k, 0.0) + v
                                                               for k, v in sums.items()},
                     encodings={k: stats.get("encodings", {}).get(k, 0) + v - before[k] for k, v in counts.items()})
        save_atomic({"learned": state, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "gpa": gpa, "best": best, "stats": stats, "settings": settings(args)}, last)
    if weights is not None:
        learner.load_learned(gpa)
        log(f"[{stage}] prompts := Gaussian average over epochs (weights "
            f"{', '.join(f'{w:.3g}' for w in weights)})")
    if best is not None:
        learner.load_learned(best[2])
        log(f"[{stage}] kept epoch {best[1] + 1} of {epochs}: the best val accuracy, {best[0]:.2f} (--best_val 1)")
        cost.update(kept_epoch=best[1] + 1)
    cost.update(load_seconds=stats["load_seconds"], resumed_seconds=resumed, resumed_encodings=earlier)
    return stats


def make_optimizer(learner, lr, args):
    """SGD over the trainable tensors; a learner may ask for groups at rates of their own (DePT)."""
    groups = learner.param_groups(lr) if hasattr(learner, "param_groups") else [
        {"params": [p for p in learner.parameters() if p.requires_grad], "lr": lr}]
    return torch.optim.SGD([dict(g, base_lr=g["lr"]) for g in groups], lr=lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def lr_at(epoch, epochs, args, lr=None):
    """Dassl's schedule: a constant warm-up at 1e-5, then the cosine over the budget."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return 0.5 * (lr or args.lr) * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / epochs))


def save_prompt(args, learner, name, subsample, epochs, stage):
    """Learnable tensors and what rebuilds them; never the frozen CLIP weights."""
    layers = min(len(learner.clip.transformer.resblocks), len(learner.clip.visual.transformer.resblocks))
    ckpt = {"learned": learner.learned_state(), "backbone": args.backbone, "dataset": args.dataset,
            "classnames": list(learner.classnames), "subsample": subsample, "stage": stage, "epoch": epochs,
            "learner_kwargs": learner_kwargs(args, layers), "args": vars(args)}
    save_atomic(ckpt, os.path.join(args.out, name))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, FloatingPointError, KeyboardInterrupt) as e:
        sys.exit(failure_line(e, sys.argv[1:]))
