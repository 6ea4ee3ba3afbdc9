"""Benchmark: seconds per training epoch, float and quantization-aware, with loader-only throughput.

    python bench/epoch_time.py                                  # float epochs, all data sets and models
    python bench/epoch_time.py --methods float ste lsq          # QAT epochs beside float ones, with ratios
    python bench/epoch_time.py --dataset cifar10 --model resnet8 resnet20 mobilenetv2 --methods float bf16 --steps 40
    python bench/epoch_time.py --dataset fashion_mnist --model cnn --repeats 1
    python bench/epoch_time.py --dataset cifar10 --model resnet8 resnet20 mobilenetv2 --methods float ste lsq --steps 40

Each repeat times one full pass of the loader alone (batching, shuffling, augmentation), then one
full training epoch per method, interleaved (float, ste, lsq, float, ...) so that every method
sees the same machine load: ``float`` is train.py's training step (cross-entropy, no teacher);
``bf16`` the same with ``--precision bf16`` (autocast to bfloat16); ``kd`` the float step with the
distillation teacher(s) of the model's recipe (train.py's default on Fashion-MNIST: one more forward
pass per batch and teacher; skipped where the recipe has none); ``ste`` and ``lsq`` are QAT.py's
training step at --bits (fake quantization of every tensor, BatchNorm statistics and activation
ranges still updating: the dearer phase of a QAT run). Reports medians, and for QAT the ratio of
the medians to the float epoch of the same model, and appends one row per method to
results/epoch_time.csv. ``--steps N`` times the first N batches of each epoch instead of all of them
(after one untimed warm-up batch) and scales to a full epoch: for the slow zoo models on a CPU.
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
from data import get_loaders  # noqa: E402
from models import MODELS, build_model  # noqa: E402
from utils.pipeline import FreezeSchedule, build_qat_model, load_teacher, make_optimizer  # noqa: E402
from utils.recipes import RECIPES, model_recipe  # noqa: E402
from utils.cli import resolve_device, set_seed  # noqa: E402
from utils.io import append_csv_row, versions  # noqa: E402
from utils.training import PRECISIONS, train_epoch  # noqa: E402


def make_trainee(method: str, name: str, dataset: str, recipe: dict, bits: int, train, device, epochs: int):
    """(model, optimizer, scheduler, train_epoch keywords) for one method, from the same random float weights."""
    set_seed(0)
    model = build_model(name, dataset).to(device).to(memory_format=torch.channels_last)
    extra = {}
    if method == "bf16":
        extra = dict(autocast=PRECISIONS["bf16"])
    elif method == "kd":
        extra = dict(teacher=load_teacher(dict(recipe, dataset=dataset), device), kd_weight=recipe["kd_weight"],
                     kd_temp=recipe["kd_temp"])
    elif method != "float":
        qcfg = quant.QuantConfig(weight_bits=bits, act_bits=bits, observer="minmax", calib_batches=4)
        qat_cfg = quant.QATConfig(quantizer=method, freeze_bn=epochs, freeze_observers=epochs)
        model = build_qat_model(model, qcfg, qat_cfg, train, fresh_bn=True)  # random weights
        extra = dict(after_step=FreezeSchedule(model, qat_cfg, len(train)).after_step)
    opt, sched = make_optimizer(model, dict(recipe, epochs=epochs), len(train))
    return model, opt, sched, extra


class _FirstBatches:
    """The first ``n`` batches of a loader, behind one untimed warm-up batch (``None``: all batches)."""

    def __init__(self, loader, n: int | None) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return len(self.loader) if self.n is None else min(self.n, len(self.loader))

    def __iter__(self):
        it = iter(self.loader)
        for i, batch in enumerate(it):
            if self.n is not None and i >= self.n:
                return
            yield batch

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(MODELS), nargs="*", default=list(MODELS))
    p.add_argument("--model", choices=sorted({m for ms in MODELS.values() for m in ms}), nargs="*",
                   default=["cnn", "cnn_bn"], help="models (default: cnn cnn_bn; each where its data set has it, "
                   "e.g. --dataset cifar10 --model resnet8 for the zoo)")
    p.add_argument("--methods", choices=["float", "bf16", "kd", "ste", "lsq"], nargs="*", default=["float", "kd"],
                   help="float training, float training autocast to bfloat16, float training with the recipe's "
                        "distillation teacher, and/or QAT with the ste or lsq quantizer (default: float kd)")
    p.add_argument("--bits", type=int, default=4, help="QAT bit width (the cost does not depend on it; default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per model and method (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", type=int, default=None, help="time only the first N batches of each epoch and "
                   "scale to the full epoch (default: whole epochs)")
    p.add_argument("--out", default="results/epoch_time.csv", help="CSV to append to (default: %(default)s)")
    args = p.parse_args()
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    device = resolve_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    for dataset in args.dataset:
        train, _ = get_loaders(dataset, RECIPES[dataset]["batch_size"], root=args.data_root, device=device)
        n = len(train) * train.batch_size
        for name in (m for m in args.model if m in MODELS[dataset]):
            recipe = model_recipe(dataset, name)
            methods = [m for m in args.methods if m != "kd" or recipe["kd_weight"] > 0]
            trainees = {m: make_trainee(m, name, dataset, recipe, args.bits, train, device, args.repeats)
                        for m in methods}
            load_s: list[float] = []
            train_s: dict[str, list[float]] = {m: [] for m in methods}
            for r in range(args.repeats):
                train.set_epoch(r)
                t0 = time.perf_counter()
                for x, y in train:
                    pass
                load_s.append(time.perf_counter() - t0)
                for method, (model, opt, sched, extra) in trainees.items():
                    train.set_epoch(r)
                    part = _FirstBatches(train, args.steps)
                    if args.steps is not None:  # warm-up: one untimed step (first-call allocations)
                        train_epoch(model, _FirstBatches(train, 1), opt, sched, device, desc="warm-up", **extra)
                    s = train_epoch(model, part, opt, sched, device, desc=f"{dataset}/{name}/{method}", **extra)["seconds"]
                    train_s[method].append(s * len(train) / len(part))
            for method in methods:
                epoch_s = statistics.median(train_s[method])
                ratio = epoch_s / statistics.median(train_s["float"]) if "float" in train_s else None
                row = {"dataset": dataset, "model": name, "device": str(device), "threads": torch.get_num_threads(),
                       "batch_size": train.batch_size, "repeats": args.repeats, "epoch_s": round(epoch_s, 2),
                       "loader_img_per_s": round(n / statistics.median(load_s)),
                       "train_img_per_s": round(n / epoch_s), "method": method, "timed_steps": args.steps or "",
                       "bits": args.bits if method in ("ste", "lsq") else "",
                       "ratio_vs_float": round(ratio, 2) if ratio is not None and method != "float" else "",
                       **versions()}
                print(f"{dataset:14s} {name:7s} {method:5s} epoch {row['epoch_s']:6.2f} s (median of {args.repeats})  "
                      f"loader {row['loader_img_per_s']:>9,} img/s  train {row['train_img_per_s']:>7,} img/s"
                      + (f"  {ratio:.2f}x float" if row["ratio_vs_float"] != "" else ""))
                append_csv_row(args.out, row)


if __name__ == "__main__":
    main()
