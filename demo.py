"""The embedded demo: a toy world, the small CLIP pretrained on it, and the
downstream task in the CoOp layout.

    python demo.py                               # rebuilds weights/demo_clip.pt (~25 min on 2 cores)
    python demo.py --steps 50 --out /tmp/x.pt    # a short run
    python train.py --dataset demo               # writes data/demo/, runs CoOp + MAO on it

The world: coloured shapes (6 colours x 6 shapes) with nuisances (size, pattern, background,
rotation, noise, sometimes a second object), and captions that name some of their attributes. The
demo CLIP is openai/CLIP's own `clip.model.CLIP` at small widths, with CLIP's tokenizer, trained
from scratch on fresh (image, caption) batches with CLIP's symmetric contrastive loss (the same loss
DPC trains with, dpc.symmetric_contrastive_loss).

The downstream task (make_demo) is a colour x shape classification set seen through a domain
pretraining never saw: every image blurred, and the warm hues shifted towards their neighbours. The
18 warm classes are the base half, the 18 cool ones new, so a context fitted to the base classes
corrects what new classes do not need: the base-new trade-off of the real benchmark
(docs/demo_design.md tells how it was designed and frozen)."""
import argparse
import json
import math
import os
import random
import shutil
import time

import clip
import numpy as np
import torch
import torch.nn.functional as F
from clip.model import CLIP
from PIL import Image, ImageDraw
from tqdm import tqdm

from clip_prompt import save_clip
from data import build_transforms
from dpc import symmetric_contrastive_loss

# -----------------------------------------------------------------------------
# The toy world: scenes, captions, rendering

COLOURS = {"red": (215, 35, 35), "orange": (245, 140, 25), "yellow": (235, 215, 40), "green": (40, 160, 60),
           "blue": (40, 80, 215), "purple": (135, 55, 185)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = {"dark": (15, 70), "grey": (95, 150), "light": (175, 240)}
CAPTIONS = (
    "a photo of a {colour} {shape}.", "a {colour} {shape}.", "{colour} {shape}", "a {size} {colour} {shape}.",
    "a {pattern} {colour} {shape}.", "a {colour} {shape} on a {bg} background.", "a photo of a {size} {shape}.",
    "a {shape} that is {colour}.", "a photo of something {colour}.", "a drawing of a {pattern} {shape}.",
    "a {size} {pattern} {colour} {shape} on a {bg} background.",
    "a {colour} {shape} and a small {colour2} {shape2}.",
    "a photo of a {colour} {shape} next to a {colour2} {shape2}.",
)
# The downstream domain: an out-of-focus camera (64 px down to 18 px and back) whose palette moves
# the warm hues 80 % of the way to an orange-red, a yellow-orange and a lime. The blur costs both
# halves accuracy no prompt restores; the palette shift is a text-side mismatch a learned prompt can
# correct, for the classes it is trained on.
DEMO_BLUR = 18
DEMO_PALETTE = {"red": (229, 83, 31), "orange": (239, 176, 33), "yellow": (195, 213, 44)}
# Class order: the 18 warm classes first (the base half under the CoOp protocol), then the 18 cool
# ones (new), each half in a fixed shuffled order
DEMO_CLASSES = [[(c, s) for c in COLOURS for s in SHAPES if (c in DEMO_PALETTE) == warm] for warm in (True, False)]
_order = random.Random(2025)
for _half in DEMO_CLASSES:
    _order.shuffle(_half)
DEMO_CLASSES = DEMO_CLASSES[0] + DEMO_CLASSES[1]


def sample_scene(rng, colour=None, shape=None):
    """One image's attributes: the object (colour, shape, size, pattern), background, distractor."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    scene = dict(colour=colour, shape=shape, size=rng.choice(("small", "large")), pattern=rng.choice(PATTERNS),
                 bg=rng.choice(list(BACKGROUNDS)), angle=rng.uniform(-20, 20), seed=rng.getrandbits(32))
    if rng.random() < 0.4:  # a smaller second object; the label stays the main one's
        scene["colour2"] = rng.choice([c for c in COLOURS if c != colour])
        scene["shape2"] = rng.choice([x for x in SHAPES if x != shape])
    return scene


def caption(scene, rng):
    """One of several templates; those naming a second object only when there is one."""
    return rng.choice([t for t in CAPTIONS if "colour2" not in t or "colour2" in scene]).format(**scene)


def _outline(shape, cx, cy, r, angle):
    """Polygon vertices of a shape (circle and ring are drawn as ellipses)."""
    if shape == "square":
        pts = [(r * 0.85 * x, r * 0.85 * y) for x, y in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    elif shape == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.42 * r) * math.cos(math.radians(-90 + 36 * k)),
                (r if k % 2 == 0 else 0.42 * r) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    else:  # cross
        w = 0.33 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
               (-w, -w)]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _paint(im, shape, rgb, pattern, cx, cy, r, angle, rng):
    """Draw one object: a mask of the shape, filled with its colour and pattern."""
    size = im.size[0]
    mask = Image.new("L", im.size, 0)
    d = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            q = 0.55 * r
            d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    else:
        d.polygon(_outline(shape, cx, cy, r, angle), fill=255)
    fill = np.empty((size, size, 3), np.float32)
    fill[:] = rgb
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "striped":  # lighter bands, so the colour name still describes the object
        t = rng.uniform(0, math.pi)
        band = (np.sin((xx * math.cos(t) + yy * math.sin(t)) * 2 * math.pi / 7) > 0.3)
        fill[band] = fill[band] * 0.55 + 255 * 0.45
    elif pattern == "dotted":
        dots = ((xx % 7 - 3) ** 2 + (yy % 7 - 3) ** 2) <= 2
        fill[dots] = fill[dots] * 0.55 + 255 * 0.45
    im.paste(Image.fromarray(fill.astype(np.uint8)), (0, 0), mask)


def render(scene, size=64, colours=COLOURS):
    """The image of a scene: deterministic given the scene (its seed drives placement and noise)."""
    rng = random.Random(scene["seed"])
    lo, hi = BACKGROUNDS[scene["bg"]]
    g = rng.randint(lo, hi)
    tint = [rng.randint(-12, 12) for _ in range(3)]
    im = Image.new("RGB", (size, size), tuple(max(0, min(255, g + t)) for t in tint))
    r = size * (rng.uniform(0.30, 0.40) if scene["size"] == "large" else rng.uniform(0.20, 0.27))
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if "colour2" in scene:  # the distractor first, in a far corner, partly covered
        r2 = r * rng.uniform(0.45, 0.6)
        x2 = r2 if cx > size / 2 else size - r2
        y2 = r2 if cy > size / 2 else size - r2
        _paint(im, scene["shape2"], colours[scene["colour2"]], "plain", x2, y2, r2, rng.uniform(-20, 20), rng)
    _paint(im, scene["shape"], colours[scene["colour"]], scene["pattern"], cx, cy, r, scene["angle"], rng)
    a = np.asarray(im, np.float32) + np.random.default_rng(scene["seed"]).normal(0, 6, (size, size, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def render_demo(scene, size=64):
    """A scene as the downstream domain shows it: the shifted palette, then the blur."""
    im = render(scene, size, dict(COLOURS, **DEMO_PALETTE))
    return im.resize((DEMO_BLUR, DEMO_BLUR), Image.BILINEAR).resize((size, size), Image.BILINEAR)


def make_demo(root, n_train=20, n_val=4, n_test=25, seed=0, num_classes=36):
    """Write root/demo/: the first num_classes of DEMO_CLASSES, 64x64 PNGs of the
    downstream domain and split_demo.json in the CoOp format. The scenes are not the ones
    the demo CLIP was pretrained on."""
    ddir = os.path.join(root, "demo")
    for stale in [f for f in os.listdir(root) if f.startswith("demo.tmp")] if os.path.isdir(root) else []:
        if not os.path.isdir(f"/proc/{stale[8:]}"):  # left by an interrupted write (a live writer's is its own)
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    rng = random.Random(10_000 + seed)  # pretraining draws its scenes from other seeds
    splits = {"train": [], "val": [], "test": []}
    tmp = ddir + f".tmp{os.getpid()}"
    for y, (c, s) in enumerate(DEMO_CLASSES[:num_classes]):
        os.makedirs(os.path.join(tmp, "images", f"{c}_{s}"), exist_ok=True)
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for k in range(n):
                rel = f"{c}_{s}/{split}_{k:03d}.png"
                render_demo(sample_scene(rng, c, s)).save(os.path.join(tmp, "images", rel))
                splits[split].append([rel, y, f"{c} {s}"])
    with open(os.path.join(tmp, "split_demo.json"), "w") as f:
        json.dump(splits, f, indent=1)
    try:
        os.replace(tmp, ddir)  # appears whole: never half written
    except OSError:
        if not os.path.isfile(os.path.join(ddir, "split_demo.json")):
            raise
        shutil.rmtree(tmp)  # a run started beside this one wrote the same dataset first: use it
    return ddir


# -----------------------------------------------------------------------------
# The demo CLIP: openai/CLIP at small widths, pretrained with CLIP's contrastive loss on
# fresh batches of the world

ARCH = dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=128, vision_patch_size=4,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=4)
DEMO_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "demo_clip.pt")
DEMO_NOTE = ("Toy world (README, 'The embedded demo'): a small CLIP pretrained here on synthetic captioned "
             "shapes, 36 colour-shape classes. Its numbers describe this task, not the paper's benchmarks.")


def build(seed=0):
    torch.manual_seed(seed)
    return CLIP(**ARCH)  # CLIP's own initialisation


def to_tensor(images, resolution):
    """PIL images -> normalised (B, 3, R, R) with the test transform the demo's own images get."""
    test_tf = build_transforms(resolution)[1]
    return torch.stack([test_tf(im) for im in images])


def batch(rng, n, resolution):
    """n fresh scenes, rendered sharp (the pretraining domain), and one caption each."""
    scenes = [sample_scene(rng) for _ in range(n)]
    return to_tensor([render(s) for s in scenes], resolution), clip.tokenize([caption(s, rng) for s in scenes])


def contrastive_loss(model, images, tokens):
    """CLIP's loss over (image, caption) pairs: matching pairs on the diagonal, both directions."""
    img, txt = F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(tokens), dim=-1)
    return symmetric_contrastive_loss(model.logit_scale.exp() * img @ txt.t())  # (B, B) logits


@torch.no_grad()
def zero_shot(model, seed=123, per_class=10, template="a photo of a {}."):
    """Zero-shot top-1 (%) on fresh sharp scenes, within the base and within the new half."""
    model.eval()
    rng = random.Random(seed)
    names = [f"{c} {s}" for c, s in DEMO_CLASSES]
    txt = model.encode_text(clip.tokenize([template.format(n) for n in names]))
    txt = txt / txt.norm(dim=-1, keepdim=True)
    half, out = (len(names) + 1) // 2, {}
    for which, ids in (("base", range(half)), ("new", range(half, len(names)))):
        correct = 0
        for y in ids:
            imgs = to_tensor([render(sample_scene(rng, *DEMO_CLASSES[y])) for _ in range(per_class)],
                             model.visual.input_resolution)
            correct += (model.encode_image(imgs) @ txt[list(ids)].t()).argmax(-1).eq(ids.index(y)).sum().item()
        out[which] = 100 * correct / (per_class * len(ids))
    model.train()
    return out


def pretrain(steps=1200, batch_size=128, lr=1e-3, seed=0, log_every=300, model=None, quiet=False):
    """AdamW with CLIP's warm-up + cosine schedule: (the trained model, the per-step losses)."""
    model = model or build(seed)
    model.train()
    rng = random.Random(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / warm if t < warm else
                                              0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm))))
    losses = []
    bar = tqdm(range(steps), desc="pretrain", dynamic_ncols=True, disable=quiet or None)
    for t in bar:
        loss = contrastive_loss(model, *batch(rng, batch_size, model.visual.input_resolution))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if not quiet and log_every and ((t + 1) % log_every == 0 or t + 1 == steps):
            zs = zero_shot(model)
            tqdm.write(f"step {t + 1}/{steps} | loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.3f}"
                       f" | zero-shot base {zs['base']:.1f} new {zs['new']:.1f} (chance {100 / 18:.1f})")
    return model.eval(), losses


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain the demo CLIP on the toy world (weights/demo_clip.pt).")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible per count)")
    ap.add_argument("--out", default=DEMO_CLIP)
    a = ap.parse_args(argv)
    for k in ("steps", "batch_size", "threads", "lr"):  # before anything is trained or written
        if not getattr(a, k) > 0 or not math.isfinite(getattr(a, k)):
            ap.error(f"--{k} {getattr(a, k)}: must be a number > 0")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, losses = pretrain(a.steps, a.batch_size, a.lr, a.seed)
    save_clip(model, a.out)
    zs = zero_shot(clip.load(a.out, device="cpu")[0].float())  # the saved fp16 weights
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 2**20:.1f} MB) in {(time.time() - t0) / 60:.1f} min | "
          f"final loss {sum(losses[-100:]) / len(losses[-100:]):.3f} | zero-shot from the saved file: "
          f"base {zs['base']:.1f}%, new {zs['new']:.1f}% (18-way each, chance 5.6%)")


if __name__ == "__main__":
    main()
