"""CLIP loading and the prompt learners: the outside-run encoders are exactly CLIP's."""
import ast
import os

import clip
import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_clip
from clip_prompt import (CoOp, ZeroShotCLIP, build_learner, encode_image, encode_token_embeddings,
                         frozen_clip, load_clip)

NAMES = ["red circle", "blue_square", "green triangle", "a very long class name with many words"]


def test_clip_load_round_trip_is_exact(tiny_clip_path, tiny_clip):
    ref = build_tiny_clip(seed=0)
    assert tiny_clip.dtype == torch.float32
    for (n, p), (n2, q) in zip(ref.state_dict().items(), tiny_clip.state_dict().items()):
        assert n == n2 and torch.equal(p.float(), q), n
    assert all(not p.requires_grad for p in tiny_clip.parameters())


def test_state_dict_checkpoint_loads_too(tmp_path, tiny_clip):
    path = str(tmp_path / "sd.pt")
    torch.save(tiny_clip.state_dict(), path)
    m = load_clip(path, "cpu")
    tokens = clip.tokenize(["a photo of a dog."])
    assert torch.equal(m.encode_text(tokens), tiny_clip.encode_text(tokens))


def test_unknown_clip_name_is_refused():
    with pytest.raises(FileNotFoundError, match="neither a file nor one of"):
        load_clip("ViT-X/99", "cpu")


def test_outside_encoders_equal_clip(exact, tiny_clip):
    tokens = clip.tokenize(["a photo of a red circle.", "blue square"])
    x = tiny_clip.token_embedding(tokens)
    ours = encode_token_embeddings(tiny_clip, x, tokens.argmax(-1))
    assert torch.equal(ours, tiny_clip.encode_text(tokens))  # --full_text 1: CLIP's own tower, bit for bit
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(encode_image(tiny_clip, images), tiny_clip.encode_image(images))


def test_coop_from_a_photo_of_a_equals_zero_shot_clip(tiny_clip):
    """CoOp initialised from 'a photo of a' reproduces zero-shot CLIP with 'a photo of a {}.' (fp32)."""
    coop = CoOp(tiny_clip, NAMES, ctx_init="a photo of a")
    zs = ZeroShotCLIP(tiny_clip, NAMES, "a photo of a {}.")
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        a, b = coop(images).logits, zs(images).logits
    assert a.shape == (5, len(NAMES))
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_coop_subset_and_retarget(tiny_clip):
    coop = CoOp(tiny_clip, NAMES)
    with torch.no_grad():
        coop.ctx.add_(0.1 * torch.randn_like(coop.ctx))  # a "learned" prompt
        full = coop.encode_text()
        sub = coop.encode_text(torch.tensor([2, 0]))
    assert torch.allclose(sub, full[[2, 0]], atol=1e-6)
    ctx = coop.ctx.detach().clone()
    coop.set_classnames(["yellow circle", "red square"])
    assert torch.equal(coop.ctx, ctx) and coop.encode_text().shape[0] == 2
    with torch.no_grad():  # the re-targeted learner is a learner built for those names with the same ctx
        fresh = CoOp(tiny_clip, ["yellow circle", "red square"])
        fresh.ctx.copy_(ctx)
        assert torch.allclose(coop.encode_text(), fresh.encode_text(), atol=1e-6)


def test_only_context_is_learnable_and_gets_gradients(tiny_clip):
    coop = CoOp(tiny_clip, NAMES)
    learnable = [n for n, p in coop.named_parameters() if p.requires_grad]
    assert learnable == ["ctx"] and coop.ctx.shape == (4, 64)
    loss = F.cross_entropy(coop(torch.randn(2, 3, 32, 32)).logits, torch.tensor([0, 3]))
    loss.backward()
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_coop_parameter_count_at_vit_b16_text_width():
    """CoOp in base-to-new: 4 tokens x 512 = 2,048 learnable parameters with ViT-B/16's text width."""
    from clip.model import CLIP
    m = CLIP(embed_dim=512, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
             context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=1)
    coop = CoOp(frozen_clip(m), ["cat", "dog"])
    assert sum(p.numel() for p in coop.parameters() if p.requires_grad) == 2048
    assert CoOp(m, ["cat"], n_ctx=16, ctx_init="").ctx.shape == (16, 512)  # CoOp paper's random 16-token init


def test_learned_state_round_trip_gives_identical_logits(tiny_clip):
    coop = CoOp(tiny_clip, NAMES)
    with torch.no_grad():
        coop.ctx.add_(torch.randn_like(coop.ctx))
    state = coop.learned_state()
    other = build_learner("coop", tiny_clip, NAMES)
    other.load_learned(state)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(coop(images).logits, other(images).logits)
    with pytest.raises(ValueError, match="shape"):
        CoOp(tiny_clip, NAMES, n_ctx=2, ctx_init="").load_learned(state)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_learner("prograd", tiny_clip, NAMES)


def test_backbone_module_knows_nothing_of_mao():
    """Model-agnostic: clip_prompt.py imports nothing from sampler, losses or pseudolabel."""
    src = open(os.path.join(os.path.dirname(__file__), "..", "clip_prompt.py")).read()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"sampler", "losses", "pseudolabel", "train"}, imported
