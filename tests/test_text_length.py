"""The text tower's shared prefix (the default) and the prompts' own length against CLIP's 77 positions (--full_text
1): for every learner, MAO's candidate subsets, DPC's P' and DePT's head, logits and gradients within 1e-5 of the
largest entry and the same argmax; a prompt that fills all 77 positions, an [EOS] right after the prefix; no row's
positions reach another row; far fewer positions run."""
import pytest
import torch

from clip_prompt import TextPath, build_learner, encode_token_embeddings, shared_positions
from conftest import near
from dept import DePT, dept_loss
from dpc import DualPrompt, stage2_loss
from losses import dynamic_candidate_loss, dynamic_candidates
from test_learners import NAMES

LONG = " ".join(["red"] * 70)  # "a photo of a" + 70 words + "." : [EOS] at position 76, the last


def step(tiny_clip, monkeypatch, path, name, plugin, names=NAMES):
    """One training step's logits, loss and gradients (all trainable tensors, one vector) on the chosen path."""
    monkeypatch.setattr(tiny_clip, "text_path", TextPath(path, False))
    torch.manual_seed(3)  # the same random prompts on both paths
    kw = dict(depth=2, n_ctx=2 if name == "maple" else 4)
    if name == "promptkd":
        kw = dict(depth=2, teacher=build_learner("promptsrc", tiny_clip, names, n_ctx=4, depth=2))
    m = build_learner(name, tiny_clip, names, **kw).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([3, 0, 4, 0])
    if plugin == "mao":  # Eq. (5)-(6): the batch's candidates only
        candidates, targets = dynamic_candidates(labels)
        out = m(images, candidates)
        loss = dynamic_candidate_loss(out.logits, targets) + sum(out.losses.values())
    elif plugin == "dpc":  # P' substituted into the learner, L_CL over one text row per image
        m = DualPrompt(m, 0.2).train()
        out, (loss, _) = m(images, labels), stage2_loss(m, images, labels)
    else:  # DePT: the learner's CE and its head's
        m = DePT(m).train()
        out, (loss, _) = m(images), dept_loss(m, images, labels)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad and p.grad is not None]
    with torch.no_grad():
        return out.logits, loss, grads, m.eval()(images).logits


@pytest.mark.parametrize("name,plugin", [(n, "mao") for n in ("coop", "maple", "ivlp", "promptsrc", "cocoop",
                                                             "kgcoop", "promptkd")]
                         + [("coop", "dpc"), ("maple", "dpc"), ("cocoop", "dpc"), ("coop", "dept"), ("kgcoop", "dept")])
def test_each_text_path_is_the_77_position_path_up_to_rounding(tiny_clip, monkeypatch, name, plugin):
    full = step(tiny_clip, monkeypatch, "77", name, plugin)
    for path in ("prefix", "prompt"):
        short = step(tiny_clip, monkeypatch, path, name, plugin)
        for a, b in zip(short, full):
            assert near(a, b, rel=1e-5), (name, plugin, path)
        assert torch.equal(short[3].argmax(-1), full[3].argmax(-1))  # the same predictions on the fixed batch
        assert len(short[2]) == len(full[2]) > 0


def test_zero_shot_and_a_prompt_filling_all_77_positions(tiny_clip, monkeypatch):
    names = NAMES + [LONG]
    zs = []
    for path in ("prefix", "prompt", "77"):  # "a photo of a {}.": the template's first words are a shared prefix
        monkeypatch.setattr(tiny_clip, "text_path", TextPath(path, False))
        zs.append(build_learner("zsclip", tiny_clip, names).text_features)
    assert near(zs[0], zs[2], rel=1e-5) and near(zs[1], zs[2], rel=1e-5)
    coop = build_learner("coop", tiny_clip, names)
    assert coop.eot[-1] == 76  # the longest prompt fills the context: all 77 positions run
    short, full = (step(tiny_clip, monkeypatch, f, "coop", "mao", names) for f in ("prefix", "77"))
    assert all(near(a, b, rel=1e-5) for a, b in zip(short, full))


def test_only_the_positions_up_to_the_last_eos_run(tiny_clip, monkeypatch):
    seen, coop = [], build_learner("coop", tiny_clip, NAMES)  # "a photo of a purple ring." : [EOS] at 8
    hook = tiny_clip.transformer.resblocks[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o[..., 0].numel()))
    for path in ("prefix", "prompt", "77"):
        monkeypatch.setattr(tiny_clip, "text_path", TextPath(path, False))
        coop.encode_text()
    hook.remove()
    n, C = int(coop.eot.max()) + 1, len(NAMES)  # positions run: [SOS] and the 4 context vectors once, on the prefix
    assert seen == [5 + (n - 5) * C, n * C, 77 * C]
    x = tiny_clip.token_embedding(torch.zeros(2, 77, dtype=torch.long))
    deep = [torch.zeros(6, x.shape[-1])]  # a deep prompt longer than the [EOS]: its positions still run
    assert encode_token_embeddings(tiny_clip, x, torch.tensor([2, 3]), deep).shape == (2, x.shape[-1])


def test_the_shared_prefix_never_mixes_rows_and_ends_where_they_differ(tiny_clip, monkeypatch):
    torch.manual_seed(0)
    C, D = 4, tiny_clip.ln_final.weight.shape[0]
    shared = torch.randn(1, 6, D).expand(C, -1, -1)  # [SOS] and a context every row holds
    x = torch.cat([shared, torch.randn(C, 71, D)], 1).requires_grad_()
    eot = torch.tensor([6, 9, 12, 76])  # row 0's [EOS] right after the prefix, row 3's at the last position
    assert shared_positions(x, eot) == 6 and shared_positions(x[:1], eot[:1]) == 0  # one row: nothing to share
    feats = {}
    for path in ("prefix", "77"):
        monkeypatch.setattr(tiny_clip, "text_path", TextPath(path, False))
        feats[path] = encode_token_embeddings(tiny_clip, x, eot)
    assert near(feats["prefix"], feats["77"], rel=1e-5)
    feats["prefix"][2].sum().backward()  # one class's feature: the gradient reaches the prefix and its own tokens
    reached = x.grad.abs().sum(-1) > 0  # (C, 77)
    assert reached[0, :6].all() and reached[2, 6:13].all() and reached.sum() == 6 + 7
