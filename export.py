"""Export an integer model as a real int8 .tflite file (no TensorFlow) and verify it against LiteRT and
TensorFlow Lite Micro.

    python export.py --dataset fashion_mnist --model cnn --bits 8 --verify
    python export.py --dataset cifar10 --model cnn_bn --bits 4 --verify --json
    python export.py --from results/ckpt/qat_fashion_mnist_cnn_w4a4-per_channel_ste.int.pt
    python export.py --dataset cifar10 --model cnn --float          # the float32 file, for comparisons
    python export.py --dataset fashion_mnist --model cnn --c-array  # also model.c / model.h for a TFLM app

Source of the integer model: --from CHECKPOINT (an integer checkpoint saved by PTQ.py or QAT.py);
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
from models import build_model
from utils.pipeline import load_float_model, make_data
from quant.export_tflite import MODES, TFLiteRunner, export_tflite, litert, make_runner
from quant.tflm import pixel_map, tflm_arena_bytes, tflm_available, write_c_array
from utils.cli import CLIError, check_names, format_match, one_line_errors, set_seed
from utils.io import append_csv_row, versions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist or cifar10 (default: %(default)s)")
    p.add_argument("--model", default="cnn", help="cnn or cnn_bn (default: %(default)s)")
    p.add_argument("--bits", type=int, default=None, help="bits of the PTQ model, 2..8 (default: 8, or those of "
                                                          "the --from checkpoint)")
    p.add_argument("--from", dest="source", default=None,
                   help="integer checkpoint from PTQ.py or QAT.py (default: the PTQ checkpoint "
                        "results/ckpt/ptq_<dataset>_<model>_w<B>a<B>-per_channel_mse.pt, made on the fly if absent)")
    p.add_argument("--clamp", default="bits", help="activation clamps: bits (the b-bit ranges, as PTQ.py "
                   "evaluates) or int8 (LiteRT's fused-activation ranges; made on the fly) (default: %(default)s)")
    p.add_argument("--int8-input", action="store_true", help="the file takes the quantized int8 image "
                                                             "(default: float32 image and a QUANTIZE op)")
    p.add_argument("--float", action="store_true", help="export the float32 model ckpt/<dataset>_<model>.pt "
                                                        "instead (BatchNorm folded)")
    p.add_argument("--out", default=None, help="the .tflite file (default: the checkpoint path with .tflite; "
                                               "--float: results/ckpt/<dataset>_<model>_float32.tflite)")
    p.add_argument("--verify", action="store_true", help="compare with LiteRT and TFLM over the whole test set")
    p.add_argument("--c-array", action="store_true", help="also write the file as a C source and header "
                                                          "(<out>.c, <out>.h) for a TFLM application")
    p.add_argument("--threads", type=int, default=1, help="LiteRT threads for --verify (default: %(default)s)")
    p.add_argument("--calib-batches", type=int, default=32, help="on-the-fly PTQ: training batches for "
                                                                 "calibration (default: %(default)s)")
    p.add_argument("--calib-batch-size", type=int, default=256, help="on-the-fly PTQ: images per calibration "
                                                                     "batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="on-the-fly PTQ: calibration batch order (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="data directory (default: $QDNN_DATA_ROOT, else datasets/)")
    p.add_argument("--ckpt", default=None, help="float checkpoint (default: ckpt/<dataset>_<model>.pt)")
    p.add_argument("--dry-run", action="store_true", help="random weights and synthetic data, made on the fly; "
                                                          "needs --out")
    p.add_argument("--results", default=None, help="CSV that --verify appends its row to (default: "
                   "results/export_verify.csv; a --dry-run writes none unless given)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_names(args.dataset, args.model)
    if args.bits is None and not args.source:
        args.bits = 8
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


def default_source(args: argparse.Namespace) -> Path:
    tag = quant.QuantConfig(weight_bits=args.bits, act_bits=args.bits).tag
    return Path(f"results/ckpt/ptq_{args.dataset}_{args.model}_{tag}_mse.pt")


def ptq_on_the_fly(args: argparse.Namespace, calib: Loader) -> quant.IntModel:
    """The integer model PTQ.py makes with its defaults (mse observer), converted with --clamp."""
    cfg = quant.QuantConfig(weight_bits=args.bits, act_bits=args.bits, observer="mse",
                            calib_batches=args.calib_batches)
    set_seed(args.seed)
    model, _ = load_float_model(args)
    qmodel = quant.quantize(model, cfg)
    quant.calibrate(qmodel, calib, num_batches=cfg.calib_batches, progress=True)
    return quant.convert(qmodel, clamp=args.clamp)


def load_source(args: argparse.Namespace, calib: Loader | None) -> tuple[quant.IntModel | torch.nn.Module, Path, str]:
    """(model to export, its source path, how it was obtained)."""
    if args.float:
        model, path = load_float_model(args)
        return model, Path(path), "float checkpoint"
    path = Path(args.source) if args.source else default_source(args)
    if args.source or (path.exists() and args.clamp == "bits" and not args.dry_run):
        imodel, meta = quant.load_integer(path, build_model(args.model, args.dataset))
        cfg = imodel.meta.get("config") or {}
        if args.bits is None:
            args.bits = cfg.get("act_bits", 8)
        elif cfg.get("act_bits", args.bits) != args.bits:
            raise CLIError(f"{path} holds a w{cfg.get('weight_bits')}a{cfg.get('act_bits')} model; pass "
                           f"--bits {cfg.get('act_bits')} or leave --bits out")
        return imodel, path, "checkpoint"
    if calib is None:
        calib, _ = make_data(args, torch.device("cpu"))
    if args.clamp == "int8":
        path = path.with_name(path.stem + "_int8clamp.pt")
    return ptq_on_the_fly(args, calib), path, "PTQ on the fly (not saved)"


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
    model, source, how = load_source(args, calib)
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
    if args.verify and (not args.dry_run or args.results):
        flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
        for k, v in row.items():
            if isinstance(v, dict):
                flat.update({f"{k.removesuffix('_by_mode')}_{mode}": v[mode] for mode in v})
        append_csv_row(args.results or "results/export_verify.csv",
                       {**flat, "int8_input": args.int8_input, "threads": args.threads, **versions()})
    if args.json:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
