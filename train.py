"""Prompt tuning on the base classes, with or without MAO, then base / new / HM evaluation. One file, explicit loops.

    python train.py --backbone coop --dataset dtd --root DATA          # CoOp + MAO: base step, then new step
    python train.py --backbone coop --dataset dtd --method none        # the CoOp baseline of MAO's Table 1
    python train.py --backbone zsclip --dataset dtd                    # zero-shot CLIP (no training)
    python train.py --backbone coop --dataset dtd --method dpc         # DPC: backbone, then the parallel prompt
    python train.py --dataset demo                                     # the toy world with the shipped demo CLIP
    python train.py --backbone coop --dataset imagenet --subsample all # cross-dataset source run (Table 2)

MAO (ICME 2025, arXiv 2503.18160v1) splits the backbone's epoch budget in two halves (§3.2-3.3):
  base step  hard-negative batches (sampler.py, Eq. (4)); CE over only the classes in the batch (losses.py, Eq. (5)-(6))
  new step   the base-step prompt, re-targeted to the new class names, trained on few-shot *unlabeled* new-class
             images with Top-1 zero-shot pseudo-labels (pseudolabel.py, Eq. (7)) and CE over all new classes (Eq. (8))
The backbone never knows: MAO acts only through the batches, candidate classes and labels it gives the learner.
Base accuracy uses the base-step prompt, new accuracy the new-step prompt (METHODS.md A1).

DPC (CVPR 2025, dpc.py) runs after the backbone alone (stage 1, prompt P, or --init_from):
  stage 2    P' cloned from P and trained on hard-negative batches ranked per image by frozen P's image-text
             similarity with the symmetric contrastive loss L_CL; P stays frozen
  inference  base classes with omega_b P' + (1 - omega_b) P, new classes with omega_n P' + (1 - omega_n) P

main() reads as the paper's Fig. 2: data -> frozen CLIP -> prompt learner -> one of {the backbone alone; MAO's base
step then new step; DPC's stage 1 then stage 2} -> evaluation.
"""
import argparse
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from clip_prompt import BACKBONES, EncodeCounter, ZeroShotCLIP, build_learner, load_clip
from data import (DATASETS, ImageList, build_transforms, check_images, dataset_spec, decode_all, error_line,
                  fewshot_splits, hide_labels, make_demo, subsample_classes)
from dpc import DualPrompt, ImageTextRanking, decoupled_prompts, stage2_loss
from eval import accuracy, harmonic_mean, load_checkpoint, test_loader
from losses import cross_entropy, dynamic_candidate_loss, dynamic_candidates, pseudo_label_loss
from pseudolabel import PseudoLabeler
from sampler import HardNegativeBatchSampler, check_settings, class_neighbours

# -----------------------------------------------------------------------------
# Paper presets: an explicit flag beats the preset, which beats the argparse default

# The baselines of MAO's Table 1 (and DPC's stage 1): MAO Supp. B runs every backbone "with unified epochs ep = 20
# and learning rate lr = 0.002", batch 32, on its own structure. --baseline_recipe published uses instead the
# backbone authors' configs below (their papers' numbers: BACKBONES.md §12).
MAO_BASELINE = dict(epochs=20, lr=0.002, batch_size=32)
PRESETS = {
    # CoOp in the base-to-new protocol (CoCoOp's vit_b16_ctxv1; BACKBONES.md §3.4): 200 epochs (ImageNet 50)
    ("coop", "none"): dict(epochs=200, lr=0.002, batch_size=32, n_ctx=4, ctx_init="a photo of a"),
    # MAO on CoOp (MAO Supp. B): the baseline's 20 epochs split 10 + 10, lr 0.0035, 4 tokens from "a photo of a"
    ("coop", "mao"): dict(epochs=20, lr=0.0035, batch_size=32, n_ctx=4, ctx_init="a photo of a"),
    # MaPLe (vit_b16_c2_ep5_batch4_2ctx): 2 tokens, depth 9, batch 4, lr 0.0035, 5 epochs
    ("maple", "none"): dict(epochs=5, lr=0.0035, batch_size=4, n_ctx=2, depth=9),
    ("maple", "mao"): dict(epochs=20, lr=0.0035, batch_size=4, n_ctx=2, depth=9),
    # PromptSRC (vit_b16_c2_ep20_batch4_4+4ctx): 4+4 tokens, depth 9, batch 4, lr 0.0025, 20 epochs, GPA 15 / 1
    ("promptsrc", "none"): dict(epochs=20, lr=0.0025, batch_size=4, n_ctx=4, n_vis=4, depth=9, gpa_mean=15, gpa_std=1,
                                text_weight=25.0, image_weight=10.0),
    ("promptsrc", "mao"): dict(epochs=20, lr=0.0035, batch_size=4, n_ctx=4, n_vis=4, depth=9, gpa_mean=15, gpa_std=1,
                               text_weight=25.0, image_weight=10.0),
    # IVLP (PromptSRC's baseline, vit_b16_c2_ep20_batch4_4+4ctx): PromptSRC without self-regulation and GPA
    ("ivlp", "none"): dict(epochs=20, lr=0.0025, batch_size=4, n_ctx=4, n_vis=4, depth=9),
    ("ivlp", "mao"): dict(epochs=20, lr=0.0035, batch_size=4, n_ctx=4, n_vis=4, depth=9),
    # CoCoOp (KaiyangZhou/CoOp, vit_b16_c4_ep10_batch1_ctxv1): 4 tokens from "a photo of a", batch 1, 10 epochs
    ("cocoop", "none"): dict(epochs=10, lr=0.002, batch_size=1, n_ctx=4, ctx_init="a photo of a"),
    ("cocoop", "mao"): dict(epochs=20, lr=0.0035, batch_size=32, n_ctx=4, ctx_init="a photo of a"),
    # KgCoOp (htyao89/KgCoOp, vit_b16_ep100_ctxv1 with W = 8.0 from its base2new script): batch 128, 100 epochs
    ("kgcoop", "none"): dict(epochs=100, lr=0.002, batch_size=128, n_ctx=4, ctx_init="a photo of a", kg_weight=8.0),
    ("kgcoop", "mao"): dict(epochs=20, lr=0.0035, batch_size=32, n_ctx=4, ctx_init="a photo of a", kg_weight=8.0),
}
# Cross-dataset / domain generalisation (--subsample all, source ImageNet): each backbone's published XD config
# (BACKBONES.md §11.2); MAO there trains its base step only, 5 epochs at lr 0.0035 (MAO Supp. B; the ep5 configs
# of the official code use lr 0.005), on the backbone's XD structure (depth 3 for MaPLe / PromptSRC / IVLP)
PRESETS_ALL = {
    ("coop", "none"): dict(epochs=50, lr=0.002, batch_size=32, n_ctx=4, ctx_init="a photo of a"),  # vit_b16_ep50_ctxv1
    ("coop", "mao"): dict(epochs=5, lr=0.0035, batch_size=32, n_ctx=4, ctx_init="a photo of a"),
    ("maple", "none"): dict(epochs=2, lr=0.0026, batch_size=4, n_ctx=2, depth=3),  # ..._2ctx_cross_datasets
    ("maple", "mao"): dict(epochs=5, lr=0.0035, batch_size=4, n_ctx=2, depth=3),
    ("promptsrc", "none"): dict(epochs=20, lr=0.0025, batch_size=4, n_ctx=4, n_vis=4, depth=3, gpa_mean=6, gpa_std=10,
                                text_weight=25.0, image_weight=10.0),  # ..._4+4ctx_cross_datasets
    ("promptsrc", "mao"): dict(epochs=5, lr=0.0035, batch_size=4, n_ctx=4, n_vis=4, depth=3, gpa_mean=6, gpa_std=10,
                               text_weight=25.0, image_weight=10.0),  # MAO's ep5_batch32_4+4ctx_cross_datasets (b 4)
    ("ivlp", "none"): dict(epochs=20, lr=0.0025, batch_size=4, n_ctx=4, n_vis=4, depth=3),
    ("ivlp", "mao"): dict(epochs=5, lr=0.0035, batch_size=4, n_ctx=4, n_vis=4, depth=3),
    ("cocoop", "none"): dict(epochs=10, lr=0.002, batch_size=1, n_ctx=4, ctx_init="a photo of a"),  # same config
    ("cocoop", "mao"): dict(epochs=5, lr=0.0035, batch_size=32, n_ctx=4, ctx_init="a photo of a"),
    ("kgcoop", "none"): dict(epochs=100, lr=0.002, batch_size=128, n_ctx=4, ctx_init="a photo of a", kg_weight=8.0),
    ("kgcoop", "mao"): dict(epochs=5, lr=0.0035, batch_size=32, n_ctx=4, ctx_init="a photo of a", kg_weight=8.0),
}
# MAO Supp. B / §4.4: anchors b and Top-K per dataset (b*K must not exceed the number of base classes)
DATASET_PRESETS = {"dtd": dict(anchors=2, topk=8), "oxford_pets": dict(anchors=2, topk=8),
                   "eurosat": dict(anchors=2, topk=2), "demo": dict(anchors=2, topk=8)}
DEMO_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "demo_clip.pt")  # pretrain_clip.py
DEFAULTS = dict(epochs=20, lr=0.002, batch_size=32, n_ctx=4, ctx_init="a photo of a", anchors=4, topk=8, n_vis=4,
                depth=9, gpa_mean=0, gpa_std=0)
# Where MAO and DPC leave a choice: the papers' behaviour, and (--recipe official) the released code's, all at once
PAPER_BEHAVIOUR = dict(ar_dedup=1, pseudo_labeler="clip", released_batches=0, dpc_param="direct",
                       dpc_base_infer="mixed", dpc_backbone_losses=1)
RELEASED_BEHAVIOUR = dict(ar_dedup=0, distinct_anchors=0, pseudo_labeler="tuned", released_batches=1,
                          dpc_param="released", dpc_base_infer="parallel", dpc_backbone_losses=0)
# Flags that do not change what is learned; every other flag set away from its paper value makes a run a "variant"
# (results.json), which eval.py tabulates apart from the paper setting (ablations, the --topk / --new_shots curves)
NOT_SETTINGS = {"dataset", "root", "seed", "backbone", "method", "subsample", "init_from", "device", "precision",
                "workers", "test_batch_size", "out", "resume", "log_every",
                "cache_images"}


def setting_changes(args, preset, ap):
    """{flag: value} for every setting given away from the paper's (the preset, else the argparse default)."""
    paper = dict(preset, shots=16, new_shots=args.shots, stage=ap.get_default("stage"))
    if "distinct_anchors" not in paper:  # MAO: follows --ar_dedup (one text row per image: anchors may repeat)
        paper["distinct_anchors"] = args.ar_dedup if args.method == "mao" and args.ar_dedup is not None else 1
    if args.method == "mao" or args.subsample == "all" or args.backbone == "zsclip":
        paper["baseline_recipe"] = args.baseline_recipe  # no backbone-alone training: the recipe changes nothing
    if args.method == "none":
        paper["recipe"] = args.recipe  # the backbone alone has no released MAO / DPC behaviour to switch
    if args.subsample == "all":
        paper["stage"] = args.stage  # forced to the base step below
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS and v is not None
            and v != paper.get(k, ap.get_default(k)) and not (k == "clip" and v in ("ViT-B/16", DEMO_CLIP))}


# -----------------------------------------------------------------------------
# Flags: one flat block, grouped as in the paper (an explicit flag beats the preset, which beats the default)

PARSER = ap = argparse.ArgumentParser(description="Prompt tuning with MAO (base step + new step), DPC, or alone.")
# -- data --
ap.add_argument("--dataset", default="dtd", help=f"one of {', '.join(DATASETS)}; 'demo' is generated locally")
ap.add_argument("--root", default="data", help="folder holding the datasets in the CoOp layout (see data.py)")
ap.add_argument("--shots", type=int, default=16, help="labelled images per base class (CoOp protocol: 16)")
ap.add_argument("--seed", type=int, default=1, help="seed of the few-shot split and of training (paper: 1, 2, 3)")
ap.add_argument("--subsample", default="base", choices=["base", "all"],
                help="base: base-to-new protocol (Table 1). all: train on every class, the cross-dataset / DG "
                     "source run (Table 2; evaluate targets with eval.py --datasets); MAO runs its base step only")
# -- model --
ap.add_argument("--backbone", default="coop", help=f"prompt learner: {', '.join(BACKBONES)}")
ap.add_argument("--clip", help="CLIP name, local checkpoint path, or 'tiny' (random, tests). Default: ViT-B/16; "
                               "for --dataset demo the shipped demo CLIP (weights/demo_clip.pt)")
ap.add_argument("--n_ctx", type=int, help="M: learnable context tokens (CoOp §3). Base-to-new: 4 (from ctx_init)")
ap.add_argument("--ctx_init", help="phrase initialising the context (CoOp: M = its word count); '' = random init")
ap.add_argument("--n_vis", type=int, help="vision prompt tokens (IVLP/PromptSRC §3.1). Paper: 4")
ap.add_argument("--depth", type=int, help="J: layers carrying prompts (MaPLe §3.2, PromptSRC). Paper: 9")
ap.add_argument("--text_weight", type=float, help="PromptSRC L_SCL text weight (§3.2). Paper: 25")
ap.add_argument("--image_weight", type=float, help="PromptSRC L_SCL image weight (§3.2). Paper: 10")
ap.add_argument("--kg_weight", type=float, help="lambda: KgCoOp's knowledge-guided loss weight (§3). Paper: 8")
ap.add_argument("--gpa_mean", type=float, help="PromptSRC GPA Gaussian mean epoch (§3.3); 0 = off. Paper: 15")
ap.add_argument("--gpa_std", type=float, help="PromptSRC GPA Gaussian std (§3.3). Paper: 1")
# -- MAO --
ap.add_argument("--method", default="mao", choices=["mao", "none", "dpc"],
                help="mao: two-step MAO; none: the backbone alone; dpc: backbone, then DPC's parallel prompt")
ap.add_argument("--stage", default="both", choices=["both", "base", "new"], help="run MAO's base step, new step or both")
ap.add_argument("--baseline_recipe", default="mao", choices=["mao", "published"],
                help="epochs / lr / batch of the backbone alone (--method none, DPC stage 1): mao = MAO Supp. B's "
                     "20 / 0.002 / 32 for every backbone (Table 1's baseline rows); published = the backbone "
                     "authors' configs (CoOp 200 epochs, MaPLe 5, PromptSRC 20 at lr 0.0025, batch 4)")
ap.add_argument("--init_from", help="prompt checkpoint to start from (new step: the base-step prompt)")
ap.add_argument("--topk", type=int, help="K: Top-K nearest classes of Eq. (4) (MAO §3.2). Paper: 8 (EuroSAT 2)")
ap.add_argument("--anchors", type=int, help="b: anchor images per hard-negative batch (MAO Supp. B). Paper: 4 (DTD, Pets, EuroSAT 2)")
ap.add_argument("--recipe", default="paper", choices=["paper", "official"],
                help="paper: the papers' behaviour wherever they say (the released code's where they are silent); "
                     "official: every behaviour of the released MAO / DPC code at once (docs/deviations.md). "
                     "Explicit flags below still win")
ap.add_argument("--ar_dedup", type=int, choices=[0, 1],
                help="C~'_b of Eq. (5): 1 = unique classes (paper); 0 = one text row per image, duplicates kept "
                     "(released); under MAO 0 also lets anchors share a class unless --distinct_anchors is given")
ap.add_argument("--distinct_anchors", type=int, choices=[0, 1],
                help="1: the anchors of a hard-negative batch have distinct classes, so no class repeats (paper); "
                     "0: plain shuffled anchors that may share a class (released MAO and DPC)")
ap.add_argument("--released_batches", type=int, choices=[0, 1],
                help="1: the released batch builder: K negatives when an anchor's class is outside its own Top-K, and "
                     "its fallback (randint(1, C-1), MAO; randint(1, C-2), CoOp+DPC; up to 2 negatives even at "
                     "K = 2). 0: up to K-1 negatives, fallback uniform over unused classes (paper: 'up to K-1')")
ap.add_argument("--minilm_bank", default="raw", choices=["raw", "spaced"],
                help="Eq. (4)'s class bank: raw = names as given, '_' kept (released code; the paper is silent); "
                     "spaced = '_' -> ' ' as the queries")
ap.add_argument("--pseudo_labeler", choices=["clip", "tuned"],
                help="teacher of Eq. (7): clip = zero-shot foundation CLIP (paper, Table 5); tuned = base-step prompt (released)")
ap.add_argument("--pseudo_label_every", default="batch", choices=["batch", "epoch"],
                help="batch: online on each augmented batch (paper); epoch: once on un-augmented views (faster)")
ap.add_argument("--new_shots", type=int, help="S: unlabeled images per new class (default: --shots; MAO Fig. 4: 8 <= S <= 32)")
ap.add_argument("--new_batch_size", type=int, default=32, help="new-step batch (unspecified in the paper; b*K = 32)")
# -- DPC --
ap.add_argument("--omega_b", type=float, default=0.2, help="DPC base-class weight of P' (paper: 0.2)")
ap.add_argument("--omega_n", type=float, default=0.0, help="DPC new-class weight of P' (paper: -> 0)")
ap.add_argument("--dpc_epochs", type=int, default=20, help="DPC stage-2 epochs (paper: 20)")
ap.add_argument("--dpc_lr", type=float, default=0.002, help="DPC stage-2 SGD learning rate (paper: 0.002)")
ap.add_argument("--dpc_param", choices=["direct", "released"],
                help="direct: train P' at --dpc_lr (paper); released: the released trainer's update, P' trained "
                     "with its gradient scaled by 1/omega_b (lr / omega_b, weight decay at the plain lr)")
ap.add_argument("--dpc_base_infer", choices=["mixed", "parallel"],
                help="base classes scored with omega_b P' + (1-omega_b) P (paper) or P' alone (released)")
ap.add_argument("--dpc_backbone_losses", type=int, choices=[0, 1],
                help="1: keep the backbone's own losses beside L_CL (paper: 'parallel to other backbone "
                     "losses'); 0: L_CL only (released)")
# -- optim --
ap.add_argument("--epochs", type=int, help="total epoch budget; MAO gives half to each step (paper: 20 = 10 + 10)")
ap.add_argument("--lr", type=float, help="SGD learning rate (CoOp 0.002; MAO 0.0035)")
ap.add_argument("--batch_size", type=int, help="images per step for --method none (CoOp 32; MaPLe, PromptSRC 4)")
ap.add_argument("--momentum", type=float, default=0.9)
ap.add_argument("--weight_decay", type=float, default=5e-4)
ap.add_argument("--warmup_epochs", type=int, default=1, help="constant warm-up epochs before the cosine (Dassl)")
ap.add_argument("--warmup_lr", type=float, default=1e-5)
# -- system --
ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
ap.add_argument("--precision", default="auto", choices=["auto", "fp16", "fp32"],
                help="frozen CLIP dtype: auto = fp16 on GPU (paper) with loss scaling, fp32 on CPU")
ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader worker processes")
ap.add_argument("--cache_images", type=int, default=1, choices=[0, 1],
                help="1: decode every training image once per run and keep it in memory (augmentation still fresh "
                     "on every use); 0: decode on every use (less memory)")
ap.add_argument("--test_batch_size", type=int, default=100)
ap.add_argument("--out", help="output folder (default runs/<dataset>/<backbone>-<method>/shots<K>_seed<S>)")
ap.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint in --out")
ap.add_argument("--log_every", type=int, default=20, help="iterations between log lines")
del ap


def check_ranges(args):
    """Refuse numbers no run can use, before anything is written (the optimiser would refuse some only later)."""
    positive = ["shots", "new_batch_size", "test_batch_size", "log_every", "dpc_epochs", "dpc_lr", "warmup_lr"]
    positive += [k for k in ("lr", "epochs", "batch_size", "new_shots", "topk", "anchors", "n_ctx", "depth")
                 if getattr(args, k) is not None]
    for k in positive:
        if not getattr(args, k) > 0:
            raise ValueError(f"--{k} {getattr(args, k)}: must be > 0")
    for k in ("weight_decay", "warmup_epochs", "workers", "n_vis"):
        if getattr(args, k) is not None and getattr(args, k) < 0:
            raise ValueError(f"--{k} {getattr(args, k)}: must be >= 0")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum {args.momentum}: SGD momentum lies in [0, 1)")
    if not (0 <= args.omega_b <= 1 and 0 <= args.omega_n <= 1):
        raise ValueError(f"--omega_b {args.omega_b} / --omega_n {args.omega_n}: DPC's weights lie in [0, 1]")


def parse_args(argv=None):
    """Flags -> resolved arguments: paper presets filled in, impossible settings refused with the fix named."""
    args = PARSER.parse_args(argv)
    args.dataset = dataset_spec(args.dataset)[0]  # unknown names fail here, before anything is written
    if args.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{args.backbone}'. Choose one of: {', '.join(BACKBONES)}")
    check_ranges(args)
    if args.backbone == "zsclip":
        args.method = "none"  # nothing to train
    if args.backbone != "promptsrc" and (args.text_weight is not None or args.image_weight is not None):
        raise ValueError("--text_weight / --image_weight weight PromptSRC's self-regulating losses; "
                         "use --backbone promptsrc")
    if args.backbone != "kgcoop" and args.kg_weight is not None:
        raise ValueError("--kg_weight weights KgCoOp's knowledge-guided loss; use --backbone kgcoop")
    stage1 = "none" if args.method == "dpc" else args.method  # DPC's stage 1 is the backbone alone
    presets = PRESETS_ALL if args.subsample == "all" else PRESETS
    preset = dict(DEFAULTS, **presets.get((args.backbone, stage1), {}), **DATASET_PRESETS.get(args.dataset, {}),
                  **PAPER_BEHAVIOUR)
    if args.recipe == "official":
        preset.update(RELEASED_BEHAVIOUR)
    if stage1 == "none" and args.subsample == "base" and args.baseline_recipe == "mao":
        preset.update(MAO_BASELINE)
    elif (args.backbone, stage1) == ("coop", "none") and args.dataset == "imagenet":
        preset["epochs"] = 50  # vit_b16_ep50_ctxv1
    if args.recipe == "official" and args.subsample == "all" and args.method == "mao":
        preset["lr"] = 0.005  # the released ep5 cross-dataset configs (the paper says 0.0035)
    # what this run changes from the paper setting: explicit flags that differ from the preset or the default
    args.variant = setting_changes(args, preset, PARSER)
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.new_shots = args.new_shots or args.shots
    if args.distinct_anchors is None:
        args.distinct_anchors = args.ar_dedup if args.method == "mao" else 1
    if args.subsample == "all" and args.method == "mao":
        if args.stage == "new":
            raise ValueError("--subsample all trains every class with labels: there is no new step (MAO Supp. B)")
        args.stage = "base"
    if args.clip is None:
        args.clip = DEMO_CLIP if args.dataset == "demo" else "ViT-B/16"
        if args.dataset == "demo" and not os.path.isfile(DEMO_CLIP):
            raise FileNotFoundError(f"the demo CLIP {DEMO_CLIP} is missing: restore it from git "
                                    f"(git checkout weights/) or rebuild it with python pretrain_clip.py")
    if args.method == "dpc" and args.dpc_param == "released" and args.omega_b == 0:
        raise ValueError("--dpc_param released divides the gradient by omega_b: it needs --omega_b > 0")
    if args.method == "mao" and args.epochs < 2 and args.stage == "both" and args.subsample == "base":
        raise ValueError(f"--epochs {args.epochs}: MAO splits the budget in two halves, so it needs at least 2")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "fp16" if args.device.startswith("cuda") else "fp32"
    args.out = args.out or os.path.join("runs", args.dataset if args.subsample == "base" else f"xd-{args.dataset}",
                                        f"{args.backbone}-{args.method}", f"shots{args.shots}_seed{args.seed}")
    return args


# -----------------------------------------------------------------------------
# Schedule, logging, checkpoints

def lr_at(epoch, epochs, args, lr=None):
    """Dassl's schedule: constant warm-up at 1e-5, then cosine over the budget, shifted by the warm-up."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return 0.5 * (lr or args.lr) * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / epochs))


def gpa_weights(epochs, mean, std):
    """PromptSRC's Gaussian prompt aggregation (PromptSRC §3.3): w_e proportional to N(e; mean, std^2) for epochs
    e = 1..E, summing to 1; the prompts end as sum_e w_e * (prompts after epoch e)."""
    w = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    return [x / sum(w) for x in w]


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak RSS of the process (KB on Linux)


class Log:
    """Prints above the progress bar and appends the same lines to out/log.txt."""

    def __init__(self, path=None):
        self.path = path

    def __call__(self, msg):
        tqdm.write(msg)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def save_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash never leaves a truncated checkpoint behind


def prompt_checkpoint(learner, args, subsample, epoch, stage):
    """Learnable tensors + what is needed to rebuild them; never the frozen CLIP weights."""
    return {"learned": learner.learned_state(), "backbone": args.backbone, "dataset": args.dataset,
            "classnames": list(learner.classnames), "subsample": subsample, "stage": stage, "epoch": epoch,
            "learner_kwargs": learner_kwargs(args), "args": vars(args)}


def learner_kwargs(args):
    kw = dict(n_ctx=args.n_ctx, ctx_init=args.ctx_init, n_vis=args.n_vis, depth=args.depth)
    if args.backbone == "promptsrc":
        kw.update(text_weight=args.text_weight, image_weight=args.image_weight)
    if args.backbone == "kgcoop":
        kw.update(kg_weight=args.kg_weight)
    return kw


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# One training stage: SGD + warm-up/cosine, an explicit epoch loop, a checkpoint after every epoch

def train_stage(stage, learner, loader, loss_fn, epochs, args, device, log, lr=None, aggregate=True):
    """Train the learner's prompt for `epochs` epochs; loss_fn(batch) -> (loss, {name: value}) per step.
    With --gpa_mean > 0 (PromptSRC) and aggregate, the prompts end as their Gaussian-weighted epoch average."""
    params = [p for p in learner.parameters() if p.requires_grad]
    lr0 = lr or args.lr
    opt = torch.optim.SGD(params, lr=lr0, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 CLIP: scale the loss
    last = os.path.join(args.out, f"{stage}_last.pt")
    start, gpa = 0, None
    weights = gpa_weights(epochs, args.gpa_mean, args.gpa_std) if aggregate and args.gpa_mean > 0 else None
    if args.resume and os.path.isfile(last):
        ck = torch.load(last, map_location=device, weights_only=False)
        learner.load_learned(ck["learned"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start, gpa = ck["epoch"] + 1, ck.get("gpa")
        log(f"[{stage}] resumed from {last}: epoch {start}/{epochs} next")
    n_it, t0, done = len(loader), time.time(), 0
    for epoch in range(start, epochs):
        lr = lr_at(epoch, epochs, args, lr0)
        for g in opt.param_groups:
            g["lr"] = lr
        # every epoch's randomness depends on (seed, epoch) only, so a resumed run repeats an uninterrupted one
        torch.manual_seed(args.seed * 10_000 + epoch)
        random.seed(args.seed * 10_000 + epoch)
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        if loader.generator is not None:
            loader.generator.manual_seed(args.seed * 10_000 + epoch)
        learner.train()
        sums = {}
        bar = tqdm(loader, desc=f"{stage} ep {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, disable=None)
        for it, batch in enumerate(bar):
            loss, parts = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{stage}] loss is {loss.item()} at epoch {epoch + 1} it {it + 1}: "
                                         f"try --precision fp32 or a smaller --lr (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            done += 1
            dt = (time.time() - t0) / done
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
            if (it + 1) % args.log_every == 0 or it + 1 == n_it:
                eta = dt * ((epochs - epoch - 1) * n_it + n_it - it - 1)
                avg = " ".join(f"{k} {v / (it + 1):.3g}" for k, v in sums.items())
                log(f"[{stage}] ep {epoch + 1}/{epochs} | it {it + 1}/{n_it} | loss {loss.item():.4f} ({avg}) | "
                    f"lr {lr:.1e} | {dt:.2f} s/it | eta {eta / 60:.1f}m | mem {memory_gb(device):.1f}G")
        state = learner.learned_state()
        if weights is not None:  # Gaussian prompt aggregation: an epoch-level step, learnable tensors only, fp32
            gpa = {k: (0 if gpa is None else gpa[k]) + weights[epoch] * v.float() for k, v in state.items()}
        save_atomic({"learned": state, "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "gpa": gpa}, last)
    if weights is not None:
        learner.load_learned(gpa)
        log(f"[{stage}] prompts := Gaussian average over epochs (weights {', '.join(f'{w:.3g}' for w in weights)})")
    return learner


# -----------------------------------------------------------------------------
# main: data -> frozen CLIP -> prompt learner -> {backbone alone | MAO base + new step | DPC stage 1 + 2} -> evaluation

TOY_NOTE = ("PIPELINE RUN WITH A TOY MODEL: a randomly initialised tiny CLIP on synthetic images. It shows that data, "
            "training, checkpoints and evaluation run end to end; its accuracies are not results.")
DEMO_NOTE = ("Toy world (README 'The embedded demo'): a small CLIP pretrained here on synthetic captioned shapes, "
             "36 colour-shape classes. Its numbers describe this synthetic task, not the paper's benchmarks.")


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    run = SimpleNamespace(args=args, device=torch.device(args.device))
    load_data(run)  # everything that can fail on bad input happens before the output folder is created
    learner = build_model(run)
    start_output(run, learner)
    t_train = time.time()
    if args.backbone == "zsclip":
        states = {"base": learner.learned_state()}  # nothing to train: the hand-crafted template
    elif args.method == "none":
        states = {"base": train_backbone(run, learner)}
    elif args.method == "mao":
        states = run_mao(run, learner)
    else:
        learner, states = run_dpc(run, learner)
    train_seconds = time.time() - t_train
    with measured(run, "evaluation"):
        res = evaluate_run(run, learner, states, train_seconds)
    return finish(run, res)


def load_data(run):
    """The few-shot base classes (labelled) and the new classes (training images unlabeled, test labelled)."""
    args = run.args
    if args.dataset == "demo" and not os.path.isdir(os.path.join(args.root, "demo")):
        print(f"writing the synthetic demo dataset to {make_demo(args.root)}")
    splits, run.image_dir = fewshot_splits(args.dataset, args.root, args.shots, args.seed)
    if args.subsample == "all":  # cross-dataset / DG source: every class is seen ("base" below), none is new
        run.base, run.base_names = subsample_classes(splits, "all")
        run.new, run.new_names = {"train": [], "test": []}, []
    else:
        run.base, run.base_names = subsample_classes(splits, "base")
        run.new, run.new_names = subsample_classes(splits, "new")
        if args.new_shots != args.shots:
            new_train = subsample_classes(fewshot_splits(args.dataset, args.root, args.new_shots, args.seed)[0],
                                          "new")[0]
            run.new["train"] = new_train["train"]
        if not run.new_names or not run.new["test"]:
            raise ValueError(f"{args.dataset} has no new classes / new test images to evaluate (needs >= 2 classes)")
    if not run.base["train"]:
        raise ValueError(f"{args.dataset} has no training images (a test-only dataset is an evaluation target: "
                         f"python eval.py --ckpt RUN --datasets {args.dataset})")
    if args.method == "mao" and args.stage in ("both", "new") and not run.new["train"]:
        raise ValueError("the new step needs unlabeled new-class training images; the new split is empty")
    # every training image is read now, so a broken one stops the run before anything is written
    sets = {"base": run.base["train"], "new": run.new["train"] if args.method == "mao" else []}
    if args.cache_images:
        run.decoded = {k: decode_all(run.image_dir, v, args.workers) for k, v in sets.items()}
        mb = sum(im.width * im.height * 3 for v in run.decoded.values() for im in v) / 2**20
        run.note = (f"decoded the {sum(map(len, sets.values()))} training images once ({mb:.1f} MB in memory; "
                    f"--cache_images 0 decodes them on every use)")
    else:
        run.decoded, run.note = {"base": None, "new": None}, None
        for v in sets.values():
            check_images(run.image_dir, v)


def build_model(run):
    """Frozen CLIP, its transforms, and the prompt learner over the base classes (from --init_from if given).
    Also refuses hard-negative settings the base classes cannot hold and builds MAO's Eq. (4) table once."""
    args, device = run.args, run.device
    run.model = load_clip(args.clip, device, args.precision, cache_dir=args.root)
    run.counter, run.cost = EncodeCounter(run.model), {}
    run.train_tf, run.test_tf = build_transforms(run.model.visual.input_resolution,
                                                 DATASETS[args.dataset].get("crop", (0.08, 1.0)))
    layers = min(len(run.model.transformer.resblocks), len(run.model.visual.transformer.resblocks))
    if args.backbone in ("maple", "ivlp", "promptsrc") and args.depth > layers:
        print(f"--depth {args.depth} exceeds the {layers} layers of this CLIP: prompting all {layers}")
        args.depth = layers
    run.template = DATASETS[args.dataset]["template"]  # zero-shot CLIP's prompt; KgCoOp's frozen text targets
    learner = new_learner(run, run.base_names)
    if args.init_from:
        learner.load_learned(load_checkpoint(args.init_from, device)["learned"])
    if args.method in ("mao", "dpc") and (args.method == "dpc" or args.stage in ("both", "base")):
        check_settings(len(run.base_names), args.anchors, args.topk)  # both build hard-negative batches
    if args.method == "mao" and args.stage in ("both", "base"):
        run.neighbours = class_neighbours(run.base_names, args.topk, bank=args.minilm_bank)  # Eq. 4, once per run
    if args.method == "mao" and args.stage == "new" and not args.init_from:
        args.init_from = os.path.join(args.out, "base_prompt.pt")
        if not os.path.isfile(args.init_from):
            raise FileNotFoundError(f"--stage new needs the base-step prompt: give --init_from or run --stage base "
                                    f"first into {args.out}")
        learner.load_learned(load_checkpoint(args.init_from, device)["learned"])
    return learner


def new_learner(run, names):
    return build_learner(run.args.backbone, run.model, names, template=run.template, **learner_kwargs(run.args))


def start_output(run, learner):
    """The output folder, log.txt and args.json: written only once every check has passed."""
    args = run.args
    os.makedirs(args.out, exist_ok=True)
    run.log = log = Log(os.path.join(args.out, "log.txt"))
    if args.clip == "tiny":
        log("=" * 100 + "\n" + TOY_NOTE + "\n" + "=" * 100)
    elif args.dataset == "demo" and args.clip == DEMO_CLIP:
        log(DEMO_NOTE)
    log(" ".join(f"{k}={v}" for k, v in vars(args).items()))
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    if run.note:
        log(run.note)
    nparams = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    log(f"{args.backbone} on {args.dataset}: {len(run.base_names)} "
        f"{'base' if args.subsample == 'base' else 'training'} / {len(run.new_names)} new classes, "
        f"{len(run.base['train'])} labelled training images, {nparams:,} learnable parameters, "
        f"{run.device} {args.precision}")


def make_loader(run, items, decoded, batch_size=None, batch_sampler=None):
    """Training images augmented (and decoded, unless cached) in DataLoader workers: shuffled batches, or a batch
    sampler's."""
    args = run.args
    ds = ImageList(run.image_dir, items, run.train_tf, decoded)
    kw = dict(num_workers=args.workers, pin_memory=run.device.type == "cuda", persistent_workers=False)  # fresh workers re-seeded every epoch
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, **kw)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) >= batch_size,
                                       generator=torch.Generator().manual_seed(args.seed), **kw)


@contextmanager
def measured(run, phase):
    """Seconds and frozen-CLIP encoder counts of one phase of the run: results.json's "cost" (where the time goes)."""
    before, t0 = dict(run.counter.counts), time.time()
    yield
    run.cost[phase] = dict({k: v - before[k] for k, v in run.counter.counts.items()}, seconds=time.time() - t0)


def save_prompt(run, learner, name, subsample, epochs, stage):
    save_atomic(prompt_checkpoint(learner, run.args, subsample, epochs, stage), os.path.join(run.args.out, name))


# -----------------------------------------------------------------------------
# The backbone alone (Table 1's baselines; DPC's stage 1): CE over all base classes, Eq. (2)-(3)

def train_backbone(run, learner):
    args, device = run.args, run.device

    def plain_loss(batch):
        images, labels, _ = batch
        out = learner(images.to(device))  # logits over all base classes
        ce = cross_entropy(out.logits, labels.to(device))  # Eq. 2
        return ce + sum(out.losses.values()), {"ce": ce.item(), **{k: v.item() for k, v in out.losses.items()}}
    with measured(run, "backbone"):
        train_stage("base", learner, make_loader(run, run.base["train"], run.decoded["base"], args.batch_size),
                    plain_loss, args.epochs, args, device, run.log)
    save_prompt(run, learner, "prompt.pt", args.subsample, args.epochs, "base")
    return learner.learned_state()


# -----------------------------------------------------------------------------
# MAO: the base step (Eq. (4)-(6)) on the first half of the budget, then the new step (Eq. (7)-(8)) on the second

def run_mao(run, learner):
    """{'base': the base-step prompt (scores base classes), 'new': the new-step prompt (scores new classes)}."""
    stage = run.args.stage
    base = mao_base_step(run, learner) if stage in ("both", "base") else learner.learned_state()
    if stage not in ("both", "new"):
        return {"base": base, "new": None}
    with measured(run, "mao_new"):  # the teacher's text, the labelling and the training
        return {"base": base, "new": mao_new_step(run, learner, base)}


def mao_base_step(run, learner):
    """Hard-negative batches (Eq. (4)) and CE over the candidates in each batch only (Eq. (5)-(6)); the backbone's
    own other losses are kept unchanged."""
    args, device = run.args, run.device
    sampler = HardNegativeBatchSampler([y for _, y, _ in run.base["train"]], run.neighbours, args.anchors,
                                       seed=args.seed, distinct_anchors=bool(args.distinct_anchors),
                                       released=bool(args.released_batches))

    def base_step_loss(batch):
        images, labels, _ = batch
        labels = labels.to(device)
        candidates, targets = dynamic_candidates(labels, dedup=bool(args.ar_dedup))  # Eq. 5
        out = learner(images.to(device), candidates)  # text encoder runs for the candidates only
        ce = dynamic_candidate_loss(out.logits, targets)  # Eq. 6
        parts = {"ce": ce.item(), **{k: v.item() for k, v in out.losses.items()}, "cand": len(candidates)}
        return ce + sum(out.losses.values()), parts
    epochs = args.epochs if args.subsample == "all" else args.epochs // 2  # cross-dataset: base step only (A1)
    with measured(run, "mao_base"):
        train_stage("base", learner, make_loader(run, run.base["train"], run.decoded["base"], batch_sampler=sampler),
                    base_step_loss, epochs, args, device, run.log)
    save_prompt(run, learner, "base_prompt.pt", args.subsample, epochs, "base")
    return learner.learned_state()


def mao_new_step(run, learner, base_state):
    """The base-step prompt re-targeted to the new class names, trained on unlabeled new-class images with Top-1
    pseudo-labels of a frozen teacher (Eq. (7)) and CE over all new classes (Eq. (8))."""
    args, device = run.args, run.device
    learner.set_classnames(run.new_names)  # same learned tensors, new [CLASS] tokens
    if args.pseudo_labeler == "clip":
        teacher = ZeroShotCLIP(run.model, run.new_names, "a photo of a {}.")  # foundation CLIP (paper, Table 5)
    else:
        teacher = new_learner(run, run.new_names)
        teacher.load_learned(base_state)  # the frozen base-step prompt (official code)
        teacher.requires_grad_(False)
    labeler = PseudoLabeler(teacher)
    unlabeled = hide_labels(run.new["train"])  # the training loop never sees new-class labels
    hidden = torch.tensor([y for _, y, _ in run.new["train"]])  # kept aside for the agreement diagnostic only
    # the teacher is frozen, so the un-augmented views get the same labels whenever asked: labelled once per run.
    # They train the step with --pseudo_label_every epoch; either way their agreement is recorded
    once = labeler.label_dataset(test_loader(run.image_dir, unlabeled, run.test_tf, args.test_batch_size,
                                             args.workers, run.decoded["new"]), device)
    fixed = once.to(device) if args.pseudo_label_every == "epoch" else None
    hits = []  # diagnostic only, never part of the loss: the labels the step trained on, against the hidden ones

    def new_step_loss(batch):
        images, _, idx = batch  # the label slot holds -1: the images are unlabeled
        images = images.to(device)
        out = learner(images)  # logits over all new classes C_n
        with torch.no_grad():
            pseudo = fixed[idx.to(device)] if fixed is not None else labeler(images, out.frozen_image_features)  # Eq. 7
        ce = pseudo_label_loss(out.logits, pseudo)  # Eq. 8
        hits.append(pseudo.cpu() == hidden[idx])
        parts = {"ce": ce.item(), **{k: v.item() for k, v in out.losses.items()}, "pl_acc": hits[-1].float().mean().item()}
        return ce + sum(out.losses.values()), parts
    epochs = args.epochs - args.epochs // 2 if args.stage == "both" else max(1, args.epochs // 2)
    train_stage("new", learner, make_loader(run, unlabeled, run.decoded["new"], args.new_batch_size), new_step_loss,
                epochs, args, device, run.log)
    run.pseudo_labels = {"once_unaugmented": 100 * (once == hidden).float().mean().item(),
                         "used_in_training": 100 * torch.cat(hits).float().mean().item() if hits else None,
                         "mode": args.pseudo_label_every}
    run.log(f"pseudo-labels agree with the hidden labels: {run.pseudo_labels['used_in_training']:.1f} % of those "
            f"trained on ({'online, augmented views' if fixed is None else 'once, un-augmented views'}), "
            f"{run.pseudo_labels['once_unaugmented']:.1f} % on un-augmented views")
    save_prompt(run, learner, "new_prompt.pt", "new", epochs, "new")
    return learner.learned_state()


# -----------------------------------------------------------------------------
# DPC: stage 1 (the backbone alone, prompt P), then stage 2 (the parallel prompt P', dpc.py)

def run_dpc(run, learner):
    """Returns a fresh learner for evaluation and {'base', 'new'}: the weighting-decoupled prompts, and 'stage1': P."""
    args, device = run.args, run.device
    if args.init_from:
        run.log(f"DPC stage 1: prompt P from {args.init_from}")
    else:
        train_backbone(run, learner)
    dual = DualPrompt(learner, args.omega_b, args.dpc_param)  # P' = P at the start; P frozen inside
    views = torch.utils.data.DataLoader(ImageList(run.image_dir, run.base["train"], run.train_tf, run.decoded["base"]),
                                        batch_size=args.test_batch_size, num_workers=args.workers)
    ranking = ImageTextRanking(dual.learner, views, args.topk, device)  # the inner learner still holds P
    sampler = HardNegativeBatchSampler([y for _, y, _ in run.base["train"]], ranking, args.anchors, seed=args.seed,
                                       distinct_anchors=bool(args.distinct_anchors),
                                       released=bool(args.released_batches),
                                       fallback_high=max(1, len(run.base_names) - 2))  # the released CoOp+DPC range

    def dpc_loss(batch):
        images, labels, _ = batch
        return stage2_loss(dual, images.to(device), labels.to(device), bool(args.dpc_backbone_losses))
    with measured(run, "dpc_stage2"):
        train_stage("dpc", dual, make_loader(run, run.base["train"], run.decoded["base"], batch_sampler=sampler),
                    dpc_loss, args.dpc_epochs, args, device, run.log, lr=args.dpc_lr, aggregate=False)
    prompts = decoupled_prompts(dual, args.omega_b, args.omega_n, args.dpc_base_infer)
    learner = new_learner(run, run.base_names)  # the wrapped one is frozen; evaluation loads states into this one
    for name, key in (("parallel_prompt.pt", "parallel"), ("base_prompt.pt", "base"), ("new_prompt.pt", "new")):
        learner.load_learned(prompts[key])
        # new_prompt.pt scores classes not trained on: the new half, or a cross-dataset target's classes
        learner.set_classnames(run.new_names if key == "new" and run.new_names else run.base_names)
        save_prompt(run, learner, name, "new" if key == "new" else args.subsample, args.dpc_epochs, "dpc")
    return learner, {"base": prompts["base"], "new": prompts["new"], "stage1": dual.frozen_prompt()}


# -----------------------------------------------------------------------------
# Evaluation: base test with the prompt for base classes, new test with the prompt for new classes, HM

def evaluate_run(run, learner, states, train_seconds):
    """Base and new (or all-class) test accuracy, HM and the run's cost; results.json and the closing line."""
    args = run.args

    def acc(names, state, items, desc):
        learner.set_classnames(names)
        learner.load_learned(state)
        return accuracy(learner, test_loader(run.image_dir, items, run.test_tf, args.test_batch_size, args.workers),
                        run.device, desc)

    base_names, new_names, base_test, new_test = run.base_names, run.new_names, run.base["test"], run.new["test"]
    res = {"dataset": args.dataset, "backbone": args.backbone, "method": args.method, "seed": args.seed,
           "shots": args.shots, "protocol": "b2n" if args.subsample == "base" else "all",
           "stage": args.stage if args.method == "mao" else None, "recipe": args.recipe, "variant": args.variant,
           "toy_model": args.clip == "tiny", "train_seconds": train_seconds}
    if args.subsample == "all":  # the source accuracy of Table 2; targets: eval.py --ckpt OUT --datasets xd,dg
        res["all"] = acc(base_names, states["base"], base_test, "test all")
        if "stage1" in states:
            res["all_stage1"] = acc(base_names, states["stage1"], base_test, "test all (P)")
        res["line"] = f"all classes {res['all']:.2f}"
        return res
    res["base"] = acc(base_names, states["base"], base_test, "test base")
    if args.method == "dpc":
        res["new"] = acc(new_names, states["new"], new_test, "test new (omega_n mix)")
        res["base_stage1"] = acc(base_names, states["stage1"], base_test, "test base (P)")  # the backbone alone
        res["new_stage1"] = res["new"] if args.omega_n == 0 else acc(new_names, states["stage1"], new_test, "test new (P)")
    else:
        res["new_base_prompt"] = acc(new_names, states["base"], new_test, "test new (base prompt)")
        if states.get("new") is not None:  # MAO's new step
            res["new"] = acc(new_names, states["new"], new_test, "test new")
        elif args.method == "mao":  # base step only: the paper's "base step only" row (Table 8 (c))
            res["new"] = res["new_base_prompt"]
        else:
            res["new"] = res.pop("new_base_prompt")
    res["hm"] = harmonic_mean(res["base"], res["new"])
    line = f"base {res['base']:.2f} | new {res['new']:.2f} | HM {res['hm']:.2f}"
    if "new_base_prompt" in res:
        line += f" | new with base prompt {res['new_base_prompt']:.2f}"
    if "base_stage1" in res:
        line += f" | stage 1 (P): base {res['base_stage1']:.2f} new {res['new_stage1']:.2f}"
    res["line"] = line
    return res


def finish(run, res):
    """Write results.json atomically (its presence marks the run finished for sweep.py) and print the line."""
    args = run.args
    line = res.pop("line")
    res["cost"], res["args"] = run.cost, vars(args)
    if getattr(run, "pseudo_labels", None):
        res["pseudo_labels"] = run.pseudo_labels
    with open(os.path.join(args.out, "results.json.tmp"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    run.log(line + (" (toy model: not a result)" if args.clip == "tiny" else ""))
    run.log(f"wrote {os.path.join(args.out, 'results.json')}")
    return res


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {error_line(e)}")
