"""MAO's hard-negative sampler (Eq. (4)) with the real all-MiniLM-L6-v2 on the real CoOp class lists."""
import json
import os

import pytest
import torch

from sampler import HardNegativeBatchSampler, check_settings, class_neighbours


def base_classes(splits_dir, fname):
    with open(os.path.join(splits_dir, fname)) as f:
        train = json.load(f)["train"]
    names = dict((y, c) for _, y, c in train)
    n = len(names)
    return [names[i] for i in range((n + 1) // 2)]


def fewshot_labels(num_classes, shots=16):
    return [y for y in range(num_classes) for _ in range(shots)]


@pytest.fixture(scope="module")
def tables(splits_dir, minilm):
    out = {}
    for key, fname in (("dtd", "split_zhou_DescribableTextures.json"), ("pets", "split_zhou_OxfordPets.json"),
                       ("caltech", "split_zhou_Caltech101.json")):
        names = base_classes(splits_dir, fname)
        out[key] = (names, class_neighbours(names, 8, minilm))
    return out


def test_neighbours_are_sensible(tables):
    names, nb = tables["dtd"]
    assert len(names) == 24 and nb.shape == (24, 8)
    top = lambda n: [names[j] for j in nb[names.index(n)]]
    assert top("banded")[0] == "banded" and "lined" in top("banded")  # striped-like textures; "striped" is a new class
    names, nb = tables["pets"]
    assert "american_pit_bull_terrier" in [names[j] for j in nb[names.index("american_bulldog")]]
    names, nb = tables["caltech"]
    close = [names[j] for j in nb[names.index("motorbike")]]
    assert {"airplane", "helicopter", "car_side"} & set(close), close


def test_neighbour_table_is_cosine_topk(minilm):
    names = ["red circle", "red square", "blue circle", "yellow triangle"]
    nb = class_neighbours(names, 3, minilm)
    emb = minilm.encode(names, convert_to_tensor=True, normalize_embeddings=True).cpu()
    assert torch.equal(nb, (emb @ emb.t()).topk(3, dim=1).indices)


@pytest.mark.parametrize("key,b,K", [("dtd", 2, 8), ("pets", 2, 8), ("caltech", 4, 8)])
def test_batches(tables, key, b, K):
    names, nb = tables[key]
    nb = nb[:, :K]
    labels = fewshot_labels(len(names))
    s = HardNegativeBatchSampler(labels, nb, b, seed=3)
    batches = list(s)
    assert len(batches) == len(labels) // b
    for batch in batches:
        classes = [labels[i] for i in batch]
        assert len(classes) == len(set(classes)), "a class repeats within a batch"
        assert len(batch) <= b * K
        assert all(0 <= i < len(labels) for i in batch)  # indices of the few-shot train set
    s.set_epoch(0)
    assert list(s) == batches  # same seed and epoch: same batches
    s.set_epoch(1)
    assert list(s) != batches
    assert list(HardNegativeBatchSampler(labels, nb, b, seed=4)) != batches


def test_each_anchor_is_followed_by_its_nearest_classes():
    """b = 1: a batch is exactly [anchor, one image of each of its K-1 nearest classes], every image anchors once."""
    C, K = 8, 3
    nb = torch.tensor([[c, (c + 3) % C, (c + 5) % C] for c in range(C)])
    labels = fewshot_labels(C, shots=2)
    batches = list(HardNegativeBatchSampler(labels, nb, b=1, seed=0))
    assert sorted(batch[0] for batch in batches) == list(range(len(labels)))
    for batch in batches:
        y = labels[batch[0]]
        assert [labels[i] for i in batch[1:]] == nb[y, 1:].tolist()


def test_used_classes_are_skipped_in_rank_order():
    import random
    nb = torch.tensor([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [2, 1, 0, 3, 4], [3, 2, 1, 0, 4], [4, 3, 2, 1, 0],
                       [5, 4, 3, 2, 1]])
    s = HardNegativeBatchSampler(fewshot_labels(6, 1), nb[:, :4], b=1, seed=0)
    used = {0, 2}
    assert s.negatives(0, used, random.Random(0)) == [1, 3]  # 2 is taken: the next nearest (3) is used instead of it
    assert used == {0, 1, 2, 3}
    used = {0, 1, 2, 3}  # every neighbour taken: the fallback draws min(2, K-1) random unused classes
    negs = s.negatives(0, used, random.Random(0))
    assert len(negs) == 2 and set(negs) <= {4, 5}


def test_fallback_and_no_repeats_on_a_tiny_label_set():
    """EuroSAT-like: 5 classes, b = 2, K = 2. Every anchor gets exactly one negative, classes stay distinct."""
    nb = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2], [4, 3]])
    labels = fewshot_labels(5, shots=4)
    batches = list(HardNegativeBatchSampler(labels, nb, b=2, seed=0))
    for batch in batches:
        classes = [labels[i] for i in batch]
        assert len(batch) in (2, 4) and len(set(classes)) == len(batch)  # one negative per anchor
    # only at the end of an epoch can the remaining anchors all share a class (then the batch has one anchor)
    assert sum(len(b) == 4 for b in batches) >= len(batches) - 2


def test_official_variant_lets_anchor_classes_repeat():
    nb = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2], [4, 3]])
    labels = fewshot_labels(5, shots=8)
    repeated = sum(len({labels[i] for i in batch}) < len(batch)
                   for e in range(5) for batch in _epoch(HardNegativeBatchSampler(labels, nb, 2, seed=0,
                                                                                 distinct_anchors=False), e))
    assert repeated > 0


def _epoch(s, e):
    s.set_epoch(e)
    return list(s)


# -- bad input ---------------------------------------------------------------------------------------------------

def test_settings_are_refused_with_the_largest_valid_values():
    with pytest.raises(ValueError, match="at least 2 base classes"):
        check_settings(1, 1, 2)
    with pytest.raises(ValueError, match="must be smaller than the number of base classes.*--topk 4"):
        check_settings(5, 1, 5)
    with pytest.raises(ValueError, match=r"--anchors 4 x --topk 8 = 32 exceeds the 24 .*--topk 6 with --anchors 4, "
                                         r"or --anchors 3 with --topk 8"):
        check_settings(24, 4, 8)
    with pytest.raises(ValueError, match="no hard negatives"):
        check_settings(10, 2, 1)
    check_settings(24, 2, 8)  # DTD's paper setting is valid
