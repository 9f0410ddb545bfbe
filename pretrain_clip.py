"""Pretrain the small CLIP of the embedded demo on (image, caption) pairs of the toy world (data.py), on a CPU.

    python pretrain_clip.py                              # writes weights/demo_clip.pt (fp16, ~8 MB)
    python pretrain_clip.py --steps 50 --out /tmp/x.pt   # a short run

The model is openai/CLIP's own `clip.model.CLIP` at small widths, with CLIP's tokenizer and vocabulary, trained with
CLIP's symmetric contrastive loss (InfoNCE over the batch in both directions, learnable temperature). Every batch is
drawn fresh from the toy world: random scenes (colour x shape x size x pattern x background, sometimes a second
object) rendered at 64 px and resized to the model's 32 px, each with one caption from several templates that name
some of its attributes. Captions name all six colours, six shapes and the other attribute words, in every pairing,
as web captions would name real concepts; the demo's classes are colour-shape pairs. Deterministic from --seed on
a given machine and thread count. The checkpoint is a TorchScript archive with fp16 weights, as OpenAI's are, so `clip.load(path)` reads it.
"""
import argparse
import copy
import math
import os
import random
import time
import warnings

import clip
import torch
import torch.nn.functional as F
from clip.model import CLIP
from tqdm import tqdm

from data import DEMO_CLASSES, build_transforms, caption, render, sample_scene

ARCH = dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=128, vision_patch_size=4,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=4)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "demo_clip.pt")


def build(seed=0):
    torch.manual_seed(seed)
    return CLIP(**ARCH)  # CLIP's own initialisation


def to_tensor(images, resolution):
    """PIL images -> normalised (B, 3, R, R) with the test transform the demo's own images get (data.py)."""
    test_tf = build_transforms(resolution)[1]
    return torch.stack([test_tf(im) for im in images])


def batch(rng, n, resolution):
    scenes = [sample_scene(rng) for _ in range(n)]
    return to_tensor([render(s) for s in scenes], resolution), clip.tokenize([caption(s, rng) for s in scenes])


def contrastive_loss(model, images, tokens):
    """CLIP's loss: cross-entropy of image->text and text->image over the batch, averaged."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.t()  # (B, B), matching pairs on the diagonal
    target = torch.arange(len(images))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@torch.no_grad()
def zero_shot(model, seed=123, per_class=10, template="a photo of a {}."):
    """Zero-shot top-1 (%) over the 36 demo classes on fresh scenes, for the base half and the new half."""
    model.eval()
    rng = random.Random(seed)
    names = [f"{c} {s}" for c, s in DEMO_CLASSES]
    txt = F.normalize(model.encode_text(clip.tokenize([template.format(n) for n in names])), dim=-1)
    half = (len(names) + 1) // 2
    out = {}
    for which, ids in (("base", range(half)), ("new", range(half, len(names)))):
        correct = total = 0
        for y in ids:
            c, s = DEMO_CLASSES[y]
            imgs = to_tensor([render(sample_scene(rng, c, s)) for _ in range(per_class)], model.visual.input_resolution)
            pred = (F.normalize(model.encode_image(imgs), dim=-1) @ txt[list(ids)].t()).argmax(-1)
            correct += (pred == ids.index(y)).sum().item()
            total += per_class
        out[which] = 100 * correct / total  # among the classes of its own half, as base-to-new evaluates
    model.train()
    return out


def pretrain(steps=1200, batch_size=128, lr=1e-3, seed=0, log_every=300, model=None, quiet=False):
    """Returns the trained model and the list of per-step losses."""
    model = model or build(seed)
    model.train()
    rng = random.Random(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm))))
    losses = []
    bar = tqdm(range(steps), desc="pretrain", dynamic_ncols=True, disable=quiet or None)
    for t in bar:
        images, tokens = batch(rng, batch_size, model.visual.input_resolution)
        loss = contrastive_loss(model, images, tokens)
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
            tqdm.write(f"step {t + 1}/{steps} | loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.3f} | "
                       f"zero-shot base {zs['base']:.1f} new {zs['new']:.1f} (chance {100 / 18:.1f})")
    return model.eval(), losses


def save(model, path):
    """A TorchScript archive with fp16 weights, like OpenAI's files: `clip.load(path)` reads it (openai-clip 1.0.1
    cannot read a plain state dict: its fallback re-reads a file handle the failed JIT load left at the end)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    r = model.visual.input_resolution
    example = (torch.zeros(1, 3, r, r), clip.tokenize(["a photo of a red circle."]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model).float().eval(), example, check_trace=False)
    traced.half()  # clip.load(jit=False) rebuilds the model from these weights with build_model, in fp16 as OpenAI's
    tmp = f"{path}.tmp{os.getpid()}"
    torch.jit.save(traced, tmp)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible per count)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, losses = pretrain(a.steps, a.batch_size, a.lr, a.seed)
    save(model, a.out)
    zs = zero_shot(clip.load(a.out, device="cpu")[0].float())  # what users get: the saved fp16 weights
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 2**20:.1f} MB) in {(time.time() - t0) / 60:.1f} min | "
          f"final loss {sum(losses[-100:]) / len(losses[-100:]):.3f} | zero-shot from the saved file: "
          f"base {zs['base']:.1f}%, new {zs['new']:.1f}% (18-way each, chance 5.6%)")


if __name__ == "__main__":
    main()
