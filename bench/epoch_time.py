"""Benchmark: seconds per training epoch, and loader-only throughput beside train throughput.

    python bench/epoch_time.py                      # all data sets and models, 3 repeats each
    python bench/epoch_time.py --dataset fashion_mnist --model cnn --repeats 1

Each repeat times one full pass of the loader alone (batching, shuffling,
augmentation), then one full training epoch with train.py's recipe. Reports
medians and writes results/epoch_time.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import get_loaders  # noqa: E402
from models import MODELS, build_model  # noqa: E402
from train import RECIPES, make_optimizer  # noqa: E402
from utils.cli import resolve_device, set_seed  # noqa: E402
from utils.io import append_csv_row, versions  # noqa: E402
from utils.training import train_epoch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(MODELS), nargs="*", default=list(MODELS))
    p.add_argument("--model", choices=["cnn", "cnn_bn"], nargs="*", default=["cnn", "cnn_bn"])
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per model (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="results/epoch_time.csv", help="CSV to append to (default: %(default)s)")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    for dataset in args.dataset:
        recipe = RECIPES[dataset]
        train, _ = get_loaders(dataset, recipe["batch_size"], root=args.data_root, device=device)
        n = len(train) * train.batch_size
        for name in args.model:
            set_seed(0)
            model = build_model(name, dataset).to(device).to(memory_format=torch.channels_last)
            opt, sched = make_optimizer(model, dict(recipe, epochs=args.repeats), len(train))
            load_s, train_s = [], []
            for r in range(args.repeats):
                train.set_epoch(r)
                t0 = time.perf_counter()
                for x, y in train:
                    pass
                load_s.append(time.perf_counter() - t0)
                train_s.append(train_epoch(model, train, opt, sched, device, desc=f"{dataset}/{name}")["seconds"])
            row = {"dataset": dataset, "model": name, "device": str(device), "threads": torch.get_num_threads(),
                   "batch_size": train.batch_size, "repeats": args.repeats,
                   "epoch_s": round(statistics.median(train_s), 2),
                   "loader_img_per_s": round(n / statistics.median(load_s)),
                   "train_img_per_s": round(n / statistics.median(train_s)), **versions()}
            print(f"{dataset:14s} {name:7s} epoch {row['epoch_s']:6.2f} s (median of {args.repeats})  "
                  f"loader {row['loader_img_per_s']:>9,} img/s  train {row['train_img_per_s']:>7,} img/s")
            append_csv_row(args.out, row)


if __name__ == "__main__":
    main()
