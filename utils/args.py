"""The command lines of the scripts: one definition per shared flag, the scripts' parsers, QAT.py's recipe.

Every flag that several scripts take (--dataset, --model, --bits, --data-root, --device, --seed, --json,
--dry-run, --results-dir, and --ckpt, --weight-bits, --act-bits, --per-tensor, --fc-per-channel, --rounding,
--calib-batches, --calib-batch-size, --resume, --stop-after) is defined once in SHARED, with one help text and
one default; a script that needs another default passes it (``add_shared(..., defaults=...)``), and a
script-specific remark is appended to the one text (``details``). Help texts that state a recipe
default are generated from utils/recipes.py (RECIPES, MODEL_RECIPES, QAT_RECIPES, MODEL_QAT_RECIPES, COMMON) and the
quantization defaults are QuantConfig's (quant/config.py), so they cannot drift from what the scripts use.

A run appends its result rows to runs/ (RUNS_DIR, git-ignored) unless --results-dir names another place:
the tracked tables under results/ change only through reproduce.py or an explicit --results-dir results.

The parsers of train.py, PTQ.py, QAT.py and export.py live here, not in the scripts, so that
reproduce.py (which hashes PTQ.py's and QAT.py's parsed flags and QAT.py's resolved recipe) and the
benchmarks (bench/inference.py parses export.py's flags) never import a script. Each parser has the
same groups: common flags, quantization settings, training recipe (where it trains), output and run
control, and "experimental" for knobs that were measured and gave no gain (each help says what was
measured and where: notes/training.md, notes/qat.md and the CSVs under results/).
"""
from __future__ import annotations

import argparse
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.config import LAYER_FIELDS, QuantConfig
from utils.training import PRECISIONS
from utils.recipes import (COMMON, MODEL_QAT_RECIPES, MODEL_RECIPES, ONE_CYCLE, QAT_RECIPES, RECIPES, model_recipe,
                           qat_recipe)

#: where a run's result rows and plots go without --results-dir (git-ignored, so a user's runs leave the
#: checkout clean); results/ is what reproduce.py writes and utils.report reads
RUNS_DIR = "runs"


@dataclass(frozen=True)
class Flag:
    """A shared flag: its help text (without the default), default, how the default reads in the help
    (None: no "(default: ...)"), and the other add_argument keywords."""
    help: str
    default: Any = None
    default_text: str | None = "%(default)s"
    kwargs: dict = field(default_factory=dict)


def _directory(text: str) -> str:
    """--results-dir: a directory, or a path where one can be made (checked before the run, not after it)."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; pass a directory (it is made if missing)")
    return text


def _models_text() -> str:
    from models import MODELS
    return "; ".join(f"{d}: {', '.join(ms)}" for d, ms in MODELS.items())


def _datasets_text() -> str:
    from models import MODELS
    return " or ".join(MODELS)


SHARED: dict[str, Flag] = {
    "dataset": Flag(f"data set: {_datasets_text()}", "fashion_mnist", kwargs=dict(metavar="NAME")),
    "model": Flag(f"model of the data set ({_models_text()})", "cnn", kwargs=dict(metavar="NAME")),
    "bits": Flag("bits of every weight and activation, 2..8", QuantConfig.act_bits, kwargs=dict(type=int, metavar="B")),
    "data_root": Flag("data directory", None, "$QDNN_DATA_ROOT, else datasets/", dict(metavar="DIR")),
    "device": Flag("auto (cuda if available), cpu or cuda", "auto", kwargs=dict(metavar="DEVICE")),
    "seed": Flag("random seed of the run", 0, kwargs=dict(type=int, metavar="N")),
    "json": Flag("print the results as JSON on the last line of the output", False, None,
                 dict(action="store_true")),
    "dry_run": Flag("synthetic data instead of the data set, to check a whole run in seconds", False, None,
                    dict(action="store_true")),
    "ckpt": Flag("float checkpoint", None, "ckpt/<dataset>_<model>.pt", dict(metavar="FILE")),
    "weight_bits": Flag("bits of the weights", None, "--bits", dict(type=int, metavar="B")),
    "act_bits": Flag("bits of the input and every activation", None, "--bits", dict(type=int, metavar="B")),
    "per_tensor": Flag("one scale per conv weight tensor", False, "per channel", dict(action="store_true")),
    "fc_per_channel": Flag("one scale per output channel of fully-connected weights too (bit-exact in LiteRT and TFLM; "
                           "TFLite's classic converter writes one per tensor)", False, "per tensor",
                           dict(action="store_true")),
    "layer": Flag("per-layer settings, repeatable, later ones win: PATTERN:field=value,... with fields "
                  f"{', '.join(LAYER_FIELDS)} (or wBaB), PATTERN a module path, type name, op kind or 'input' "
                  "(fnmatch); e.g. --layer fc:w8a8 --layer 'layer1.*:weight_bits=6'", None, None,
                  dict(action="append", metavar="PATTERN:SETTINGS")),
    "first_last": Flag("the model input, the first layer's weights and the last layer's weights and output at B "
                       "bits (the papers' convention)", None, None, dict(type=int, metavar="B")),
    "rounding": Flag("integer requantization: ref, builtin, xnnpack (LiteRT kernel sets) or tflm",
                     QuantConfig.rounding, kwargs=dict(metavar="MODE")),
    "calib_batches": Flag("training batches for calibration", QuantConfig.calib_batches,
                          kwargs=dict(type=int, metavar="N")),
    "calib_batch_size": Flag("images per calibration batch", 256, kwargs=dict(type=int, metavar="N")),
    "resume": Flag("continue from the checkpoint at --out", False, None, dict(action="store_true")),
    "stop_after": Flag("stop after this many epochs in this run, as if interrupted (to test --resume)", None,
                       None, dict(type=int, metavar="N")),
    "results_dir": Flag("directory of the CSV files the run appends its rows to; pass results to update the tracked "
                        "tables that python -m utils.report puts into README", None,
                        f"{RUNS_DIR}/, git-ignored", dict(type=_directory, metavar="DIR")),
}


def results_file(args: argparse.Namespace, name: str) -> Path | None:
    """Where the run writes its result file ``name`` (e.g. 'ptq.csv'): in --results-dir, else in RUNS_DIR;
    None for a --dry-run without --results-dir (a dry run writes nothing unless asked)."""
    if args.results_dir is None and args.dry_run:
        return None
    return Path(args.results_dir or RUNS_DIR) / name


def _esc(text: str) -> str:
    """``text`` safe inside an argparse help string (which %-formats it)."""
    return text.replace("%", "%%")


def add_shared(group, *names: str, defaults: dict | None = None, default_texts: dict | None = None,
               details: dict | None = None) -> None:
    """Add the SHARED flags ``names`` to ``group`` (a parser or an argument group). ``defaults``: another
    default for a flag (then ``default_texts`` says how it reads); ``details``: a remark of this script
    appended to the flag's one help text."""
    defaults, default_texts, details = defaults or {}, default_texts or {}, details or {}
    for name in names:
        flag = SHARED[name]
        text = flag.help + (f"; {details[name]}" if name in details else "")
        shown = default_texts.get(name, flag.default_text if name not in defaults else "%(default)s")
        if shown:
            text += f" (default: {shown})"
        group.add_argument("--" + name.replace("_", "-"), default=defaults.get(name, flag.default), help=text,
                           **flag.kwargs)


def new_parser(description: str | None) -> argparse.ArgumentParser:
    """A script's parser: its docstring as the description, kept as written."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_group(parser: argparse.ArgumentParser, title: str, description: str | None = None):
    """An argument group whose description is wrapped here (the parsers keep descriptions as written)."""
    width = min(shutil.get_terminal_size().columns, 100) - 4
    return parser.add_argument_group(title, textwrap.fill(description, width) if description else None)


# ---- recipe defaults as help text (utils/recipes.py) ----

def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _bit_ranges(bits: list[int]) -> str:
    """[8, 7] -> '7-8'; [2] -> '2'; [6, 5, 3] -> '3, 5-6'."""
    bits, runs = sorted(bits), []
    for b in bits:
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def _files(value: str) -> str:
    """A comma list of checkpoints as help text: 'a.pt + b.pt' (wraps at the spaces)."""
    return " + ".join(value.split(",")) if value else "none"


def train_default(key: str, fmt=_fmt) -> str:
    """train.py's default of recipe ``key``: per data set (RECIPES) where they differ, with the models that
    differ from their data set's (MODEL_RECIPES), e.g. 'fashion_mnist 60, cifar10 40 (resnet8 50)'."""
    odd = {d: [f"{m} {fmt(model_recipe(d, m)[key])}" for dd, m in MODEL_RECIPES
               if dd == d and model_recipe(d, m)[key] != RECIPES[d][key]] for d in RECIPES}
    bases = {fmt(r[key]) for r in RECIPES.values()}
    if len(bases) == 1:
        models = [f"{d} {m}" for d in RECIPES for m in odd[d]]
        return _esc(bases.pop() + (f" ({', '.join(models)})" if models else ""))
    return _esc(", ".join(f"{d} {fmt(r[key])}" + (f" ({', '.join(odd[d])})" if odd[d] else "")
                          for d, r in RECIPES.items()))


def schedule_text() -> str:
    """The learning-rate schedule of every recipe (utils.recipes.ONE_CYCLE, utils.pipeline.one_cycle)."""
    return _esc(f"one-cycle schedule: per step, linear warm-up from {_fmt(ONE_CYCLE['start'])} x the peak over the "
                f"first {ONE_CYCLE['warmup']:.0%} of the steps, then linear decay to 0")


def dataset_default(key: str) -> str:
    """The data set's float-recipe value of ``key`` (RECIPES, without MODEL_RECIPES)."""
    return _esc(", ".join(f"{d} {_fmt(r[key])}" for d, r in RECIPES.items()))


def qat_default(key: str) -> str:
    """QAT.py's default of ``key`` per bit width (QAT_RECIPES, else COMMON), e.g. 'ste at 7-8 bits, lsq at 2-6',
    then the models whose recipe changes it (MODEL_QAT_RECIPES), e.g. ' (cifar10 resnet8 6 at 6, 24 at 4)'."""
    per_bits = {b: r.get(key, COMMON.get(key)) for b, r in QAT_RECIPES.items()}
    values: dict[str, list[int]] = {}
    for b, v in sorted(per_bits.items(), reverse=True):
        values.setdefault(_fmt(v), []).append(b)
    models = [f"{d} {m} " + ", ".join(f"{_fmt(c[key])} at {b}" for b, c in sorted(changes.items(), reverse=True)
                                      if key in c)
              for (d, m), changes in MODEL_QAT_RECIPES.items() if any(key in c for c in changes.values())]
    extra = f" ({'; '.join(models)})" if models else ""
    if len(values) == 1:
        return _esc(next(iter(values)) + extra)
    parts = [f"{v} at {_bit_ranges(bs)}" for v, bs in values.items()]
    return _esc(parts[0] + " bits, " + ", ".join(parts[1:]) + extra)


# ---- train.py ----

TRAIN_SWEEP = "results/fmnist_recipe_sweep.csv, notes/training.md"
AUGMENT = ("comma list applied to each training batch in order: crop<P> (random crop of the P-pixel reflect-padded "
           "image), flip (left-right, half the images), erase<P> (one random rectangle zeroed in P%% of the images); "
           "'' for none")


def train_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = new_parser(description)
    common = add_group(p, "common flags")
    add_shared(common, "dataset", "model", "data_root", "device", "seed",
               details={"seed": "initial weights, order and augmentation of the training batches"})
    rec = add_group(p, "training recipe", "a flag left out takes the recipe of --dataset and --model "
                               "(RECIPES and MODEL_RECIPES in utils/recipes.py)")
    rec.add_argument("--optimizer", metavar="NAME", help=f"sgd (Nesterov momentum {train_default('momentum')}) or adamw "
                     f"(default: {train_default('optimizer')})")
    rec.add_argument("--epochs", type=int, metavar="N", help=f"epochs (default: {train_default('epochs')})")
    rec.add_argument("--lr", type=float, help=f"peak learning rate of the {schedule_text()} "
                     f"(default: {train_default('lr')})")
    rec.add_argument("--batch-size", type=int, metavar="N", help=f"training batch size (default: {train_default('batch_size')})")
    rec.add_argument("--weight-decay", type=float, metavar="WD",
                     help=f"weight decay of the weights, not of biases and BN parameters (default: "
                          f"{train_default('weight_decay')})")
    rec.add_argument("--label-smoothing", type=float, metavar="EPS",
                     help=f"cross-entropy label smoothing (default: {train_default('label_smoothing')})")
    rec.add_argument("--augment", metavar="LIST", help=f"{AUGMENT}; erase<P> was tried on Fashion-MNIST and is in no "
                     f"default recipe ({TRAIN_SWEEP}) (default: {train_default('augment')})")
    rec.add_argument("--teacher", metavar="FILES", help="comma list of float checkpoints of the same data set whose "
                     f"mean logits are distilled into the model; '' for none (default: {train_default('teacher', _files)})")
    rec.add_argument("--kd-weight", type=float, metavar="W", help="weight of the distillation term, 0..1 "
                     f"(default: {train_default('kd_weight')})")
    rec.add_argument("--kd-temp", type=float, metavar="T", help=f"distillation temperature (default: {train_default('kd_temp')})")
    rec.add_argument("--precision", choices=tuple(PRECISIONS), help="bf16: forward and backward passes autocast to "
                     "bfloat16 (weights, optimizer and evaluation stay float32); on CPUs with AVX512-BF16 the "
                     "ResNets' epochs take 0.6 of the time, MobileNetV2's twice as long (depthwise convs), and CPUs "
                     f"without bf16 instructions are slower; GPUs: not measured here (default: {train_default('precision')})")
    run = add_group(p, "output and run control")
    run.add_argument("--out", default=None, metavar="FILE", help=f"checkpoint path (default: {RUNS_DIR}/ckpt/<dataset>_"
                     f"<model>.pt, git-ignored; with --eval-only: the shipped ckpt/<dataset>_<model>.pt; "
                     f"reproduce.py --retrain writes ckpt/)")
    add_shared(run, "results_dir", details={"results_dir": "a finished run's row goes to DIR/train.csv"})
    add_shared(run, "resume")
    run.add_argument("--eval-only", action="store_true", help="only evaluate the checkpoint at --out")
    add_shared(run, "dry_run", details={"dry_run": "1 epoch unless --epochs; writes only where --out / --results-dir "
                                                   "name a place"})
    add_shared(run, "stop_after")
    add_shared(run, "json")
    exp = add_group(p, "experimental", "off by default: measured without a gain over the default recipe")
    exp.add_argument("--sam-rho", type=float, metavar="RHO", help="radius of sharpness-aware minimisation steps, "
                     "0 = plain steps; on Fashion-MNIST it did not beat training 60 instead of 30 epochs "
                     f"({TRAIN_SWEEP}) (default: {train_default('sam_rho')})")
    exp.add_argument("--ema-decay", type=float, metavar="D", help="decay of the weight EMA that is evaluated and "
                     "saved, 0 disables; on Fashion-MNIST it did not beat training 60 instead of 30 epochs "
                     f"({TRAIN_SWEEP}) (default: {train_default('ema_decay')})")
    return p


# ---- PTQ.py ----

def ptq_parser(description: str | None = None) -> argparse.ArgumentParser:
    from quant.adaround import AdaRoundConfig
    p = new_parser(description)
    common = add_group(p, "common flags")
    add_shared(common, "dataset", "model", "bits", "data_root", "device", "seed",
               details={"seed": "the calibration batches (and the random weights of --dry-run)"})
    q = add_group(p, "quantization settings")
    add_shared(q, "weight_bits", "act_bits", "per_tensor", "fc_per_channel")
    q.add_argument("--observer", default=QuantConfig.observer, metavar="NAME", help="activation calibrator: mse "
                   "(clipped for least squared error), minmax, ema (moving average, momentum "
                   f"{QuantConfig.ema_momentum}), percentile (--percentile) or entropy (least KL divergence) "
                   "(default: %(default)s)")
    q.add_argument("--weight-range", default=QuantConfig.weight_range, metavar="NAME", help="weight range per channel "
                   "(per tensor with --per-tensor): minmax (max |w|), mse (clipped for least squared error) or percentile "
                   "(of |w|) (default: %(default)s)")
    q.add_argument("--percentile", type=float, default=QuantConfig.percentile, metavar="P", help="percentile of the "
                   "percentile calibrators (default: %(default)s)")
    q.add_argument("--method", dest="methods", default="", metavar="LIST", help="comma list of PTQ methods: cle "
                   "(cross-layer equalisation), bias_absorption (after cle: high biases of conv+BN+ReLU pairs move "
                   "into the next layer), adaround (learned rounding), bias_correction, act_tune (activation step sizes "
                   "learned for the float logits), output_range (the logits' range chosen to keep the float model's "
                   "top-1 class); they run in that order (default: none)")
    q.add_argument("--adaround-iters", type=int, default=AdaRoundConfig.iterations, metavar="N",
                   help="AdaRound iterations per layer (default: %(default)s)")
    add_shared(q, "layer", "first_last", "calib_batches", "calib_batch_size", "rounding")
    a = add_group(p, "analysis (instead of one quantized model)")
    a.add_argument("--compare", nargs="?", const="all", metavar="NAMES", help="run the calibrators and methods of "
                   "quant.COMPARISON side by side at these bits (all, or the ';'-separated names given), print the "
                   "table and append the rows to ptq_methods.csv in --results-dir")
    a.add_argument("--analyze", action="store_true", help="after quantizing: each layer's logit SQNR (alone, "
                   "cumulative) and accuracy alone, then a greedy search over per-layer weight bits (--search-bits); "
                   "rows to sensitivity.csv and mixed_precision.csv in --results-dir, plot sensitivity_*.png beside them")
    a.add_argument("--search-bits", default="8,6,4", metavar="LIST", help="weight bit widths the --analyze search "
                   "may give a layer (default: %(default)s)")
    run = add_group(p, "output and run control")
    add_shared(run, "ckpt")
    run.add_argument("--out", default=None, metavar="FILE", help="integer model checkpoint (default: "
                     "results/ckpt/ptq_<dataset>_<model>_<tag>_<observer>[-w<weight range>][-<method>...].pt, "
                     "git-ignored; the weight range only where not minmax)")
    add_shared(run, "results_dir", details={"results_dir": "the row goes to DIR/ptq.csv"})
    add_shared(run, "dry_run", "json", details={"dry_run": "random weights; writes nothing unless --out / "
                                                           "--results-dir are given"})
    return p


# ---- QAT.py ----

QAT_SWEEP = "results/qat_sweep.csv, notes/qat.md"


def qat_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = new_parser(description)
    common = add_group(p, "common flags")
    add_shared(common, "dataset", "model", "bits", "data_root", "device", "seed",
               details={"bits": "also picks the recipe, QAT_RECIPES[bits]",
                        "seed": "the calibration batches, order and augmentation of the training batches (and the "
                                "initial weights with --from-scratch)"})
    q = add_group(p, "quantization settings")
    add_shared(q, "weight_bits", "act_bits")
    q.add_argument("--quantizer", choices=("ste", "lsq", "lsq+"), help="ste (EMA ranges + straight-through), lsq "
                   "(learned step sizes) or lsq+ (lsq with learned activation offsets) "
                   f"(default: {qat_default('quantizer')})")
    q.add_argument("--observer", metavar="NAME", help="calibrator of the PTQ start, as PTQ.py's --observer "
                   f"(default: {qat_default('observer')}, PTQ.py's)")
    add_shared(q, "calib_batches", "rounding", "per_tensor", "fc_per_channel", "layer", "first_last",
               defaults={"calib_batches": None},
               default_texts={"calib_batches": qat_default("calib_batches")})
    rec = add_group(p, "training recipe", "a flag left out takes QAT_RECIPES[--bits] and COMMON, with the "
                               "model's changes in MODEL_QAT_RECIPES "
                               "(utils/recipes.py); with --from-scratch, epochs, lr, weight decay and augmentation "
                               "come from train.py's recipe")
    scratch = "; --from-scratch: train.py's, {}"
    kd = qat_default("kd_weight")
    rec.add_argument("--epochs", type=int, metavar="N", help=f"QAT epochs (default: {qat_default('epochs')}"
                     + scratch.format(train_default("epochs")) + ")")
    rec.add_argument("--lr", type=float, help=f"peak learning rate of {qat_default('optimizer')} (Nesterov momentum "
                     f"{qat_default('momentum')}) with the {schedule_text()} (default: {qat_default('lr')}"
                     + scratch.format(train_default("lr")) + ")")
    rec.add_argument("--weight-decay", type=float, metavar="WD", help="SGD weight decay (default: "
                     f"{qat_default('weight_decay')}" + scratch.format(train_default("weight_decay")) + ")")
    rec.add_argument("--batch-size", type=int, metavar="N", help=f"training batch size (default: {qat_default('batch_size')})")
    rec.add_argument("--freeze-bn", type=float, metavar="EPOCH", help="epoch (fractional allowed) after which BN "
                     f"statistics freeze (default: this fraction of --epochs: {qat_default('freeze_bn')})")
    rec.add_argument("--freeze-observers", type=float, metavar="EPOCH", help="epoch after which activation ranges "
                     f"freeze (default: this fraction of --epochs: {qat_default('freeze_observers')})")
    rec.add_argument("--augment", metavar="LIST", help=f"{AUGMENT} (default: the "
                     f"data set's float recipe: {dataset_default('augment')}"
                     + scratch.format(train_default("augment")) + ")")
    rec.add_argument("--from-scratch", action="store_true", help="start from random weights instead of the float "
                     "checkpoint (epochs, lr, weight decay and augmentation default to train.py's recipe)")
    run = add_group(p, "output and run control")
    add_shared(run, "ckpt")
    run.add_argument("--out", default=None, metavar="FILE", help="QAT checkpoint, saved every epoch (default: "
                     "results/ckpt/qat_<dataset>_<model>_<tag>_<quantizer>.pt, git-ignored); the integer model "
                     "goes beside it as *.int.pt")
    add_shared(run, "results_dir", details={"results_dir": "the row goes to DIR/qat.csv"})
    add_shared(run, "resume", "dry_run", "stop_after", "json",
               details={"dry_run": "1 epoch unless --epochs, the shipped float weights (random with --from-scratch); "
                                   "writes nothing unless --out / --results-dir are given"})
    exp = add_group(p, "experimental", "off by default: at 4 bits on Fashion-MNIST cnn_bn no variant "
                               f"moved the mean integer accuracy beyond the seed-to-seed spread ({QAT_SWEEP})")
    exp.add_argument("--kd-weight", type=float, metavar="W", help="weight, 0..1, of distilling the teacher's logits "
                     "into the quantized model (train.py's loss); distillation at 4 bits (Fashion-MNIST cnn_bn, "
                     f"0.5, T 4) stayed within the seed spread ({QAT_SWEEP}) (default: {kd}"
                     + ("" if kd == "0" else "; --from-scratch: 0") + ")")
    exp.add_argument("--kd-temp", type=float, metavar="T", help="distillation temperature, with --kd-weight "
                     f"(default: {qat_default('kd_temp')})")
    exp.add_argument("--teacher", metavar="FILES", help="comma list of float checkpoints whose mean logits are "
                     "distilled with --kd-weight, as train.py's --teacher (default: the float checkpoint being "
                     "quantized)")
    exp.add_argument("--bn-momentum", type=float, metavar="M", help="PyTorch momentum of the BN running statistics "
                     "during QAT, before the BN freeze; 0.01 at 4 bits (Fashion-MNIST cnn_bn, seeds 0-3) stayed "
                     f"within the seed spread ({QAT_SWEEP}) (default: "
                     + (qat_default("bn_momentum").replace("none", "the float model's, 0.1")) + ")")
    exp.add_argument("--fold-grad-scale", action=argparse.BooleanOptionalAction, default=None,
                     help="scale each fused Conv+BN weight's gradient by (sigma/gamma)^2 so its folded weight steps "
                     "like a plain conv's; at 4 bits (Fashion-MNIST cnn_bn, seeds 0-3) within the seed spread "
                     f"({QAT_SWEEP}) (default: {qat_default('fold_grad_scale')})")
    exp.add_argument("--weight-range", choices=("minmax", "mse"), help="weight range per channel, the PTQ start of "
                     "ste's ranges and lsq's step sizes: minmax (max |w|) or mse (clipped for least squared error); "
                     "mse at 4 bits is a better PTQ start (Fashion-MNIST cnn_bn 90.63%% against 89.89%%) but not a "
                     f"better QAT end ({QAT_SWEEP}) (default: {qat_default('weight_range')})")
    return p


def fill_qat_recipe(args: argparse.Namespace) -> dict:
    """QAT.py's settings: QAT_RECIPES[bits] (or utils.recipes.RECIPES with --from-scratch) merged under the
    command line ``args`` (from qat_parser)."""
    from utils.cli import CLIError, check_names
    from utils.pipeline import check_distillation
    if args.bits not in QAT_RECIPES:
        raise CLIError(f"--bits must be an integer in 2..8, got {args.bits}; pick a bit width from 2 to 8")
    check_names(args.dataset, args.model)
    train_recipe = model_recipe(args.dataset, args.model)
    # Fine-tuning uses the data set's augmentation, not a model's extra regularisation
    # (utils.recipes.MODEL_RECIPES): a few QAT epochs must fit the quantized weights, and extra augmentation
    # costs accuracy there (Fashion-MNIST cnn_bn, 4 bits lsq: 91.18% without flips, 90.84% with).
    cfg = dict(qat_recipe(args.dataset, args.model, args.bits), label_smoothing=train_recipe["label_smoothing"],
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


# ---- export.py ----

def export_parser(description: str | None = None) -> argparse.ArgumentParser:
    from utils.pipeline import ptq_ckpt_path
    ptq_ckpt = str(ptq_ckpt_path("<dataset>", "<model>", QuantConfig(weight_bits=2, act_bits=2)))
    ptq_ckpt = ptq_ckpt.replace("w2a2", "w<B>a<B>")
    p = new_parser(description)
    common = add_group(p, "common flags")
    from_ckpt = "or the --from checkpoint's"
    add_shared(common, "dataset", "model", "bits", "data_root", "seed",
               defaults={"dataset": None, "model": None, "bits": None},
               default_texts={"dataset": f"{SHARED['dataset'].default}, {from_ckpt}",
                              "model": f"{SHARED['model'].default}, {from_ckpt}",
                              "bits": f"{QuantConfig.act_bits}, {from_ckpt}"},
               details={"seed": "the calibration batches of the on-the-fly PTQ"})
    src = add_group(p, "model to export")
    src.add_argument("--from", dest="source", default=None, metavar="FILE",
                     help=f"integer checkpoint from PTQ.py or QAT.py (default: the one PTQ.py saves with its defaults, "
                          f"{ptq_ckpt}, made on the fly as PTQ.py makes it if absent)")
    src.add_argument("--float", action="store_true", help="export the float32 model ckpt/<dataset>_<model>.pt "
                                                          "instead (BatchNorm folded)")
    add_shared(src, "ckpt")
    src.add_argument("--int8-input", action="store_true", help="the file takes the quantized int8 image "
                                                               "(default: float32 image and a QUANTIZE op)")
    q = add_group(p, "quantization settings (of the PTQ made on the fly)")
    q.add_argument("--clamp", default="bits", metavar="MODE", help="activation clamps: bits (the b-bit ranges, as PTQ.py "
                   "evaluates) or int8 (LiteRT's fused-activation ranges; made on the fly) (default: %(default)s)")
    add_shared(q, "calib_batches", "calib_batch_size")
    run = add_group(p, "output and run control")
    run.add_argument("--out", default=None, metavar="FILE", help="the .tflite file (default: the checkpoint path "
                     "with .tflite; --float: results/ckpt/<dataset>_<model>_float32.tflite)")
    run.add_argument("--c-array", action="store_true", help="also write the file as a C source and header "
                                                            "(<out>.c, <out>.h) for a TFLM application")
    run.add_argument("--verify", action="store_true", help="compare with LiteRT and TFLM over the whole test set")
    run.add_argument("--threads", type=int, default=1, metavar="N", help="LiteRT threads for --verify "
                     "(default: %(default)s)")
    add_shared(run, "results_dir", details={"results_dir": "--verify's row goes to DIR/export_verify.csv (a --dry-run "
                                                           "writes none unless --results-dir is given)"})
    add_shared(run, "dry_run", "json", details={"dry_run": "random weights, the model made on the fly; needs --out"})
    return p
