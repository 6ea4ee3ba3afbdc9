"""Quantization-aware training: fine-tune a shipped float checkpoint with fake quantization, then
convert it to the integer engine and evaluate it three ways (as PTQ.py).

    python QAT.py --dataset fashion_mnist --model cnn --bits 4
    python QAT.py --dataset cifar10 --model cnn_bn --bits 2 --quantizer lsq --json
    python QAT.py --dataset cifar10 --model cnn --bits 4 --resume      # continue an interrupted run
    python QAT.py --from-scratch --dry-run                             # random weights, synthetic data
    torchrun --nproc_per_node 2 QAT.py --dataset cifar10 --model resnet8 --bits 4   # 2 processes

Steps: load ckpt/<dataset>_<model>.pt (or random weights with --from-scratch, whose BatchNorm statistics are
first estimated on the calibration batches: utils.pipeline.estimate_bn_statistics); quant.quantize every
tensor (input, weights, activations) at B bits; calibrate the ranges on training batches (the PTQ
initialisation); quant.prepare_qat (ste: EMA activation ranges + STE; lsq: learned step sizes from
the calibrated scales); train the float shadow weights with SGD (Nesterov momentum) and a one-cycle
schedule, freezing the BatchNorm statistics after --freeze-bn epochs and the activation ranges after
--freeze-observers epochs; convert to the integer engine; report float, fake-quant and integer
accuracy and the fq/int argmax agreement. Appends one row to runs/qat.csv (git-ignored; --results-dir
results: the tracked table), saves the QAT checkpoint (every epoch, atomically: --resume continues it) and
the integer model beside it.

Defaults per bit width are in QAT_RECIPES, with per-model changes in MODEL_QAT_RECIPES (every value can be
overridden on the command line);
with --from-scratch the float training recipe (utils.recipes.model_recipe: epochs, lr, weight decay,
augmentation) is used instead.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import quant
from models import build_model
from utils.pipeline import (FreezeSchedule, build_qat_model, check_matches, flag_layers, load_float_model, load_teacher,
                            make_loaders, make_optimizer, print_table, write_outputs)
from utils import distributed
from utils.args import fill_qat_recipe as fill_recipe, qat_parser
from utils.cli import RESUME_HINT, CLIError, one_line_errors, set_seed
from utils.io import load_checkpoint, save_checkpoint, versions
from utils.training import evaluate, train_epoch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return qat_parser(__doc__).parse_args(argv)  # the flags: utils/args.py


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
                             per_channel=not args.per_tensor, fc_per_channel=args.fc_per_channel,
                             observer=cfg["observer"], weight_range=cfg["weight_range"],
                             calib_batches=cfg["calib_batches"], rounding=args.rounding,
                             ema_momentum=cfg["ema_momentum"],
                             layers=flag_layers(args, build_model(args.model, args.dataset)))
    qat_cfg = quant.QATConfig(quantizer=cfg["quantizer"], freeze_bn=cfg["freeze_bn"],
                              freeze_observers=cfg["freeze_observers"], ema_momentum=cfg["ema_momentum"])
    ctx, device = distributed.setup(args.device)
    with distributed.leaving_group():
        return run(args, cfg, qcfg, qat_cfg, ctx, device, t0)


def resume_checkpoint(out: Path, cfg: dict, qcfg: quant.QuantConfig) -> dict:
    """The checkpoint --resume continues, made with this recipe and these quantization settings."""
    ckpt = load_checkpoint(out, "run without --resume to start a new QAT run")
    check_matches(ckpt, cfg, out)
    if {k: v for k, v in ckpt["config"].items() if k != "seed"} != {k: v for k, v in cfg.items() if k != "seed"}:
        raise CLIError(f"{out} was trained with a different recipe {ckpt['config']}; pass the same flags to --resume")
    if quant.QuantConfig.from_dict(ckpt["quant_config"]) != qcfg:
        raise CLIError(f"{out} was trained with other quantization settings ({ckpt['quant_config']}); pass the "
                       f"same flags to --resume")
    return ckpt


def run(args: argparse.Namespace, cfg: dict, qcfg: quant.QuantConfig, qat_cfg: quant.QATConfig,
        ctx: distributed.Dist, device: torch.device, t0: float) -> int:
    distributed.check_global_batch(cfg["batch_size"], ctx)
    out = Path(args.out or f"results/ckpt/qat_{args.dataset}_{args.model}_{qcfg.tag}_{cfg['quantizer']}.pt")
    ckpt = resume_checkpoint(out, cfg, qcfg) if args.resume else None  # checked before any work
    set_seed(args.seed)
    model, ckpt_path = load_float_model(argparse.Namespace(dataset=args.dataset, model=args.model, ckpt=args.ckpt,
                                                           dry_run=args.from_scratch))
    model = model.to(device).to(memory_format=torch.channels_last)  # faster convolutions on CPU
    teacher = load_teacher(cfg, device) if cfg["teacher"] else model
    train, test = make_loaders(cfg, args, device)
    qmodel = build_qat_model(model, qcfg, qat_cfg, train, progress=ctx.main, fresh_bn=args.from_scratch)  # every rank calibrates on the same whole batches
    if ctx.enabled:
        distributed.global_batchnorm(qmodel)
        quant.sync_act_ranges(qmodel, distributed.reduce_range)
        train.shard(ctx.rank, ctx.world_size)
    if cfg["bn_momentum"] is not None:
        quant.set_bn_momentum(qmodel, cfg["bn_momentum"])
    quant.set_fold_grad_scale(qmodel, cfg["fold_grad_scale"])
    opt, sched = make_optimizer(qmodel, cfg, len(train))

    start, metrics, ran = 0, {}, False
    if ckpt is not None:
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
           "int_seconds": round(res["int_seconds"], 2), "fq_seconds": round(res["fq_seconds"], 2),
           "float_seconds": round(res["float_seconds"], 2),
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
