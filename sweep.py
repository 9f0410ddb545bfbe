"""A grid of independent train.py runs: datasets x backbones x methods x seeds, finished ones skipped.

    python sweep.py --datasets demo --backbones zsclip,coop,maple --methods none,mao,dpc --seeds 1,2,3
    python sweep.py --datasets all --root DATA --slice 0/4      # slice 1 of 4 (one per GPU)
    python sweep.py --datasets dtd,eurosat --dry_run            # what would run and what is done
    python sweep.py --datasets dtd --out_suffix k4 -- --topk 4  # flags after -- go to every run ({seed}: its seed)
    python sweep.py --protocol xd --root DATA                   # Table 2 + DG

Base-to-new (--protocol b2n): a run is finished when its results.json exists, so an interrupted
sweep resumes where it stopped; a run that crashes is reported and the sweep goes on. Each run is
its own process, writing to runs/<dataset>/<backbone>-<method>[-suffix]/shots<K>_seed<S> (--runs for
another root). Cross-dataset (--protocol xd): train.py --subsample all on the source into
runs/xd-<source>/..., then eval.py --datasets <targets> on the same folder; finished when
transfer.json holds every target. Then: python eval.py --summarize runs/ --plot runs/"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

from clip_prompt import BACKBONES
from config import NOT_SETTINGS, PARSER
from data import BASE_TO_NEW, dataset_spec, read_json
from eval import parse_targets


METHODS = next(x.choices for x in PARSER._actions if x.dest == "method")
CELL = ("dataset", "backbone", "method", "seed", "shots", "subsample", "root", "out")  # what names a cell, its data


def run_list(a):
    """Every (dataset, backbone, method, seed) of the grid in a fixed order; zero-shot CLIP once."""
    return [(ds, bb, m, seed) for ds in a.datasets for seed in a.seeds for bb in a.backbones
            for m in (["none"] if bb == "zsclip" else a.methods)]


def out_dir(a, ds, bb, m, seed):
    name = f"{bb}-{m}" + (f"-{a.out_suffix}" if a.out_suffix else "")
    return os.path.join(a.runs, ds if a.protocol == "b2n" else f"xd-{ds}", name, f"shots{a.shots}_seed{seed}")


def missing_targets(a, run):
    """The transfer targets an all-class run has not been evaluated on yet."""
    path = os.path.join(out_dir(a, *run), "transfer.json")
    if not os.path.isfile(path):
        return list(a.targets)
    with open(path) as f:
        done = json.load(f)["accuracy"]
    return [t for t in a.targets if t not in done]


def state(a, run, extra=()):
    """'done', 'train' (no results.json yet), 'eval' (trained, some targets to evaluate) or, where the folder's
    results.json records another cell, why (never counted finished, never run into)."""
    path = os.path.join(out_dir(a, *run), "results.json")
    if not os.path.isfile(path):
        return "train"
    ds, bb, m, seed = run
    cell = dict(vars(PARSER.parse_args([x.replace("{seed}", str(seed)) for x in extra])), dataset=ds, backbone=bb,
                method=m, seed=seed, shots=a.shots, subsample="all" if a.protocol == "xd" else "base")
    told = {"dataset", "backbone", "method", "seed", "shots", "subsample", "recipe"} | (
        {flag(f) for f in extra} - NOT_SETTINGS - {None})
    rec = read_json(path).get("args", {})
    wrong = [f"--{k} {rec.get(k)} (this cell: {cell[k]})" for k in sorted(told) if rec.get(k) != cell[k]]
    if wrong:
        return f"{path} records another run: {', '.join(wrong)}; move that folder away"
    return "eval" if a.protocol == "xd" and missing_targets(a, run) else "done"


def flag(arg):
    """The train.py setting a word after -- names (argparse's own prefix rule: --see is --seed), or None."""
    if not arg.startswith("--"):
        return None
    word = arg.split("=")[0]
    hits = {act.dest for opt, act in PARSER._option_string_actions.items() if opt == word} or \
        {act.dest for opt, act in PARSER._option_string_actions.items() if opt.startswith(word)}
    return hits.pop() if len(hits) == 1 else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", default="b2n", choices=["b2n", "xd"],
                    help="b2n: base-to-new (Table 1); xd: all classes of the source, then the targets")
    ap.add_argument("--datasets", help="comma list, or all (the 11; default demo, xd: imagenet)")
    ap.add_argument("--targets", default="xd,dg", help="xd: datasets evaluated zero-shot (eval.py --datasets)")
    ap.add_argument("--backbones", default="zsclip,coop,maple,promptsrc")
    ap.add_argument("--methods", default="none,mao,dpc")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--root", default="data")
    ap.add_argument("--runs", default="runs", help="folder of the run tree")
    ap.add_argument("--out_suffix", default="", help="appended to <backbone>-<method> (ablations)")
    ap.add_argument("--slice", default="0/1", help="i/n: every n-th run starting at i (one slice per GPU)")
    ap.add_argument("--dry_run", action="store_true", help="list the runs and their state; run nothing")
    a = ap.parse_args(argv)
    a.datasets = a.datasets or ("demo" if a.protocol == "b2n" else "imagenet")
    a.datasets = BASE_TO_NEW if a.datasets == "all" else a.datasets.split(",")
    a.backbones, a.methods = a.backbones.split(","), a.methods.split(",")
    if a.protocol == "xd":
        if "zsclip" in a.backbones:
            print("--protocol xd: zero-shot CLIP has no prompt to transfer; skipping zsclip")
            a.backbones.remove("zsclip")
    cell = [f for f in extra if flag(f) in CELL]
    if cell:  # else the run lands in another cell's folder and passes for it
        ap.error(f"{' '.join(cell)} after --: the sweep sets --{', --'.join(CELL)} itself, one cell and folder per "
                 f"run; give the grid with --datasets, --backbones, --methods, --seeds, --shots, --root, --protocol")
    changes = [f for f in extra if f.startswith("--") and flag(f) not in NOT_SETTINGS]
    if changes and not a.out_suffix:  # else an ablation lands in the paper run's folder and passes for it
        ap.error(f"{' '.join(changes)} after -- change what the runs learn: add --out_suffix NAME (e.g. "
                 f"--out_suffix {changes[0][2:].split('=')[0]}) so they get folders of their own, apart from the "
                 f"paper setting's")
    if not all(s.strip().lstrip("-").isdigit() for s in a.seeds.split(",")):
        ap.error(f"--seeds {a.seeds}: a comma list of integers, e.g. 1,2,3")
    if not re.fullmatch(r"\d+/\d+", a.slice):
        ap.error(f"--slice {a.slice}: i/n, the i-th of n slices counting from 0, e.g. 0/4")
    try:
        a.seeds = [int(s) for s in a.seeds.split(",")]
        i, n = (int(x) for x in a.slice.split("/"))
        if a.protocol == "xd":
            a.targets = parse_targets(a.targets)
        a.datasets = [dataset_spec(d)[0] for d in a.datasets]
        wrong = [x for x in a.backbones if x not in BACKBONES] + [x for x in a.methods if x not in METHODS]
        if wrong:
            raise ValueError(f"unknown {', '.join(wrong)}: backbones are {', '.join(BACKBONES)}; methods "
                             f"{', '.join(METHODS)}")
    except ValueError as e:  # an unknown dataset, backbone, method or target: the usage line, not a traceback
        ap.error(f"{e} (the forms: --datasets dtd,eurosat --targets xd,dg)")
    if not 0 <= i < n:
        ap.error(f"--slice {a.slice}: needs 0 <= i < n")
    PARSER.parse_args([x.replace("{seed}", "1") for x in extra])  # train.py's own check of them, before any run
    runs = run_list(a)[i::n]
    states = {r: state(a, r, extra) for r in runs}
    todo = [r for r in runs if states[r] in ("train", "eval")]
    wrong = [r for r in runs if states[r] not in ("train", "eval", "done")]
    print(f"{len(runs)} runs in this slice, {len(runs) - len(todo) - len(wrong)} finished, {len(todo)} to run"
          + f", {len(wrong)} whose folder holds another cell's record (not run):" * bool(wrong))
    for r in wrong:
        print(f"  {states[r]}")
    if a.dry_run:
        for r in [r for r in runs if r not in wrong]:
            for c in commands(a, r, extra, states[r]):
                print(f"  [{'done' if states[r] == 'done' else 'todo'}] {' '.join(c[1:])}")
        return dict(todo=todo, failed=wrong)
    failed = list(wrong)
    here = os.path.dirname(os.path.abspath(__file__))
    for k, r in enumerate(todo):
        t = time.time()
        for c in commands(a, r, extra, states[r]):
            print(f"[{k + 1}/{len(todo)}] {' '.join(c[1:])}", flush=True)
            if subprocess.call(c, cwd=here) != 0:
                failed.append(r)
                print(f"  FAILED: {r}")
                break
        else:
            print(f"  done in {(time.time() - t) / 60:.1f} min")
    if failed:
        print(f"{len(failed)} runs failed or not run: " + "; ".join(" ".join(map(str, r)) for r in failed))
    return dict(todo=todo, failed=failed)


def commands(a, r, extra, st):
    """The processes one run needs: train.py, then (xd) eval.py on the targets still missing."""
    ds, bb, m, seed = r
    out = os.path.abspath(out_dir(a, ds, bb, m, seed))
    cmds = []
    if st in ("train", "done"):
        cmds.append([sys.executable, "train.py", "--dataset", ds, "--backbone", bb, "--method", m,
                     "--seed", str(seed), "--shots", str(a.shots), "--root", os.path.abspath(a.root),
                     "--out", out] + ["--resume"] * os.path.isdir(out)  # what an earlier sweep left goes on
                    + (["--subsample", "all"] if a.protocol == "xd" else [])
                    + [x.replace("{seed}", str(seed)) for x in extra])  # e.g. a teacher of the same seed
    if a.protocol == "xd":
        targets = a.targets if st != "eval" else missing_targets(a, r)
        cmds.append([sys.executable, "eval.py", "--ckpt", out, "--datasets", ",".join(targets), "--root",
                     os.path.abspath(a.root)])
    return cmds


if __name__ == "__main__":
    try:
        sys.exit(1 if main()["failed"] else 0)
    except KeyboardInterrupt:  # the run in progress got the same Ctrl-C and left its checkpoint
        sys.exit(f"interrupted; continue with the same command (finished runs are skipped, the cut one resumes): "
                 f"python sweep.py {shlex.join(sys.argv[1:])}")
