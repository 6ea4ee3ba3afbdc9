"""Train one of the float CNNs and save a checkpoint; a finished run appends its row to runs/train.csv
(git-ignored; --results-dir results: the tracked table).

    python train.py --dataset fashion_mnist --model cnn
    python train.py --dataset cifar10 --model cnn_bn --epochs 40
    python train.py --dataset cifar10 --model cnn --resume      # continue an interrupted run
    python train.py --dataset cifar10 --model cnn --eval-only   # evaluate ckpt/cifar10_cnn.pt
    torchrun --nproc_per_node 2 train.py --dataset cifar10 --model resnet8   # 2 processes (utils/distributed.py)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models import build_model
from utils import distributed
from utils.args import RUNS_DIR, results_file, train_parser
from utils.cli import RESUME_HINT, CLIError, check_names, one_line_errors, set_seed
from utils.io import append_csv_row, load_checkpoint, save_checkpoint, versions
from utils.pipeline import check_distillation, check_matches, load_teacher, make_ema, make_loaders, make_optimizer
from utils.recipes import model_recipe
from utils.training import PRECISIONS, evaluate, train_epoch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return train_parser(__doc__).parse_args(argv)  # the flags: utils/args.py


def fill_recipe(args: argparse.Namespace) -> dict:
    """Validate names and merge the command line over the data set's recipe."""
    check_names(args.dataset, args.model)
    cfg = dict(model_recipe(args.dataset, args.model), dataset=args.dataset, model=args.model, seed=args.seed)
    for key in ("optimizer", "sam_rho", "ema_decay", "epochs", "lr", "batch_size", "weight_decay", "label_smoothing", "augment",
                "teacher", "kd_weight", "kd_temp", "precision"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.dry_run and args.epochs is None:
        cfg["epochs"] = 1
    check_distillation(cfg)
    if cfg["kd_weight"] > 0 and not cfg["teacher"]:
        raise CLIError("--kd-weight > 0 needs a --teacher checkpoint (or pass --kd-weight 0)")
    if cfg["kd_weight"] > 0 and cfg["sam_rho"] > 0:
        raise CLIError("distillation and SAM steps do not combine; pass --sam-rho 0 or --kd-weight 0")
    if cfg["optimizer"] not in ("sgd", "adamw"):
        raise CLIError(f"unknown --optimizer {cfg['optimizer']!r}; use sgd or adamw")
    if cfg["epochs"] < 1 or cfg["lr"] <= 0 or cfg["batch_size"] < 1:
        raise CLIError("--epochs and --batch-size must be >= 1 and --lr > 0")
    return cfg


@one_line_errors(on_interrupt=RESUME_HINT)
def main() -> int:
    args = parse_args()
    cfg = fill_recipe(args)
    ctx, device = distributed.setup(args.device)
    with distributed.leaving_group():
        return run(args, cfg, ctx, device)


def run(args: argparse.Namespace, cfg: dict, ctx: distributed.Dist, device: torch.device) -> int:
    name = f"{cfg['dataset']}_{cfg['model']}.pt"  # a new training goes to runs/ (git-ignored), not over ckpt/
    out = Path(args.out) if args.out else (Path("ckpt") if args.eval_only else Path(RUNS_DIR) / "ckpt") / name
    distributed.check_global_batch(cfg["batch_size"], ctx)
    set_seed(cfg["seed"])
    model = build_model(cfg["model"], cfg["dataset"]).to(device).to(memory_format=torch.channels_last)
    if ctx.enabled:
        distributed.global_batchnorm(model)

    if args.eval_only:
        ckpt = load_checkpoint(out, f"train it with: python train.py --dataset {cfg['dataset']} --model {cfg['model']}")
        check_matches(ckpt, cfg, out)
        model.load_state_dict(ckpt["model"])
        _, test = make_loaders(cfg, args, device)
        metrics = evaluate(model, test, device)
        print(f"{out}: test acc {metrics['test_acc']:.2f}%  test loss {metrics['test_loss']:.4f}")
        if args.json:
            print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        return 0

    train, test = make_loaders(cfg, args, device)
    if ctx.enabled:
        train.shard(ctx.rank, ctx.world_size)
    opt, sched = make_optimizer(model, cfg, len(train))
    ema = make_ema(model, cfg["ema_decay"])
    teacher = load_teacher(cfg, device)
    final = model if ema is None else ema.module  # the weights that are evaluated and shipped
    start, metrics, t_start, ran = 0, {}, time.perf_counter(), False
    if args.resume:
        ckpt = load_checkpoint(out, "run without --resume to start a new training")
        check_matches(ckpt, cfg, out)
        old = {"precision": "fp32", **ckpt["config"]}  # checkpoints from before --precision trained in fp32
        if {k: v for k, v in old.items() if k != "seed"} != {k: v for k, v in cfg.items() if k != "seed"}:
            raise CLIError(f"{out} was trained with a different recipe {ckpt['config']}; pass the same flags to --resume")
        model.load_state_dict(ckpt["raw_model"] if ema is not None else ckpt["model"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["model"])
            ema.n_averaged.fill_(ckpt["ema_steps"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start, metrics = ckpt["epoch"], ckpt["metrics"]
        print(f"resuming {out} after epoch {start}/{cfg['epochs']}")

    net = distributed.wrap(model, ctx, device)
    procs = f" x {ctx.world_size} processes" if ctx.enabled else ""
    print(f"training {cfg['dataset']}/{cfg['model']} on {device}{procs}: {cfg}")
    for epoch in range(start, cfg["epochs"]):
        if args.stop_after is not None and epoch - start >= args.stop_after:
            print(f"stopping after {args.stop_after} epoch(s) as asked; continue with --resume")
            break
        train.set_epoch(epoch)
        metrics = train_epoch(net, train, opt, sched, device, cfg["label_smoothing"],
                              desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                              after_step=None if ema is None else lambda: ema.update_parameters(model),
                              sam_rho=cfg["sam_rho"], teacher=teacher, kd_weight=cfg["kd_weight"],
                              kd_temp=cfg["kd_temp"], progress=ctx.main, autocast=PRECISIONS[cfg["precision"]])
        metrics = distributed.mean_over_ranks(metrics, ("train_loss", "train_acc"), ctx)
        for held in (model,) if ema is None else (model, ema):
            distributed.check_same_state(held, ctx, f"after epoch {epoch + 1}")
        metrics["epoch"], ran = epoch + 1, True
        if not ctx.main:
            continue  # rank 0 alone evaluates, prints and saves
        metrics.update(evaluate(final, test, device))
        print(f"epoch {epoch + 1:3d}/{cfg['epochs']}  loss {metrics['train_loss']:.4f}  "
              f"train acc {metrics['train_acc']:6.2f}%  test acc {metrics['test_acc']:6.2f}%  "
              f"{metrics['seconds']:5.1f}s", flush=True)
        if not args.dry_run or args.out:
            extra = {} if ema is None else {"raw_model": model.state_dict(), "ema_steps": int(ema.n_averaged)}
            save_checkpoint({"model": final.state_dict(), **extra, "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "config": cfg, "epoch": epoch + 1,
                             "metrics": metrics, "versions": versions()}, out)
    finished = metrics.get("epoch") == cfg["epochs"]
    csv_path = results_file(args, "train.csv")
    if finished and csv_path is not None and ran and ctx.main:
        append_csv_row(csv_path, {**cfg, "test_acc": round(metrics["test_acc"], 2),
                                  "train_acc": round(metrics["train_acc"], 2),
                                  "run_seconds": round(time.perf_counter() - t_start, 1),
                                  "checkpoint": str(out), "data_source": test.source, "device": str(device),
                                  "processes": ctx.world_size, **versions()})
    if finished and ran and ctx.main and (not args.dry_run or args.out):
        print(f"saved {out}; quantize it with: python PTQ.py --dataset {cfg['dataset']} --model {cfg['model']} "
              f"--ckpt {out}", flush=True)
    if args.json and ctx.main:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
