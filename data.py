"""Datasets of the CoOp protocol: splits on disk, seeded few-shot subsets, base
/ new classes, transforms.

Every benchmark of MAO (and of CoOp, MaPLe, PromptSRC) reads the files CoOp published. Under
`--root` there is one folder per dataset, as DATASETS lists it: the folder, the image folder inside
it, and the split (a `split_zhou_*.json` from CoOp's Google Drive, or a kind read from folders and
text files). docs/reproduce.md tabulates the layout with each dataset's download. An item is
(relpath, label, classname), relpath relative to the image folder, exactly as in the split JSONs.
The embedded demo (demo.py) is written in the same layout, so it runs through the same code."""
import hashlib
import json
import math
import os
import pathlib
import pickle
import random
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

from rundir import write_json, write_whole

# -----------------------------------------------------------------------------
# The datasets: folder, image folder, split, zero-shot template (CoOp's CUSTOM_TEMPLATES), and the
# training crop's scale range where it is not CoOp's RandomResizedCrop(scale=(0.08, 1))

_TEMPLATE = {"oxford_pets": "a photo of a {}, a type of pet.", "food101": "a photo of {}, a type of food.",
             "oxford_flowers": "a photo of a {}, a type of flower.", "dtd": "{} texture.",
             "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "ucf101": "a photo of a person doing {}.",
             "eurosat": "a centered satellite photo of {}."}
DATASETS = {name: dict(folder=folder, images=images, split=split, template=_TEMPLATE.get(name, "a photo of a {}."))
            for name, folder, images, split in [
                ("imagenet", "imagenet", "images", "imagenet"),
                ("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
                ("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json"),
                ("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
                ("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
                ("food101", "food-101", "images", "split_zhou_Food101.json"),
                ("fgvc_aircraft", "fgvc_aircraft", "images", "fgvc"),
                ("sun397", "sun397", "SUN397", "split_zhou_SUN397.json"),
                ("dtd", "dtd", "images", "split_zhou_DescribableTextures.json"),
                ("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json"),
                ("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
                ("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "imagenetv2"),
                ("imagenet_sketch", "imagenet-sketch", "images", "wnid_folders"),
                ("imagenet_a", "imagenet-adversarial", "imagenet-a", "wnid_folders"),
                ("imagenet_r", "imagenet-rendition", "imagenet-r", "wnid_folders"),
                ("demo", "demo", "images", "split_demo.json"),  # written by demo.make_demo
                ("folder", "", "", "split_folder.json")]}  # --root: one folder per class
# the toy world's objects fill a fifth to two thirds of an image: a crop down to 8 % cuts them away
DATASETS["demo"]["crop"] = (0.5, 1.0)
ALIASES = {"flowers102": "oxford_flowers", "pets": "oxford_pets", "cars": "stanford_cars",
           "aircraft": "fgvc_aircraft", "food-101": "food101", "caltech": "caltech101", "ucf": "ucf101"}
TEST_ONLY = {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
# The benchmark's dataset lists (MAO Tables 1-2, in their column order)
BASE_TO_NEW = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
               "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_TARGETS = BASE_TO_NEW[1:]  # cross-dataset: from all of ImageNet to the rest
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]  # domain generalisation
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def dataset_spec(name):
    """The DATASETS entry for a name or alias; unknown names get the list of valid ones."""
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'. Choose one of: {', '.join(DATASETS)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return name, DATASETS[name]


def _layout_help(name, root):
    spec = DATASETS[name]
    d = os.path.join(root, spec["folder"])
    files = {"imagenet": "classnames.txt and images/train/<wnid>/*.JPEG, images/val/<wnid>/*.JPEG",
             "fgvc": "variants.txt and images_variant_{train,val,test}.txt",
             "imagenetv2": "classnames.txt (a copy of ImageNet's)",
             "wnid_folders": "classnames.txt (a copy of ImageNet's)",
             "split_folder.json": "one folder of images per class"}.get(spec["split"],
                                                                          spec["split"])
    fetch = "" if name in ("demo", "folder") or name in TEST_ONLY else (
        f" Fetch and lay it out with python prepare.py {name} --root {root} (or add --download to train.py); "
        f"where no download can be automated it says what to fetch by hand.")
    return (f"Expected the CoOp layout for '{name}': images under "
            f"{os.path.join(d, spec['images'])}/ and {files} in {d}/ (docs/reproduce.md, 'Datasets').{fetch}")


def _need(path, name, root, what=""):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}{path} not found. " + _layout_help(name, root))


def write_folder_split(root, seed=1, train=0.5, val=0.2):
    """A folder of class folders as a dataset: class names from the folder names ('_' read as a space),
    a seeded 50 / 20 / 30 % split per class (CoOp's read_and_split_data), written once beside the images
    as split_folder.json in CoOp's format, so every later run, seed and method sees the same split."""
    classes = _class_folders(root)
    if len(classes) < 2:
        raise ValueError(f"{root} holds {len(classes)} class folder(s): base-to-new needs at least 2 (one "
                         f"folder of images per class)")
    one_name_each({c: c.replace("_", " ") for c in classes}, f"class folders under {root}")
    rng, splits = random.Random(seed), {"train": [], "val": [], "test": []}
    for y, c in enumerate(tqdm(classes, desc="listing class folders", leave=False, disable=None)):
        images = _list_images(os.path.join(root, c))
        if len(images) < 3:
            raise ValueError(f"class folder {os.path.join(root, c)} holds {len(images)} images "
                             f"({', '.join(IMAGE_EXTS)}); a train / val / test split needs at least 3")
        rng.shuffle(images)
        n_train, n_val = max(1, round(len(images) * train)), max(1, round(len(images) * val))
        for split, part in zip(splits, (images[:n_train], images[n_train:n_train + n_val], images[n_train + n_val:])):
            splits[split] += [[f"{c}/{f}", y, c.replace("_", " ")] for f in part]
    write_json(splits, os.path.join(root, "split_folder.json"))
    print(f"wrote {os.path.join(root, 'split_folder.json')}: {len(classes)} classes (edit it to change the split)")


def one_name_each(names, where):
    """Refuse classes whose names CLIP reads alike (its tokenizer lowercases and joins spaces): their prompts would
    be identical, two classes no prompt can tell apart. names: {what the user named: the class name}."""
    alike = {}
    for what, name in names.items():
        alike.setdefault(" ".join(name.lower().split()), []).append(what)
    twice = [" and ".join(map(repr, v)) for v in alike.values() if len(v) > 1]
    if twice:
        raise ValueError(f"{where}: {'; '.join(twice)} read as one class name ('_' is a space, case is ignored), so "
                         f"their prompts would be identical: rename or merge them")


def read_json(path):
    """A JSON file; a broken one fails in one line that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore or re-download it") from None


# -----------------------------------------------------------------------------
# Reading the full train / val / test splits

def read_classnames(path):
    """ImageNet's classnames.txt: 'wnid name with spaces' per line -> {wnid: name} in file order."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")  # the file in circulation has CRLF endings
            if line.strip():
                wnid, name = line.split(" ", 1)
                names[wnid] = name.strip()
    return names


def _list_images(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))


def _class_folders(root):
    """A folder dataset's classes: its folders, but the few-shot cache and hidden ones (.ipynb_checkpoints)."""
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d != "split_fewshot"
                  and not d.startswith("."))


def read_splits(name, root):
    """Full splits {'train', 'val', 'test'} of items (relpath, label, classname); the image folder."""
    name, spec = dataset_spec(name)
    ddir = os.path.join(root, spec["folder"])
    image_dir = os.path.join(ddir, spec["images"]) if spec["images"] else ddir
    if name == "demo" and not os.path.isdir(ddir):
        raise FileNotFoundError(f"{ddir} not found: python train.py --dataset demo --root {root} "
                                f"writes it")
    _need(ddir, name, root, "dataset folder ")
    kind = spec["split"]
    if name == "folder" and not os.path.isfile(os.path.join(ddir, kind)):
        write_folder_split(ddir)
    if kind.endswith(".json"):
        _need(os.path.join(ddir, kind), name, root, "split file ")
        _need(image_dir, name, root, "image folder ")
        js = read_json(os.path.join(ddir, kind))
        try:
            splits = {k: [(p, int(y), c) for p, y, c in js[k]] for k in ("train", "val", "test")}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{os.path.join(ddir, kind)}: not a CoOp split file ({type(e).__name__}: {e}): it holds "
                             f"train, val and test lists of [image path, label, class name]") from None
        if name == "folder":  # images or classes added after the split was written are in no run: say so
            one_name_each({f"label {y}": c for split in splits.values() for _, y, c in split}, os.path.join(ddir, kind))
            listed = {p for split in splits.values() for p, _, _ in split}
            new = [f"{c}/{f}" for c in _class_folders(ddir) for f in _list_images(os.path.join(ddir, c))
                   if f"{c}/{f}" not in listed]
            if new:
                print(f"note: {len(new)} images under {ddir} are in no split of {kind} (e.g. {new[0]}), so no run "
                      f"uses them: add them to {kind}, or delete it to split the folder again")
    elif kind == "fgvc":  # variant strings are the class names; the line index is the label
        for fn in ["variants.txt"] + [f"images_variant_{s}.txt" for s in ("train", "val", "test")]:
            _need(os.path.join(ddir, fn), name, root)
        with open(os.path.join(ddir, "variants.txt")) as f:
            label = {v: i for i, v in enumerate(line.strip() for line in f if line.strip())}
        splits = {}
        for s in ("train", "val", "test"):
            with open(os.path.join(ddir, f"images_variant_{s}.txt")) as f:
                rows = [line.strip().split(" ", 1) for line in f if line.strip()]  # names: spaces
            splits[s] = [(f"{i}.jpg", label[v], v) for i, v in rows]
    elif kind == "imagenet":
        splits = _read_imagenet(ddir, image_dir, root)
    else:  # the test-only ImageNet variants
        _need(os.path.join(ddir, "classnames.txt"), name, root, "(copy ImageNet's there) ")
        _need(image_dir, name, root, "image folder ")
        names = read_classnames(os.path.join(ddir, "classnames.txt"))
        if kind == "imagenetv2":  # folder i holds ImageNet class i
            folders = [(str(i), i, n) for i, n in enumerate(names.values())]
        else:  # label = index in the sorted folder list (200 folders for -A/-R), names by wnid
            wnids = sorted(d for d in os.listdir(image_dir)
                           if os.path.isdir(os.path.join(image_dir, d)))
            folders = [(w, i, names[w]) for i, w in enumerate(wnids)]
        test = [(f"{d}/{f}", y, n) for d, y, n in folders
                if os.path.isdir(os.path.join(image_dir, d))
                for f in _list_images(os.path.join(image_dir, d))]
        splits = {"train": [], "val": [], "test": test}
    trained = {y for _, y, _ in splits["train"]}
    untrained = {c: y for _, y, c in splits["test"] if trained and y not in trained}
    if untrained:  # it would leave the evaluation silently, and shift the base / new halves (subsample_classes)
        raise ValueError(f"{ddir}: class {', '.join(f'{c!r} (label {y})' for c, y in untrained.items())} has test "
                         f"images but no training images in its split; the base / new halves are drawn from the "
                         f"training labels. Give it training rows, or remove its test rows")
    return splits, image_dir


def _imagenet_source(ddir, image_dir):
    """What ImageNet's listing is built from: classnames.txt's bytes and every class folder's modification time
    (adding or removing an image changes its folder's), so a cached listing is used only while they stand."""
    h = hashlib.sha256(pathlib.Path(ddir, "classnames.txt").read_bytes())
    for s in ("train", "val"):
        with os.scandir(os.path.join(image_dir, s)) as it:
            h.update(repr(sorted((e.name, e.stat().st_mtime_ns) for e in it)).encode())
    return h.hexdigest()


def _read_imagenet(ddir, image_dir, root):
    """ImageNet from folders; the slow listing cached in preprocessed.pkl, as CoOp does, keyed on what it
    was listed from (_imagenet_source): a replaced classnames.txt or an added image lists again."""
    for p in ("classnames.txt", os.path.join(os.path.basename(image_dir), "train"),
              os.path.join(os.path.basename(image_dir), "val")):
        _need(os.path.join(ddir, p), "imagenet", root)
    names = read_classnames(os.path.join(ddir, "classnames.txt"))
    twice = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if twice:  # the WordNet names (splits/imagenet) have crane and maillot twice: one prompt for two classes
        print(f"note: {os.path.join(ddir, 'classnames.txt')} names two classes each {', '.join(twice)}: their "
              f"prompts are identical, so CLIP cannot tell them apart (the first always wins). CoOp's classnames.txt "
              f"(CLIP's names, from its Google Drive) names every class apart: put it there for the paper's numbers")
    cache, source = os.path.join(ddir, "preprocessed.pkl"), _imagenet_source(ddir, image_dir)
    if os.path.isfile(cache):
        with open(cache, "rb") as f:
            obj = pickle.load(f)
        if isinstance(obj, dict) and obj.get("source") == source:
            return {"train": obj["train"], "val": obj["test"], "test": obj["test"]}
    wnids = sorted(os.listdir(os.path.join(image_dir, "train")))  # label: index in the sorted list
    out = {}
    for s in ("train", "val"):
        # NOTE(deviation): CoOp lists files in os.listdir order (filesystem-dependent); we sort them
        out[s] = [(f"{s}/{w}/{f}", y, names[w]) for y, w in enumerate(tqdm(wnids, f"listing {s}", leave=False,
                                                                              disable=None))
                  for f in _list_images(os.path.join(image_dir, s, w))]
    _atomic_pickle({"train": out["train"], "test": out["val"], "source": source}, cache)
    return {"train": out["train"], "val": out["val"], "test": out["val"]}


def _atomic_pickle(obj, path):
    """Write a cache file whole; a read-only dataset folder just skips caching."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_whole(path, lambda tmp: pathlib.Path(tmp).write_bytes(pickle.dumps(obj)))
    except OSError as e:
        print(f"note: could not write cache {path} ({e}); continuing without it")


# -----------------------------------------------------------------------------
# Few-shot subsets (seeded, cached like CoOp's split_fewshot/shot_K-seed_S.pkl)

def fewshot(items, shots, rng, strict=True):
    """shots random items per label, labels in order of appearance (generate_fewshot_dataset)."""
    groups = {}
    for it in items:
        groups.setdefault(it[1], []).append(it)
    out = []
    for group in groups.values():
        if len(group) < shots and strict:
            raise ValueError(f"class '{group[0][2]}' has only {len(group)} training images, fewer "
                             f"than --shots {shots}; the largest valid value for this dataset is "
                             f"{min(map(len, groups.values()))}")
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


class _Datum:
    """Stand-in for dassl's Datum, so CoOp's own split_fewshot pickles can be read without dassl."""
    def __setstate__(self, state):
        self.__dict__.update(state)


class _DasslUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _Datum if module.startswith("dassl") else super().find_class(module, name)


def _from_datum(d, image_dir):
    # CoOp stores absolute paths of the machine that made the file: keep the part below the images
    path = d._impath.replace("\\", "/")
    marker = "/" + os.path.basename(os.path.normpath(image_dir)) + "/"
    rel = path.split(marker, 1)[1] if marker in path else os.path.basename(path)
    return (rel, int(d._label), d._classname)


def fewshot_splits(name, root, shots, seed):
    """The seeded few-shot train (and val) subset, the full test split; cached per (shots, seed)."""
    splits, image_dir = read_splits(name, root)
    name, spec = dataset_spec(name)
    if shots <= 0 or name in TEST_ONLY:
        return splits, image_dir
    cache = os.path.join(root, spec["folder"], "split_fewshot", f"shot_{shots}-seed_{seed}.pkl")
    source = hashlib.sha256(repr((splits["train"], splits["val"])).encode()).hexdigest()  # what it is drawn from
    obj = {}
    if os.path.isfile(cache):
        with open(cache, "rb") as f:
            obj = _DasslUnpickler(f).load()
    coop = bool(obj.get("train")) and not isinstance(obj["train"][0], tuple)  # CoOp's own pickle: used as is
    if coop or obj.get("source") == source:
        conv = lambda xs: [x if isinstance(x, tuple) else _from_datum(x, image_dir) for x in xs]
        few = {"train": conv(obj["train"]), "val": conv(obj.get("val", splits["val"]))}
    else:  # none yet, or drawn from a split since edited; random.Random(seed) draws what CoOp's random.seed does
        rng = random.Random(seed)
        few = {"train": fewshot(splits["train"], shots, rng), "source": source}
        few["val"] = (splits["val"] if name == "imagenet"
                      else fewshot(splits["val"], min(shots, 4), rng, strict=False))
        _atomic_pickle(few, cache)
    return {"train": few["train"], "val": few["val"], "test": splits["test"]}, image_dir


# -----------------------------------------------------------------------------
# Base / new classes (CoOp's subsample_classes): the first ceil(n/2) labels are base, the rest new

def subsample_classes(splits, which):
    """(splits, classnames) of the 'base', 'new' or 'all' classes, relabelled 0..C-1."""
    labels = sorted({y for _, y, _ in splits["train"]} or {y for _, y, _ in splits["test"]})
    m = math.ceil(len(labels) / 2)
    chosen = {"all": labels, "base": labels[:m], "new": labels[m:]}[which]
    relabel = {y: i for i, y in enumerate(chosen)}
    out = {k: [(p, relabel[y], c) for p, y, c in v if y in relabel] for k, v in splits.items()}
    names = {}
    for split in ("train", "test"):
        for _, y, c in out[split]:
            names.setdefault(y, c)
    return out, [names[i] for i in range(len(chosen))]


# -----------------------------------------------------------------------------
# Images and transforms (Dassl's: random resized crop + flip to train, resize + center crop to test)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def build_transforms(resolution, crop=(0.08, 1.0)):
    """(train, test) transforms at the model's input resolution (224 for ViT-B/16); crop: the scale
    range of the training crop (a dataset's "crop" entry in DATASETS, else CoOp's)."""
    norm, bicubic = T.Normalize(CLIP_MEAN, CLIP_STD), T.InterpolationMode.BICUBIC
    train = T.Compose([T.RandomResizedCrop(resolution, scale=crop, interpolation=bicubic),
                       T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(resolution, interpolation=bicubic), T.CenterCrop(resolution),
                      T.ToTensor(), norm])
    return train, test


RESTORE = "Restore it from the dataset's source"  # a run says how, for its dataset (prepare.restore_hint)


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names its path and the fix."""


def read_image(path, decode=True):
    """An RGB image (decode=False: its (width, height), from the header); a broken file fails naming its path."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB") if decode else im.size
    except Exception as e:
        raise ImageReadError(f"cannot read image {path} ({type(e).__name__}: {e}). {RESTORE}") from None


def scan(image_dir, items, threads=1, decode=False, desc=None, keep=None):
    """Every image of items opened in threads (Pillow releases the GIL), in order, with a progress bar: each
    header's (width, height), or (decode) the images where keep[i] (None elsewhere: decoded, checked, dropped)."""
    def load(rel, kept):
        image = read_image(os.path.join(image_dir, rel), decode)
        return image if kept or not decode else None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = pool.map(load, [rel for rel, _, _ in items], [True] * len(items) if keep is None else keep)
        return list(tqdm(jobs, desc=desc, total=len(items), leave=False, disable=None))


def load_images(image_dir, sets, test_items, budget_gb, threads=1):
    """The run's images before it starts: every training image's header checked and every test image decoded
    (a broken or truncated file fails now, naming its path), then training images decoded once and kept, in the
    order of sets, while they fit budget_gb (Pillow holds 4 bytes a pixel): a MAO base-step epoch draws each
    about K times. The rest, and PromptKD's unlabeled set of every training image ("distil", each image once an
    epoch), decode in the loader's workers on every use. Returns ({set: images, None where streamed}, a line)."""
    sizes = {k: scan(image_dir, v, threads, desc=f"checking {k} images") for k, v in sets.items()}
    scan(image_dir, test_items, threads, decode=True, desc="decoding test images", keep=[False] * len(test_items))
    used, decoded, budget = 0, {}, budget_gb * 2**30
    for k, v in sets.items():
        keep = []
        for w, h in sizes[k]:
            keep.append(k != "distil" and used + 4 * w * h <= budget)
            used += 4 * w * h * keep[-1]
        decoded[k] = scan(image_dir, v, threads, True, f"decoding {k} images", keep) if any(keep) else None
    n, kept = sum(map(len, sets.values())), sum(x is not None for v in decoded.values() if v for x in v)
    return decoded, (f"decoded {kept} of the {n} training images once ({used / 2**30:.2f} GB of --cache_gb "
                     f"{budget_gb:g}); the other {n - kept} are decoded in the loader's workers on every use")


class ImageList(torch.utils.data.Dataset):
    """Items decoded in DataLoader workers, or taken from `decoded` (load_images); the transform (a
    fresh random crop for training) runs on every use. Yields (image, label, index); label -1 when
    the item is unlabeled."""

    def __init__(self, image_dir, items, transform, decoded=None):
        self.image_dir, self.items, self.transform, self.decoded = image_dir, items, transform, decoded

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rel, label, _ = self.items[i]
        if self.decoded is not None and self.decoded[i] is not None:
            return self.transform(self.decoded[i]), label, i
        image = read_image(os.path.join(self.image_dir, rel))
        return self.transform(image), label, i


def hide_labels(items):
    """The images without their labels: only paths survive, so training cannot read them."""
    return [(p, -1, "") for p, _, _ in items]
