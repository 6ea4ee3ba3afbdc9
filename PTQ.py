"""Post-training quantization of a shipped float checkpoint, evaluated three ways.

    python PTQ.py --dataset fashion_mnist --model cnn --bits 8
    python PTQ.py --dataset cifar10 --model cnn_bn --bits 4 --observer ema --calib-batches 64 --json

Loads ckpt/<dataset>_<model>.pt, quantizes every tensor (input, weights, activations) at B bits with
quant.quantize, calibrates the activation ranges on training batches, converts to the integer-only
engine, and evaluates on the test set: float, fake-quant and integer accuracy, and the share of test
images where fake-quant and integer argmax agree; also the accuracy of fake quantization that rounds
once per layer (round(y / s_out)) instead of like the runtime. Appends one row to runs/ptq.csv
(git-ignored; --results-dir results: the tracked table) and saves the integer model to
results/ckpt/ptq_<dataset>_<model>_<tag>_<observer>.pt (git-ignored; with --weight-range mse:
..._<observer>-wmse.pt). The quantization defaults are quant.QuantConfig's, so the Python API gives
the same figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import quant
from data import Loader
from quant.adaround import AdaRoundConfig
from utils.args import ptq_parser, results_file
from utils.cli import CLIError, one_line_errors, resolve_device, set_seed
from utils.io import append_csv_row, versions
from utils.pipeline import flag_layers, load_float_model, make_data, print_table, ptq_ckpt_path, write_outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return ptq_parser(__doc__).parse_args(argv)  # the flags: utils/args.py


def quant_config(args: argparse.Namespace, model: torch.nn.Module) -> quant.QuantConfig:
    """The QuantConfig of the command line (``model``: for --first-last)."""
    return quant.QuantConfig(weight_bits=args.weight_bits or args.bits, act_bits=args.act_bits or args.bits,
                             per_channel=not args.per_tensor, fc_per_channel=args.fc_per_channel,
                             observer=args.observer, weight_range=args.weight_range,
                             percentile=args.percentile, calib_batches=args.calib_batches, rounding=args.rounding,
                             layers=flag_layers(args, model))


@one_line_errors
def main() -> int:
    args = parse_args()
    entries = comparison_entries(args.compare) if args.compare else []  # a bad name fails before any loading
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    set_seed(args.seed)
    model, ckpt_path = load_float_model(args)
    model = model.to(device)
    cfg = quant_config(args, model)
    methods = quant.ptq_methods(args.methods)
    calib, test = make_data(args, device)

    if args.compare:
        return compare_methods(args, entries, model, cfg, calib, test, ckpt_path, device)
    if args.analyze:
        return analyze(args, model, cfg, methods, calib, test, ckpt_path)
    t1 = time.perf_counter()
    qmodel = quant.ptq(model, cfg, calib, methods, AdaRoundConfig(iterations=args.adaround_iters), progress=True)
    ptq_seconds = time.perf_counter() - t1
    imodel = quant.convert(qmodel)
    single = copy.deepcopy(qmodel)  # the usual fake quantization: round(y / s_out), one rounding per layer
    quant.set_requant(single, "float")
    res = quant.compare(test, {"float": model, "fq": qmodel, "int": imodel, "fq_float": single},
                        agree=("fq", "int"), progress=True)

    row = {"dataset": args.dataset, "model": args.model, "bits": args.bits, **cfg.to_row(), "tag": cfg.tag,
           "methods": "+".join(methods), "ptq_seconds": round(ptq_seconds, 1),
           "calib_batch_size": args.calib_batch_size, "seed": args.seed,
           "float_acc": round(res["float_acc"], 2), "fq_acc": round(res["fq_acc"], 2),
           "int_acc": round(res["int_acc"], 2), "agreement": round(res["agreement"], 3),
           "fq_float_acc": round(res["fq_float_acc"], 2),
           "int_seconds": round(res["int_seconds"], 2), "fq_seconds": round(res["fq_seconds"], 2),
           "float_seconds": round(res["float_seconds"], 2),
           "seconds": round(time.perf_counter() - t0, 1), "data_source": test.source, "float_ckpt": ckpt_path,
           "device": str(device), **versions()}
    print_table(row)
    write_outputs(args, imodel, row, "ptq", Path(args.out) if args.out else ptq_ckpt_path(args.dataset, args.model,
                                                                                          cfg, methods))
    return 0


def comparison_entries(names: str) -> list:
    """The quant.COMPARISON entries named in ``names`` ('all', or names separated by ';')."""
    if names == "all":
        return list(quant.COMPARISON)
    wanted = [n.strip() for n in names.split(";") if n.strip()]
    known = {entry[0]: entry for entry in quant.COMPARISON}
    bad = [n for n in wanted if n not in known]
    if bad or not wanted:
        raise quant.QuantError(f"--compare: unknown comparison {'; '.join(bad) or names!r}; choose from "
                               f"{'; '.join(known)} (or give no name for all)")
    return [known[n] for n in wanted]


def compare_methods(args: argparse.Namespace, entries: list, model: torch.nn.Module, cfg: quant.QuantConfig,
                    calib: Loader, test: Loader, ckpt_path: str, device: torch.device) -> int:
    """PTQ.py --compare: each of ``entries`` (``comparison_entries``) from the same float model and calibration data; integer-engine
    test accuracy and wall time of each, one table, one row each in ptq_methods.csv (utils.args.results_file)."""
    import dataclasses
    rows, csv_path = [], results_file(args, "ptq_methods.csv")
    float_acc = quant.compare(test, {"float": model})["float_acc"]
    for name, fields, methods in entries:
        set_seed(args.seed)
        c = dataclasses.replace(cfg, **fields)
        t1 = time.perf_counter()
        qmodel = quant.ptq(model, c, calib, methods, AdaRoundConfig(iterations=args.adaround_iters))
        imodel = quant.convert(qmodel)
        seconds = time.perf_counter() - t1
        acc = quant.compare(test, {"int": imodel})["int_acc"]
        row = {"dataset": args.dataset, "model": args.model, "name": name, **c.to_row(), "tag": c.tag,
               "methods": "+".join(methods), "adaround_iters": args.adaround_iters, "calib_batch_size":
               args.calib_batch_size, "seed": args.seed, "float_acc": round(float_acc, 2), "int_acc": round(acc, 2),
               "seconds": round(seconds, 1), "data_source": test.source, "float_ckpt": ckpt_path,
               "device": str(device), **versions()}
        rows.append(row)
        print(f"{name:<36} {acc:6.2f}%  ({acc - float_acc:+.2f})  {seconds:6.1f} s", flush=True)
        if csv_path is not None:
            append_csv_row(csv_path, row)
    if args.json:
        print(json.dumps(rows))
    return 0


def analyze(args: argparse.Namespace, model: torch.nn.Module, cfg: quant.QuantConfig, methods: tuple[str, ...],
            calib: Loader, test: Loader, ckpt_path: str) -> int:
    """PTQ.py --analyze: the sensitivity table and the greedy weight-bits search (quant.sensitivity)."""
    import dataclasses
    from quant.sensitivity import layer_settings
    from utils.plots import plot_sensitivity
    try:
        widths = sorted({int(b) for b in args.search_bits.split(",")}, reverse=True)
    except ValueError:
        raise CLIError(f"--search-bits takes a comma list of bit widths, e.g. 8,6,4; got {args.search_bits!r}")
    qmodel = quant.ptq(model, cfg, calib, methods, AdaRoundConfig(iterations=args.adaround_iters))
    float_acc = quant.compare(test, {"float": model})["float_acc"]
    rows = quant.layer_sensitivity(qmodel, calib, labelled=test)
    print(f"\n{'layer':<24} {'weights':>8} {'w/a bits':>9} {'SQNR alone':>11} {'cumulative':>11} {'acc alone':>10}")
    common = {"dataset": args.dataset, "model": args.model, **cfg.to_row(), "tag": cfg.tag, "methods": "+".join(methods),
              "float_acc": round(float_acc, 2), "float_ckpt": ckpt_path, "data_source": test.source, **versions()}
    for r in rows:
        print(f"{r['layer']:<24} {r['weights']:>8,} {r['weight_bits']:>4}/{r['act_bits']:<4} {r['sqnr_alone_db']:>8.2f} dB "
              f"{r['sqnr_cumulative_db']:>8.2f} dB {r['acc_alone']:>9.2f}%")
    steps = quant.greedy_weight_bits(qmodel, calib, widths)
    print(f"\ngreedy weight bits ({','.join(map(str, widths))}), activations at {cfg.act_bits} bits:")
    for i, st in enumerate(steps):
        c = dataclasses.replace(cfg, layers=cfg.layers + layer_settings(st["bits"]))
        st["int_acc"] = round(quant.compare(test, {"int": quant.convert(quant.ptq(model, c, calib, methods,
                              AdaRoundConfig(iterations=args.adaround_iters)))})["int_acc"], 2)
        st["float_acc"] = round(float_acc, 2)
        print(f"  step {i:>2}: {st['weight_bytes'] / 1024:8.2f} KiB  SQNR {st['sqnr_db']:6.2f} dB  "
              f"{st['int_acc']:6.2f}%  " + " ".join(f"{p}:{b}" for p, b in st["bits"].items()), flush=True)
    plot = results_file(args, f"sensitivity_{args.dataset}_{args.model}_{cfg.tag}.png")
    if plot is not None:  # None: a dry run without --results-dir
        for r in rows:
            append_csv_row(results_file(args, "sensitivity.csv"), {**common, **r})
        for i, st in enumerate(steps):
            append_csv_row(results_file(args, "mixed_precision.csv"),
                           {**common, "step": i, "weight_bytes": st["weight_bytes"], "sqnr_db": st["sqnr_db"],
                            "int_acc": st["int_acc"], "layer_bits": " ".join(f"{p}:w{b}" for p, b in st["bits"].items())})
        plot_sensitivity(rows, steps, f"{args.dataset}/{args.model} {cfg.tag}", plot)
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
