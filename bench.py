"""Cost of MAO next to its backbone, measured in one process on one device (MAO §4.3, Table 3).

    python bench.py                       # ViT-B/16-shaped CLIP (random weights: cost does not depend on them)
    python bench.py --quick               # the tiny CLIP, seconds
    python bench.py --clip ViT-B/16       # real weights when available (e.g. on a GPU box)

Per optimizer step at equal images per step (B' = b*K, the base step's batch):
  plain   CoOp step: logits over all C base classes, CE (Eq. (2))
  base    MAO base step: logits over the H unique classes of the batch only (Eq. (5)-(6))
  new     MAO new step: logits over all new classes, Top-1 pseudo-labels reusing the frozen image features (Eq. (7)-(8))
plus the sampler's batch building alone and the text-encoder cost against the number of classes it encodes.
Every figure is min / median / max over --repeats timed runs after one warm-up; results go to bench.json.
"""
import argparse
import json
import platform
import statistics
import time

import torch

from clip_prompt import CoOp, ZeroShotCLIP, build_tiny_clip, load_clip
from losses import cross_entropy, dynamic_candidate_loss, dynamic_candidates, pseudo_label_loss
from pseudolabel import PseudoLabeler
from sampler import HardNegativeBatchSampler


def vit_b16_shaped():
    """openai/CLIP's ViT-B/16 architecture with random weights (what clip.load('ViT-B/16') builds)."""
    from clip.model import CLIP
    return CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12).eval().requires_grad_(False)


def timed(fn, repeats, device):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return dict(min=min(out), median=statistics.median(out), max=max(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", default="vit-b16-shaped", help="vit-b16-shaped (random), tiny, a CLIP name or a path")
    ap.add_argument("--quick", action="store_true", help="tiny CLIP, for a smoke run")
    ap.add_argument("--base_classes", type=int, default=24, help="C_b (DTD 24; ImageNet 500)")
    ap.add_argument("--new_classes", type=int, default=23)
    ap.add_argument("--anchors", type=int, default=2, help="b (DTD: 2)")
    ap.add_argument("--topk", type=int, default=8, help="K (DTD: 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--text_sizes", default="16,24,100,500", help="class counts for the text-encoder scaling line")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench.json")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    name = "tiny" if a.quick else a.clip
    if name == "vit-b16-shaped":
        model = vit_b16_shaped().to(device)
    elif name == "tiny":
        model = build_tiny_clip().to(device).requires_grad_(False)
    else:
        model = load_clip(name, device)
    if device.type == "cuda" and name in ("vit-b16-shaped", "tiny"):
        model = model.half()
    R = model.visual.input_resolution
    torch.manual_seed(0)
    base_names = [f"texture number {i}" for i in range(a.base_classes)]
    new_names = [f"pattern number {i}" for i in range(a.new_classes)]
    B = a.anchors * a.topk  # images per step, equal for all three steps
    images = torch.randn(B, 3, R, R, device=device)
    labels = torch.randperm(a.base_classes, device=device)[:B]  # a hard-negative batch has distinct classes
    learner = CoOp(model, base_names).to(device)
    opt = torch.optim.SGD([learner.ctx], lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=next(model.parameters()).dtype == torch.float16)

    def step(loss, opt=opt):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def plain():
        step(cross_entropy(learner(images).logits, labels))  # Eq. 2 over all C_b

    def base():
        cand, target = dynamic_candidates(labels)  # Eq. 5
        step(dynamic_candidate_loss(learner(images, cand).logits, target))  # Eq. 6, H text rows only

    learner_new = CoOp(model, new_names).to(device)
    opt_new = torch.optim.SGD([learner_new.ctx], lr=1e-3, momentum=0.9)
    labeler = PseudoLabeler(ZeroShotCLIP(model, new_names))

    def new():
        out = learner_new(images)
        pseudo = labeler(images, out.frozen_image_features)  # Eq. 7, no second image forward
        step(pseudo_label_loss(out.logits, pseudo), opt_new)  # Eq. 8

    nb = torch.stack([torch.randperm(a.base_classes)[:a.topk] for _ in range(a.base_classes)])
    nb[:, 0] = torch.arange(a.base_classes)
    sampler = HardNegativeBatchSampler([y for y in range(a.base_classes) for _ in range(16)], nb, a.anchors)

    def sample_epoch():
        for _ in sampler:
            pass

    res = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "clip": name, "images_per_step": B,
           "base_classes": a.base_classes, "new_classes": a.new_classes, "anchors": a.anchors, "topk": a.topk}
    print(" ".join(f"{k}={v}" for k, v in res.items()))
    res["plain_step_s"] = timed(plain, a.repeats, device)
    res["base_step_s"] = timed(base, a.repeats, device)
    res["new_step_s"] = timed(new, a.repeats, device)
    ep = timed(sample_epoch, a.repeats, device)
    res["sampler_batch_s"] = {k: v / len(sampler) for k, v in ep.items()}
    res["text_encoder_s"] = {}
    for n in (int(x) for x in a.text_sizes.split(",")):
        names = [f"class number {i}" for i in range(n)]
        enc = CoOp(model, names).to(device)
        res["text_encoder_s"][n] = timed(lambda: enc.encode_text().sum().backward(), max(1, a.repeats // 2), device)
    med = lambda k: res[k]["median"]
    res["ratio_base_vs_plain"] = med("base_step_s") / med("plain_step_s")
    res["ratio_new_vs_plain"] = med("new_step_s") / med("plain_step_s")
    res["sampler_share_of_base_step"] = res["sampler_batch_s"]["median"] / med("base_step_s")
    rows = [("plain CoOp step", "plain_step_s"), ("MAO base step", "base_step_s"), ("MAO new step", "new_step_s"),
            ("sampler, one batch", "sampler_batch_s")]
    print(f"\n| per step ({B} images) | min | median | max |\n|---|---|---|---|")
    for label, k in rows:
        r = res[k]
        print(f"| {label} | {r['min']:.4g} s | {r['median']:.4g} s | {r['max']:.4g} s |")
    print(f"\nbase/plain {res['ratio_base_vs_plain']:.3f}x | new/plain {res['ratio_new_vs_plain']:.3f}x | "
          f"sampler {100 * res['sampler_share_of_base_step']:.2g}% of a base step")
    print("text encoder fwd+bwd (median s) by number of classes: " +
          ", ".join(f"{n}: {r['median']:.3g}" for n, r in res["text_encoder_s"].items()))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
