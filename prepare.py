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
import glob
import hashlib
import os
import pathlib
import shutil
import socket
import sys
import urllib.error

import torchvision.datasets as tv

from data import BASE_TO_NEW, DATASETS, dataset_spec, read_image, read_splits
from demo import make_demo
from rundir import error_line, write_whole

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


def altered_split(name, folder):
    """The first file of the shipped split that is in the dataset's folder but not byte for byte the shipped one
    (SHA-256), or None. A CoOp classnames.txt (CLIP's names) is welcome in place of the shipped WordNet one."""
    for rel, h in shipped(name).items():
        there = os.path.join(folder, os.path.basename(rel))
        if os.path.isfile(there) and not rel.endswith("classnames.txt") and sha256(there) != h:
            return there
    return None


def verify_split(name, root):
    """Refuse a split file that is not the published one: every run checks it, as its numbers depend on it."""
    if name in ("demo", "folder") or not shipped(name):
        return
    bad = altered_split(name, os.path.join(root, DATASETS[name]["folder"]))
    if bad:
        raise ValueError(f"{bad} differs from the published split this project ships (splits/SHA256SUMS): results "
                         f"on it are not the benchmark's. Remove it and run python prepare.py {name} --root {root} "
                         f"(or train on your own split with --dataset folder)")


def restore_hint(name, root):
    """How to get a dataset's missing or broken image back: never by editing a split file that runs check."""
    final = os.path.join(root, DATASETS[name]["folder"])
    if name in ("demo", "folder"):
        return (f"Delete {final} and run again: the demo is written anew" if name == "demo" else
                f"Replace the file, or remove its row from {os.path.join(final, 'split_folder.json')}")
    how = f"move {final} away, then python prepare.py {name} --root {root}" if name in AUTO else \
        BY_HAND.get(name, "copy the dataset into {dir} again").format(dir=final)
    return f"Restore it from the dataset's download ({how}); the split file must stay the published one"


def place_splits(name, folder):
    """Copy the shipped files a dataset lacks into its folder, each whole; refuse any that differ from them."""
    for rel in shipped(name):
        dest = os.path.join(folder, os.path.basename(rel))
        if not os.path.isfile(dest):  # whole or not at all: a kill mid-copy leaves no short file to pass as ready
            write_whole(dest, lambda tmp: shutil.copyfile(os.path.join(SPLITS, rel), tmp))
    bad = altered_split(name, folder)
    if bad:
        raise ValueError(f"{bad} differs from the split file this project ships (splits/SHA256SUMS): remove it and "
                         f"run python prepare.py {name} again")


def offline(e):
    """True when an error (or what caused it) is the network's: no route, no name lookup, a refused connection."""
    while e is not None:
        if isinstance(e, (urllib.error.URLError, ConnectionError, socket.gaierror, socket.timeout)):
            return True
        e = e.__cause__ or e.__context__
    return False


def prepare(name, root):
    """One dataset laid out under root as data.py reads it: nothing to do when it is there; downloaded when
    torchvision can; else the steps by hand, in the error. Returns its folder."""
    name, spec = dataset_spec(name)
    final = os.path.join(root, spec["folder"])
    if name == "demo" and not os.path.isdir(final):
        print(f"writing the synthetic demo dataset to {make_demo(root)}")
    if name not in AUTO and not os.path.isdir(final) and name in BY_HAND:
        raise ValueError(BY_HAND[name].format(dir=final) + f"; then python prepare.py {name} --root {root}")
    for stale in glob.glob(f"{final}.tmp*"):  # what a killed preparation left (its process is gone)
        if not os.path.isdir(f"/proc/{stale.rsplit('.tmp', 1)[1]}"):
            shutil.rmtree(stale, ignore_errors=True)
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
            cause = ("its download site could not be reached: this machine has no network connection (prepare it "
                     f"where there is one and copy {final} here)" if offline(e) else "run the same command again")
            raise ValueError(f"preparing {name} failed ({type(e).__name__}: {error_line(e)}); nothing was "
                             f"written to {final}: {cause}") from None
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
        return "missing", how if name not in BY_HAND else BY_HAND[name].format(dir=final) + f"; then {how}"
    try:
        bad = altered_split(name, final)  # a file that is there must be the shipped one
        if bad:
            return "broken", f"{bad} is not the split file this project ships (SHA-256)"
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
    if not items:  # empty image folders: nothing to train or test on
        return "broken", f"{final} lists no images: put the images in place ({os.path.join(final, '...')})"
    n = len({y for _, y, _ in items})
    return "ready", f"{n} classes; train / val / test {' / '.join(str(len(s)) for s in splits.values())} images"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("datasets", nargs="?", help=f"comma list of {', '.join(BASE_TO_NEW)}, or all")
    ap.add_argument("--root", default="data", help="the folder of the datasets (train.py's --root)")
    ap.add_argument("--check", action="store_true", help="report these datasets (default: every benchmark one)")
    a = ap.parse_args(argv)
    names = BASE_TO_NEW if a.datasets in (None, "all") else [dataset_spec(n)[0] for n in a.datasets.split(",")]
    if a.check or not a.datasets:
        rows = {name: check(name, a.root) for name in names}
        for name, (status, what) in rows.items():
            print(f"{name:15} {status:8} {what}")
        return rows
    left = {}  # all: every automatic dataset prepared, what needs a hand listed at the end
    for name in names:
        try:
            print(f"{name}: {prepare(name, a.root)}")
        except ValueError as e:
            if len(names) == 1:
                raise
            left[name] = error_line(e)
            print(f"{name}: not prepared (listed at the end)")
    for name, why in left.items():
        print(f"{name:15} {why}")
    return {name: ("missing", why) for name, why in left.items()}


if __name__ == "__main__":
    try:
        rows = main()
    except (OSError, ValueError) as e:
        sys.exit(f"error: {error_line(e)}")
    except KeyboardInterrupt:
        sys.exit("interrupted: no dataset folder was left half-prepared; run the same command again")
    sys.exit(1 if any(status != "ready" for status, _ in rows.values()) else 0)
