"""bench.py: its memory probe measures a known allocation exactly, and a quick run writes a consistent table.
No timing is asserted (timings belong to the benchmark's printed figures, not to tests)."""
import json

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
