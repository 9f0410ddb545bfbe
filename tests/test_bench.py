"""bench.py: its memory probe measures a known allocation exactly, and a quick run writes a consistent table.
No timing is asserted (timings belong to the benchmark's printed figures, not to tests)."""
import json
import os

import pytest
import torch

import bench
from clip_prompt import build_learner, build_tiny_clip


def test_cpu_peak_probe_sees_exactly_the_step_allocations():
    def step():
        x = torch.empty(1 << 20)  # 4 MiB
        y = torch.empty(1 << 20)  # 4 MiB more while x is live
        del x, y
        torch.empty(1 << 19)  # 2 MiB after both are freed: below the peak
    assert bench.peak_bytes(step, torch.device("cpu")) == 8 << 20


def test_live_bytes_counts_each_storage_once():
    t = torch.zeros(256)
    assert bench.live_bytes(t, t, t[:10]) == 1024


def test_quick_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["--quick", "--backbone", "all", "--out", str(out), "--repeats", "2"])
    saved = json.loads(out.read_text())
    md = (tmp_path / "bench.md").read_text()
    assert [r["backbone"] for r in saved["backbones"]] == ["coop", "maple", "promptsrc"]
    model = build_tiny_clip().requires_grad_(False)
    for r in res["backbones"]:
        n = sum(p.numel() for p in build_learner(r["backbone"], model, ["a", "b"], n_ctx=4 if r["backbone"] != "maple"
                                                 else 2, depth=9).parameters() if p.requires_grad)
        assert r["learnable_params"] == n
        for k in ("base", "new", "new_once"):
            s = r["lines"][k]["ratio_time"]
            assert s["min"] <= s["median"] <= s["max"] and s["n"] == 2
        assert r["backbone"] in md
    coop = res["backbones"][0]["lines"]
    # dynamic candidates: a DTD-shaped base batch (16 images, 16 distinct classes) encodes 16 of the 24 class prompts,
    # so the step's own activation memory is below the plain step's over all 24 classes
    assert coop["base"]["peak_extra_mb"] < coop["plain"]["peak_extra_mb"]
    assert "Paper Table 3" in md


# -- the cost of a run before it runs: bench.run_cost's counts against what train.py measures ---------------------

DEMO_FLAGS = ["--shots", "8", "--anchors", "2", "--topk", "3", "--epochs", "2", "--dpc_epochs", "2", "--depth", "2"]


@pytest.mark.parametrize("backbone,method,extra", [
    ("zsclip", "none", []), ("coop", "none", []), ("coop", "mao", []), ("maple", "mao", []), ("ivlp", "mao", []),
    ("promptsrc", "mao", []), ("promptsrc", "none", []), ("coop", "mao", ["--recipe", "official"]),
    ("maple", "mao", ["--pseudo_label_every", "epoch"]), ("coop", "dpc", []), ("promptsrc", "dpc", []),
    ("cocoop", "none", []), ("cocoop", "mao", []), ("cocoop", "mao", ["--pseudo_labeler", "tuned"]),
    ("kgcoop", "mao", []), ("kgcoop", "none", []), ("cocoop", "dpc", [])])
def test_run_cost_predicts_the_counts_a_run_measures(tmp_path, demo_root, tiny_clip_path, minilm, backbone, method,
                                                     extra):
    from conftest import run_train
    from sampler import class_neighbours
    res, _ = run_train(tmp_path, demo_root, tiny_clip_path, "--backbone", backbone, "--method", method,
                       *DEMO_FLAGS, *extra)
    measured = {k: {n: v for n, v in c.items() if n != "seconds"} for k, c in res["cost"].items()}
    table = class_neighbours(demo_base_names(demo_root), 3, minilm)  # the table the run built (Eq. (4))
    predicted = bench.run_cost("demo", backbone, method, table, sizes=(12, 24, 24), extra=DEMO_FLAGS + extra)
    assert set(predicted) == set(measured)
    for phase, c in predicted.items():
        if phase != "dpc_stage2":
            assert c == measured[phase], phase
    if method == "dpc":  # its batches follow the trained prompt's ranking: the counts are bounded, not predicted
        m, steps, b, K = measured["dpc_stage2"], 2 * (48 // 2), 2, 3  # 2 epochs of 48 anchors, b = 2
        images_in_batches = {"coop": m["texts_grad"], "promptsrc": m["images_grad"],
                             "cocoop": m["images"] - 2 * 48}[backbone]  # CoCoOp: all images minus the ranking's
        assert steps * b <= images_in_batches <= steps * b * K
        assert m["images"] - m["images_grad"] >= 2 * 48  # each epoch ranks every training image, no gradients


def demo_base_names(root):
    from data import fewshot_splits, subsample_classes
    return subsample_classes(fewshot_splits("demo", root, 8, 1)[0], "base")[1]


def test_dataset_sizes_are_the_real_split_files(splits_dir):
    import json
    import math
    from data import DATASETS
    for ds, (n, tb, tn) in bench.DATASET_SIZES.items():
        spec = DATASETS[ds]
        if not spec["split"].startswith("split_zhou") or not os.path.isfile(os.path.join(splits_dir, spec["split"])):
            continue
        with open(os.path.join(splits_dir, spec["split"])) as f:
            js = json.load(f)
        labels = {y for _, y, _ in js["train"]}
        m = math.ceil(len(labels) / 2)
        assert (len(labels), sum(y < m for _, y, _ in js["test"]), sum(y >= m for _, y, _ in js["test"])) == (n, tb, tn)
