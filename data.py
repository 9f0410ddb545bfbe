"""Datasets of the CoOp protocol: splits on disk, seeded few-shot subsets, base/new classes, transforms.

Every benchmark in MAO (and CoOp, MaPLe, PromptSRC) reads the same files that CoOp published. The layout under
`--root` (one folder per dataset; `split_zhou_*.json` from CoOp's Google Drive, DATASETS.md of KaiyangZhou/CoOp):

| --dataset       | folder under root      | images in                                  | split / class files                                  | source |
|-----------------|------------------------|--------------------------------------------|------------------------------------------------------|--------|
| imagenet        | imagenet/              | images/train/<wnid>/, images/val/<wnid>/   | classnames.txt                                       | image-net.org (ILSVRC-2012) |
| caltech101      | caltech-101/           | 101_ObjectCategories/                      | split_zhou_Caltech101.json                           | data.caltech.edu |
| oxford_pets     | oxford_pets/           | images/                                    | split_zhou_OxfordPets.json                           | robots.ox.ac.uk/~vgg/data/pets |
| stanford_cars   | stanford_cars/         | (the folder itself: cars_train/, cars_test/) | split_zhou_StanfordCars.json                       | ai.stanford.edu/~jkrause/cars |
| oxford_flowers  | oxford_flowers/        | jpg/                                       | split_zhou_OxfordFlowers.json                        | robots.ox.ac.uk/~vgg/data/flowers/102 |
| food101         | food-101/              | images/                                    | split_zhou_Food101.json                              | data.vision.ee.ethz.ch/cvl/food-101 |
| fgvc_aircraft   | fgvc_aircraft/         | images/                                    | variants.txt, images_variant_{train,val,test}.txt    | robots.ox.ac.uk/~vgg/data/fgvc-aircraft |
| sun397          | sun397/                | SUN397/                                    | split_zhou_SUN397.json                               | vision.princeton.edu/projects/2010/SUN |
| dtd             | dtd/                   | images/                                    | split_zhou_DescribableTextures.json                  | robots.ox.ac.uk/~vgg/data/dtd |
| eurosat         | eurosat/               | 2750/                                      | split_zhou_EuroSAT.json                              | github.com/phelber/EuroSAT |
| ucf101          | ucf101/                | UCF-101-midframes/                         | split_zhou_UCF101.json                               | CoOp's Google Drive (mid-frames) |
| imagenetv2      | imagenetv2/            | imagenetv2-matched-frequency-format-val/<0..999>/ | classnames.txt (copy of ImageNet's)           | github.com/modestyachts/ImageNetV2 |
| imagenet_sketch | imagenet-sketch/       | images/<wnid>/                             | classnames.txt                                       | github.com/HaohanWang/ImageNet-Sketch |
| imagenet_a      | imagenet-adversarial/  | imagenet-a/<wnid>/                         | classnames.txt                                       | github.com/hendrycks/natural-adv-examples |
| imagenet_r      | imagenet-rendition/    | imagenet-r/<wnid>/                         | classnames.txt                                       | github.com/hendrycks/imagenet-r |
| demo            | demo/                  | images/<class>/                            | split_demo.json (written by `make_demo`)             | generated here, no download |

An item is `(relpath, label, classname)`, relpath relative to the image folder, exactly like the split JSONs.
"""
import json
import math
import os
import pickle
import random

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

# -----------------------------------------------------------------------------
# The datasets: folder, image folder, how the split is stored, the zero-shot template (CoOp's CUSTOM_TEMPLATES),
# and the training crop's scale range where it is not CoOp's RandomResizedCrop(scale=(0.08, 1))

DATASETS = {
    "imagenet":        dict(folder="imagenet", images="images", split="imagenet", template="a photo of a {}."),
    "caltech101":      dict(folder="caltech-101", images="101_ObjectCategories", split="split_zhou_Caltech101.json", template="a photo of a {}."),
    "oxford_pets":     dict(folder="oxford_pets", images="images", split="split_zhou_OxfordPets.json", template="a photo of a {}, a type of pet."),
    "stanford_cars":   dict(folder="stanford_cars", images="", split="split_zhou_StanfordCars.json", template="a photo of a {}."),
    "oxford_flowers":  dict(folder="oxford_flowers", images="jpg", split="split_zhou_OxfordFlowers.json", template="a photo of a {}, a type of flower."),
    "food101":         dict(folder="food-101", images="images", split="split_zhou_Food101.json", template="a photo of {}, a type of food."),
    "fgvc_aircraft":   dict(folder="fgvc_aircraft", images="images", split="fgvc", template="a photo of a {}, a type of aircraft."),
    "sun397":          dict(folder="sun397", images="SUN397", split="split_zhou_SUN397.json", template="a photo of a {}."),
    "dtd":             dict(folder="dtd", images="images", split="split_zhou_DescribableTextures.json", template="{} texture."),
    "eurosat":         dict(folder="eurosat", images="2750", split="split_zhou_EuroSAT.json", template="a centered satellite photo of {}."),
    "ucf101":          dict(folder="ucf101", images="UCF-101-midframes", split="split_zhou_UCF101.json", template="a photo of a person doing {}."),
    "imagenetv2":      dict(folder="imagenetv2", images="imagenetv2-matched-frequency-format-val", split="imagenetv2", template="a photo of a {}."),
    "imagenet_sketch": dict(folder="imagenet-sketch", images="images", split="wnid_folders", template="a photo of a {}."),
    "imagenet_a":      dict(folder="imagenet-adversarial", images="imagenet-a", split="wnid_folders", template="a photo of a {}."),
    "imagenet_r":      dict(folder="imagenet-rendition", images="imagenet-r", split="wnid_folders", template="a photo of a {}."),
    # the toy world's objects fill a fifth to two thirds of a small image: a crop down to 8 % of it would cut them away
    "demo":            dict(folder="demo", images="images", split="split_demo.json", template="a photo of a {}.",
                            crop=(0.5, 1.0)),
}
ALIASES = {"flowers102": "oxford_flowers", "pets": "oxford_pets", "cars": "stanford_cars", "aircraft": "fgvc_aircraft",
           "food-101": "food101", "caltech": "caltech101", "ucf": "ucf101"}
TEST_ONLY = {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
# The benchmark's dataset lists (MAO Tables 1-2, in their column order)
BASE_TO_NEW = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
               "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_TARGETS = BASE_TO_NEW[1:]  # cross-dataset: trained on all ImageNet classes, evaluated zero-shot on the other 10
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]  # domain generalisation from ImageNet
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
             "fgvc": "variants.txt, images_variant_train.txt, images_variant_val.txt, images_variant_test.txt",
             "imagenetv2": "classnames.txt (a copy of ImageNet's)",
             "wnid_folders": "classnames.txt (a copy of ImageNet's)"}.get(spec["split"], spec["split"])
    return (f"Expected the CoOp layout for '{name}': images under {os.path.join(d, spec['images'])}/ and {files} "
            f"in {d}/. See the dataset table in data.py or the README (section 'Datasets').")


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
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


def read_splits(name, root):
    """Full splits {'train','val','test'} of items (relpath, label, classname) and the image folder."""
    name, spec = dataset_spec(name)
    ddir = os.path.join(root, spec["folder"])
    image_dir = os.path.join(ddir, spec["images"]) if spec["images"] else ddir
    if not os.path.isdir(ddir):
        if name == "demo":
            raise FileNotFoundError(f"{ddir} not found: create it with `python data.py --make_demo --root {root}` "
                                    f"(train.py does this by itself for --dataset demo).")
        raise FileNotFoundError(f"dataset folder {ddir} not found. " + _layout_help(name, root))
    kind = spec["split"]

    if kind.endswith(".json"):
        path = os.path.join(ddir, kind)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"split file {path} not found. " + _layout_help(name, root))
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder {image_dir} not found. " + _layout_help(name, root))
        with open(path) as f:
            js = json.load(f)
        splits = {k: [(p, int(y), c) for p, y, c in js[k]] for k in ("train", "val", "test")}

    elif kind == "fgvc":  # variant strings are the class names; line index is the label
        need = ["variants.txt"] + [f"images_variant_{s}.txt" for s in ("train", "val", "test")]
        for fn in need:
            if not os.path.isfile(os.path.join(ddir, fn)):
                raise FileNotFoundError(f"{os.path.join(ddir, fn)} not found. " + _layout_help(name, root))
        with open(os.path.join(ddir, "variants.txt")) as f:
            variants = [line.strip() for line in f if line.strip()]
        label = {v: i for i, v in enumerate(variants)}
        splits = {}
        for s in ("train", "val", "test"):
            with open(os.path.join(ddir, f"images_variant_{s}.txt")) as f:
                rows = [line.strip().split(" ", 1) for line in f if line.strip()]  # names may contain spaces
            splits[s] = [(f"{i}.jpg", label[v], v) for i, v in rows]

    elif kind == "imagenet":
        splits = _read_imagenet(ddir, image_dir, root)

    else:  # the test-only ImageNet variants
        cn_path = os.path.join(ddir, "classnames.txt")
        if not os.path.isfile(cn_path):
            raise FileNotFoundError(f"{cn_path} not found (copy ImageNet's classnames.txt there). "
                                    + _layout_help(name, root))
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder {image_dir} not found. " + _layout_help(name, root))
        names = read_classnames(cn_path)
        if kind == "imagenetv2":  # folder i holds ImageNet class i
            folders = [(str(i), i, n) for i, n in enumerate(names.values())]
        else:  # label = index in the sorted folder list (200 folders for -A/-R), names looked up by wnid
            wnids = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
            folders = [(w, i, names[w]) for i, w in enumerate(wnids)]
        test = [(f"{d}/{f}", y, n) for d, y, n in folders if os.path.isdir(os.path.join(image_dir, d))
                for f in _list_images(os.path.join(image_dir, d))]
        splits = {"train": [], "val": [], "test": test}
    return splits, image_dir


def _read_imagenet(ddir, image_dir, root):
    """ImageNet from folders; the (slow) listing is cached in imagenet/preprocessed.pkl as CoOp does."""
    cache = os.path.join(ddir, "preprocessed.pkl")
    if os.path.isfile(cache):
        with open(cache, "rb") as f:
            obj = pickle.load(f)
        if isinstance(obj, dict) and "train" in obj and obj["train"] and isinstance(obj["train"][0], tuple):
            return {"train": obj["train"], "val": obj["test"], "test": obj["test"]}
    cn_path = os.path.join(ddir, "classnames.txt")
    for p in (cn_path, os.path.join(image_dir, "train"), os.path.join(image_dir, "val")):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found. " + _layout_help("imagenet", root))
    names = read_classnames(cn_path)
    wnids = sorted(os.listdir(os.path.join(image_dir, "train")))  # label = index in the sorted train folders
    out = {}
    for s in ("train", "val"):
        # NOTE(deviation): CoOp lists files in os.listdir order (filesystem-dependent); we sort them
        out[s] = [(f"{s}/{w}/{f}", y, names[w]) for y, w in enumerate(wnids)
                  for f in _list_images(os.path.join(image_dir, s, w))]
    _atomic_pickle({"train": out["train"], "test": out["val"]}, cache)
    return {"train": out["train"], "val": out["val"], "test": out["val"]}


def _atomic_pickle(obj, path):
    """Write a cache file whole or not at all; a read-only dataset folder just skips caching."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            pickle.dump(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        print(f"note: could not write cache {path} ({e}); continuing without it")
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# Few-shot subsets (seeded, cached like CoOp's split_fewshot/shot_K-seed_S.pkl)

def fewshot(items, shots, rng, strict=True):
    """shots random items per label, labels in order of first appearance (CoOp's generate_fewshot_dataset)."""
    groups = {}
    for it in items:
        groups.setdefault(it[1], []).append(it)
    out = []
    for y, group in groups.items():
        if len(group) < shots and strict:
            smallest = min(len(g) for g in groups.values())
            raise ValueError(f"class '{group[0][2]}' has only {len(group)} training images, fewer than "
                             f"--shots {shots}; the largest valid value for this dataset is {smallest}")
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


class _Datum:
    """Stand-in for dassl's Datum so CoOp's own split_fewshot pickles can be read without dassl."""
    def __setstate__(self, state):
        self.__dict__.update(state)


class _DasslUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("dassl"):
            return _Datum
        return super().find_class(module, name)


def _from_datum(d, image_dir):
    # CoOp stores absolute paths of the machine that made the file: keep the part below the image folder.
    path = d._impath.replace("\\", "/")
    marker = "/" + os.path.basename(os.path.normpath(image_dir)) + "/"
    rel = path.split(marker, 1)[1] if marker in path else os.path.basename(path)
    return (rel, int(d._label), d._classname)


def fewshot_splits(name, root, shots, seed):
    """The seeded few-shot train (and val) subset plus the full test split. Cached per (shots, seed)."""
    splits, image_dir = read_splits(name, root)
    name, spec = dataset_spec(name)
    if shots <= 0 or name in TEST_ONLY:
        return splits, image_dir
    ddir = os.path.join(root, spec["folder"])
    cache = os.path.join(ddir, "split_fewshot", f"shot_{shots}-seed_{seed}.pkl")
    if os.path.isfile(cache):
        with open(cache, "rb") as f:
            obj = _DasslUnpickler(f).load()
        conv = lambda xs: [x if isinstance(x, tuple) else _from_datum(x, image_dir) for x in xs]
        few = {"train": conv(obj["train"]), "val": conv(obj.get("val", splits["val"]))}
    else:
        # random.Random(seed) draws the same numbers as CoOp's random.seed(seed) followed by the same calls
        rng = random.Random(seed)
        few = {"train": fewshot(splits["train"], shots, rng)}
        few["val"] = splits["val"] if name == "imagenet" else fewshot(splits["val"], min(shots, 4), rng, strict=False)
        _atomic_pickle(few, cache)
    return {"train": few["train"], "val": few["val"], "test": splits["test"]}, image_dir


# -----------------------------------------------------------------------------
# Base / new classes (CoOp's subsample_classes): first ceil(n/2) labels are base, the rest new, each relabelled from 0

def subsample_classes(splits, which):
    """Keep the 'base', 'new' or 'all' classes in every split, relabelled 0..C-1; returns (splits, classnames)."""
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
# Images and transforms (Dassl's: random resized crop + flip for training, resize + center crop for testing)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def build_transforms(resolution, crop=(0.08, 1.0)):
    """(train, test) transforms sized from the loaded model's input resolution (224 for ViT-B/16); crop: the scale
    range of the training crop (a dataset's "crop" entry in DATASETS, else CoOp's)."""
    norm = T.Normalize(CLIP_MEAN, CLIP_STD)
    bicubic = T.InterpolationMode.BICUBIC
    train = T.Compose([T.RandomResizedCrop(resolution, scale=crop, interpolation=bicubic),
                       T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(resolution, interpolation=bicubic), T.CenterCrop(resolution), T.ToTensor(), norm])
    return train, test


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names its path and the fix."""


def error_line(e):
    """The one line to show for an error. An error raised in a DataLoader worker arrives wrapped in the worker's
    traceback text; its last line is the original message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def read_image(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise ImageReadError(f"cannot read image {path} ({type(e).__name__}: {e}). Re-download it or remove it "
                             f"from the split file.") from None


def decode_all(image_dir, items, threads=1):
    """Every image of items decoded once, in parallel threads (Pillow releases the GIL while decoding), as RGB PIL
    images in item order. Few-shot training sets are small (16 shots x classes), and a MAO base-step epoch draws each
    training image about K times (as an anchor and as a negative), so decoding once per run removes the costliest
    part of loading; DataLoader workers forked afterwards share the decoded pixels."""
    from concurrent.futures import ThreadPoolExecutor
    paths = [os.path.join(image_dir, rel) for rel, _, _ in items]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(read_image, paths))


def check_images(image_dir, items):
    """Open every image's header (no decoding): a missing or unreadable file fails now, naming its path."""
    for rel, _, _ in items:
        path = os.path.join(image_dir, rel)
        try:
            Image.open(path).close()
        except Exception as e:
            raise ImageReadError(f"cannot read image {path} ({type(e).__name__}: {e}). Re-download it or remove "
                                 f"it from the split file.") from None


class ImageList(torch.utils.data.Dataset):
    """Items decoded in DataLoader workers, or taken from `decoded` (decode_all) when given; either way the transform
    (a fresh random crop for training) runs on every use. Yields (image, label, index); unlabeled items carry -1."""

    def __init__(self, image_dir, items, transform, decoded=None):
        self.image_dir, self.items, self.transform, self.decoded = image_dir, items, transform, decoded

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rel, label, _ = self.items[i]
        image = self.decoded[i] if self.decoded is not None else read_image(os.path.join(self.image_dir, rel))
        return self.transform(image), label, i


def hide_labels(items):
    """The new step's images without their labels: only paths survive, so training cannot read them."""
    return [(p, -1, "") for p, _, _ in items]


# -----------------------------------------------------------------------------
# The toy world of the embedded demo: coloured shapes with nameable attributes, and captions describing them.
# pretrain_clip.py pretrains the small demo CLIP on (image, caption) pairs of this world. make_demo writes the
# downstream task, a colour x shape classification set in the CoOp layout (so it runs through the real code), seen
# through a downstream domain that pretraining never saw and its captions never name (render_demo): the shape of
# the real benchmark, where a learned prompt can fix what the hand-written one gets wrong on the base classes.

COLOURS = {"red": (215, 35, 35), "orange": (245, 140, 25), "yellow": (235, 215, 40), "green": (40, 160, 60),
           "blue": (40, 80, 215), "purple": (135, 55, 185)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = {"dark": (15, 70), "grey": (95, 150), "light": (175, 240)}
CAPTIONS = (
    "a photo of a {colour} {shape}.", "a {colour} {shape}.", "{colour} {shape}", "a {size} {colour} {shape}.",
    "a {pattern} {colour} {shape}.", "a {colour} {shape} on a {bg} background.", "a photo of a {size} {shape}.",
    "a {shape} that is {colour}.", "a photo of something {colour}.", "a drawing of a {pattern} {shape}.",
    "a {size} {pattern} {colour} {shape} on a {bg} background.", "a {colour} {shape} and a small {colour2} {shape2}.",
    "a photo of a {colour} {shape} next to a {colour2} {shape2}.",
)
# The downstream domain: an out-of-focus camera (every image blurred: 64 px down to 18 px and back) whose palette
# shifts the warm hues towards their neighbours (80 % of the way to an orange-red, a yellow-orange and a lime). The
# blur costs both halves accuracy that no text prompt can restore; the palette shift is a text-side mismatch a
# learned prompt can correct, for the classes it is trained on.
DEMO_BLUR = 18
DEMO_PALETTE = {"red": (229, 83, 31), "orange": (239, 176, 33), "yellow": (195, 213, 44)}
# The class order: the 18 warm-coloured classes first (the base half under the CoOp protocol), the 18 cool-coloured
# ones after (new), each half in a fixed shuffled order. A prompt fitted to the base classes learns the warm
# palette's correction, which the new classes do not need (README, 'The embedded demo').
DEMO_CLASSES = [[(c, s) for c in COLOURS for s in SHAPES if (c in DEMO_PALETTE) == warm] for warm in (True, False)]
_order = random.Random(2025)
for _half in DEMO_CLASSES:
    _order.shuffle(_half)
DEMO_CLASSES = DEMO_CLASSES[0] + DEMO_CLASSES[1]


def sample_scene(rng, colour=None, shape=None):
    """Attributes of one image: the main object (colour, shape, size, pattern), background, optional distractor."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    scene = dict(colour=colour, shape=shape, size=rng.choice(("small", "large")), pattern=rng.choice(PATTERNS),
                 bg=rng.choice(list(BACKGROUNDS)), angle=rng.uniform(-20, 20), seed=rng.getrandbits(32))
    if rng.random() < 0.4:  # a smaller second object of another colour and shape: the label stays the main one
        scene["colour2"] = rng.choice([c for c in COLOURS if c != colour])
        scene["shape2"] = rng.choice([x for x in SHAPES if x != shape])
    return scene


def caption(scene, rng):
    """One of several templates; those naming a second object are used only when there is one."""
    ok = [t for t in CAPTIONS if "colour2" not in t or "colour2" in scene]
    return rng.choice(ok).format(**scene)


def _outline(shape, cx, cy, r, angle):
    """Polygon vertices of a shape (circle and ring are drawn as ellipses)."""
    if shape == "square":
        pts = [(r * 0.85 * x, r * 0.85 * y) for x, y in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    elif shape == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.42 * r) * math.cos(math.radians(-90 + 36 * k)),
                (r if k % 2 == 0 else 0.42 * r) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]
    else:  # cross
        w = 0.33 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _paint(im, shape, rgb, pattern, cx, cy, r, angle, rng):
    """Draw one object: a mask of the shape, filled with its colour (rgb) and pattern."""
    size = im.size[0]
    mask = Image.new("L", im.size, 0)
    d = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            q = 0.55 * r
            d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    else:
        d.polygon(_outline(shape, cx, cy, r, angle), fill=255)
    fill = np.empty((size, size, 3), np.float32)
    fill[:] = rgb
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "striped":  # lighter bands, so the colour name still describes the object
        t = rng.uniform(0, math.pi)
        band = (np.sin((xx * math.cos(t) + yy * math.sin(t)) * 2 * math.pi / 7) > 0.3)
        fill[band] = fill[band] * 0.55 + 255 * 0.45
    elif pattern == "dotted":
        dots = ((xx % 7 - 3) ** 2 + (yy % 7 - 3) ** 2) <= 2
        fill[dots] = fill[dots] * 0.55 + 255 * 0.45
    im.paste(Image.fromarray(fill.astype(np.uint8)), (0, 0), mask)


def render(scene, size=64, colours=COLOURS):
    """The image of a scene: deterministic given the scene (its seed drives placement and noise)."""
    rng = random.Random(scene["seed"])
    lo, hi = BACKGROUNDS[scene["bg"]]
    g = rng.randint(lo, hi)
    tint = [rng.randint(-12, 12) for _ in range(3)]
    im = Image.new("RGB", (size, size), tuple(max(0, min(255, g + t)) for t in tint))
    r = size * (rng.uniform(0.30, 0.40) if scene["size"] == "large" else rng.uniform(0.20, 0.27))
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if "colour2" in scene:  # the distractor first, in a corner away from the main object, then partly covered
        r2 = r * rng.uniform(0.45, 0.6)
        x2 = r2 if cx > size / 2 else size - r2
        y2 = r2 if cy > size / 2 else size - r2
        _paint(im, scene["shape2"], colours[scene["colour2"]], "plain", x2, y2, r2, rng.uniform(-20, 20), rng)
    _paint(im, scene["shape"], colours[scene["colour"]], scene["pattern"], cx, cy, r, scene["angle"], rng)
    a = np.asarray(im, np.float32) + np.random.default_rng(scene["seed"]).normal(0, 6, (size, size, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def render_demo(scene, size=64):
    """A scene as the downstream domain shows it: the shifted palette, then the blur."""
    im = render(scene, size, dict(COLOURS, **DEMO_PALETTE))
    return im.resize((DEMO_BLUR, DEMO_BLUR), Image.BILINEAR).resize((size, size), Image.BILINEAR)


def make_demo(root, n_train=20, n_val=4, n_test=25, seed=0, num_classes=36):
    """Write root/demo/: the first num_classes of DEMO_CLASSES (warm classes first), 64x64 PNGs of the downstream
    domain, and split_demo.json in the CoOp format. The scenes are not the ones the demo CLIP saw."""
    ddir = os.path.join(root, "demo")
    rng = random.Random(10_000 + seed)  # pretrain_clip.py draws its scenes from other seeds
    splits = {"train": [], "val": [], "test": []}
    tmp = ddir + f".tmp{os.getpid()}"
    for y, (c, s) in enumerate(DEMO_CLASSES[:num_classes]):
        name = f"{c}_{s}"
        os.makedirs(os.path.join(tmp, "images", name), exist_ok=True)
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for k in range(n):
                rel = f"{name}/{split}_{k:03d}.png"
                render_demo(sample_scene(rng, c, s)).save(os.path.join(tmp, "images", rel))
                splits[split].append([rel, y, f"{c} {s}"])
    with open(os.path.join(tmp, "split_demo.json"), "w") as f:
        json.dump(splits, f, indent=1)
    os.replace(tmp, ddir)  # appears whole, so an interrupted run never leaves a half-written dataset
    return ddir


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Inspect a dataset or write the synthetic demo set.")
    ap.add_argument("--root", default="data")
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--make_demo", action="store_true")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.make_demo or (a.dataset == "demo" and not os.path.isdir(os.path.join(a.root, "demo"))):
        print("wrote", make_demo(a.root))
    sp, _ = fewshot_splits(a.dataset, a.root, a.shots, a.seed)
    for which in ("base", "new"):
        s, names = subsample_classes(sp, which)
        print(f"{which}: {len(names)} classes, train {len(s['train'])}, test {len(s['test'])}; first: {names[:3]}")
