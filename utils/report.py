"""Regenerate README's tables from the CSV files under results/ (never type figures by hand).

    python -m utils.report          # rewrites the blocks between <!-- begin:NAME --> and <!-- end:NAME -->

Each block NAME has a renderer below that reads only files under results/.
"""
from __future__ import annotations

import csv
import functools
import re
import sys
from pathlib import Path
from typing import Callable

from utils.cli import format_match
from utils.io import REPO_ROOT, atomic_write_bytes
from utils.results_tables import DATASET_LABEL, dataset_label, default_quantizer, render_reproduce

def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@functools.lru_cache(maxsize=None)
def ckpt_record(rel_path: str) -> tuple[int | None, int, float] | None:
    """(seed, epoch, test accuracy) recorded in the checkpoint at ``rel_path`` (from the repository root),
    None where it is missing; each file is loaded once per report."""
    path = REPO_ROOT / rel_path
    if not path.exists():
        return None
    import torch
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["config"].get("seed"), ckpt["epoch"], float(ckpt["metrics"]["test_acc"])


def shipped(row: dict[str, str]) -> bool:
    """Whether ``row`` is the run that wrote the checkpoint now in ckpt/ (same seed, epochs, accuracy)."""
    record = ckpt_record(row["checkpoint"]) if row["checkpoint"].startswith("ckpt/") else None
    return (record is not None and record[0] == int(row["seed"]) and record[1] == int(row["epochs"])
            and round(record[2], 2) == float(row["test_acc"]))


def shipped_float_acc(dataset: str, model: str) -> float | None:
    """Test accuracy recorded in ckpt/<dataset>_<model>.pt (None where it is missing)."""
    record = ckpt_record(f"ckpt/{dataset}_{model}.pt")
    return None if record is None else record[2]


def from_shipped(row: dict[str, str]) -> bool:
    """Whether a PTQ.py / QAT.py row quantized the checkpoint now in ckpt/ (its float accuracy is that
    checkpoint's): rows of a checkpoint since retrained stay in the CSV but leave README's tables."""
    acc = shipped_float_acc(row["dataset"], row["model"])
    return row["float_ckpt"].startswith("ckpt/") and acc is not None and abs(float(row["float_acc"]) - acc) < 0.015


def render_train(results: Path) -> str:
    """The run behind each shipped checkpoint (the latest matching row per data set and model)."""
    latest: dict[tuple[str, str], dict[str, str]] = {}
    for row in read_rows(results / "train.csv"):
        if shipped(row):
            latest[(row["dataset"], row["model"])] = row
    lines = ["| data set | model | test acc | seed | epochs | lr | batch | weight decay | label smoothing | augment "
             "| distilled from (weight, T) | precision | run time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, model), r in sorted(latest.items(), key=lambda kv: (kv[0][0] != "fashion_mnist", kv[0][1])):
        lines.append(f"| {dataset_label(ds, r.get('data_source', ''))} | {model} | {float(r['test_acc']):.2f}% | {r['seed']} | {r['epochs']} "
                     f"| {r['lr']} | {r['batch_size']} | {r['weight_decay']} | {r['label_smoothing']} "
                     f"| {r['augment'] or 'none'} | {distilled_from(r)} | {r.get('precision') or 'fp32'} "
                     f"| {float(r['run_seconds']) / 60:.1f} min |")
    return "\n".join(lines)


def distilled_from(row: dict[str, str]) -> str:
    """The teacher column of a train.csv row: its checkpoint(s), weight and temperature, or 'none'."""
    if not row.get("teacher") or not float(row.get("kd_weight") or 0):
        return "none"
    return f"`{row['teacher']}` ({float(row['kd_weight']):g}, {float(row['kd_temp']):g})"


def render_epoch_time(results: Path) -> str:
    """Latest benchmark row per data set and model from bench/epoch_time.py, with the bfloat16 epoch's time as a
    ratio to the float one (method bf16) and the epoch time with the recipe's distillation teacher (method kd),
    each measured in the same run where there is one."""
    rows = read_rows(results / "epoch_time.csv")
    latest = {(r["dataset"], r["model"]): r for r in rows if r.get("method", "float") in ("", "float")}
    beside = {(r["dataset"], r["model"], r["git_commit"], r["repeats"], r["method"]): r for r in rows
              if r.get("method") in ("kd", "bf16")}
    lines = ["| data set | model | s / epoch (median) | bf16 / float | with the recipe's teacher | loader only, img/s "
             "| training, img/s | threads |",
             "|---|---|---|---|---|---|---|---|"]
    for (ds, model), r in sorted(latest.items(), key=lambda kv: (kv[0][0] != "fashion_mnist", kv[0][1])):
        bf16, kd = (beside.get((ds, model, r["git_commit"], r["repeats"], m)) for m in ("bf16", "kd"))
        ratio = f"{float(bf16['ratio_vs_float']):.2f}" if bf16 else "—"
        lines.append(f"| {DATASET_LABEL[ds]} | {model} | {r['epoch_s']} | {ratio} "
                     f"| {kd['epoch_s'] if kd else '—'} | {int(r['loader_img_per_s']):,} | {int(r['train_img_per_s']):,} "
                     f"| {r['threads']} |")
    return "\n".join(lines)


def default_granularity(r: dict[str, str]) -> bool:
    """A row of the tables' weight granularity: per-channel conv weights, per-tensor fully-connected weights
    (rows written before ``fc_per_channel`` existed have no such column and were per tensor)."""
    return r["per_channel"] == "True" and r.get("fc_per_channel", "False") != "True"


def render_ptq(results: Path) -> str:
    """PTQ.py rows with per-channel weights and ref rounding from the shipped checkpoints: the latest
    per data set, model, bits and observer; the default observer (mse) in full, minmax beside it."""
    latest: dict[tuple[str, str, int, str], dict[str, str]] = {}
    for r in read_rows(results / "ptq.csv"):
        plain = (not r.get("methods") and not r.get("layers") and r.get("act_bits", r["weight_bits"]) == r["weight_bits"]
                 and r.get("percentile") in (None, "", "99.99"))
        if plain and default_granularity(r) and r["rounding"] == "ref" and from_shipped(r):
            latest[(r["dataset"], r["model"], int(r["bits"]), r["observer"])] = r
    lines = ["| data set | model | bits | float | fake-quant | integer engine | Δ vs float | fq/int argmax agreement "
             "| fake-quant with minmax ranges | fake-quant rounding once per layer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({k[:3] for k in latest if k[3] == "mse"}, key=lambda k: (k[0] != "fashion_mnist", k[1], -k[2]))
    for ds, model, bits in keys:
        r = latest[(ds, model, bits, "mse")]
        mm = latest.get((ds, model, bits, "minmax"))
        mm_acc = f"{float(mm['fq_acc']):.2f}%" if mm else "—"
        delta = float(r["fq_acc"]) - float(r["float_acc"])
        lines.append(f"| {dataset_label(ds, r.get('data_source', ''))} | {model} | {bits} | {float(r['float_acc']):.2f}% "
                     f"| {float(r['fq_acc']):.2f}% | {float(r['int_acc']):.2f}% | {delta:+.2f} "
                     f"| {float(r['agreement']):.2f}% | {mm_acc} | {float(r['fq_float_acc']):.2f}% |")
    return "\n".join(lines)


def render_ptq_methods(results: Path) -> str:
    """PTQ.py --compare rows (results/ptq_methods.csv) from the shipped checkpoints: the latest per data set,
    model, bit widths and method; integer-engine test accuracy and the method's wall time."""
    from quant.ptq import COMPARISON
    names = [name for name, _, _ in COMPARISON]
    latest: dict[tuple[str, str, str], dict[str, dict[str, str]]] = {}
    for r in read_rows(results / "ptq_methods.csv"):
        if default_granularity(r) and r["rounding"] == "ref" and from_shipped(r) and not r.get("layers"):
            latest.setdefault((r["dataset"], r["model"], f"W{r['weight_bits']}A{r['act_bits']}"), {})[r["name"]] = r
    if not latest:
        return "(no rows yet: run python PTQ.py --compare)"
    lines = ["| data set | model | bits | float | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    order = ["W8A8", "W4A8", "W4A4", "W3A3"]
    for (ds, model, wa), by in sorted(latest.items(), key=lambda kv: (kv[0][0] != "fashion_mnist", kv[0][1],
                                                                      order.index(kv[0][2]) if kv[0][2] in order
                                                                      else len(order), kv[0][2])):
        any_row = next(iter(by.values()))
        cells = [f"{float(by[n]['int_acc']):.2f}% ({float(by[n]['seconds']):.0f} s)" if n in by else "—" for n in names]
        lines.append(f"| {dataset_label(ds, any_row.get('data_source', ''))} | {model} | {wa} "
                     f"| {float(any_row['float_acc']):.2f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_int_speed(results: Path) -> str:
    """Latest bench/int_engine.py row per data set, model, bits, rounding and CPU chunk size (rows from before
    the engine ran in chunks have no chunk_elements and are left out)."""
    latest = {(r["dataset"], r["model"], r["bits"], r["rounding"], int(r["chunk_elements"])): r
              for r in read_rows(results / "int_engine_speed.csv") if r.get("chunk_elements")}
    lines = ["| data set | model | bits | rounding | engine chunks (elements of the largest tensor) | float model "
             "| integer engine | images/s float / integer | integer / float |", "|---|---|---|---|---|---|---|---|---|"]
    for (ds, model, bits, rnd, chunk), r in sorted(latest.items()):
        lines.append(f"| {DATASET_LABEL[ds]} | {model} | {bits} | {rnd} | {f'{chunk:,}' if chunk else 'none (batch 1000)'} "
                     f"| {r['float_s']} s | {r['int_s']} s | {int(r['float_img_per_s']):,} / {int(r['int_img_per_s']):,} "
                     f"| {r['int_over_float']} |")
    return "\n".join(lines)


#: the bar for QAT accuracy: the most a default run may lose against the float model, by bits (and data
#: set at 4 bits; issue #4, the seed's nets), or by model and bits (issue #17, the CIFAR-10 zoo); 3 and 2
#: bits are reported only
QAT_MAX_DROP = {8: 0.2, 6: 0.5, (4, "fashion_mnist"): 1.0, (4, "cifar10"): 3.0}
ZOO_QAT_MAX_DROP = {"resnet8": {8: 0.3, 6: 0.5, 4: 3.0}, "resnet20": {8: 0.3, 6: 0.5, 4: 2.0},
                    "mobilenetv2": {8: 0.5, 6: 1.0, 4: 3.0}}


def qat_bar(dataset: str, bits: int, model: str = "") -> float | None:
    if model in ZOO_QAT_MAX_DROP:
        return ZOO_QAT_MAX_DROP[model].get(bits)
    return QAT_MAX_DROP.get(bits, QAT_MAX_DROP.get((bits, dataset)))


def _distilled(row: dict[str, str]) -> str:
    """'—', or the distillation weight and temperature of a QAT row ('0.5, T 4')."""
    weight = float(row.get("kd_weight") or 0)
    return "—" if weight == 0 else f"{weight:g}, T {float(row.get('kd_temp') or 1):g}"


def shipped_qat_run(r: dict[str, str]) -> bool:
    """A QAT.py row of the tables: fine-tuned from the shipped checkpoint (not from scratch) with the tables'
    weight granularity, ref rounding and seed 0 (the default command's)."""
    return (default_granularity(r) and r["rounding"] == "ref" and from_shipped(r) and r["from_scratch"] == "False"
            and r["seed"] == "0")


def render_qat(results: Path) -> str:
    """QAT.py rows fine-tuned from the shipped checkpoints (per-channel, ref rounding): the latest per
    data set, model, bits and quantizer, with the bar of issue #4 (#17 for the zoo) where it sets one (for
    the default quantizer of that bit width, utils.recipes.QAT_RECIPES). Seed 0 only, the default command's:
    reproduce.py --seeds N adds rows of other seeds, which RESULTS.md averages."""
    latest: dict[tuple[str, str, int, str], dict[str, str]] = {}
    for r in read_rows(results / "qat.csv"):
        if shipped_qat_run(r) and not r.get("layers"):
            latest[(r["dataset"], r["model"], int(r["bits"]), r["quantizer"])] = r
    lines = ["| data set | model | bits | quantizer | epochs | lr | distilled | float | PTQ start | QAT fake-quant "
             "| integer engine | Δ vs float | bar (default quantizer) | fq/int agreement | wall time | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, model, bits, qz), r in sorted(latest.items(), key=lambda kv: (kv[0][0] != "fashion_mnist", kv[0][1],
                                                                          -kv[0][2], kv[0][3])):
        delta = float(r["int_acc"]) - float(r["float_acc"])
        bar = qat_bar(ds, bits, model)
        if qz != default_quantizer(bits):
            bar_txt = f"(default is {default_quantizer(bits)})"
        elif bar is None:
            bar_txt = "report"
        else:
            bar_txt = f"≥ −{bar:.1f} {'met' if delta >= -bar - 1e-9 else '**not met**'}"
        lines.append(f"| {dataset_label(ds, r.get('data_source', ''))} | {model} | {bits} | {qz} | {r['epochs']} "
                     f"| {r['lr']} | {_distilled(r)} | {float(r['float_acc']):.2f}% | {float(r['ptq_fq_acc']):.2f}% "
                     f"| {float(r['fq_acc']):.2f}% | {float(r['int_acc']):.2f}% | {delta:+.2f} | {bar_txt} "
                     f"| {float(r['agreement']):.2f}% | {float(r['seconds']) / 60:.1f} min | {r['git_commit']} |")
    return "\n".join(lines)


#: published ResNet-20 CIFAR-10 QAT figures (issue #17), each with the source it was read from and the convention
#: that differs from this project's (every tensor on a uniform int grid): (method, source, convention, float
#: accuracy, {bits of weights and activations: accuracy}). LQ-Nets' CIFAR-10 table could not be read here.
PUBLISHED_RESNET20 = (
    ("PACT (Choi et al. 2018)", "arXiv:1805.06085, Table 1", "first and last layers not quantized", 91.6,
     {4: 91.3, 3: 91.1, 2: 89.7}),
    ("DoReFa, as run by PACT", "arXiv:1805.06085, Table 1", "first and last layers not quantized", 91.6,
     {4: 90.5, 3: 89.9, 2: 88.2}),
    ("APoT (Li et al. 2020), released models", "github.com/yhhhli/APoT_Quantization, README", "non-uniform levels "
     "(additive powers of two); first conv and last fc weights at 8 bits, their inputs float", 92.96,
     {4: 92.45, 3: 92.49, 2: 90.96}),
)


def _published_cell(acc: float, fp: float) -> str:
    """'91.3 (-0.3)': a published accuracy and its change from the float model, at the paper's precision."""
    decimals = max(len(repr(v).partition(".")[2]) for v in (acc, fp))
    return f"{acc:.{decimals}f} ({acc - fp:+.{decimals}f})"


@functools.lru_cache(maxsize=None)
def first_last_layers(dataset: str, model: str, bits: int = 8) -> str:
    """The ``layers`` column of a row made with --first-last ``bits`` (quant.first_last's settings)."""
    import quant
    from models import build_model
    cfg = quant.QuantConfig(layers=quant.first_last(build_model(model, dataset), bits))
    return cfg.to_row()["layers"]


def render_resnet20_published(results: Path) -> str:
    """ResNet-20 on CIFAR-10: the published QAT figures (PUBLISHED_RESNET20) beside this project's QAT.py rows
    with the default quantizer from the shipped checkpoint (seed 0, ref rounding), every tensor quantized and
    with --first-last 8; each cell the integer engine's accuracy and its difference from the float model."""
    ours: dict[tuple[str, int], dict[str, str]] = {}
    everything = "every tensor quantized, uniform integer levels"
    first_last = "first and last layers at 8 bits (`--first-last 8`)"
    for r in read_rows(results / "qat.csv"):
        if ((r["dataset"], r["model"]) != ("cifar10", "resnet20") or not shipped_qat_run(r)
                or r["quantizer"] != default_quantizer(int(r["bits"]))):
            continue
        kind = {"": everything, first_last_layers("cifar10", "resnet20"): first_last}.get(r.get("layers") or "")
        if kind:
            ours[(kind, int(r["bits"]))] = r
    lines = ["| method | source | convention | float | W/A 4 bits | 3 bits | 2 bits |", "|---|---|---|---|---|---|---|"]
    for name, source, convention, fp, accs in PUBLISHED_RESNET20:
        cells = [_published_cell(accs[b], fp) if b in accs else "—" for b in (4, 3, 2)]
        lines.append(f"| {name} | {source} | {convention} | {fp:g} | {' | '.join(cells)} |")
    for kind in (everything, first_last):
        rows = {b: r for (k, b), r in ours.items() if k == kind}
        if not rows:
            continue
        fp = float(next(iter(rows.values()))["float_acc"])
        cells = [f"{float(rows[b]['int_acc']):.2f} ({float(rows[b]['int_acc']) - float(rows[b]['float_acc']):+.2f})"
                 if b in rows else "not run" for b in (4, 3, 2)]
        lines.append(f"| this project, QAT.py (default quantizer) | results/qat.csv | {kind} | {fp:.2f} "
                     f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def render_qat_epoch_time(results: Path) -> str:
    """bench/epoch_time.py --methods float ste lsq: QAT epoch time against the float epoch measured beside it."""
    latest = {(r["dataset"], r["model"], r["method"]): r for r in read_rows(results / "epoch_time.csv")
              if r.get("method") in ("ste", "lsq") and r.get("ratio_vs_float")}
    lines = ["| data set | model | quantizer | s / epoch (median) | × float epoch (same run) | threads |",
             "|---|---|---|---|---|---|"]
    for (ds, model, method), r in sorted(latest.items(), key=lambda kv: (kv[0][0] != "fashion_mnist", kv[0][1:])):
        lines.append(f"| {DATASET_LABEL[ds]} | {model} | {method} | {r['epoch_s']} | {float(r['ratio_vs_float']):.2f} "
                     f"| {r['threads']} |")
    return "\n".join(lines)


def render_export(results: Path) -> str:
    """export.py --verify rows (integer models, b-bit clamps): the latest per data set, model, bits and
    exported checkpoint (its file name says how it was quantized)."""
    latest = {(r["dataset"], r["model"], int(r["bits"]), Path(r["source"]).name): r
              for r in read_rows(results / "export_verify.csv")
              if r.get("match_ref") and r.get("clamp", "bits") == "bits" and r.get("int8_input") == "False"}
    lines = ["| data set | model | bits | exported checkpoint | images | int8 logits equal: BUILTIN_REF | BUILTIN (ruy) | XNNPACK | TFLM "
             "| LiteRT accuracy (XNNPACK) | engine accuracy (ref rounding) | flash: .tflite bytes "
             "| TFLM arena bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def opt(r: dict[str, str], key: str, fmt: Callable[[str], str]) -> str:
        return fmt(r[key]) if r.get(key) else "—"

    for (ds, model, bits, name), r in sorted(latest.items(), key=lambda kv: (kv[0][0] != "fashion_mnist", kv[0][1],
                                                                             -kv[0][2], len(kv[0][3]))):
        lines.append(f"| {dataset_label(ds, r.get('data_source', ''))} | {model} | {bits} | `{name}` | {int(r['images']):,} "
                     f"| {format_match(float(r['match_ref']))} | {format_match(float(r['match_builtin']))} "
                     f"| {format_match(float(r['match_xnnpack']))} "
                     f"| {opt(r, 'match_tflm', lambda v: format_match(float(v)))} "
                     f"| {float(r['tflite_acc']):.2f}% | {float(r['int_acc_ref']):.2f}% | {int(r['bytes']):,} "
                     f"| {opt(r, 'arena_bytes', lambda v: f'{int(v):,}')} |")
    return "\n".join(lines)


INFERENCE_BACKENDS = (("pytorch_fp32", "PyTorch fp32"), ("int_engine", "integer engine"),
                      ("litert_fp32", "LiteRT fp32"), ("litert_int8", "LiteRT int8 (XNNPACK)"))


def render_inference(results: Path) -> str:
    """bench/inference.py: the latest run of each model, per thread count, latency at batch 1 and throughput
    at batch 256 for each backend, the int8 speed-up over PyTorch and the int8 / float file size
    (* where XNNPACK left part of the int8 graph to the builtin kernels)."""
    rows = read_rows(results / "inference_speed.csv")
    if not rows:
        return "(no rows yet: run python bench/inference.py)"
    last = {}
    for r in rows:
        last[(r["dataset"], r["model"])] = max(last.get((r["dataset"], r["model"]), ""), r["run_id"])
    by = {(r["dataset"], r["model"], r["threads"], r["backend"]): r for r in rows
          if r["run_id"] == last[(r["dataset"], r["model"])]}
    head = " | ".join(f"{label}: ms/img b1, img/s b256" for _, label in INFERENCE_BACKENDS)
    lines = [f"| data set | model | threads | {head} | LiteRT int8 vs PyTorch, b1 | int8 / fp32 .tflite bytes |",
             "|---|---|---|" + "---|" * len(INFERENCE_BACKENDS) + "---|---|"]
    keys = sorted({k[:3] for k in by}, key=lambda k: (k[0] != "fashion_mnist", k[1], k[2]))
    for ds, model, threads in keys:
        cells = []
        for backend, _ in INFERENCE_BACKENDS:
            r = by.get((ds, model, threads, backend))
            star = "*" if r and r.get("xnnpack_partial") == "True" else ""
            cells.append(f"{float(r['latency_ms_b1']):.3f}, {float(r['img_per_s_b256']):,.0f}{star}" if r else "—")
        int8 = by.get((ds, model, threads, "litert_int8"), {})
        lines.append(f"| {DATASET_LABEL[ds]} | {model} | {threads} | {' | '.join(cells)} "
                     f"| {float(int8.get('speedup_b1_vs_pytorch') or 'nan'):.1f}× "
                     f"| {float(int8.get('int8_over_float_bytes') or 'nan'):.3f} |")
    for run in sorted(set(last.values())):
        r = next(r for r in rows if r["run_id"] == run)
        lines.append(f"\nRun {run}, 1-minute load average at its start: {r.get('load_avg_1min', '?')} "
                     f"on {r.get('cores', '?')} cores.")
    return "\n".join(lines)


def render_distributed(results: Path) -> str:
    """bench/distributed.py: the latest epoch time per script, model and process count, with the speed-up
    over one process measured in the same run."""
    latest = {(r["script"], r["dataset"], r["model"], r["processes"]): r
              for r in read_rows(results / "distributed_epoch_time.csv")}
    lines = ["| script | data set | model | processes × threads | device | s / epoch (median) | speed-up vs 1 process |",
             "|---|---|---|---|---|---|---|"]
    for (script, ds, model, n), r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1] != "fashion_mnist",
                                                                            kv[0][2], int(kv[0][3]))):
        lines.append(f"| {script} | {DATASET_LABEL[ds]} | {model} | {n} × {r['threads_per_process']} | {r['device']} "
                     f"| {r['epoch_s']} | {float(r['speedup_vs_1']):.2f}× |")
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[Path], str]] = {"train": render_train, "epoch_time": render_epoch_time,
                                               "ptq": render_ptq, "ptq_methods": render_ptq_methods,
                                               "int_speed": render_int_speed,
                                               "qat": render_qat, "qat_epoch_time": render_qat_epoch_time,
                                               "resnet20_published": render_resnet20_published,
                                               "export": render_export, "inference": render_inference,
                                               "reproduce": render_reproduce, "distributed": render_distributed}


def update_docs(results: Path = REPO_ROOT / "results") -> list[str]:
    """Regenerate the tables of README.md and of the notes (notes/*.md); returns 'file:block' per table."""
    done = []
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "notes").glob("*.md"))]:
        done += [f"{path.relative_to(REPO_ROOT)}:{name}" for name in update_readme(path, results)]
    return done


def update_readme(readme: Path = REPO_ROOT / "README.md", results: Path = REPO_ROOT / "results") -> list[str]:
    """Replace every known block in ``readme``; returns the names of the blocks rewritten."""
    text = readme.read_text()
    done = []
    for name, render in RENDERERS.items():
        pattern = re.compile(rf"(<!-- begin:{name} -->\n).*?(<!-- end:{name} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + render(results) + "\n" + m.group(2), text)
            done.append(name)
    if done:
        atomic_write_bytes(readme, text.encode())
    return done


if __name__ == "__main__":
    print("updated blocks:", ", ".join(update_docs()) or "none")
    sys.exit(0)
