"""What MAO and DPC cost next to their backbones, measured in one process on one device (MAO §4.3, Table 3).

    python bench.py                            # every part on this device (a ViT-B/16-shaped CLIP; CPU: ~15 min)
    python bench.py --parts data,units,run_cost    # the data side and the cost of whole runs (CPU: ~3 min)
    python bench.py --backbone all --parts steps   # the per-step table for CoOp, MaPLe and PromptSRC
    python bench.py --quick                    # tiny CLIP, few repeats: a smoke run in seconds
    python bench.py --clip ViT-B/16            # real weights (the default on a GPU when they can be loaded)

Parts (--parts, all by default):
  data      the images/s the training loader delivers, per worker and with all workers, for the plain loader and
            MAO's base-step loader, on real-size JPEGs made here (DTD-like 640x640, ImageNet-like 500x375), decoding
            on every use and decoding once per run (train.py --cache_images); set against what the model consumes
            (measured here on a GPU; on a CPU the paper's 770 images/s at inference, a floor)
  units     seconds per image and per token sequence through frozen CLIP, forward only and forward + backward
  run_cost  the image and text encodings of one whole run, per dataset x backbone x method at the paper's settings
            (real class counts, b, K, epochs, batches built by the real sampler), known before the run starts;
            times the unit costs, an estimate of the run's encoder time (train.py records the same counts, measured)
  steps     one optimizer step at equal images per step: plain / MAO base / MAO new, peak memory, sampler, inference
Times are min / median / max over --repeats interleaved runs after a warm-up. Peak memory: CUDA max_memory_allocated;
on CPU the torch profiler's allocation events give the step's own peak, added to the bytes of the live tensors.
Results go to bench.json and bench.md.
"""
import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from clip_prompt import (CoOp, EncodeCounter, IVLP, ZeroShotCLIP, build_learner, build_tiny_clip, class_logits,
                         class_texts, convert_weights, load_clip)
from data import ImageList, build_transforms, decode_all
from losses import cross_entropy, dynamic_candidate_loss, dynamic_candidates, pseudo_label_loss
from pseudolabel import PseudoLabeler
from sampler import HardNegativeBatchSampler
from train import DATASET_PRESETS, DEFAULTS, PRESETS, parse_args

# (classes, base test images, new test images) of the CoOp splits, counted in the real split files (ImageNet, Food101
# and SUN397: 50, 300 and 50 test images per class); the base half is the first ceil(n/2) classes
DATASET_SIZES = {"imagenet": (1000, 25000, 25000), "caltech101": (100, 1549, 916), "oxford_pets": (37, 1881, 1788),
                 "stanford_cars": (196, 4002, 4039), "oxford_flowers": (102, 1053, 1410), "food101": (101, 15300, 15000),
                 "fgvc_aircraft": (100, 1666, 1667), "sun397": (397, 9950, 9900), "dtd": (47, 864, 828),
                 "eurosat": (10, 4200, 3900), "ucf101": (101, 1934, 1849), "demo": (36, 450, 450)}
PAPER_TABLE3 = dict(params="8K / 8K", memory_mb=(1103.7, 1176.9), epoch_s=(22.0, 31.9), fps=(767.7, 772.0))
PAPER_FPS = 770  # images/s at inference on one RTX 3090 (MAO Table 3): the floor of what a GPU consumes

# -----------------------------------------------------------------------------
# Measuring

def vit_b16_shaped():
    """openai/CLIP's ViT-B/16 architecture with random weights (what clip.load('ViT-B/16') builds)."""
    from clip.model import CLIP
    return CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12).eval().requires_grad_(False)


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
    """Bytes of the distinct tensor storages held by modules, optimizers, tensors and lists of them."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
            for v in vars(o).values():  # plain tensor attributes (e.g. cached text features)
                add(v)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
        else:
            add(o)
    return total


def peak_bytes(fn, device):
    """Peak tensor bytes allocated while fn runs, above what was live before it.
    CUDA: the caching allocator's peak; CPU: the running sum of the profiler's allocation/free events."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    sys.stderr.flush()
    saved = os.dup(2)
    try:  # the profiler's C++ side logs a few lines on every start/stop; they are noise here
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
    for e in events:  # frees of blocks allocated before profiling are not reported, so this is the step's own
        run += e.nbytes()
        peak = max(peak, run)
    return peak




# -----------------------------------------------------------------------------
# Part 1, data: what the training loader delivers, against what the model consumes

def photo(w, h, rng):
    """A photo-like RGB image (smooth structure plus texture): its JPEG is about as large as a real photo's."""
    base = rng.normal(size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    im = Image.fromarray(((base - base.min()) / np.ptp(base) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return Image.fromarray((np.asarray(im, np.float32) + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8))


def make_jpegs(folder, classes, per_class, size, seed=0):
    """classes x per_class JPEGs (quality 90) under folder; returns them as few-shot items (relpath, label, name)."""
    rng = np.random.default_rng(seed)
    pool = [photo(*size, rng) for _ in range(min(16, classes * per_class))]  # distinct contents, re-encoded per file
    items = []
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"c{c}"), exist_ok=True)
        for k in range(per_class):
            rel = f"c{c}/{k}.jpg"
            pool[(c * per_class + k) % len(pool)].save(os.path.join(folder, rel), quality=90)
            items.append((rel, c, f"c{c}"))
    return items


def loader_rate(image_dir, items, transform, sampler, workers, decoded, max_images):
    """Images/s that training batches arrive at, over passes of the loader (worker start-up included, as in
    train.py, which starts fresh workers every epoch) until max_images have arrived."""
    ds = ImageList(image_dir, items, transform, decoded)
    if sampler is None:
        loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, drop_last=True, num_workers=workers)
    else:
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
    t, n, epoch = time.perf_counter(), 0, 0
    while n < max_images:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for images, _, _ in loader:
            n += len(images)
            if n >= max_images:
                break
        epoch += 1
    return n / (time.perf_counter() - t)


def bench_data(a, log):
    """Loader images/s for DTD-like and ImageNet-like JPEGs: plain and MAO base-step loaders, decoding on every use
    and decoding once, with one worker and with --workers workers."""
    shapes = {"dtd-like 640x640": ((640, 640), 24, 2, 8), "imagenet-like 500x375": ((500, 375), 48, 4, 8)}
    out, tf = {}, build_transforms(224)[0]  # CoOp's training augmentation at ViT-B/16's resolution
    with tempfile.TemporaryDirectory() as tmp:
        for name, (size, classes, b, K) in shapes.items():
            items = make_jpegs(os.path.join(tmp, name.split()[0]), classes, a.data_shots, size)
            kb = sum(os.path.getsize(os.path.join(tmp, name.split()[0], r)) for r, _, _ in items) / len(items) / 1e3
            t = time.perf_counter()
            decoded = decode_all(os.path.join(tmp, name.split()[0]), items, a.workers)
            decode_s = time.perf_counter() - t
            table = torch.stack([torch.cat([torch.tensor([c]), torch.randperm(classes)[torch.randperm(classes) != c]
                                            [:K - 1]]) for c in range(classes)])
            rows = {}
            for loader in ("plain", "mao_base"):
                for cache in (0, 1):
                    for w in sorted({1, a.workers}):
                        sampler = None if loader == "plain" else HardNegativeBatchSampler(
                            [y for _, y, _ in items], table, b, seed=0)
                        rows[f"{loader}|{cache}|{w}"] = loader_rate(os.path.join(tmp, name.split()[0]), items, tf,
                                                                    sampler, w, decoded if cache else None, a.data_images)
                        log(f"  data {name}: {loader} loader, decode {'once' if cache else 'every use'}, {w} "
                            f"worker(s): {rows[f'{loader}|{cache}|{w}']:.0f} images/s")
            out[name] = dict(images=len(items), jpeg_kb=kb, decode_once_s=decode_s, b=b, K=K, rates=rows,
                             cache_mb=sum(im.width * im.height * 3 for im in decoded) / 2**20)
    return out


# -----------------------------------------------------------------------------
# Part 2, units: seconds per image and per token sequence through frozen CLIP

def unit_costs(model, a, device, log):
    """Forward only, and forward + backward through prompts: images with IVLP's deep vision prompts (the prompted
    encoders of MaPLe, IVLP and PromptSRC cost alike), token sequences with CoOp's context."""
    R, n = model.visual.input_resolution, a.unit_batch
    depth = min(9, len(model.visual.transformer.resblocks), len(model.transformer.resblocks))
    images = torch.randn(n, 3, R, R, generator=torch.Generator().manual_seed(0)).to(device, model.dtype)
    names = [f"class number {i}" for i in range(n)]
    coop = CoOp(model, names).to(device)
    ivlp = IVLP(model, names, n_vis=4, depth_text=depth, depth_vis=depth).to(device)

    def img():
        with torch.no_grad():
            model.encode_image(images)

    def txt():
        with torch.no_grad():
            coop.encode_text()

    fns = dict(image=img, image_grad=lambda: ivlp.encode_image(images).float().sum().backward(),
               text=txt, text_grad=lambda: coop.encode_text().sum().backward())
    times = {k: [] for k in fns}
    for r in range(a.repeats + 1):
        for k, fn in fns.items():
            t = once(fn, device)
            if r:
                times[k].append(t / n)
    out = {k: stats(v) for k, v in times.items()}
    log("  units (ms): " + ", ".join(f"{k} {1e3 * v['median']:.3g}" for k, v in out.items()))
    return out


# -----------------------------------------------------------------------------
# Part 3, run_cost: every encoding of one run, phase by phase, known before it runs

VISION_PROMPTED = {"maple", "ivlp", "promptsrc"}  # a prompted image encoder: images get a backward pass too
PER_IMAGE_TEXT = {"cocoop"}  # class texts depend on the image: B images against C' classes encode B x C' sequences
ALL_CLASS_TEXT = {"promptsrc", "kgcoop"}  # their own losses need every class's text on every training step
TEXT_TARGETS = {"promptsrc": 60, "kgcoop": 1}  # frozen text targets per class, once per list of class names


def counts(images=0, images_grad=0, texts=0, texts_grad=0):
    return dict(images=images, images_grad=images_grad, texts=texts, texts_grad=texts_grad)


def add(*cs):
    return {k: sum(c[k] for c in cs) for k in counts()}


def learner_step(backbone, B, H, C):
    """One training forward of a learner: B images scored against H requested classes out of C."""
    texts = B * H if backbone in PER_IMAGE_TEXT else C if backbone in ALL_CLASS_TEXT else H
    frozen = B if backbone == "promptsrc" else 0  # its frozen image pass (targets of its image and KL terms)
    return counts(B + frozen, B if backbone in VISION_PROMPTED else 0, texts, texts)


def scoring(backbone, n_images, C):
    """n images scored against all C classes without gradients: class texts once, or per image (CoCoOp)."""
    return counts(images=n_images, texts=n_images * C if backbone in PER_IMAGE_TEXT else C)


def steps_of_loader(n_items, batch_size):
    """(images per step, steps per epoch) of train.py's shuffled loader (last partial batch dropped)."""
    return (batch_size, n_items // batch_size) if n_items >= batch_size else (n_items, 1)


def sampler_batches(args, n_classes, shots, table, epochs, dpc=False):
    """(B', H) of every hard-negative batch of a run: the real sampler on the few-shot labels, seed and epochs."""
    labels = [c for c in range(n_classes) for _ in range(shots)]
    s = HardNegativeBatchSampler(labels, table, args.anchors, seed=args.seed,
                                 distinct_anchors=bool(args.distinct_anchors), released=bool(args.released_batches),
                                 fallback_high=max(1, n_classes - 2) if dpc else None)
    out = []
    for e in range(epochs):
        s.set_epoch(e)
        for batch in s:
            ys = [labels[i] for i in batch]
            out.append((len(ys), len(set(ys)) if args.ar_dedup and not dpc else len(ys)))
    return out


def run_cost(dataset, backbone, method, table, sizes=None, extra=()):
    """{phase: counts} of one train.py run, as its results.json 'cost' will record them, before it runs.

    table: the (C_b, K) neighbour table the hard-negative batches are built from (Eq. (4)). DPC ranks per image with
    the trained prompt, which cannot be known in advance: the same table stands in, so DPC's stage 2 is an estimate.
    sizes: (classes, base test images, new test images); default DATASET_SIZES. extra: more train.py flags."""
    args = parse_args(["--dataset", dataset, "--backbone", backbone, "--method", method, *extra])
    n, Tb, Tn = sizes or DATASET_SIZES[args.dataset]
    Cb, Cn = (n + 1) // 2, n // 2
    Nb, Nn = args.shots * Cb, args.new_shots * Cn
    target = lambda C: counts(texts=TEXT_TARGETS.get(backbone, 0) * C)
    phases = {}
    if backbone != "zsclip" and method in ("none", "dpc"):  # the backbone alone (DPC's stage 1)
        B, steps = steps_of_loader(Nb, args.batch_size)
        phases["backbone"] = add(target(Cb), *[learner_step(backbone, B, Cb, Cb)] * (steps * args.epochs))
    if method == "mao":
        base = sampler_batches(args, Cb, args.shots, table, args.epochs // 2)
        phases["mao_base"] = add(target(Cb), *[learner_step(backbone, B, H, Cb) for B, H in base])
        phases["mao_new"] = mao_new_cost(args, backbone, Cn, Nn, target(Cn))
    if method == "dpc":
        rank = scoring(backbone, Nb, Cb)  # each epoch: every training image against every class, no gradients
        stage2 = sampler_batches(args, Cb, args.shots, table, args.dpc_epochs, dpc=True)
        phases["dpc_stage2"] = add(*[rank] * args.dpc_epochs, *[learner_step(backbone, B, B, Cb) for B, _ in stage2])
    twice_new = method == "mao" or (method == "dpc" and args.omega_n != 0)  # a second pass over the new test set
    twice_base = method == "dpc"  # DPC also scores the base classes with P alone
    phases["evaluation"] = add(*[scoring(backbone, Tb, Cb)] * (1 + twice_base),
                               *[scoring(backbone, Tn, Cn)] * (1 + twice_new))
    return phases


def mao_new_cost(args, backbone, Cn, Nn, target):
    """The new step: the teacher's text once, pseudo-labels (online, or once on the unlabeled set), training."""
    B, steps = steps_of_loader(Nn, args.new_batch_size)
    epochs = args.epochs - args.epochs // 2
    tuned = args.pseudo_labeler == "tuned"
    per_image = tuned and backbone in PER_IMAGE_TEXT  # such a teacher scores each image with its own forward
    plain_teacher = not tuned or backbone not in VISION_PROMPTED  # the teacher's image encoder is frozen CLIP's
    hands_over = backbone not in VISION_PROMPTED or backbone == "promptsrc"  # the student's frozen CLIP features
    online = args.pseudo_label_every == "batch" and (per_image or not (plain_teacher and hands_over))
    label = lambda n: counts(images=n, texts=n * Cn) if per_image else counts(images=n)
    # labelled once on un-augmented views (at least as the agreement diagnostic), and per batch when online
    # labels need their own image pass
    labels = add(label(Nn), label(B * steps * epochs) if online else counts())
    return add(counts() if per_image else counts(texts=Cn), labels, target,
               *[learner_step(backbone, B, Cn, Cn)] * (steps * epochs))


def seconds(c, units):
    """An estimate of encoder time: every count times its unit cost (median)."""
    u = {k: v["median"] for k, v in units.items()}
    return ((c["images"] - c["images_grad"]) * u["image"] + c["images_grad"] * u["image_grad"]
            + (c["texts"] - c["texts_grad"]) * u["text"] + c["texts_grad"] * u["text_grad"])


def neighbour_table(dataset, K, names=None):
    """MiniLM's Eq. (4) table when the base class names are known (--splits, or the dataset under --root), else a
    random one with each class first (then the batch sizes are those of unrelated neighbours)."""
    n = DATASET_SIZES[dataset][0]
    Cb = (n + 1) // 2
    if names:
        from sampler import class_neighbours
        return class_neighbours(names[:Cb], K), "MiniLM"
    g = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.tensor([c]), (c + 1 + torch.randperm(Cb - 1, generator=g)[:K - 1]) % Cb])
            for c in range(Cb)]
    return torch.stack(rows), "random"


def base_names(dataset, splits_dir):
    """The class names in label order from a folder of CoOp split files (shared/data/coop_splits layout)."""
    from data import DATASETS, read_classnames
    spec = DATASETS[dataset]
    try:
        if spec["split"].endswith(".json"):
            with open(os.path.join(splits_dir, spec["split"])) as f:
                return [c for _, c in sorted({(y, c) for _, y, c in json.load(f)["train"]})]
        if spec["split"] == "fgvc":
            with open(os.path.join(splits_dir, "fgvc_aircraft", "variants.txt")) as f:
                return [x.strip() for x in f if x.strip()]
        return list(read_classnames(os.path.join(splits_dir, "imagenet", "classnames.txt")).values())
    except OSError:
        return None


def bench_run_cost(a, units, log):
    """run_cost for every dataset x backbone x method, with the estimated encoder time on this device."""
    out = []
    for ds in a.cost_datasets:
        K = dict(DEFAULTS, **DATASET_PRESETS.get(ds, {}))["topk"]
        table, source = neighbour_table(ds, K, base_names(ds, a.splits) if a.splits else None)
        for bb in a.cost_backbones:
            for m in ("none", "mao", "dpc"):
                phases = run_cost(ds, bb, m, table)
                total = add(*phases.values())
                out.append(dict(dataset=ds, backbone=bb, method=m, table=source, phases=phases, total=total,
                                seconds=seconds(total, units),
                                per_phase_seconds={k: seconds(v, units) for k, v in phases.items()}))
        log(f"  run cost: {ds} done ({source} neighbour table)")
    return out
# -----------------------------------------------------------------------------
# Part 4, steps: one optimizer step of each kind at equal images per step

def step_lines(backbone, model, a, device):
    """The steps the table times, as closures over one backbone's learners, plus what memory accounting needs."""
    cfg = dict(DEFAULTS, **PRESETS[(backbone, "mao")])
    kw = dict(n_ctx=cfg["n_ctx"], ctx_init=cfg["ctx_init"], n_vis=cfg["n_vis"], depth=cfg["depth"])
    base_names = [f"texture number {i}" for i in range(a.base_classes)]
    new_names = [f"pattern number {i}" for i in range(a.new_classes)]
    B, R = a.anchors * a.topk, model.visual.input_resolution
    g = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    images = torch.randn(B, 3, R, R, generator=g).to(device, dtype)
    labels = torch.randperm(a.base_classes, generator=g)[:B].to(device)  # a hard-negative batch: distinct classes
    kw.update(text_weight=cfg.get("text_weight", 25.0), image_weight=cfg.get("image_weight", 10.0),
              kg_weight=cfg.get("kg_weight", 8.0))
    learner = build_learner(backbone, model, base_names, **kw)
    params = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    learner_new = build_learner(backbone, model, new_names, **kw)
    opt_new = torch.optim.SGD([p for p in learner_new.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    labeler = PseudoLabeler(ZeroShotCLIP(model, new_names))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(loss, out, opt):
        loss = loss + sum(out.losses.values())  # the backbone's own other losses (PromptSRC), the same in every line
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def plain():
        out = learner(images)
        step(cross_entropy(out.logits, labels), out, opt)  # Eq. 2 over all C_b

    def base():
        cand, target = dynamic_candidates(labels)  # Eq. 5
        out = learner(images, cand)
        step(dynamic_candidate_loss(out.logits, target), out, opt)  # Eq. 6

    def new():
        out = learner_new(images)
        pseudo = labeler(images, out.frozen_image_features)  # Eq. 7
        step(pseudo_label_loss(out.logits, pseudo), out, opt_new)  # Eq. 8

    fixed = labeler(images)  # --pseudo_label_every epoch: labels of un-augmented views, once per run

    def new_cached():
        out = learner_new(images)
        step(pseudo_label_loss(out.logits, fixed), out, opt_new)  # Eq. 8 with the stored labels

    def label():
        labeler(images)  # the teacher's own frozen image pass (Eq. 7), paid once per image per run

    infer_images = torch.randn(a.infer_batch, 3, R, R, generator=g).to(device, dtype)

    @torch.no_grad()
    def infer():
        learner.eval()
        class_logits(learner, infer_images, class_texts(learner)).argmax(-1)
        learner.train()

    nb = torch.stack([torch.randperm(a.base_classes, generator=g)[:a.topk] for _ in range(a.base_classes)])
    nb[:, 0] = torch.arange(a.base_classes)
    sampler = HardNegativeBatchSampler([y for y in range(a.base_classes) for _ in range(16)], nb, a.anchors)

    def sample_epoch():
        for _ in sampler:
            pass

    learner.train(), learner_new.train()
    lines = dict(plain=plain, base=base, new=new, new_cached=new_cached, label=label, sampler=sample_epoch, infer=infer)
    live = live_bytes(model, learner, learner_new, opt, opt_new, labeler.text_features, images)
    return lines, dict(params=params, B=B, live=live, batches=len(sampler))


def bench_backbone(backbone, model, a, device, log):
    """Every line of the per-step table for one backbone, timed interleaved. Returns a dict of measurements."""
    lines, info = step_lines(backbone, model, a, device)
    B, live = info["B"], info["live"]
    times = {k: [] for k in lines}
    for r in range(a.repeats + 1):  # interleaved, so drift hits every line alike; run 0 is the warm-up
        for k, fn in lines.items():
            t = once(fn, device)
            if r:
                times[k].append(t)
        log(f"  {backbone}: run {r}/{a.repeats} done" + (" (warm-up)" if r == 0 else ""))
    times["sampler"] = [t / info["batches"] for t in times["sampler"]]  # one batch
    # labels once per run, amortised over the new step's epochs (paper: 10 of the 20)
    times["new_once"] = [c + t / a.new_epochs for c, t in zip(times.pop("new_cached"), times.pop("label"))]
    lines["new_once"] = lines["new_cached"]
    res = dict(backbone=backbone, learnable_params=info["params"], images_per_step=B, lines={})
    for k in ("plain", "base", "new", "new_once"):
        extra = peak_bytes(lines[k], device)
        counter = EncodeCounter(model)  # what one step encodes, counted on a separate, untimed step
        lines[k]()
        counter.remove()
        res["lines"][k] = dict(step_s=stats(times[k]), image_ms=stats([1e3 * t / B for t in times[k]]),
                               peak_extra_mb=extra / 2**20, peak_mb=(live + extra) / 2**20, encodings=counter.counts)
        if k != "plain":
            res["lines"][k]["ratio_time"] = stats([t / p for t, p in zip(times[k], times["plain"])])
            res["lines"][k]["ratio_memory"] = (live + extra) / (live + peak_bytes(lines["plain"], device))
    res["live_mb"] = live / 2**20
    res["lines"]["sampler"] = dict(batch_s=stats(times["sampler"]),
                                   share_of_base_step=stats([s / b for s, b in zip(times["sampler"], times["base"])]))
    res["lines"]["infer"] = dict(images_per_s=stats([a.infer_batch / t for t in times["infer"]]),
                                 batch=a.infer_batch)
    return res


def text_scaling(model, a, device, log):
    """CoOp's text encoder (forward + backward) against the number of classes it encodes: a plain step encodes all
    C_b base classes, a MAO base step only the H <= b*K classes of its batch, whatever C_b is."""
    out = {}
    for n in a.text_sizes:
        enc = CoOp(model, [f"class number {i}" for i in range(n)]).to(device)
        ts = [once(lambda: enc.encode_text().sum().backward(), device) for _ in range(a.text_repeats + 1)][1:]
        out[n] = stats(ts)
        log(f"  text encoder, {n} classes: {out[n]['median']:.3g} s")
    return out


def fmt_stats(s, scale=1.0, digits=3):
    return f"{s['median'] * scale:.{digits}g} ({s['min'] * scale:.{digits}g}-{s['max'] * scale:.{digits}g})"




# -----------------------------------------------------------------------------
# Reporting: bench.md

def md_data(res):
    d, consume = res["data"], res["consumption"]
    w = res["header"]["workers"]
    rows = [f"**Data side.** Training loader images/s on JPEGs made here (CoOp's training augmentation at 224 px), "
            f"{res['header']['data_images']} images per measurement, worker start-up included (train.py starts fresh "
            f"workers every epoch). The model consumes {consume['images_per_s']:.0f} images/s "
            f"({consume['source']}).", "",
            f"| images | loader | decode | 1 worker | {w} workers | vs the model |", "|---|---|---|---|---|---|"]
    for name, r in d.items():
        for loader in ("plain", "mao_base"):
            for cache in (0, 1):
                one, many = r["rates"][f"{loader}|{cache}|1"], r["rates"][f"{loader}|{cache}|{w}"]
                ratio = consume["images_per_s"] / many
                verdict = f"loader-bound, {ratio:.1f}x too slow" if ratio > 1 else f"model-bound ({1 / ratio:.1f}x headroom)"
                kind = "plain, batch 32" if loader == "plain" else f"MAO base step, b={r['b']}, K={r['K']}"
                rows.append(f"| {name}, {r['jpeg_kb']:.0f} KB | {kind} | {'once per run' if cache else 'every use'} | "
                            f"{one:.0f} | {many:.0f} | {verdict} |")
        rows.append(f"| {name} | decoding all {r['images']} images once | | | {r['decode_once_s']:.1f} s ({w} threads), "
                    f"{r['cache_mb']:.0f} MB kept | |")
    return "\n".join(rows)


def md_units(res):
    u = res["units"]
    return "\n".join(["**Unit costs** (ms per image or token sequence, median (min-max)):", "",
                      "| image, forward | image, forward + backward (prompted) | text, forward | text, forward + backward |",
                      "|---|---|---|---|",
                      "| " + " | ".join(fmt_stats(u[k], 1e3) for k in ("image", "image_grad", "text", "text_grad")) + " |"])


def md_run_cost(res):
    rows = ["**The cost of one run, before it runs** (`run_cost`): frozen-CLIP encodings of a whole train.py run at "
            "the paper's settings (16 shots, seed 1; MAO 10 + 10 epochs; the backbone alone and DPC's stage 1: 20 "
            "epochs, batch 32; DPC's stage 2: 20 epochs), and the encoder time they cost on this device (the unit "
            "costs above; data loading, optimizer and Python overhead excluded). DPC ranks per image with its trained "
            "prompt, so its stage-2 batch sizes are estimated with the MiniLM table."]
    for bb in dict.fromkeys(r["backbone"] for r in res["run_cost"]):
        rows += ["", f"*{bb}*", "", "| dataset | method | images (with backward) | texts (with backward) | "
                 "encoder time, min | x alone |", "|---|---|---|---|---|---|"]
        for r in [r for r in res["run_cost"] if r["backbone"] == bb]:
            alone = next(x for x in res["run_cost"] if (x["dataset"], x["backbone"], x["method"])
                         == (r["dataset"], bb, "none"))
            t = r["total"]
            rows.append(f"| {r['dataset']} | {r['method']} | {t['images']:,} ({t['images_grad']:,}) | "
                        f"{t['texts']:,} ({t['texts_grad']:,}) | {r['seconds'] / 60:.3g} | "
                        f"{r['seconds'] / alone['seconds']:.2f} |")
    return "\n".join(rows)


def per_epoch(res, dataset="oxford_flowers", backbone="coop"):
    """Estimated encoder time of one epoch: the backbone alone, MAO's base step and new step (the paper's Table 3
    compares CoOp and CoOp+MAO per epoch on Flowers102)."""
    rows = {r["method"]: r for r in res["run_cost"] if (r["dataset"], r["backbone"]) == (dataset, backbone)}
    if "none" not in rows or "mao" not in rows:
        return None
    plain = rows["none"]["per_phase_seconds"]["backbone"] / 20
    base, new = rows["mao"]["per_phase_seconds"]["mao_base"] / 10, rows["mao"]["per_phase_seconds"]["mao_new"] / 10
    images = rows["mao"]["phases"]["mao_base"]["images"] / 10, rows["none"]["phases"]["backbone"]["images"] / 20
    return dict(dataset=dataset, plain_s=plain, base_s=base, new_s=new, base_images=images[0], plain_images=images[1])


def md_per_epoch(res):
    e = per_epoch(res)
    if e is None:
        return ""
    p = PAPER_TABLE3["epoch_s"]
    return (f"Per epoch on {e['dataset']} (CoOp): a plain epoch encodes {e['plain_images']:.0f} images, a MAO base-step "
            f"epoch {e['base_images']:.0f} ({e['base_images'] / e['plain_images']:.2f}x: every anchor brings up to K-1 "
            f"negatives). Estimated encoder time: plain {e['plain_s']:.3g} s, MAO base step {e['base_s']:.3g} s "
            f"({e['base_s'] / e['plain_s']:.2f}x), MAO new step {e['new_s']:.3g} s ({e['new_s'] / e['plain_s']:.2f}x), "
            f"so the 20 MAO epochs cost {(e['base_s'] + e['new_s']) / (2 * e['plain_s']):.2f}x the backbone's 20. "
            f"The paper's Table 3: {p[0]} vs {p[1]} s per epoch ({p[1] / p[0]:.2f}x).")


def md_steps(res):
    h = res["header"]
    rows = [f"**One step at equal images per step** ({h['dataset']}: C_b={h['base_classes']}, C_n={h['new_classes']}, "
            f"b={h['anchors']}, K={h['topk']}, {h['images_per_step']} images per step, {h['repeats']} runs after a "
            f"warm-up; memory: {h['memory_note']}):", "",
            "| backbone | line | learnable params | text sequences per step (with backward) | peak memory MB (step's own) "
            "| time per step s, median (min-max) | per image ms | MAO / plain time, median (min-max) | MAO / plain memory |",
            "|---|---|---|---|---|---|---|---|---|"]
    names = dict(plain="plain backbone step", base="MAO base step", new="MAO new step, online pseudo-labels",
                 new_once=f"MAO new step, labels once per run (amortised over {h['new_epochs']} epochs)")
    for r in res["backbones"]:
        for k in ("plain", "base", "new", "new_once"):
            L = r["lines"][k]
            ratio = fmt_stats(L["ratio_time"]) + "x" if k != "plain" else "1"
            mem = f"{L['ratio_memory']:.3f}x" if k != "plain" else "1"
            e = L["encodings"]
            rows.append(f"| {r['backbone']} | {names[k]} | {r['learnable_params']:,} | {e['texts']} ({e['texts_grad']}) "
                        f"| {L['peak_mb']:.1f} ({L['peak_extra_mb']:.1f}) | {fmt_stats(L['step_s'])} | "
                        f"{L['image_ms']['median']:.4g} | {ratio} | {mem} |")
        s, i = r["lines"]["sampler"], r["lines"]["infer"]
        rows.append(f"| {r['backbone']} | sampler, one batch | - | - | - | {s['batch_s']['median']:.3g} | - "
                    f"| {100 * s['share_of_base_step']['median']:.2g}% of a base step | - |")
        rows.append(f"| {r['backbone']} | inference (batch {i['batch']}) | same | - | - | - | "
                    f"{1e3 / i['images_per_s']['median']:.4g} | {i['images_per_s']['median']:.1f} images/s, "
                    f"same network with MAO | - |")
    if res.get("text_encoder_s"):
        rows += ["", "| classes through the text encoder | fwd+bwd s, median (min-max) |", "|---|---|"]
        rows += [f"| {n} | {fmt_stats(s)} |" for n, s in res["text_encoder_s"].items()]
    p = PAPER_TABLE3
    rows += ["", "Paper Table 3 (Flowers102, CoOp vs CoOp+MAO, one RTX 3090): params " + p["params"] +
             f"; memory {p['memory_mb'][0]} vs {p['memory_mb'][1]} MB "
             f"({p['memory_mb'][1] / p['memory_mb'][0]:.3f}x); time per epoch {p['epoch_s'][0]} vs {p['epoch_s'][1]} s "
             f"({p['epoch_s'][1] / p['epoch_s'][0]:.2f}x); inference {p['fps'][0]} vs {p['fps'][1]} FPS."]
    return "\n".join(rows)


def markdown(res):
    h = res["header"]
    parts = [f"Device {h['device']} ({h['cpu']}), torch {h['torch']}, {h['threads']} threads, CLIP {h['clip']} "
             f"({h['dtype']})."]
    if "data" in res:
        parts.append(md_data(res))
    if "units" in res:
        parts.append(md_units(res))
    if "run_cost" in res:
        parts += [md_run_cost(res), md_per_epoch(res)]
    if res.get("backbones"):
        parts.append(md_steps(res))
    return "\n\n".join(p for p in parts if p)


# -----------------------------------------------------------------------------

def load_model(a, device):
    """(model, name): ViT-B/16 on a GPU when its weights load, else a ViT-B/16-shaped random CLIP (the cost does not
    depend on the weights); fp16 on a GPU in clip.load's layout."""
    name, model = a.clip, None
    if name == "auto":
        name = "vit-b16-shaped"
        if device.type == "cuda":
            try:
                model, name = load_clip("ViT-B/16", device, "fp16"), "ViT-B/16"
            except Exception as e:  # no download possible: the same architecture, random weights
                print(f"ViT-B/16 weights not loadable ({e}); using the ViT-B/16-shaped random CLIP")
    if model is None:
        model = (vit_b16_shaped().to(device) if name == "vit-b16-shaped" else
                 build_tiny_clip().to(device).requires_grad_(False) if name == "tiny" else load_clip(name, device))
    if device.type == "cuda" and name in ("vit-b16-shaped", "tiny"):
        convert_weights(model)  # the paper's fp16 CLIP, in clip.load's layout (LayerNorms stay fp32)
    return model, name


def consumption(res, device, a):
    """Images/s the model consumes in CoOp's MAO base step (the cheapest per image: no image backward), from the
    unit costs on a GPU; on a CPU the paper's inference rate stands in as a floor (a GPU is at least that fast)."""
    if device.type != "cuda" or "units" not in res:
        return dict(images_per_s=PAPER_FPS, source=f"no GPU here: the paper's {PAPER_FPS} images/s at inference on "
                                                    f"one RTX 3090, a floor")
    u = {k: v["median"] for k, v in res["units"].items()}
    per_image = u["image"] + u["text_grad"]  # a MAO base batch of B' images encodes about B' candidate texts
    return dict(images_per_s=1 / per_image, source=f"measured on {res['header']['cpu']}: CoOp's MAO base step, "
                                                   f"one image and one candidate text per image")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="data,units,run_cost,steps", help="comma list of data, units, run_cost, steps")
    ap.add_argument("--backbone", default="coop", help="steps: coop, maple, promptsrc, ivlp, or all")
    ap.add_argument("--dataset", default="dtd", help=f"steps: C_b, C_n, b and K as in training ({', '.join(DATASET_SIZES)})")
    ap.add_argument("--clip", default="auto", help="auto (ViT-B/16 on a GPU if loadable, else ViT-B/16-shaped "
                                                   "random), vit-b16-shaped, tiny, a CLIP name or a path")
    ap.add_argument("--quick", action="store_true", help="tiny CLIP, 2 runs, small data: a smoke run in seconds")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per line after one warm-up")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data: loader workers")
    ap.add_argument("--data_shots", type=int, default=16, help="data: images per class of the made-up JPEG sets")
    ap.add_argument("--data_images", type=int, default=640, help="data: images per loader measurement")
    ap.add_argument("--unit_batch", type=int, default=32, help="units: images / sequences per timed call")
    ap.add_argument("--splits", help="run_cost: a folder of CoOp split files (class names for MiniLM's tables), "
                                     "e.g. ../shared/data/coop_splits; without it, random neighbour tables")
    ap.add_argument("--cost_datasets", default="imagenet,caltech101,oxford_pets,stanford_cars,oxford_flowers,food101,"
                    "fgvc_aircraft,sun397,dtd,eurosat,ucf101", help="run_cost: datasets")
    ap.add_argument("--cost_backbones", default="coop,maple,promptsrc", help="run_cost: backbones")
    ap.add_argument("--infer_batch", type=int, help="steps: images per inference batch (default: 100 on GPU, B on CPU)")
    ap.add_argument("--text_sizes", help="steps: class counts for the text-encoder line (default: B, C_b, 500)")
    ap.add_argument("--text_repeats", type=int, default=2)
    ap.add_argument("--new_epochs", type=int, default=10, help="steps: new-step epochs over which labels computed "
                                                                   "once per run are amortised (paper: 10)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench.json", help="results; the markdown goes beside it (.md)")
    a = ap.parse_args(argv)
    parts = a.parts.split(",")
    backbones = ["coop", "maple", "promptsrc"] if a.backbone == "all" else a.backbone.split(",")
    for b in backbones:
        if (b, "mao") not in PRESETS:
            ap.error(f"unknown backbone '{b}': choose coop, maple, promptsrc, ivlp, or all")
    if a.dataset not in DATASET_SIZES:
        ap.error(f"unknown dataset '{a.dataset}': choose one of {', '.join(DATASET_SIZES)}")
    a.cost_datasets, a.cost_backbones = a.cost_datasets.split(","), a.cost_backbones.split(",")
    n = DATASET_SIZES[a.dataset][0]
    a.base_classes, a.new_classes = (n + 1) // 2, n // 2
    preset = dict(DEFAULTS, **DATASET_PRESETS.get(a.dataset, {}))
    a.anchors, a.topk = preset["anchors"], preset["topk"]
    B = a.anchors * a.topk
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if a.quick:
        a.clip, a.repeats, a.text_repeats, a.data_shots, a.data_images, a.unit_batch = "tiny", 2, 1, 2, 64, 4
        a.cost_datasets = [d for d in a.cost_datasets if d in ("dtd", "eurosat")] or a.cost_datasets[:1]
    a.infer_batch = a.infer_batch or (100 if device.type == "cuda" else B)
    a.text_sizes = [int(x) for x in a.text_sizes.split(",")] if a.text_sizes else \
        sorted({B, a.base_classes, 500 if not a.quick else 64})
    model, name = load_model(a, device)
    header = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(), workers=a.workers,
                  cpu=torch.cuda.get_device_name(device) if device.type == "cuda" else
                  (platform.processor() or platform.machine()), clip=name,
                  dtype=str(next(model.parameters()).dtype).replace("torch.", ""), dataset=a.dataset,
                  base_classes=a.base_classes, new_classes=a.new_classes, anchors=a.anchors, topk=a.topk,
                  images_per_step=B, repeats=a.repeats, new_epochs=a.new_epochs, data_images=a.data_images,
                  memory_note="torch.cuda.max_memory_allocated" if device.type == "cuda" else
                  "live tensor bytes + the step's peak from torch profiler allocation events (not process RSS)")
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    res = dict(header=header, backbones=[])
    if "units" in parts or "run_cost" in parts:
        res["units"] = unit_costs(model, a, device, print)
    if "data" in parts:
        res["data"] = bench_data(a, print)
        res["consumption"] = consumption(res, device, a)
    if "run_cost" in parts:
        res["run_cost"] = bench_run_cost(a, res["units"], print)
    if "steps" in parts:
        res["backbones"] = [bench_backbone(b, model, a, device, print) for b in backbones]
        res["text_encoder_s"] = text_scaling(model, a, device, print)
    table = markdown(res)
    print("\n" + table)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"Produced by: python bench.py {' '.join(sys.argv[1:] if argv is None else argv)}\n\n{table}\n")
    print(f"wrote {a.out} and {md}")
    return res


if __name__ == "__main__":
    main()
