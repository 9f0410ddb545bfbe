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
DPC | DePT} -> evaluation. docs/flags.md has every flag.
"""
import argparse
import copy
import errno
import fcntl
import glob
import math
import os
import random
import resource
import sys
import time
from collections import namedtuple
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from clip_prompt import BACKBONES, EncodeCounter, ZeroShotCLIP, build_learner, load_clip, phrase_context
from data import (DATASETS, ImageList, build_transforms, check_images, dataset_spec, decode_all,
                  error_line, fewshot_splits, hide_labels, read_splits, subsample_classes, write_json,
                  write_whole)
from demo import DEMO_CLIP, make_demo
from dept import DePT, dept_loss
from dpc import DualPrompt, ImageTextRanking, decoupled_prompts, stage2_loss
from eval import accuracy, load_checkpoint, load_teacher, test_loader
from losses import cross_entropy, dynamic_candidate_loss, dynamic_candidates, pseudo_label_loss
from pseudolabel import PseudoLabeler
from report import harmonic_mean
from sampler import HardNegativeBatchSampler, check_settings, class_neighbours

# -----------------------------------------------------------------------------
# Paper presets: an explicit flag beats the recipe, which beats the preset, which beats DEFAULTS

DEFAULTS = dict(epochs=20, lr=0.002, batch_size=32, n_ctx=4, ctx_init="a photo of a", anchors=4, topk=8,
                n_vis=4, depth=9, gpa_mean=0, gpa_std=0, best_val=0)
# MAO Table 1's baselines (and DPC's stage 1): MAO Supp. B runs every backbone "with unified epochs
# ep = 20 and learning rate lr = 0.002", batch 32; --baseline_recipe published: the authors' configs
MAO_BASELINE = dict(epochs=20, lr=0.002, batch_size=32)
SRC = dict(gpa_mean=15, gpa_std=1, text_weight=25.0, image_weight=10.0)  # PromptSRC's terms, GPA
PRESETS = {  # (backbone, method): what differs from DEFAULTS (BACKBONES.md §3-§12, MAO Supp. B)
    ("coop", "none"): dict(epochs=200),  # CoCoOp's vit_b16_ctxv1 base-to-new config (ImageNet: 50)
    ("coop", "mao"): dict(lr=0.0035),  # MAO: 10 + 10 epochs at lr 0.0035
    ("maple", "none"): dict(epochs=5, lr=0.0035, batch_size=4, n_ctx=2),  # its vit_b16_c2_ep5_batch4_2ctx
    ("maple", "mao"): dict(lr=0.0035, batch_size=4, n_ctx=2),
    ("promptsrc", "none"): dict(lr=0.0025, batch_size=4, **SRC),  # vit_b16_c2_ep20_batch4_4+4ctx
    ("promptsrc", "mao"): dict(lr=0.0035, batch_size=4, **SRC),
    ("ivlp", "none"): dict(lr=0.0025, batch_size=4),  # PromptSRC without self-regulation and GPA
    ("ivlp", "mao"): dict(lr=0.0035, batch_size=4),
    ("cocoop", "none"): dict(epochs=10, batch_size=1),  # vit_b16_c4_ep10_batch1_ctxv1
    ("cocoop", "mao"): dict(lr=0.0035),
    ("kgcoop", "none"): dict(epochs=100, batch_size=128, kg_weight=8.0),  # vit_b16_ep100_ctxv1
    ("kgcoop", "mao"): dict(lr=0.0035, kg_weight=8.0),
    # PromptKD (its vit_b16_c2_ep20_batch8_4+4ctx, base2new_train.sh): T = 1, KD weight 1000, the epoch best on
    # val kept (TEST.FINAL_MODEL best_val)
    ("promptkd", "none"): dict(lr=0.005, batch_size=8, kd_temperature=1.0, kd_weight=1000.0, best_val=1),
    ("promptkd", "mao"): dict(lr=0.0035, kd_temperature=1.0, kd_weight=1000.0),
    # DePT (Koorye/DePT's configs.py: 10 epochs, batch 4, lr 0.0035; its CoOp: 16 random context vectors; its
    # KgCoOp: W = 2; its CoCoOp: CoCoOp's vit_b16_c4_ep10_batch1_ctxv1); IVLP, PromptSRC: no released trainer
    ("coop", "dept"): dict(epochs=10, lr=0.0035, batch_size=4, n_ctx=16, ctx_init=""),
    ("cocoop", "dept"): dict(epochs=10, batch_size=1),
    ("kgcoop", "dept"): dict(epochs=10, lr=0.0035, batch_size=4, kg_weight=2.0),
    ("maple", "dept"): dict(epochs=10, lr=0.0035, batch_size=4, n_ctx=2),
    ("ivlp", "dept"): dict(epochs=10, lr=0.0035, batch_size=4),
    ("promptsrc", "dept"): dict(epochs=10, lr=0.0035, batch_size=4, **SRC),
}
# Cross-dataset / DG source runs (--subsample all): the published XD configs (BACKBONES.md §11.2);
# MAO trains its base step only, 5 epochs at lr 0.0035 (MAO Supp. B), on the XD structure (depth 3)
XD_STRUCTURE = {"maple": dict(depth=3), "promptsrc": dict(depth=3, gpa_mean=6, gpa_std=10), "ivlp": dict(depth=3)}
XD_ALONE = {"coop": dict(epochs=50), "maple": dict(epochs=2, lr=0.0026)}  # ep50_ctxv1, c2_ep2_2ctx_cross
PRESETS_ALL = {(b, m): dict(v, **XD_STRUCTURE.get(b, {}), **(dict(epochs=5, lr=0.0035) if m == "mao" else
                                                              XD_ALONE.get(b, {}) if m == "none" else {}))
               for (b, m), v in PRESETS.items()}
# MAO Supp. B / §4.4: anchors b and Top-K per dataset (b * K must not exceed the base classes)
DATASET_PRESETS = {"dtd": dict(anchors=2), "oxford_pets": dict(anchors=2), "eurosat": dict(anchors=2, topk=2),
                   "demo": dict(anchors=2)}
# Where MAO and DPC leave a choice: the papers' behaviour, or (--recipe official) the released code's
PAPER_BEHAVIOUR = dict(ar_dedup=1, pseudo_labeler="clip", released_batches=0, dpc_param="direct",
                       dpc_base_infer="mixed", dpc_backbone_losses=1, dpc_ranker="prompt",
                       dpc_vision_deep="stage1", dpc_text_deep="teacher", dpc_ranker_ctx="trained")
RELEASED_KD = dict(dpc_ranker="teacher", dpc_vision_deep="random", dpc_text_deep="trained", dpc_ranker_ctx="init")
RELEASED_BEHAVIOUR = dict(ar_dedup=0, distinct_anchors=0, pseudo_labeler="tuned", released_batches=1,
                          dpc_param="released", dpc_base_infer="parallel", dpc_backbone_losses=0, **RELEASED_KD)
# Flags that do not change what is learned; any other one away from its paper value makes a "variant"
# (results.json), tabulated apart from the paper setting (ablations, the --topk / --new_shots curves)
NOT_SETTINGS = {"dataset", "root", "seed", "backbone", "method", "subsample", "init_from", "teacher", "device",
                "precision", "workers", "test_batch_size", "out", "resume", "log_every", "cache_images"}
# Flags a resumed run may change: where things are and how fast they run, never what is learned
SYSTEM = {"root", "init_from", "device", "workers", "test_batch_size", "out", "resume", "log_every",
          "cache_images", "stage", "variant"}

# -----------------------------------------------------------------------------
# Flags: one flat block, grouped as in the paper; the long form of each is in docs/flags.md

PARSER = ap = argparse.ArgumentParser(description="Prompt tuning alone, with MAO or with DPC.")
# -- data --
ap.add_argument("--dataset", default="dtd", help=f"one of {', '.join(DATASETS)}")
ap.add_argument("--root", default="data", help="folder of the datasets in the CoOp layout")
ap.add_argument("--shots", type=int, default=16, help="labelled images per base class (16)")
ap.add_argument("--seed", type=int, default=1, help="seed of the few-shot split and training (1, 2, 3)")
ap.add_argument("--subsample", default="base", choices=["base", "all"], help="all: cross-dataset source run")
ap.add_argument("--template", help="the hand-made prompt, e.g. 'a photo of a {}.' (the dataset's)")
# -- model --
ap.add_argument("--backbone", default="coop", help=f"prompt learner: {', '.join(BACKBONES)}")
ap.add_argument("--clip", help="CLIP name or checkpoint (ViT-B/16; demo: weights/demo_clip.pt)")
ap.add_argument("--n_ctx", type=int, help="M: learnable context tokens (CoOp §3)")
ap.add_argument("--ctx_init", help="phrase initialising the context; '' for a random one")
ap.add_argument("--n_vis", type=int, help="vision prompt tokens (IVLP, PromptSRC)")
ap.add_argument("--depth", type=int, help="J: layers carrying prompts (MaPLe §3.2, PromptSRC)")
ap.add_argument("--text_weight", type=float, help="PromptSRC's L_SCL text weight (25)")
ap.add_argument("--image_weight", type=float, help="PromptSRC's L_SCL image weight (10)")
ap.add_argument("--kg_weight", type=float, help="lambda: KgCoOp's knowledge-guided loss weight (8)")
ap.add_argument("--gpa_mean", type=float, help="PromptSRC GPA mean epoch (15; 0 = off)")
ap.add_argument("--gpa_std", type=float, help="PromptSRC GPA std (1)")
ap.add_argument("--teacher", help="PromptKD's teacher: a PromptSRC run folder of this project")
ap.add_argument("--kd_temperature", type=float, help="T: PromptKD's distillation temperature (1)")
ap.add_argument("--kd_weight", type=float, help="PromptKD's KD loss weight (1000; Aircraft, Flowers, DTD 200)")
# -- MAO --
ap.add_argument("--method", default="mao", choices=["mao", "none", "dpc", "dept"], help="the plug-in, or none")
ap.add_argument("--stage", default="both", choices=["both", "base", "new"], help="MAO steps to run")
ap.add_argument("--baseline_recipe", default="mao", choices=["mao", "published"],
                help="recipe of the backbone alone: MAO Supp. B's, or its authors'")
ap.add_argument("--init_from", help="prompt checkpoint to start from (the new step: the base prompt)")
ap.add_argument("--topk", type=int, help="K: Top-K nearest classes of Eq. (4) (8; EuroSAT 2)")
ap.add_argument("--anchors", type=int, help="b: anchors per hard-negative batch (4; DTD, Pets, EuroSAT 2)")
ap.add_argument("--recipe", default="paper", choices=["paper", "official"], help="official: released code's")
ap.add_argument("--ar_dedup", type=int, choices=[0, 1], help="unique candidates of Eq. (5) (1)")
ap.add_argument("--distinct_anchors", type=int, choices=[0, 1], help="anchors of a batch differ in class")
ap.add_argument("--released_batches", type=int, choices=[0, 1], help="the released batch builder")
ap.add_argument("--minilm_bank", default="raw", choices=["raw", "spaced"], help="Eq. (4)'s class bank")
ap.add_argument("--pseudo_labeler", choices=["clip", "tuned"], help="teacher of Eq. (7) (clip)")
ap.add_argument("--pseudo_label_every", default="batch", choices=["batch", "epoch"], help="when to label")
ap.add_argument("--new_shots", type=int, help="S: unlabeled images per new class (--shots)")
ap.add_argument("--new_batch_size", type=int, default=32, help="new-step batch (32 = b x K)")
# -- DPC --
ap.add_argument("--omega_b", type=float, default=0.2, help="DPC's base-class weight of P' (0.2)")
ap.add_argument("--omega_n", type=float, default=0.0, help="DPC's new-class weight of P' (-> 0)")
ap.add_argument("--dpc_epochs", type=int, default=20, help="DPC stage-2 epochs (20)")
ap.add_argument("--dpc_lr", type=float, default=0.002, help="DPC stage-2 learning rate (0.002)")
ap.add_argument("--dpc_param", choices=["direct", "released"], help="how P' is updated (direct)")
ap.add_argument("--dpc_base_infer", choices=["mixed", "parallel"], help="base classes' prompt (mixed)")
ap.add_argument("--dpc_backbone_losses", type=int, choices=[0, 1], help="backbone losses beside L_CL (1)")
ap.add_argument("--dpc_ranker", choices=["prompt", "teacher"], help="DHNO's ranking: P, or PromptKD's teacher")
ap.add_argument("--dpc_ranker_ctx", choices=["trained", "init"], help="the teacher ranks with its context (released: init)")
ap.add_argument("--dpc_vision_deep", choices=["stage1", "random"], help="PromptKD: P''s deep vision prompts start "
                "(released: N(0, 0.02))")
ap.add_argument("--dpc_text_deep", choices=["teacher", "trained"], help="PromptKD: L_CL's deep text prompts: the "
                "teacher's (released: fresh ones, trained)")
# -- DePT --
ap.add_argument("--dept_weight", type=float, default=0.7, help="w: DePT's weight of its head (0.7)")
ap.add_argument("--dept_lr_scale", type=float, default=6.5, help="DePT head's lr multiple (6.5)")
# -- optim --
ap.add_argument("--epochs", type=int, help="epoch budget; MAO gives half to each step (20)")
ap.add_argument("--lr", type=float, help="SGD learning rate (0.002; MAO 0.0035)")
ap.add_argument("--batch_size", type=int, help="images per step of the backbone alone (32)")
ap.add_argument("--momentum", type=float, default=0.9)
ap.add_argument("--weight_decay", type=float, default=5e-4)
ap.add_argument("--warmup_epochs", type=int, default=1, help="constant warm-up epochs before the cosine")
ap.add_argument("--warmup_lr", type=float, default=1e-5)
ap.add_argument("--best_val", type=int, choices=[0, 1], help="keep the epoch best on the few-shot val split's base "
                "classes, not the last (PromptKD 1)")
# -- system --
ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
ap.add_argument("--precision", default="auto", choices=["auto", "fp16", "fp32"], help="frozen CLIP's")
ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
ap.add_argument("--cache_images", type=int, default=1, choices=[0, 1], help="decode training images once")
ap.add_argument("--test_batch_size", type=int, default=100)
ap.add_argument("--out", help="output folder (runs/<dataset>/<backbone>-<method>/shots<K>_seed<S>)")
ap.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint in --out")
ap.add_argument("--log_every", type=int, default=20, help="iterations between log lines")
del ap


def check_ranges(args):
    """Refuse numbers no run can use, before anything is written."""
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


def setting_changes(args, preset):
    """{flag: value} of every setting away from the paper's (the preset, else the default)."""
    paper = dict(preset, shots=16, new_shots=args.shots, stage=PARSER.get_default("stage"))
    if "distinct_anchors" not in paper:  # MAO: follows --ar_dedup (one text row per image: repeats)
        paper["distinct_anchors"] = args.ar_dedup if args.method == "mao" and args.ar_dedup is not None else 1
    if args.method in ("mao", "dept") or args.subsample == "all" or args.backbone in ("zsclip", "promptkd"):
        paper["baseline_recipe"] = args.baseline_recipe  # no backbone-alone training to change
    if args.method in ("none", "dept"):
        paper["recipe"] = args.recipe  # the backbone alone has no released MAO / DPC behaviour
    if args.subsample == "all":
        paper["stage"] = args.stage  # forced to the base step below
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS and v is not None
            and v != paper.get(k, PARSER.get_default(k)) and not (k == "clip" and v in ("ViT-B/16", DEMO_CLIP))}


def parse_args(argv=None):
    """Flags -> resolved arguments: presets filled in, impossible settings refused with the fix
    named. Nothing changes the arguments after this returns."""
    args = PARSER.parse_args(argv)
    args.dataset = dataset_spec(args.dataset)[0]  # an unknown name fails here
    if args.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{args.backbone}'. Choose one of: {', '.join(BACKBONES)}")
    check_ranges(args)
    if args.backbone == "zsclip":
        args.method = "none"  # nothing to train
    if args.backbone != "promptsrc" and (args.text_weight is not None or args.image_weight is not None):
        raise ValueError("--text_weight / --image_weight weight PromptSRC's self-regulating losses; use "
                         "--backbone promptsrc")
    if args.backbone != "kgcoop" and args.kg_weight is not None:
        raise ValueError("--kg_weight weights KgCoOp's knowledge-guided loss; use --backbone kgcoop")
    if (args.backbone == "promptkd") != bool(args.teacher) or (args.backbone != "promptkd" and (
            args.kd_weight is not None or args.kd_temperature is not None)):
        raise ValueError("--backbone promptkd goes with --teacher RUN (a PromptSRC run: python train.py "
                         "--backbone promptsrc --method none); --teacher, --kd_* belong to PromptKD alone")
    if args.backbone != "promptkd" and any(getattr(args, k) == v for k, v in RELEASED_KD.items()):
        raise ValueError(f"{', '.join(f'--{k} {v}' for k, v in RELEASED_KD.items())}: released PromptKD+DPC "
                         f"behaviours; only --backbone promptkd has them")
    if args.method == "dept" and args.backbone in ("zsclip", "promptkd"):
        raise ValueError(f"--method dept needs a learner with a prompt and class texts; not {args.backbone}")
    words = len((args.ctx_init if args.ctx_init is not None else DEFAULTS["ctx_init"]).split())
    if args.backbone in ("coop", "cocoop", "kgcoop") and args.n_ctx not in (None, words) and words:
        raise ValueError(f"--n_ctx {args.n_ctx}: CoOp's context has one vector per word of its init phrase "
                         f"({words}); add --ctx_init '' for {args.n_ctx} random vectors")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    stage1 = "none" if args.method == "dpc" else args.method  # DPC's stage 1 is the backbone alone
    presets = PRESETS_ALL if args.subsample == "all" else PRESETS
    preset = dict(DEFAULTS, **presets.get((args.backbone, stage1), {}),
                  **DATASET_PRESETS.get(args.dataset, {}), **PAPER_BEHAVIOUR)
    if args.recipe == "official":
        preset.update(RELEASED_BEHAVIOUR)
    if args.backbone == "promptkd" and args.dataset in ("fgvc_aircraft", "oxford_flowers", "dtd"):
        preset["kd_weight"] = 200.0  # base2new_train.sh
    if args.dataset == "imagenet":
        preset["best_val"] = 0  # CoOp's ImageNet has no val split apart from its test split
    if stage1 == "none" and args.subsample == "base" and args.baseline_recipe == "mao" and \
            args.backbone != "promptkd":  # MAO and DPC report PromptKD with its own recipe
        preset.update(MAO_BASELINE)
    elif (args.backbone, stage1) == ("coop", "none") and args.dataset == "imagenet":
        preset["epochs"] = 50  # vit_b16_ep50_ctxv1
    if args.recipe == "official" and args.subsample == "all" and args.method == "mao":
        preset["lr"] = 0.005  # the released ep5 cross-dataset configs (the paper says 0.0035)
    args.variant = setting_changes(args, preset)  # what this run changes from the paper setting
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.new_shots = args.new_shots or args.shots
    args.template = args.template or DATASETS[args.dataset]["template"]
    if args.distinct_anchors is None:
        args.distinct_anchors = args.ar_dedup if args.method == "mao" else 1
    if args.subsample == "all" and args.method == "mao":
        if args.stage == "new":
            raise ValueError("--subsample all trains every class with labels: there is no new step")
        args.stage = "base"
    if args.clip is None:
        args.clip = DEMO_CLIP if args.dataset == "demo" else "ViT-B/16"
        if args.dataset == "demo" and not os.path.isfile(DEMO_CLIP):
            raise FileNotFoundError(f"the demo CLIP {DEMO_CLIP} is missing: restore it with git checkout "
                                    f"weights/, or rebuild it with python demo.py")
    if args.method == "dpc" and args.dpc_param == "released" and args.omega_b == 0:
        raise ValueError("--dpc_param released divides the gradient by omega_b: it needs --omega_b > 0")
    if args.method == "mao" and args.epochs < 2 and args.stage == "both" and args.subsample == "base":
        raise ValueError(f"--epochs {args.epochs}: MAO splits the budget in two halves, so it needs 2")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "fp16" if args.device.startswith("cuda") else "fp32"
    args.out = args.out or os.path.join("runs", args.dataset if args.subsample == "base" else
                                        f"xd-{args.dataset}", f"{args.backbone}-{args.method}",
                                        f"shots{args.shots}_seed{args.seed}")
    if args.method == "mao" and args.stage == "new" and not args.init_from:
        args.init_from = os.path.join(args.out, "base_prompt.pt")  # the base step's, in --out
    return args


# -----------------------------------------------------------------------------
# Schedule, logging, checkpoints

def lr_at(epoch, epochs, args, lr=None):
    """Dassl's schedule: a constant warm-up at 1e-5, then the cosine over the budget."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return 0.5 * (lr or args.lr) * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / epochs))


def gpa_weights(epochs, mean, std):
    """PromptSRC's Gaussian prompt aggregation (§3.3): w_e proportional to N(e; mean, std^2) for
    epochs e = 1..E, summing to 1; the prompts end as sum_e w_e * (prompts after epoch e)."""
    w = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    return [x / sum(w) for x in w]


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak RSS (KB on Linux)


def make_log(path):
    """log(msg): printed above the progress bar and appended to path (log.txt)."""
    def log(msg):
        tqdm.write(msg)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log


class Meter:
    """What each phase of a run costs: frozen-CLIP encodings (EncodeCounter), seconds, and the
    seconds its training loop waited for the data loader: results.json's "cost"."""

    def __init__(self, model):
        self.counter, self.cost, self.resumed = EncodeCounter(model), {}, 0.0

    @contextmanager
    def phase(self, name):
        before, t0, extra = dict(self.counter.counts), time.time(), {}
        yield extra  # the phase may add its own figures (the loader's share)
        counts = {k: v - before[k] for k, v in self.counter.counts.items()}
        resumed = extra.pop("resumed_seconds", 0.0)  # spent by the process a --resume continues
        self.resumed += resumed
        self.cost[name] = dict(counts, seconds=time.time() - t0 + resumed, **extra)


def save_atomic(obj, path):
    """torch.save, whole or not at all; a failure as an OSError that names path."""
    try:
        write_whole(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:  # a full disk surfaces as RuntimeError from torch's writer
        raise OSError(getattr(e, "errno", None) or errno.EIO, f"writing failed ({str(e).splitlines()[0]})",
                      path) from None


def settings(args):
    """What shapes training: a resumed run must have the same."""
    return {k: v for k, v in vars(args).items() if k not in SYSTEM}


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


# -----------------------------------------------------------------------------
# One training stage: SGD + warm-up / cosine, an explicit epoch loop, a checkpoint after every epoch

def make_optimizer(learner, lr, args):
    """SGD over the trainable tensors; a learner may ask for groups at rates of their own (DePT)."""
    groups = learner.param_groups(lr) if hasattr(learner, "param_groups") else [
        {"params": [p for p in learner.parameters() if p.requires_grad], "lr": lr}]
    return torch.optim.SGD([dict(g, base_lr=g["lr"]) for g in groups], lr=lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


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
        ck = torch.load(last, map_location=device, weights_only=False)
        learner.load_learned(ck["learned"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start, gpa, best, stats = ck["epoch"] + 1, ck.get("gpa"), ck.get("best"), ck.get("stats", stats)
        log(f"[{stage}] resumed from {last}: " + (f"epoch {start + 1}/{epochs} next" if start < epochs
                                                   else f"all {epochs} epochs done"))
    resumed = stats["seconds"]
    n_it, t0, done = len(loader), time.time(), 0
    for epoch in range(start, epochs):
        t_epoch, load = time.time(), 0.0
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
                raise FloatingPointError(f"[{stage}] loss is {loss.item()} at epoch {epoch + 1} it {it + 1}: "
                                         f"try --precision fp32 or a smaller --lr (now {lr:g})")
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
                avg = " ".join(f"{k} {v / (it + 1):.3g}" for k, v in sums.items())
                log(f"[{stage}] ep {epoch + 1}/{epochs} | it {it + 1}/{n_it} | loss {loss.item():.4f} ({avg}) | "
                    f"lr {lr:.1e} | {(time.time() - t0) / done:.2f} s/it | eta {eta / 60:.1f}m | "
                    f"mem {memory_gb(device):.1f}G")
            t_wait = time.time()
        state = learner.learned_state()
        if weights is not None:  # GPA: per epoch, in fp32
            gpa = {k: (0 if gpa is None else gpa[k]) + weights[epoch] * v.float() for k, v in state.items()}
        if select is not None:
            score = select()
            log(f"[{stage}] ep {epoch + 1}/{epochs} | val accuracy {score:.2f}")
            if best is None or score > best[0]:  # a tie keeps the earlier epoch, as Dassl's is_best
                best = (score, epoch, state)
        stats = dict(seconds=stats["seconds"] + time.time() - t_epoch, load_seconds=stats["load_seconds"] + load,
                     steps=stats["steps"] + len(loader), sums={k: stats["sums"].get(k, 0.0) + v
                                                               for k, v in sums.items()})
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
    cost.update(load_seconds=stats["load_seconds"], resumed_seconds=resumed)
    return stats


# -----------------------------------------------------------------------------
# main: data -> frozen CLIP -> prompt learner -> {alone | MAO | DPC | DePT} -> evaluation

DEMO_NOTE = ("Toy world (README, 'The embedded demo'): a small CLIP pretrained here on synthetic captioned "
             "shapes, 36 colour-shape classes. Its numbers describe this task, not the paper's benchmarks.")
Data = namedtuple("Data", "image_dir base base_names new new_names distil decoded note")


def main(argv=None):
    args = parse_args(argv)
    with OutputLock(args) as lock:  # a folder holding another run, or in use, is refused first
        seed_everything(args.seed)
        data = load_data(args)  # bad input fails here, nothing written
        model = load_clip(args.clip, args.device, args.precision)
        loaders = Loaders(args, data, model.visual.input_resolution)
        learner = build_model(args, model, data)
        neighbours = mao_neighbours(args, data)
        log = start_output(args, data, learner, lock)
        meter, t_train = Meter(model), time.time()
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


def load_data(args):
    """The few-shot base classes (labelled) and the new classes (training images unlabeled); every
    image is checked now, so a broken one stops the run before anything is written."""
    if args.dataset == "demo" and not os.path.isdir(os.path.join(args.root, "demo")):
        print(f"writing the synthetic demo dataset to {make_demo(args.root)}")
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
    if not base["train"]:
        raise ValueError(f"{args.dataset} has no training images (a test-only dataset is an evaluation "
                         f"target: python eval.py --ckpt RUN --datasets {args.dataset})")
    if args.method == "mao" and args.stage in ("both", "new") and not new["train"]:
        raise ValueError("the new step needs unlabeled new-class training images; the new split is empty")
    distil = None  # PromptKD distils on every training image of every class, unlabeled, as released
    if args.backbone == "promptkd" and args.method in ("none", "dpc") and not args.init_from:
        distil = hide_labels(subsample_classes(read_splits(args.dataset, args.root)[0], "all")[0]["train"])
    sets = {"base": base["train"], "new": new["train"] if args.method == "mao" else [], "distil": distil or []}
    decoded, note = {k: None for k in sets}, None
    if args.cache_images:
        decoded = {k: decode_all(image_dir, v, args.workers) for k, v in sets.items()}
        mb = sum(im.width * im.height * 3 for v in decoded.values() for im in v) / 2**20
        note = (f"decoded the {sum(map(len, sets.values()))} training images once ({mb:.1f} MB in memory; "
                f"--cache_images 0 decodes them on every use)")
    else:
        for v in sets.values():
            check_images(image_dir, v)
    check_images(image_dir, base["test"] + new["test"])  # headers: a broken one fails now
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
                               data.base_names, model.visual.input_resolution)
    learner = new_learner(args, model, data.base_names, teacher)
    if args.init_from:
        if args.init_from == os.path.join(args.out, "base_prompt.pt") and not os.path.isfile(args.init_from):
            raise FileNotFoundError(f"--stage new needs the base-step prompt: give --init_from or run "
                                    f"--stage base first into {args.out}")
        learner.load_learned(load_checkpoint(args.init_from, args.device)["learned"])
    if args.method == "dpc" or (args.method == "mao" and args.stage in ("both", "base")):
        check_settings(len(data.base_names), args.anchors, args.topk)  # hard-negative batches
    return learner


def mao_neighbours(args, data):
    """MAO's Eq. (4) table, once per run, when its base step runs (else None)."""
    if args.method == "mao" and args.stage in ("both", "base"):
        return class_neighbours(data.base_names, args.topk, bank=args.minilm_bank)  # Eq. 4
    return None


class OutputLock:
    """Holds --out for one run: a lock the kernel drops with its process (a killed run never blocks
    --resume), and no second run into a folder that holds one: one folder, one run, never two mixed."""

    def __init__(self, args):
        self.args, self.file = args, None

    def __enter__(self):
        return self.claim()

    def __exit__(self, *exc):
        if self.file:
            self.file.close()  # also when the run fails: an in-process caller may go on

    def claim(self):
        args = self.args
        if self.file is not None or not os.path.isdir(args.out):
            return self
        self.file = open(os.path.join(args.out, ".lock"), "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid, self.file = self.file.read().strip(), self.file.close()
            raise ValueError(f"--out {args.out} is in use by a running train.py (pid {pid}): wait for it "
                             f"to end, or choose another --out") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        self.check_folder()
        return self

    def check_folder(self):
        args = self.args
        ckpts = sorted(glob.glob(os.path.join(args.out, "*_last.pt")))
        finished = os.path.isfile(os.path.join(args.out, "results.json"))
        if args.resume:
            for path in ckpts:
                old, new = torch.load(path, map_location="cpu", weights_only=False).get("settings", {}), settings(args)
                differ = [f"--{k} {old.get(k)} (now {new.get(k)})" for k in sorted(set(old) | set(new))
                          if old.get(k) != new.get(k)]
                if differ:
                    raise ValueError(f"--resume: {path} was trained with other settings: {', '.join(differ)}. "
                                     f"Resume with its flags (args.json there), or train into another --out")
            if finished:
                print(f"{args.out} holds a finished run: its stages are complete, so only evaluation runs again")
        elif args.stage == "new" and all("base_last" in p for p in ckpts):
            pass  # --stage new continues a --stage base run in the same folder
        elif finished or ckpts or os.path.isfile(os.path.join(args.out, "args.json")):
            what = "a finished run (results.json)" if finished else "a partial run"
            raise ValueError(f"--out {args.out} holds {what}: add --resume to "
                             f"{'re-evaluate' if finished else 'continue'} it, or choose another --out")


def start_output(args, data, learner, lock):
    """The output folder, log.txt and args.json: written only once every check has passed."""
    os.makedirs(args.out, exist_ok=True)
    lock.claim()
    for tmp in glob.glob(os.path.join(args.out, "*.tmp*")):  # what an interrupted write left behind
        os.remove(tmp)
    log = make_log(os.path.join(args.out, "log.txt"))
    if args.dataset == "demo" and args.clip == DEMO_CLIP:
        log(DEMO_NOTE)
    log(" ".join(f"{k}={v}" for k, v in vars(args).items()))
    write_json(vars(args), os.path.join(args.out, "args.json"))
    if data.note:
        log(data.note)
    nparams = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    log(f"{args.backbone} on {args.dataset}: {len(data.base_names)} "
        f"{'base' if args.subsample == 'base' else 'training'} / {len(data.new_names)} new classes, "
        f"{len(data.base['train'])} labelled training images, {nparams:,} learnable parameters, "
        f"{args.device} {args.precision}")
    return log


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


def hidden_label_agreement(items):
    """agreement(idx, pseudo): the share of a batch's pseudo-labels equal to the hidden labels."""
    hidden = torch.tensor([y for _, y, _ in items])
    return lambda idx, pseudo: (pseudo.cpu() == hidden[idx]).float().mean().item()


def pseudo_label_quality(args, labeler, data, loaders, stats, fixed, log):
    """How often the new step's pseudo-labels equal the hidden labels: those it trained on, and those
    of the un-augmented views."""
    device = torch.device(args.device)
    hidden = torch.tensor([y for _, y, _ in data.new["train"]])
    once = fixed.cpu() if fixed is not None else labeler.label_dataset(
        loaders.test(hide_labels(data.new["train"]), data.decoded["new"]), device)
    steps = stats["steps"]
    q = {"once_unaugmented": 100 * (once == hidden).float().mean().item(),
         "used_in_training": 100 * stats["sums"]["pl_acc"] / steps if steps else None,
         "mode": args.pseudo_label_every}
    trained = "-" if q["used_in_training"] is None else f"{q['used_in_training']:.1f} %"
    log(f"pseudo-labels agree with the hidden labels: {trained} of those trained on "
        f"({'online, augmented views' if fixed is None else 'once, un-augmented views'}), "
        f"{q['once_unaugmented']:.1f} % on un-augmented views")
    return q


# -----------------------------------------------------------------------------
# DPC: stage 1 (the backbone alone, prompt P), then stage 2 (the parallel prompt P', dpc.py)

def run_dpc(args, learner, data, loaders, meter, log):
    """(a fresh learner, {'base', 'new': the weighting-decoupled prompts, 'stage1': P})."""
    device = torch.device(args.device)
    if args.init_from:
        log(f"DPC stage 1: prompt P from {args.init_from}")
    else:
        train_backbone(args, learner, loaders, meter, log)
    kd = args.backbone == "promptkd"  # the released PromptKD+DPC (sple_promptkd.py) differs in three places
    if kd and args.dpc_text_deep == "trained":
        learner.own_text_prompts()  # its L_CL text encoder is a fresh one whose deep prompts train
    restart = [n for n in learner.learned_tensors() if kd and (n.startswith("text_prompts.") or (
        args.dpc_vision_deep == "random" and n.startswith("vis_prompts.")))]
    dual = DualPrompt(learner, args.omega_b, args.dpc_param, restart)  # P' = P at the start; P frozen inside
    views = torch.utils.data.DataLoader(ImageList(data.image_dir, data.base["train"], loaders.train_tf,
                                                  data.decoded["base"]),
                                        batch_size=args.test_batch_size, num_workers=args.workers)
    # DHNO ranks with frozen P (the inner learner holds it), or (--dpc_ranker teacher, PromptKD's released
    # ranking) with a copy of the teacher over the base classes, its context the initial one under
    # --dpc_ranker_ctx init (its released ranker names the context ctx_x: the trained one never loads)
    ranker = dual.learner
    if kd and args.dpc_ranker == "teacher":
        t = learner.teacher
        ranker = copy.deepcopy(t, {id(t.clip): t.clip})  # the CLIP shared, the class list its own
        ranker.set_classnames(data.base_names)
        if args.dpc_ranker_ctx == "init":
            ranker.ctx.data.copy_(phrase_context(t.clip, t.prefix, t.n_ctx))
    ranking = ImageTextRanking(ranker, views, args.topk, device)
    sampler = HardNegativeBatchSampler([y for _, y, _ in data.base["train"]], ranking, args.anchors,
                                       seed=args.seed, distinct_anchors=bool(args.distinct_anchors),
                                       released=bool(args.released_batches),  # its fallback: 1..C-2 as released
                                       fallback_high=max(1, len(data.base_names) - (1 if kd else 2)))  # KD: C-1

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
# Evaluation: base classes with the prompt for base classes, new ones with the prompt for new ones

def evaluate_run(args, learner, data, loaders, states):
    """Base and new (or all-class) test accuracy and HM, and the closing line."""
    device = torch.device(args.device)

    def acc(names, state, items, desc, alone=False):  # alone: DePT's learner without its head
        model = learner.learner if alone else learner
        model.set_classnames(names)
        model.load_learned(state)
        return accuracy(model, loaders.test(items), device, desc)

    res = {"dataset": args.dataset, "backbone": args.backbone, "method": args.method, "seed": args.seed,
           "shots": args.shots, "protocol": "b2n" if args.subsample == "base" else "all",
           "stage": args.stage if args.method == "mao" else None, "recipe": args.recipe, "variant": args.variant}
    base_test, new_test = data.base["test"], data.new["test"]
    if args.subsample == "all":  # Table 2's source; targets: eval.py
        res["all"] = acc(data.base_names, states["base"], base_test, "test all")
        if "stage1" in states:
            res["all_stage1"] = acc(data.base_names, states["stage1"], base_test, "test all (P)")
        res["line"] = f"all classes {res['all']:.2f}"
        return res
    res["base"] = acc(data.base_names, states["base"], base_test, "test base")
    if args.method == "dpc":
        res["new"] = acc(data.new_names, states["new"], new_test, "test new (omega_n mix)")
        res["base_stage1"] = acc(data.base_names, states["stage1"], base_test, "test base (P)")
        res["new_stage1"] = res["new"] if args.omega_n == 0 else acc(data.new_names, states["stage1"],
                                                                     new_test, "test new (P)")
    elif args.method == "dept":  # new classes: the learner's cosine logits alone
        res["new"] = acc(data.new_names, states["new"], new_test, "test new", alone=True)
    else:
        res["new_base_prompt"] = acc(data.new_names, states["base"], new_test, "test new (base prompt)")
        if states.get("new") is not None:  # MAO's new step
            res["new"] = acc(data.new_names, states["new"], new_test, "test new")
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


def finish(args, res, log):
    """Print the line, then write results.json whole (its presence marks the run finished)."""
    line, path = res.pop("line"), os.path.join(args.out, "results.json")
    log(line)  # printed first: a full disk below still leaves the accuracies on the screen
    write_json(res, path)
    log(f"wrote {path}")
    return res


def failure_line(e, argv):
    """The one line a failure ends in: what happened, to which file, and how to go on."""
    again = f"python train.py {' '.join(a for a in argv if a != '--resume')} --resume"
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted; continue with: {again}"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return (f"error: {e.filename}: {e.strerror}. Free space or make it writable (else start again with "
                f"another --out); then {again} continues from the last complete checkpoint")
    return f"error: {error_line(e)}"


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyboardInterrupt) as e:
        sys.exit(failure_line(e, sys.argv[1:]))
