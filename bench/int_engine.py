"""Benchmark: the integer engine against the float model on a full test set (medians of repeats).

    python bench/int_engine.py                                   # Fashion-MNIST cnn and cnn_bn, 8 bits
    python bench/int_engine.py --dataset cifar10 --model cnn --bits 4 --rounding xnnpack
    python bench/int_engine.py --dataset cifar10 --model resnet20 mobilenetv2 --chunk-elements 0 500000 1500000 6000000

Quantizes the shipped checkpoint (PTQ, as PTQ.py), then times, side by side in one run, the float
model and the integer engine over the whole test set (batch 1000; the engine splits it into CPU chunks
of about --chunk-elements values in the largest tensor, 0: the whole batch at once; each setting is
one row). Appends rows to results/int_engine_speed.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quant  # noqa: E402
from data import Loader, load_split  # noqa: E402
from models import build_model  # noqa: E402
from utils.io import append_csv_row, load_checkpoint, versions  # noqa: E402


@torch.no_grad()
def time_pass(fn, xs: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for x in xs:
        fn(x)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", nargs="*", default=["cnn", "cnn_bn"])
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--rounding", default="ref", help="ref, builtin, xnnpack or tflm (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-elements", type=int, nargs="*", default=[quant.IntModel.cpu_chunk_elements],
                   help="IntModel.cpu_chunk_elements settings to time (default: %(default)s)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="results/int_engine_speed.csv")
    args = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    train, test = load_split(args.dataset, "train", args.data_root), load_split(args.dataset, "test", args.data_root)
    xs = [x for x, _ in Loader(test.images, test.labels, args.dataset, 1000)]
    n = sum(len(x) for x in xs)
    for name in args.model:
        model = build_model(name, args.dataset).eval()
        model.load_state_dict(load_checkpoint(f"ckpt/{args.dataset}_{name}.pt", "train it first")["model"])
        q = quant.quantize(model, quant.QuantConfig(weight_bits=args.bits, act_bits=args.bits, rounding=args.rounding))
        quant.calibrate(q, Loader(train.images, train.labels, args.dataset, 256, train=True), num_batches=32)
        im = quant.convert(q)
        f_s, i_s = [], {c: [] for c in args.chunk_elements}
        for _ in range(args.repeats):  # interleaved, so that a load change hits every setting alike
            f_s.append(time_pass(model, xs))
            for c in args.chunk_elements:
                im.cpu_chunk_elements = c
                i_s[c].append(time_pass(im, xs))
        f = statistics.median(f_s)
        for c, times in i_s.items():
            i = statistics.median(times)
            row = {"dataset": args.dataset, "model": name, "bits": args.bits, "rounding": args.rounding,
                   "images": n, "threads": torch.get_num_threads(), "repeats": args.repeats, "float_s": round(f, 2),
                   "int_s": round(i, 2), "float_img_per_s": round(n / f), "int_img_per_s": round(n / i),
                   "int_over_float": round(i / f, 2), "chunk_elements": c, **versions()}
            print(f"{args.dataset} {name} w{args.bits}a{args.bits} {args.rounding} chunks of {c:,} elements: float "
                  f"{f:.2f} s ({n / f:,.0f} img/s), integer engine {i:.2f} s ({n / i:,.0f} img/s), ratio {i / f:.2f}")
            append_csv_row(args.out, row)


if __name__ == "__main__":
    main()
