"""Run a grid of independent train.py runs: datasets x backbones x methods x seeds, skipping finished ones.

    python sweep.py --datasets demo --backbones zsclip,coop,maple,promptsrc --methods none,mao,dpc --seeds 1,2,3
    python sweep.py --datasets all --root DATA --slice 0/4      # the first of 4 slices (one per GPU or machine)
    python sweep.py --datasets dtd,eurosat --dry_run            # list what would run and what is done
    python sweep.py --datasets dtd -- --topk 4 --out_suffix k4  # flags after -- go to every train.py run

A run is finished when its results.json exists, so an interrupted sweep resumes where it stopped; a run that
crashes is reported and the sweep goes on. Each run is its own process (python train.py ...), writing to
train.py's default folder runs/<dataset>/<backbone>-<method>/shots<K>_seed<S> (or --runs instead of runs).
Then: python eval.py --summarize runs/
"""
import argparse
import os
import subprocess
import sys
import time

BASE_TO_NEW = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
               "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]  # MAO Table 1, in its order


def run_list(a):
    """Every (dataset, backbone, method, seed) of the grid, in a fixed order; zero-shot CLIP once per seed."""
    runs = []
    for ds in a.datasets:
        for seed in a.seeds:
            for bb in a.backbones:
                for m in (["none"] if bb == "zsclip" else a.methods):
                    runs.append((ds, bb, m, seed))
    return runs


def out_dir(a, ds, bb, m, seed):
    name = f"{bb}-{m}" + (f"-{a.out_suffix}" if a.out_suffix else "")
    return os.path.join(a.runs, ds, name, f"shots{a.shots}_seed{seed}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="demo", help="comma list, or 'all' for the 11 base-to-new datasets")
    ap.add_argument("--backbones", default="zsclip,coop,maple,promptsrc")
    ap.add_argument("--methods", default="none,mao,dpc")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--root", default="data")
    ap.add_argument("--runs", default="runs", help="folder of the run tree")
    ap.add_argument("--out_suffix", default="", help="appended to <backbone>-<method> (for ablation sweeps)")
    ap.add_argument("--slice", default="0/1", help="i/n: run every n-th run starting at i (spread over GPUs)")
    ap.add_argument("--dry_run", action="store_true", help="list the runs and their state; run nothing")
    a = ap.parse_args(argv)
    a.datasets = BASE_TO_NEW if a.datasets == "all" else a.datasets.split(",")
    a.backbones, a.methods = a.backbones.split(","), a.methods.split(",")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    i, n = (int(x) for x in a.slice.split("/"))
    if not 0 <= i < n:
        ap.error(f"--slice {a.slice}: needs 0 <= i < n")
    runs = run_list(a)[i::n]
    todo = [r for r in runs if not os.path.isfile(os.path.join(out_dir(a, *r), "results.json"))]
    print(f"{len(runs)} runs in this slice, {len(runs) - len(todo)} finished, {len(todo)} to run")
    if a.dry_run:
        for r in runs:
            state = "todo" if r in todo else "done"
            print(f"  [{state}] {' '.join(cmd(a, r, extra)[1:])}")
        return dict(todo=todo, failed=[])
    failed = []
    here = os.path.dirname(os.path.abspath(__file__))
    for k, r in enumerate(todo):
        c = cmd(a, r, extra)
        print(f"[{k + 1}/{len(todo)}] {' '.join(c[1:])}", flush=True)
        t = time.time()
        if subprocess.call(c, cwd=here) != 0:
            failed.append(r)
            print(f"  FAILED: {r}")
        else:
            print(f"  done in {(time.time() - t) / 60:.1f} min")
    if failed:
        print(f"{len(failed)} runs failed: " + "; ".join(" ".join(map(str, r)) for r in failed))
    return dict(todo=todo, failed=failed)


def cmd(a, r, extra):
    ds, bb, m, seed = r
    return [sys.executable, "train.py", "--dataset", ds, "--backbone", bb, "--method", m, "--seed", str(seed),
            "--shots", str(a.shots), "--root", os.path.abspath(a.root), "--out",
            os.path.abspath(out_dir(a, ds, bb, m, seed))] + extra


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
