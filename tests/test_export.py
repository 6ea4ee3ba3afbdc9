"""export.py: the command line (--verify against every runtime as a JSON row, the C array, one-line errors, the
install hint when LiteRT or TFLM is missing) and its match display."""
import json

import pytest

import quant
from tests.conftest import needs_litert, run_script, synthetic_setup
from utils.args import export_parser
from utils.cli import CLIError
from utils.pipeline import names_from_source


def _integer_checkpoint(path, dataset="cifar10", model="cnn_bn"):
    net, batch = synthetic_setup(model, dataset)
    q = quant.quantize(net, quant.QuantConfig(weight_bits=6, act_bits=6, observer="minmax"))
    quant.calibrate(q, [batch(16)[0]])
    quant.save_integer(path, quant.convert(q), {"dataset": dataset, "model": model, "method": "ptq"})
    return path


def test_from_checkpoint_names_the_dataset_and_model(tmp_path):
    path = str(_integer_checkpoint(tmp_path / "i.pt"))
    args = export_parser().parse_args(["--from", path])
    names_from_source(args)
    assert (args.dataset, args.model) == ("cifar10", "cnn_bn")
    args = export_parser().parse_args(["--from", path, "--dataset", "cifar10", "--model", "cnn_bn"])
    names_from_source(args)  # the same names, given: fine
    for wrong in (["--dataset", "fashion_mnist"], ["--model", "cnn"]):
        with pytest.raises(CLIError, match="holds a cifar10/cnn_bn model") as e:
            names_from_source(export_parser().parse_args(["--from", path, *wrong]))
        assert "\n" not in str(e.value) and "leave --dataset and --model out" in str(e.value)
    args = export_parser().parse_args([])  # no --from: the usual defaults
    names_from_source(args)
    assert (args.dataset, args.model) == ("fashion_mnist", "cnn")


@pytest.mark.slow
def test_cli_exports_a_checkpoint_of_another_dataset_without_naming_it(tmp_path):
    path = _integer_checkpoint(tmp_path / "i.pt")
    r = run_script("export.py", "--from", str(path), "--out", str(tmp_path / "m.tflite"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.tflite").read_bytes()[4:8] == b"TFL3"
    r = run_script("export.py", "--from", str(path), "--model", "cnn")
    assert r.returncode == 2 and "holds a cifar10/cnn_bn model" in r.stderr


@pytest.mark.slow
def test_cli_without_litert_prints_the_hint_on_one_line(tmp_path):
    block = ("import sys, runpy; sys.modules['ai_edge_litert'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path('export.py', run_name='__main__')")
    r = run_script("-c", block, "export.py", "--dry-run", "--calib-batches", "1", "--verify",
                   "--out", str(tmp_path / "m.tflite"))
    assert r.returncode == 2 and "pip install ai-edge-litert" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
@needs_litert
def test_cli_dry_run_verify_json(tmp_path):
    out = tmp_path / "m.tflite"
    r = run_script("export.py", "--dataset", "fashion_mnist", "--model", "cnn_bn", "--bits", "4", "--dry-run",
                   "--calib-batches", "2", "--verify", "--out", str(out), "--json", "--c-array")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["match"] == {"ref": 100.0, "builtin": 100.0, "xnnpack": 100.0, "tflm": 100.0}
    assert row["tflite_acc"] == row["int_acc"] and out.read_bytes()[4:8] == b"TFL3"
    assert row["arena_bytes"] > 1000 and f"TFLM arena {row['arena_bytes']:,} bytes" in r.stdout
    assert (tmp_path / "m.c").exists() and "m_tflite_len" in (tmp_path / "m.h").read_text()


@pytest.mark.slow
@needs_litert
def test_cli_without_tflm_skips_its_column(tmp_path):
    block = ("import sys, runpy; sys.modules['tflite_micro'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path('export.py', run_name='__main__')")
    r = run_script("-c", block, "export.py", "--dry-run", "--calib-batches", "1", "--verify",
                   "--out", str(tmp_path / "m.tflite"), "--json")
    assert r.returncode == 0, r.stderr
    assert "TFLM column skipped" in r.stdout and "pip install tflite-micro" in r.stdout
    assert set(json.loads(r.stdout.strip().splitlines()[-1])["match"]) == {"ref", "builtin", "xnnpack"}


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    r = run_script("export.py", "--from", str(tmp_path / "none.pt"))
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_script("export.py", "--clamp", "int8", "--from", "x.pt")
    assert r.returncode == 2 and "drop --from" in r.stderr


def test_match_display_never_rounds_a_mismatch_to_100():
    from utils.cli import format_match
    assert format_match(100.0) == "100.00%"
    assert format_match(99.996) == "99.996%"            # 4 of 100,000 int8 logits differ
    assert format_match(100 * 99_999 / 100_000) == "99.999%"
    assert format_match(99.99995) == "99.999%"          # 1 in 2 million: still not shown as 100
