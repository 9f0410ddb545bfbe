"""Frozen CLIP and its learners: zero-shot, CoOp, IVLP, PromptSRC, MaPLe, CoCoOp, KgCoOp, PromptKD.

CLIP (Radford et al., 2021) is used as openai/CLIP ships it: loaded with `clip.load`, never forked
or patched. The encoders below re-run CLIP's own submodules (token embedding, resblocks, ln_final,
...) from the outside, so that learnable prompt tokens can be placed into the sequence.

CoOp (Zhou et al., IJCV 2022, arXiv 2109.01134) learns M context vectors shared by all
classes. For class c the text encoder sees the token sequence (MAO Eq. (1): P = [theta]_1 ...
[theta]_L is the learnable part):

    position: 0      1 .. M          M+1 .. M+len(name)    next   next    rest (up to 77)
    token:    [SOS]  [V1] .. [VM]    [CLASS tokens]        [.]    [EOS]   zero padding

and the class probability is the softmax of scaled cosine similarities (MAO Eq. (3)). In the
base-to-new protocol M = 4, initialised from the embeddings of "a photo of a", so before training
CoOp equals zero-shot CLIP with the template "a photo of a {}." exactly
(tests/test_clip_prompt.py checks this).

Every learner has the same small interface, and nothing here knows about MAO or DPC (this file imports
nothing from sampler.py, losses.py, pseudolabel.py or dpc.py); docs/learners.md is the contract in full:
    learner(images, class_ids) -> Output(logits, frozen_image_features, losses, features)
    learner.encode_image(images), learner.encode_text(class_ids)   # L2-normalised features
    learner.set_classnames(names)                                  # other classes, same tensors
    learner.learned_state(), learner.load_learned(state)           # only the learnable tensors
    learner.prompt_names, frozen_image_encoder, text_per_image     # what DPC copies; what is shared
"""
import copy
import functools
import os
import warnings
import zipfile
from collections import OrderedDict, namedtuple

import torch
import torch.utils.checkpoint

with warnings.catch_warnings():  # openai-clip imports pkg_resources, which setuptools deprecates
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    import clip
import torch.nn as nn
import torch.nn.functional as F
from clip.model import build_model, convert_weights

# -----------------------------------------------------------------------------
# Loading frozen CLIP


def _is_torchscript(path):
    """OpenAI's checkpoints are TorchScript archives; a plain state dict needs build_model."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def load_clip(name, device="cpu", precision="auto", recompute_text=False, full_text=False):
    """Frozen CLIP, in eval mode, from a model name ('ViT-B/16', downloaded once to ~/.cache/clip) or a
    checkpoint path. precision 'fp16' (the paper's, on a GPU): CLIP's own fp16 layout (convert_weights:
    matmul and conv weights fp16, LayerNorms fp32) on any device; 'fp32', or 'auto' on a CPU: fp32.
    recompute_text: its text tower recomputes each block in the backward pass (same gradients, less memory).
    full_text: its text tower at CLIP's own 77 positions and attention, as released (encode_token_embeddings)."""
    try:
        device = torch.device(device)
    except RuntimeError:  # not a device name at all
        pass
    if getattr(device, "type", None) not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: this code runs on cpu or cuda (cpu, cuda, cuda:1, ...)")
    if not os.path.isfile(name) and name not in clip.available_models():
        raise FileNotFoundError(f"CLIP '{name}' is neither a file nor one of {clip.available_models()}")
    try:
        if os.path.isfile(name) and not _is_torchscript(name):
            state = torch.load(name, map_location="cpu", weights_only=True)
            model = build_model(state.get("state_dict", state)).to(device)
        else:
            with warnings.catch_warnings():  # torch deprecates TorchScript (OpenAI's format)
                warnings.simplefilter("ignore")
                model, _ = clip.load(name, device=device, jit=False)
    except Exception as e:  # no network for a name, a file of another kind: torch.load and clip.load fail many ways
        if not os.path.isfile(name):
            raise ValueError(f"--clip {name}: its download failed ({type(e).__name__}: {e}); on a machine without "
                             f"the network, download it once elsewhere and give --clip /path/to/its .pt") from None
        raise ValueError(f"--clip {name}: not a CLIP checkpoint that clip.load or clip.model.build_model "
                         f"can read ({type(e).__name__}); give a model name or OpenAI's .pt file") from None
    if precision == "fp16" or (precision == "auto" and device.type == "cuda"):
        convert_weights(model)  # clip.load already does this on a GPU; on a CPU it returns fp32
    else:
        model = model.float()
    return frozen_clip(model, "77" if full_text else "prefix", recompute_text)


TextPath = namedtuple("TextPath", "positions recompute")  # how a CLIP's text tower runs: frozen_clip


def frozen_clip(model, positions="prefix", recompute=False):
    """CLIP in eval mode with no gradients, and model.text_path, which every text encoding reads: positions 'prefix',
    'prompt' or '77' (--full_text 1: encode_token_embeddings); recompute: each text block recomputed in the backward
    pass (--recompute_text: the same gradients, less memory)."""
    model.text_path = TextPath(positions, recompute)
    return model.eval().requires_grad_(False)


def text_path(model):
    if not hasattr(model, "text_path"):  # a CLIP straight from clip.load or clip.model.CLIP
        raise ValueError("this CLIP has no text_path: prepare it with clip_prompt.frozen_clip(model) (load_clip does)")
    return model.text_path


def save_clip(model, path):
    """A TorchScript archive with fp16 weights, like OpenAI's files, so `clip.load(path)` reads it
    (openai-clip 1.0.1 cannot read a plain state dict: its fallback re-reads a spent file handle)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    r = model.visual.input_resolution
    example = (torch.zeros(1, 3, r, r), clip.tokenize(["a photo of a cat."]))
    tmp = f"{path}.tmp{os.getpid()}"
    with warnings.catch_warnings():  # torch deprecates TorchScript, the format clip.load reads
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model).float().eval(), example, check_trace=False)
        traced.half()  # clip.load(jit=False) rebuilds the model from these weights with build_model
        torch.jit.save(traced, tmp)
    os.replace(tmp, path)


def tokenize(texts):
    """clip.tokenize; a text longer than CLIP's 77 positions is refused in one line, naming what to shorten."""
    try:
        return clip.tokenize(texts)
    except RuntimeError as e:
        raise ValueError(f"{e}: shorten it (--n_ctx, --ctx_init, --template or the class name)") from None


# -----------------------------------------------------------------------------
# Encoders, re-running CLIP's submodules (shapes: C classes, B images, L=77 tokens, D width)

def encode_token_embeddings(model, x, eot, deep=None):
    """Text features from token embeddings x (C, 77, D): CLIP's encode_text after its embedding, the one
    home of every text encoding (learners, zero-shot CLIP, frozen targets, teachers, evaluation).

    The attention is causal, so position i never sees a later one: nothing after a prompt's [EOS] reaches its
    feature, and the leading positions all rows share ([SOS], a context and the deep prompts there, a template's
    first words) have the same hidden states in every row. model.text_path (frozen_clip) says what is run:
    'prefix' (the default) the shared positions once, then each row from there to the largest [EOS], attending to
    the prefix's keys and values (shared_block); 'prompt' every row from [SOS] to the largest [EOS] (causal_block);
    '77' CLIP's own blocks on all 77 positions, bit for bit the released code's tensors. They agree up to float
    rounding (docs/cost.md: what each costs). deep: prompts (n, D) for layers 1..J-1; before block i they replace
    positions 1..n of the hidden state (block i-1's output there), with no positional embedding. None = CoOp."""
    positions, recompute = text_path(model)
    if positions != "77":  # a deep prompt's positions are there even if an [EOS] came before them
        x = x[:, :max(int(eot.max()) + 1, 1 + (len(deep[0]) if deep else 0))]
    P = shared_positions(x, eot, deep) if positions == "prefix" else 0
    x = x + model.positional_embedding[:x.shape[1]].type(x.dtype)  # the layer-0 context gets positions too
    x = x.permute(1, 0, 2)  # NLD -> LND (CLIP's attention is not batch_first)
    pre, x = x[:P, :1], x[P:]  # the shared prefix (P, 1, D), once; each row's own positions (L - P, C, D)
    run = lambda f, *h: torch.utils.checkpoint.checkpoint(f, *h, use_reentrant=False) if recompute and any(
        t.requires_grad for t in h) else f(*h)  # --recompute_text: the block recomputed in the backward pass
    for i, block in enumerate(model.transformer.resblocks):  # each block holds the causal mask
        if deep is not None and 1 <= i <= len(deep):  # positions 1..n, in the prefix where there is one
            h, p = pre if P else x, deep[i - 1]
            h = torch.cat([h[:1], p.to(h.dtype).unsqueeze(1).expand(-1, h.shape[1], -1), h[1 + len(p):]], dim=0)
            pre, x = (h, x) if P else (pre, h)
        if P:
            pre, x = run(functools.partial(shared_block, block), pre, x)
        else:
            x = run(block if positions == "77" else functools.partial(causal_block, block), x)
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = model.ln_final(x).type(model.dtype)
    x = x[torch.arange(x.shape[0], device=x.device), eot - P]  # (C, D) at [EOS]
    return x @ model.text_projection  # (C, E)


def causal_block(block, x):
    """CLIP's ResidualAttentionBlock (its own submodules) on a sequence of L <= 77 positions: its causal mask cut
    to L x L, and is_causal passed with it, which lets scaled_dot_product_attention pick a fused causal kernel."""
    y = block.ln_1(x)
    mask = block.attn_mask[:len(x), :len(x)].to(dtype=x.dtype, device=x.device)
    x = x + block.attn(y, y, y, need_weights=False, attn_mask=mask, is_causal=True)[0]
    return x + block.mlp(block.ln_2(x))


def shared_positions(x, eot, deep=None):
    """P: how many leading positions all rows of x (C, L, D) hold alike, up to the first [EOS] (each row keeps its
    own); 0, for the rows run whole, where that is [SOS] alone, one row, or fewer than the deep prompts replace."""
    same = (x == x[:1]).all(-1).all(0).long().cumprod(0)  # (L,): 1 while every row agrees with the first
    P = min(int(same.sum()), int(eot.min()))
    return P if len(x) > 1 and P > max(1, len(deep[0]) if deep else 0) else 0


def shared_block(block, pre, x):
    """CLIP's ResidualAttentionBlock (its own weights and mask) on a prefix pre (P, 1, D) that the C rows x (R, C, D)
    all follow. What acts position by position (LayerNorms, projections, MLP) runs once on the P + R C positions as
    one batch; in attention the prefix attends causally to itself, and each row to the prefix's keys and values and
    causally to its own positions. nn.MultiheadAttention's projections, split into heads as it splits them."""
    attn, P, (R, C, D) = block.attn, len(pre), x.shape
    heads = lambda t, n: t.reshape(-1, n, attn.num_heads, D // attn.num_heads).permute(1, 2, 0, 3)  # (n, h, L, D/h)
    merge = lambda o: o.permute(2, 0, 1, 3).reshape(-1, D)  # (n, h, L, D/h) -> (L n, D), position-major
    h = torch.cat([pre.reshape(P, D), x.reshape(R * C, D)])  # every position once
    q, k, v = F.linear(block.ln_1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    (qp, kp, vp), (qr, kr, vr) = [heads(t[:P], 1) for t in (q, k, v)], [heads(t[P:], C) for t in (q, k, v)]
    k, v = (torch.cat([a.expand(C, -1, -1, -1), b], 2) for a, b in ((kp, kr), (vp, vr)))  # keys 0 .. P + R - 1
    mask = block.attn_mask[P:P + R, :P + R].to(dtype=h.dtype, device=h.device)
    h = h + attn.out_proj(torch.cat([merge(F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)),
                                     merge(F.scaled_dot_product_attention(qr, k, v, attn_mask=mask))]))
    h = h + block.mlp(block.ln_2(h))
    return h[:P].reshape(P, 1, D), h[P:].reshape(R, C, D)


def encode_text_tokens(model, tokens):
    """CLIP's encode_text of tokenized prompts (N, 77), through encode_token_embeddings (--full_text 1: CLIP's)."""
    if text_path(model).positions == "77":
        return model.encode_text(tokens)
    return encode_token_embeddings(model, model.token_embedding(tokens).type(model.dtype), tokens.argmax(-1))


def encode_image(model, images, shallow=None, deep=None):
    """CLIP's image encoder, optionally with vision prompts (B, 3, R, R) -> (B, E).

    shallow: (n, Dv) prompts appended after the patch tokens at layer 0 (after the positional
    embedding, before ln_pre); deep: prompts (n, Dv) for layers 1..J-1 that replace the last n
    tokens before those blocks. With no prompts this is exactly CLIP's own model.visual."""
    v = model.visual
    if shallow is None:
        return v(images.type(model.dtype))
    x = v.conv1(images.type(model.dtype))  # (B, Dv, grid, grid)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid**2, Dv)
    zeros = torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    cls = v.class_embedding.to(x.dtype) + zeros  # (B, 1, Dv)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1 + grid**2, Dv)
    n = shallow.shape[0]
    x = torch.cat([x, shallow.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
    for i, block in enumerate(v.transformer.resblocks):
        if deep is not None and 1 <= i <= len(deep):
            p = deep[i - 1].to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)  # (n, B, Dv)
            x = torch.cat([x[: x.shape[0] - n], p], dim=0)
        x = block(x)
    return v.ln_post(x[0]) @ v.proj  # CLS token only; every prompt output is dropped


class EncodeCounter:
    """Counts what runs through frozen CLIP: images through the image tower, token sequences through
    the text tower, and how many of each carry gradients (a backward pass follows). Forward hooks on
    the last LayerNorm of each tower, so every learner, teacher and evaluation pass is counted alike."""

    def __init__(self, model):
        self.counts = dict(images=0, images_grad=0, texts=0, texts_grad=0)
        towers = ((model.visual.ln_post, "images"), (model.ln_final, "texts"))
        self.handles = [t.register_forward_hook(self._hook(kind)) for t, kind in towers]

    def _hook(self, kind):
        def hook(module, inputs, output):  # output (N, D) or (N, L, D): N images or sequences
            self.counts[kind] += output.shape[0]
            self.counts[kind + "_grad"] += output.shape[0] if output.requires_grad else 0
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# logits over the requested classes; plain-CLIP image features if the forward computed them (else
# None); losses: the learner's own extra terms {name: scalar}, already weighted (PromptSRC's SCL, {}
# for CoOp), which every step adds unchanged ("other possible loss functions ... are maintained
# unchanged", MAO §3.2); features: (image (B, E), text (C', E) or per image (B, C', E)) before the
# cosine, for plug-ins that read them (DePT's head)
Output = namedtuple("Output", "logits frozen_image_features losses features", defaults=(None,))


def clip_logits(model, image_features, text_features):
    """p(y | I) = softmax(<g(P_t,y), f(P_v, I)> / tau) as logits: cosines of normalised features times
    CLIP's 1/tau = exp(logit_scale) (100 for the released weights) -- MAO Eq. (3). (B, E), (C, E)"""
    return model.logit_scale.exp().float() * image_features @ text_features.t()  # Eq. (3)


def class_texts(learner):
    """The learner's class text features (C, E), once for a pass over many images; None when they
    depend on the image (text_per_image, CoCoOp): class_logits then runs its forward per batch."""
    return None if learner.text_per_image else learner.encode_text()


def class_logits(learner, images, texts=None):
    """Logits (B, C) over all the learner's classes, from class_texts(learner) when given."""
    if texts is None:
        return learner(images).logits
    return clip_logits(learner.clip, learner.encode_image(images), texts)


def zero_shot_text_features(model, classnames, template="a photo of a {}."):
    """Normalised frozen-CLIP text features of template.format(name), '_' read as ' '. (C, E)"""
    device = model.token_embedding.weight.device
    tokens = tokenize([template.format(c.replace("_", " ")) for c in classnames]).to(device)
    with torch.no_grad():
        return F.normalize(encode_text_tokens(model, tokens).float(), dim=-1)


class Learner(nn.Module):
    """What every learner shares: frozen CLIP stays in eval mode, and the learned tensors (by default the
    trainable parameters) are saved and loaded by name."""

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # CLIP stays frozen and in eval mode; only the prompt trains
        return self

    def learned_tensors(self):
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def learned_state(self):
        return {n: v.detach().cpu().clone() for n, v in self.learned_tensors().items()}

    def load_learned(self, state):
        own = self.learned_tensors()
        if set(state) != set(own):
            raise ValueError(f"checkpoint tensors {sorted(state)} do not match the learner's {sorted(own)}")
        for n, p in own.items():
            if state[n].shape != p.shape:
                raise ValueError(f"checkpoint tensor '{n}' has shape {tuple(state[n].shape)}, "
                                 f"this learner expects {tuple(p.shape)} (different --n_ctx or CLIP?)")
            with torch.no_grad():
                p.copy_(state[n].to(p.device, p.dtype))


# -----------------------------------------------------------------------------
# Zero-shot CLIP: the baseline every table starts from

class ZeroShotCLIP(Learner):
    """Frozen CLIP with one hand-crafted template per dataset (CoOp's CUSTOM_TEMPLATES)."""
    frozen_image_encoder, text_per_image = True, False

    def __init__(self, model, classnames, template="a photo of a {}."):
        super().__init__()
        self.clip, self.template = model, template
        self.set_classnames(classnames)

    def set_classnames(self, classnames):
        self.classnames = list(classnames)
        self.text_features = zero_shot_text_features(self.clip, self.classnames, self.template)

    def encode_image(self, images):
        return F.normalize(encode_image(self.clip, images).float(), dim=-1)

    def encode_text(self, class_ids=None):
        return self.text_features if class_ids is None else self.text_features[class_ids]

    def forward(self, images, class_ids=None):
        img = self.encode_image(images)  # (B, E)
        return Output(clip_logits(self.clip, img, self.encode_text(class_ids)), img, {})


# -----------------------------------------------------------------------------
# CoOp: M learnable context vectors shared by all classes (Eq. (1)), CLIP's image encoder untouched

def phrase_context(model, phrase, n):
    """The token embeddings of the phrase's first n words: a context's initial value. (n, D)"""
    ids = tokenize(phrase).to(model.token_embedding.weight.device)
    with torch.no_grad():
        return model.token_embedding(ids)[0, 1:1 + n].float()


class CoOp(Learner):
    """CoOp. Learnable tensors are fp32, cast to CLIP's dtype where they enter the sequence."""
    frozen_image_encoder = True  # image features are plain CLIP's, so others may reuse them
    text_per_image = False  # one set of class text features serves every image (encode_text)
    prompt_names = None  # what DPC duplicates as P'; None: all learnable tensors

    def __init__(self, model, classnames, n_ctx=4, ctx_init="a photo of a", keep_phrase=False):
        super().__init__()
        self.clip = model
        D = model.ln_final.weight.shape[0]
        words = len(ctx_init.split()) if ctx_init else 0
        if ctx_init and not keep_phrase:
            n_ctx = words  # CoOp's rule: M = the number of words of the init phrase
        if ctx_init and n_ctx <= words:
            # V1..VM start at the embeddings of the phrase's first M tokens. MaPLe / IVLP keep
            # the whole phrase in the sequence, so with M = 2 the words "of a" stay fixed
            # after the learnable slots.
            ctx = phrase_context(model, ctx_init, n_ctx)  # (M, D)
            self.prefix = ctx_init
        else:
            ctx = torch.empty(n_ctx, D).normal_(std=0.02)  # (M, D)
            self.prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx)  # Eq. (1): P = [theta]_1 ... [theta]_M
        self.n_ctx = n_ctx
        self.set_classnames(classnames)

    def set_classnames(self, classnames):
        """Re-target to other classes: rebuild only the frozen [SOS] / [CLASS . EOS] buffers."""
        self.classnames = list(classnames)
        device = self.clip.token_embedding.weight.device
        texts = [f"{self.prefix} {c.replace('_', ' ')}." for c in self.classnames]
        tokens = tokenize(texts).to(device)
        with torch.no_grad():
            emb = self.clip.token_embedding(tokens).type(self.clip.dtype)  # (C, 77, D)
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # [SOS]
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:], persistent=False)  # CLASS . EOS
        self.register_buffer("eot", tokens.argmax(-1), persistent=False)  # [EOS]: the largest id

    def tokens(self, class_ids=None):
        """The [SOS] and [CLASS . EOS] embeddings and [EOS] positions of the class ids (all if None)."""
        t = self.token_prefix, self.token_suffix, self.eot
        return t if class_ids is None else tuple(x[class_ids] for x in t)

    def text_features(self, class_ids=None):
        """Text features of the given class ids (all classes if None), before normalisation. (C', E)"""
        pre, suf, eot = self.tokens(class_ids)  # only these classes are encoded
        ctx = self.ctx.to(pre.dtype).unsqueeze(0).expand(pre.shape[0], -1, -1)  # (C', M, D)
        x = torch.cat([pre, ctx, suf], dim=1)  # (C', 77, D): [SOS][V1..VM][CLASS][.][EOS]
        return encode_token_embeddings(self.clip, x, eot, self.deep_text()).float()

    def image_features(self, images):
        return encode_image(self.clip, images, *self.vision_prompts()).float()  # (B, E)

    def encode_text(self, class_ids=None):
        return F.normalize(self.text_features(class_ids), dim=-1)

    def encode_image(self, images):
        return F.normalize(self.image_features(images), dim=-1)

    def deep_text(self):
        return None  # CoOp: shallow text prompt only

    def vision_prompts(self):
        return None, None  # CoOp: CLIP's image encoder untouched

    def forward(self, images, class_ids=None):
        """Logits over class_ids (all classes if None), frozen image features, no extra losses."""
        feats = self.image_features(images), self.text_features(class_ids)  # (B, E), (C', E)
        img, txt = (F.normalize(x, dim=-1) for x in feats)
        frozen = img.detach() if self.frozen_image_encoder else None  # prompted ones are not CLIP's
        return Output(clip_logits(self.clip, img, txt), frozen, {}, feats)


# -----------------------------------------------------------------------------
# IVLP (PromptSRC's backbone): independent deep prompts in both encoders
# (PromptSRC §3.1, 2307.06948)

def deep_prompts(n, dim, depth):
    """The prompts of layers 1..J-1: J-1 free (n, dim) tensors drawn from N(0, 0.02)."""
    return nn.ParameterList(nn.Parameter(torch.empty(n, dim).normal_(std=0.02))
                            for _ in range(depth - 1))


class IVLP(CoOp):
    """n_t text and n_v vision prompts at each of the first J layers of each encoder, independent."""
    frozen_image_encoder = False  # the vision prompts change the image features

    def __init__(self, model, classnames, n_ctx=4, ctx_init="a photo of a", n_vis=4, depth_text=9,
                 depth_vis=9):
        super().__init__(model, classnames, n_ctx, ctx_init, keep_phrase=True)
        Dt, Dv = model.ln_final.weight.shape[0], model.visual.conv1.out_channels
        self.text_prompts = deep_prompts(n_ctx, Dt, depth_text)  # layers 1..J-1, each (n_t, Dt)
        self.vis_ctx = nn.Parameter(torch.empty(n_vis, Dv).normal_(std=0.02))  # layer 0, (n_v, Dv)
        self.vis_prompts = deep_prompts(n_vis, Dv, depth_vis)  # layers 1..J-1, each (n_v, Dv)

    def deep_text(self):
        return list(self.text_prompts)

    def vision_prompts(self):
        return (self.vis_ctx, list(self.vis_prompts)) if self.vis_ctx.shape[0] else (None, None)


# PromptSRC's frozen text targets: the first 60 of CLIP's 80 ImageNet templates (PromptSRC's list)
PROMPTSRC_TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
]


class PromptSRC(IVLP):
    """IVLP plus self-regulation towards frozen CLIP (PromptSRC §3.2): in training its forward also
    returns the three self-regulating consistency terms (L_SCL) as its own extra losses."""

    def __init__(self, model, classnames, n_ctx=4, ctx_init="a photo of a", n_vis=4, depth_text=9,
                 depth_vis=9, text_weight=25.0, image_weight=10.0):
        super().__init__(model, classnames, n_ctx, ctx_init, n_vis, depth_text, depth_vis)
        self.text_weight, self.image_weight = text_weight, image_weight

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self._text_target = None  # needed in training only: built on first use

    @property
    def text_target(self):
        """The frozen text target: the mean of the *unnormalised* 60-template features, normalised."""
        if self._text_target is None:
            device = self.clip.token_embedding.weight.device
            names = [c.replace("_", " ") for c in self.classnames]
            with torch.no_grad():
                tokens = [tokenize([t.format(c) for c in names]).to(device) for t in PROMPTSRC_TEMPLATES]
                feats = torch.stack([encode_text_tokens(self.clip, t).float() for t in tokens])
            self._text_target = F.normalize(feats.mean(0), dim=-1)  # (C, E), once per class list
        return self._text_target

    def forward(self, images, class_ids=None):
        feats = self.image_features(images), self.text_features()  # every class (its losses)
        img, txt = (F.normalize(x, dim=-1) for x in feats)  # (B, E) prompted, (C, E)
        logits_all = clip_logits(self.clip, img, txt)  # (B, C)
        logits = logits_all if class_ids is None else logits_all[:, class_ids]  # the requested ones
        feats = feats if class_ids is None else (feats[0], feats[1][class_ids])
        if not self.training:
            return Output(logits, None, {}, feats)
        with torch.no_grad():  # the frozen image encoder on the same augmented batch
            img0 = F.normalize(encode_image(self.clip, images).float(), dim=-1)  # (B, E)
        t0 = self.text_target  # (C, E)
        reg = self_regulating_losses(txt, t0, img, img0, logits_all, clip_logits(self.clip, img0, t0),
                                     self.text_weight, self.image_weight)
        return Output(logits, img0, reg, feats)


def self_regulating_losses(text, text_target, image, image_target, logits, logits_target,
                           text_weight=25.0, image_weight=10.0):
    """PromptSRC's three consistency terms (PromptSRC §3.2), each towards frozen CLIP:

    text:   mean |t - t0| over the C x E entries of normalised prompted / frozen-template text features
    image:  mean |v - v0| over all B x E entries of the normalised prompted / frozen image features
    logits: sum of p0 * (log p0 - log p) over the batch and all C classes, divided by B * C (released)
    """
    text = F.l1_loss(text, text_target)
    image = F.l1_loss(image, image_target)
    logp, logp0 = F.log_softmax(logits, -1), F.log_softmax(logits_target, -1)
    kl = F.kl_div(logp, logp0, reduction="sum", log_target=True) / logits.numel()
    return {"scl_text": text_weight * text, "scl_image": image_weight * image, "scl_kl": kl}


# -----------------------------------------------------------------------------
# MaPLe: vision prompts are projections of the text prompts at each layer (MaPLe §3.2, 2210.03117)

class MaPLe(CoOp):
    """n text prompts at layers 0..J-1; layer i's vision prompts are Linear(Dt -> Dv) of its text ones."""
    frozen_image_encoder = False

    def __init__(self, model, classnames, n_ctx=2, ctx_init="a photo of a", depth=9):
        super().__init__(model, classnames, n_ctx, ctx_init, keep_phrase=True)
        Dt, Dv = model.ln_final.weight.shape[0], model.visual.conv1.out_channels
        self.proj = nn.Linear(Dt, Dv)  # coupling function of layer 0
        self.text_prompts = deep_prompts(n_ctx, Dt, depth)  # layers 1..J-1
        one = nn.Linear(Dt, Dv)  # released: J-1 deep copies, starting equal
        self.projs = nn.ModuleList(copy.deepcopy(one) for _ in range(depth - 1))

    def deep_text(self):
        return list(self.text_prompts)

    def vision_prompts(self):
        deep = [f(p) for f, p in zip(self.projs, self.text_prompts)]  # (n, Dv) each
        return self.proj(self.ctx), deep


# -----------------------------------------------------------------------------
# CoCoOp: the context shifted per image by a meta-net of its feature (CoCoOp §3.2, arXiv 2203.05557)

class CoCoOp(CoOp):
    """ctx_i = ctx + pi(f(x_i)), pi = Linear(E, E/16) -> ReLU -> Linear(E/16, D) of each image's
    normalised frozen CLIP feature: every image has its own prompt and class text features, so B
    images against C' classes encode B x C' token sequences, one image at a time as released."""
    text_per_image = True
    prompt_names = ("ctx",)  # DPC duplicates the context; the meta-net trains directly

    def __init__(self, model, classnames, n_ctx=4, ctx_init="a photo of a"):
        super().__init__(model, classnames, n_ctx, ctx_init)
        E, D = model.visual.output_dim, model.ln_final.weight.shape[0]
        self.meta_net = nn.Sequential(OrderedDict([("linear1", nn.Linear(E, E // 16)),
                                                   ("relu", nn.ReLU(inplace=True)),
                                                   ("linear2", nn.Linear(E // 16, D))]))

    def text_features(self, class_ids=None):
        raise NotImplementedError("CoCoOp's class texts depend on the image: use its forward")

    def forward(self, images, class_ids=None):
        raw = self.image_features(images)  # (B, E), plain CLIP
        img = F.normalize(raw, dim=-1)
        pre, suf, eot = self.tokens(class_ids)
        shifted = (self.ctx.unsqueeze(0) + self.meta_net(img).unsqueeze(1)).to(pre.dtype)
        logits, texts = [], []
        for f, ctx in zip(img, shifted):  # one image at a time: (E,), (M, D)
            x = torch.cat([pre, ctx.unsqueeze(0).expand(pre.shape[0], -1, -1), suf], 1)
            texts.append(encode_token_embeddings(self.clip, x, eot).float())  # (C', E)
            logits.append(clip_logits(self.clip, f, F.normalize(texts[-1], dim=-1)))  # (C',)
        return Output(torch.stack(logits), img.detach(), {}, (raw, torch.stack(texts)))


# -----------------------------------------------------------------------------
# KgCoOp: CoOp plus a loss keeping the class texts near the hand-crafted ones
# (KgCoOp §3, 2303.13283)

KGCOOP_TEMPLATES = {"{} texture.": "a photo of a {}, a type of texture."}  # CoOp's, but DTD's


class KgCoOp(CoOp):
    """Its own extra loss L_kg = w (1 - mean_c cos(g_c, g0_c)), w = 8, keeps every class's
    learned text feature g_c near frozen CLIP's g0_c for the dataset's hand-crafted
    template. It needs every class's text on every step, so under MAO it encodes them all
    and keeps the candidates' logits."""

    def __init__(self, model, classnames, n_ctx=4, ctx_init="a photo of a",
                 template="a photo of a {}.", kg_weight=8.0):
        super().__init__(model, classnames, n_ctx, ctx_init)
        self.template, self.kg_weight = KGCOOP_TEMPLATES.get(template, template), kg_weight

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self._target = None  # g0, built on first training use for these class names

    def forward(self, images, class_ids=None):
        feats = self.image_features(images), self.text_features()  # (B, E), (C, E): every class
        img, txt = (F.normalize(x, dim=-1) for x in feats)
        logits = clip_logits(self.clip, img, txt)
        logits = logits if class_ids is None else logits[:, class_ids]
        feats = feats if class_ids is None else (feats[0], feats[1][class_ids])
        if not self.training:
            return Output(logits, img.detach(), {}, feats)
        if self._target is None:
            self._target = zero_shot_text_features(self.clip, self.classnames, self.template)
        g0 = F.normalize(self._target, dim=-1)  # normalised twice, as released
        cos = F.cosine_similarity(txt, g0, dim=1, eps=1e-7)
        return Output(logits, img.detach(), {"kg": self.kg_weight * (1.0 - cos.mean())}, feats)


# -----------------------------------------------------------------------------
# PromptKD: a student distilled from a frozen prompted teacher (PromptKD §3, arXiv 2403.02781)

class PromptKD(Learner):
    """The student's image encoder carries IVLP's vision prompts and a projector to the teacher's width;
    it has no text prompt of its own: class texts are the teacher's (a PromptSRC learner, usually on a
    larger CLIP, over every class of the dataset), and its own loss is the KL divergence towards the
    teacher's logits over every class, at temperature T (released: weight 1000, T = 1)."""
    frozen_image_encoder, text_per_image = False, False
    prompt_names = ("text_ctx",)  # the teacher's text context: what DPC duplicates (else frozen)

    def __init__(self, model, classnames, teacher, n_vis=4, depth=9, kd_temperature=1.0, kd_weight=1000.0):
        super().__init__()
        self.clip, self.teacher = model, teacher.requires_grad_(False).eval()
        self.temperature, self.kd_weight = kd_temperature, kd_weight
        Dv, E, Et = model.visual.conv1.out_channels, model.visual.output_dim, teacher.clip.visual.output_dim
        self.vis_ctx = nn.Parameter(torch.empty(n_vis, Dv).normal_(std=0.02))  # layer 0, (n_v, Dv)
        self.vis_prompts = deep_prompts(n_vis, Dv, depth)  # layers 1..J-1
        self.projector = nn.Sequential(nn.Conv2d(E, Et, 1), nn.BatchNorm2d(Et), nn.ReLU(inplace=True),
                                       nn.Conv2d(Et, Et, 1))  # released: 1x1 convolutions, E -> Et
        self.text_ctx = nn.Parameter(teacher.ctx.detach().clone(), requires_grad=False)
        with torch.no_grad():
            self.kd_text = teacher.encode_text()  # (C_all, Et): the teacher's every class, once
        self.set_classnames(classnames)

    def set_classnames(self, classnames):
        """Score other classes: rows of the teacher's class list, which no student changes (learners of
        one run share their teacher)."""
        missing = [c for c in classnames if c not in self.teacher.classnames]
        if missing:
            raise ValueError(f"PromptKD scores its teacher's classes only; not {', '.join(missing[:3])}")
        self.classnames = list(classnames)
        rows = [self.teacher.classnames.index(c) for c in self.classnames]
        self.register_buffer("rows", torch.tensor(rows, device=self.kd_text.device), persistent=False)
        self._text = None

    def own_text_prompts(self):
        """Deep text prompts of its own, trainable, from the teacher's values: the text encoder of the
        released PromptKD+DPC stage 2 (--dpc_text_deep trained) has prompts of its own."""
        self.text_prompts = nn.ParameterList(nn.Parameter(p.detach().clone()) for p in self.teacher.text_prompts)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # both CLIPs stay frozen; the projector's BatchNorm trains
        return self

    def image_features(self, images):
        x = encode_image(self.clip, images, self.vis_ctx, list(self.vis_prompts)).float()  # (B, E)
        return self.projector(x[:, :, None, None]).flatten(1)  # (B, Et)

    def text_features(self, class_ids=None):
        """The teacher's text encoder on the scored classes, with text_ctx as its context. (C', Et)"""
        pre, suf, eot = self.teacher.tokens(self.rows if class_ids is None else self.rows[class_ids])
        x = torch.cat([pre, self.text_ctx.to(pre.dtype).expand(pre.shape[0], -1, -1), suf], dim=1)
        deep = list(self.text_prompts) if hasattr(self, "text_prompts") else self.teacher.deep_text()
        return encode_token_embeddings(self.teacher.clip, x, eot, deep).float()

    def encode_text(self, class_ids=None):
        if self.text_ctx.requires_grad:  # DPC trains P' here: every class encoded on every step, then
            text = self.text_features()  # the rows asked for, as sple_promptkd.py does
            return F.normalize(text if class_ids is None else text[class_ids], dim=-1)
        if self._text is None:  # frozen: once per class list
            with torch.no_grad():
                self._text = F.normalize(self.text_features(), dim=-1)  # (C, Et)
        return self._text if class_ids is None else self._text[class_ids]

    def encode_image(self, images):
        return F.normalize(self.image_features(images), dim=-1)

    def forward(self, images, class_ids=None):
        feats = self.image_features(images), None
        img = F.normalize(feats[0], dim=-1)  # (B, Et)
        out = Output(clip_logits(self.clip, img, self.encode_text(class_ids)), None, {}, feats)
        if not self.training:
            return out
        with torch.no_grad():  # the teacher's logits on the same augmented images, every class
            teacher = clip_logits(self.teacher.clip, self.teacher.encode_image(images), self.kd_text)
        student, T = clip_logits(self.clip, img, self.kd_text), self.temperature  # (B, C_all)
        kd = F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1),
                      reduction="sum") * (T * T) / student.numel()
        return out._replace(losses={"kd": self.kd_weight * kd})

    def learned_tensors(self):
        """The trained tensors, the text context, and the projector's BatchNorm statistics."""
        own = {n: p for n, p in self.named_parameters() if p.requires_grad or n == "text_ctx"}
        return dict(own, **dict(self.projector.named_buffers(prefix="projector")))

    def load_learned(self, state):
        if any(n.startswith("text_prompts.") for n in state) and not hasattr(self, "text_prompts"):
            self.own_text_prompts()
        super().load_learned(state)
        self._text = None


BACKBONES = ("zsclip", "coop", "maple", "promptsrc", "ivlp", "cocoop", "kgcoop", "promptkd")


def build_learner(backbone, model, classnames, n_ctx=4, ctx_init="a photo of a",
                  template="a photo of a {}.", n_vis=4, depth=9, text_weight=25.0, image_weight=10.0,
                  kg_weight=8.0, teacher=None, kd_temperature=1.0, kd_weight=1000.0):
    """The prompt learner for a backbone name, on the device of the frozen CLIP. template: the
    dataset's hand-crafted prompt (zero-shot CLIP's, and KgCoOp's frozen text targets); teacher:
    PromptKD's (a frozen PromptSRC learner over every class)."""
    device = model.token_embedding.weight.device
    if backbone == "zsclip":
        return ZeroShotCLIP(model, classnames, template).to(device)
    if backbone == "coop":
        return CoOp(model, classnames, n_ctx, ctx_init).to(device)
    if backbone == "ivlp":
        return IVLP(model, classnames, n_ctx, ctx_init, n_vis, depth, depth).to(device)
    if backbone == "promptsrc":
        return PromptSRC(model, classnames, n_ctx, ctx_init, n_vis, depth, depth, text_weight,
                         image_weight).to(device)
    if backbone == "maple":
        return MaPLe(model, classnames, n_ctx, ctx_init, depth).to(device)
    if backbone == "cocoop":
        return CoCoOp(model, classnames, n_ctx, ctx_init).to(device)
    if backbone == "kgcoop":
        return KgCoOp(model, classnames, n_ctx, ctx_init, template, kg_weight).to(device)
    if backbone == "promptkd":
        if teacher is None:
            raise ValueError("PromptKD needs its teacher: a PromptSRC run given with --teacher RUN")
        return PromptKD(model, classnames, teacher, n_vis, depth, kd_temperature, kd_weight).to(device)
    raise ValueError(f"unknown backbone '{backbone}'. Choose one of: {', '.join(BACKBONES)}")
