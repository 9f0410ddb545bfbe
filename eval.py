"""Evaluation: top-1 accuracy on base / new / all classes, the harmonic mean, and tables over many runs.

    python eval.py --ckpt runs/dtd/coop-mao/shots16_seed1              # a run folder, evaluated as train.py does
    python eval.py --ckpt runs/dtd/coop-none/shots16_seed1/prompt.pt --subsample all
    python eval.py --summarize runs/                                   # mean +- std over seeds (MAO Table 1 layout)

Base-to-new (CoOp protocol, MAO §4.1): base accuracy on the base test split, new accuracy on the new test split,
HM = 2*B*N / (B+N). A MAO run holds two prompts: the base-step prompt scores the base classes and the new-step
prompt the new classes (as the paper's ablations and official code do). Across seeds, base and new are averaged
first and HM is computed from the averages; the average row over datasets does the same with the dataset means.
"""
import argparse
import csv
import glob
import json
import os
import statistics
import sys

import torch
from tqdm import tqdm


def harmonic_mean(base, new):
    """HM = 2 B N / (B + N), the headline metric of base-to-new generalisation."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


@torch.no_grad()
def accuracy(learner, loader, device, desc="eval"):
    """Top-1 accuracy in % over a loader of (image, label, index); text features are computed once."""
    learner.eval()
    from clip_prompt import clip_logits
    text = learner.encode_text()  # (C, E): independent of the image, so once per evaluation
    correct = total = 0
    for images, labels, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        logits = clip_logits(learner.clip, learner.encode_image(images.to(device)), text)  # (B, C)
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def test_loader(image_dir, items, transform, batch_size=100, workers=0):
    from data import ImageList
    return torch.utils.data.DataLoader(ImageList(image_dir, items, transform), batch_size=batch_size,
                                       shuffle=False, num_workers=workers)


# -----------------------------------------------------------------------------
# Re-evaluating checkpoints

def load_checkpoint(path, device="cpu"):
    """A prompt checkpoint written by train.py; fails loudly on a missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(ckpt, dict) or not {"learned", "classnames", "args"} <= set(ckpt):
        raise ValueError(f"{path} is not a prompt checkpoint written by train.py (needs learned, classnames, args)")
    return ckpt


def evaluate_checkpoints(run, subsample=None, overrides=None):
    """Evaluate a run folder or one prompt file. Returns {'base', 'new', 'hm', ...} (or {'all'})."""
    from clip_prompt import build_learner, load_clip
    from data import build_transforms, fewshot_splits, subsample_classes
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if os.path.isdir(run):
        files = {k: os.path.join(run, f"{k}_prompt.pt") for k in ("base", "new")}
        if not all(os.path.isfile(f) for f in files.values()):
            single = os.path.join(run, "prompt.pt")
            if not os.path.isfile(single):
                raise FileNotFoundError(f"{run} holds no base_prompt.pt/new_prompt.pt or prompt.pt (not a train.py run?)")
            files = {"base": single, "new": single}
    elif os.path.isfile(run):
        files = {"base": run, "new": run}
    else:
        raise FileNotFoundError(f"checkpoint {run} not found")
    ckpts = {k: load_checkpoint(f) for k, f in files.items()}
    a = dict(ckpts["base"]["args"])
    if "backbone" in overrides and overrides["backbone"] != ckpts["base"]["backbone"]:
        raise ValueError(f"checkpoint is a '{ckpts['base']['backbone']}' prompt, not '{overrides['backbone']}'")
    a.update(overrides)
    device = a.get("device") or "auto"
    if device == "auto" or (device.startswith("cuda") and not torch.cuda.is_available()):
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU-trained prompt evaluates on CPU too
    device = torch.device(device)
    model = load_clip(a["clip"], device, a.get("precision", "auto"), cache_dir=a["root"])
    _, test_tf = build_transforms(model.visual.input_resolution)
    splits, image_dir = fewshot_splits(a["dataset"], a["root"], a["shots"], a["seed"])
    same_data = a["dataset"] == ckpts["base"]["dataset"]
    results = {}
    for which in ([subsample] if subsample else ["base", "new"]):
        ck = ckpts["new" if which == "new" else "base"]
        sub, names = subsample_classes(splits, which)
        trained_on = ck["subsample"]
        if same_data and trained_on == which and ck["classnames"] != names:
            raise ValueError(f"class names of {files[which if which != 'all' else 'base']} do not match the '{which}' "
                             f"classes of {a['dataset']} under {a['root']}: checkpoint {ck['classnames'][:3]}..., "
                             f"dataset {names[:3]}... (wrong --root, split file or dataset?)")
        learner = build_learner(ck["backbone"], model, names, **ck.get("learner_kwargs", {}))
        learner.load_learned(ck["learned"])
        loader = test_loader(image_dir, sub["test"], test_tf, a.get("test_batch_size", 100), a.get("workers", 0))
        results[which] = accuracy(learner, loader, device, desc=f"test {which}")
    if "base" in results and "new" in results:
        results["hm"] = harmonic_mean(results["base"], results["new"])
    return results


# -----------------------------------------------------------------------------
# Summaries over many runs (mean +- std over seeds, per dataset, plus the average row)

def summarize(root):
    """Group every results.json under root by (backbone, method, dataset); returns rows and writes md + csv."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        if r.get("base") is None or r.get("new") is None:
            continue  # a base-step-only run has no new-step accuracy
        runs.setdefault((r["backbone"], r["method"], r["dataset"]), {})[r["seed"]] = r
    if not runs:
        raise FileNotFoundError(f"no results.json with base and new accuracies under {root}")
    all_seeds = sorted({s for g in runs.values() for s in g})
    rows = []
    for (backbone, method, dataset), by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        base = [by_seed[s]["base"] for s in seeds]
        new = [by_seed[s]["new"] for s in seeds]
        mb, mn = statistics.mean(base), statistics.mean(new)
        rows.append(dict(backbone=backbone, method=method, dataset=dataset, seeds=seeds,
                         missing=[s for s in all_seeds if s not in seeds],
                         base=mb, base_std=statistics.stdev(base) if len(base) > 1 else 0.0,
                         new=mn, new_std=statistics.stdev(new) if len(new) > 1 else 0.0,
                         hm=harmonic_mean(mb, mn)))
    for backbone, method in sorted({(r["backbone"], r["method"]) for r in rows}):
        group = [r for r in rows if r["backbone"] == backbone and r["method"] == method]
        mb = statistics.mean(r["base"] for r in group)
        mn = statistics.mean(r["new"] for r in group)
        rows.append(dict(backbone=backbone, method=method, dataset=f"average ({len(group)} datasets)", seeds=[],
                         missing=[], base=mb, base_std=None, new=mn, new_std=None, hm=harmonic_mean(mb, mn)))

    def pm(m, s):
        return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"
    lines = ["| backbone | method | dataset | base | new | HM | seeds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = ",".join(map(str, r["seeds"])) + (f" (missing {','.join(map(str, r['missing']))})" if r["missing"] else "")
        lines.append(f"| {r['backbone']} | {r['method']} | {r['dataset']} | {pm(r['base'], r['base_std'])} | "
                     f"{pm(r['new'], r['new_std'])} | {r['hm']:.2f} | {seeds} |")
    table = "\n".join(lines)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["backbone", "method", "dataset", "base", "base_std", "new", "new_std", "hm", "seeds", "missing"])
        for r in rows:
            w.writerow([r["backbone"], r["method"], r["dataset"], f"{r['base']:.4f}",
                        "" if r["base_std"] is None else f"{r['base_std']:.4f}", f"{r['new']:.4f}",
                        "" if r["new_std"] is None else f"{r['new_std']:.4f}", f"{r['hm']:.4f}",
                        " ".join(map(str, r["seeds"])), " ".join(map(str, r["missing"]))])
    return rows, table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="a run folder written by train.py, or one prompt .pt file")
    ap.add_argument("--subsample", choices=["base", "new", "all"], help="evaluate one class split only")
    ap.add_argument("--summarize", metavar="DIR", help="tabulate every results.json under DIR")
    ap.add_argument("--root", help="dataset root (default: the one the checkpoint was trained with)")
    ap.add_argument("--dataset", help="evaluate on another dataset (cross-dataset transfer)")
    ap.add_argument("--clip", help="CLIP name or checkpoint path (default: the training one)")
    ap.add_argument("--backbone", help="expected backbone; a checkpoint of another backbone is refused")
    ap.add_argument("--device", help="auto, cpu or cuda")
    ap.add_argument("--workers", type=int, help="DataLoader workers")
    a = ap.parse_args(argv)
    if a.summarize:
        _, table = summarize(a.summarize)
        print(table)
        return
    if not a.ckpt:
        ap.error("give --ckpt or --summarize")
    r = evaluate_checkpoints(a.ckpt, a.subsample, dict(root=a.root, dataset=a.dataset, clip=a.clip,
                                                       backbone=a.backbone, device=a.device, workers=a.workers))
    print(" | ".join(f"{k} {v:.2f}" if k != "hm" else f"HM {v:.2f}" for k, v in r.items()))
    return r


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
