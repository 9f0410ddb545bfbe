"""sweep.py: the grid, skipping finished runs, slices that partition it, and flags passed through."""
import json
import os

import sweep


def test_dry_run_lists_the_grid_and_skips_finished_runs(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    args = ["--datasets", "dtd,eurosat", "--backbones", "zsclip,coop", "--methods", "none,mao,dpc", "--seeds", "1,2",
            "--runs", runs, "--dry_run"]
    first = sweep.main(args)
    assert len(first["todo"]) == 2 * 2 * (1 + 3)  # zero-shot once per seed, not once per method
    done = os.path.join(runs, "dtd", "coop-mao", "shots16_seed2")
    os.makedirs(done)
    open(os.path.join(done, "results.json"), "w").write(json.dumps(dict(args=dict(
        dataset="dtd", backbone="coop", method="mao", seed=2, shots=16, subsample="base", recipe="paper"))))
    again = sweep.main(args)
    assert len(again["todo"]) == len(first["todo"]) - 1
    assert ("dtd", "coop", "mao", 2) not in again["todo"]
    out = capsys.readouterr().out
    assert "[done]" in out and "--method mao --seed 2" in out


def test_slices_partition_the_grid(tmp_path):
    base = ["--datasets", "all", "--runs", str(tmp_path), "--dry_run"]
    whole = sweep.main(base)["todo"]
    parts = [sweep.main(base + ["--slice", f"{i}/3"])["todo"] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole) and len(whole) == 11 * 3 * (1 + 3 * 3)


def test_flags_after_double_dash_reach_every_run(tmp_path, capsys):
    sweep.main(["--datasets", "dtd", "--backbones", "coop", "--methods", "mao", "--seeds", "1,2", "--runs",
                str(tmp_path), "--out_suffix", "k4", "--dry_run", "--", "--topk", "4", "--teacher", "t/s{seed}"])
    out = capsys.readouterr().out
    assert "--topk 4" in out and "coop-mao-k4" in out and "--teacher t/s1" in out and "--teacher t/s2" in out
