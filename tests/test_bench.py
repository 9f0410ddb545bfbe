"""bench.py: its memory probe measures a known allocation exactly, and a quick run writes a consistent table.
No timing is asserted (timings belong to the benchmark's printed figures, not to tests)."""
import json

import torch

import bench
from clip_prompt import build_learner
from conftest import build_tiny_clip


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
    res = bench.main(["--quick", "--backbone", "all", "--dataset", "dtd", "--out", str(out), "--repeats", "2",
                      "--text", "prefix"])
    saved = json.loads(out.read_text())
    md = (tmp_path / "bench.md").read_text()
    assert [r["backbone"] for r in saved["backbones"]] == bench.LEARNERS
    model = build_tiny_clip().requires_grad_(False)
    for r in res["backbones"]:
        kw = dict(n_ctx=2 if r["backbone"] == "maple" else 4, depth=2)
        learner = build_learner(r["backbone"], model, ["a", "b"], **kw)
        assert r["learnable_params"] == sum(p.numel() for p in learner.parameters() if p.requires_grad)
        assert set(r["lines"]) == set(bench.LINES)
        for k, line in r["lines"].items():
            s = line["ratio_time"]
            assert s["min"] <= s["median"] <= s["max"] and s["n"] == 2
        head = 24 * 64 + 24 + 4 * 64  # DePT's CAT head on DTD's 24 base classes: C x E + C + 4 E
        assert r["lines"]["dept"]["params"] == r["learnable_params"] + head
        assert r["lines"]["plain"]["ratio_memory"] == 1.0 and r["infer_images_per_s"]["median"] > 0
        assert f"| {r['backbone']} | 24 | prefix | 16 | MAO base step |" in md
    coop = res["backbones"][0]["lines"]
    # dynamic candidates: a DTD-shaped base batch (16 images, 16 distinct classes) encodes 16 of the 24 class
    # prompts, so the step's memory is below the plain step's over all 24 classes
    assert coop["mao_base"]["peak_mb"] < coop["plain"]["peak_mb"]
    assert "Paper Table 3" in md


def test_class_counts_what_fits_and_start_up_at_scale(tmp_path):
    out = str(tmp_path / "scale.json")
    res = bench.main(["--quick", "--classes", "32,48", "--lines", "mao_base", "--repeats", "1", "--out", out, "--text",
                      "prompt,77"])
    (r32, r32_77, r48, r48_77) = res["backbones"]  # the text paths side by side, in the order given
    assert [(r["classes"], r["text"]) for r in res["backbones"]] == [(32, "prompt"), (32, "77"), (48, "prompt"),
                                                                     (48, "77")]
    assert set(r48["lines"]) == {"plain", "mao_base"}
    assert r32["lines"]["plain"]["peak_mb"] < r48["lines"]["plain"]["peak_mb"]  # every class's text, with grads
    assert r48["lines"]["mao_base"]["peak_mb"] < r48["lines"]["plain"]["peak_mb"]  # the batch's 32 classes only
    assert r48["lines"]["plain"]["peak_mb"] < r48_77["lines"]["plain"]["peak_mb"]  # ~10 positions, not 77
    fits = bench.what_fits([out])
    assert "| coop | prompt | MAO base step |" in fits and "| coop | 77 | MAO base step |" in fits
    folder = str(tmp_path / "folder")
    got = bench.main(["--startup", folder, "--images", "400"])  # made: 100 classes of 4 images
    assert (got["images"], got["train_images"], got["shots"]) == (400, 200, 2)
