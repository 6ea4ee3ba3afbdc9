"""reproduce.py's tables and plot, rendered from the rows of results.csv alone (never typed by hand).

    render_results_md(rows) -> str          RESULTS.md: the seed README's two tables, ours beside the seed's
                                            figures, then every bit width and method, then every run
    plot_accuracy_vs_bits(rows, path)       accuracy_vs_bits.png: one panel per data set
    render_reproduce(results_dir) -> str    README block: the seed-style tables, the plot and the command
    write_results(out_dir) -> [paths]       RESULTS.md and the PNG from out_dir/results.csv

A row is one run: PTQ.py's or QAT.py's JSON row plus reproduce.py's columns (cell, group, method,
recipe_quantizer, cell_seconds, ...). For each (data set, model, bits, method) the figures come from the
settings group of the latest row (``group`` hashes the settings without the seed): the latest row per
seed among the rows of that group, so rows of an older recipe or float checkpoint left in the CSV are
never averaged in. Accuracy is the integer engine's test accuracy; several seeds give mean ± sample std.
"""
from __future__ import annotations

import csv
import io
import os
import statistics
from pathlib import Path

from utils.io import REPO_ROOT, atomic_write_bytes

DATASET_LABEL = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def dataset_label(dataset: str, source: str = "") -> str:
    label = DATASET_LABEL.get(dataset, dataset)
    return f"{label} (JPEG copy)" if dataset == "cifar10" and source in ("", "jpeg-copy") else label

# The seed repository's README, "Experiment Results" (github.com/raywan-110/Quantization-DNNs, README.md at
# commit 7295f60): test accuracy in %, as its author rounded it. Another stored version of that README
# (commit 4d122fb) gives 72% for CIFAR-10 CNNs_BN and 55% for CIFAR-10 cnnBN_QAT at 8 bits; 7295f60 is the
# one whose figures the issues quote.
SEED_SOURCE = "[the seed repository's README](https://github.com/raywan-110/Quantization-DNNs) (commit 7295f60)"
SEED_FLOAT = {"fashion_mnist": {"cnn": 90, "cnn_bn": 90}, "cifar10": {"cnn": 69, "cnn_bn": 73}}
SEED_QUANT = {  # data set -> (model, "PTQ" | "QAT") -> {bits: accuracy}
    "fashion_mnist": {("cnn", "PTQ"): {4: 71, 6: 88, 8: 90}, ("cnn", "QAT"): {4: 81, 6: 90, 8: 91},
                      ("cnn_bn", "PTQ"): {4: 52, 6: 63, 8: 59}, ("cnn_bn", "QAT"): {4: 62, 6: 71, 8: 84}},
    "cifar10": {("cnn", "PTQ"): {4: 47, 6: 67, 8: 69}, ("cnn", "QAT"): {4: 47, 6: 67, 8: 69},
                ("cnn_bn", "PTQ"): {4: 42, 6: 45, 8: 57}, ("cnn_bn", "QAT"): {4: 43, 6: 53, 8: 59}},
}
SEED_BITS = (4, 6, 8)
SEED_MODEL = {"cnn": "cnn", "cnn_bn": "cnnBN"}  # the seed's row names: cnn_PTQ, cnnBN_QAT, ...
METHODS = ("ptq", "qat-ste", "qat-lsq")
DATASET_ORDER = ("fashion_mnist", "cifar10")
MODEL_ORDER = ("cnn", "cnn_bn")
PLOT_NAME = "accuracy_vs_bits.png"

Key = tuple[str, str, int, str]  # (data set, model, bits, method)


def read_results(path: Path) -> list[dict[str, str]]:
    """The rows of a results.csv written by reproduce.py ([] when there is none)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _key(row: dict[str, str]) -> Key:
    return row["dataset"], row["model"], int(row["bits"]), row["method"]


def _rank(name: str, preferred: tuple[str, ...]) -> tuple[int, str]:
    return (preferred.index(name) if name in preferred else len(preferred), name)


def _order(names, preferred: tuple[str, ...]) -> list[str]:
    return sorted(set(names), key=lambda n: _rank(n, preferred))


def select_runs(rows: list[dict[str, str]]) -> dict[Key, list[dict[str, str]]]:
    """(data set, model, bits, method) -> the runs of the latest settings group, one per seed (by seed)."""
    latest_group = {_key(r): r["group"] for r in rows}
    by_seed: dict[Key, dict[int, dict[str, str]]] = {}
    for r in rows:
        if r["group"] == latest_group[_key(r)]:
            by_seed.setdefault(_key(r), {})[int(r["seed"])] = r
    return {k: [v[s] for s in sorted(v)] for k, v in by_seed.items()}


def fmt_acc(runs: list[dict[str, str]] | None, field: str = "int_acc") -> str:
    """'89.76%' for one run, '89.76 ± 0.12%' (mean ± sample std) for several, '—' for none."""
    if not runs:
        return "—"
    values = [float(r[field]) for r in runs]
    if len(values) == 1:
        return f"{values[0]:.2f}%"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}%"


def _seed_fig(value: int | None) -> str:
    return "—" if value is None else f"{value}%"


def dataset_title(dataset: str, runs: dict[Key, list[dict[str, str]]]) -> str:
    """'Fashion-MNIST', 'CIFAR-10 (JPEG copy)' (by the rows' data_source), '... (synthetic data)' for dry runs."""
    source = next((rs[-1].get("data_source", "") for k, rs in runs.items() if k[0] == dataset), "")
    if source == "synthetic":
        return f"{DATASET_LABEL.get(dataset, dataset)} (synthetic data)"
    return dataset_label(dataset, source)


def float_runs(runs: dict[Key, list[dict[str, str]]], dataset: str, model: str) -> list[dict[str, str]] | None:
    """The float accuracy of (data set, model): the runs of its PTQ cell, else of any cell of it."""
    cells = [rs for k, rs in runs.items() if k[:2] == (dataset, model)]
    ptq = [rs for k, rs in runs.items() if k[:2] == (dataset, model) and k[3] == "ptq"]
    return (ptq or cells or [None])[-1]


def default_quantizer(bits: int) -> str:
    """QAT.py's default quantizer at ``bits`` now (utils.recipes.QAT_RECIPES). A row's settings other than the
    quantizer come from the same recipe, so the run of that quantizer is the default run."""
    from utils.recipes import QAT_RECIPES
    return QAT_RECIPES[bits]["quantizer"]


def default_qat(runs: dict[Key, list[dict[str, str]]], dataset: str, model: str,
                bits: int) -> list[dict[str, str]] | None:
    """The QAT runs with QAT.py's default quantizer at ``bits``."""
    return runs.get((dataset, model, bits, f"qat-{default_quantizer(bits)}"))


def seed_table(runs: dict[Key, list[dict[str, str]]], dataset: str) -> list[str]:
    """The seed README's table for ``dataset`` (rows cnn_PTQ, cnn_QAT, cnnBN_PTQ, cnnBN_QAT; bits 4, 6, 8),
    each cell 'ours / seed's', then one line of float accuracy."""
    models = _order([k[1] for k in runs if k[0] == dataset] + [m for m, _ in SEED_QUANT.get(dataset, {})], MODEL_ORDER)
    seed = SEED_QUANT.get(dataset, {})
    lines = ["| num_bits | " + " | ".join(str(b) for b in SEED_BITS) + " |",
             "| :-- |" + " :-: |" * len(SEED_BITS)]
    for model in models:
        for method in ("PTQ", "QAT"):
            cells = []
            for bits in SEED_BITS:
                ours = runs.get((dataset, model, bits, "ptq")) if method == "PTQ" else default_qat(runs, dataset, model, bits)
                cells.append(f"{fmt_acc(ours)} / {_seed_fig(seed.get((model, method), {}).get(bits))}")
            lines.append(f"| {SEED_MODEL.get(model, model)}_{method} | " + " | ".join(cells) + " |")
    floats = [f"{model} {fmt_acc(float_runs(runs, dataset, model), 'float_acc')} / "
              f"{_seed_fig(SEED_FLOAT.get(dataset, {}).get(model))}" for model in models]
    return lines + ["", "float model: " + ", ".join(floats)]


#: two means closer than this are equal (cnn_bn ≥ cnn holds, and the difference prints as +0.00)
TIE = 1e-9


def diff_std_error(a: list[float], b: list[float]) -> float | None:
    """Standard error of mean(b) - mean(a) over independent seeds, sqrt(s_a^2/n_a + s_b^2/n_b) with
    sample variances; None unless both have two or more values."""
    if len(a) < 2 or len(b) < 2:
        return None
    return sum(statistics.variance(v) / len(v) for v in (a, b)) ** 0.5


def fmt_diff(diff: float) -> str:
    """'+0.14'; three decimals where two would round to zero ('-0.004'), so the sign stays readable;
    '+0.00' for equal means (float noise below TIE included)."""
    if abs(diff) <= TIE:
        return "+0.00"
    return f"{diff:+.2f}" if abs(diff) >= 0.005 else f"{diff:+.3f}"


def bn_vs_plain_table(runs: dict[Key, list[dict[str, str]]]) -> list[str]:
    """cnn_bn against cnn after QAT with the default quantizer, at every bit width where both ran: the
    mean integer accuracy over the seeds run, the standard error of the difference of the means (how
    far seed-to-seed noise alone moves it), and whether cnn_bn is at least as good (issue #4)."""
    lines = ["| data set | bits | quantizer | cnn | cnn_bn | cnn_bn − cnn (means) | its standard error | cnn_bn ≥ cnn |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset in _order([k[0] for k in runs], DATASET_ORDER):
        for bits in sorted({k[2] for k in runs if k[0] == dataset}, reverse=True):
            plain, bn = default_qat(runs, dataset, "cnn", bits), default_qat(runs, dataset, "cnn_bn", bits)
            if not plain or not bn:
                continue
            plain_acc, bn_acc = ([float(r["int_acc"]) for r in runs] for runs in (plain, bn))
            diff = statistics.fmean(bn_acc) - statistics.fmean(plain_acc)
            se = diff_std_error(plain_acc, bn_acc)
            seeds = "" if len(plain) == len(bn) == 1 else f" ({len(plain)} / {len(bn)} seeds)"
            lines.append(f"| {dataset_title(dataset, runs)} | {bits} | {default_quantizer(bits)}{seeds} "
                         f"| {fmt_acc(plain)} | {fmt_acc(bn)} | {fmt_diff(diff)} | {'—' if se is None else f'{se:.2f}'} "
                         f"| {'yes' if diff >= -TIE else '**no**'} |")
    return lines if len(lines) > 2 else []


def seed_tables(runs: dict[Key, list[dict[str, str]]], heading: str) -> list[str]:
    """The seed-style table of every data set in the rows, each under ``heading.format(its title)``."""
    out: list[str] = []
    for dataset in _order([k[0] for k in runs], DATASET_ORDER):
        out += [heading.format(dataset_title(dataset, runs)), "", *seed_table(runs, dataset), ""]
    return out


def qat_default_note(runs: dict[Key, list[dict[str, str]]]) -> str:
    """Which quantizer the 'QAT' rows show at each bit width."""
    bits = sorted({k[2] for k in runs if k[3].startswith("qat")}, reverse=True)
    per_bits = ", ".join(f"{default_quantizer(b)} at {b} bits" for b in bits)
    return f"QAT = QAT.py with its default recipe and quantizer at that bit width ({per_bits or 'none run'})."


def full_table(runs: dict[Key, list[dict[str, str]]]) -> list[str]:
    """Integer accuracy of every (data set, model, method) at every bit width run."""
    bits = sorted({k[2] for k in runs})
    lines = ["| data set | model | method | float | " + " | ".join(f"{b} bits" for b in bits) + " |",
             "|---|---|---|---|" + "---|" * len(bits)]
    for dataset in _order([k[0] for k in runs], DATASET_ORDER):
        for model in _order([k[1] for k in runs if k[0] == dataset], MODEL_ORDER):
            for method in _order([k[3] for k in runs if k[:2] == (dataset, model)], METHODS):
                cells = [fmt_acc(runs.get((dataset, model, b, method))) for b in bits]
                lines.append(f"| {dataset_title(dataset, runs)} | {model} | {method} "
                             f"| {fmt_acc(float_runs(runs, dataset, model), 'float_acc')} | " + " | ".join(cells) + " |")
    return lines


def runs_table(runs: dict[Key, list[dict[str, str]]]) -> list[str]:
    """One line per cell: its settings, the three accuracies, agreement and wall time per run."""
    lines = ["| data set | model | bits | method | epochs | seeds | float | fake-quant | integer engine "
             "| fq/int agreement | wall time per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(runs, key=lambda k: (_rank(k[0], DATASET_ORDER), _rank(k[1], MODEL_ORDER), -k[2],
                                         _rank(k[3], METHODS))):
        rs = runs[k]
        seconds = statistics.fmean(float(r["cell_seconds"]) for r in rs)
        agreement = statistics.fmean(float(r["agreement"]) for r in rs)
        lines.append(f"| {dataset_title(k[0], runs)} | {k[1]} | {k[2]} | {k[3]} | {rs[-1].get('epochs') or '—'} "
                     f"| {','.join(r['seed'] for r in rs)} | {fmt_acc(rs, 'float_acc')} | {fmt_acc(rs, 'fq_acc')} "
                     f"| {fmt_acc(rs)} | {agreement:.2f}% | {seconds:.0f} s |")
    return lines


def render_results_md(rows: list[dict[str, str]], plot_name: str = PLOT_NAME) -> str:
    """RESULTS.md from results.csv rows: the seed README's tables side by side, all bits and methods, every run."""
    runs = select_runs(rows)
    if not runs:
        return "# Results\n\nNo runs yet: `python reproduce.py` writes them.\n"
    n_runs = sum(len(rs) for rs in runs.values())
    total = sum(float(r["cell_seconds"]) for rs in runs.values() for r in rs)
    out = ["# Results", "",
           f"Generated by `reproduce.py` from `results.csv` ({n_runs} runs); do not edit by hand "
           "(`python reproduce.py --report-only` rewrites it).", "",
           "## The seed repository's tables", "",
           f"Test accuracy of the integer-only engine. Each cell: **this project / {SEED_SOURCE}** "
           "(— where one of them has no figure). " + qat_default_note(runs) + " Both quantizers are in the full "
           "table below. Where QAT ran with several "
           "seeds, its cells show mean ± standard deviation over the seeds; PTQ runs once (seed 0: "
           "calibration is deterministic given its seed).", "",
           *seed_tables(runs, "### {}"),
           "## Every bit width and method", "",
           "Integer-engine test accuracy (ptq: PTQ.py; qat-ste / qat-lsq: QAT.py with that quantizer).", "",
           *full_table(runs), "",
           "## cnn_bn against cnn after QAT", "",
           "Default QAT quantizer at each bit width; several seeds give mean ± sample std.", "",
           *bn_vs_plain_table(runs), "",
           "## Every run", "",
           *runs_table(runs), "",
           f"Wall time of the {n_runs} runs above: {total / 60:.1f} min in all (each run a separate process, "
           "from start to exit).", "",
           f"![accuracy against bits]({plot_name})", ""]
    return "\n".join(out)


def render_reproduce(results_dir: Path) -> str:
    """README block: the seed-style tables from results_dir/results.csv, the plot and the command."""
    runs = select_runs(read_results(results_dir / "results.csv"))
    if not runs:
        return "No results yet: run `python reproduce.py`."
    rel = Path(os.path.relpath(results_dir, REPO_ROOT)).as_posix()
    return "\n".join([f"Test accuracy of the integer-only engine; each cell: **this project / {SEED_SOURCE}**. "
                      + qat_default_note(runs), "", *seed_tables(runs, "**{}**"),
                      f"![accuracy against bits]({rel}/{PLOT_NAME})", "",
                      "cnn_bn against cnn after QAT (default quantizer; mean ± std where several seeds ran):", "",
                      *bn_vs_plain_table(runs), "",
                      f"Both QAT quantizers, every bit width run, and each run's settings and wall time: "
                      f"[{rel}/RESULTS.md]({rel}/RESULTS.md), generated from `{rel}/results.csv` by "
                      "`python reproduce.py`."])


def plot_accuracy_vs_bits(rows: list[dict[str, str]], path: Path) -> None:
    """accuracy_vs_bits.png: one panel per data set, integer accuracy against bits per model × method
    (error bars: std over seeds), the float model's accuracy as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = select_runs(rows)
    datasets = _order([k[0] for k in runs], DATASET_ORDER) or ["none"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.0), squeeze=False)
    colours = {"cnn": ("#08306b", "#2171b5", "#6baed6"), "cnn_bn": ("#7f2704", "#d94801", "#fd8d3c")}
    markers = {"ptq": "o", "qat-ste": "s", "qat-lsq": "^"}
    for ax, dataset in zip(axes[0], datasets):
        models = _order([k[1] for k in runs if k[0] == dataset], MODEL_ORDER)
        for mi, model in enumerate(models):
            shades = colours.get(model, ("C%d" % (3 * mi), "C%d" % (3 * mi + 1), "C%d" % (3 * mi + 2)))
            fl = float_runs(runs, dataset, model)
            if fl:
                ax.axhline(statistics.fmean(float(r["float_acc"]) for r in fl), color=shades[0], ls="--", lw=1,
                           label=f"{model} float")
            for ci, method in enumerate(_order([k[3] for k in runs if k[:2] == (dataset, model)], METHODS)):
                pts = sorted((k[2], rs) for k, rs in runs.items() if k[:2] == (dataset, model) and k[3] == method)
                means = [statistics.fmean(float(r["int_acc"]) for r in rs) for _, rs in pts]
                stds = [statistics.stdev(float(r["int_acc"]) for r in rs) if len(rs) > 1 else 0.0 for _, rs in pts]
                ax.errorbar([b for b, _ in pts], means, yerr=stds, color=shades[min(ci, 2)],
                            marker=markers.get(method, "x"), capsize=3, lw=1.5, label=f"{model} {method}")
        ax.set_title(dataset_title(dataset, runs) if runs else "no runs")
        ax.set_xlabel("bits (weights and activations)")
        ax.set_ylabel("test accuracy, integer engine (%)")
        ax.set_xticks(sorted({k[2] for k in runs if k[0] == dataset}) or [8])
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_results(out_dir: Path) -> list[Path]:
    """Rewrite out_dir/RESULTS.md and out_dir/accuracy_vs_bits.png from out_dir/results.csv."""
    rows = read_results(out_dir / "results.csv")
    md, png = out_dir / "RESULTS.md", out_dir / PLOT_NAME
    atomic_write_bytes(md, render_results_md(rows).encode())
    plot_accuracy_vs_bits(rows, png)
    return [md, png]
