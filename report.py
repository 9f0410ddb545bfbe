"""Reporting: our runs in the papers' table layouts, the papers' numbers beside them, the figures.

    python eval.py --summarize runs/   # Table 1 / Table 2 layouts, the papers' numbers beside
    python eval.py --plot runs/        # Fig. 3 (HM per backbone), Fig. 4 (--topk / --new_shots)

Across seeds, base and new are averaged first and HM is computed from the averages; the average over
datasets does the same with the dataset means (as the papers compute theirs). A run that changed a
setting from the paper's (its `variant`) is its own row. The papers' numbers are read from
docs/paper_numbers.md, so the page a reader checks is the one compared with.
"""
import csv
import glob
import json
import os
import re
import statistics

from data import BASE_TO_NEW, DG_TARGETS, XD_TARGETS


def harmonic_mean(base, new):
    """HM = 2 B N / (B + N), the headline metric of base-to-new generalisation."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


# -----------------------------------------------------------------------------
# The papers' numbers (docs/paper_numbers.md: MAO Tables 1-2, DPC's table, the backbones' averages)

PAPER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "paper_numbers.md")


def read_paper_numbers(path=PAPER_FILE):
    """{section: [row dicts]} of the markdown tables whose rows start with a 'backbone method' key."""
    tables, section, header = {}, None, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                section, header = line[3:].strip(), None
            elif line.startswith("| key |"):
                header = [c.strip() for c in line.strip().strip("|").split("|")]
            elif header and re.match(r"^\| [a-z]+ [a-z]+ \|", line):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                tables.setdefault(section, []).append(dict(zip(header, cells)))
    return tables


def _numbers(cell):
    return tuple(float(x) for x in cell.split())


_TABLES = read_paper_numbers()
_key = lambda row: tuple(row["key"].split())
PAPER_B2N = {_key(r): {d: _numbers(r[d]) for d in BASE_TO_NEW}
             for r in _TABLES["Base-to-new, per dataset (B N H)"]}
_AVERAGES = _TABLES["Base-to-new, 11-dataset averages as reported (B N H)"]
PAPER_B2N_AVG = {_key(r): _numbers(r["average"]) for r in _AVERAGES if r["recipe"] == "paper"}
PUBLISHED_AVG = {_key(r): _numbers(r["average"]) for r in _AVERAGES if r["recipe"] == "published"}
PAPER_XD = {_key(r): {d: float(r[d]) for d in ["imagenet"] + XD_TARGETS}
            for r in _TABLES["Cross-dataset, source ImageNet (accuracy)"]}


def paper_numbers(backbone, method, tag):
    """({dataset: (B, N, H)}, the reported average) a setting is compared with, or ({}, None)."""
    if tag in ("", "recipe=official"):  # what either recipe tries to reproduce
        return PAPER_B2N.get((backbone, method), {}), PAPER_B2N_AVG.get((backbone, method))
    if tag == "baseline_recipe=published":
        return {}, PUBLISHED_AVG.get((backbone, method))
    return {}, None


NAMES = {"imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
         "stanford_cars": "StanfordCars", "oxford_flowers": "Flowers102", "food101": "Food101",
         "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DTD", "eurosat": "EuroSAT",
         "ucf101": "UCF101", "imagenetv2": "ImageNet-V2", "imagenet_sketch": "ImageNet-Sketch",
         "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R", "demo": "demo (toy world)",
         "zsclip": "Zero-shot CLIP", "coop": "CoOp", "maple": "MaPLe", "promptsrc": "PromptSRC",
         "ivlp": "IVLP", "cocoop": "CoCoOp", "kgcoop": "KgCoOp", "promptkd": "PromptKD"}
BACKBONE_ORDER = ["zsclip", "coop", "maple", "promptsrc", "ivlp", "cocoop", "kgcoop", "promptkd"]
METHOD_ORDER = ["none", "dept", "mao", "dpc"]  # MAO's Fig. 3: baseline, +DePT, +MAO (and DPC's)
METHOD_LABELS = {"none": "baseline", "dept": "+DePT", "mao": "+MAO", "dpc": "+DPC"}


# -----------------------------------------------------------------------------
# Runs and their grouping

def variant_tag(variant):
    """'' for the paper setting, else 'topk=4, new_shots=8': the flags a run changed."""
    return ", ".join(f"{k}={v}" for k, v in sorted((variant or {}).items()))


def _read_json(path, warnings):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        warnings.append(f"skipped {path}: unreadable ({type(e).__name__}: {e})")


def load_runs(root, warnings=None):
    """Every readable results.json under root, with its transfer.json; unreadable ones are warnings."""
    runs, warnings = [], [] if warnings is None else warnings
    for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)):
        r = _read_json(path, warnings)
        if not isinstance(r, dict):
            continue
        odd = [k for k in ("base", "new", "hm", "all", "train_seconds") if r.get(k) is not None and (
            isinstance(r[k], bool) or not isinstance(r[k], (int, float)))]
        if odd:  # an edited or foreign file: skipped with a word, never averaged
            warnings.append(f"skipped {path}: {', '.join(f'{k} is {r[k]!r}' for k in odd)}, not a number")
            continue
        r["dir"] = os.path.dirname(path)
        r.setdefault("protocol", "b2n")
        r["tag"] = variant_tag(r.get("variant"))
        t = os.path.join(r["dir"], "transfer.json")
        r["transfer"] = (_read_json(t, warnings) or {}).get("accuracy", {}) if os.path.isfile(t) else {}
        runs.append(r)
    return runs


def _rank(xs, x):
    return xs.index(x) if x in xs else len(xs)


def _order(key):
    bb, m, tag, ds = key
    return _rank(BACKBONE_ORDER, bb), bb, _rank(METHOD_ORDER, m), m, tag, _rank(BASE_TO_NEW, ds), ds


def _mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _group(runs, protocol, seeds, warnings):
    """({(backbone, method, variant tag, dataset): {seed: run}}, the seeds each should have: --seeds,
    else every seed found); a second run of one setting and seed is a warning, not used."""
    groups = {}
    for r in runs:
        if r["protocol"] != protocol:
            continue
        g = groups.setdefault((r["backbone"], r["method"], r["tag"], r["dataset"]), {})
        if r["seed"] in g:
            warnings.append(f"two runs of seed {r['seed']} with the same setting: {g[r['seed']]['dir']} "
                            f"(used) and {r['dir']} (ignored)")
            continue
        g[r["seed"]] = r
    return groups, seeds or sorted({s for g in groups.values() for s in g})


def b2n_rows(runs, seeds=None, warnings=None):
    """Table 1 rows: per (backbone, method, variant, dataset) mean +- sample std over seeds, HM of the
    means, the paper's numbers (paper setting only); an average row per (backbone, method, variant)."""
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
                         missing=[s for s in expected if s not in by_seed], base=mb, base_std=sb, new=mn,
                         new_std=sn, hm=harmonic_mean(mb, mn), seconds=statistics.mean(secs) if secs else None,
                         per_seed={s: (by_seed[s]["base"], by_seed[s]["new"]) for s in ss},
                         args=by_seed[ss[0]].get("args", {}), changed=sorted(by_seed[ss[0]].get("variant") or {}),
                         paper=paper_numbers(bb, m, tag)[0].get(ds), paper_note=""))
    for bb, m, tag in sorted({(r["backbone"], r["method"], r["variant"]) for r in rows},
                             key=lambda k: _order(k + ("",))):
        group = [r for r in rows if (r["backbone"], r["method"], r["variant"]) == (bb, m, tag)]
        dsets = [r["dataset"] for r in group]
        mb, mn = statistics.mean(r["base"] for r in group), statistics.mean(r["new"] for r in group)
        common = sorted(set.intersection(*(set(r["per_seed"]) for r in group)))  # a seed's average: all datasets
        per_seed = {s: tuple(statistics.mean(r["per_seed"][s][i] for r in group) for i in (0, 1)) for s in common}
        paper, note = None, ""
        per_dataset, reported = paper_numbers(bb, m, tag)
        if set(BASE_TO_NEW) <= set(dsets) and reported:
            paper, note = reported, "reported"
        elif per_dataset and set(dsets) & set(BASE_TO_NEW):
            same = [per_dataset[d] for d in dsets if d in BASE_TO_NEW]  # the paper's, same datasets
            pb, pn = statistics.mean(p[0] for p in same), statistics.mean(p[1] for p in same)
            paper, note = (pb, pn, harmonic_mean(pb, pn)), f"paper's rows for the same {len(same)} datasets"
        missing = [d for d in BASE_TO_NEW if d not in dsets] if set(dsets) & set(BASE_TO_NEW) else []
        rows.append(dict(backbone=bb, method=m, variant=tag, dataset="average", datasets=dsets,
                         missing_datasets=missing, seeds=[], missing=[], base=mb, base_std=None, new=mn,
                         new_std=None, hm=harmonic_mean(mb, mn), seconds=None, args={}, changed=[],
                         paper=paper, paper_note=note, per_seed=per_seed))
    return rows


def xd_rows(runs, seeds=None, warnings=None):
    """Table 2 / DG rows: per (backbone, method, variant, source) the source's accuracy and each
    target's, mean +- std over the seeds that have it."""
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


# -----------------------------------------------------------------------------
# Markdown: one table writer, one formatter per kind of cell

def md_table(header, rows):
    """A markdown table: the header cells, then one row of cells per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def cell_pm(m, s=None):
    return "–" if m is None else (f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}")


def cell_bnh(r):
    """Base / new / HM; over several seeds with the spread of base and new (sample std) and the seed count."""
    if r is None or len(r.get("seeds", ())) < 2:
        return "–" if r is None else f"{r['base']:.2f} / {r['new']:.2f} / {r['hm']:.2f}"
    return f"{r['base']:.2f} ± {r['base_std']:.2f} / {r['new']:.2f} ± {r['new_std']:.2f} / {r['hm']:.2f} " \
           f"(n={len(r['seeds'])})"


def cell_seconds(seconds, alone=None, digits=1):
    """Seconds, and 'x' those of the learner alone when given."""
    if seconds is None:
        return "–"
    return f"{seconds:.{digits}f}" + (f" ({seconds / alone:.{max(1, digits + 1)}f}x)" if alone else "")


def cell_seeds(r):
    return ",".join(map(str, r["seeds"])) + (f" (missing {','.join(map(str, r['missing']))})"
                                             if r["missing"] else "")


def _label(r):
    name = NAMES.get(r["backbone"], r["backbone"]) if r["method"] == "none" else METHOD_LABELS[r["method"]]
    return name + (f" [{r['variant']}]" if r["variant"] else "")


def _alone(rows, r):
    """The row of the same learner alone (paper setting, same dataset): times are compared with it."""
    return next((x for x in rows if (x["backbone"], x["method"], x["variant"], x["dataset"])
                 == (r["backbone"], "none", "", r["dataset"]) and x["seconds"]), None)


def table1_markdown(rows):
    out = ["## Table 1: base-to-new generalisation",
           "Mean ± sample std over seeds; HM of the mean base and new. Average: mean base and new over "
           "the datasets, HM of those (how the paper's averages are computed). Paper: MAO Table 1 "
           "(baselines, +MAO) and DPC's table; for --baseline_recipe published, the backbone papers' "
           "averages. Δ = ours − paper."]
    for bb in sorted({r["backbone"] for r in rows}, key=lambda b: _order((b, "", "", ""))):
        table = []
        for r in [r for r in rows if r["backbone"] == bb
                  and not (r["dataset"] == "average" and len(r["datasets"]) < 2)]:
            if r["dataset"] == "average":
                n, miss = len(r["datasets"]), r["missing_datasets"]
                ds = f"**average** ({n} dataset{'s' * (n > 1)}" + (
                    f"; missing {', '.join(NAMES.get(d, d) for d in miss)})" if miss else ")")
                seeds = ""
            else:
                ds, seeds = NAMES.get(r["dataset"], r["dataset"]), cell_seeds(r)
            p, alone = r["paper"], _alone(rows, r)
            paper = "–" if p is None else " / ".join(f"{x:.2f}" for x in p) + (
                " †" if r["paper_note"].startswith("paper's") else "")
            delta = "–" if p is None else " / ".join(f"{o - x:+.2f}"
                                                     for o, x in zip((r["base"], r["new"], r["hm"]), p))
            table.append([ds, _label(r), cell_pm(r["base"], r["base_std"]), cell_pm(r["new"], r["new_std"]),
                          f"{r['hm']:.2f}", paper, delta,
                          cell_seconds(r["seconds"], alone["seconds"] if alone and alone is not r else None),
                          seeds])
        out += ["", f"### {NAMES.get(bb, bb)}", "",
                md_table(["dataset", "method", "base", "new", "HM", "paper B / N / H", "Δ B / N / H",
                          "train s (x alone)", "seeds"], table)]
    if any(r["paper_note"].startswith("paper's") for r in rows):
        out += ["", "† the paper's per-dataset numbers averaged over the same datasets as ours (not all "
                    "11 were run)."]
    return "\n".join(out)


def table2_markdown(rows, targets, title, note):
    table = []
    for r in rows:
        here = [t for t in targets if t in r["acc"]]
        avg = statistics.mean(r["acc"][t][0] for t in here) if here else None
        avg_cell = "–" if avg is None else f"{avg:.2f}" + (
            "" if len(here) == len(targets) else f" ({len(here)}/{len(targets)})")
        cell = lambda t: "–" if t not in r["acc"] else cell_pm(*r["acc"][t]) + (
            "" if r["n"][t] == len(r["seeds"]) else f" (n={r['n'][t]})")
        src = f"{NAMES.get(r['source'], r['source'])} {cell_pm(*r['acc'][r['source']])}"
        table.append([_label(r), src, avg_cell] + [cell(t) for t in targets] + [cell_seeds(r)])
        p = r["paper"]
        if p is not None and targets[0] in p:
            pavg = statistics.mean(p[t] for t in (here or targets))
            table.append(["paper", f"{p[r['source']]:.2f}", f"{pavg:.2f}"] + [f"{p[t]:.2f}" for t in targets]
                         + [""])
            table.append(["Δ", f"{r['acc'][r['source']][0] - p[r['source']]:+.2f}",
                          "–" if avg is None else f"{avg - pavg:+.2f}"]
                         + [f"{r['acc'][t][0] - p[t]:+.2f}" if t in r["acc"] else "–" for t in targets] + [""])
    header = ["model", "source", "avg"] + [NAMES.get(t, t) for t in targets] + ["seeds"]
    return "\n".join([f"## {title}", note, "", md_table(header, table)])


def compact_markdown(rows):
    """All learners in one table, the methods side by side (averages when there are several
    datasets), with training seconds per run and x the learner alone; other recipes apart."""
    datasets = {r["dataset"] for r in rows} - {"average"}
    want = "average" if len(datasets) > 1 else datasets.pop()
    pick = {(r["backbone"], r["method"], r["variant"]): r for r in rows if r["dataset"] == want}
    secs = lambda r, a: "–" if r is None else cell_seconds(r["seconds"], a["seconds"] if a and a is not r
                                                            else None, digits=0)
    seeds = lambda r, a: "" if not (r and a) or r["seeds"] == a["seeds"] else f" (seeds {cell_seeds(r)})"
    table = []
    for bb in sorted({k[0] for k in pick}, key=lambda b: _order((b, "", "", ""))):
        alone = pick.get((bb, "none", ""))
        for tag in sorted({k[2] for k in pick if k[0] == bb}):
            if tag and not any((bb, m, tag) in pick for m in METHOD_ORDER[1:]):
                continue
            others = [pick.get((bb, m, tag)) for m in METHOD_ORDER[1:]]
            table.append([NAMES.get(bb, bb) + (f" [{tag}]" if tag else ""), "" if tag else cell_bnh(alone)]
                         + [cell_bnh(o) + seeds(o, alone) for o in others] + ["" if tag else secs(alone, alone)]
                         + [secs(o, alone) for o in others])
    labels = [METHOD_LABELS[m] for m in METHOD_ORDER[1:]]
    return "\n".join(["## Table 1, compact", "Base / new / HM (means; averages over datasets when there are "
                      "several) and training seconds per run (x the learner alone); a cell over other seeds than its "
                      "learner alone names them.", "",
                      md_table(["learner", "alone"] + labels + ["train s: alone"] + labels, table)])


def paired_markdown(runs):
    """Each plug-in and recipe against its learner alone on the same seed and dataset: the differences in base, new
    and HM per seed, their mean, and whether every seed moves the same way (the way to read a plug-in: the seed
    moves both runs alike, so a difference all seeds agree on is the plug-in's, not the draw's)."""
    groups, _ = _group([r for r in runs if r.get("base") is not None and r.get("new") is not None], "b2n", None, [])
    table, held = [], []  # held: the mean HM difference of each pair whose seeds all agree in sign
    value = lambda r, f: harmonic_mean(r["base"], r["new"]) if f == "hm" else r[f]
    for key in sorted(groups, key=_order):
        bb, m, tag, ds = key
        alone = groups.get((bb, "none", "", ds), {})
        seeds = sorted(set(groups[key]) & set(alone))
        if (m, tag) == ("none", "") or bb == "zsclip" or not seeds:
            continue
        cells, signs = [], []
        for f in ("base", "new", "hm"):
            d = [value(groups[key][s], f) - value(alone[s], f) for s in seeds]
            signs.append("unmoved" if not any(d) else "one seed" if len(d) == 1 else
                         "yes" if all(x > 0 for x in d) or all(x < 0 for x in d) else "no")
            cells += [", ".join(f"{x:+.2f}" for x in d), f"{statistics.mean(d):+.2f}"]
        if signs[2] == "yes":
            held.append(statistics.mean(d))
        table.append([NAMES.get(ds, ds), NAMES.get(bb, bb), _label(dict(backbone=bb, method=m, variant=tag)),
                      ",".join(map(str, seeds))] + cells + [" / ".join(signs)])
    return table and "\n".join([
        "## Paired differences: each plug-in against its learner alone, seed by seed",
        "Plug-in minus the learner alone (paper setting) on the same seed and dataset, in points: each seed's "
        "difference, then their mean; the last column says whether every seed's difference has the same sign "
        "(base / new / HM; unmoved: 0 on every seed). HM per seed is that seed's HM.", "",
        md_table(["dataset", "learner", "plug-in", "seeds", "Δ base per seed", "mean", "Δ new per seed", "mean",
                  "Δ HM per seed", "mean", "all seeds agree (B / N / H)"], table), "",
        f"HM: {len(held)} of {len(table)} pairs move the same way on every seed ({sum(x > 0 for x in held)} up, "
        f"{sum(x < 0 for x in held)} down); {len(table) - len(held)} do not (or have one seed)."])


PHASES = {"backbone": "backbone alone (DPC: stage 1)", "dept": "DePT (learner and head)",
          "mao_base": "MAO base step", "mao_new": "MAO new step", "dpc_stage2": "DPC stage 2",
          "evaluation": "evaluation"}


def _b2n_runs_with(runs, field, by_dataset=False):
    """{(backbone, method, variant tag[, dataset]): [runs]} of the base-to-new runs with field."""
    groups = {}
    for r in runs:
        if r.get(field) and r["protocol"] == "b2n":
            key = (r["backbone"], r["method"], r["tag"]) + ((r["dataset"],) if by_dataset else ())
            groups.setdefault(key, []).append(r)
    return groups


def _names(key):
    return [NAMES.get(key[0], key[0]), _label(dict(backbone=key[0], method=key[1], variant=key[2]))]


def teachers_markdown(runs):
    """PromptKD's teachers: the run each student distilled from (--teacher), found among these runs."""
    lines = []
    for t in sorted({r["args"]["teacher"] for r in runs if (r.get("args") or {}).get("teacher")}):
        tail = os.path.join(*os.path.normpath(t).split(os.sep)[-3:])  # dataset/<backbone>-<method>/shots_seed
        r = next((x for x in runs if os.path.normpath(x["dir"]).endswith(tail)), None)
        lines.append(f"- {tail}: " + ("not among these runs" if r is None else f"{cell_bnh(r)}"))
    return lines and "\n".join(["PromptKD's teacher, its own run (base / new / HM):"] + lines)


def cost_markdown(runs):
    """Where the time goes: per learner and method, each phase's frozen-CLIP encodings, its seconds
    and the share spent waiting for the data loader (results.json 'cost'), means over the runs."""
    groups, table = _b2n_runs_with(runs, "cost"), []
    for key in sorted(groups, key=lambda k: _order(k + ("",))):
        rs = groups[key]
        for phase, name in PHASES.items():
            cs = [r["cost"][phase] for r in rs if phase in r["cost"]]
            if cs:
                m = {k: statistics.mean(c.get(k, 0) for c in cs) for k in cs[0]}
                share = f"{100 * m['load_seconds'] / m['seconds']:.0f} %" if m.get("seconds") and \
                    "load_seconds" in m else "–"
                table.append(_names(key) + [len(rs), name, f"{m['images']:,.0f} ({m['images_grad']:,.0f})",
                             f"{m['texts']:,.0f} ({m['texts_grad']:,.0f})", f"{m['seconds']:.1f}", share])
    return table and "\n".join(["## Where the time goes", "Frozen-CLIP encodings per phase of a run "
                                "(images and token sequences; in brackets those that also ran backward), the "
                                "phase's seconds and the share of them spent waiting for the data loader, "
                                "mean over runs.", "",
                                md_table(["learner", "method", "runs", "phase", "images (backward)",
                                          "texts (backward)", "seconds", "waiting for data"], table)])


def pseudo_label_markdown(runs):
    """MAO's new step: how often its pseudo-labels equal the hidden labels (results.json)."""
    groups, table = _b2n_runs_with(runs, "pseudo_labels", by_dataset=True), []
    for key in sorted(groups, key=_order):
        mean = lambda f: statistics.mean(f(r) for r in groups[key])
        table.append([NAMES.get(key[3], key[3])] + _names(key)
                     + [f"{mean(lambda r: r['pseudo_labels']['used_in_training']):.1f}",
                        f"{mean(lambda r: r['pseudo_labels']['once_unaugmented']):.1f}",
                        f"{mean(lambda r: r.get('new_base_prompt', float('nan'))):.1f}",
                        f"{mean(lambda r: r['new']):.1f}"])
    return table and "\n".join([
        "## MAO's pseudo-labels", "Agreement (%) of the new step's pseudo-labels with the hidden labels of the "
        "unlabeled new-class training images, mean over seeds: the labels it trained on (online: each "
        "augmented view; --pseudo_label_every epoch: the un-augmented ones), and the labels of the "
        "un-augmented views. Beside them, the new-class test accuracy of the base-step prompt and of the "
        "new-step prompt.", "",
        md_table(["dataset", "learner", "method", "trained on", "un-augmented", "new test, base-step prompt",
                  "new test, new-step prompt"], table)])


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def summarize(root, seeds=None):
    """Table 1, Table 2 and DG of every results.json under root, as markdown and CSV in root (all in
    summary.md). Returns dict(b2n=rows, xd=rows, markdown=text, warnings=[...])."""
    warnings = []
    runs = load_runs(root, warnings)
    if not runs:
        raise FileNotFoundError(f"no results.json under {root} (train.py writes one per finished run)"
                                + "".join(f"; {w}" for w in warnings))
    b2n, xd = b2n_rows(runs, seeds, warnings), xd_rows(runs, seeds, warnings)
    parts = [f"- warning: {w}" for w in warnings]
    fmt = lambda x: "" if x is None else f"{x:.4f}"
    if b2n:
        parts.append(table1_markdown(b2n))
        _write_csv(os.path.join(root, "table1.csv"),
                   ["backbone", "method", "variant", "dataset", "base", "base_std", "new", "new_std", "hm",
                    "paper_base", "paper_new", "paper_hm", "paper_note", "seeds", "missing_seeds",
                    "train_seconds"],
                   [[r["backbone"], r["method"], r["variant"], r["dataset"], fmt(r["base"]), fmt(r["base_std"]),
                     fmt(r["new"]), fmt(r["new_std"]), fmt(r["hm"]), *(r["paper"] or ("", "", "")),
                     r["paper_note"], " ".join(map(str, r["seeds"])), " ".join(map(str, r["missing"])),
                     fmt(r["seconds"])] for r in b2n])
    if xd:
        parts.append(table2_markdown(xd, XD_TARGETS, "Table 2: cross-dataset transfer",
                                     "Trained on every class of the source (train.py --subsample all), each "
                                     "target zero-shot with its own class names (eval.py --datasets xd). avg = "
                                     "mean over the targets; the paper's avg is recomputed over the same "
                                     "targets. Paper: MAO Table 2."))
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
    parts += [p for p in (compact_markdown(b2n) if b2n else "", paired_markdown(runs), teachers_markdown(runs),
                          cost_markdown(runs), pseudo_label_markdown(runs)) if p]
    text = "\n\n".join(parts)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(text + "\n")
    return dict(b2n=b2n, xd=xd, markdown=text, warnings=warnings)


# -----------------------------------------------------------------------------
# Figures: Fig. 3 (average HM per backbone: baseline and each plug-in) and Fig. 4
# (accuracy against K or S)

SWEEPS = {"topk": "K: Top-K classes of the hard-negative sampler (Eq. 4)",
          "new_shots": "S: unlabeled images per new class (new step)"}
COLOURS = {"none": "#9aa5b1", "dept": "#edae49", "mao": "#d1495b", "dpc": "#2e86ab"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (in requirements.txt)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_hm_bars(rows, path):
    """Fig. 3 style: each backbone's average HM, baseline and plug-ins side by side; the paper's
    value as a black tick on each bar; over several seeds each seed's HM as a dot on a line spanning
    them. Returns the path, or None when there is nothing to draw."""
    avg = {(r["backbone"], r["method"]): r for r in rows if r["dataset"] == "average" and r["variant"] == ""}
    seed_hms = {k: [harmonic_mean(b, n) for b, n in r["per_seed"].values()] for k, r in avg.items()}
    backbones = [b for b in BACKBONE_ORDER[1:] + sorted({b for b, _ in avg} - set(BACKBONE_ORDER))
                 if any((b, m) in avg for m in METHOD_ORDER)]
    if not backbones:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.0 + 1.6 * len(backbones), 3.6))
    width = 0.78 / len(METHOD_ORDER)
    labelled = set()
    for j, m in enumerate(METHOD_ORDER):
        for i, b in enumerate(backbones):
            x, r = i + (j - (len(METHOD_ORDER) - 1) / 2) * width, avg.get((b, m))
            if r is None:
                continue
            ax.bar(x, r["hm"], width, color=COLOURS[m], label=None if m in labelled else METHOD_LABELS[m])
            labelled.add(m)
            seeds = seed_hms[b, m]
            if len(seeds) > 1:
                ax.vlines(x, min(seeds), max(seeds), color="black", lw=0.8)
                ax.plot([x] * len(seeds), seeds, "o", color="black", ms=2.5,
                        label=None if "seed" in labelled else "one seed's HM")
                labelled.add("seed")
            ax.text(x, max([r["hm"]] + seeds) + 0.3, f"{r['hm']:.1f}", ha="center", va="bottom", fontsize=7)
            if r["paper"] is not None:
                ax.plot([x - width / 2, x + width / 2], [r["paper"][2]] * 2, color="black", lw=2,
                        label=None if "paper" in labelled else "paper")
                labelled.add("paper")
    if ("zsclip", "none") in avg:
        ax.axhline(avg[("zsclip", "none")]["hm"], color="grey", ls="--", lw=1, label="zero-shot CLIP")
    hms = [r["hm"] for r in avg.values()] + [r["paper"][2] for r in avg.values() if r["paper"] is not None]
    hms += [hm for v in seed_hms.values() for hm in v]
    ax.set_ylim(max(0, min(hms) - 5), min(100, max(hms) + 3))
    ax.set_xticks(range(len(backbones)), [NAMES.get(b, b) for b in backbones])
    ax.set_xlim(-0.6, len(backbones) - 0.4)
    dsets = {tuple(r["datasets"]) for r in avg.values()}
    few = len(dsets) == 1 and len(next(iter(dsets))) <= 3
    over = (", ".join(NAMES.get(d, d) for d in dsets.pop()) if few else
            f"{'/'.join(map(str, sorted({len(r['datasets']) for r in avg.values()})))} datasets")
    ax.set_ylabel("HM (%)")
    ax.set_title(f"Base-to-new, average HM: {over}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def sweep_points(rows, param):
    """{(backbone, method): {x: [row per dataset]}} of the runs differing from the paper setting in
    `param` only (the paper-setting run is the point at its value), on datasets present at every x."""
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
    """Fig. 4 style: base, new, HM (means over the common datasets) against K or S, a panel per
    backbone and method, training time on the right axis. None without such a sweep."""
    points = sweep_points(rows, param)
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.4), squeeze=False)
    for ax, ((bb, m), by_x) in zip(axes[0], sorted(points.items(), key=lambda kv: _order(kv[0] + ("", "")))):
        xs = list(by_x)
        for field, style in (("base", "o-"), ("new", "s-"), ("hm", "^-")):
            ax.plot(xs, [statistics.mean(r[field] for r in by_x[x]) for x in xs], style,
                    label=field.replace("hm", "HM"))
        secs = [[r["seconds"] for r in by_x[x] if r["seconds"] is not None] for x in xs]
        if all(secs):
            twin = ax.twinx()
            twin.plot(xs, [statistics.mean(s) / 60 for s in secs], "k:", label="train time")
            twin.set_ylabel("train time (min)", fontsize=8)
        dsets = sorted({r["dataset"] for v in by_x.values() for r in v})
        ax.set_title(f"{NAMES.get(bb, bb)}{'' if m == 'none' else METHOD_LABELS[m]}: "
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
    runs = load_runs(root, warnings := [])
    if not runs:
        raise FileNotFoundError(f"no results.json under {root} (train.py writes one per finished run)"
                                + "".join(f"; {w}" for w in warnings))
    rows = b2n_rows(runs, seeds)
    paths = [plot_hm_bars(rows, os.path.join(root, "fig3_hm.png"))]
    paths += [plot_sweep(rows, p, os.path.join(root, f"fig4_{p}.png")) for p in SWEEPS]
    return [p for p in paths if p]
