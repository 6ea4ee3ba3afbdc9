"""What the scripts share: loading a float checkpoint and checking it matches the model, the data loaders,
the optimiser and its schedule, the distillation teacher, the QAT model and its freeze schedule,
writing a quantized result (integer checkpoint + CSV row), and the model export.py exports
(load_export_source, shared with bench/inference.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import quant
from data import EVAL_BATCH_SIZE, Loader, get_loaders, load_split, synthetic_split
from models import build_model
from utils.args import results_file
from utils.cli import CLIError, check_names, set_seed
from utils.io import append_csv_row, load_checkpoint
from utils.recipes import ONE_CYCLE
from utils.training import Ensemble


def check_distillation(cfg: dict) -> None:
    """The distillation weight and temperature of a train.py or QAT.py recipe are usable."""
    if not 0 <= cfg["kd_weight"] <= 1 or cfg["kd_temp"] <= 0:
        raise CLIError("--kd-weight must be in [0, 1] and --kd-temp > 0")


def load_teacher(cfg: dict, device: torch.device) -> torch.nn.Module | None:
    """The distillation teacher of ``cfg`` (mean of its checkpoints' logits), or None without distillation."""
    if cfg["kd_weight"] <= 0:
        return None
    members = []
    for path in cfg["teacher"].split(","):
        ckpt = load_checkpoint(path.strip(), "train the teacher first, e.g. python train.py --dataset "
                                             f"{cfg['dataset']} --model cnn_bn")
        got = ckpt.get("config", {})
        if got.get("dataset") != cfg["dataset"] or got.get("model") is None:
            raise CLIError(f"teacher {path} holds {got.get('dataset')}/{got.get('model')}, not a {cfg['dataset']} model; "
                           f"pass a {cfg['dataset']} checkpoint to --teacher")
        member = build_model(got["model"], cfg["dataset"])
        member.load_state_dict(ckpt["model"])
        members.append(member)
    return Ensemble(members).to(device).to(memory_format=torch.channels_last)


def make_loaders(cfg: dict, args: argparse.Namespace, device: torch.device) -> tuple[Loader, Loader]:
    if args.dry_run:
        tr, te = synthetic_split(cfg["dataset"], 512, seed=1), synthetic_split(cfg["dataset"], 256, seed=2)
        return (Loader(tr.images, tr.labels, cfg["dataset"], cfg["batch_size"], train=True,
                       augment=cfg["augment"], device=device, seed=cfg["seed"], source=tr.source),
                Loader(te.images, te.labels, cfg["dataset"], 256, device=device, source=te.source))
    return get_loaders(cfg["dataset"], cfg["batch_size"], root=args.data_root, augment=cfg["augment"],
                       device=device, seed=cfg["seed"])


def make_optimizer(model: torch.nn.Module, cfg: dict, steps_per_epoch: int):
    """SGD with Nesterov momentum, or AdamW (no weight decay on biases and BN), and a one-cycle schedule."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.get("optimizer", "sgd") == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg["lr"])
    else:
        opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(cfg["epochs"] * steps_per_epoch))
    return opt, sched


def make_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """Exponential moving average of the weights and BN statistics (None when decay is 0).

    After each step: ema = decay * ema + (1 - decay) * weights. The averaged model is the one
    evaluated and saved as ``model`` in the checkpoint (the raw weights go to ``raw_model``)."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def one_cycle(total_steps: int, warmup: float = ONE_CYCLE["warmup"], start: float = ONE_CYCLE["start"]):
    """LR factor per step: linear warm-up from ``start`` to 1 over ``warmup`` of the steps, then linear decay to 0."""
    up = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < up:
            return start + (1 - start) * step / up
        return max(0.0, (total_steps - step) / max(1, total_steps - up))
    return factor


def check_matches(ckpt: dict, cfg: dict, path: Path) -> None:
    """A checkpoint of another data set or model is a user error, not a state-dict traceback."""
    got = (ckpt.get("config", {}).get("dataset"), ckpt.get("config", {}).get("model"))
    if got != (cfg["dataset"], cfg["model"]):
        raise CLIError(f"{path} holds {got[0]}/{got[1]}, not {cfg['dataset']}/{cfg['model']}; "
                       f"pick the matching --dataset/--model or another --out")


def flag_layers(args: argparse.Namespace, model: torch.nn.Module) -> tuple:
    """``QuantConfig.layers`` of PTQ.py's and QAT.py's --first-last and --layer flags (``model``: the float
    model, whose first and last weighted layers --first-last names)."""
    layers = list(quant.first_last(model, args.first_last)) if args.first_last is not None else []
    return tuple(layers + [quant.parse_layer_settings(text) for text in (args.layer or [])])


def ptq_ckpt_path(dataset: str, model: str, cfg: quant.QuantConfig, methods: tuple[str, ...] = ()) -> Path:
    """PTQ.py's default integer checkpoint, in results/ckpt/ (git-ignored): ptq_<dataset>_<model>_<tag>_<observer>,
    then -w<range> unless the weight range is minmax, and -<method> per PTQ method."""
    suffix = ("" if cfg.weight_range == "minmax" else f"-w{cfg.weight_range}") + "".join(f"-{m}" for m in methods)
    return Path(f"results/ckpt/ptq_{dataset}_{model}_{cfg.tag}_{cfg.observer}{suffix}.pt")


def load_float_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The float model with the shipped weights (or random ones with --dry-run) and its checkpoint path."""
    check_names(args.dataset, args.model)
    model = build_model(args.model, args.dataset)
    if args.dry_run:
        return model.eval(), "random-init"
    path = Path(args.ckpt or f"ckpt/{args.dataset}_{args.model}.pt")
    make = f"make it with: python train.py --dataset {args.dataset} --model {args.model}"
    ckpt = load_checkpoint(path, make)
    got = (ckpt.get("config", {}).get("dataset"), ckpt.get("config", {}).get("model"))
    if got != (args.dataset, args.model):
        raise CLIError(f"{path} holds {got[0]}/{got[1]}, not {args.dataset}/{args.model}; pass the right --ckpt or {make}")
    model.load_state_dict(ckpt["model"])
    return model.eval(), str(path)


def make_data(args: argparse.Namespace, device: torch.device) -> tuple[Loader, Loader]:
    """(calibration loader: shuffled training images, no augmentation; test loader)."""
    if args.dry_run:
        train, test = synthetic_split(args.dataset, 512, seed=1), synthetic_split(args.dataset, 256, seed=2)
    else:
        train, test = load_split(args.dataset, "train", args.data_root), load_split(args.dataset, "test", args.data_root)
    calib = Loader(train.images, train.labels, args.dataset, args.calib_batch_size, train=True, augment="",
                   device=device, seed=args.seed, source=train.source)
    return calib, Loader(test.images, test.labels, args.dataset, EVAL_BATCH_SIZE, device=device, source=test.source)


def print_table(row: dict) -> None:
    print(f"\n{row['dataset']}/{row['model']}  {row['tag']}  observer {row['observer']}  "
          f"calibration {row['calib_batches']}x{row['calib_batch_size']}  rounding {row['rounding']}")
    print(f"{'float acc':>10} {'fake-quant':>11} {'integer':>9} {'agreement':>10} {'seconds':>8}")
    print(f"{row['float_acc']:>9.2f}% {row['fq_acc']:>10.2f}% {row['int_acc']:>8.2f}% "
          f"{row['agreement']:>9.2f}% {row['seconds']:>8.1f}")


def write_outputs(args: argparse.Namespace, imodel: quant.IntModel, row: dict, method: str, int_path: Path) -> None:
    """Save the integer model, append ``row`` to <method>.csv in --results-dir (utils.args.results_file) and
    print it as JSON, as asked.

    A dry run writes only where --out / --results-dir name a place."""
    if not args.dry_run or args.out:
        quant.save_integer(int_path, imodel, meta={"dataset": args.dataset, "model": args.model, "method": method,
                                                   "metrics": {k: row[k] for k in ("float_acc", "fq_acc", "int_acc")}})
        row["int_ckpt"] = str(int_path)
    csv_path = results_file(args, f"{method}.csv")
    if csv_path is not None:
        append_csv_row(csv_path, row)
    if args.json:
        print(json.dumps(row))


class FreezeSchedule:
    """Counts optimiser steps and freezes BN statistics / activation ranges at their step."""

    def __init__(self, qmodel: torch.nn.Module, qat_cfg: quant.QATConfig, steps_per_epoch: int, step: int = 0):
        self.qmodel, self.step = qmodel, step
        self.bn_step = round(qat_cfg.freeze_bn * steps_per_epoch)
        self.obs_step = round(qat_cfg.freeze_observers * steps_per_epoch)
        self.apply()

    def apply(self) -> None:
        quant.set_bn_frozen(self.qmodel, self.step >= self.bn_step)
        quant.set_act_observers(self.qmodel, self.step < self.obs_step)

    def after_step(self) -> None:
        quant.clamp_lsq_(self.qmodel)
        self.step += 1
        self.apply()


@torch.no_grad()
def estimate_bn_statistics(model: torch.nn.Module, loader, num_batches: int) -> None:
    """Set every BatchNorm's running statistics to their average over the first ``num_batches`` of
    ``loader`` (epoch 0; train-mode forwards without gradient). For random weights: PyTorch's initial
    statistics (mean 0, variance 1) describe no real activations, and through MobileNetV2's 17 blocks the
    eval-mode activations shrink to about 1e-10, so the calibrated ranges are degenerate and the first
    QAT steps overflow ("observed range is not finite")."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(bn, bn.momentum) for bn in bns]
    was = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    loader.set_epoch(0)
    try:
        for i, (x, _) in enumerate(loader):
            if i >= num_batches:
                break
            model(x)
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
        model.train(was)


def build_qat_model(float_model: torch.nn.Module, qcfg: quant.QuantConfig, qat_cfg: quant.QATConfig,
                    calib_loader, progress: bool = True, fresh_bn: bool = False) -> torch.nn.Module:
    """quantize -> calibrate (PTQ init, first training batches of epoch 0) -> prepare_qat. ``fresh_bn``
    (random weights): first ``estimate_bn_statistics`` over the calibration batches."""
    if fresh_bn:
        estimate_bn_statistics(float_model, calib_loader, qcfg.calib_batches)
    qmodel = quant.quantize(float_model, qcfg)
    calib_loader.set_epoch(0)
    quant.calibrate(qmodel, calib_loader, num_batches=qcfg.calib_batches, progress=progress)
    return quant.prepare_qat(qmodel, qat_cfg)


def default_ptq_path(args: argparse.Namespace) -> Path:
    """The PTQ checkpoint PTQ.py writes with its defaults at ``args.bits`` (what export.py exports by default)."""
    return ptq_ckpt_path(args.dataset, args.model, quant.QuantConfig(weight_bits=args.bits, act_bits=args.bits))


def ptq_on_the_fly(args: argparse.Namespace, calib: Loader) -> quant.IntModel:
    """The integer model PTQ.py makes with its defaults (QuantConfig's), converted with ``args.clamp``."""
    cfg = quant.QuantConfig(weight_bits=args.bits, act_bits=args.bits, calib_batches=args.calib_batches)
    set_seed(args.seed)
    model, _ = load_float_model(args)
    qmodel = quant.quantize(model, cfg)
    quant.calibrate(qmodel, calib, num_batches=cfg.calib_batches, progress=True)
    return quant.convert(qmodel, clamp=args.clamp)


def names_from_source(args: argparse.Namespace) -> None:
    """Fill export.py's --dataset / --model (None where left out) from the --from checkpoint's meta, else
    with the usual defaults; a flag that names another model than the checkpoint's is a one-line error."""
    from utils.args import SHARED
    meta = quant.integer_meta(args.source) if args.source else {}
    for key in ("dataset", "model"):
        given, saved = getattr(args, key), meta.get(key)
        if given is not None and saved is not None and given != saved:
            raise CLIError(f"{args.source} holds a {meta.get('dataset')}/{meta.get('model')} model, not --{key} "
                           f"{given}; leave --dataset and --model out (the checkpoint names them)")
        setattr(args, key, given or saved or SHARED[key].default)


def load_export_source(args: argparse.Namespace,
                       calib: Loader | None) -> tuple[quant.IntModel | torch.nn.Module, Path, str]:
    """The model export.py exports (``args``: utils.args.export_parser's): (model, its source path, how it
    was obtained). The float checkpoint with --float; else the --from integer checkpoint, or the default
    PTQ checkpoint where it exists, or PTQ on the fly (``calib``: its calibration loader, made when None)."""
    if args.float:
        model, path = load_float_model(args)
        return model, Path(path), "float checkpoint"
    path = Path(args.source) if args.source else default_ptq_path(args)
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
