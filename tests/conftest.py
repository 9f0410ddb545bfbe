"""Shared fixtures: a small random CLIP saved and re-loaded through clip.load, a tiny demo dataset, real MiniLM."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the model hub
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

from clip.model import CLIP

from clip_prompt import TextPath, frozen_clip, load_clip, save_clip
from demo import make_demo

SPLITS = os.path.join(os.path.dirname(__file__), "..", "splits")  # the split files the project ships


def build_tiny_clip(seed=0, width=64, layers=2, resolution=32, patch=8, embed_dim=64):
    """A small clip.model.CLIP with CLIP's vocabulary and 77-token context (random weights, fp16-exact)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIP(embed_dim=embed_dim, image_resolution=resolution, vision_layers=layers,
                     vision_width=width, vision_patch_size=patch, context_length=77, vocab_size=49408,
                     transformer_width=width, transformer_heads=width // 64, transformer_layers=layers)
    for p in model.parameters():  # saved files hold fp16 weights: make the rounding a no-op, reloads exact
        p.data = p.data.half().float()
    return frozen_clip(model)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A clip.model.CLIP (width 64, 2 layers, 32 px) saved as a TorchScript archive like OpenAI's files."""
    path = str(tmp_path_factory.mktemp("clip") / "tiny.pt")
    save_clip(build_tiny_clip(seed=0), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_path):
    return load_clip(tiny_clip_path, "cpu")  # the same clip.load path real weights take


@pytest.fixture
def exact(tiny_clip, monkeypatch):
    """--full_text 1 on the tiny CLIP for one test: its text tower at CLIP's own 77 positions and attention, the
    path bit for bit the released code's (the tests that pin this project to the released tensors take it)."""
    monkeypatch.setattr(tiny_clip, "text_path", TextPath("77", False))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo dataset (the first 12 of the 36 classes, 16 train / 2 val / 4 test images each), CoOp layout."""
    root = str(tmp_path_factory.mktemp("data"))
    make_demo(root, n_train=16, n_val=2, n_test=4, seed=0, num_classes=12)
    return root


@pytest.fixture(scope="session")
def minilm():
    from sampler import load_minilm
    return load_minilm()


@pytest.fixture(scope="session")
def splits_dir():
    return SPLITS


def run_train(tmp_path, demo_root, clip_path, *extra):
    """train.main on the demo set with the tiny CLIP, CPU, no workers, b = 2 and K = 3 for its 6 base classes
    (later flags in extra win); returns (results, out dir)."""
    import train
    out = str(tmp_path / "run")
    argv = ["--dataset", "demo", "--root", demo_root, "--clip", clip_path, "--device", "cpu", "--workers", "0",
            "--out", out, "--shots", "8", "--log_every", "1000", "--anchors", "2", "--topk", "3", *extra]
    return train.main(argv), out


def near(a, b, rel=1e-6):
    """a is b up to float rounding: every entry within rel of b's largest (lists of tensors as one: all gradients), for
    computations that are not the same kernels on the same shapes, whose last bits differ across CPUs and threads."""
    a, b = (torch.cat([x.flatten() for x in t]) if isinstance(t, (list, tuple)) else t for t in (a, b))
    return bool((a - b).abs().max() <= rel * b.abs().max())


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a pass is not luck."""
    import random
    random.seed(0)
    torch.manual_seed(0)
