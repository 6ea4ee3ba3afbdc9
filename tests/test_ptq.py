"""PTQ.py end to end: synthetic dry runs always, the 8-bit table row on real Fashion-MNIST data."""
import csv
import json

import pytest

from tests.conftest import REPO, real_split, run_script


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dataset,model", [("fashion_mnist", "cnn_bn"), ("cifar10", "cnn")])
def test_dry_run_json_and_csv(tmp_path, dataset, model):
    csv_path, out = tmp_path / "ptq.csv", tmp_path / "int.pt"
    for bits in (8, 3):
        r = run_script("PTQ.py", "--dataset", dataset, "--model", model, "--bits", str(bits), "--dry-run",
                       "--device", "cpu", "--calib-batches", "2", "--results", str(csv_path), "--out", str(out),
                       "--json")
        assert r.returncode == 0, r.stderr
        row = _last_json(r.stdout)
        assert row["bits"] == bits and row["weight_bits"] == bits and row["act_bits"] == bits
        for key in ("float_acc", "fq_acc", "int_acc", "agreement"):
            assert 0 <= row[key] <= 100
        assert row["agreement"] == 100.0  # fake quantization simulates the engine's requantization
    rows = list(csv.DictReader(open(csv_path)))
    assert [int(r["bits"]) for r in rows] == [8, 3] and out.exists()


def test_missing_and_mismatched_checkpoints(tmp_path):
    r = run_script("PTQ.py", "--dataset", "cifar10", "--model", "cnn", "--ckpt", str(tmp_path / "no.pt"))
    assert r.returncode == 2 and "python train.py --dataset cifar10 --model cnn" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    other = tmp_path / "other.pt"
    assert run_script("train.py", "--dry-run", "--device", "cpu", "--out", str(other)).returncode == 0
    r = run_script("PTQ.py", "--dataset", "fashion_mnist", "--model", "cnn_bn", "--ckpt", str(other))
    assert r.returncode == 2 and "holds fashion_mnist/cnn, not fashion_mnist/cnn_bn" in r.stderr


def test_bad_bits_is_one_line_error():
    r = run_script("PTQ.py", "--bits", "9", "--dry-run")
    assert r.returncode == 2 and "2..8" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("model", ["cnn", "cnn_bn"])
def test_8bit_ptq_on_shipped_fashion_mnist_checkpoints(tmp_path, model):
    real_split("fashion_mnist", "test")  # skips with the reason when the data is absent
    r = run_script("PTQ.py", "--dataset", "fashion_mnist", "--model", model, "--bits", "8", "--device", "cpu",
                   "--results", str(tmp_path / "ptq.csv"), "--out", str(tmp_path / "int.pt"), "--json", cwd=REPO)
    assert r.returncode == 0, r.stderr
    row = _last_json(r.stdout)
    assert row["fq_acc"] >= row["float_acc"] - 0.3
    assert row["agreement"] >= 99.9 and abs(row["fq_acc"] - row["int_acc"]) <= 0.05
