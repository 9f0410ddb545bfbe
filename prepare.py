"""The benchmark's datasets fetched, checked and laid out in one command, split files included.

    python prepare.py dtd,eurosat --root DATA             # download, verify, extract, lay out
    python prepare.py --check --root DATA                 # every dataset: ready, missing (the fix) or broken (what)
    python train.py --dataset dtd --root DATA --download  # the same, before a run

torchvision's dataset classes download each archive (their URLs and checksums, with a progress bar) into a
temporary folder beside the final one; its images are moved, never copied, to where data.py reads them, the
split files this project ships (splits/, their sources and SHA-256 in splits/MANIFEST.md) are copied beside them
and verified, and the folder takes its final name last: a failed or interrupted preparation leaves nothing there.
Where nothing can be automated (ImageNet's licence, UCF101's mid-frames on Google Drive, Stanford Cars' dead
link) it says what to download by hand and where to put it; then the same command adds the split files."""
import argparse
import hashlib
import os
import pathlib
import shutil
import sys

import torchvision.datasets as tv

from data import BASE_TO_NEW, DATASETS, dataset_spec, read_image, read_splits
from demo import make_demo
from rundir import error_line

SPLITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")
# dataset: torchvision's downloader, the folder of its download holding the images, and their folder in the
# CoOp layout ("": the dataset's folder itself; FGVC-Aircraft's data folder holds its images and lists)
AUTO = {"dtd": (tv.DTD, "dtd/dtd/images", "images"), "eurosat": (tv.EuroSAT, "eurosat/2750", "2750"),
        "oxford_pets": (tv.OxfordIIITPet, "oxford-iiit-pet/images", "images"),
        "oxford_flowers": (tv.Flowers102, "flowers-102/jpg", "jpg"),
        "caltech101": (tv.Caltech101, "caltech101/101_ObjectCategories", "101_ObjectCategories"),
        "fgvc_aircraft": (tv.FGVCAircraft, "fgvc-aircraft-2013b/data", ""),
        "food101": (tv.Food101, "food-101/images", "images"), "sun397": (tv.SUN397, "SUN397", "SUN397")}
sha256 = lambda path: hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
COOP = "CoOp's Google Drive (the links in github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"
BY_HAND = {
    "imagenet": "ImageNet's licence forbids an automatic download: sign in at image-net.org, download ILSVRC2012's "
                "train and val images into {dir}/images/train/<wnid>/ and {dir}/images/val/<wnid>/",
    "stanford_cars": "Stanford's link is dead: download cars_train/, cars_test/ and devkit/ (Kaggle's 'stanford-cars-"
                     "dataset' has them) into {dir}/",
    "ucf101": f"download UCF-101-midframes.zip from {COOP} and unzip it into {{dir}}/UCF-101-midframes/"}


def shipped(name):
    """{file under splits/: its SHA-256} of what this project ships for a dataset (splits/SHA256SUMS)."""
    with open(os.path.join(SPLITS, "SHA256SUMS")) as f:
        sums = {path: h for h, path in (line.split() for line in f if line.strip())}
    return {p: h for p, h in sums.items() if p == DATASETS[name]["split"] or p.startswith(name + "/")}


def place_splits(name, folder):
    """Copy the shipped files a dataset lacks into its folder; refuse any that differ from the shipped ones."""
    for rel, h in shipped(name).items():
        dest = os.path.join(folder, os.path.basename(rel))
        if not os.path.isfile(dest):
            shutil.copyfile(os.path.join(SPLITS, rel), dest)
        if sha256(dest) != h and not rel.endswith("classnames.txt"):  # CoOp's CLIP-named one is welcome
            raise ValueError(f"{dest} differs from the split file this project ships (SHA-256 {h[:12]}...): "
                             f"remove it and run python prepare.py {name} again")


def prepare(name, root):
    """One dataset laid out under root as data.py reads it: nothing to do when it is there; downloaded when
    torchvision can; else the steps by hand, in the error. Returns its folder."""
    name, spec = dataset_spec(name)
    final = os.path.join(root, spec["folder"])
    if name == "demo" and not os.path.isdir(final):
        print(f"writing the synthetic demo dataset to {make_demo(root)}")
    if name not in AUTO and not os.path.isdir(final) and name in BY_HAND:
        raise ValueError(BY_HAND[name].format(dir=final) + f"; then python prepare.py {name} --root {root}")
    if name in AUTO and not os.path.isdir(final):
        downloader, images, dest = AUTO[name]
        tmp = f"{final}.tmp{os.getpid()}"
        try:
            downloader(os.path.join(tmp, "download"), download=True)  # progress bar, checksum, extraction
            os.makedirs(os.path.join(tmp, "dataset"), exist_ok=True)
            os.rename(os.path.join(tmp, "download", images), os.path.join(tmp, "dataset", dest))
            place_splits(name, os.path.join(tmp, "dataset"))
            os.rename(os.path.join(tmp, "dataset"), final)  # the final name, last
        except Exception as e:  # a wrong checksum, a cut download, a broken archive: one line, nothing kept
            raise ValueError(f"preparing {name} failed ({type(e).__name__}: {error_line(e)}); nothing was "
                             f"written to {final}: run the same command again") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{name}: laid out in {final}")
    if os.path.isdir(final):
        place_splits(name, final)
    if name in AUTO and spec["split"].endswith(".json") and not os.path.isfile(os.path.join(final, spec["split"])):
        print(f"{name}: its split is in no public repository: put {spec['split']} from {COOP} into {final}/")
    return final


def check(name, root):
    """(status, what): 'ready' with its split sizes, 'missing' with the command or steps that fix it, or
    'broken' with the file or image at fault."""
    final = os.path.join(root, DATASETS[name]["folder"])
    if not os.path.isdir(final):
        how = f"python prepare.py {name} --root {root}"
        return "missing", how if name in AUTO else BY_HAND[name].format(dir=final) + f"; then {how}"
    try:
        for rel, h in shipped(name).items():  # a file that is there must be the shipped one
            there = os.path.join(final, os.path.basename(rel))
            if os.path.isfile(there) and sha256(there) != h and not rel.endswith("classnames.txt"):
                return "broken", f"{there} is not the split file this project ships (SHA-256)"
        split = os.path.join(final, DATASETS[name]["split"])
        if split.endswith(".json") and not os.path.isfile(split):
            return "broken", f"{split} not found: download it from {COOP}"
        splits, image_dir = read_splits(name, root)
        items = [item for split in splits.values() for item in split]
        lost = [rel for rel, _, _ in items if not os.path.isfile(os.path.join(image_dir, rel))]
        if lost:
            return "broken", f"{len(lost)} of {len(items)} images not found, e.g. {os.path.join(image_dir, lost[0])}"
        for split in [s for s in splits.values() if s]:  # one image of each split decodes
            read_image(os.path.join(image_dir, split[0][0]))
    except (OSError, ValueError) as e:
        return "broken", error_line(e)
    n = len({y for _, y, _ in items})
    return "ready", f"{n} classes; train / val / test {' / '.join(str(len(s)) for s in splits.values())} images"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("datasets", nargs="?", help=f"comma list of {', '.join(BASE_TO_NEW)}, or all")
    ap.add_argument("--root", default="data", help="the folder of the datasets (train.py's --root)")
    ap.add_argument("--check", action="store_true", help="report every benchmark dataset under --root")
    a = ap.parse_args(argv)
    if a.check or not a.datasets:
        rows = {name: check(name, a.root) for name in BASE_TO_NEW}
        for name, (status, what) in rows.items():
            print(f"{name:15} {status:8} {what}")
        return rows
    for name in BASE_TO_NEW if a.datasets == "all" else a.datasets.split(","):
        print(f"{name}: {prepare(name, a.root)}")
    return None


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:
        sys.exit(f"error: {error_line(e)}")
