"""QAT.py end to end: dry runs (from scratch, with distillation and BN momentum) with their JSON row and CSV,
resume, one-line errors, the recipe's augmentation."""
import csv
import json

import pytest
import torch

from tests.conftest import check_resume, run_script


@pytest.mark.slow
def test_from_scratch_dry_run_json(tmp_path):
    csv_path = tmp_path / "qat.csv"
    r = run_script("QAT.py", "--from-scratch", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4",
                   "--calib-batches", "2", "--results-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("float_acc", "fq_acc", "int_acc", "agreement", "tag", "observer", "calib_batches", "rounding",
                "float_ckpt", "seconds", "git_commit"):  # PTQ.py's keys
        assert key in row, key
    assert row["agreement"] == 100.0 and row["quantizer"] == "lsq" and row["bits"] == 4
    assert csv_path.exists()


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    common = ("QAT.py", "--from-scratch", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4",
              "--epochs", "2", "--calib-batches", "2", "--freeze-bn", "1.5", "--freeze-observers", "1.5")
    resumed, straight = check_resume(common, 2, tmp_path)
    wa, wb = resumed["model"], straight["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) if torch.is_tensor(wb[k]) else wa[k] == wb[k] for k in wb)
    assert (tmp_path / "resumed.int.pt").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_first_last_layers_reach_the_row_and_resume_checks_them(tmp_path):
    out = tmp_path / "q.pt"
    common = ("QAT.py", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4", "--calib-batches", "2",
              "--epochs", "2", "--out", str(out))
    r = run_script(*common, "--first-last", "8", "--layer", "4:weight_bits=6", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["tag"] == "w4a4-per_channel-mixed" and row["agreement"] == 100.0
    assert row["layers"].startswith("input:act_bits=8;") and row["layers"].endswith(";4:weight_bits=6")
    r = run_script(*common, "--resume")  # the same run without --first-last / --layer
    assert r.returncode == 2 and "other quantization settings" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_missing_checkpoint_names_the_train_command(tmp_path):
    r = run_script("QAT.py", "--dataset", "cifar10", "--model", "cnn", "--bits", "4", "--ckpt", str(tmp_path / "no.pt"))
    assert r.returncode == 2 and "python train.py --dataset cifar10 --model cnn" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_script("QAT.py", "--bits", "9", "--dry-run")
    assert r.returncode == 2 and "2..8" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_recipe_augmentation_fine_tuning_uses_the_data_sets_from_scratch_the_models(monkeypatch):
    import QAT
    from utils import recipes

    def cfg(*argv):
        return QAT.fill_recipe(QAT.parse_args(["--dataset", "fashion_mnist", "--model", "cnn_bn", "--bits", "4", *argv]))

    # a model recipe with its own augmentation (no shipped recipe has one now)
    own = dict(recipes.MODEL_RECIPES.get(("fashion_mnist", "cnn_bn"), {}), augment="flip")
    monkeypatch.setitem(recipes.MODEL_RECIPES, ("fashion_mnist", "cnn_bn"), own)
    assert recipes.model_recipe("fashion_mnist", "cnn_bn")["augment"] != recipes.RECIPES["fashion_mnist"]["augment"]
    assert cfg()["augment"] == recipes.RECIPES["fashion_mnist"]["augment"]
    assert cfg("--from-scratch")["augment"] == recipes.model_recipe("fashion_mnist", "cnn_bn")["augment"]
    assert cfg("--augment", "flip,erase20")["augment"] == "flip,erase20"


def test_model_qat_recipe_changes_only_its_model_and_bits_and_the_command_line_wins(monkeypatch):
    import QAT
    from utils import recipes
    from utils.args import qat_parser

    def cfg(model, bits, *argv):
        return QAT.fill_recipe(QAT.parse_args(["--dataset", "cifar10", "--model", model, "--bits", str(bits), *argv]))

    monkeypatch.setitem(recipes.MODEL_QAT_RECIPES, ("cifar10", "resnet20"), {3: dict(epochs=11, weight_range="mse")})
    assert (cfg("resnet20", 3)["epochs"], cfg("resnet20", 3)["weight_range"]) == (11, "mse")
    assert cfg("resnet20", 3)["lr"] == recipes.QAT_RECIPES[3]["lr"]                  # the rest stays the bit width's
    assert cfg("resnet20", 3)["freeze_bn"] == recipes.QAT_RECIPES[3]["freeze_bn"] * 11  # fractions of its epochs
    assert cfg("resnet20", 4)["epochs"] == recipes.QAT_RECIPES[4]["epochs"]            # other bit widths
    assert cfg("cnn", 3)["epochs"] == recipes.QAT_RECIPES[3]["epochs"]                 # other models
    assert cfg("resnet20", 3, "--epochs", "2")["epochs"] == 2
    assert "cifar10 resnet20 11 at 3" in " ".join(qat_parser().format_help().split())


def test_shipped_model_qat_recipes_keep_the_bit_widths_quantizer():
    from utils import recipes
    from utils.cli import check_names
    for (dataset, model), per_bits in recipes.MODEL_QAT_RECIPES.items():
        check_names(dataset, model)  # a known model of a known data set
        for bits, changes in per_bits.items():
            assert bits in recipes.QAT_RECIPES and set(changes) <= set(recipes.COMMON) | set(recipes.QAT_RECIPES[bits])
            assert "quantizer" not in changes, "README's QAT table finds a model's default run by the bit width's quantizer"


@pytest.mark.slow
def test_distillation_flags_recorded_and_checked(tmp_path):
    import QAT
    from utils import recipes

    def cfg(*argv):
        return QAT.fill_recipe(QAT.parse_args(["--bits", "4", *argv]))

    assert cfg()["kd_weight"] == recipes.COMMON["kd_weight"] and cfg()["bn_momentum"] is None
    c = cfg("--kd-weight", "0.5", "--kd-temp", "2", "--bn-momentum", "0.02")
    assert (c["kd_weight"], c["kd_temp"], c["bn_momentum"]) == (0.5, 2.0, 0.02)
    r = run_script("QAT.py", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4", "--calib-batches", "2",
                   "--kd-weight", "0.5", "--bn-momentum", "0.02", "--results-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["kd_weight"] == 0.5 and row["bn_momentum"] == 0.02 and row["agreement"] == 100.0
    # another teacher than the float checkpoint: train.py's --teacher list, recorded in the row
    teachers = "ckpt/fashion_mnist_cnn.pt,ckpt/fashion_mnist_cnn_bn.pt"
    r = run_script("QAT.py", "--dry-run", "--device", "cpu", "--model", "cnn_bn", "--bits", "4", "--calib-batches", "2",
                   "--kd-weight", "0.5", "--teacher", teachers, "--results-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["teacher"] == teachers
    with open(tmp_path / "qat.csv", newline="") as f:  # both rows went to --results-dir
        assert [row["teacher"] for row in csv.DictReader(f)] == ["", teachers]
    for argv, expected in ((("--from-scratch", "--kd-weight", "0.5"), "no trained float model to distil"),
                           (("--kd-weight", "0.5", "--teacher", "ckpt/cifar10_cnn.pt"), "not a fashion_mnist model"),
                           (("--bn-momentum", "1.5"), "--bn-momentum must be in (0, 1]")):
        r = run_script("QAT.py", "--dry-run", "--device", "cpu", *argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (argv, r.stderr)


def test_estimate_bn_statistics_is_the_average_over_the_calibration_batches():
    """QAT.py --from-scratch's first step: every BN's running statistics become the cumulative average of its
    batch statistics over the first batches (epoch 0), momentum and training flag restored."""
    from data import Loader
    from utils.pipeline import estimate_bn_statistics
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3)).eval()
    g = torch.Generator().manual_seed(1)
    loader = Loader(torch.randint(0, 256, (96, 1, 28, 28), generator=g, dtype=torch.uint8),
                    torch.zeros(96, dtype=torch.int64), "fashion_mnist", 32, train=True)
    estimate_bn_statistics(model, loader, num_batches=2)
    bn = model[1]
    assert bn.momentum == 0.3 and not model.training and int(bn.num_batches_tracked) == 2
    loader.set_epoch(0)
    with torch.no_grad():
        ys = [model[0](x) for x, _ in list(loader)[:2]]
    means = torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0)
    variances = torch.stack([y.var((0, 2, 3)) for y in ys]).mean(0)  # unbiased, as BatchNorm's running_var
    assert torch.allclose(bn.running_mean, means, atol=1e-5) and torch.allclose(bn.running_var, variances, atol=1e-4)
