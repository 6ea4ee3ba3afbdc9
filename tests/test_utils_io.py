"""utils.io: atomic CSV rows, also with several processes appending at once."""
import csv
import multiprocessing as mp

from utils.io import append_csv_row


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
