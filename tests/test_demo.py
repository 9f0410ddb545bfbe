"""The embedded demo: the shipped demo CLIP loads with clip.load and recognises held-out demo images far above
chance on base and new classes; pretraining lowers the contrastive loss; the demo command runs end to end."""
import math
import os

import clip
import pytest
import torch

import demo
from clip_prompt import ZeroShotCLIP, frozen_clip, save_clip
from data import build_transforms, fewshot_splits, subsample_classes
import eval as evaluation
from demo import DEMO_CLIP

pytestmark = pytest.mark.skipif(not os.path.isfile(DEMO_CLIP), reason=f"{DEMO_CLIP} not built yet")


def binomial_tail(k, n, p):
    """P(X >= k) for X ~ Binomial(n, p): how likely k or more hits are by guessing."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_shipped_checkpoint_loads_and_is_far_above_chance(demo_root):
    assert os.path.getsize(DEMO_CLIP) < 15 * 2**20
    model, _ = clip.load(DEMO_CLIP, device="cpu")  # OpenAI's loader, as for real weights
    model = frozen_clip(model.float())
    splits, image_dir = fewshot_splits("demo", demo_root, 1, 1)
    test_tf = build_transforms(model.visual.input_resolution)[1]
    for which in ("base", "new"):
        s, names = subsample_classes(splits, which)  # held-out images: the demo's test split
        acc = evaluation.accuracy(ZeroShotCLIP(model, names), evaluation.test_loader(image_dir, s["test"], test_tf), "cpu")
        n = len(s["test"])
        hits = round(acc * n / 100)
        assert binomial_tail(hits, n, 1 / len(names)) < 1e-6, (which, acc)  # guessing would essentially never do this


def test_pretraining_lowers_the_contrastive_loss():
    import random
    torch.manual_seed(0)
    model = demo.build(seed=0)
    images, tokens = demo.batch(random.Random(99), 64, model.visual.input_resolution)  # held-out batch
    with torch.no_grad():
        before = demo.contrastive_loss(model.eval(), images, tokens).item()
    model, losses = demo.pretrain(steps=40, batch_size=32, lr=1e-3, seed=0, model=model, quiet=True)
    with torch.no_grad():
        after = demo.contrastive_loss(model.eval(), images, tokens).item()
    assert after < before - 0.1, (before, after)
    assert math.isfinite(sum(losses))


def test_saved_checkpoint_round_trips_through_clip_load(tmp_path):
    model = demo.build(seed=1).eval()
    path = str(tmp_path / "c.pt")
    save_clip(model, path)
    loaded, _ = clip.load(path, device="cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.half().float().encode_image(x)  # the fp16 round trip is the only difference
        assert torch.allclose(loaded.float().encode_image(x), ref, atol=1e-3)


def test_demo_command_end_to_end(tmp_path, demo_root):
    import train
    out = str(tmp_path / "run")
    res = train.main(["--dataset", "demo", "--root", demo_root, "--device", "cpu", "--workers", "0", "--out", out,
                      "--shots", "4", "--epochs", "2", "--log_every", "1000", "--anchors", "2", "--topk", "3"])
    # (no --clip: the default for the demo is the shipped checkpoint)
    assert res["args"]["clip"] == DEMO_CLIP
    assert 0 <= res["base"] <= 100 and 0 <= res["new"] <= 100


def test_the_frozen_downstream_world():
    """The design the README reports: warm classes are the base half, cool ones the new half; the downstream domain
    shifts only the warm palette and blurs every image; the demo's training crop is declared with the dataset."""
    import random
    from data import DATASETS
    from demo import COLOURS, DEMO_CLASSES, DEMO_PALETTE, render, render_demo, sample_scene
    assert len(DEMO_CLASSES) == 36 == len(set(DEMO_CLASSES))
    assert {c for c, _ in DEMO_CLASSES[:18]} == set(DEMO_PALETTE) == {"red", "orange", "yellow"}
    assert {c for c, _ in DEMO_CLASSES[18:]} == {"green", "blue", "purple"}
    assert DATASETS["demo"]["crop"] == (0.5, 1.0) and "crop" not in DATASETS["dtd"]  # real data keep CoOp's crop
    scene = sample_scene(random.Random(0), "blue", "ring")
    scene.pop("colour2", None)
    sharp = render(scene)
    assert render_demo(scene).tobytes() == sharp.resize((18, 18), 2).resize((64, 64), 2).tobytes()  # blur only
    warm = sample_scene(random.Random(0), "red", "ring")
    warm.pop("colour2", None)
    assert render(warm, colours=dict(COLOURS, **DEMO_PALETTE)).tobytes() != render(warm).tobytes()
