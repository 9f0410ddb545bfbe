"""Summaries over many results.json files, checked against numbers computed by hand; a bench smoke run."""
import json
import os

import pytest

import eval as evaluation


def write(root, dataset, method, seed, base, new):
    d = os.path.join(root, dataset, method, f"seed{seed}")
    os.makedirs(d)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(dict(dataset=dataset, backbone="coop", method=method, seed=seed, base=base, new=new), f)


def test_harmonic_mean():
    assert evaluation.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert evaluation.harmonic_mean(0.0, 0.0) == 0.0


def test_summary_means_std_hm_and_missing_seeds(tmp_path):
    root = str(tmp_path)
    write(root, "dtd", "mao", 1, 80.0, 60.0)
    write(root, "dtd", "mao", 2, 82.0, 64.0)
    write(root, "dtd", "mao", 3, 84.0, 62.0)
    write(root, "eurosat", "mao", 1, 90.0, 70.0)
    write(root, "eurosat", "mao", 2, 92.0, 72.0)  # seed 3 missing
    rows, table = evaluation.summarize(root)
    dtd = next(r for r in rows if r["dataset"] == "dtd")
    assert dtd["base"] == pytest.approx(82.0) and dtd["new"] == pytest.approx(62.0)
    assert dtd["base_std"] == pytest.approx(2.0) and dtd["new_std"] == pytest.approx(2.0)  # sample std (n-1)
    assert dtd["hm"] == pytest.approx(2 * 82 * 62 / 144)  # HM of the means, not the mean of per-seed HMs
    euro = next(r for r in rows if r["dataset"] == "eurosat")
    assert euro["missing"] == [3] and "missing 3" in table
    avg = next(r for r in rows if r["dataset"].startswith("average"))
    assert avg["base"] == pytest.approx((82 + 91) / 2) and avg["new"] == pytest.approx((62 + 71) / 2)
    assert avg["hm"] == pytest.approx(evaluation.harmonic_mean((82 + 91) / 2, (62 + 71) / 2))
    assert os.path.isfile(os.path.join(root, "summary.md")) and os.path.isfile(os.path.join(root, "summary.csv"))


def test_summary_of_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        evaluation.summarize(str(tmp_path))
