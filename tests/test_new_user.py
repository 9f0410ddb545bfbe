"""What a new user hit on a fresh clone: each input either does the right thing or ends in one line with the fix."""
import json
import os
import shutil
import urllib.error

import pytest
from PIL import Image

import config
import prepare
import report
import sweep
import train
from conftest import run_train
from data import read_splits


def test_imagenet_listing_follows_its_class_names_and_images(tmp_path, capsys):
    inet = tmp_path / "imagenet"
    for split in ("train", "val"):
        for w in ("n01", "n02", "n03"):
            os.makedirs(inet / "images" / split / w)
            Image.new("RGB", (8, 8)).save(inet / "images" / split / w / "a.JPEG")
    (inet / "classnames.txt").write_text("n01 tench\nn02 crane\nn03 crane\n")
    assert [c for _, _, c in read_splits("imagenet", str(tmp_path))[0]["test"]] == ["tench", "crane", "crane"]
    assert "names two classes each crane" in capsys.readouterr().out  # the shipped WordNet file's flaw, said
    (inet / "classnames.txt").write_text("n01 tench\nn02 crane bird\nn03 construction crane\n")  # CoOp's names
    Image.new("RGB", (8, 8)).save(inet / "images" / "train" / "n01" / "b.JPEG")
    splits = read_splits("imagenet", str(tmp_path))[0]
    assert len(splits["train"]) == 4 and splits["test"][2][2] == "construction crane"  # not the stale cache


def test_prepare_all_lists_what_needs_a_hand_check_fails_on_empty_and_offline_names_the_network(tmp_path,
                                                                                               monkeypatch):
    root = str(tmp_path)
    offline = lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("[Errno -3] name resolution"))
    monkeypatch.setattr(prepare, "AUTO", {k: (offline, *v[1:]) for k, v in prepare.AUTO.items()})
    os.makedirs(tmp_path / "dtd.tmp999999999" / "download")  # what kill -9 left: removed, never read
    rows = prepare.main(["all", "--root", root])
    assert set(rows) == set(prepare.BASE_TO_NEW) and not os.path.exists(tmp_path / "dtd.tmp999999999")
    assert "no network connection" in rows["dtd"][1] and "licence" in rows["imagenet"][1]
    for split in ("train", "val"):
        os.makedirs(tmp_path / "imagenet" / "images" / split)  # images placed by hand (none: the folders are empty)
    prepare.prepare("imagenet", root)
    assert prepare.check("imagenet", root)[0] == "broken"  # not "ready, 0 classes"


def test_a_tampered_split_is_refused_by_every_run(tmp_path, tiny_clip_path):
    os.makedirs(tmp_path / "dtd" / "images")
    with open(os.path.join(prepare.SPLITS, "split_zhou_DescribableTextures.json")) as f:
        split = json.load(f)
    split["train"] = split["train"][:-1]
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="differs from the published split .* python prepare.py dtd"):
        train.main(["--dataset", "dtd", "--root", str(tmp_path), "--clip", tiny_clip_path, "--device", "cpu"])


def test_settings_that_would_file_or_select_wrongly_are_refused(tmp_path, demo_root, tiny_clip_path):
    with pytest.raises(SystemExit):  # an ablation into the paper run's folder
        sweep.main(["--datasets", "dtd", "--runs", str(tmp_path), "--dry_run", "--", "--topk", "4"])
    sweep.main(["--datasets", "dtd", "--runs", str(tmp_path), "--dry_run", "--", "--teacher", "x"])  # not a setting
    for argv, match in ((["--dataset", "imagenet", "--best_val", "1"], "test split"),
                        (["--method", "mao", "--best_val", "1"], "trains its whole budget"),
                        (["--backbone", "zsclip", "--template", "a {} of {x}"], "no other brace")):
        with pytest.raises(ValueError, match=match):
            config.parse_args(argv)
    for device in ("mps", "foo"):
        with pytest.raises(ValueError, match="cpu or cuda"):
            train.load_clip(tiny_clip_path, device)
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    split = json.loads((root / "demo" / "split_demo.json").read_text())
    (root / "demo" / "split_demo.json").write_text(json.dumps(dict(split, val=[])))
    with pytest.raises(ValueError, match="has none: leave it out"):
        run_train(tmp_path, str(root), tiny_clip_path, "--method", "none", "--best_val", "1")


def test_stage_new_needs_the_base_steps_settings(tmp_path, demo_root, tiny_clip_path):
    _, out = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2", "--stage", "base")
    with pytest.raises(ValueError, match=r"other settings: --seed 1 \(now 2\)"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2", "--stage", "new", "--seed", "2")
    res, _ = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2", "--stage", "new", "--new_batch_size", "8")
    assert res["new"] >= 0  # the new step's own flags may differ


def test_divergence_in_the_last_step_is_no_chance_result(tmp_path, demo_root, tiny_clip_path):
    with pytest.raises(FloatingPointError, match="finite .*smaller --lr"):  # prompts or scores; one step at 1e38
        run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "2", "--batch_size", "48",
                  "--lr", "1e38")


def test_a_results_json_with_a_string_accuracy_is_skipped_with_a_word(tmp_path):
    run = tmp_path / "demo" / "coop-none" / "shots16_seed1"
    os.makedirs(run)
    (run / "results.json").write_text(json.dumps(dict(dataset="demo", backbone="coop", method="none", seed=1,
                                                      base="61.0", new=50.0, hm=55.0)))
    with pytest.raises(FileNotFoundError, match="base is '61.0', not a number"):
        report.summarize(str(tmp_path))
    with pytest.raises(SystemExit):
        sweep.main(["--slice", "1"])  # the usage line, not a traceback
