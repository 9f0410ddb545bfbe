"""The docs cannot drift: the demo tables are the summary of the shipped records (docs/demo_runs/), commands marked
safe (```bash safe) run as written, and files import only files listed above them in the README's map."""
import ast
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
read = lambda path: open(path, encoding="utf-8").read()


def test_demo_tables_are_the_summary_of_the_shipped_records(tmp_path):
    shutil.copytree(os.path.join(ROOT, "docs", "demo_runs"), tmp_path / "runs")
    md = report.summarize(str(tmp_path / "runs"))["markdown"]
    compact = md[md.index("## Table 1, compact"):].split("\n\n")[1]
    assert compact.startswith("| learner |") and compact in read(DOCS[0])
    assert md in read(os.path.join(ROOT, "docs", "demo.md"))


SAFE = [(os.path.basename(doc), line.split("  #")[0].strip()) for doc in DOCS
        for block in re.findall(r"```bash safe\n(.*?)```", read(doc), re.S) for line in block.splitlines()
        if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The tracked files, copied: a command may write beside them."""
    dest = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for f in files:
        os.makedirs(os.path.dirname(dest / f), exist_ok=True)
        shutil.copy(os.path.join(ROOT, f), dest / f)
    return dest


@pytest.mark.parametrize("doc, command", SAFE)
def test_safe_commands_run_as_written(checkout, doc, command):
    assert command.startswith("python ")
    done = subprocess.run([sys.executable] + command.split()[1:], cwd=checkout, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=900)
    assert done.returncode == 0, (doc, command, done.stderr[-2000:])


def test_files_import_only_files_listed_above_them():
    rooms = re.findall(r"^(\w+)\.py ", read(DOCS[0]), re.M)
    for i, room in enumerate(rooms):
        tree = ast.parse(read(os.path.join(ROOT, room + ".py")))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in {n.split(".")[0] for n in names} & set(rooms):
                assert name in rooms[:i], f"{room}.py imports {name}.py, listed below it"
                assert node in tree.body, f"{room}.py imports {name}.py inside a function"
