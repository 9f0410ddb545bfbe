"""Settings: what each paper sets, the flags, and the resolved arguments of a run.

An explicit flag beats the recipe (--recipe official: the released code's behaviours), which beats the
paper preset of (backbone, method), which beats DEFAULTS. Every preset below is data with its citation;
parse_args resolves them and refuses settings no run can use, naming the fix. docs/flags.md has the long
form of every flag."""
import argparse
import os

import torch

from clip_prompt import BACKBONES
from data import DATASETS, dataset_spec
from demo import DEMO_CLIP

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
                "precision", "workers", "test_batch_size", "out", "resume", "log_every", "cache_gb",
                "download", "recompute_text", "full_text"}

# -----------------------------------------------------------------------------
# Flags: one flat block, grouped as in the paper; the long form of each is in docs/flags.md

PARSER = ap = argparse.ArgumentParser(description="Prompt tuning alone, with MAO or with DPC.")
# -- data --
ap.add_argument("--dataset", default="dtd", help=f"one of {', '.join(DATASETS)}")
ap.add_argument("--root", default="data", help="folder of the datasets in the CoOp layout")
ap.add_argument("--download", action="store_true", help="fetch and lay out the dataset first (prepare.py)")
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
ap.add_argument("--dpc_ranker_ctx", choices=["trained", "init"], help="the teacher ranks with its trained context or "
                "(released) its initial one")
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
RAM_GB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
ap.add_argument("--cache_gb", type=float, default=round(RAM_GB / 4, 1), help="GB of decoded training images kept "
                "(default: a quarter of this machine's memory); the rest decode on every use; 0: all do")
ap.add_argument("--recompute_text", type=int, default=0, choices=[0, 1], help="1: the text tower's activations "
                "recomputed in the backward pass (same gradients, far less memory over many classes; docs/cost.md)")
ap.add_argument("--full_text", type=int, default=0, choices=[0, 1], help="1: CLIP's text tower at its own 77 "
                "positions, bit for bit the released code (0: the positions the prompts use; equal up to rounding)")
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
    for k in ("weight_decay", "warmup_epochs", "workers", "n_vis", "cache_gb"):
        if getattr(args, k) is not None and getattr(args, k) < 0:
            raise ValueError(f"--{k} {getattr(args, k)}: must be >= 0")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum {args.momentum}: SGD momentum lies in [0, 1)")
    if not (0 <= args.omega_b <= 1 and 0 <= args.omega_n <= 1):
        raise ValueError(f"--omega_b {args.omega_b} / --omega_n {args.omega_n}: DPC's weights lie in [0, 1]")


def well_formed(template):
    """One {} for the class name, and nothing else str.format would read."""
    try:
        return template.count("{}") == 1 and bool(template.format("x"))
    except (IndexError, KeyError, ValueError):
        return False


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
    if args.template is not None and not well_formed(args.template):
        raise ValueError(f"--template {args.template!r} needs one {{}} where the class name goes and no other brace "
                         f"(write {{{{ or }}}} for a literal one): 'a photo of a {{}}.'")
    if args.template is not None and args.backbone not in ("zsclip", "kgcoop"):
        raise ValueError(f"--template sets zero-shot CLIP's prompt and KgCoOp's frozen targets; {args.backbone} "
                         f"does not use it (its prompt is learned): leave it out")
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
    if args.best_val and args.dataset == "imagenet":
        raise ValueError("--best_val 1: CoOp's ImageNet has no val split apart from its test split, so the epoch "
                         "would be chosen on the test images: leave it out (--best_val 0)")
    if args.best_val and args.method in ("mao", "dept"):
        raise ValueError(f"--best_val 1 keeps the backbone's best epoch (alone, or DPC's stage 1); --method "
                         f"{args.method} trains its whole budget and keeps the last: leave it out")
    if args.gpa_mean > 0 and not args.gpa_std > 0:
        raise ValueError(f"--gpa_std {args.gpa_std}: GPA's Gaussian over the epochs needs a width > 0 (PromptSRC: 1); "
                         f"--gpa_mean 0 turns GPA off")
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
