"""utils.io: atomic CSV rows, also with several processes appending at once."""
import csv
import multiprocessing as mp

import pytest

from utils.io import append_csv_row

pytestmark = pytest.mark.slow  # both tests start processes (3 spawned writers; git)


def _append_many(path: str, worker: int, n: int) -> None:
    for i in range(n):
        append_csv_row(path, {"worker": worker, "i": i, **({"extra": "x"} if worker == 1 else {})})


def test_concurrent_appends_lose_no_row(tmp_path):
    path = str(tmp_path / "rows.csv")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 25)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["worker"]), int(r["i"])) for r in rows) == [(w, i) for w in range(3) for i in range(25)]
    assert set(rows[0]) == {"worker", "i", "extra"}  # the header widened for worker 1's column


def test_versions_marks_uncommitted_code_but_not_results(tmp_path, monkeypatch):
    import subprocess

    import utils.io

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "results" / "r.csv").write_text("x\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(utils.io, "REPO_ROOT", tmp_path)
    clean = utils.io.versions()["git_commit"]
    assert clean != "unknown" and not clean.endswith("+dirty")
    (tmp_path / "results" / "r.csv").write_text("y\n")  # a run's own output: still the same code
    assert utils.io.versions()["git_commit"] == clean
    (tmp_path / "code.py").write_text("a = 2\n")
    assert utils.io.versions()["git_commit"] == clean + "+dirty"
