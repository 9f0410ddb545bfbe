"""Cost of MAO next to its backbone, measured in one process on one device (MAO §4.3, Table 3).

    python bench.py --backbone coop --dataset dtd     # CPU: ViT-B/16-shaped CLIP (random weights), a few minutes
    python bench.py --backbone all --dataset dtd      # CoOp, MaPLe and PromptSRC
    python bench.py --quick                           # the tiny CLIP, seconds (smoke run)
    python bench.py --clip ViT-B/16                   # real weights (the default on a GPU when they can be loaded)

For each backbone, at equal images per optimizer step (B = b*K, the size of a MAO base batch):
  plain   the backbone's own step: logits over all C_b base classes, CE (Eq. 2) plus its other losses
  base    MAO base step: logits over the H <= B unique classes of the batch (Eq. 5-6) plus the same other losses
  new     MAO new step: logits over all C_n new classes, Top-1 zero-shot pseudo-labels (Eq. 7-8); CoOp and
          PromptSRC hand the labeller their frozen image features, MaPLe's prompted encoder needs a frozen pass
  new_once  the same with the labels computed once per run on un-augmented views (--pseudo_label_every epoch):
          a step with stored labels plus the labelling pass amortised over the new step's epochs
  sampler the hard-negative sampler building one batch (Eq. 4 table given)
  infer   images/s of the final model (text features once, then image batches): the same network with or
          without MAO, which changes prompt values only
Times are min / median / max over --repeats interleaved runs after one warm-up; the ratios MAO/plain are taken
run by run. Peak memory: CUDA max_memory_allocated; on CPU the torch profiler's allocation events give the peak of
tensor bytes allocated during a step, added to the bytes of the tensors already live (weights, prompts, optimizer
state, batch). Results go to bench.json and bench.md.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from clip_prompt import ZeroShotCLIP, build_learner, build_tiny_clip, clip_logits, convert_weights, load_clip
from losses import cross_entropy, dynamic_candidate_loss, dynamic_candidates, pseudo_label_loss
from pseudolabel import PseudoLabeler
from sampler import HardNegativeBatchSampler
from train import DATASET_PRESETS, DEFAULTS, PRESETS

CLASSES = {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
           "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101, "demo": 12}
PAPER_TABLE3 = dict(params="8K / 8K", memory_mb=(1103.7, 1176.9), epoch_s=(22.0, 31.9), fps=(767.7, 772.0))


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


def bench_backbone(backbone, model, a, device, log):
    """Every line of the table for one backbone. Returns a dict of measurements."""
    cfg = dict(DEFAULTS, **PRESETS[(backbone, "mao")])
    kw = dict(n_ctx=cfg["n_ctx"], ctx_init=cfg["ctx_init"], n_vis=cfg["n_vis"], depth=cfg["depth"])
    base_names = [f"texture number {i}" for i in range(a.base_classes)]
    new_names = [f"pattern number {i}" for i in range(a.new_classes)]
    B, R = a.anchors * a.topk, model.visual.input_resolution
    g = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    images = torch.randn(B, 3, R, R, generator=g).to(device, dtype)
    labels = torch.randperm(a.base_classes, generator=g)[:B].to(device)  # a hard-negative batch: distinct classes
    kw.update(text_weight=cfg.get("text_weight", 25.0), image_weight=cfg.get("image_weight", 10.0))
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
        text = learner.encode_text()
        clip_logits(model, learner.encode_image(infer_images), text).argmax(-1)
        learner.train()

    nb = torch.stack([torch.randperm(a.base_classes, generator=g)[:a.topk] for _ in range(a.base_classes)])
    nb[:, 0] = torch.arange(a.base_classes)
    sampler = HardNegativeBatchSampler([y for y in range(a.base_classes) for _ in range(16)], nb, a.anchors)

    def sample_epoch():
        for _ in sampler:
            pass

    learner.train(), learner_new.train()
    lines = dict(plain=plain, base=base, new=new, new_cached=new_cached, label=label, sampler=sample_epoch, infer=infer)
    times = {k: [] for k in lines}
    for r in range(a.repeats + 1):  # interleaved, so drift hits every line alike; run 0 is the warm-up
        for k, fn in lines.items():
            t = once(fn, device)
            if r:
                times[k].append(t)
        log(f"  {backbone}: run {r}/{a.repeats} done" + (" (warm-up)" if r == 0 else ""))
    times["sampler"] = [t / len(sampler) for t in times["sampler"]]  # one batch
    # labels once per run, amortised over the new step's epochs (paper: 10 of the 20)
    times["new_once"] = [c + t / a.new_epochs for c, t in zip(times.pop("new_cached"), times.pop("label"))]
    lines["new_once"] = new_cached
    res = dict(backbone=backbone, learnable_params=params, images_per_step=B, lines={})
    live = live_bytes(model, learner, learner_new, opt, opt_new, labeler.text_features, images)
    for k in ("plain", "base", "new", "new_once"):
        extra = peak_bytes(lines[k], device)
        res["lines"][k] = dict(step_s=stats(times[k]), image_ms=stats([1e3 * t / B for t in times[k]]),
                               peak_extra_mb=extra / 2**20, peak_mb=(live + extra) / 2**20)
        if k != "plain":
            res["lines"][k]["ratio_time"] = stats([t / p for t, p in zip(times[k], times["plain"])])
            res["lines"][k]["ratio_memory"] = (live + extra) / (live + peak_bytes(plain, device))
    res["live_mb"] = live / 2**20
    res["lines"]["sampler"] = dict(batch_s=stats(times["sampler"]),
                                   share_of_base_step=stats([s / b for s, b in zip(times["sampler"], times["base"])]))
    res["lines"]["infer"] = dict(images_per_s=stats([a.infer_batch / t for t in times["infer"]]),
                                 batch=a.infer_batch)
    return res


def text_scaling(model, a, device, log):
    """CoOp's text encoder (forward + backward) against the number of classes it encodes: a plain step encodes all
    C_b base classes, a MAO base step only the H <= b*K classes of its batch, whatever C_b is."""
    from clip_prompt import CoOp
    out = {}
    for n in a.text_sizes:
        enc = CoOp(model, [f"class number {i}" for i in range(n)]).to(device)
        ts = [once(lambda: enc.encode_text().sum().backward(), device) for _ in range(a.text_repeats + 1)][1:]
        out[n] = stats(ts)
        log(f"  text encoder, {n} classes: {out[n]['median']:.3g} s")
    return out


def fmt_stats(s, scale=1.0, digits=3):
    return f"{s['median'] * scale:.{digits}g} ({s['min'] * scale:.{digits}g}-{s['max'] * scale:.{digits}g})"


def markdown(res):
    """The table of bench.md: one block of rows per backbone."""
    h = res["header"]
    rows = [f"Device {h['device']} ({h['cpu']}), torch {h['torch']}, {h['threads']} threads, CLIP {h['clip']} "
            f"({h['dtype']}), {h['dataset']}: C_b={h['base_classes']}, C_n={h['new_classes']}, b={h['anchors']}, "
            f"K={h['topk']}, {h['images_per_step']} images per step, {h['repeats']} runs after a warm-up. "
            f"Memory: {h['memory_note']}.", "",
            "| backbone | line | learnable params | peak memory MB (step's own) | time per step s, median (min-max) "
            "| per image ms | MAO / plain time, median (min-max) | MAO / plain memory |",
            "|---|---|---|---|---|---|---|---|"]
    names = dict(plain="plain backbone step", base="MAO base step", new="MAO new step, online pseudo-labels",
                 new_once=f"MAO new step, labels once per run (amortised over {h['new_epochs']} epochs)")
    for r in res["backbones"]:
        for k in ("plain", "base", "new", "new_once"):
            L = r["lines"][k]
            ratio = fmt_stats(L["ratio_time"]) + "x" if k != "plain" else "1"
            mem = f"{L['ratio_memory']:.3f}x" if k != "plain" else "1"
            rows.append(f"| {r['backbone']} | {names[k]} | {r['learnable_params']:,} | {L['peak_mb']:.1f} "
                        f"({L['peak_extra_mb']:.1f}) | {fmt_stats(L['step_s'])} | {L['image_ms']['median']:.4g} "
                        f"| {ratio} | {mem} |")
        s, i = r["lines"]["sampler"], r["lines"]["infer"]
        rows.append(f"| {r['backbone']} | sampler, one batch | - | - | {s['batch_s']['median']:.3g} | - "
                    f"| {100 * s['share_of_base_step']['median']:.2g}% of a base step | - |")
        rows.append(f"| {r['backbone']} | inference (batch {i['batch']}) | same | - | - | "
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="coop", help="coop, maple, promptsrc, or all")
    ap.add_argument("--dataset", default="dtd", help=f"sets C_b, C_n, b and K as in training ({', '.join(CLASSES)})")
    ap.add_argument("--clip", default="auto", help="auto (ViT-B/16 on a GPU if loadable, else ViT-B/16-shaped "
                                                   "random), vit-b16-shaped, tiny, a CLIP name or a path")
    ap.add_argument("--quick", action="store_true", help="tiny CLIP, 2 runs: a smoke run in seconds")
    ap.add_argument("--base_classes", type=int, help="C_b (default: the dataset's, e.g. DTD 24, ImageNet 500)")
    ap.add_argument("--new_classes", type=int, help="C_n (default: the dataset's)")
    ap.add_argument("--anchors", type=int, help="b (default: the dataset's training preset)")
    ap.add_argument("--topk", type=int, help="K (default: the dataset's training preset)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per line after one warm-up")
    ap.add_argument("--infer_batch", type=int, help="images per inference batch (default: 100 on GPU, B on CPU)")
    ap.add_argument("--text_sizes", help="class counts for the text-encoder line (default: B, C_b, 500)")
    ap.add_argument("--text_repeats", type=int, default=2)
    ap.add_argument("--new_epochs", type=int, default=10, help="new-step epochs over which labels computed once "
                                                                   "per run are amortised (paper: 10)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench.json", help="results; the markdown table goes beside it (.md)")
    a = ap.parse_args(argv)
    backbones = ["coop", "maple", "promptsrc"] if a.backbone == "all" else a.backbone.split(",")
    for b in backbones:
        if (b, "mao") not in PRESETS:
            ap.error(f"unknown backbone '{b}': choose coop, maple, promptsrc (or ivlp), or all")
    if a.dataset not in CLASSES:
        ap.error(f"unknown dataset '{a.dataset}': choose one of {', '.join(CLASSES)}")
    n = CLASSES[a.dataset]
    a.base_classes = a.base_classes or (n + 1) // 2  # CoOp protocol: the first ceil(n/2) labels are base
    a.new_classes = a.new_classes or n - (n + 1) // 2
    preset = dict(DEFAULTS, **DATASET_PRESETS.get(a.dataset, {}))
    a.anchors, a.topk = a.anchors or preset["anchors"], a.topk or preset["topk"]
    B = a.anchors * a.topk
    if B > a.base_classes:
        ap.error(f"b*K = {a.anchors}*{a.topk} = {B} images per step exceeds C_b = {a.base_classes}: a hard-negative "
                 f"batch has distinct classes. Lower --anchors or --topk")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if a.quick:
        a.clip, a.repeats, a.text_repeats = "tiny", min(a.repeats, 2), 1
    a.infer_batch = a.infer_batch or (100 if device.type == "cuda" else B)
    a.text_sizes = [int(x) for x in a.text_sizes.split(",")] if a.text_sizes else \
        sorted({B, a.base_classes, 500 if not a.quick else 64})

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
    header = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  cpu=torch.cuda.get_device_name(device) if device.type == "cuda" else
                  (platform.processor() or platform.machine()),
                  clip=name, dtype=str(next(model.parameters()).dtype).replace("torch.", ""), dataset=a.dataset,
                  base_classes=a.base_classes, new_classes=a.new_classes, anchors=a.anchors, topk=a.topk,
                  images_per_step=B, repeats=a.repeats, new_epochs=a.new_epochs,
                  memory_note="torch.cuda.max_memory_allocated" if device.type == "cuda" else
                  "live tensor bytes + the step's peak from torch profiler allocation events (not process RSS)")
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    res = dict(header=header, backbones=[])
    for b in backbones:
        res["backbones"].append(bench_backbone(b, model, a, device, print))
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
