"""Summaries over many results.json files (paper Table 1 / Table 2 layouts), checked against numbers computed by
hand; the paper's numbers as transcribed; the figures."""
import json
import os
import statistics

import pytest
from PIL import Image

import eval as evaluation
import report
from data import BASE_TO_NEW, XD_TARGETS


def write(root, dataset, method, seed, base, new, backbone="coop", variant=None, folder=None, **extra):
    d = os.path.join(root, dataset, folder or f"{backbone}-{method}", f"seed{seed}")
    os.makedirs(d)
    r = dict(dataset=dataset, backbone=backbone, method=method, seed=seed, base=base, new=new, variant=variant or {},
             args={"topk": 8, "new_shots": 16, **(variant or {})}, **extra)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(r, f)
    return d


def test_harmonic_mean():
    assert evaluation.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert evaluation.harmonic_mean(0.0, 0.0) == 0.0


def test_transcribed_paper_numbers_reproduce_the_reported_averages():
    # every per-dataset row typed in from the papers must give the averages the papers report (a typo would not)
    assert len(report.PAPER_B2N) == 9 + 5 + 2  # MAO and DPC; DePT's +DePT rows; DPC's PromptKD rows
    for key, rows in report.PAPER_B2N.items():
        assert list(rows) == BASE_TO_NEW
        b, n = statistics.mean(r[0] for r in rows.values()), statistics.mean(r[1] for r in rows.values())
        ours = (b, n, evaluation.harmonic_mean(b, n))
        if key[0] == "promptkd" or key[1] == "dept":  # averaged from unrounded numbers by their authors
            assert ours == pytest.approx(report.PAPER_B2N_AVG[key], abs=0.021)
        else:
            assert tuple(round(x, 2) for x in ours) == report.PAPER_B2N_AVG[key]
        for ds, r in rows.items():  # each row's H is the HM of its own base and new, to rounding
            printed = (key, ds) == (("promptsrc", "dept"), "ucf101")  # DePT prints 82.46 for HM 82.41
            assert evaluation.harmonic_mean(r[0], r[1]) == pytest.approx(r[2], abs=0.06 if printed else 0.011)
    assert report.PAPER_B2N_AVG[("promptsrc", "dept")] == (85.19, 76.17, 80.43)  # DePT Table 1, as printed
    assert report.PAPER_B2N_AVG[("promptkd", "dpc")] == (87.55, 80.55, 83.91)  # DPC's PromptKD row
    avg = {("coop", "none"): 64.98, ("coop", "mao"): 65.54, ("maple", "none"): 64.79, ("maple", "mao"): 64.95,
           ("promptsrc", "none"): 65.64, ("promptsrc", "mao"): 65.68}  # MAO Table 2, "Avg." column
    for key, row in report.PAPER_XD.items():
        assert round(statistics.mean(row[t] for t in XD_TARGETS), 2) == avg[key]


def test_table1_means_std_hm_paper_and_missing_seeds(tmp_path):
    root = str(tmp_path)
    write(root, "dtd", "mao", 1, 80.0, 60.0, train_seconds=60.0)
    write(root, "dtd", "mao", 2, 82.0, 64.0, train_seconds=120.0)
    write(root, "dtd", "mao", 3, 84.0, 62.0)
    write(root, "eurosat", "mao", 1, 90.0, 70.0)
    write(root, "eurosat", "mao", 2, 92.0, 72.0)  # seed 3 missing
    out = report.summarize(root)
    rows, table = out["b2n"], out["markdown"]
    dtd = next(r for r in rows if r["dataset"] == "dtd")
    assert dtd["base"] == pytest.approx(82.0) and dtd["new"] == pytest.approx(62.0)
    assert dtd["base_std"] == pytest.approx(2.0) and dtd["new_std"] == pytest.approx(2.0)  # sample std (n-1)
    assert dtd["hm"] == pytest.approx(2 * 82 * 62 / 144)  # HM of the means, not the mean of per-seed HMs
    assert dtd["paper"] == (80.44, 59.66, 68.51) and dtd["seconds"] == pytest.approx(90.0)
    assert "| DTD | +MAO | 82.00 ± 2.00 | 62.00 ± 2.00 | 70.61 | 80.44 / 59.66 / 68.51 | +1.56 / +2.34 / +2.10 |" in table
    assert report.cell_bnh(dtd) == "82.00 ± 2.00 / 62.00 ± 2.00 / 70.61 (n=3)"  # the compact table's cell
    euro = next(r for r in rows if r["dataset"] == "eurosat")
    assert euro["missing"] == [3] and "1,2 (missing 3)" in table
    avg = next(r for r in rows if r["dataset"] == "average")
    assert avg["base"] == pytest.approx((82 + 91) / 2) and avg["new"] == pytest.approx((62 + 71) / 2)
    assert avg["hm"] == pytest.approx(evaluation.harmonic_mean((82 + 91) / 2, (62 + 71) / 2))
    # only 2 of the 11 datasets: the paper's average is recomputed over the same two, and the table says so
    pb, pn = (80.44 + 87.12) / 2, (59.66 + 67.74) / 2
    assert avg["paper"] == pytest.approx((pb, pn, evaluation.harmonic_mean(pb, pn)))
    assert "missing ImageNet" in table and "†" in table
    for f in ("summary.md", "table1.csv"):
        assert os.path.isfile(os.path.join(root, f))
    assert not os.path.exists(os.path.join(root, "table2.csv"))  # no cross-dataset run, no Table 2


def test_all_eleven_datasets_compare_with_the_reported_average(tmp_path):
    for ds, (b, n, _) in report.PAPER_B2N[("coop", "none")].items():
        write(str(tmp_path), ds, "none", 1, b, n)
    avg = next(r for r in report.summarize(str(tmp_path))["b2n"] if r["dataset"] == "average")
    assert avg["paper"] == (81.98, 68.84, 74.84) and avg["paper_note"] == "reported"
    assert avg["hm"] == pytest.approx(74.84, abs=0.005) and not avg["missing_datasets"]


def test_variants_are_kept_apart_and_duplicate_seeds_reported(tmp_path):
    root = str(tmp_path)
    write(root, "dtd", "mao", 1, 80.0, 60.0)
    write(root, "dtd", "mao", 1, 70.0, 50.0, variant={"topk": 4}, folder="coop-mao-k4")
    write(root, "dtd", "mao", 1, 10.0, 10.0, folder="coop-mao2")  # the same setting and seed twice
    out = report.summarize(root, seeds=[1, 2])
    rows = [r for r in out["b2n"] if r["dataset"] == "dtd"]
    assert [(r["variant"], r["base"]) for r in rows] == [("", 80.0), ("topk=4", 70.0)]
    assert rows[0]["paper"] is not None and rows[1]["paper"] is None  # the paper ran K = 8 only
    assert rows[0]["missing"] == [2]  # --seeds names what every setting should have
    assert len(out["warnings"]) == 1 and "coop-mao2" in out["warnings"][0]
    assert "+MAO [topk=4]" in out["markdown"] and "warning: two runs of seed 1" in out["markdown"]


def write_xd(root, backbone, method, seed, source_acc, targets):
    d = os.path.join(root, "xd-imagenet", f"{backbone}-{method}", f"seed{seed}")
    os.makedirs(d)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(dict(dataset="imagenet", backbone=backbone, method=method, seed=seed, protocol="all",
                       all=source_acc, base=None, new=None, variant={}), f)
    with open(os.path.join(d, "transfer.json"), "w") as f:
        json.dump({"accuracy": targets}, f)


def test_table2_cross_dataset_and_dg(tmp_path):
    root = str(tmp_path)
    write_xd(root, "coop", "mao", 1, 70.0, {"caltech101": 90.0, "dtd": 40.0, "imagenet_r": 70.0})
    write_xd(root, "coop", "mao", 2, 72.0, {"caltech101": 94.0, "dtd": 44.0})
    out = report.summarize(root)
    assert out["b2n"] == []
    (r,) = out["xd"]
    assert r["acc"]["imagenet"] == pytest.approx((71.0, statistics.stdev([70.0, 72.0])))
    assert r["acc"]["caltech101"][0] == pytest.approx(92.0) and r["n"]["imagenet_r"] == 1
    md = out["markdown"]
    # ours: mean over the 2 targets present; the paper's avg over the same 2 targets (93.75 and 45.92)
    assert "| +MAO | ImageNet 71.00 ± 1.41 | 67.00 (2/10) | 92.00 ± 2.83 |" in md
    assert f"| paper | 71.33 | {(93.75 + 45.92) / 2:.2f} |" in md
    assert f"| Δ | -0.33 | {67.0 - (93.75 + 45.92) / 2:+.2f} | -1.75 |" in md
    assert "## Domain generalisation" in md and "70.00 ± 0.00 (n=1)" in md
    assert os.path.isfile(os.path.join(root, "table2.csv"))


def test_summary_of_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        report.summarize(str(tmp_path))


def test_plots_are_valid_pngs(tmp_path):
    root = str(tmp_path)
    for ds in ("dtd", "eurosat"):
        for m, (b, n) in {"none": (80.0, 60.0), "mao": (81.0, 68.0), "dpc": (84.0, 60.0)}.items():
            write(root, ds, m, 1, b, n)
        for k in (2, 4):  # a Top-K sweep of CoOp+MAO; K = 8 is the paper-setting run above
            write(root, ds, "mao", 1, 70.0 + k, 60.0, variant={"topk": k}, folder=f"coop-mao-k{k}",
                  train_seconds=30.0 * k)
    write(root, "dtd", "mao", 1, 50.0, 50.0, variant={"topk": 4, "lr": 0.1}, folder="coop-mao-other")
    write(root, "dtd", "none", 2, 70.0, 50.0), write(root, "eurosat", "none", 2, 76.0, 54.0)
    write(root, "dtd", "dpc", 2, 90.0, 60.0)  # no seed 2 on eurosat: not a seed of DPC's average
    avg = {r["method"]: r for r in report.b2n_rows(report.load_runs(root)) if r["dataset"] == "average"
           and r["variant"] == ""}  # the seeds' HMs Fig. 3 draws beside each bar
    assert avg["none"]["per_seed"] == {1: (80.0, 60.0), 2: (73.0, 52.0)} and list(avg["dpc"]["per_seed"]) == [1]
    paths = report.plot(root)
    assert [os.path.basename(p) for p in paths] == ["fig3_hm.png", "fig4_topk.png"]  # no --new_shots sweep was run
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.verify()
    pts = report.sweep_points(report.b2n_rows(report.load_runs(root)), "topk")[("coop", "mao")]
    assert list(pts) == [2, 4, 8]  # the run changing lr as well is not a point of the K curve
    assert [statistics.mean(r["base"] for r in pts[k]) for k in pts] == [72.0, 74.0, 81.0]


def test_published_recipe_baselines_compare_with_the_backbone_papers(tmp_path):
    for ds in BASE_TO_NEW:
        write(str(tmp_path), ds, "none", 1, 80.0, 70.0, variant={"baseline_recipe": "published"}, folder="pub")
    rows = report.summarize(str(tmp_path))["b2n"]
    assert all(r["paper"] is None for r in rows if r["dataset"] != "average")  # only averages were published
    avg = next(r for r in rows if r["dataset"] == "average")
    assert avg["paper"] == (82.69, 63.22, 71.66) and avg["variant"] == "baseline_recipe=published"


def test_table7_averages_sit_beside_published_cocoop_and_kgcoop_rows(tmp_path):
    for bb, reported in (("cocoop", (80.47, 71.69, 75.83)), ("kgcoop", (80.73, 73.60, 77.00))):
        assert report.PUBLISHED_AVG[(bb, "none")] == reported
        assert round(evaluation.harmonic_mean(*reported[:2]), 2) == reported[2]  # transcribed consistently
        for ds in BASE_TO_NEW:
            write(str(tmp_path), ds, "none", 1, 80.0, 70.0, backbone=bb, variant={"baseline_recipe": "published"},
                  folder=f"{bb}-pub")
    rows = report.summarize(str(tmp_path))["b2n"]
    avg = {r["backbone"]: r for r in rows if r["dataset"] == "average"}
    assert avg["cocoop"]["paper"] == (80.47, 71.69, 75.83) and avg["kgcoop"]["paper"] == (80.73, 73.60, 77.00)


def test_where_the_time_goes_and_pseudo_label_tables(tmp_path):
    cost = lambda s, i, t: {"images": i, "images_grad": 0, "texts": t, "texts_grad": t, "seconds": s}
    for seed, sec in ((1, 10.0), (2, 20.0)):
        write(str(tmp_path), "dtd", "mao", seed, 80.0, 60.0, cost={"mao_base": cost(sec, 100, 50),
              "mao_new": cost(4.0, 40, 30), "evaluation": cost(1.0, 10, 5)}, new_base_prompt=55.0,
              pseudo_labels={"once_unaugmented": 70.0 + seed, "used_in_training": 60.0 + seed, "mode": "batch"})
    md = report.summarize(str(tmp_path))["markdown"]
    assert "| CoOp | +MAO | 2 | MAO base step | 100 (0) | 50 (50) | 15.0 |" in md  # means over the two seeds
    assert "| DTD | CoOp | +MAO | 61.5 | 71.5 | 55.0 | 60.0 |" in md


def test_compact_table_puts_the_methods_side_by_side(tmp_path):
    for method, base, new, sec in (("none", 80.0, 60.0, 10.0), ("mao", 82.0, 66.0, 30.0), ("dpc", 84.0, 60.0, 50.0)):
        write(str(tmp_path), "dtd", method, 1, base, new, train_seconds=sec)
    write(str(tmp_path), "dtd", "mao", 1, 81.0, 65.0, variant={"recipe": "official"}, folder="off", train_seconds=40.0)
    md = report.summarize(str(tmp_path))["markdown"]
    hm = lambda b, n: f"{evaluation.harmonic_mean(b, n):.2f}"
    assert "| learner | alone | +DePT | +MAO | +DPC | train s: alone | +DePT | +MAO | +DPC |" in md
    assert (f"| CoOp | 80.00 / 60.00 / {hm(80, 60)} | – | 82.00 / 66.00 / {hm(82, 66)} | 84.00 / 60.00 / "
            f"{hm(84, 60)} | 10 | – | 30 (3.0x) | 50 (5.0x) |") in md
    assert f"| CoOp [recipe=official] |  | – | 81.00 / 65.00 / {hm(81, 65)} | – |  | – | 40 (4.0x) | – |" in md


def test_paired_differences_are_taken_seed_by_seed(tmp_path):
    for seed, alone, mao, dpc in ((1, (80.0, 60.0), (82.0, 61.0), (79.0, 60.0)), (2, (70.0, 50.0), (71.0, 49.0),
                                                                                   (71.0, 50.0))):
        for method, (base, new) in (("none", alone), ("mao", mao), ("dpc", dpc)):
            write(str(tmp_path), "dtd", method, seed, base, new)
    md = report.summarize(str(tmp_path))["markdown"]
    hm = evaluation.harmonic_mean
    d1, d2 = hm(82, 61) - hm(80, 60), hm(71, 49) - hm(70, 50)  # each seed's HM against its own seed's
    assert (f"| DTD | CoOp | +MAO | 1,2 | +2.00, +1.00 | +1.50 | +1.00, -1.00 | +0.00 | {d1:+.2f}, {d2:+.2f} | "
            f"{(d1 + d2) / 2:+.2f} | yes / no / {'yes' if d1 * d2 > 0 else 'no'} |") in md
    assert "| DTD | CoOp | +DPC | 1,2 | -1.00, +1.00 | +0.00 | +0.00, +0.00 | +0.00 |" in md and "no / unmoved /" in md


def test_one_unreadable_results_file_is_skipped_with_its_name(tmp_path):
    write(str(tmp_path), "dtd", "mao", 1, 80.0, 60.0)
    broken = os.path.join(write(str(tmp_path), "dtd", "mao", 2, 82.0, 64.0), "results.json")
    open(broken, "w").write('{"dataset": "dtd", "ba')
    out = report.summarize(str(tmp_path))
    assert next(r for r in out["b2n"] if r["dataset"] == "dtd")["seeds"] == [1]
    assert len(out["warnings"]) == 1 and broken in out["warnings"][0] and broken in out["markdown"]
