"""PTQ.py end to end: synthetic dry runs always, the 8-bit table row on real Fashion-MNIST data."""
import csv
import json

import pytest

from tests.conftest import REPO, real_split, run_script

pytestmark = pytest.mark.slow  # every test runs PTQ.py (or train.py) as a process


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _dry_run_accuracies(dataset: str, model: str, seed: int, int_path) -> tuple[float, float, dict]:
    """(float, integer) test accuracy (%) recomputed here: the dry run's float model (the script's random
    initial weights for ``seed``) and the integer model it saved, on the dry run's synthetic test split; and
    the saved model's metadata."""
    import quant
    from data import Loader, synthetic_split
    from models import build_model
    from utils.cli import set_seed
    set_seed(seed)
    float_model = build_model(model, dataset).eval()
    imodel, meta = quant.load_integer(int_path, build_model(model, dataset))
    test = synthetic_split(dataset, 256, seed=2)
    res = quant.compare(Loader(test.images, test.labels, dataset, 1000), {"float": float_model, "int": imodel},
                        agree=None)
    return round(res["float_acc"], 2), round(res["int_acc"], 2), meta


@pytest.mark.parametrize("dataset,model", [("fashion_mnist", "cnn_bn"), ("cifar10", "cnn")])
def test_dry_run_json_and_csv(tmp_path, dataset, model):
    csv_path, out = tmp_path / "ptq.csv", tmp_path / "int.pt"
    for bits in (8, 3):
        fc = ["--fc-per-channel"] if bits == 3 else []
        r = run_script("PTQ.py", "--dataset", dataset, "--model", model, "--bits", str(bits), "--dry-run",
                       "--device", "cpu", "--calib-batches", "2", "--results-dir", str(tmp_path), "--out", str(out),
                       "--json", *fc)
        assert r.returncode == 0, r.stderr
        row = _last_json(r.stdout)
        assert row["bits"] == bits and row["weight_bits"] == bits and row["act_bits"] == bits
        assert row["fc_per_channel"] == bool(fc)
        assert row["agreement"] == 100.0  # fake quantization simulates the engine's requantization
        assert row["fq_acc"] == row["int_acc"]  # so the two give the same accuracy
        float_acc, int_acc, meta = _dry_run_accuracies(dataset, model, row["seed"], out)
        assert (row["float_acc"], row["int_acc"]) == (float_acc, int_acc)
        assert meta["metrics"] == {k: row[k] for k in ("float_acc", "fq_acc", "int_acc")}
        from quant import load_integer
        fc_scales = [m.w_scale.unique().numel() for m in load_integer(out)[0].modules()
                     if type(m).__name__ == "IntLinear"]
        assert fc_scales and all((n > 1) == bool(fc) for n in fc_scales)
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


def test_compare_named_methods(tmp_path):
    """--compare NAMES runs those quant.COMPARISON entries only, one ptq_methods.csv row each; an unknown name
    is a one-line error that lists the names."""
    r = run_script("PTQ.py", "--dry-run", "--bits", "4", "--compare", "mse; w-mse + adaround",
                   "--adaround-iters", "5", "--results-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "ptq_methods.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == ["mse", "w-mse + adaround"]
    assert rows[1]["methods"] == "adaround" and rows[1]["weight_range"] == "mse"
    assert [row["name"] for row in _last_json(r.stdout)] == ["mse", "w-mse + adaround"]
    r = run_script("PTQ.py", "--dry-run", "--bits", "4", "--compare", "nope", "--results-dir", str(tmp_path))
    assert r.returncode == 2 and "unknown comparison" in r.stderr and "act tune" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_bits_is_one_line_error():
    r = run_script("PTQ.py", "--bits", "9", "--dry-run")
    assert r.returncode == 2 and "2..8" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("model", ["cnn", "cnn_bn"])
def test_8bit_ptq_on_shipped_fashion_mnist_checkpoints(tmp_path, model):
    """Run with no output flag from another directory (standing in for the checkout): the row goes to the
    git-ignored runs/, never to results/ptq.csv, and the integer model to the place export.py looks first."""
    import argparse

    from utils.pipeline import default_ptq_path
    real_split("fashion_mnist", "test")  # skips with the reason when the data is absent
    r = run_script(str(REPO / "PTQ.py"), "--dataset", "fashion_mnist", "--model", model, "--bits", "8", "--device",
                   "cpu", "--ckpt", str(REPO / "ckpt" / f"fashion_mnist_{model}.pt"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = _last_json(r.stdout)
    assert row["fq_acc"] >= row["float_acc"] - 0.3
    assert row["agreement"] == 100.0 and row["fq_acc"] == row["int_acc"]  # eval fake quant == the engine
    rows = list(csv.DictReader(open(tmp_path / "runs" / "ptq.csv")))
    assert [float(x["int_acc"]) for x in rows] == [row["int_acc"]] and not (tmp_path / "results" / "ptq.csv").exists()
    export_default = default_ptq_path(argparse.Namespace(dataset="fashion_mnist", model=model, bits=8))
    assert row["int_ckpt"] == str(export_default) and (tmp_path / export_default).exists()
