"""MAO's Table 3, side by side: what a step of MAO and of DPC costs next to the backbone's own step.

    python bench.py                        # CoOp, Flowers102's shapes, a ViT-B/16-shaped CLIP
    python bench.py --backbone all         # every learner
    python bench.py --classes 51,500 --recompute_text   # time and memory against the class count
    python bench.py --quick                # a tiny CLIP and 2 repeats: a smoke run in seconds
    python bench.py --clip ViT-B/16        # real weights (the default on a GPU, when they load)

Every line is one optimizer step at the same images per step (B = b x K of the dataset's MAO setting):
  plain        the backbone alone: CE over all C_b base classes (Eq. (2))
  mao_base     MAO's base step: CE over the batch's candidates only (Eq. (5)-(6)), B distinct classes
  mao_new      MAO's new step with online pseudo-labels (Eq. (7)-(8)) over all C_n new classes
  mao_new_once the new step with labels computed once per run; their labelling pass (one frozen image
               forward per image) amortised over the new step's --new_epochs epochs
  dpc          DPC's stage 2: L_CL over one text row per image, P' substituted into the learner; plus its
               per-epoch ranking of every training image by P, amortised (b images per step)
  dept         DePT: the learner's CE and its CAT head's (C x E + C + 4 E more parameters), head at 6.5 x lr
and, per learner, inference images/s (MAO and DPC leave the network unchanged; only prompt values differ).
Times: median (min-max) over --repeats runs after a warm-up, the lines interleaved so drift hits all
alike; ratios to the plain step are taken run by run. Peak memory: CUDA max_memory_allocated; on a CPU the
torch profiler's allocation events give the step's own peak, added to the bytes of the live tensors.
Figures go to bench.json and bench.md; a whole run records its own cost per phase (results.json "cost").
"""
import argparse
import collections
import os
import platform
import resource
import statistics
import sys
import time

import clip
import torch
from clip.model import CLIP, convert_weights
from PIL import Image

from clip_prompt import TextPath, ZeroShotCLIP, build_learner, class_logits, class_texts, frozen_clip, load_clip
from config import DATASET_PRESETS, DEFAULTS, PRESETS
from dept import DePT, dept_loss
from dpc import DualPrompt, stage2_loss
from losses import cross_entropy, dynamic_candidate_loss, dynamic_candidates, pseudo_label_loss
from pseudolabel import PseudoLabeler
from data import BASE_TO_NEW, fewshot_splits, read_json, read_splits, scan
from report import NAMES, md_table
from rundir import write_json

SHAPES = {  # openai/CLIP's ViT-B/16 (as clip.load builds it), and a tiny one for smoke runs
    "vit-b16-shaped": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                           vision_patch_size=16, transformer_width=512, transformer_heads=8, transformer_layers=12),
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 transformer_width=64, transformer_heads=1, transformer_layers=2)}
CLASSES = {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
           "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101,
           "demo": 36}
LEARNERS = ["coop", "maple", "promptsrc", "ivlp", "cocoop", "kgcoop"]
LINES = {"plain": "backbone alone", "mao_base": "MAO base step", "mao_new": "MAO new step, online labels",
         "mao_new_once": "MAO new step, labels once per run", "dpc": "DPC stage 2 (+ ranking)",
         "dept": "DePT (learner and head)"}
PAPER_TABLE3 = ("Paper Table 3 (Flowers102, one RTX 3090): CoOp 8K params, 1103.7 MB, 22.0 s per epoch, "
                "767.7 FPS; CoOp+MAO 8K, 1176.9 MB (1.066x), 31.9 s per epoch (1.45x), 772.0 FPS.")

# -----------------------------------------------------------------------------
# Measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def stats(xs):
    return dict(min=min(xs), median=statistics.median(xs), max=max(xs), n=len(xs))


def live_bytes(*objs):
    """Bytes of the distinct tensor storages held by modules, optimizers and tensors."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()) + list(vars(o).values()):
                add(t)  # plain tensor attributes too (cached text features)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
        else:
            add(o)
    return total


def peak_bytes(fn, device):
    """Peak tensor bytes allocated while fn runs, above what was live before it. CUDA: the caching
    allocator's peak; CPU: the running sum of the profiler's allocation and free events."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile  # heavy to import: CPU only
    sys.stderr.flush()
    saved = os.dup(2)
    try:  # the profiler's C++ side logs a few lines on every start and stop; noise here
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    run = peak = 0
    for e in events:  # frees of older blocks are not reported: the step's own peak
        run += e.nbytes()
        peak = max(peak, run)
    return peak


# -----------------------------------------------------------------------------
# The steps, as closures over one learner's tensors

def step_lines(backbone, model, a, device):
    """{line: one optimizer step}, {line: learnable parameters}, and the live bytes."""
    cfg = dict(DEFAULTS, **PRESETS[(backbone, "mao")])
    kw = {k: cfg[k] for k in ("n_ctx", "ctx_init", "n_vis", "depth") if k in cfg}
    kw.update({k: cfg[k] for k in ("text_weight", "image_weight", "kg_weight") if k in cfg})
    kw["depth"] = min(kw["depth"], len(model.transformer.resblocks))
    B, R, g = a.batch or a.anchors * a.topk, model.visual.input_resolution, torch.Generator().manual_seed(0)
    dtype = model.dtype  # CLIP's own: conv1's (fp16 when converted; LayerNorms stay fp32)
    images = torch.randn(B, 3, R, R, generator=g).to(device, dtype)
    labels = torch.randperm(a.base_classes, generator=g)[:B].to(device)  # a hard-negative batch
    make = lambda names: build_learner(backbone, model, names, **kw)
    sgd = lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    # the class names differ from their first token on, as real ones do: only [SOS] and the context are shared
    learner = make([f"{i} texture number" for i in range(a.base_classes)])
    learner_new = make([f"{i} pattern number" for i in range(a.new_classes)])
    dual = DualPrompt(make(learner.classnames), 0.2)  # P' beside a frozen copy of P
    dept = DePT(make(learner.classnames)).to(device)  # the learner and its CAT head
    opt, opt_new, opt_dpc = sgd(learner), sgd(learner_new), sgd(dual)
    opt_dept = torch.optim.SGD(dept.param_groups(1e-6), lr=1e-6, momentum=0.9)  # head: 6.5 x lr
    labeler = PseudoLabeler(ZeroShotCLIP(model, learner_new.classnames))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    fixed = labeler(images)  # labels once per run: computed before the step, as train.py does

    def step(loss, out, opt):
        loss = loss + (sum(out.losses.values()) if out else 0)  # the backbone's own losses
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def plain():
        out = learner(images)
        step(cross_entropy(out.logits, labels), out, opt)  # Eq. 2 over all C_b

    def mao_base():
        candidates, targets = dynamic_candidates(labels)  # Eq. 5
        out = learner(images, candidates)
        step(dynamic_candidate_loss(out.logits, targets), out, opt)  # Eq. 6

    def mao_new():
        out = learner_new(images)
        pseudo = labeler(images, out.frozen_image_features)  # Eq. 7
        step(pseudo_label_loss(out.logits, pseudo), out, opt_new)  # Eq. 8

    def mao_new_once():
        out = learner_new(images)
        step(pseudo_label_loss(out.logits, fixed), out, opt_new)  # Eq. 8 with the stored labels

    def dpc():
        step(stage2_loss(dual, images, labels)[0], None, opt_dpc)

    def dept_step():
        step(dept_loss(dept, images, labels)[0], None, opt_dept)  # the learner's own losses inside

    @torch.no_grad()
    def infer(learner=learner, n=None):
        learner.eval()
        class_logits(learner, images[:n], class_texts(learner)).argmax(-1)
        learner.train()

    lines = dict(plain=plain, mao_base=mao_base, mao_new=mao_new, mao_new_once=mao_new_once, dpc=dpc,
                 dept=dept_step, label=lambda: labeler(images), rank=lambda: infer(dual.learner, a.anchors),
                 infer=infer)
    if backbone == "promptsrc":  # its frozen 60-template text target over the C_b classes, built on its own
        lines["target"] = lambda: (learner.set_classnames(learner.classnames), learner.text_target)
    for m in (learner, learner_new, dual, dept):
        m.train()
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    params = dict({k: count(learner) for k in LINES}, dept=count(dept))
    return lines, params, live_bytes(model, learner, learner_new, dual, dept, opt, opt_new, opt_dpc, opt_dept,
                                     images)


def bench_backbone(backbone, model, a, device, log):
    """The chosen lines (--lines) for one learner on each text path (--text), all timed interleaved, so that drift
    and the process's first allocations hit every line and path alike; returns the measurements of one path each."""
    lines, params, live = step_lines(backbone, model, a, device)
    need = {"mao_new_once": "label", "dpc": "rank"}  # the parts their times add
    lines = {k: fn for k, fn in lines.items() if k in a.lines or k in {need.get(x) for x in a.lines}}
    times = {(p, k): [] for p in a.text.split(",") for k in lines}
    for r in range(a.repeats + 1):  # run 0 is the warm-up
        for p, k in times:
            model.text_path = TextPath(p, a.recompute_text)
            t = once(lines[k], device)
            if r:
                times[p, k].append(t)
        log(f"  {backbone}: run {r}/{a.repeats}" + (" (warm-up)" if r == 0 else ""))
    out = []
    for path in a.text.split(","):  # each path's figures: each line's time, its ratio to the plain step's, its peak
        model.text_path, tp = TextPath(path, a.recompute_text), {k: times[path, k] for k in lines}
        # a run labels each unlabeled image once: one teacher pass per image over the new step's epochs
        if "label" in tp:
            tp["mao_new_once"] = [t + lab / a.new_epochs for t, lab in zip(tp["mao_new_once"], tp.pop("label"))]
        if "rank" in tp:
            tp["dpc"] = [t + rank for t, rank in zip(tp["dpc"], tp.pop("rank"))]  # + b ranked
        res = dict(backbone=backbone, classes=a.base_classes, learnable_params=params["plain"], lines={},
                   images_per_step=a.batch or a.anchors * a.topk, text=path)
        if "target" in tp:
            res["target_s"] = stats(tp.pop("target"))
        plain_peak = peak_bytes(lines["plain"], device)
        for k in [k for k in LINES if k in lines]:
            peak = plain_peak if k == "plain" else peak_bytes(lines[k], device)
            ratio = stats([t / p for t, p in zip(tp[k], tp["plain"])])
            res["lines"][k] = dict(params=params[k], step_s=stats(tp[k]), ratio_time=ratio,
                                   peak_mb=(live + peak) / 2**20, ratio_memory=(live + peak) / (live + plain_peak))
        if "infer" in tp:
            res["infer_images_per_s"] = stats([res["images_per_step"] / t for t in tp["infer"]])
        out.append(res)
    return out


def fmt(s, digits=3):
    return f"{s['median']:.{digits}g} ({s['min']:.{digits}g}-{s['max']:.{digits}g})"


def markdown(res):
    h, rows = res["header"], []
    for r in res["backbones"]:
        for k, L in r["lines"].items():
            infer = f"{r['infer_images_per_s']['median']:.1f}" if "infer_images_per_s" in r else "-"
            rows.append([r["backbone"], r["classes"], r.get("text", "77"), r["images_per_step"], LINES[k],
                         f"{L['params']:,}", f"{L['peak_mb']:.1f}", f"{L['ratio_memory']:.3f}x", fmt(L["step_s"]),
                         fmt(L["ratio_time"]) + "x", infer if k == "plain" else "same network"])
        if "target_s" in r:
            rows.append([r["backbone"], r["classes"], r["text"], "", "frozen text target (60 templates)", "", "",
                         "", fmt(r["target_s"]), "", ""])
    head = (f"Device {h['device']} ({h['cpu']}), torch {h['torch']}, {h['threads']} threads, CLIP {h['clip']} "
            f"({h['dtype']}); {h['dataset']} shapes: C_b = C_n = {h['classes']} classes, "
            f"b = {h['anchors']}, K = {h['topk']}, {h['images_per_step']} images per step; labels once "
            f"amortised over {h['new_epochs']} epochs; {h['repeats']} runs after a warm-up. Memory: "
            f"{h['memory_note']}.")
    table = md_table(["learner", "C_b", "text positions", "images", "step", "learnable params", "peak memory MB",
                      "memory x plain",
                      "time per step s, median (min-max)", "time x plain", "inference images/s"], rows)
    return "\n\n".join([head, table, PAPER_TABLE3])


def what_fits(paths):
    """Peak tensor GB of each step per dataset (its base classes), derived: a least-squares line through a step's
    fp32 runs at 2+ class counts (recomputed apart), times the fp16 / fp32 ratio an fp16 run measured."""
    runs = [(j["header"]["dtype"], (bool(j["header"].get("recompute_text")), r.get("text", "77")), r)
            for j in map(read_json, paths) for r in j["backbones"]]
    fp16 = {(r["backbone"], k, path[1], r["classes"]): L["peak_mb"] for d, path, r in runs if d == "float16"
            for k, L in r["lines"].items()}
    ref = {(r["backbone"], k, path, r["classes"]): L["peak_mb"] for d, path, r in runs if d == "float32"
           for k, L in r["lines"].items()}
    rows = []
    for b, k, (rc, text) in dict.fromkeys(key[:3] for key in ref):
        cs, ms = zip(*[(c, m) for (b2, k2, p2, c), m in ref.items() if (b2, k2, p2) == (b, k, (rc, text))])
        if len(set(cs)) < 2:  # one class count: no line to derive from
            continue
        slope = statistics.linear_regression(cs, ms).slope
        at = lambda c: statistics.mean(ms) + slope * (c - statistics.mean(cs))  # MB at c base classes
        ratio = next((m / ref[b, k, (False, text), c] for (b2, k2, t2, c), m in fp16.items() if (b2, k2, t2) ==
                      (b, k, text) and (b, k, (False, text), c) in ref), None)
        rows.append([b, text, LINES[k] + " (recomputed)" * rc] + [f"{at(c) / 1024:.1f} / " + (
            f"{at(c) * ratio / 1024:.1f}" if ratio else "-") for c in [(CLASSES[d] + 1) // 2 for d in BASE_TO_NEW]])
    return md_table(["learner", "text positions", "step"] + [f"{NAMES[d]} ({(CLASSES[d] + 1) // 2})"
                                                             for d in BASE_TO_NEW], rows)


def make_folder(root, classes, images, size=64):
    """A folder dataset (--dataset folder) of `images` JPEGs in `classes` class folders, each a noisy colour of
    its class: the shape of a large benchmark, for start-up and memory at scale (docs/cost.md)."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c:04d}"), exist_ok=True)
        colour = torch.rand(3, 1, 1, generator=g) * 255
        for i in range(c, images, classes):
            pixels = (colour + 40 * torch.randn(3, size, size, generator=g)).clamp(0, 255).byte().permute(1, 2, 0)
            Image.fromarray(pixels.numpy()).save(os.path.join(root, f"class_{c:04d}", f"{i:07d}.jpg"), quality=90)


def startup(root, threads):
    """Seconds of a run's start-up on a folder dataset (listing and splitting, few-shot sampling, checking every
    training image's header) and the process's peak RSS, as train.py does them before anything is written."""
    t = [time.perf_counter()]
    splits = read_splits("folder", root)[0]  # the first call lists the folders and writes split_folder.json
    t.append(time.perf_counter())
    shots = min(16, min(collections.Counter(y for _, y, _ in splits["train"]).values()))
    fewshot_splits("folder", root, shots, 1)
    t.append(time.perf_counter())
    scan(root, splits["train"], threads, desc="checking headers")
    t.append(time.perf_counter())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(images=sum(map(len, splits.values())), shots=shots, listing_s=t[1] - t[0], fewshot_s=t[2] - t[1],
                headers_s=t[3] - t[2], train_images=len(splits["train"]), peak_rss_mb=rss)


def load_model(a, device):
    """(model, name): real ViT-B/16 on a GPU when its weights load, else a ViT-B/16-shaped random
    CLIP (the cost does not depend on the weights); fp16 on a GPU in clip.load's layout."""
    if a.clip not in ("auto", *SHAPES):
        return load_clip(a.clip, device), a.clip
    if a.clip == "auto" and device.type == "cuda":
        try:
            return load_clip("ViT-B/16", device, "fp16"), "ViT-B/16"
        except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
            print(f"ViT-B/16 weights not loadable ({e}); using the ViT-B/16-shaped random CLIP")
    name = "vit-b16-shaped" if a.clip == "auto" else a.clip
    model = frozen_clip(CLIP(context_length=77, vocab_size=49408, **SHAPES[name]).to(device))
    if device.type == "cuda" or a.precision == "fp16":
        convert_weights(model)  # the paper's fp16 CLIP (LayerNorms stay fp32); on a CPU, slow but measurable
    return model, name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="coop", help=f"{', '.join(LEARNERS)}, a comma list, or all")
    ap.add_argument("--dataset", default="oxford_flowers", help=f"shapes of one of {', '.join(CLASSES)}")
    ap.add_argument("--clip", default="auto", help=f"auto, {', '.join(SHAPES)}, a CLIP name or a path")
    ap.add_argument("--quick", action="store_true", help="the tiny CLIP and 2 repeats: a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per line after one warm-up")
    ap.add_argument("--new_epochs", type=int, default=10, help="epochs labels once per run are spread over")
    ap.add_argument("--classes", help="base (and new) class counts to measure, e.g. 51,200,500,1000 (the dataset's)")
    ap.add_argument("--lines", default=",".join(LINES) + ",infer,target", help="the steps to time (default: all; "
                    "target: PromptSRC's frozen text target)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp16"], help="fp16: CLIP's layout on a CPU too")
    ap.add_argument("--recompute_text", action="store_true", help="text activations recomputed (train.py's)")
    ap.add_argument("--text", default="prefix,prompt,77", help="the text tower's paths, side by side: prefix "
                    "(train.py's default), prompt (every row to the largest [EOS]), 77 (--full_text 1)")
    ap.add_argument("--batch", type=int, help="images per step (default b x K of the dataset)")
    ap.add_argument("--fits", metavar="JSON,...", help="derive the 'what fits' table from saved fp32 / fp16 runs")
    ap.add_argument("--startup", metavar="DIR", help="time a run's start-up on the folder dataset DIR (made if absent)")
    ap.add_argument("--images", type=int, default=20_000, help="--startup: images it makes (100 classes)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench.json", help="results; the markdown goes beside it (.md)")
    a = ap.parse_args(argv)
    for k in ("repeats", "new_epochs", "batch", "images"):  # every flag checked before any work
        if getattr(a, k) is not None and getattr(a, k) < 1:
            ap.error(f"--{k} {getattr(a, k)}: must be >= 1")
    if set(a.text.split(",")) - {"prefix", "prompt", "77"}:
        ap.error(f"--text {a.text}: a comma list of prefix, prompt, 77")
    if a.device != "auto" and not (a.device == "cpu" or a.device.startswith("cuda") and torch.cuda.is_available()):
        ap.error(f"--device {a.device}: {'no CUDA GPU is visible here' if 'cuda' in a.device else 'cpu or cuda'}; "
                 f"use --device cpu (or auto)")
    if a.clip not in ("auto", *SHAPES, *clip.available_models()) and not os.path.isfile(a.clip):
        ap.error(f"--clip {a.clip}: no such file; give {', '.join(SHAPES)}, a CLIP name or an OpenAI .pt file")
    folder = os.path.dirname(os.path.abspath(a.out))
    if not (a.fits or a.startup or os.access(folder, os.W_OK)):
        ap.error(f"--out {a.out}: {folder} is not a folder this process can write to; give another --out")
    if a.fits:
        try:
            print(what_fits(a.fits.split(",")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--fits {a.fits}: each must be a JSON file bench.py --out wrote ({type(e).__name__}: {e})")
        return None
    if a.startup:
        if not os.path.isdir(a.startup):
            make_folder(a.startup, 100, a.images)
        res = startup(a.startup, os.cpu_count() or 1)
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
        return res
    backbones = LEARNERS if a.backbone == "all" else a.backbone.split(",")
    if set(backbones) - set(LEARNERS) or a.dataset not in CLASSES:
        ap.error(f"choose --backbone from {', '.join(LEARNERS)} or all, --dataset from {', '.join(CLASSES)}")
    n, a.lines = CLASSES[a.dataset], ["plain"] + a.lines.split(",")
    if a.classes and not all(c.isdigit() for c in a.classes.split(",")):
        ap.error(f"--classes {a.classes}: class counts, e.g. 51,500")
    counts = [int(c) for c in a.classes.split(",")] if a.classes else [(n + 1) // 2]
    preset = dict(DEFAULTS, **DATASET_PRESETS.get(a.dataset, {}))
    a.anchors, a.topk = preset["anchors"], preset["topk"]
    if min(counts) < a.anchors * a.topk:
        ap.error(f"--classes {a.classes}: a step's {a.anchors * a.topk} images have distinct classes; give >= that")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if a.quick:
        a.clip, a.repeats = "tiny", min(a.repeats, 2)
    model, name = load_model(a, device)
    header = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(), clip=name,
                  cpu=torch.cuda.get_device_name(device) if device.type == "cuda" else
                  (platform.processor() or platform.machine()),
                  dtype=str(model.dtype).replace("torch.", ""), dataset=a.dataset,
                  classes=",".join(map(str, counts)), anchors=a.anchors, topk=a.topk, recompute_text=a.recompute_text,
                  images_per_step=a.batch or a.anchors * a.topk, repeats=a.repeats, new_epochs=a.new_epochs,
                  memory_note="torch.cuda.max_memory_allocated" if device.type == "cuda" else
                  "live tensor bytes + the step's peak from torch profiler allocation events (not RSS)")
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    res = dict(header=header, backbones=[])
    for b in backbones:
        for a.base_classes in counts:  # C_n = C_b: the new step's classes grow alike
            a.new_classes = a.base_classes
            res["backbones"] += bench_backbone(b, model, a, device, print)
    table = markdown(res)
    print("\n" + table)
    write_json(res, a.out)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"Produced by: python bench.py {' '.join(sys.argv[1:] if argv is None else argv)}\n\n{table}\n")
    print(f"wrote {a.out} and {md}")
    return res


if __name__ == "__main__":
    main()
