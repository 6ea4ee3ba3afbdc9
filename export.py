"""Export an integer model as a real int8 .tflite file (no TensorFlow) and verify it against LiteRT and
TensorFlow Lite Micro.

    python export.py --dataset fashion_mnist --model cnn --bits 8 --verify
    python export.py --dataset cifar10 --model cnn_bn --bits 4 --verify --json
    python export.py --from results/ckpt/qat_fashion_mnist_cnn_w4a4-per_channel_ste.int.pt
    python export.py --dataset cifar10 --model cnn --float          # the float32 file, for comparisons
    python export.py --dataset fashion_mnist --model cnn --c-array  # also model.c / model.h for a TFLM app

Source of the integer model: --from CHECKPOINT (an integer checkpoint saved by PTQ.py or QAT.py, which
names its data set, model and bits: leave those flags out);
by default the PTQ checkpoint results/ckpt/ptq_<dataset>_<model>_w<B>a<B>-per_channel_mse.pt, and
when that file is absent the model is made on the fly exactly as PTQ.py makes it with its defaults
(quantize, calibrate on 32 training batches of 256 with the mse observer, seed 0, convert) and is not
saved. --clamp int8 always makes it on the fly with convert(clamp="int8"): activations clamp to the
int8 range (what LiteRT's fused activations give), so a b < 8-bit file needs no explicit clamp ops.

The file (quant/export_tflite.py): float32 NHWC input, QUANTIZE, CONV_2D / MAX_POOL_2D / RESHAPE /
FULLY_CONNECTED with fused RELU, int8 logits; for b < 8 bits the b-bit activation clamps are explicit
MAXIMUM / MINIMUM ops. It is written to --out (default: beside the checkpoint, *.tflite).

Memory (printed for every file): flash = the file's bytes; arena = the smallest tensor arena in which
TensorFlow Lite Micro allocates the file and runs it (measured by bisection over real allocations;
needs the tflite-micro package, else reported as absent).

--verify runs the whole test set through the integer engine with each rounding (ref, builtin,
xnnpack, tflm) and through the matching runtime (LiteRT's BUILTIN_REF, BUILTIN_WITHOUT_DEFAULT_DELEGATES,
default = XNNPACK; the tflite-micro interpreter, skipped with a message where it is not installed) and
prints the share of int8 logits that are equal per mode, and the accuracies.
With --json the last line is one JSON object: {"match": {"ref": .., "builtin": .., "xnnpack": ..,
"tflm": ..}, "tflite_acc": (LiteRT default), "int_acc": (engine, rounding xnnpack), "arena_bytes": ..}.

--int8-input prints the map from a raw uint8 pixel p of channel c to the file's int8 input (the data
set's normalisation and the input quantization folded into one affine map):
q = clamp(round_half_away(p * a[c] + b[c]), qmin, qmax), a[c] = 1 / (255 std[c] s), b[c] = zp - mean[c] / (std[c] s).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import quant
from data import STATS, Loader, synthetic_split
from quant.export_tflite import MODES, TFLiteRunner, export_tflite, litert, make_runner
from quant.tflm import pixel_map, tflm_arena_bytes, tflm_available, write_c_array
from utils.args import export_parser, results_file
from utils.cli import CLIError, check_names, format_match, one_line_errors
from utils.io import append_csv_row, versions
from utils.pipeline import load_export_source, make_data, names_from_source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return export_parser(__doc__).parse_args(argv)  # the flags: utils/args.py


def check_args(args: argparse.Namespace) -> None:
    if args.bits is None and not args.source:
        args.bits = quant.QuantConfig.act_bits
    if args.clamp not in ("bits", "int8"):
        raise CLIError(f"unknown --clamp {args.clamp!r}; use bits or int8")
    if args.clamp == "int8" and args.source:
        raise CLIError("--clamp int8 makes the model on the fly from the float checkpoint; drop --from")
    if args.float and (args.source or args.clamp != "bits" or args.int8_input):
        raise CLIError("--float exports the float checkpoint; drop --from, --clamp and --int8-input")
    if args.dry_run and not args.out:
        raise CLIError("--dry-run writes only where --out names a place; pass --out FILE.tflite")
    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    names_from_source(args)
    check_names(args.dataset, args.model)


def out_path(args: argparse.Namespace, source: Path) -> Path:
    if args.out:
        return Path(args.out)
    if args.float:
        return Path(f"results/ckpt/{args.dataset}_{args.model}_float32.tflite")
    stem = source.name.removesuffix(".pt").removesuffix(".int")
    return source.with_name(stem + ("_int8in" if args.int8_input else "") + ".tflite")


def verify_int(imodel: quant.IntModel, data: bytes, test: Loader, int8_input: bool, threads: int,
               modes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per mode: % of int8 logits equal between the engine (matching rounding) and the runtime (LiteRT's
    kernel set or TFLM), and both accuracies."""
    res: dict[str, dict[str, float]] = {"match": {}, "tflite_acc": {}, "int_acc": {}, "delegated": {}}
    for mode in modes:
        imodel.rounding = mode
        runner = make_runner(data, mode, num_threads=threads)
        equal = total = t_ok = i_ok = n = 0
        for x, y in test:
            ours = imodel.forward_int(x)
            theirs = runner(imodel.layers[0](x) if int8_input else x).to(torch.int32)
            equal += int((ours == theirs).sum())
            total += ours.numel()
            t_ok += int((theirs.argmax(1) == y).sum())
            i_ok += int((ours.argmax(1) == y).sum())
            n += len(y)
        res["match"][mode] = round(100.0 * equal / total, 4)
        res["tflite_acc"][mode] = round(100.0 * t_ok / n, 2)
        res["int_acc"][mode] = round(100.0 * i_ok / n, 2)
        res["delegated"][mode] = runner.delegated()
    return res


def verify_float(model: torch.nn.Module, data: bytes, test: Loader, threads: int) -> dict[str, dict[str, float]]:
    """Per mode: largest |logit difference| between PyTorch and LiteRT float32, and both accuracies."""
    res: dict[str, dict[str, float]] = {"max_abs_diff": {}, "tflite_acc": {}, "float_acc": {}}
    for mode in MODES:
        runner = TFLiteRunner(data, mode, num_threads=threads)
        diff, t_ok, f_ok, n = 0.0, 0, 0, 0
        with torch.no_grad():
            for x, y in test:
                ours, theirs = model(x), runner(x)
                diff = max(diff, float((ours - theirs).abs().max()))
                t_ok += int((theirs.argmax(1) == y).sum())
                f_ok += int((ours.argmax(1) == y).sum())
                n += len(y)
        res["max_abs_diff"][mode] = diff
        res["tflite_acc"][mode] = round(100.0 * t_ok / n, 2)
        res["float_acc"][mode] = round(100.0 * f_ok / n, 2)
    return res


@one_line_errors
def main() -> int:
    args = parse_args()
    check_args(args)
    if args.verify:
        litert()  # a missing LiteRT is reported before any work
    torch.set_num_threads(min(torch.get_num_threads(), max(args.threads, 1)))
    t0 = time.perf_counter()
    calib, test = make_data(args, torch.device("cpu")) if args.verify or args.dry_run else (None, None)
    model, source, how = load_export_source(args, calib)
    shape = tuple(synthetic_split(args.dataset, 1).images.shape[1:])  # (C, H, W) of one image
    path = out_path(args, source)
    data = export_tflite(model, path, shape, int8_input=args.int8_input,
                         description=f"{args.dataset}/{args.model} from {source.name}")
    row = {"dataset": args.dataset, "model": args.model, "bits": 32 if args.float else args.bits,
           "clamp": args.clamp, "source": str(source), "obtained": how, "tflite": str(path), "bytes": len(data)}
    print(f"wrote {path} ({len(data):,} bytes) from {source} ({how})")
    if args.c_array:
        src, hdr = write_c_array(data, path.with_suffix(""))
        print(f"wrote {src} and {hdr} (the file as a 16-byte aligned C array)")
    micro = tflm_available()
    row["arena_bytes"], arena = "", "not measured: pip install tflite-micro"
    if micro:
        try:
            row["arena_bytes"] = tflm_arena_bytes(data)
            arena = f"{row['arena_bytes']:,} bytes (measured)"
        except quant.QuantError as e:
            arena = f"not measured: {e}"
    print(f"memory: flash {len(data):,} bytes (the file), TFLM arena {arena}")
    if not args.float:
        qout = model.layers[-1]
        print(f"int8 logits: real = {float(qout.scale):.9g} * (q - ({int(qout.zero_point)}))")
    if args.int8_input:
        qin = model.layers[0]
        a, b = pixel_map(*STATS[args.dataset], float(qin.scale), int(qin.zero_point))
        print(f"uint8 pixel p of channel c -> int8 input: clamp(round_half_away(p * a[c] + b[c]), {qin.qmin}, "
              f"{qin.qmax}), a = {[float(v) for v in a]}, b = {[float(v) for v in b]}")
        row.update({"pixel_a": json.dumps([float(v) for v in a]), "pixel_b": json.dumps([float(v) for v in b])})
    modes = (*MODES, "tflm") if micro and not args.float else tuple(MODES)
    if args.verify and not micro:
        print("TFLM column skipped: the tflite-micro interpreter is not installed (pip install tflite-micro)")
    if args.verify:
        res = verify_float(model, data, test, args.threads) if args.float else \
            verify_int(model, data, test, args.int8_input, args.threads, modes)
        key = "max_abs_diff" if args.float else "match"
        ref = "float_acc" if args.float else "int_acc"
        print(f"{'runtime':<12} {key:>12} {'tflite acc':>11} {ref.replace('_', ' '):>10}  ({test.source}, "
              f"{len(test.y)} images)")
        for mode in (MODES if args.float else modes):
            fig = f"{res[key][mode]:.3g}" if args.float else format_match(res[key][mode])
            print(f"{mode:<12} {fig:>12} {res['tflite_acc'][mode]:>10.2f}% {res[ref][mode]:>9.2f}%")
        row.update({key: res[key], "tflite_acc": res["tflite_acc"]["xnnpack"], ref: res[ref]["xnnpack"],
                    "tflite_acc_by_mode": res["tflite_acc"], f"{ref}_by_mode": res[ref],
                    "data_source": test.source, "images": len(test.y)})
        if not args.float:
            row["xnnpack_delegated"] = res["delegated"]["xnnpack"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    csv_path = results_file(args, "export_verify.csv")
    if args.verify and csv_path is not None:
        flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
        for k, v in row.items():
            if isinstance(v, dict):
                flat.update({f"{k.removesuffix('_by_mode')}_{mode}": v[mode] for mode in v})
        append_csv_row(csv_path, {**flat, "int8_input": args.int8_input, "threads": args.threads, **versions()})
    if args.json:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
