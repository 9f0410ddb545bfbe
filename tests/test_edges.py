"""The edges found by trying to break a run: one line naming the file and the fix, nothing half-written."""
import errno
import glob
import json
import os
import pathlib
import re
import shutil
import urllib.error

import clip
import pytest
import torch
from PIL import Image

import config
import eval as evaluation
import rundir
import train
from clip_prompt import load_clip
from conftest import run_train
from data import fewshot_splits, read_splits
from sampler import check_settings


def test_a_full_disk_at_results_json_names_it_and_resume_only_evaluates(tmp_path, demo_root, tiny_clip_path,
                                                                         monkeypatch):
    write = pathlib.Path.write_text
    full = lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")) \
        if "results.json" in str(self) else write(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError) as e:
        run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")
    line = rundir.failure_line(e.value, ["--out", "my runs/x"])
    assert re.match(r"error: .*results\.json: No space left on device\. Free space", line) and "\n" not in line
    assert "'my runs/x' --resume continues" in line and "evaluated again, without retraining" in line
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith("results.json")]  # nothing half-written
    monkeypatch.undo()
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1", "--resume")
    assert "all 1 epochs done" in open(os.path.join(out, "log.txt")).read() and res["base"] > 0


def test_hidden_folders_are_not_classes_and_an_edited_split_draws_again(tmp_path, capsys):
    root = tmp_path / "mine"
    for c in ("cat", "dog", "owl", ".ipynb_checkpoints"):
        os.makedirs(root / c)
        for i in range(6):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / c / f"{i}.jpg")
    splits, _ = read_splits("folder", str(root))
    assert {c for s in splits.values() for _, _, c in s} == {"cat", "dog", "owl"}
    few = {p for p, _, _ in fewshot_splits("folder", str(root), 1, 1)[0]["train"]}
    js = json.loads((root / "split_folder.json").read_text())
    js["test"] += [r for r in js["train"] if r[0] in few]  # the images drawn move to test: a leak, if kept
    js["train"] = [r for r in js["train"] if r[0] not in few]
    (root / "split_folder.json").write_text(json.dumps(js))
    again = {p for p, _, _ in fewshot_splits("folder", str(root), 1, 1)[0]["train"]}
    assert len(again) == 3 and not again & few  # drawn again from the edited split
    Image.new("RGB", (8, 8)).save(root / "owl" / "new.jpg")
    read_splits("folder", str(root))
    assert "1 images under" in capsys.readouterr().out  # added later: said, not silently ignored


def test_settings_no_run_can_use_are_refused_with_fixes_that_work(monkeypatch):
    for c, b, k in [(c, b, k) for c in range(2, 13) for b in range(1, 7) for k in range(2, c)]:
        try:
            check_settings(c, b, k)
        except ValueError as e:
            for k2, b2 in re.findall(r"--topk (\d+) with --anchors (\d+)", str(e)) + [
                    (k, b) for b, k in re.findall(r"--anchors (\d+) with --topk (\d+)", str(e))]:
                check_settings(c, int(b2), int(k2))  # every suggestion is accepted
    for template, match in (("a photo", "needs one {}"), ("{} {}", "needs one {}"), ("a {}.", "coop does not")):
        with pytest.raises(ValueError, match=match):
            config.parse_args(["--template", template, "--device", "cpu"])
    monkeypatch.setattr(clip, "load", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("no route")))
    with pytest.raises(ValueError, match="ViT-B/16: its download failed .*give --clip /path/to/its .pt"):
        load_clip("ViT-B/16")  # no network, no --clip


def test_stage_new_and_words_refuse_a_zero_shot_run(tmp_path, demo_root, tiny_clip_path, capsys):
    _, out = run_train(tmp_path, demo_root, tiny_clip_path, "--backbone", "zsclip")
    with pytest.raises(ValueError, match="holds no learned prompt"):
        evaluation.prompt_words(out)  # --words on a zero-shot run
    before = open(os.path.join(out, "args.json")).read()
    with pytest.raises(ValueError, match="holds a finished run"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--stage", "new", "--init_from", os.path.join(out, "x.pt"))
    assert open(os.path.join(out, "args.json")).read() == before
    with rundir.OutputLock(config.parse_args(["--out", str(tmp_path / "typo"), "--resume", "--device", "cpu"])):
        assert "holds no run to continue (a mistyped --out?)" in capsys.readouterr().out


def test_broken_inputs_fail_before_anything_is_written(tmp_path, demo_root, tiny_clip_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    (root / "demo" / "split_demo.json").write_text(json.dumps({"val": [], "test": []}))
    with pytest.raises(ValueError, match="split_demo.json: not a CoOp split file"):
        run_train(tmp_path, str(root), tiny_clip_path, "--method", "none")
    assert not os.path.exists(tmp_path / "run")
    monkeypatch.setattr(train, "cross_entropy", lambda *a: torch.tensor(float("nan")))  # as --lr 1e9 does on CLIP
    with pytest.raises(FloatingPointError, match="loss is nan .*another --out with a smaller --lr") as e:
        run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none")
    assert rundir.failure_line(e.value, []).startswith("error: [base] loss is nan")


def test_predict_goes_on_past_an_unreadable_image(tmp_path, demo_root, tiny_clip_path, capsys):
    _, out = run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")
    good = sorted(glob.glob(os.path.join(demo_root, "demo", "images", "*", "*")))[0]
    evaluation.main(["--ckpt", out, "--predict", str(tmp_path / "missing.jpg"), good])
    printed = capsys.readouterr().out
    assert "missing.jpg: cannot read image" in printed and f"{good}\n" in printed
