"""Quantization-aware training: fine-tune a shipped float checkpoint with fake quantization, then
convert it to the integer engine and evaluate it three ways (as PTQ.py).

    python QAT.py --dataset fashion_mnist --model cnn --bits 4
    python QAT.py --dataset cifar10 --model cnn_bn --bits 2 --quantizer lsq --json
    python QAT.py --dataset cifar10 --model cnn --bits 4 --resume      # continue an interrupted run
    python QAT.py --from-scratch --dry-run                             # random weights, synthetic data
    torchrun --nproc_per_node 2 QAT.py --dataset cifar10 --model resnet8 --bits 4   # 2 processes

Steps: load ckpt/<dataset>_<model>.pt (or random weights with --from-scratch); quant.quantize every
tensor (input, weights, activations) at B bits; calibrate the ranges on training batches (the PTQ
initialisation); quant.prepare_qat (ste: EMA activation ranges + STE; lsq: learned step sizes from
the calibrated scales); train the float shadow weights with SGD (Nesterov momentum) and a one-cycle
schedule, freezing the BatchNorm statistics after --freeze-bn epochs and the activation ranges after
--freeze-observers epochs; convert to the integer engine; report float, fake-quant and integer
accuracy and the fq/int argmax agreement. Appends one row to results/qat.csv, saves the QAT
checkpoint (every epoch, atomically: --resume continues it) and the integer model beside it.

Defaults per bit width are in QAT_RECIPES (every value can be overridden on the command line);
with --from-scratch the float training recipe (utils.recipes.RECIPES: epochs, lr) is used instead.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import quant
from utils.pipeline import (FreezeSchedule, build_qat_model, check_distillation, check_matches, load_float_model,
                            load_teacher, make_loaders, make_optimizer, print_table, write_outputs)
from utils.recipes import COMMON, QAT_RECIPES, RECIPES, model_recipe
from utils import distributed
from utils.cli import RESUME_HINT, CLIError, check_names, one_line_errors, set_seed
from utils.io import load_checkpoint, save_checkpoint, versions
from utils.training import evaluate, train_epoch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist or cifar10 (default: %(default)s)")
    p.add_argument("--model", default="cnn", help="cnn or cnn_bn (default: %(default)s)")
    p.add_argument("--bits", type=int, default=8, help="bits of every weight and activation, 2..8 (default: %(default)s)")
    p.add_argument("--weight-bits", type=int, help="bits of the weights (default: --bits, which also picks the recipe)")
    p.add_argument("--act-bits", type=int, help="bits of the input and every activation (default: --bits)")
    p.add_argument("--quantizer", choices=("ste", "lsq", "lsq+"), help="ste (EMA ranges + straight-through), lsq "
                   "(learned step sizes) or lsq+ (lsq with learned activation offsets) (default: QAT_RECIPES: ste at "
                   "7-8 bits, lsq at 2-6)")
    p.add_argument("--epochs", type=int, help="QAT epochs (default: QAT_RECIPES, 1 at 8 bits .. 6 at 2 bits)")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (default: QAT_RECIPES, 1e-3 .. 1e-2)")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay (default: QAT_RECIPES)")
    p.add_argument("--batch-size", type=int, help=f"training batch size (default: {COMMON['batch_size']})")
    p.add_argument("--freeze-bn", type=float, help="epoch (fractional allowed) after which BN statistics freeze "
                   "(default: QAT_RECIPES fraction of --epochs, e.g. 0.5)")
    p.add_argument("--freeze-observers", type=float, help="epoch after which activation ranges freeze "
                   "(default: QAT_RECIPES fraction of --epochs)")
    p.add_argument("--augment", help="training augmentation, as train.py's --augment (default: the data set's "
                   "float recipe, utils.recipes.RECIPES: none for fashion_mnist, crop4,flip for cifar10; with --from-scratch "
                   "the model's own, utils.recipes.model_recipe)")
    p.add_argument("--kd-weight", type=float, help="weight, 0..1, of distilling the float model's logits into the "
                   "quantized one (train.py's --kd-weight; the float checkpoint is the teacher) "
                   f"(default: QAT_RECIPES, else {COMMON['kd_weight']})")
    p.add_argument("--kd-temp", type=float, help=f"distillation temperature (default: {COMMON['kd_temp']})")
    p.add_argument("--teacher", help="comma list of float checkpoints whose mean logits are distilled with --kd-weight "
                   "(train.py's --teacher; default: the float checkpoint being quantized)")
    p.add_argument("--bn-momentum", type=float, help="PyTorch momentum of the BN running statistics during QAT, "
                   "before the BN freeze (default: QAT_RECIPES, else the float model's, 0.1)")
    p.add_argument("--fold-grad-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="scale each fused Conv+BN weight's gradient by (sigma/gamma)^2 so its folded weight "
                   "steps like a plain conv's (default: QAT_RECIPES, else off)")
    p.add_argument("--observer", help=f"calibration (PTQ init) observer: mse, minmax or ema (default: {COMMON['observer']})")
    p.add_argument("--weight-range", choices=("minmax", "mse"), help="weight range per channel, the PTQ start of "
                   "ste's ranges and lsq's step sizes: minmax (max |w|) or mse (clipped for least squared error) "
                   f"(default: QAT_RECIPES, else {COMMON['weight_range']})")
    p.add_argument("--calib-batches", type=int, help=f"training batches for calibration (default: {COMMON['calib_batches']})")
    p.add_argument("--rounding", default="ref", help="integer requantization: ref, builtin, xnnpack (LiteRT kernel sets) or tflm (default: %(default)s)")
    p.add_argument("--per-tensor", action="store_true", help="one scale per conv weight tensor (default: per channel)")
    p.add_argument("--from-scratch", action="store_true", help="start from random weights instead of the float checkpoint "
                   "(epochs and lr default to train.py's recipe)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="data directory (default: $QDNN_DATA_ROOT, else datasets/)")
    p.add_argument("--ckpt", default=None, help="float checkpoint (default: ckpt/<dataset>_<model>.pt)")
    p.add_argument("--out", default=None, help="QAT checkpoint, saved every epoch (default: results/ckpt/"
                   "qat_<dataset>_<model>_<tag>_<quantizer>.pt); the integer model goes beside it as *.int.pt")
    p.add_argument("--results", default=None, help="CSV to append the row to (default: results/qat.csv)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint at --out")
    p.add_argument("--dry-run", action="store_true", help="synthetic data (1 epoch unless --epochs); writes nothing "
                   "unless --out/--results are given")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs in this run, as if interrupted (to test --resume)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    return p.parse_args(argv)


def fill_recipe(args: argparse.Namespace) -> dict:
    """QAT_RECIPES[bits] (or utils.recipes.RECIPES with --from-scratch) merged under the command line."""
    if args.bits not in QAT_RECIPES:
        raise CLIError(f"--bits must be an integer in 2..8, got {args.bits}; pick a bit width from 2 to 8")
    check_names(args.dataset, args.model)
    train_recipe = model_recipe(args.dataset, args.model)
    # Fine-tuning uses the data set's augmentation, not a model's extra regularisation
    # (utils.recipes.MODEL_RECIPES): a few QAT epochs must fit the quantized weights, and extra augmentation
    # costs accuracy there (Fashion-MNIST cnn_bn, 4 bits lsq: 91.18% without flips, 90.84% with).
    cfg = dict(COMMON, **QAT_RECIPES[args.bits], label_smoothing=train_recipe["label_smoothing"],
               augment=RECIPES[args.dataset]["augment"])
    if args.from_scratch:  # (no trained float model to distil)
        cfg.update(epochs=train_recipe["epochs"], lr=train_recipe["lr"], weight_decay=train_recipe["weight_decay"],
                   augment=train_recipe["augment"], kd_weight=0.0)
    cfg.update(dataset=args.dataset, model=args.model, bits=args.bits, seed=args.seed, from_scratch=args.from_scratch)
    for key in ("quantizer", "epochs", "lr", "weight_decay", "batch_size", "observer", "weight_range", "calib_batches",
                "augment", "kd_weight", "kd_temp", "teacher", "bn_momentum", "fold_grad_scale"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    check_distillation(cfg)
    if cfg["kd_weight"] > 0 and args.from_scratch and not cfg["teacher"]:
        raise CLIError("--from-scratch has no trained float model to distil; pass --kd-weight 0 or a --teacher")
    if cfg["bn_momentum"] is not None and not 0 < cfg["bn_momentum"] <= 1:
        raise CLIError(f"--bn-momentum must be in (0, 1], got {cfg['bn_momentum']}; PyTorch's default is 0.1")
    if args.dry_run and args.epochs is None:
        cfg["epochs"] = 1
    if cfg["epochs"] < 1 or cfg["lr"] <= 0 or cfg["batch_size"] < 1:
        raise CLIError("--epochs and --batch-size must be >= 1 and --lr > 0")
    # freeze points in epochs: the flags are epochs, the recipe gives fractions of the run
    cfg["freeze_bn"] = args.freeze_bn if args.freeze_bn is not None else cfg["freeze_bn"] * cfg["epochs"]
    cfg["freeze_observers"] = (args.freeze_observers if args.freeze_observers is not None
                               else cfg["freeze_observers"] * cfg["epochs"])
    return cfg


@torch.no_grad()
def eval_fq(qmodel: torch.nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Test loss/accuracy of the fake-quant model without moving any range."""
    was_training = qmodel.training
    with quant.frozen_act_observers(qmodel):
        metrics = evaluate(qmodel, loader, device)
    qmodel.train(was_training)
    return metrics


@one_line_errors(on_interrupt=RESUME_HINT)
def main() -> int:
    args = parse_args()
    t0 = time.perf_counter()
    cfg = fill_recipe(args)
    qcfg = quant.QuantConfig(weight_bits=args.weight_bits or args.bits, act_bits=args.act_bits or args.bits,
                             per_channel=not args.per_tensor,
                             observer=cfg["observer"], weight_range=cfg["weight_range"],
                             calib_batches=cfg["calib_batches"], rounding=args.rounding,
                             ema_momentum=cfg["ema_momentum"])
    qat_cfg = quant.QATConfig(quantizer=cfg["quantizer"], freeze_bn=cfg["freeze_bn"],
                              freeze_observers=cfg["freeze_observers"], ema_momentum=cfg["ema_momentum"])
    ctx, device = distributed.setup(args.device)
    try:
        return run(args, cfg, qcfg, qat_cfg, ctx, device, t0)
    finally:
        distributed.cleanup()


def run(args: argparse.Namespace, cfg: dict, qcfg: quant.QuantConfig, qat_cfg: quant.QATConfig,
        ctx: distributed.Dist, device: torch.device, t0: float) -> int:
    distributed.check_global_batch(cfg["batch_size"], ctx)
    out = Path(args.out or f"results/ckpt/qat_{args.dataset}_{args.model}_{qcfg.tag}_{cfg['quantizer']}.pt")
    set_seed(args.seed)
    model, ckpt_path = load_float_model(argparse.Namespace(dataset=args.dataset, model=args.model, ckpt=args.ckpt,
                                                           dry_run=args.from_scratch))
    model = model.to(device).to(memory_format=torch.channels_last)  # faster convolutions on CPU
    teacher = load_teacher(cfg, device) if cfg["teacher"] else model
    train, test = make_loaders(cfg, args, device)
    qmodel = build_qat_model(model, qcfg, qat_cfg, train, progress=ctx.main)  # every rank calibrates on the same whole batches
    if ctx.enabled:
        distributed.global_batchnorm(qmodel)
        quant.sync_act_ranges(qmodel, distributed.reduce_range)
        train.shard(ctx.rank, ctx.world_size)
    if cfg["bn_momentum"] is not None:
        quant.set_bn_momentum(qmodel, cfg["bn_momentum"])
    quant.set_fold_grad_scale(qmodel, cfg["fold_grad_scale"])
    opt, sched = make_optimizer(qmodel, cfg, len(train))

    start, metrics, ran = 0, {}, False
    if args.resume:
        ckpt = load_checkpoint(out, "run without --resume to start a new QAT run")
        check_matches(ckpt, cfg, out)
        if {k: v for k, v in ckpt["config"].items() if k != "seed"} != {k: v for k, v in cfg.items() if k != "seed"}:
            raise CLIError(f"{out} was trained with a different recipe {ckpt['config']}; pass the same flags to --resume")
        qmodel.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start, metrics = ckpt["epoch"], ckpt["metrics"]
        print(f"resuming {out} after epoch {start}/{cfg['epochs']}")
    ptq_acc = metrics.get("ptq_fq_acc")
    if ptq_acc is None and ctx.main:
        ptq_acc = eval_fq(qmodel, test, device)["test_acc"]  # the calibrated starting point
    schedule = FreezeSchedule(qmodel, qat_cfg, len(train), step=start * len(train))

    net = distributed.wrap(qmodel, ctx, device)
    procs = f" x {ctx.world_size} processes" if ctx.enabled else ""
    print(f"QAT {args.dataset}/{args.model} {qcfg.tag} {cfg['quantizer']} on {device}{procs}: {cfg}")
    if ctx.main:
        print(f"PTQ initialisation: fake-quant test acc {ptq_acc:.2f}%")
    for epoch in range(start, cfg["epochs"]):
        if args.stop_after is not None and epoch - start >= args.stop_after:
            print(f"stopping after {args.stop_after} epoch(s) as asked; continue with --resume")
            break
        train.set_epoch(epoch)
        metrics = train_epoch(net, train, opt, sched, device, cfg["label_smoothing"],
                              desc=f"qat {epoch + 1}/{cfg['epochs']}", after_step=schedule.after_step,
                              teacher=teacher, kd_weight=cfg["kd_weight"], kd_temp=cfg["kd_temp"], progress=ctx.main)
        metrics = distributed.mean_over_ranks(metrics, ("train_loss", "train_acc"), ctx)
        distributed.check_same_state(qmodel, ctx, f"after epoch {epoch + 1}")
        metrics["epoch"], metrics["ptq_fq_acc"], ran = epoch + 1, ptq_acc, True
        if not ctx.main:
            continue  # rank 0 alone evaluates, prints and saves
        metrics.update(eval_fq(qmodel, test, device))
        frozen = [name for name, s in (("bn", schedule.bn_step), ("ranges", schedule.obs_step)) if schedule.step >= s]
        print(f"epoch {epoch + 1:3d}/{cfg['epochs']}  loss {metrics['train_loss']:.4f}  "
              f"train acc {metrics['train_acc']:6.2f}%  fq test acc {metrics['test_acc']:6.2f}%  "
              f"frozen: {','.join(frozen) or '-'}  {metrics['seconds']:5.1f}s", flush=True)
        if not args.dry_run or args.out:
            save_checkpoint({"model": qmodel.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "config": cfg, "quant_config": qcfg.to_dict(),
                             "qat_config": qat_cfg.to_dict(), "epoch": epoch + 1, "metrics": metrics,
                             "float_ckpt": ckpt_path, "versions": versions()}, out)
    if metrics.get("epoch") != cfg["epochs"] or not ctx.main:
        return 0

    # final model: everything frozen, exactly the integer engine's graph
    quant.set_bn_frozen(qmodel, True)
    quant.set_act_observers(qmodel, False)
    qmodel.eval()
    imodel = quant.convert(qmodel)
    res = quant.compare(test, {"float": model.eval(), "fq": qmodel, "int": imodel}, agree=("fq", "int"), progress=True)
    row = {"dataset": args.dataset, "model": args.model, "bits": args.bits, **qcfg.to_row(), "tag": qcfg.tag,
           "calib_batch_size": cfg["batch_size"], "seed": args.seed, "method": "qat",
           **{k: cfg[k] for k in ("quantizer", "epochs", "lr", "weight_decay", "momentum", "batch_size",
                                  "freeze_bn", "freeze_observers", "from_scratch", "augment",
                                  "kd_weight", "kd_temp", "teacher", "bn_momentum", "fold_grad_scale")},
           "ptq_fq_acc": round(ptq_acc, 2), "float_acc": round(res["float_acc"], 2), "fq_acc": round(res["fq_acc"], 2),
           "int_acc": round(res["int_acc"], 2), "agreement": round(res["agreement"], 3),
           "int_seconds": round(res["int_seconds"], 2), "float_seconds": round(res["float_seconds"], 2),
           "seconds": round(time.perf_counter() - t0, 1), "data_source": test.source, "float_ckpt": ckpt_path,
           "device": str(device), "processes": ctx.world_size, **versions()}
    print_table(row)
    print(f"QAT {cfg['quantizer']} {cfg['epochs']} epoch(s), lr {cfg['lr']}: fake-quant {row['ptq_fq_acc']:.2f}% "
          f"after calibration -> {row['fq_acc']:.2f}% after QAT")
    if ran:
        write_outputs(args, imodel, row, "qat", out.with_name(out.stem + ".int.pt"))
    elif args.json:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
