"""End to end on the synthetic demo set with the tiny CLIP: both MAO halves, the baseline, reload, resume, bad input."""
import json
import os

import pytest
import torch

import config
import eval as evaluation
import train
from conftest import run_train
from demo import DEMO_CLASSES


def learned(path):
    return torch.load(path, weights_only=False)["learned"]


def test_mao_both_steps_write_two_prompts_and_results(tmp_path, demo_root, tiny_clip_path):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2")
    for f in ("args.json", "log.txt", "base_prompt.pt", "new_prompt.pt", "results.json", "base_last.pt", "new_last.pt"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["method"] == "mao"
    for k in ("base", "new", "hm", "new_base_prompt"):
        assert 0.0 <= saved[k] <= 100.0
    assert abs(saved["hm"] - evaluation.harmonic_mean(saved["base"], saved["new"])) < 1e-9
    base_ck = torch.load(os.path.join(out, "base_prompt.pt"), weights_only=False)
    new_ck = torch.load(os.path.join(out, "new_prompt.pt"), weights_only=False)
    assert base_ck["subsample"] == "base" and new_ck["subsample"] == "new"
    assert base_ck["classnames"][0] == " ".join(DEMO_CLASSES[0]) and new_ck["classnames"][0] == " ".join(DEMO_CLASSES[6])
    assert not torch.equal(base_ck["learned"]["ctx"], new_ck["learned"]["ctx"])  # the new step trained
    assert set(base_ck["learned"]) == {"ctx"}  # only learnable tensors, never frozen CLIP weights
    # eval.py re-evaluates the run folder exactly as train.py did
    again = evaluation.evaluate_checkpoints(out, overrides=dict(workers=0))
    assert again["base"] == saved["base"] and again["new"] == saved["new"]


def test_method_none_single_epoch_and_reload(tmp_path, demo_root, tiny_clip_path):
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")
    assert os.path.isfile(os.path.join(out, "prompt.pt")) and not os.path.exists(os.path.join(out, "new_prompt.pt"))
    assert "new_base_prompt" not in res
    again = evaluation.main(["--ckpt", os.path.join(out, "prompt.pt"), "--workers", "0"])
    assert again["base"] == res["base"] and again["new"] == res["new"]
    everything = evaluation.evaluate_checkpoints(os.path.join(out, "prompt.pt"), "all", dict(workers=0))
    assert set(everything) == {"all"}


def test_resume_continues_from_the_saved_epoch(tmp_path, demo_root, tiny_clip_path, monkeypatch):
    ref, ref_out = run_train(tmp_path / "a", demo_root, tiny_clip_path, "--epochs", "4")
    real_save, calls = train.save_atomic, []

    def crash_after_first_epoch(obj, path):
        real_save(obj, path)
        calls.append(path)
        if path.endswith("base_last.pt"):
            raise KeyboardInterrupt  # killed right after epoch 1 of the base step was saved
    monkeypatch.setattr(train, "save_atomic", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path / "b", demo_root, tiny_clip_path, "--epochs", "4")
    monkeypatch.setattr(train, "save_atomic", real_save)
    assert torch.load(calls[-1], weights_only=False)["epoch"] == 0
    res, out = run_train(tmp_path / "b", demo_root, tiny_clip_path, "--epochs", "4", "--resume")
    with open(os.path.join(out, "log.txt")) as f:
        assert "[base] resumed from" in f.read()
    for name in ("base_prompt.pt", "new_prompt.pt"):  # identical to the uninterrupted run
        assert torch.equal(learned(os.path.join(out, name))["ctx"], learned(os.path.join(ref_out, name))["ctx"])
    assert res["base"] == ref["base"] and res["new"] == ref["new"]
    count = lambda r: {p: {k: c[k] for k in ("images", "texts_grad")} for p, c in r["cost"].items()}
    assert count(res) == count(ref)  # the encodings of the epochs the first process completed count too


def test_new_step_never_reads_new_class_labels(tmp_path, demo_root, tiny_clip_path, monkeypatch):
    """Scrambling the hidden labels of the new-class training images leaves the new prompt bit-identical."""
    _, out = run_train(tmp_path / "a", demo_root, tiny_clip_path, "--epochs", "2")
    real = train.subsample_classes

    def scrambled(splits, which):
        sub, names = real(splits, which)
        if which == "new":
            sub["train"] = [(p, 0, c) for p, y, c in sub["train"]]  # every hidden label replaced by class 0
        return sub, names
    monkeypatch.setattr(train, "subsample_classes", scrambled)
    _, out2 = run_train(tmp_path / "b", demo_root, tiny_clip_path, "--epochs", "2")
    assert torch.equal(learned(os.path.join(out, "new_prompt.pt"))["ctx"],
                       learned(os.path.join(out2, "new_prompt.pt"))["ctx"])
    logs = [open(os.path.join(o, "log.txt")).read() for o in (out, out2)]
    agree = [[l.split("pl_acc ")[1].split(")")[0] for l in lg.splitlines() if "pl_acc" in l] for lg in logs]
    assert agree[0] != agree[1]  # the diagnostic saw the scrambled labels; training did not


def test_stage_new_from_a_base_prompt(tmp_path, demo_root, tiny_clip_path):
    _, out = run_train(tmp_path / "a", demo_root, tiny_clip_path, "--epochs", "2", "--stage", "base")
    assert not os.path.exists(os.path.join(out, "new_prompt.pt"))
    res, out2 = run_train(tmp_path / "b", demo_root, tiny_clip_path, "--epochs", "2", "--stage", "new",
                          "--init_from", os.path.join(out, "base_prompt.pt"), "--pseudo_labeler", "tuned",
                          "--pseudo_label_every", "epoch")
    assert os.path.isfile(os.path.join(out2, "new_prompt.pt"))
    with open(os.path.join(out, "results.json")) as f:
        assert res["base"] == json.load(f)["base"]  # base accuracy comes from the base-step prompt


# -- bad input: a clear error and no half-written output ------------------------------------------------------

def write_dataset(root, classes, n=4):
    d = os.path.join(root, "demo")
    os.makedirs(os.path.join(d, "images"))
    items = [[f"{c}_{k}.png", y, c] for y, c in enumerate(classes) for k in range(n)]
    from PIL import Image
    for rel, _, _ in items:
        Image.new("RGB", (8, 8)).save(os.path.join(d, "images", rel))
    with open(os.path.join(d, "split_demo.json"), "w") as f:
        json.dump({"train": items, "val": items, "test": items}, f)
    return root


@pytest.mark.parametrize("extra,error,match", [
    (["--dataset", "dtd"], FileNotFoundError, "dataset folder .*dtd not found.*split_zhou_DescribableTextures.json"),
    (["--anchors", "4", "--topk", "3"], ValueError, "exceeds the 6 base classes.*Largest valid"),
    (["--topk", "6", "--anchors", "1"], ValueError, "must be smaller than the number of base classes"),
    (["--stage", "new"], FileNotFoundError, "needs the base-step prompt"),
    (["--init_from", "nowhere.pt"], FileNotFoundError, "nowhere.pt not found"),
    (["--shots", "40"], ValueError, "largest valid value for this dataset is 16"),
    (["--lr", "-1"], ValueError, "--lr -1.0: must be > 0"),
    (["--momentum", "1.5"], ValueError, "momentum lies in"),
    (["--n_ctx", "8"], ValueError, "one vector per word of its init phrase .4.; add --ctx_init ''"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--lr", "0"], ValueError, "no CUDA GPU|> 0"),
    (["--clip", __file__], ValueError, "not a CLIP checkpoint"),
])
def test_bad_settings_fail_before_writing(tmp_path, demo_root, tiny_clip_path, extra, error, match):
    with pytest.raises(error, match=match):
        run_train(tmp_path, demo_root, tiny_clip_path, *extra)
    assert not os.path.exists(tmp_path / "run")


def test_unknown_backbone_and_dataset(tmp_path, demo_root, tiny_clip_path):
    with pytest.raises(ValueError, match="unknown backbone 'prograd'. Choose one of: zsclip, coop"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--backbone", "prograd")
    with pytest.raises(ValueError, match="unknown dataset"):
        run_train(tmp_path, demo_root, tiny_clip_path, "--dataset", "mnist")


def test_too_few_classes(tmp_path, tiny_clip_path):
    root = write_dataset(str(tmp_path / "one"), ["cat"])
    with pytest.raises(ValueError, match="no new classes"):
        run_train(tmp_path, root, tiny_clip_path, "--shots", "4")
    root = write_dataset(str(tmp_path / "two"), ["cat", "dog"])
    with pytest.raises(ValueError, match="at least 2 base classes"):
        run_train(tmp_path, root, tiny_clip_path, "--shots", "4", "--topk", "2", "--anchors", "1")
    assert not os.path.exists(tmp_path / "run")


def test_eval_refuses_missing_and_mismatched_checkpoints(tmp_path, demo_root, tiny_clip_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluation.main(["--ckpt", str(tmp_path / "missing.pt")])
    _, out = run_train(tmp_path, demo_root, tiny_clip_path, "--method", "none", "--epochs", "1")
    ck = os.path.join(out, "prompt.pt")
    with pytest.raises(ValueError, match="not 'maple'"):
        evaluation.main(["--ckpt", ck, "--backbone", "maple"])
    other = write_dataset(str(tmp_path / "other"), ["cat", "dog", "fox", "owl"], n=8)  # same dataset name, other classes
    with pytest.raises(ValueError, match="class names .* do not match"):
        evaluation.main(["--ckpt", ck, "--root", other, "--workers", "0"])
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": 1}, bogus)
    with pytest.raises(ValueError, match="not a prompt checkpoint"):
        evaluation.main(["--ckpt", str(bogus)])


def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path, demo_root, tiny_clip_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("garbage\n")
    for call in (lambda: evaluation.main(["--ckpt", str(junk)]),
                 lambda: run_train(tmp_path, demo_root, tiny_clip_path, "--init_from", str(junk))):
        with pytest.raises(ValueError, match="junk.pt is not a prompt checkpoint written by train.py") as e:
            call()
        assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run")


# -- --recipe official: every released behaviour at once; explicit flags still win ------------------------------

def test_recipe_official_sets_every_released_behaviour():
    base = ["--dataset", "demo", "--device", "cpu"]
    paper = config.parse_args(base)
    mao = config.parse_args(base + ["--recipe", "official"])
    assert (paper.ar_dedup, paper.distinct_anchors, paper.pseudo_labeler, paper.released_batches) == (1, 1, "clip", 0)
    assert (mao.ar_dedup, mao.distinct_anchors, mao.pseudo_labeler, mao.released_batches) == (0, 0, "tuned", 1)
    assert paper.variant == {} and mao.variant == {"recipe": "official"}
    assert paper.minilm_bank == mao.minilm_bank == "raw"  # the paper is silent: the released table is the default
    dpc = config.parse_args(base + ["--method", "dpc", "--recipe", "official"])
    assert (dpc.dpc_param, dpc.dpc_base_infer, dpc.dpc_backbone_losses, dpc.distinct_anchors, dpc.released_batches) \
        == ("released", "parallel", 0, 0, 1)
    assert dpc.weight_decay == 5e-4  # stage 2's released update is the aliasing, not a global weight decay change
    mixed = config.parse_args(base + ["--recipe", "official", "--ar_dedup", "1"])  # an ablation of one behaviour
    assert mixed.ar_dedup == 1 and mixed.pseudo_labeler == "tuned" and mixed.variant == {"recipe": "official",
                                                                                         "ar_dedup": 1}
    assert config.parse_args(base + ["--ar_dedup", "0"]).distinct_anchors == 0  # as before: repeats allowed with it
    assert config.parse_args(base + ["--ar_dedup", "1"]).variant == {}  # the paper's value, given explicitly
    assert config.parse_args(base + ["--method", "none", "--recipe", "official"]).variant == {}  # nothing to switch
    xd = config.parse_args(["--dataset", "imagenet", "--subsample", "all", "--recipe", "official", "--device", "cpu"])
    assert xd.lr == 0.005 and config.parse_args(["--dataset", "imagenet", "--subsample", "all"]).lr == 0.0035
    # PromptKD's and DePT-on-CoCoOp's released recipes
    args = lambda *a: config.parse_args(["--device", "cpu", "--teacher", "T", *a])
    kd = lambda dataset, method="none": args("--backbone", "promptkd", "--dataset", dataset, "--method", method)
    assert (kd("dtd").kd_weight, kd("eurosat").kd_weight, kd("dtd", "dpc").best_val, kd("imagenet").best_val) == (
        200.0, 1000.0, 1, 0)  # base2new_train.sh's weights; best_val kept (ImageNet: no val apart from test)
    official = args("--backbone", "promptkd", "--method", "dpc", "--recipe", "official")
    assert (official.dpc_vision_deep, official.dpc_text_deep, official.dpc_ranker_ctx) == ("random", "trained", "init")
    cocoop = args("--backbone", "cocoop", "--method", "dept", "--teacher", "")  # vit_b16_c4_ep10_batch1_ctxv1
    assert (cocoop.epochs, cocoop.batch_size, cocoop.lr) == (10, 1, 0.002)
    with pytest.raises(ValueError, match="only --backbone promptkd"):
        config.parse_args(["--backbone", "coop", "--method", "dpc", "--dpc_text_deep", "trained"])


def test_official_recipe_runs_and_is_summarized_apart(tmp_path, demo_root, tiny_clip_path):
    import report
    runs = tmp_path / "runs"
    for recipe in ("paper", "official"):
        res, out = run_train(tmp_path / recipe, demo_root, tiny_clip_path, "--epochs", "2", "--recipe", recipe,
                             "--out", str(runs / f"coop-mao-{recipe}"))
        assert res["recipe"] == recipe
    labels = sorted(report._label(r) for r in report.summarize(str(runs))["b2n"] if r["dataset"] != "average")
    tag = f"clip={tiny_clip_path}, epochs=2"
    assert labels == [f"+MAO [{tag}, recipe=official, shots=8, topk=3]", f"+MAO [{tag}, shots=8, topk=3]"]


def test_decoding_once_changes_nothing_but_the_cost(tmp_path, demo_root, tiny_clip_path):
    """Every training image decoded on every use (0), 32 of the 96 decoded once (a budget of 32 64x64 images at 4
    bytes a pixel: the rest stream) or all 96 (1 GB): the same prompts."""
    res = {c: run_train(tmp_path / c, demo_root, tiny_clip_path, "--epochs", "2", "--cache_gb", c)
           for c in ("0", str(32 * 4 * 64 * 64 / 2**30), "1")}
    for name in ("base_prompt.pt", "new_prompt.pt"):
        assert len({tuple(learned(os.path.join(o, name))["ctx"].flatten().tolist()) for _, o in res.values()}) == 1
    notes = [open(os.path.join(o, "log.txt")).read() for _, o in res.values()]
    assert [f"decoded {n} of the 96 training images once" in t for n, t in zip((0, 32, 96), notes)] == [True] * 3
    assert res["0"][0]["variant"] == res["1"][0]["variant"]  # a system setting, not a variant
    cost = res["1"][0]["cost"]
    assert set(cost) == {"mao_base", "mao_new", "evaluation"} and cost["mao_base"]["texts_grad"] > 0


@pytest.mark.parametrize("cache", ["1", "0"])  # decoded once, or on every use
def test_a_broken_training_image_stops_the_run_before_anything_is_written(tmp_path, demo_root, tiny_clip_path, cache):
    import shutil
    root = str(tmp_path / "data")
    shutil.copytree(demo_root, root)
    from data import fewshot_splits, subsample_classes
    splits, image_dir = fewshot_splits("demo", root, 8, 1)
    rel = subsample_classes(splits, "base")[0]["train"][5][0]
    with open(os.path.join(image_dir, rel), "w") as f:
        f.write("not an image")
    with pytest.raises(ValueError, match=f"cannot read image .*{rel}"):
        run_train(tmp_path, root, tiny_clip_path, "--cache_gb", cache)
    assert not os.path.exists(tmp_path / "run")


def test_every_run_writes_tensorboard_scalars_beside_its_log(tmp_path, demo_root, tiny_clip_path):
    from tensorboardX.proto.event_pb2 import Event
    res, out = run_train(tmp_path, demo_root, tiny_clip_path, "--epochs", "2", "--log_every", "5")
    tags = {}
    for name in [f for f in os.listdir(out) if f.startswith("events.out.tfevents.")]:
        with open(os.path.join(out, name), "rb") as f:
            data = f.read()
        while data:  # TFRecords: length (8 bytes), its CRC (4), the Event, its CRC (4)
            n = int.from_bytes(data[:8], "little")
            event, data = Event.FromString(data[12:12 + n]), data[16 + n:]
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append((event.step, v.simple_value))
    assert {"base/loss", "base/ce", "base/lr", "new/loss", "new/pl_acc", "results/base", "results/hm"} <= set(tags)
    assert tags["results/hm"] == [(0, pytest.approx(res["hm"]))] and len(tags["base/loss"]) >= 2
