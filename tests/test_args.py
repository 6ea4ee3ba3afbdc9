"""utils/args.py: the scripts' defaults are QuantConfig's and the recipes', their help texts are generated from
those, and a run's rows go to the git-ignored runs/ unless --results-dir names another place."""
import argparse
import re
import subprocess
from pathlib import Path

import pytest

from quant.config import QATConfig, QuantConfig
from tests.conftest import REPO
from utils import recipes
from utils.args import RUNS_DIR, export_parser, fill_qat_recipe, ptq_parser, qat_parser, results_file, train_parser
from utils.pipeline import default_ptq_path, ptq_ckpt_path


def _help(parser: argparse.ArgumentParser) -> str:
    return " ".join(re.sub(r"-\n\s*", "-", parser.format_help()).split())  # without argparse's line wrapping


def test_ptq_defaults_are_quant_configs_and_export_finds_their_checkpoint():
    import PTQ
    args = ptq_parser().parse_args([])
    cfg = PTQ.quant_config(args, None)
    assert cfg == QuantConfig()  # the Python API and PTQ.py give the same figures
    assert default_ptq_path(args) == ptq_ckpt_path(args.dataset, args.model, cfg)
    doc = " ".join(QuantConfig.__doc__.split())
    for name in ("observer", "weight_range", "percentile", "ema_momentum", "calib_batches", "rounding"):
        assert f"{name} {getattr(QuantConfig, name)!r}" in doc, f"QuantConfig's docstring misstates its {name}"


def test_qat_starts_from_ptqs_defaults_except_the_ema_momentum():
    cfg = fill_qat_recipe(qat_parser().parse_args(["--bits", "4"]))
    assert (cfg["observer"], cfg["weight_range"], cfg["calib_batches"]) == (
        QuantConfig.observer, QuantConfig.weight_range, QuantConfig.calib_batches)
    assert cfg["ema_momentum"] == QATConfig.ema_momentum != QuantConfig.ema_momentum


def test_rows_go_to_runs_unless_results_dir_is_given(tmp_path, capsys):
    for parser in (train_parser(), ptq_parser(), qat_parser(), export_parser()):
        args = parser.parse_args([])
        assert results_file(args, "x.csv") == Path(RUNS_DIR) / "x.csv"
        assert "(default: runs/, git-ignored)" in _help(parser)
        assert results_file(parser.parse_args(["--results-dir", "results"]), "x.csv") == Path("results/x.csv")
        assert results_file(parser.parse_args(["--dry-run"]), "x.csv") is None  # a dry run writes nothing unasked
        assert results_file(parser.parse_args(["--dry-run", "--results-dir", "d"]), "x.csv") == Path("d/x.csv")
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):  # refused before the run, not when its row is written
        ptq_parser().parse_args(["--results-dir", str(tmp_path / "f")])
    assert "is a file; pass a directory" in capsys.readouterr().err
    try:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{RUNS_DIR}/ptq.csv"], cwd=REPO).returncode
    except OSError:
        pytest.skip("git is not installed")
    assert ignored == 0, f"{RUNS_DIR}/ is not in .gitignore"


def test_help_texts_follow_the_recipes(monkeypatch):
    monkeypatch.setitem(recipes.ONE_CYCLE, "warmup", 0.3)
    monkeypatch.setitem(recipes.RECIPES, "cifar10", dict(recipes.RECIPES["cifar10"], epochs=7, augment="flip",
                                                         momentum=0.8))
    monkeypatch.setitem(recipes.QAT_RECIPES, 2, dict(recipes.QAT_RECIPES[2], lr=0.25))
    train, qat = _help(train_parser()), _help(qat_parser())
    assert "first 30% of the steps" in train and "first 30% of the steps" in qat
    assert "fashion_mnist 60, cifar10 7 (resnet8 100, resnet20 200, mobilenetv2 200)" in train and "cifar10 flip)" in train
    assert "Nesterov momentum fashion_mnist 0.9, cifar10 0.8" in train
    assert "0.25 at 2" in qat
