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
    C = 8
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


# -- the released code's behaviours (--recipe official), each against a computation written here ------------------

@pytest.mark.parametrize("fname,identical,differ", [("split_zhou_OxfordPets.json", 0, 11),
                                                     ("split_zhou_Caltech101.json", 22, 22),
                                                     ("split_zhou_UCF101.json", 0, 45)])
def test_default_table_embeds_the_bank_raw_and_the_queries_spaced(splits_dir, minilm, fname, identical, differ):
    """The default Eq. (4) table equals, row for row, the released one: bank from the raw names ('_' kept), queries
    with '_' -> ' '. The counts against the symmetric table are the ones docs/deviations.md reports."""
    names = base_classes(splits_dir, fname)
    enc = lambda xs: minilm.encode(xs, convert_to_tensor=True, normalize_embeddings=True).float().cpu()
    released = (enc([n.replace("_", " ") for n in names]) @ enc(names).t()).topk(8, dim=1).indices
    default = class_neighbours(names, 8, minilm)
    assert torch.equal(default, released)
    spaced = class_neighbours(names, 8, minilm, bank="spaced")
    assert sum(torch.equal(a, b) for a, b in zip(default, spaced)) == identical
    negatives = lambda t, i: set([c for c in t[i].tolist() if c != i][:7])
    assert sum(negatives(default, i) != negatives(spaced, i) for i in range(len(names))) == differ


def test_names_without_underscores_give_the_same_table_either_way(tables, minilm):
    names, nb = tables["dtd"]
    assert torch.equal(class_neighbours(names, 8, minilm, bank="spaced"), nb)


def test_released_batches_keep_K_negatives_when_the_class_is_outside_its_top_k():
    import random
    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [2, 3, 4], [2, 4, 0], [3, 2, 0], [4, 3, 2]])  # rows 0, 1, 3, 4, 5: y not in Top-3
    labels = fewshot_labels(6, 1)
    paper = HardNegativeBatchSampler(labels, nb, b=1, seed=0)
    released = HardNegativeBatchSampler(labels, nb, b=1, seed=0, released=True)
    assert paper.negatives(0, {0}, random.Random(0)) == [1, 2]  # "up to K-1"
    assert released.negatives(0, {0}, random.Random(0)) == [1, 2, 3]  # the released cap test never acts: K
    assert released.negatives(2, {2}, random.Random(0)) == [3, 4]  # y in its Top-K: K-1 either way


def test_released_fallback_draws_from_1_to_high_and_tops_up_to_two_even_at_K_2():
    """Every neighbour taken: the released fallback makes h draws of randint(1, h) (h = C-1 for MAO, C-2 for CoOp+DPC),
    keeping unused classes until the anchor has 2 negatives, so class 0 (and for DPC the last class) is never drawn,
    K = 2 can give 3 images per anchor, and unlucky draws can leave fewer than 2."""
    import random
    C = 6
    nb = torch.tensor([[c, (c + 1) % C] for c in range(C)])  # K = 2
    labels = fewshot_labels(C, 2)
    for high, allowed in ((C - 1, set(range(1, C))), (C - 2, set(range(1, C - 1)))):
        s = HardNegativeBatchSampler(labels, nb, b=1, seed=0, released=True, fallback_high=high)
        seen, sizes = set(), []
        for seed in range(300):
            rng = random.Random(seed)
            negs = s.negatives(3, {3, 4}, rng)  # class 3's only neighbour (4) is taken
            # the same draws by hand: h tries, each randint(1, h), kept if unused, stopping at 2
            hand, used, ref = [], {3, 4}, random.Random(seed)
            for _ in range(high):
                r = ref.randint(1, high)
                if len(hand) >= 2:
                    break
                if r not in used:
                    hand.append(r)
                    used.add(r)
            assert negs == hand
            seen.update(negs)
            sizes.append(len(negs))
        assert seen == allowed - {3, 4} and max(sizes) == 2  # 2 negatives > K-1 = 1 happen
    paper = HardNegativeBatchSampler(labels, nb, b=1, seed=0)
    seen = set()
    for seed in range(300):
        negs = paper.negatives(3, {3, 4}, random.Random(seed))
        assert len(negs) == 1  # min(2, K-1) = 1: B' <= b*K
        seen.update(negs)
    assert seen == {0, 1, 2, 5}  # uniform over every unused class, class 0 included


def test_a_released_mao_batch_can_repeat_an_anchor_class_and_uses_one_text_row_per_image():
    from losses import dynamic_candidates
    nb = torch.tensor([[c, (c + 1) % 12, (c + 2) % 12] for c in range(12)])
    labels = fewshot_labels(12, 4)
    s = HardNegativeBatchSampler(labels, nb, b=4, seed=0, distinct_anchors=False, released=True)
    repeated = 0
    for e in range(3):
        for batch in _epoch(s, e):
            y = torch.tensor([labels[i] for i in batch])
            candidates, targets = dynamic_candidates(y, dedup=False)
            assert torch.equal(candidates, y) and torch.equal(targets, torch.arange(len(batch)))  # a row per image
            repeated += len(set(y.tolist())) < len(batch)
    assert repeated > 0  # two anchors of one class in a batch: their text rows repeat
