"""What 139 inputs tried as a new user found: no record in the wrong cell, no traceback, no misleading line."""
import errno
import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import bench
import config
import demo
import prepare
import rundir
import sweep
from conftest import run_train
from data import read_splits

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_sweep_record_lands_in_another_cells_folder(tmp_path, capsys):
    grid = ["--datasets", "dtd", "--backbones", "coop", "--methods", "none,mao", "--seeds", "1", "--runs",
            str(tmp_path), "--dry_run"]
    for flag in ("--seed", "--see", "--backbone", "--method", "--dataset", "--subsample", "--shots", "--out"):
        with pytest.raises(SystemExit):  # they name the cell: its folder would hold another cell's run
            sweep.main(grid + ["--out_suffix", "x", "--", flag, "2"])
        assert "the sweep sets" in capsys.readouterr().err
    cell = tmp_path / "dtd" / "coop-mao" / "shots16_seed1"
    os.makedirs(cell)
    record = dict(dataset="dtd", backbone="coop", method="mao", seed=2, shots=16, subsample="base", recipe="paper")
    (cell / "results.json").write_text(json.dumps(dict(args=record)))
    res = sweep.main(grid)
    assert ("dtd", "coop", "mao", 1) in res["failed"] and ("dtd", "coop", "mao", 1) not in res["todo"]
    assert "records another run: --seed 2 (this cell: 1)" in capsys.readouterr().out
    (cell / "results.json").write_text(json.dumps(dict(args=dict(record, seed=1, recipe="official"))))
    assert sweep.main(grid)["failed"] == [("dtd", "coop", "mao", 1)]  # the released recipe's run is another cell
    (cell / "results.json").write_text(json.dumps(dict(args=dict(record, seed=1))))
    res = sweep.main(grid)
    assert ("dtd", "coop", "mao", 1) not in res["todo"] + res["failed"]  # its own record: finished


def test_class_names_clip_reads_alike_and_classes_without_training_images_are_refused(tmp_path):
    for c in ("red_circle", "red circle", "blue_star"):
        os.makedirs(tmp_path / c)
        for i in range(6):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{i}.png")
    with pytest.raises(ValueError, match="'red circle' and 'red_circle' read as one class name"):
        read_splits("folder", str(tmp_path))
    shutil.rmtree(tmp_path / "red circle")
    read_splits("folder", str(tmp_path))  # writes split_folder.json
    split = json.loads((tmp_path / "split_folder.json").read_text())
    split["train"] = [row for row in split["train"] if row[1] != 1]  # edited by hand: red circle kept its test rows
    (tmp_path / "split_folder.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="'red circle' \\(label 1\\) has test images but no training images"):
        read_splits("folder", str(tmp_path))


def test_scripts_check_their_flags_before_any_work(tmp_path, capsys):
    (tmp_path / "not.json").write_text("loss 1.0")
    for argv in (["--repeats", "0"], ["--batch", "-1"], ["--device", "cuda" if not torch.cuda.is_available() else "foo"],
                 ["--device", "foo"],
                 ["--clip", str(tmp_path / "missing.pt")], ["--out", str(tmp_path / "no" / "dir" / "b.json")],
                 ["--fits", str(tmp_path / "missing.json")], ["--fits", str(tmp_path / "not.json")]):
        with pytest.raises(SystemExit):
            bench.main(["--quick"] + argv)
        assert f"error: {argv[0]}" in capsys.readouterr().err
    for argv in (["--steps", "0"], ["--batch_size", "-2"], ["--threads", "0"], ["--lr", "nan"]):
        with pytest.raises(SystemExit):
            demo.main(argv + ["--out", str(tmp_path / "clip.pt")])
        assert not os.path.exists(tmp_path / "clip.pt")  # no untrained CLIP written first
    for argv, match in ((["--backbone", "promptsrc", "--gpa_std", "0"], "--gpa_std 0.0: GPA's Gaussian"),):
        with pytest.raises(ValueError, match=match):
            config.parse_args(argv)
    out = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), str(tmp_path / "gpu")], capture_output=True,
                         text=True, env=dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" +
                                             os.environ["PATH"]))
    if not torch.cuda.is_available():  # stops at once, with one line and a failure status
        assert out.returncode == 1 and out.stdout.strip().count("\n") == 0 and "no CUDA GPU" in out.stdout


def test_long_prompts_truncated_checkpoints_and_full_disks_end_in_one_line(tmp_path, demo_root, tiny_clip_path,
                                                                           monkeypatch):
    for flags in (["--backbone", "ivlp", "--n_ctx", "80", "--ctx_init", ""], ["--ctx_init", "a " * 80]):
        with pytest.raises(ValueError, match="too long for context length 77: shorten it"):
            run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", *flags)
    assert not os.path.exists(tmp_path / "run")

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rundir.EventsWriter, "flush", full_disk)
    with pytest.raises(OSError) as e:  # in this thread, naming the file: no writer thread, nothing at exit
        run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")
    assert ".out.tfevents." in e.value.filename and "No space left" in rundir.failure_line(e.value, [])
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "run")
    run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")
    last = tmp_path / "run" / "base_last.pt"
    last.write_bytes(last.read_bytes()[:100])  # truncated by hand, or by a copy cut short
    with pytest.raises(ValueError, match=f"--resume: {last} is not a readable checkpoint .*delete it and resume"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1", "--resume")


def test_a_moved_or_older_run_resumes_and_a_finished_base_step_says_what_runs(tmp_path, demo_root, tiny_clip_path,
                                                                              capsys, monkeypatch):
    real = rundir.save_atomic

    def cut(obj, path):  # killed after the first base-step epoch's checkpoint
        real(obj, path)
        raise KeyboardInterrupt
    monkeypatch.setattr("train.save_atomic", cut)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "4", "--stage", "base")
    monkeypatch.undo()
    last = tmp_path / "run" / "base_last.pt"
    ck = torch.load(last, weights_only=False)
    del ck["settings"]["full_text"]  # a run from before --full_text, its CLIP where it lay on another machine
    ck["settings"]["clip"] = os.path.join("/elsewhere", os.path.basename(tiny_clip_path))
    torch.save(ck, last)
    with pytest.raises(ValueError, match=r"--full_text 1 \(now 0\)\. Resume with its flags"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "4", "--stage", "base", "--resume")
    run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "4", "--stage", "base", "--resume", "--full_text", "1")
    capsys.readouterr()
    res, _ = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "4", "--resume", "--full_text", "1")
    assert "finished --stage base run: it goes on as --stage both" in capsys.readouterr().out and res["new"] >= 0


def test_restoring_an_image_never_means_editing_a_checked_split(tmp_path, demo_root, tiny_clip_path):
    assert "python prepare.py dtd" in prepare.restore_hint("dtd", "D") and "published" in prepare.restore_hint("dtd", "D")
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    rel = json.loads((root / "demo" / "split_demo.json").read_text())["test"][0][0]
    os.remove(root / "demo" / "images" / rel)
    with pytest.raises(ValueError, match=f"{rel} .*Delete {root / 'demo'} and run again"):
        run_train(tmp_path, str(root), tiny_clip_path)


def test_two_first_demo_runs_at_once_both_get_the_whole_dataset(tmp_path, monkeypatch):
    live = tmp_path / f"demo.tmp{os.getppid()}"  # a writer still at work beside this one
    os.makedirs(live)
    replace = os.replace

    def other_first(src, dst):  # the other writer renamed its copy into place a moment earlier
        shutil.copytree(src, dst)
        replace(src, dst)
    monkeypatch.setattr(os, "replace", other_first)
    ddir = demo.make_demo(str(tmp_path), n_train=2, n_val=1, n_test=1, num_classes=2)
    monkeypatch.undo()
    assert live.is_dir() and len(os.listdir(os.path.join(ddir, "images"))) == 2
    assert [f for f in os.listdir(tmp_path) if f.startswith("demo.tmp")] == [live.name]


def test_ctrl_c_in_a_sweep_ends_in_the_command_that_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(sys, "argv", ["sweep.py", "--datasets", "demo", "--backbones", "coop", "--methods", "none",
                                      "--seeds", "1", "--runs", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(HERE, "sweep.py"), run_name="__main__")
    assert str(e.value.code).startswith("interrupted; continue with") and "python sweep.py --datasets demo" in str(
        e.value.code)


def test_a_grid_task_fails_when_either_of_its_sweeps_does(tmp_path):
    os.makedirs(tmp_path / ".venv" / "bin")
    (tmp_path / ".venv" / "bin" / "activate").write_text(  # the first sweep fails, the second succeeds
        'python() { case "$*" in *none,dept,mao,dpc*) return 3;; *) return 0;; esac; }\n')
    env = dict(os.environ, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="12")
    assert subprocess.run(["bash", os.path.join(HERE, "docs", "demo_grid.sbatch")], env=env).returncode == 3
