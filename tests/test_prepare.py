"""prepare.py offline, a loopback server standing in for DTD's site (torchvision's DTD downloader pointed at it): the
folder trains; a bad checksum, a cut download, a broken archive each end in one line, nothing kept; --check."""
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading

import pytest
import torchvision.datasets as tv
from PIL import Image

import prepare
import train


@pytest.fixture(scope="module")
def archive():
    """dtd-r1.0.1.tar.gz's shape: every image of the shipped split (8x8 JPEGs), and the list torchvision reads."""
    with open(os.path.join(prepare.SPLITS, "split_zhou_DescribableTextures.json")) as f:
        split = json.load(f)
    jpg, buf = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(jpg, "JPEG")
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for rel, _, _ in split["train"] + split["val"] + split["test"]:
            add(f"dtd/images/{rel}", jpg.getvalue())
        add("dtd/labels/train1.txt", "\n".join(rel for rel, _, _ in split["train"][:3]).encode())
    return buf.getvalue()


@pytest.fixture
def site(archive, monkeypatch):
    """The download site: serves `body` (cut in half when `cut`), counts requests."""
    served = dict(body=archive, cut=False, requests=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served["requests"] += 1
            body = served["body"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if served["cut"] else body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(tv.DTD, "_URL", f"http://127.0.0.1:{server.server_port}/dtd-r1.0.1.tar.gz")
    monkeypatch.setattr(tv.DTD, "_MD5", hashlib.md5(archive).hexdigest())
    yield served
    server.shutdown()


def test_dtd_is_prepared_checked_trained_and_not_fetched_twice_by_hand_ones_say_how(tmp_path, site, tiny_clip_path):
    root = str(tmp_path / "data")
    prepare.main(["dtd", "--root", root])
    assert os.listdir(root) == ["dtd"]  # no temporary folder left
    assert sorted(os.listdir(os.path.join(root, "dtd"))) == ["images", "split_zhou_DescribableTextures.json"]
    assert prepare.check("dtd", root) == ("ready", "47 classes; train / val / test 2820 / 1128 / 1692 images")
    fetched = site["requests"]
    res = train.main(["--dataset", "dtd", "--root", root, "--download", "--clip", tiny_clip_path, "--device", "cpu",
                      "--workers", "0", "--method", "none", "--epochs", "1", "--shots", "1",
                      "--out", str(tmp_path / "run")])
    assert site["requests"] == fetched and res["base"] >= 0  # already there: nothing fetched, and it trains
    rows = prepare.main(["--check", "--root", root])
    assert rows["dtd"][0] == "ready" and rows["eurosat"] == ("missing", f"python prepare.py eurosat --root {root}")
    assert rows["imagenet"][0] == "missing" and "licence" in rows["imagenet"][1]
    os.remove(os.path.join(root, "dtd", "images", "banded", "banded_0002.jpg"))
    assert prepare.check("dtd", root)[1].startswith("1 of 5640 images not found, e.g. ")
    split = os.path.join(root, "dtd", "split_zhou_DescribableTextures.json")
    with open(split, "a") as f:
        f.write(" ")
    assert prepare.check("dtd", root) == ("broken", f"{split} is not the split file this project ships (SHA-256)")
    root = str(tmp_path / "by_hand")  # a dataset prepared by hand: the steps, then its split beside the images
    with pytest.raises(ValueError, match="UCF-101-midframes.zip .* then python prepare.py ucf101"):
        prepare.prepare("ucf101", root)
    os.makedirs(os.path.join(root, "ucf101", "UCF-101-midframes"))  # the images placed by hand (none here)
    assert prepare.prepare("ucf101", root) and os.path.isfile(os.path.join(root, "ucf101", "split_zhou_UCF101.json"))


@pytest.mark.parametrize("fault", ["checksum", "cut", "archive"])
def test_a_failed_download_ends_in_one_line_and_leaves_nothing(tmp_path, site, archive, monkeypatch, fault):
    if fault == "checksum":
        monkeypatch.setattr(tv.DTD, "_MD5", "0" * 32)
    elif fault == "cut":  # the connection drops half-way
        site["cut"] = True
    else:  # an archive that breaks off mid-extraction, its checksum right
        site["body"] = archive[:len(archive) // 2]
        monkeypatch.setattr(tv.DTD, "_MD5", hashlib.md5(site["body"]).hexdigest())
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="preparing dtd failed .*; nothing was written to") as e:
        prepare.prepare("dtd", str(root))
    assert "\n" not in str(e.value) and site["requests"] > 0
    assert not root.exists() or os.listdir(root) == []  # neither the final name nor a temporary folder
