"""The CoOp protocol on synthetic images placed at the real paths of the published split files."""
import os
import pickle
import shutil
import sys

import pytest
import torch
from PIL import Image

from data import DATASETS, ImageList, ImageReadError, build_transforms, fewshot_splits, read_splits, subsample_classes
from rundir import error_line

# dataset -> (split file, #classes, base, new, train, val, test, base test, new test, first class names)
REAL = {
    "caltech101": ("split_zhou_Caltech101.json", 100, 50, 50, 4128, 1649, 2465, 1549, 916, ["face", "leopard", "motorbike"]),
    "dtd": ("split_zhou_DescribableTextures.json", 47, 24, 23, 2820, 1128, 1692, 864, 828, ["banded", "blotchy", "braided"]),
    "eurosat": ("split_zhou_EuroSAT.json", 10, 5, 5, 13500, 5400, 8100, 4200, 3900, ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"]),
    "oxford_flowers": ("split_zhou_OxfordFlowers.json", 102, 51, 51, 4093, 1633, 2463, 1053, 1410, ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]),
    "oxford_pets": ("split_zhou_OxfordPets.json", 37, 19, 18, 2944, 736, 3669, 1881, 1788, ["abyssinian", "american_bulldog", "american_pit_bull_terrier"]),
    "stanford_cars": ("split_zhou_StanfordCars.json", 196, 98, 98, 6509, 1635, 8041, 4002, 4039, ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan"]),
    "ucf101": ("split_zhou_UCF101.json", 101, 51, 50, 7639, 1898, 3783, 1934, 1849, ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"]),
    "fgvc_aircraft": (None, 100, 50, 50, 3334, 3333, 3333, 1666, 1667, ["707-320", "727-200", "737-200"]),
}


def _png(path, colour=(120, 30, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def place(root, name, splits_dir):
    """Copy the real split files into root/<folder>/ and return the image folder."""
    spec = DATASETS[name]
    ddir = os.path.join(root, spec["folder"])
    image_dir = os.path.join(ddir, spec["images"]) if spec["images"] else ddir
    os.makedirs(image_dir, exist_ok=True)
    if name == "fgvc_aircraft":
        for f in os.listdir(os.path.join(splits_dir, "fgvc_aircraft")):
            shutil.copy(os.path.join(splits_dir, "fgvc_aircraft", f), ddir)
    else:
        shutil.copy(os.path.join(splits_dir, REAL[name][0]), ddir)
    return image_dir


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_split_files(tmp_path, splits_dir, name):
    _, n, nb, nn_, ntr, nva, nte, nbt, nnt, first = REAL[name]
    root = str(tmp_path)
    image_dir = place(root, name, splits_dir)
    full, _ = read_splits(name, root)
    assert (len(full["train"]), len(full["val"]), len(full["test"])) == (ntr, nva, nte)
    assert len({y for _, y, _ in full["train"]}) == n

    splits, image_dir = fewshot_splits(name, root, 16, seed=1)
    assert len(splits["train"]) == 16 * n  # every class of these sets has >= 16 train images
    base, base_names = subsample_classes(splits, "base")
    new, new_names = subsample_classes(splits, "new")
    assert (len(base_names), len(new_names)) == (nb, nn_)
    assert base_names[:3] == first
    assert (len(base["test"]), len(new["test"])) == (nbt, nnt)
    assert sorted({y for _, y, _ in new["test"]}) == list(range(nn_))  # new classes relabelled from 0
    assert new_names[0] == dict((y, c) for _, y, c in full["test"])[nb]  # label nb of the full set is new class 0

    # synthetic images at the real paths of the few-shot subset decode through the real loader
    for rel, _, _ in base["train"][:20]:
        _png(os.path.join(image_dir, rel))
    train_tf, test_tf = build_transforms(32)
    ds = ImageList(image_dir, base["train"][:20], test_tf)
    img, label, idx = ds[3]
    assert img.shape == (3, 32, 32) and idx == 3


def test_fewshot_is_deterministic_cached_and_respects_shots(tmp_path, splits_dir):
    root = str(tmp_path)
    place(root, "dtd", splits_dir)
    a, _ = fewshot_splits("dtd", root, 4, seed=1)
    cache = os.path.join(root, "dtd", "split_fewshot", "shot_4-seed_1.pkl")
    assert os.path.isfile(cache)
    b, _ = fewshot_splits("dtd", root, 4, seed=1)  # from the cache
    os.remove(cache)
    c, _ = fewshot_splits("dtd", root, 4, seed=1)  # sampled again
    d, _ = fewshot_splits("dtd", root, 4, seed=2)
    assert a["train"] == b["train"] == c["train"] and a["train"] != d["train"]
    counts = {}
    for _, y, _ in a["train"]:
        counts[y] = counts.get(y, 0) + 1
    assert set(counts.values()) == {4} and len(counts) == 47
    full, _ = read_splits("dtd", root)
    assert set(a["train"]) <= set(full["train"])


def test_coop_dassl_fewshot_pickles_are_read(tmp_path, splits_dir, monkeypatch):
    """CoOp's own split_fewshot/*.pkl hold dassl Datum objects with absolute paths: read them without dassl."""
    import types
    root = str(tmp_path)
    place(root, "dtd", splits_dir)
    full, _ = read_splits("dtd", root)
    mod = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:  # what dassl pickles: _impath (absolute), _label, _domain, _classname
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname
    Datum.__module__, Datum.__qualname__ = mod.__name__, "Datum"
    mod.Datum = Datum
    monkeypatch.setitem(sys.modules, "dassl", types.ModuleType("dassl"))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    items = full["train"][:5]
    obj = {"train": [Datum(f"/home/someone/DATA/dtd/images/{p}", y, c) for p, y, c in items], "val": []}
    os.makedirs(os.path.join(root, "dtd", "split_fewshot"))
    with open(os.path.join(root, "dtd", "split_fewshot", "shot_1-seed_7.pkl"), "wb") as f:
        pickle.dump(obj, f)
    monkeypatch.delitem(sys.modules, mod.__name__)
    monkeypatch.delitem(sys.modules, "dassl")
    splits, _ = fewshot_splits("dtd", root, 1, seed=7)
    assert splits["train"] == items


def test_imagenet_and_variants_from_folders(tmp_path):
    root = str(tmp_path)
    wnids = ["n02", "n01", "n03"]
    names = {"n01": "tench", "n02": "goldfish", "n03": "great white shark"}
    with open(os.path.join(root, "classnames.txt"), "w") as f:
        f.write("".join(f"{w} {names[w]}\r\n" for w in sorted(wnids)))  # CRLF as in the file in circulation
    inet = os.path.join(root, "imagenet")
    os.makedirs(inet)
    shutil.copy(os.path.join(root, "classnames.txt"), inet)
    for split, n in (("train", 3), ("val", 2)):
        for w in wnids:
            for k in range(n):
                _png(os.path.join(inet, "images", split, w, f"{w}_{k}.JPEG"))
    splits, _ = fewshot_splits("imagenet", root, 2, seed=1)
    assert len(splits["train"]) == 6 and len(splits["test"]) == 6
    assert {(y, c) for _, y, c in splits["test"]} == {(0, "tench"), (1, "goldfish"), (2, "great white shark")}
    assert os.path.isfile(os.path.join(inet, "preprocessed.pkl"))
    # ImageNet-A style: label = index in the sorted list of its own (fewer) folders, names by wnid
    ia = os.path.join(root, "imagenet-adversarial")
    os.makedirs(ia)
    shutil.copy(os.path.join(root, "classnames.txt"), ia)
    for w in ("n03", "n02"):
        _png(os.path.join(ia, "imagenet-a", w, "x.jpg"))
    with open(os.path.join(ia, "imagenet-a", "README.txt"), "w") as f:
        f.write("ignored")
    test = read_splits("imagenet_a", root)[0]["test"]
    assert [(y, c) for _, y, c in test] == [(0, "goldfish"), (1, "great white shark")]


# -- bad input ---------------------------------------------------------------------------------------------------

def test_missing_dataset_folder_names_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dtd.*split_zhou_DescribableTextures.json"):
        read_splits("dtd", str(tmp_path))


def test_missing_split_file(tmp_path):
    os.makedirs(tmp_path / "dtd" / "images")
    with pytest.raises(FileNotFoundError, match="split file .*split_zhou_DescribableTextures.json not found"):
        read_splits("dtd", str(tmp_path))


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'dtdd'.*dtd"):
        read_splits("dtdd", str(tmp_path))


def test_corrupt_image_names_its_path(tmp_path):
    bad = tmp_path / "images" / "x.jpg"
    os.makedirs(bad.parent)
    bad.write_bytes(b"not a jpeg")
    ds = ImageList(str(tmp_path / "images"), [("x.jpg", 0, "x")], build_transforms(32)[1])
    with pytest.raises(ImageReadError, match="cannot read image .*x.jpg"):
        ds[0]
    # from a DataLoader worker the error arrives wrapped in the worker's traceback; error_line recovers its one line
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(ImageReadError) as e:
        next(iter(loader))
    assert "Traceback" in str(e.value)
    line = error_line(e.value)
    assert "\n" not in line and line.startswith("cannot read image") and line.endswith("dataset's source")


def test_more_shots_than_a_class_has(tmp_path, splits_dir):
    place(str(tmp_path), "dtd", splits_dir)
    with pytest.raises(ValueError, match="fewer than --shots 100.*largest valid value for this dataset is 60"):
        fewshot_splits("dtd", str(tmp_path), 100, seed=1)
    assert not os.path.exists(tmp_path / "dtd" / "split_fewshot" / "shot_100-seed_1.pkl")
