"""Cross-dataset and DG protocol end to end: train on every class of one synthetic dataset, evaluate the prompt
zero-shot on other synthetic datasets with other class names (MAO Table 2), and the sweep that drives it."""
import json
import os

import pytest
import torch
from PIL import Image

import eval as evaluation
import report
import sweep
from clip_prompt import build_learner, load_clip
from conftest import run_train
from data import build_transforms, read_splits, subsample_classes
from demo import DEMO_CLASSES

TEXTURES = ["banded", "blotchy", "braided"]


def write_targets(root, source_names):
    """A DTD-layout dataset with texture classes, and an ImageNet-R-layout one whose 2 classes are source classes."""
    d = os.path.join(root, "dtd")
    os.makedirs(os.path.join(d, "images"))
    items = []
    for y, c in enumerate(TEXTURES):
        os.makedirs(os.path.join(d, "images", c))
        for k in range(3):
            rel = f"{c}/{c}_{k}.jpg"
            Image.new("RGB", (16, 16), (40 * y, 90, 200 - 50 * k)).save(os.path.join(d, "images", rel))
            items.append([rel, y, c])
    with open(os.path.join(d, "split_zhou_DescribableTextures.json"), "w") as f:
        json.dump({"train": items, "val": items, "test": items}, f)
    r = os.path.join(root, "imagenet-rendition")
    os.makedirs(r)
    with open(os.path.join(r, "classnames.txt"), "w") as f:
        f.writelines(f"n0000000{i} {name}\n" for i, name in enumerate(source_names[:4]))
    for i in (1, 3):  # A/R keep a subset of ImageNet's classes: 2 folders here, labels = sorted folder index
        os.makedirs(os.path.join(r, "imagenet-r", f"n0000000{i}"))
        for k in range(2):
            Image.new("RGB", (16, 16), (200, 30 * i, 60 * k)).save(os.path.join(r, "imagenet-r", f"n0000000{i}", f"{k}.png"))
    return root


def direct_accuracy(ckpt_path, clip_path, root, target):
    """The target's accuracy computed without eval.py's transfer code: its class names, every test image."""
    ck = torch.load(ckpt_path, weights_only=False)
    model = load_clip(clip_path, "cpu")
    splits, image_dir = read_splits(target, root)
    sub, names = subsample_classes(splits, "all")
    learner = build_learner(ck["backbone"], model, names, **ck["learner_kwargs"])
    learner.load_learned(ck["learned"])
    loader = evaluation.test_loader(image_dir, sub["test"], build_transforms(model.visual.input_resolution)[1])
    return evaluation.accuracy(learner, loader, "cpu"), names


def test_all_class_run_then_transfer_to_targets_with_their_own_class_names(tmp_path, demo_root, tiny_clip_path):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--method", "dpc", "--subsample", "all", "--epochs", "1",
                         "--dpc_epochs", "1", "--omega_b", "0.5")
    source = [" ".join(c) for c in DEMO_CLASSES[:12]]
    assert res["protocol"] == "all" and 0 <= res["all"] <= 100 and "base" not in res and "new" not in res
    assert torch.load(os.path.join(out, "base_prompt.pt"), weights_only=False)["classnames"] == source
    targets = write_targets(str(tmp_path / "targets"), source)
    got = evaluation.main(["--ckpt", out, "--datasets", "dtd,imagenet_r", "--root", targets, "--workers", "0"])
    # the DTD target is scored with its own texture names by the prompt for unseen classes (omega_n mix) ...
    acc, names = direct_accuracy(os.path.join(out, "new_prompt.pt"), tiny_clip_path, targets, "dtd")
    assert names == TEXTURES and got["classes"]["dtd"] == 3 and got["test_images"]["dtd"] == 9
    assert got["accuracy"]["dtd"] == acc and got["prompt"]["dtd"] == "new_prompt.pt"
    # ... the ImageNet-R-like target holds source classes, so the base prompt (omega_b mix) scores it
    acc, names = direct_accuracy(os.path.join(out, "base_prompt.pt"), tiny_clip_path, targets, "imagenet_r")
    assert names == [source[1], source[3]] and got["accuracy"]["imagenet_r"] == acc
    assert got["prompt"]["imagenet_r"] == "base_prompt.pt"
    # the two DPC mixes differ, so the choice of prompt is visible in the numbers, not only in the record
    a = torch.load(os.path.join(out, "base_prompt.pt"), weights_only=False)["learned"]["ctx"]
    b = torch.load(os.path.join(out, "new_prompt.pt"), weights_only=False)["learned"]["ctx"]
    assert not torch.equal(a, b)
    with open(os.path.join(out, "transfer.json")) as f:
        assert json.load(f)["accuracy"] == got["accuracy"]
    # finished targets are not evaluated again: with a root that holds nothing, nothing is read
    again = evaluation.evaluate_transfer(out, ["dtd", "imagenet_r"], dict(root=str(tmp_path / "empty")))
    assert again["accuracy"] == got["accuracy"]
    with pytest.raises(FileNotFoundError, match="dataset folder .*caltech-101 not found"):
        evaluation.evaluate_transfer(out, ["caltech101"], dict(root=targets, workers=0))
    summary = report.summarize(str(tmp_path))
    (row,) = summary["xd"]
    assert row["acc"]["dtd"][0] == got["accuracy"]["dtd"] and row["acc"]["demo"][0] == res["all"]


def test_mao_all_classes_trains_the_base_step_only(tmp_path, demo_root, tiny_clip_path):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--subsample", "all", "--epochs", "1")
    assert res["stage"] == "base" and res["variant"] == {"clip": tiny_clip_path, "epochs": 1, "shots": 8, "topk": 3}
    assert os.path.isfile(os.path.join(out, "base_prompt.pt")) and not os.path.exists(os.path.join(out, "new_prompt.pt"))
    ck = torch.load(os.path.join(out, "base_prompt.pt"), weights_only=False)
    assert ck["subsample"] == "all" and len(ck["classnames"]) == 12 and ck["epoch"] == 1  # all epochs, not half
    assert evaluation.evaluate_checkpoints(out, "all", dict(workers=0))["all"] == res["all"]
    with pytest.raises(ValueError, match="there is no new step"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--subsample", "all", "--stage", "new")


def test_test_only_dataset_cannot_be_a_training_source(tmp_path, demo_root, tiny_clip_path):
    targets = write_targets(str(tmp_path / "t"), [" ".join(c) for c in DEMO_CLASSES[:4]])
    with pytest.raises(ValueError, match="no training images.*eval.py --ckpt RUN --datasets imagenet_r"):
        run_train(tmp_path, targets, tiny_clip_path, "--dataset", "imagenet_r", "--subsample", "all")


def test_sweep_xd_trains_the_source_then_evaluates_missing_targets(tmp_path, capsys):
    runs = str(tmp_path)
    args = ["--protocol", "xd", "--backbones", "zsclip,coop", "--methods", "none,mao", "--seeds", "1", "--runs", runs,
            "--dry_run"]
    first = sweep.main(args)
    assert first["todo"] == [("imagenet", "coop", "none", 1), ("imagenet", "coop", "mao", 1)]
    out = capsys.readouterr().out
    assert "skipping zsclip" in out and "--subsample all" in out
    assert "eval.py --ckpt" in out and "--datasets caltech101,oxford_pets" in out and "imagenet_r" in out
    d = os.path.join(runs, "xd-imagenet", "coop-mao", "shots16_seed1")
    os.makedirs(d)
    json.dump(dict(args=dict(dataset="imagenet", backbone="coop", method="mao", seed=1, shots=16, subsample="all",
                             recipe="paper")), open(os.path.join(d, "results.json"), "w"))  # its own cell's record
    json.dump({"accuracy": {t: 50.0 for t in evaluation.parse_targets("xd,dg") if t != "ucf101"}},
              open(os.path.join(d, "transfer.json"), "w"))
    again = sweep.main(args)
    assert ("imagenet", "coop", "mao", 1) in again["todo"]  # trained, one target left: evaluate that one only
    todo = [l for l in capsys.readouterr().out.splitlines() if "[todo]" in l and d in l]
    assert len(todo) == 1 and "eval.py" in todo[0] and "--datasets ucf101 " in todo[0]
    json.dump({"accuracy": {t: 50.0 for t in evaluation.parse_targets("xd,dg")}}, open(os.path.join(d, "transfer.json"), "w"))
    assert ("imagenet", "coop", "mao", 1) not in sweep.main(args)["todo"]
