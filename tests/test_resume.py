"""A run you can trust after any interruption: --resume finishes from any point with the numbers of an
uninterrupted run, checks its settings, never mixes two runs, and failures end in one line."""
import fcntl
import json
import os
import shutil

import pytest
import torch

import rundir
import train
from conftest import run_train


def learned(out, name):
    return torch.load(os.path.join(out, name), weights_only=False)["learned"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_root, tiny_clip_path):
    """One uninterrupted MAO run every interrupted one must equal."""
    return run_train(tmp_path_factory.mktemp("ref"), demo_root, tiny_clip_path, "--epochs", "2")


def same_as(reference, res, out):
    assert (res["base"], res["new"]) == (reference[0]["base"], reference[0]["new"])
    for name in ("base_prompt.pt", "new_prompt.pt"):
        assert torch.equal(learned(out, name)["ctx"], learned(reference[1], name)["ctx"])


def test_resume_after_the_new_step_and_on_a_finished_run(tmp_path, demo_root, tiny_clip_path, reference,
                                                         monkeypatch, capsys):
    def killed(*a):
        raise KeyboardInterrupt  # killed during evaluation: both steps are complete
    monkeypatch.setattr(train, "evaluate_run", killed)
    with pytest.raises(KeyboardInterrupt) as e:
        run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2")
    assert "--resume" in rundir.failure_line(e.value, ["--epochs", "2"])  # Ctrl-C says how to go on
    monkeypatch.undo()
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2", "--resume")
    same_as(reference, res, out)
    assert res["pseudo_labels"]["used_in_training"] == reference[0]["pseudo_labels"]["used_in_training"]
    assert res["train_seconds"] >= res["cost"]["mao_base"]["seconds"] > 0  # the earlier process counts
    log = open(os.path.join(out, "log.txt")).read()
    assert "[new] resumed from" in log and "all 1 epochs done" in log
    again, _ = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2", "--resume")
    assert (again["base"], again["new"]) == (res["base"], res["new"])
    assert "holds a finished run: its stages are complete" in capsys.readouterr().out


def test_resume_with_other_settings_is_refused_naming_them(tmp_path, demo_root, tiny_clip_path, monkeypatch):
    real_save = train.save_atomic

    def crash(obj, path):
        real_save(obj, path)
        if path.endswith("base_last.pt"):
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "4", "--lr", "0.0035")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"other settings: --lr 0.0035 \(now 0.01\), --seed 1 \(now 2\)"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "4", "--lr", "0.01", "--seed", "2", "--resume")


def test_a_folder_holding_a_run_is_refused_without_resume(tmp_path, demo_root, tiny_clip_path):
    _, out = run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")
    before = open(os.path.join(out, "results.json")).read()
    with pytest.raises(ValueError, match="holds a finished run .*add --resume to re-evaluate it, or choose"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1", "--seed", "2")
    assert open(os.path.join(out, "results.json")).read() == before  # nothing of the second run written
    os.remove(os.path.join(out, "results.json"))
    with pytest.raises(ValueError, match="holds a partial run: add --resume to continue it"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path, demo_root, tiny_clip_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # what a running train.py holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="is in use by a running train.py"):
            run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2")
    res, _ = run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")  # released
    assert res["base"] >= 0


def test_a_broken_test_image_stops_the_run_before_training(tmp_path, demo_root, tiny_clip_path):
    root = str(tmp_path / "data")
    shutil.copytree(demo_root, root)
    rel = json.load(open(os.path.join(root, "demo", "split_demo.json")))["test"][-1][0]
    path = os.path.join(root, "demo", "images", rel)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 3])  # truncated, its header intact: found by decoding it
    with pytest.raises(ValueError, match=f"cannot read image .*{rel}"):
        run_train(tmp_path, root, tiny_clip_path)
    assert not os.path.exists(tmp_path / "run")


def test_a_failed_write_ends_in_one_line_and_resume_finishes(tmp_path, demo_root, tiny_clip_path, reference,
                                                              monkeypatch):
    real = torch.save

    def full_disk(obj, path, *a, **k):
        if "new_last.pt" in str(path):
            open(path, "wb").close()  # what a full disk leaves: a truncated temporary file
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2")
    line = rundir.failure_line(e.value, ["--epochs", "2"])
    assert "new_last.pt: writing failed (basic_ios::clear" in line and "from the last complete checkpoint" in line
    assert "\n" not in line
    monkeypatch.undo()
    out = str(tmp_path / "run")
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # no truncated file left behind
    res, _ = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2", "--resume")
    same_as(reference, res, out)
