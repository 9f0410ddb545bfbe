"""Reporting: the papers' numbers, our runs tabulated in the paper's layouts beside them, and the paper's figures.

    python eval.py --summarize runs/          # Table 1 / Table 2 layouts, mean +- std over seeds, paper beside ours
    python eval.py --plot runs/               # Fig. 3 (HM bars per backbone), Fig. 4 (--topk / --new_shots curves)

Every finished run leaves a results.json (train.py) and, for cross-dataset runs, a transfer.json (eval.py). Across
seeds, base and new are averaged first and HM is computed from the averages; the average row over datasets does the
same with the dataset means (this reproduces the papers' reported averages from their per-dataset numbers). A run
that changed a setting from the paper's (its `variant` in results.json) is tabulated as its own row.
"""
import csv
import glob
import json
import os
import statistics

from data import BASE_TO_NEW, DG_TARGETS, XD_TARGETS
from eval import harmonic_mean

# -----------------------------------------------------------------------------
# The papers' numbers (METHODS.md A6 for MAO Tables 1-2, B8 for DPC; BACKBONES.md §12 for zero-shot CLIP)

def _table(text):
    """'B N H | B N H | ...' in data.BASE_TO_NEW order -> {dataset: (B, N, H)}."""
    return {d: tuple(float(x) for x in cell.split()) for d, cell in zip(BASE_TO_NEW, text.split("|"))}


PAPER_B2N = {  # MAO Table 1 (baselines and +MAO); DPC's table gives base and H, its new = the baseline's new
    ("coop", "none"): _table("76.41 68.85 72.43 | 97.55 94.65 96.08 | 95.06 97.60 96.31 | 75.69 70.14 72.81 | 96.96 68.37 80.19 | 90.49 91.47 90.98 | 37.33 24.24 29.39 | 80.99 74.10 77.39 | 80.09 49.88 61.47 | 87.60 51.62 64.96 | 83.66 66.31 73.98"),
    ("coop", "mao"): _table("76.53 68.82 72.47 | 98.06 94.20 96.09 | 95.53 98.32 96.90 | 77.24 75.32 76.27 | 96.77 77.38 86.00 | 91.03 91.63 91.33 | 39.56 31.79 35.25 | 80.73 76.29 78.45 | 80.44 59.66 68.51 | 87.12 67.74 76.22 | 84.28 74.20 78.92"),
    ("coop", "dpc"): _table("77.72 68.85 73.02 | 98.58 94.65 96.58 | 95.80 97.60 96.69 | 81.13 70.14 75.24 | 98.86 68.37 80.84 | 91.15 91.47 91.31 | 45.56 24.24 31.64 | 82.81 74.10 78.21 | 84.61 49.88 62.76 | 93.40 51.62 66.49 | 87.02 66.31 75.27"),
    ("maple", "none"): _table("76.91 67.96 72.16 | 97.98 94.50 96.21 | 95.23 97.67 96.44 | 77.63 71.21 74.28 | 97.03 72.67 83.10 | 89.85 90.47 90.16 | 40.82 34.01 37.11 | 81.54 75.93 78.63 | 82.18 55.63 66.35 | 94.96 72.19 82.02 | 84.55 74.15 79.01"),
    ("maple", "mao"): _table("76.79 68.72 72.53 | 98.13 94.47 96.27 | 95.85 97.54 96.69 | 79.90 75.12 77.43 | 97.06 77.47 86.17 | 91.14 91.23 91.18 | 41.88 32.45 36.57 | 81.43 76.78 79.04 | 83.14 62.02 71.04 | 95.65 70.87 81.42 | 84.89 74.83 79.54"),
    ("maple", "dpc"): _table("77.94 67.96 72.61 | 98.64 94.50 96.53 | 95.82 97.67 96.73 | 79.56 71.21 75.15 | 98.20 72.67 83.53 | 91.35 90.47 90.90 | 49.78 34.01 40.41 | 82.02 75.93 78.86 | 85.48 55.63 67.40 | 98.33 72.19 83.26 | 88.14 74.15 80.54"),
    ("promptsrc", "none"): _table("77.28 70.72 73.85 | 97.93 94.21 96.03 | 95.41 97.30 96.34 | 76.34 74.98 75.65 | 97.06 73.19 83.45 | 90.83 91.58 91.20 | 39.20 35.33 37.16 | 82.28 78.08 80.13 | 83.45 54.31 65.80 | 92.84 74.73 82.80 | 85.28 78.13 81.55"),
    ("promptsrc", "mao"): _table("76.51 72.53 74.47 | 98.13 94.12 96.08 | 95.59 96.92 96.25 | 80.91 76.01 78.38 | 95.54 77.94 85.85 | 90.79 91.23 91.01 | 45.32 33.29 38.38 | 81.51 77.42 79.41 | 84.26 64.25 72.91 | 94.88 70.10 80.63 | 86.40 75.39 80.52"),
    ("promptsrc", "dpc"): _table("78.48 70.72 74.40 | 98.90 94.21 96.50 | 96.13 97.30 96.71 | 82.28 74.98 78.46 | 97.44 73.19 83.59 | 91.40 91.58 91.49 | 46.74 35.33 40.24 | 83.63 78.08 80.76 | 86.88 54.31 66.84 | 96.25 74.73 84.13 | 88.99 78.13 83.21"),
}
PAPER_B2N_AVG = {  # the 11-dataset averages as reported (= HM of the mean base and mean new of the rows above)
    ("zsclip", "none"): (69.34, 74.22, 71.70),
    ("coop", "none"): (81.98, 68.84, 74.84), ("coop", "mao"): (82.48, 74.12, 78.08), ("coop", "dpc"): (85.15, 68.84, 76.13),
    ("maple", "none"): (83.52, 73.31, 78.08), ("maple", "mao"): (84.17, 74.68, 79.14), ("maple", "dpc"): (85.93, 73.31, 79.12),
    ("promptsrc", "none"): (83.45, 74.78, 78.87), ("promptsrc", "mao"): (84.53, 75.38, 79.69),
    ("promptsrc", "dpc"): (86.10, 74.78, 80.04),
}
PUBLISHED_AVG = {  # the backbone authors' own recipes (train.py --baseline_recipe published): BACKBONES.md §12;
    # CoCoOp and KgCoOp: MAO's supplementary Table 7 (the learners MAO lists, but never runs MAO on)
    ("coop", "none"): (82.69, 63.22, 71.66), ("maple", "none"): (82.28, 75.14, 78.55),
    ("promptsrc", "none"): (84.26, 76.10, 79.97), ("ivlp", "none"): (84.21, 71.79, 77.51),
    ("cocoop", "none"): (80.47, 71.69, 75.83), ("kgcoop", "none"): (80.73, 73.60, 77.00),
}


def paper_numbers(backbone, method, tag):
    """({dataset: (B, N, H)}, reported 11-dataset average) that a setting should be compared with, or ({}, None)."""
    if tag in ("", "recipe=official"):  # the papers' numbers are what either recipe tries to reproduce
        return PAPER_B2N.get((backbone, method), {}), PAPER_B2N_AVG.get((backbone, method))
    if tag == "baseline_recipe=published":
        return {}, PUBLISHED_AVG.get((backbone, method))
    return {}, None


PAPER_XD = {  # MAO Table 2: source ImageNet, then the 10 targets (its "Avg." is their mean)
    k: dict(zip(["imagenet"] + XD_TARGETS, map(float, v.split()))) for k, v in {
        ("coop", "none"): "71.25 93.91 89.97 65.56 67.88 85.86 22.11 66.92 42.55 47.77 67.30",
        ("coop", "mao"): "71.33 93.75 90.73 65.03 69.96 85.88 23.01 66.14 45.92 46.78 68.20",
        ("maple", "none"): "70.11 93.67 89.72 63.90 69.63 85.79 21.24 67.05 44.92 44.84 67.17",
        ("maple", "mao"): "71.86 93.35 90.49 64.42 71.01 85.44 24.96 65.82 45.21 43.37 65.45",
        ("promptsrc", "none"): "70.65 93.43 89.92 65.95 71.05 86.21 24.03 67.63 46.22 42.59 69.39",
        ("promptsrc", "mao"): "70.97 93.35 89.02 66.20 67.93 86.02 25.23 67.08 47.10 46.51 68.33",
    }.items()}
NAMES = {"imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
         "stanford_cars": "StanfordCars", "oxford_flowers": "Flowers102", "food101": "Food101",
         "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DTD", "eurosat": "EuroSAT", "ucf101": "UCF101",
         "imagenetv2": "ImageNet-V2", "imagenet_sketch": "ImageNet-Sketch", "imagenet_a": "ImageNet-A",
         "imagenet_r": "ImageNet-R", "demo": "demo (toy world)",
         "zsclip": "Zero-shot CLIP", "coop": "CoOp", "maple": "MaPLe", "promptsrc": "PromptSRC", "ivlp": "IVLP",
         "cocoop": "CoCoOp", "kgcoop": "KgCoOp"}


# -----------------------------------------------------------------------------
# Summaries over many runs: the paper's Table 1 (base-to-new) and Table 2 (cross-dataset) layouts, and DG

BACKBONE_ORDER = ["zsclip", "coop", "maple", "promptsrc", "ivlp", "cocoop", "kgcoop"]
METHOD_ORDER = ["none", "mao", "dpc"]


def variant_tag(variant):
    """'' for the paper setting, else 'topk=4, new_shots=8': the flags a run changed (train.setting_changes)."""
    return ", ".join(f"{k}={v}" for k, v in sorted((variant or {}).items()))


def load_runs(root):
    """Every results.json under root (with the run's transfer.json, if any)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        r["dir"] = os.path.dirname(path)
        r.setdefault("protocol", "b2n")
        r["tag"] = variant_tag(r.get("variant"))
        t = os.path.join(r["dir"], "transfer.json")
        r["transfer"] = {}
        if os.path.isfile(t):
            with open(t) as f:
                r["transfer"] = json.load(f)["accuracy"]
        runs.append(r)
    return runs


def _order(key):
    bb, m, tag, ds = key
    rank = lambda xs, x: xs.index(x) if x in xs else len(xs)
    return rank(BACKBONE_ORDER, bb), bb, rank(METHOD_ORDER, m), m, tag, rank(BASE_TO_NEW, ds), ds


def _mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _group(runs, protocol, seeds, warnings):
    """({(backbone, method, variant tag, dataset): {seed: run}}, the seeds every group should have: --seeds, else
    every seed found). A second run of the same setting and seed is reported in warnings, not used."""
    groups = {}
    for r in runs:
        if r["protocol"] != protocol:
            continue
        g = groups.setdefault((r["backbone"], r["method"], r["tag"], r["dataset"]), {})
        if r["seed"] in g:
            warnings.append(f"two runs of seed {r['seed']} with the same setting: {g[r['seed']]['dir']} (used) and "
                            f"{r['dir']} (ignored)")
            continue
        g[r["seed"]] = r
    return groups, seeds or sorted({s for g in groups.values() for s in g})


def b2n_rows(runs, seeds=None, warnings=None):
    """Table 1 rows: per (backbone, method, variant, dataset) mean +- sample std over seeds, HM of the means, the
    paper's numbers (paper setting only) and an average row per (backbone, method, variant)."""
    usable = [r for r in runs if r.get("base") is not None and r.get("new") is not None]
    groups, expected = _group(usable, "b2n", seeds, [] if warnings is None else warnings)
    rows = []
    for key in sorted(groups, key=_order):
        bb, m, tag, ds = key
        by_seed = groups[key]
        ss = sorted(by_seed)
        mb, sb = _mean_std([by_seed[s]["base"] for s in ss])
        mn, sn = _mean_std([by_seed[s]["new"] for s in ss])
        secs = [by_seed[s]["train_seconds"] for s in ss if by_seed[s].get("train_seconds") is not None]
        rows.append(dict(backbone=bb, method=m, variant=tag, dataset=ds, seeds=ss,
                         missing=[s for s in expected if s not in by_seed], base=mb, base_std=sb, new=mn, new_std=sn,
                         hm=harmonic_mean(mb, mn), seconds=statistics.mean(secs) if secs else None,
                         args=by_seed[ss[0]].get("args", {}), changed=sorted(by_seed[ss[0]].get("variant") or {}),
                         paper=paper_numbers(bb, m, tag)[0].get(ds), paper_note=""))
    for bb, m, tag in sorted({(r["backbone"], r["method"], r["variant"]) for r in rows},
                             key=lambda k: _order(k + ("",))):
        group = [r for r in rows if (r["backbone"], r["method"], r["variant"]) == (bb, m, tag)]
        dsets = [r["dataset"] for r in group]
        mb, mn = statistics.mean(r["base"] for r in group), statistics.mean(r["new"] for r in group)
        paper, note = None, ""
        per_dataset, reported = paper_numbers(bb, m, tag)
        if set(BASE_TO_NEW) <= set(dsets) and reported:
            paper, note = reported, "reported"
        elif per_dataset and set(dsets) & set(BASE_TO_NEW):
            same = [per_dataset[d] for d in dsets if d in BASE_TO_NEW]  # the paper over the same datasets
            pb, pn = statistics.mean(p[0] for p in same), statistics.mean(p[1] for p in same)
            paper, note = (pb, pn, harmonic_mean(pb, pn)), f"paper's rows for the same {len(same)} datasets"
        rows.append(dict(backbone=bb, method=m, variant=tag, dataset="average", datasets=dsets,
                         missing_datasets=[d for d in BASE_TO_NEW if d not in dsets] if set(dsets) & set(BASE_TO_NEW)
                         else [], seeds=[], missing=[], base=mb, base_std=None, new=mn, new_std=None,
                         hm=harmonic_mean(mb, mn), seconds=None, args={}, changed=[], paper=paper, paper_note=note))
    return rows


def xd_rows(runs, seeds=None, warnings=None):
    """Table 2 / DG rows: per (backbone, method, variant, source) the source accuracy and each target's, mean +- std
    over the seeds that have it."""
    groups, expected = _group(runs, "all", seeds, [] if warnings is None else warnings)
    rows = []
    for key in sorted(groups, key=_order):
        bb, m, tag, source = key
        by_seed = groups[key]
        cells = {source: [by_seed[s]["all"] for s in sorted(by_seed)]}
        for s in sorted(by_seed):
            for t, acc in by_seed[s]["transfer"].items():
                if t != source:
                    cells.setdefault(t, []).append(acc)
        rows.append(dict(backbone=bb, method=m, variant=tag, source=source, seeds=sorted(by_seed),
                         missing=[s for s in expected if s not in by_seed],
                         acc={t: _mean_std(v) for t, v in cells.items()}, n={t: len(v) for t, v in cells.items()},
                         paper=PAPER_XD.get((bb, m)) if tag == "" and source == "imagenet" else None))
    return rows


def _label(r):
    name = NAMES.get(r["backbone"], r["backbone"]) if r["method"] == "none" else f"+{r['method'].upper()}"
    return name + (f" [{r['variant']}]" if r["variant"] else "")


def _pm(m, s=None):
    return "–" if m is None else (f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}")


def _seed_cell(r):
    return ",".join(map(str, r["seeds"])) + (f" (missing {','.join(map(str, r['missing']))})" if r["missing"] else "")


def _time_cell(r, rows):
    """Mean training seconds per run, and the ratio to the same backbone alone on the same dataset (paper setting)."""
    if r["seconds"] is None:
        return "–"
    alone = next((x for x in rows if (x["backbone"], x["method"], x["variant"], x["dataset"])
                  == (r["backbone"], "none", "", r["dataset"]) and x["seconds"]), None)
    return f"{r['seconds']:.1f}" + (f" ({r['seconds'] / alone['seconds']:.2f}x)" if alone and r is not alone else "")


def table1_markdown(rows):
    out = ["## Table 1: base-to-new generalisation",
           "Mean ± sample std over seeds; HM of the mean base and new. Average: mean base and new over the datasets, "
           "HM of those (how the paper's averages are computed). Paper: MAO Table 1 (baselines, +MAO) and DPC's table; "
           "for --baseline_recipe published, the backbone papers' averages. Δ = ours − paper."]
    for bb in sorted({r["backbone"] for r in rows}, key=lambda b: _order((b, "", "", ""))):
        out += ["", f"### {NAMES.get(bb, bb)}", "",
                "| dataset | method | base | new | HM | paper B / N / H | Δ B / N / H | train s (x alone) | seeds |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in rows if r["backbone"] == bb and not (r["dataset"] == "average" and len(r["datasets"]) < 2)]:
            if r["dataset"] == "average":
                n = len(r["datasets"])
                ds = f"**average** ({n} dataset{'s' * (n > 1)}" + (
                    f"; missing {', '.join(NAMES.get(d, d) for d in r['missing_datasets'])})" if r["missing_datasets"]
                    else ")")
                seeds = ""
            else:
                ds, seeds = NAMES.get(r["dataset"], r["dataset"]), _seed_cell(r)
            p = r["paper"]
            paper = "–" if p is None else " / ".join(f"{x:.2f}" for x in p) + (" †" if r["paper_note"].startswith("paper's") else "")
            delta = "–" if p is None else " / ".join(f"{o - x:+.2f}" for o, x in zip((r["base"], r["new"], r["hm"]), p))
            out.append(f"| {ds} | {_label(r)} | {_pm(r['base'], r['base_std'])} | {_pm(r['new'], r['new_std'])} | "
                       f"{r['hm']:.2f} | {paper} | {delta} | {_time_cell(r, rows)} | {seeds} |")
    if any(r["paper_note"].startswith("paper's") for r in rows):
        out += ["", "† the paper's per-dataset numbers averaged over the same datasets as ours (not all 11 were run)."]
    return "\n".join(out)


def table2_markdown(rows, targets, title, note):
    out = [f"## {title}", note, "",
           "| model | source | avg | " + " | ".join(NAMES.get(t, t) for t in targets) + " | seeds |",
           "|---|---|---|" + "---|" * len(targets) + "---|"]
    for r in rows:
        here = [t for t in targets if t in r["acc"]]
        avg = statistics.mean(r["acc"][t][0] for t in here) if here else None
        avg_cell = "–" if avg is None else f"{avg:.2f}" + ("" if len(here) == len(targets) else f" ({len(here)}/{len(targets)})")
        cell = lambda t: _pm(*r["acc"][t]) + ("" if r["n"][t] == len(r["seeds"]) else f" (n={r['n'][t]})") \
            if t in r["acc"] else "–"
        src = f"{NAMES.get(r['source'], r['source'])} {_pm(*r['acc'][r['source']])}"
        out.append(f"| {_label(r)} | {src} | {avg_cell} | " + " | ".join(cell(t) for t in targets) +
                   f" | {_seed_cell(r)} |")
        p = r["paper"]
        if p is not None and targets[0] in p:
            pavg = statistics.mean(p[t] for t in (here or targets))
            out.append(f"| paper | {p[r['source']]:.2f} | {pavg:.2f} | " + " | ".join(f"{p[t]:.2f}" for t in targets)
                       + " | |")
            out.append(f"| Δ | {r['acc'][r['source']][0] - p[r['source']]:+.2f} | "
                       + ("–" if avg is None else f"{avg - pavg:+.2f}") + " | "
                       + " | ".join(f"{r['acc'][t][0] - p[t]:+.2f}" if t in r["acc"] else "–" for t in targets) + " | |")
    return "\n".join(out)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def compact_markdown(rows):
    """All learners in one table: alone, +MAO and +DPC side by side (the average over datasets when there are
    several), mean training seconds per run and x the learner alone; rows of another recipe or variant apart."""
    datasets = {r["dataset"] for r in rows} - {"average"}
    want = "average" if len(datasets) > 1 else datasets.pop()
    pick = {(r["backbone"], r["method"], r["variant"]): r for r in rows if r["dataset"] == want}
    cell = lambda r: "–" if r is None else f"{r['base']:.2f} / {r['new']:.2f} / {r['hm']:.2f}"
    secs = lambda r, a: "–" if r is None or r["seconds"] is None else f"{r['seconds']:.0f}" + (
        f" ({r['seconds'] / a['seconds']:.1f}x)" if a and a["seconds"] and r is not a else "")
    out = ["## Table 1, compact", "Base / new / HM (means; averages over datasets when there are several) and "
           "training seconds per run (x the learner alone).", "",
           "| learner | alone | +MAO | +DPC | train s: alone | +MAO | +DPC |", "|---|---|---|---|---|---|---|"]
    for bb in sorted({k[0] for k in pick}, key=lambda b: _order((b, "", "", ""))):
        alone = pick.get((bb, "none", ""))
        for tag in sorted({k[2] for k in pick if k[0] == bb}):
            if tag and not any((bb, m, tag) in pick for m in ("mao", "dpc")):
                continue
            mao, dpc = pick.get((bb, "mao", tag)), pick.get((bb, "dpc", tag))
            name = NAMES.get(bb, bb) + (f" [{tag}]" if tag else "")
            out.append(f"| {name} | {cell(alone) if not tag else ''} | {cell(mao)} | {cell(dpc)} | "
                       f"{secs(alone, alone) if not tag else ''} | {secs(mao, alone)} | {secs(dpc, alone)} |")
    return "\n".join(out)


PHASES = {"backbone": "backbone alone (DPC: stage 1)", "mao_base": "MAO base step", "mao_new": "MAO new step",
          "dpc_stage2": "DPC stage 2", "evaluation": "evaluation"}


def _b2n_runs_with(runs, field, by_dataset=False):
    """{(backbone, method, variant tag[, dataset]): [runs]} of the base-to-new runs whose results.json has field."""
    groups = {}
    for r in runs:
        if r.get(field) and r["protocol"] == "b2n":
            key = (r["backbone"], r["method"], r["tag"]) + ((r["dataset"],) if by_dataset else ())
            groups.setdefault(key, []).append(r)
    return groups


def _names(key):
    """The learner's name and the method's label for a group key (backbone, method, variant tag, ...)."""
    return NAMES.get(key[0], key[0]), _label(dict(backbone=key[0], method=key[1], variant=key[2]))


def cost_markdown(runs):
    """Where the time goes: per learner and method, each phase's frozen-CLIP encodings and seconds (results.json
    'cost'), means over the runs (datasets and seeds) that recorded them; the second column counts the runs."""
    groups = _b2n_runs_with(runs, "cost")
    if not groups:
        return ""
    out = ["## Where the time goes", "Frozen-CLIP encodings per phase of a run (images and token sequences; in "
           "brackets those that also ran backward) and the phase's seconds, mean over runs. bench.py's run_cost "
           "predicts the same counts before a run.", "",
           "| learner | method | runs | phase | images (backward) | texts (backward) | seconds |", "|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: _order(k + ("",))):
        rs = groups[key]
        for phase, name in PHASES.items():
            cs = [r["cost"][phase] for r in rs if phase in r["cost"]]
            if cs:
                m = {k: statistics.mean(c[k] for c in cs) for k in cs[0]}
                out.append(f"| {' | '.join(_names(key))} | {len(rs)} | {name} | {m['images']:,.0f} ({m['images_grad']:,.0f}) | {m['texts']:,.0f} "
                           f"({m['texts_grad']:,.0f}) | {m['seconds']:.1f} |")
    return "\n".join(out)


def pseudo_label_markdown(runs):
    """MAO's new step: how often its pseudo-labels equal the hidden labels (results.json 'pseudo_labels')."""
    groups = _b2n_runs_with(runs, "pseudo_labels", by_dataset=True)
    if not groups:
        return ""
    out = ["## MAO's pseudo-labels", "Agreement (%) of the new step's pseudo-labels with the hidden labels of the "
           "unlabeled new-class training images, mean over seeds: the labels it trained on (online: each augmented "
           "view; --pseudo_label_every epoch: the un-augmented ones), and the labels of the un-augmented views. "
           "Beside them, the new-class test accuracy of the base-step prompt and of the new-step prompt.", "",
           "| dataset | learner | method | trained on | un-augmented | new test, base-step prompt | new test, new-step prompt |",
           "|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: _order(k)):
        rs = groups[key]
        mean = lambda f: statistics.mean(f(r) for r in rs)
        out.append(f"| {NAMES.get(key[3], key[3])} | {' | '.join(_names(key))} | "
                   f"{mean(lambda r: r['pseudo_labels']['used_in_training']):.1f} | "
                   f"{mean(lambda r: r['pseudo_labels']['once_unaugmented']):.1f} | "
                   f"{mean(lambda r: r.get('new_base_prompt', float('nan'))):.1f} | {mean(lambda r: r['new']):.1f} |")
    return "\n".join(out)


def summarize(root, seeds=None):
    """Tabulate every results.json under root: Table 1 (base-to-new), Table 2 (cross-dataset) and DG, each as
    markdown + CSV in root, and all of them in summary.md. Returns dict(b2n=rows, xd=rows, markdown=text)."""
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no results.json under {root} (train.py writes one per finished run)")
    warnings = []
    b2n, xd = b2n_rows(runs, seeds, warnings), xd_rows(runs, seeds, warnings)
    parts = [f"- warning: {w}" for w in warnings]
    fmt = lambda x: "" if x is None else f"{x:.4f}"
    if b2n:
        parts.append(table1_markdown(b2n))
        _write_csv(os.path.join(root, "table1.csv"),
                   ["backbone", "method", "variant", "dataset", "base", "base_std", "new", "new_std", "hm", "paper_base",
                    "paper_new", "paper_hm", "paper_note", "seeds", "missing_seeds", "train_seconds"],
                   [[r["backbone"], r["method"], r["variant"], r["dataset"], fmt(r["base"]), fmt(r["base_std"]),
                     fmt(r["new"]), fmt(r["new_std"]), fmt(r["hm"]), *(r["paper"] or ("", "", "")), r["paper_note"],
                     " ".join(map(str, r["seeds"])), " ".join(map(str, r["missing"])), fmt(r["seconds"])]
                    for r in b2n])
    if xd:
        parts.append(table2_markdown(xd, XD_TARGETS, "Table 2: cross-dataset transfer",
                                     "Trained on every class of the source (train.py --subsample all), each target "
                                     "zero-shot with its own class names (eval.py --datasets xd). avg = mean over the "
                                     "targets; the paper's avg is recomputed over the same targets. Paper: MAO Table 2."))
        if any(set(DG_TARGETS) & set(r["acc"]) for r in xd):
            parts.append(table2_markdown(xd, DG_TARGETS, "Domain generalisation",
                                         "The same prompts on the ImageNet variants (eval.py --datasets dg). "
                                         "Neither MAO nor DPC reports these numbers, so there is no paper row."))
        _write_csv(os.path.join(root, "table2.csv"),
                   ["backbone", "method", "variant", "source", "dataset", "accuracy", "std", "n_seeds", "paper"],
                   [[r["backbone"], r["method"], r["variant"], r["source"], t, fmt(m), fmt(s), r["n"][t],
                     "" if not r["paper"] or t not in r["paper"] else r["paper"][t]]
                    for r in xd for t, (m, s) in r["acc"].items()])
    if not b2n and not xd:
        raise FileNotFoundError(f"no finished base-to-new or all-class run under {root}")
    parts += [p for p in (compact_markdown(b2n) if b2n else "", cost_markdown(runs), pseudo_label_markdown(runs)) if p]
    text = "\n\n".join(parts)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(text + "\n")
    return dict(b2n=b2n, xd=xd, markdown=text, warnings=warnings)


# -----------------------------------------------------------------------------
# Figures: Fig. 3 (average HM per backbone: baseline, +MAO, +DPC) and Fig. 4 (accuracy against K or S)

SWEEPS = {"topk": "K: Top-K classes of the hard-negative sampler (Eq. 4)",
          "new_shots": "S: unlabeled images per new class (new step)"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (it is in requirements.txt)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_hm_bars(rows, path):
    """Fig. 3 style: the average HM of each backbone, baseline / +MAO / +DPC side by side; the paper's value as a
    black tick on each bar. Returns the path, or None when there is nothing to draw."""
    avg = {(r["backbone"], r["method"]): r for r in rows if r["dataset"] == "average" and r["variant"] == ""}
    backbones = [b for b in BACKBONE_ORDER[1:] + sorted({b for b, _ in avg} - set(BACKBONE_ORDER))
                 if any((b, m) in avg for m in METHOD_ORDER)]
    if not backbones:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.0 + 1.6 * len(backbones), 3.6))
    width, colours = 0.26, {"none": "#9aa5b1", "mao": "#d1495b", "dpc": "#2e86ab"}
    for j, m in enumerate(METHOD_ORDER):
        for i, b in enumerate(backbones):
            x = i + (j - 1) * width
            r = avg.get((b, m))
            if r is None:
                continue
            ax.bar(x, r["hm"], width, color=colours[m], label={"none": "baseline", "mao": "+MAO", "dpc": "+DPC"}[m]
                   if i == min(k for k, bb in enumerate(backbones) if (bb, m) in avg) else None)
            ax.text(x, r["hm"] + 0.3, f"{r['hm']:.1f}", ha="center", va="bottom", fontsize=7)
            if r["paper"] is not None:
                ax.plot([x - width / 2, x + width / 2], [r["paper"][2]] * 2, color="black", lw=2,
                        label="paper" if (b, m) == next(k for k in avg if avg[k]["paper"] is not None) else None)
    if ("zsclip", "none") in avg:
        ax.axhline(avg[("zsclip", "none")]["hm"], color="grey", ls="--", lw=1, label="zero-shot CLIP")
    hms = [r["hm"] for r in avg.values()] + [r["paper"][2] for r in avg.values() if r["paper"] is not None]
    ax.set_ylim(max(0, min(hms) - 5), min(100, max(hms) + 3))
    ax.set_xticks(range(len(backbones)), [NAMES.get(b, b) for b in backbones])
    ax.set_xlim(-0.6, len(backbones) - 0.4)
    dsets = {tuple(r["datasets"]) for r in avg.values()}
    over = (", ".join(NAMES.get(d, d) for d in dsets.pop()) if len(dsets) == 1 and len(next(iter(avg.values()))["datasets"]) <= 3
            else f"{'/'.join(map(str, sorted({len(r['datasets']) for r in avg.values()})))} datasets")
    ax.set_ylabel("HM (%)")
    ax.set_title(f"Base-to-new, average HM: {over}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def sweep_points(rows, param):
    """{(backbone, method): {x: [row per dataset]}} over the runs that differ from the paper setting in `param`
    only (the paper-setting run gives the point at its own value), keeping datasets present at every x."""
    series = {}
    for r in rows:
        if r["dataset"] != "average" and set(r["changed"]) <= {param} and param in r["args"]:
            series.setdefault((r["backbone"], r["method"]), {}).setdefault(r["args"][param], []).append(r)
    out = {}
    for key, by_x in series.items():
        common = set.intersection(*({r["dataset"] for r in v} for v in by_x.values()))
        if len(by_x) >= 2 and common:
            out[key] = {x: [r for r in v if r["dataset"] in common] for x, v in sorted(by_x.items())}
    return out


def plot_sweep(rows, param, path):
    """Fig. 4 style: base, new and HM (mean over the common datasets) against K or S, one panel per backbone and
    method, training time on the right axis when recorded. Returns the path, or None without such a sweep."""
    points = sweep_points(rows, param)
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.4), squeeze=False)
    for ax, ((bb, m), by_x) in zip(axes[0], sorted(points.items(), key=lambda kv: _order(kv[0] + ("", "")))):
        xs = list(by_x)
        for field, style in (("base", "o-"), ("new", "s-"), ("hm", "^-")):
            ax.plot(xs, [statistics.mean(r[field] for r in by_x[x]) for x in xs], style, label=field.replace("hm", "HM"))
        secs = [[r["seconds"] for r in by_x[x] if r["seconds"] is not None] for x in xs]
        if all(secs):
            twin = ax.twinx()
            twin.plot(xs, [statistics.mean(s) / 60 for s in secs], "k:", label="train time")
            twin.set_ylabel("train time (min)", fontsize=8)
        dsets = sorted({r["dataset"] for v in by_x.values() for r in v})
        ax.set_title(f"{NAMES.get(bb, bb)}{'' if m == 'none' else '+' + m.upper()}: "
                     f"{', '.join(NAMES.get(d, d) for d in dsets)}", fontsize=8)
        ax.set_xlabel(SWEEPS[param], fontsize=8)
        ax.set_xticks(xs)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot(root, seeds=None):
    """Write fig3_hm.png and, where a sweep was run, fig4_topk.png / fig4_new_shots.png into root."""
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no results.json under {root} (train.py writes one per finished run)")
    rows = b2n_rows(runs, seeds)
    paths = [plot_hm_bars(rows, os.path.join(root, "fig3_hm.png"))]
    paths += [plot_sweep(rows, p, os.path.join(root, f"fig4_{p}.png")) for p in SWEEPS]
    return [p for p in paths if p]
