"""reproduce.py: the settings hash, the grid flags, the Markdown renderer on hand-made rows, and a dry run
of a small grid end to end (interrupted, resumed, cached; the Markdown's numbers are the CSV's)."""
import csv
import re
import subprocess

import pytest

from utils.recipes import COMMON, QAT_RECIPES
import reproduce
from reproduce import Cell, cell_settings, parse_bits, settings_hash
from tests.conftest import run_script
from utils.cli import CLIError
from utils.results_tables import bn_vs_plain_table, render_reproduce, render_results_md, select_runs

GRID = ("reproduce.py", "--dry-run", "--datasets", "fashion_mnist", "--models", "cnn", "--bits", "4,8",
        "--methods", "ptq,qat-lsq", "--epochs", "1", "--device", "cpu")


def test_settings_hash_is_stable_and_order_free():
    assert settings_hash({"b": 1, "a": [1, 2]}) == settings_hash({"a": [1, 2], "b": 1}) == "edab56f36d01"
    assert settings_hash({"a": [1, 2], "b": 2}) != "edab56f36d01"


def test_cell_settings_follow_recipe_and_checkpoint_not_device(monkeypatch):
    cell = Cell("fashion_mnist", "cnn", 4, "qat-lsq", 0)
    base = cell_settings(cell, None, False, "sha1:aa")
    assert base["epochs"] == QAT_RECIPES[4]["epochs"] and base["quantizer"] == "lsq"
    assert "device" not in base and "out" not in base and "results_dir" not in base
    assert settings_hash(cell_settings(cell, None, False, "sha1:bb")) != settings_hash(base)  # retrained
    monkeypatch.setitem(QAT_RECIPES, 4, dict(QAT_RECIPES[4], lr=0.123))
    assert settings_hash(cell_settings(cell, None, False, "sha1:aa")) != settings_hash(base)  # recipe changed
    # settings added later are out of the hash at their neutral value (old cells stay cached), in it otherwise
    assert not set(reproduce.NEUTRAL_SETTINGS) & set(base)
    monkeypatch.setitem(COMMON, "kd_weight", 0.5)
    assert cell_settings(cell, None, False, "sha1:aa")["kd_weight"] == 0.5
    ptq = cell_settings(Cell("fashion_mnist", "cnn", 4, "ptq", 0), None, False, "sha1:aa")
    assert ptq["observer"] == "mse" and ptq["script"] == "PTQ.py"


@pytest.mark.slow
def test_parse_bits_and_bad_bits():
    assert parse_bits("2-8") == [2, 3, 4, 5, 6, 7, 8] and parse_bits("8,4, 6") == [4, 6, 8]
    for bad in ("9", "1-4", "x", "4,"):
        with pytest.raises(CLIError):
            parse_bits(bad)
    r = run_script("reproduce.py", "--bits", "9")
    assert r.returncode == 2 and "2..8" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_qat_alias_is_the_default_quantizer_per_bits():
    args = reproduce.parse_args(["--quick", "--seeds", "2"])
    cells = reproduce.make_cells(args)
    expect = [("ptq", 0)] + [(f"qat-{QAT_RECIPES[4]['quantizer']}", s) for s in (0, 1)]
    expect += [("ptq", 0)] + [(f"qat-{QAT_RECIPES[8]['quantizer']}", s) for s in (0, 1)]
    assert [(c.method, c.seed) for c in cells] == expect and args.epochs == 1 and args.out == "results/quick"


def _row(dataset, model, bits, method, seed, acc, group="g", source="debian", **kw):
    qz = method.partition("-")[2]
    return {"cell": f"{group}{bits}{method}{seed}", "group": group, "dataset": dataset, "model": model,
            "bits": str(bits), "method": method, "quantizer": qz, "recipe_quantizer": kw.get("recipe", "lsq" if qz else ""),
            "seed": str(seed), "epochs": "5" if qz else "", "float_acc": kw.get("float_acc", "91.29"),
            "fq_acc": str(acc), "int_acc": str(acc), "agreement": "100.0", "cell_seconds": "30.0",
            "data_source": source}


def test_render_results_md_exact_tables():
    rows = [_row("fashion_mnist", "cnn", 4, "qat-lsq", 0, 50.0, group="old"),  # an older recipe: left out
            _row("fashion_mnist", "cnn", 4, "ptq", 0, 89.76, group="p"),
            _row("fashion_mnist", "cnn", 4, "qat-lsq", 0, 90.5, group="q"),
            _row("fashion_mnist", "cnn", 4, "qat-lsq", 1, 90.7, group="q"),
            _row("fashion_mnist", "cnn", 4, "qat-ste", 0, 89.9, group="s"),
            _row("cifar10", "cnn_bn", 8, "ptq", 0, 78.98, group="c", source="jpeg-copy", float_acc="78.99")]
    md = render_results_md(rows)
    assert "\n".join(["### Fashion-MNIST", "",
                      "| num_bits | 4 | 6 | 8 |",
                      "| :-- | :-: | :-: | :-: |",
                      "| cnn_PTQ | 89.76% / 71% | — / 88% | — / 90% |",
                      "| cnn_QAT | 90.60 ± 0.14% / 81% | — / 90% | — / 91% |",
                      "| cnnBN_PTQ | — / 52% | — / 63% | — / 59% |",
                      "| cnnBN_QAT | — / 62% | — / 71% | — / 84% |", "",
                      "float model: cnn 91.29% / 90%, cnn_bn — / 90%"]) in md
    assert "### CIFAR-10 (JPEG copy)" in md and "| cnnBN_PTQ | — / 42% | — / 45% | 78.98% / 57% |" in md
    assert "\n".join(["| data set | model | method | float | 4 bits | 8 bits |",
                      "|---|---|---|---|---|---|",
                      "| Fashion-MNIST | cnn | ptq | 91.29% | 89.76% | — |",
                      "| Fashion-MNIST | cnn | qat-ste | 91.29% | 89.90% | — |",
                      "| Fashion-MNIST | cnn | qat-lsq | 91.29% | 90.60 ± 0.14% | — |",
                      "| CIFAR-10 (JPEG copy) | cnn_bn | ptq | 78.99% | — | 78.98% |"]) in md
    assert ("| Fashion-MNIST | cnn | 4 | qat-lsq | 5 | 0,1 | 91.29 ± 0.00% | 90.60 ± 0.14% | 90.60 ± 0.14% "
            "| 100.00% | 30 s |") in md
    assert "QAT = QAT.py with its default recipe and quantizer at that bit width (lsq at 4 bits)" in md
    assert "Wall time of the 5 runs above: 2.5 min in all" in md and "50.00" not in md


def test_bn_vs_plain_table_compares_seed_means_of_the_default_quantizer():
    q6 = QAT_RECIPES[6]["quantizer"]  # the 6-bit lines use the 6-bit default, whichever it is
    rows = [_row("fashion_mnist", "cnn", 4, "qat-lsq", 0, 90.5, group="a"),
            _row("fashion_mnist", "cnn", 4, "qat-lsq", 1, 90.9, group="a"),
            _row("fashion_mnist", "cnn_bn", 4, "qat-lsq", 0, 90.6, group="b"),
            _row("fashion_mnist", "cnn_bn", 4, "qat-ste", 0, 99.0, group="c"),  # not the 4-bit default
            _row("fashion_mnist", "cnn", 8, "qat-ste", 0, 91.3, group="d"),
            _row("fashion_mnist", "cnn_bn", 8, "qat-ste", 0, 91.5, group="e"),
            _row("fashion_mnist", "cnn", 6, f"qat-{q6}", 0, 91.0, group="g"),
            _row("fashion_mnist", "cnn", 6, f"qat-{q6}", 1, 91.2, group="g"),
            _row("fashion_mnist", "cnn_bn", 6, f"qat-{q6}", 0, 91.3, group="h"),
            _row("fashion_mnist", "cnn_bn", 6, f"qat-{q6}", 1, 91.7, group="h"),
            _row("cifar10", "cnn", 4, "qat-lsq", 0, 76.0, group="f", source="jpeg-copy")]  # no cnn_bn: no line
    # 6 bits: means 91.1 and 91.5, sample variances 0.02 and 0.08 over 2 seeds: se = sqrt(0.01 + 0.04)
    assert bn_vs_plain_table(select_runs(rows)) == [
        "| data set | bits | quantizer | cnn | cnn_bn | cnn_bn − cnn (means) | its standard error | cnn_bn ≥ cnn |",
        "|---|---|---|---|---|---|---|---|",
        "| Fashion-MNIST | 8 | ste | 91.30% | 91.50% | +0.20 | — | yes |",
        f"| Fashion-MNIST | 6 | {q6} (2 / 2 seeds) | 91.10 ± 0.14% | 91.50 ± 0.28% | +0.40 | 0.22 | yes |",
        "| Fashion-MNIST | 4 | lsq (2 / 1 seeds) | 90.70 ± 0.28% | 90.60% | -0.10 | — | **no** |"]
    assert bn_vs_plain_table(select_runs(rows[-1:])) == []
    near_tie = [_row("fashion_mnist", "cnn", 6, f"qat-{q6}", 0, 91.704, group="a"),
                _row("fashion_mnist", "cnn_bn", 6, f"qat-{q6}", 0, 91.700, group="b")]
    assert bn_vs_plain_table(select_runs(near_tie))[-1].endswith("| -0.004 | — | **no** |")
    tie = [_row("fashion_mnist", "cnn", 6, f"qat-{q6}", 0, 91.7, group="a"),
           _row("fashion_mnist", "cnn", 6, f"qat-{q6}", 1, 91.6, group="a"),
           _row("fashion_mnist", "cnn_bn", 6, f"qat-{q6}", 0, 91.65, group="b")]  # equal means
    assert bn_vs_plain_table(select_runs(tie))[-1].endswith("| +0.00 | — | yes |")


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _md_table(md: str, first_cell: str, n_key: int) -> dict[tuple[str, ...], list[str]]:
    """Markdown table lines starting with ``| first_cell`` -> {their first n_key cells: the other cells}."""
    out = {}
    for line in md.splitlines():
        if line.startswith(f"| {first_cell}"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[tuple(cells[:n_key])] = cells[n_key:]
    return out


def _pct(text: str) -> float:
    return float(re.fullmatch(r"(\d+\.\d\d)%", text).group(1))


@pytest.mark.slow
def test_dry_run_grid_resumes_and_reports(tmp_path):
    out = tmp_path / "out"
    r = run_script(*GRID, "--out", str(out), "--stop-after", "2", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert len(_csv(out / "results.csv")) == 2
    r = run_script(*GRID, "--out", str(out), env={"OMP_NUM_THREADS": "1"})  # continues the interrupted grid
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": cached") == 2 and "ran 2 cell(s)" in r.stdout
    rows = _csv(out / "results.csv")
    assert sorted((int(x["bits"]), x["method"]) for x in rows) == [(4, "ptq"), (4, "qat-lsq"), (8, "ptq"), (8, "qat-lsq")]
    assert len({x["cell"] for x in rows}) == 4
    for x in rows:
        assert x["dry_run"] == "True" and x["data_source"] == "synthetic" and x["torch"] and x["git_commit"]
        assert float(x["cell_seconds"]) > 0
        assert float(x["agreement"]) == 100.0 and x["int_acc"] == x["fq_acc"]  # fake quant == engine
    assert len(_csv(out / "ptq.csv")) == 2 and len(_csv(out / "qat.csv")) == 2
    r = run_script(*GRID, "--out", str(out), env={"OMP_NUM_THREADS": "1"})  # everything cached now
    assert r.returncode == 0 and r.stdout.count(": cached") == 4 and "ran 0 cell(s)" in r.stdout
    assert len(_csv(out / "results.csv")) == 4

    md = (out / "RESULTS.md").read_text()
    by = {(int(x["bits"]), x["method"]): x for x in rows}
    full = _md_table(md, "Fashion-MNIST (synthetic data) | cnn | ", 3)
    for method in ("ptq", "qat-lsq"):
        line = full[("Fashion-MNIST (synthetic data)", "cnn", method)]
        assert _pct(line[0]) == float(by[(4, "ptq")]["float_acc"])
        assert [_pct(c) for c in line[1:]] == [float(by[(b, method)]["int_acc"]) for b in (4, 8)]
    seed_rows = _md_table(md, "cnn_", 1)  # the seed-style table: columns 4, 6, 8 bits, cells 'ours / seed's'
    for label, method in (("cnn_PTQ", "ptq"), ("cnn_QAT", "qat-lsq")):
        for bits, cell in zip((4, 6, 8), seed_rows[(label,)]):
            ours = cell.split(" / ")[0]
            shown = bits in (4, 8) and (method == "ptq" or QAT_RECIPES[bits]["quantizer"] == "lsq")
            assert (ours != "—") == shown, (label, bits, cell)
            if shown:
                assert _pct(ours) == float(by[(bits, method)]["int_acc"])
    png = (out / "accuracy_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "![accuracy against bits](accuracy_vs_bits.png)" in md
    block = render_reproduce(out)
    assert "**Fashion-MNIST (synthetic data)**" in block and "accuracy_vs_bits.png" in block


def test_report_tables_drop_rows_of_a_retrained_checkpoint():
    from utils.report import from_shipped, shipped_float_acc
    acc = shipped_float_acc("cifar10", "cnn")
    row = {"dataset": "cifar10", "model": "cnn", "float_ckpt": "ckpt/cifar10_cnn.pt", "float_acc": f"{acc:.2f}"}
    assert from_shipped(row)
    assert not from_shipped(dict(row, float_acc=f"{acc - 0.33:.2f}"))  # the checkpoint before a retraining
    assert not from_shipped(dict(row, float_ckpt="/tmp/other.pt"))


def test_qat_table_bars_and_distillation_column(tmp_path):
    from utils.io import append_csv_row
    from utils.report import qat_bar, render_qat, shipped_float_acc
    assert (qat_bar("cifar10", 4), qat_bar("cifar10", 4, "cnn"), qat_bar("fashion_mnist", 4, "cnn_bn")) == (3.0, 3.0, 1.0)
    assert (qat_bar("cifar10", 4, "resnet20"), qat_bar("cifar10", 8, "resnet8"), qat_bar("cifar10", 6, "mobilenetv2")) == (
        2.0, 0.3, 1.0)  # issue #17's bars for the zoo
    assert qat_bar("cifar10", 3, "resnet8") is None and qat_bar("cifar10", 2) is None  # reported only
    acc = shipped_float_acc("cifar10", "resnet8")
    row = {"dataset": "cifar10", "model": "resnet8", "bits": "4", "per_channel": "True", "rounding": "ref",
           "from_scratch": "False", "seed": "0", "quantizer": "lsq", "epochs": "12", "lr": "0.01",
           "kd_weight": "0.5", "kd_temp": "4.0", "float_acc": f"{acc:.2f}", "ptq_fq_acc": "65.00",
           "fq_acc": f"{acc - 2.9:.2f}", "int_acc": f"{acc - 2.9:.2f}", "agreement": "100.0", "seconds": "60",
           "git_commit": "abc", "data_source": "jpeg-copy", "float_ckpt": "ckpt/cifar10_resnet8.pt"}
    with open(tmp_path / "qat.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerows([row, dict(row, bits="6", kd_weight="0.0", int_acc=f"{acc - 0.6:.2f}")])
    six, four = render_qat(tmp_path).splitlines()[2:]  # more bits first
    assert "| 0.5, T 4 |" in four and "| -2.90 | ≥ −3.0 met |" in four
    assert "| — |" in six and "| -0.60 | ≥ −0.5 **not met** |" in six
    # a later run with per-channel fully-connected weights is not the table's setting: it replaces no row
    append_csv_row(tmp_path / "qat.csv", dict(row, int_acc=f"{acc - 1.0:.2f}", fc_per_channel="True"))
    assert render_qat(tmp_path).splitlines()[2:] == [six, four]
    append_csv_row(tmp_path / "qat.csv", dict(row, int_acc=f"{acc - 1.0:.2f}", layers="input:act_bits=8"))
    assert render_qat(tmp_path).splitlines()[2:] == [six, four]  # nor does a run with per-layer bits


def test_resnet20_table_puts_each_convention_on_its_row(tmp_path):
    from utils.io import append_csv_row
    from utils.report import PUBLISHED_RESNET20, first_last_layers, render_resnet20_published, shipped_float_acc
    acc = shipped_float_acc("cifar10", "resnet20")
    row = {"dataset": "cifar10", "model": "resnet20", "bits": "4", "per_channel": "True", "rounding": "ref",
           "from_scratch": "False", "seed": "0", "quantizer": "lsq", "float_acc": f"{acc:.2f}",
           "int_acc": f"{acc - 1.5:.2f}", "layers": "", "float_ckpt": "ckpt/cifar10_resnet20.pt"}
    fl = first_last_layers("cifar10", "resnet20")
    assert fl.startswith("input:act_bits=8;") and fl.endswith("weight_bits=8,act_bits=8")
    for r in (row, dict(row, bits="3", int_acc=f"{acc - 4:.2f}"), dict(row, layers=fl, int_acc=f"{acc - 0.5:.2f}"),
              dict(row, quantizer="ste", int_acc="10.00"),  # not the default quantizer at 4 bits
              dict(row, layers="fc:w8a8", int_acc="11.00")):  # per-layer bits, but not the papers' convention
        append_csv_row(tmp_path / "qat.csv", r)
    lines = render_resnet20_published(tmp_path).splitlines()
    assert len(lines) == 2 + len(PUBLISHED_RESNET20) + 2 and "| 91.6 | 91.3 (-0.3) | 91.1 (-0.5) | 89.7 (-1.9) |" in lines[2]
    every, first_last = lines[-2:]
    assert "every tensor" in every and every.endswith(f"| {acc - 1.5:.2f} (-1.50) | {acc - 4:.2f} (-4.00) | not run |")
    assert "--first-last 8" in first_last and first_last.endswith(f"| {acc - 0.5:.2f} (-0.50) | not run | not run |")


@pytest.mark.slow
def test_shards_and_listed_commands_cover_the_grid_once(tmp_path):
    """Two --shard runs write every cell once and equal a single run; --list prints one command per
    pending cell, and running one of them records exactly that cell."""
    env = {"OMP_NUM_THREADS": "1"}
    single, sharded, listed = tmp_path / "single", tmp_path / "sharded", tmp_path / "listed"
    assert run_script(*GRID, "--out", str(single), env=env).returncode == 0
    for i in range(2):
        r = run_script(*GRID, "--out", str(sharded), "--shard", f"{i}/2", env=env)
        assert r.returncode == 0, r.stderr
    a, b = _csv(single / "results.csv"), _csv(sharded / "results.csv")
    assert len(b) == len({x["cell"] for x in b}) == 4
    key = lambda rows: sorted((x["cell"], x["int_acc"], x["fq_acc"]) for x in rows)  # noqa: E731
    assert key(a) == key(b)
    r = run_script(*GRID, "--out", str(listed), "--list", env=env)
    assert r.returncode == 0, r.stderr
    commands = [line for line in r.stdout.splitlines() if line.startswith("python reproduce.py")]
    assert len(commands) == 4 and all("--cell" in c for c in commands)
    hashes = {c.split("--cell ")[1].strip() for c in commands}
    assert hashes == {x["cell"] for x in a}
    one = commands[0].split()[1:]  # run one listed command as a job array task would
    assert run_script(*one, env=env).returncode == 0
    assert [x["cell"] for x in _csv(listed / "results.csv")] == [commands[0].split("--cell ")[1].strip()]
    bad = run_script(*GRID, "--out", str(listed), "--shard", "2/2", env=env)
    assert bad.returncode == 2 and "--shard" in bad.stderr


@pytest.mark.slow
def test_zoo_grid_takes_the_shipped_zoo_models(tmp_path):
    """--zoo: cifar10, bits 4/6/8, PTQ + default QAT, only the zoo models ckpt/ holds (the others named on stderr)."""
    from utils.io import REPO_ROOT
    shipped = [m for m in reproduce.ZOO_MODELS if (REPO_ROOT / f"ckpt/cifar10_{m}.pt").exists()]
    r = run_script("reproduce.py", "--zoo", "--list", "--out", str(tmp_path / "zoo"), "--device", "cpu")
    assert r.returncode == (0 if shipped else 2), r.stderr
    commands = [line for line in r.stdout.splitlines() if line.startswith("python reproduce.py")]
    assert len(commands) == 6 * len(shipped)
    for m in set(reproduce.ZOO_MODELS) - set(shipped):
        assert f"--zoo: {m} left out" in r.stderr
    assert all("--datasets cifar10" in c and "--bits 4,6,8" in c for c in commands)
    r = run_script("reproduce.py", "--zoo", "--dry-run", "--models", "resnet8", "--bits", "8", "--methods", "ptq",
                   "--out", str(tmp_path / "dry"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rows = _csv(tmp_path / "dry" / "results.csv")
    assert [(x["dataset"], x["model"], x["bits"], x["method"]) for x in rows] == [("cifar10", "resnet8", "8", "ptq")]
    assert (tmp_path / "dry" / "accuracy_vs_bits.png").exists()


def test_retrain_is_resumable_and_replaces_ckpt_only_when_finished(tmp_path, monkeypatch):
    """--retrain trains into <out>/float/ with train.py (here a stand-in that writes its checkpoints), passes
    --resume to a training that has a checkpoint, and copies only finished ones over ckpt/."""
    from quant.io import save_checkpoint
    calls, stop_at, exit_status = [], {"cnn": 1, "cnn_bn": 2}, {"cnn": 130, "cnn_bn": 0}

    def fake_train(cmd, cwd, env):
        model = cmd[cmd.index("--model") + 1]
        calls.append((model, "--resume" in cmd))
        save_checkpoint({"model": {"w": model}, "config": {"epochs": 2}, "epoch": stop_at[model],
                         "metrics": {"test_acc": 50.0}}, cmd[cmd.index("--out") + 1])
        return subprocess.CompletedProcess(cmd, exit_status[model])

    monkeypatch.setattr(reproduce.subprocess, "run", fake_train)
    args = reproduce.parse_args(["--datasets", "fashion_mnist", "--models", "cnn,cnn_bn", "--bits", "8",
                                 "--methods", "ptq", "--jobs", "2", "--device", "cpu"])
    cells, out, ckpt_dir = reproduce.make_cells(args), tmp_path / "out", tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / "fashion_mnist_cnn.pt").write_bytes(b"shipped")
    with pytest.raises(CLIError, match="train.py failed for fashion_mnist/cnn"):
        reproduce.retrain(args, cells, out, ckpt_dir)
    assert sorted(calls) == [("cnn", False), ("cnn_bn", False)]
    assert (ckpt_dir / "fashion_mnist_cnn.pt").read_bytes() == b"shipped"  # the interrupted one: untouched
    assert not (ckpt_dir / "fashion_mnist_cnn_bn.pt").exists()  # nothing copied before every training finished
    exit_status["cnn"] = 0  # train.py exits 0 but its checkpoint stopped short: refused, not copied
    with pytest.raises(CLIError, match="stopped after epoch 1 of 2"):
        reproduce.retrain(args, cells, out, ckpt_dir)
    assert (ckpt_dir / "fashion_mnist_cnn.pt").read_bytes() == b"shipped"
    calls.clear()
    stop_at["cnn"] = 2
    reproduce.retrain(args, cells, out, ckpt_dir)
    assert sorted(calls) == [("cnn", True), ("cnn_bn", True)]
    for m in ("cnn", "cnn_bn"):
        assert (ckpt_dir / f"fashion_mnist_{m}.pt").read_bytes() == (out / f"float/fashion_mnist_{m}.pt").read_bytes()


def test_epoch_time_table_pairs_bf16_and_teacher_rows_of_the_same_run(tmp_path):
    from utils.io import append_csv_row
    from utils.report import render_epoch_time
    base = dict(dataset="cifar10", model="resnet8", device="cpu", threads=1, batch_size=128, repeats=3,
                loader_img_per_s=30000, train_img_per_s=900, git_commit="abc")
    append_csv_row(tmp_path / "epoch_time.csv", dict(base, method="float", epoch_s=90.0))
    append_csv_row(tmp_path / "epoch_time.csv", dict(base, method="bf16", epoch_s=55.0, ratio_vs_float=0.61))
    line = render_epoch_time(tmp_path).splitlines()[-1]
    assert line.startswith("| CIFAR-10 | resnet8 | 90.0 | 0.61 | — |"), line
    # a later float run without bf16 beside it shows no ratio (the old one timed other code)
    append_csv_row(tmp_path / "epoch_time.csv", dict(base, method="float", epoch_s=80.0, git_commit="def"))
    line = render_epoch_time(tmp_path).splitlines()[-1]
    assert line.startswith("| CIFAR-10 | resnet8 | 80.0 | — | — |"), line
