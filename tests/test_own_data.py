"""Your own images as a dataset, a prediction from a saved run, and its prompt read back as words."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from clip_prompt import class_logits, load_clip
from data import build_transforms, read_image
from eval import load_checkpoint, load_predictor, prompt_learner, prompt_words

CLASSES = ["red_apple", "green_leaf", "blue_sky", "yellow_sun", "white_snow", "black_night"]


def make_folder(root, classes=CLASSES, n=10):
    """One folder per class of n small images: a class colour plus noise."""
    rng = np.random.default_rng(0)
    for y, c in enumerate(classes):
        os.makedirs(os.path.join(root, c))
        for i in range(n):
            pixels = rng.integers(0, 60, (24, 24, 3)) + np.array([(y * 40) % 200, (y * 90) % 200, (y * 20) % 200])
            Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    return str(root)


def run(root, clip_path, out, *extra):
    return train.main(["--dataset", "folder", "--root", root, "--clip", clip_path, "--device", "cpu",
                       "--workers", "0", "--out", str(out), "--shots", "4", "--epochs", "2", "--anchors", "1",
                       "--topk", "2", "--log_every", "1000", *extra])


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, tiny_clip_path):
    root = make_folder(tmp_path_factory.mktemp("own") / "images")
    out = tmp_path_factory.mktemp("run") / "mao"
    return root, str(out), run(root, tiny_clip_path, out)


def test_a_folder_of_class_folders_trains_with_mao_and_keeps_its_split(folder_run, tiny_clip_path, tmp_path):
    root, out, res = folder_run
    split = os.path.join(root, "split_folder.json")
    with open(split) as f:
        items = json.load(f)
    assert {n for _, _, n in items["test"]} == {c.replace("_", " ") for c in CLASSES}
    assert [len([i for i in items[s] if i[1] == 0]) for s in ("train", "val", "test")] == [5, 2, 3]
    assert res["method"] == "mao" and 0 <= res["base"] <= 100 and 0 <= res["new"] <= 100
    new = [c.replace("_", " ") for c in sorted(CLASSES)[3:]]  # labels in folder-name order, the last half new
    assert load_checkpoint(os.path.join(out, "new_prompt.pt"))["classnames"] == new
    before, stamp = open(split).read(), os.stat(split).st_mtime_ns
    run(root, tiny_clip_path, tmp_path / "seed2", "--seed", "2", "--method", "none")
    assert open(split).read() == before and os.stat(split).st_mtime_ns == stamp  # written once


@pytest.mark.parametrize("case, message", [("one_class", "at least 2"), ("empty", "holds 0 images"),
                                           ("few", "--shots 4"), ("broken", "cannot read image")])
def test_bad_folders_fail_in_one_line_before_a_run_is_written(tmp_path, tiny_clip_path, case, message):
    root = make_folder(tmp_path / "images", CLASSES[:1] if case == "one_class" else CLASSES[:4],
                       n=6 if case == "few" else 10)
    if case == "empty":
        os.makedirs(os.path.join(root, "grey_fog"))
    if case == "broken":
        for f in os.listdir(os.path.join(root, "blue_sky")):
            open(os.path.join(root, "blue_sky", f), "w").write("not an image")
    with pytest.raises((ValueError, OSError)) as e:
        run(root, tiny_clip_path, tmp_path / "out", "--anchors", "1", "--topk", "1")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_prediction_agrees_with_the_evaluation_and_names_each_class_prompt(folder_run, tiny_clip_path):
    root, out, _ = folder_run
    with open(os.path.join(root, "split_folder.json")) as f:
        images = [os.path.join(root, p) for p, y, _ in json.load(f)["test"] if y in (0, 4)]
    ck = load_checkpoint(os.path.join(out, "base_prompt.pt"))
    model = load_clip(tiny_clip_path, "cpu")
    learner = prompt_learner(model, ck, ck["classnames"], torch.device("cpu")).eval()
    x = torch.stack([build_transforms(model.visual.input_resolution)[1](read_image(p)) for p in images])
    with torch.no_grad():
        expected = [ck["classnames"][i] for i in class_logits(learner, x).argmax(-1).tolist()]
    assert [top[0][0] for top in load_predictor(out, "base")(images)] == expected
    top = load_predictor(out, "all")(images[:1])[0]
    assert len(top) == 6 and abs(sum(p for _, p, _ in top) - 1) < 1e-5
    assert {f for n, _, f in top if n in ck["classnames"]} == {"base_prompt.pt"}
    assert {f for n, _, f in top if n not in ck["classnames"]} == {"new_prompt.pt"}


def test_a_context_vector_on_a_token_embedding_reads_back_as_that_token(folder_run, tiny_clip_path, tmp_path):
    import clip
    _, out, _ = folder_run
    ck = load_checkpoint(os.path.join(out, "base_prompt.pt"))
    ids = clip.tokenize("photo dog red leaf")[0, 1:5]
    ck["learned"]["ctx"] = load_clip(tiny_clip_path, "cpu").token_embedding.weight[ids].detach().clone()
    torch.save(ck, tmp_path / "known.pt")
    rows = prompt_words(str(tmp_path / "known.pt"))["known.pt"]
    assert [r[0][0] for r in rows] == ["photo", "dog", "red", "leaf"] and all(r[0][1] < 1e-3 for r in rows)
    words = prompt_words(out)  # the base-step and the new-step prompt of the MAO run, written beside them
    assert set(words) == {"base_prompt.pt", "new_prompt.pt"} and all(len(r) == 3 for r in words["base_prompt.pt"][:4])
    assert "new_prompt.pt" in open(os.path.join(out, "prompt_words.txt")).read()
