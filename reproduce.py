"""Reproduce the accuracy tables and the plot with one command, the seed repository's figures beside ours.

    python reproduce.py                          # 2 data sets x 2 models x bits 4,6,8 x PTQ, QAT-ste, QAT-lsq
    python reproduce.py --bits 2-8 --seeds 3     # every bit width; QAT cells over seeds 0..2 (mean ± std)
    python reproduce.py --quick                  # Fashion-MNIST cnn, 4 and 8 bits, PTQ and 1 QAT epoch -> results/quick/
    python reproduce.py --report-only            # rewrite RESULTS.md and the plot from results.csv
    python reproduce.py --dry-run --out /tmp/r   # synthetic data through every script (seconds per cell)

Every cell (data set, model, bits, method, seed) runs PTQ.py or QAT.py with their defaults (QAT.py
only gets --quantizer, and --epochs where given) as a separate process on the shipped float
checkpoint ckpt/<dataset>_<model>.pt (--retrain trains them first, --jobs at once, resumable). Each finished run
appends one row to <out>/results.csv (every setting, seed, the float / fake-quant / integer accuracy,
agreement, wall time, versions, commit) and its script's own row to <out>/ptq.csv or <out>/qat.csv;
then <out>/RESULTS.md and <out>/accuracy_vs_bits.png are rewritten from results.csv alone.

Resumable: a cell is identified by the hash of its resolved settings (the script's flags with its
defaults filled in, QAT_RECIPES included, and the float checkpoint's sha1), stored in results.csv's
`cell` column; a cell whose hash is there already is skipped ("cached"). An interrupted run loses only
the cells that were running; rerun the same command to continue. A changed recipe or a retrained
checkpoint changes the hash, so those cells run again. PTQ runs once (seed 0); --seeds N repeats the
QAT cells with seeds 0..N-1.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from utils.args import add_group, add_shared, fill_qat_recipe, new_parser, ptq_parser, qat_default, qat_parser
from utils.cli import CLIError, check_names, one_line_errors, resolve_device
from utils.io import REPO_ROOT, append_csv_row, atomic_write_bytes, load_checkpoint
from utils.recipes import QAT_RECIPES
from utils.results_tables import METHODS, read_results, render_results_md, write_results

DATASETS, MODELS, BITS = ("fashion_mnist", "cifar10"), ("cnn", "cnn_bn"), "4,6,8"
QUICK = dict(datasets="fashion_mnist", models="cnn", bits="4,8", methods="ptq,qat", epochs=1, out="results/quick")
#: --zoo: the CIFAR-10 zoo (models with a shipped checkpoint, unless --retrain or --models says otherwise)
ZOO_MODELS = ("resnet8", "resnet20", "mobilenetv2")
ZOO = dict(datasets="cifar10", models=",".join(ZOO_MODELS), bits="4,6,8", methods="ptq,qat", epochs=None,
           out="results/zoo")
FULL = dict(datasets=",".join(DATASETS), models=",".join(MODELS), bits=BITS, methods=",".join(METHODS), epochs=None,
            out="results")
#: flags of PTQ.py / QAT.py that say where or how to run, not what is computed: left out of a cell's hash
NOT_SETTINGS = ("device", "data_root", "ckpt", "out", "results_dir", "json", "resume", "stop_after")
#: settings added to QAT.py after cells were cached, at the values that compute what the code did before
#: they existed: left out of the hash at exactly these values, so those cells stay cached
NEUTRAL_SETTINGS = {"kd_weight": 0.0, "kd_temp": 1.0, "teacher": "", "bn_momentum": None,
                    "fold_grad_scale": False, "weight_range": "minmax", "weight_bits": None, "act_bits": None,
                    "percentile": 99.99, "methods": "", "adaround_iters": 2000, "layer": None, "first_last": None,
                    "compare": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    common = add_group(p, "common flags")
    add_shared(common, "data_root", "device", details={"device": "passed to every script"})
    g = add_group(p, "the grid", "each cell runs PTQ.py or QAT.py with their defaults (utils/args.py, "
                             "utils/recipes.py)")
    g.add_argument("--datasets", metavar="LIST", help=f"comma list (default: {FULL['datasets']}; --quick: "
                   f"{QUICK['datasets']})")
    g.add_argument("--models", metavar="LIST", help=f"comma list (default: {FULL['models']}; --quick: {QUICK['models']})")
    g.add_argument("--bits", metavar="LIST", help=f"bit widths, '4,6,8' or a range '2-8', within 2..8 (default: {BITS}; "
                                                  f"--quick: {QUICK['bits']})")
    g.add_argument("--methods", metavar="LIST", help=f"comma list of ptq, qat-ste, qat-lsq, and qat (QAT.py's default "
                   f"quantizer at each bit width) (default: {FULL['methods']}; --quick: {QUICK['methods']})")
    g.add_argument("--epochs", type=int, metavar="N", help="QAT epochs for every QAT cell (default: QAT.py's recipe, "
                   f"{qat_default('epochs')}; --quick: 1)")
    g.add_argument("--seeds", type=int, default=1, metavar="N", help="repeat each QAT cell with seeds 0..N-1 "
                   "(default: %(default)s)")
    g.add_argument("--quick", action="store_true", help=f"a small subset in a few minutes, into {QUICK['out']}/")
    g.add_argument("--zoo", action="store_true", help=f"the CIFAR-10 zoo ({', '.join(ZOO_MODELS)} where ckpt/ has "
                   f"them), bits {ZOO['bits']}, PTQ and QAT with the default quantizer, into {ZOO['out']}/")
    g.add_argument("--retrain", action="store_true", help="train the float checkpoints with train.py first, --jobs "
                   "at once, into <out>/float/ (resumable: rerun to continue); each finished one replaces "
                   "ckpt/<dataset>_<model>.pt (default: use the shipped ckpt/*.pt)")
    run = add_group(p, "output and run control")
    run.add_argument("--out", metavar="DIR", help="directory of results.csv, RESULTS.md, the plot, ptq.csv, qat.csv "
                     "and ckpt/ (default: results; --quick: results/quick; --dry-run: a temporary directory)")
    run.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                     help="cells run at once, each with cores/jobs threads (default: %(default)s, i.e. min(2, cores))")
    run.add_argument("--force", action="store_true", help="rerun cells already in results.csv")
    run.add_argument("--stop-after", type=int, default=None, metavar="N", help="start at most this many cells, then "
                     "stop as if interrupted (to test resuming)")
    run.add_argument("--list", action="store_true", help="print one shell command per pending cell (for a job array or "
                     "GNU parallel: each runs that cell alone with --cell and appends its row), then exit")
    run.add_argument("--shard", metavar="I/N", help="run only the cells whose hash falls in shard I of N (I = 0..N-1): "
                     "N machines sharing --out on one filesystem finish the grid together")
    run.add_argument("--cell", action="append", metavar="HASH", help="run only the cell with this hash (repeatable; "
                     "the hashes --list prints)")
    run.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md and the plot from results.csv")
    add_shared(run, "dry_run", details={"dry_run": "through the scripts' --dry-run (PTQ: random weights; QAT: the "
                                                   "shipped ones); writes nothing unless --out is given"})
    args = p.parse_args(argv)
    if args.quick and args.zoo:
        raise CLIError("--quick and --zoo are two different grids; pick one")
    group = QUICK if args.quick else ZOO if args.zoo else FULL
    if args.zoo and args.models is None and not args.retrain and not args.dry_run:
        shipped = [m for m in ZOO_MODELS if (REPO_ROOT / f"ckpt/cifar10_{m}.pt").exists()]
        for m in ZOO_MODELS:
            if m not in shipped:
                print(f"--zoo: {m} left out, no ckpt/cifar10_{m}.pt (train it with python train.py --dataset cifar10 "
                      f"--model {m}, or pass --retrain)", file=sys.stderr)
        group = dict(group, models=",".join(shipped))
    for key, value in group.items():
        if getattr(args, key) is None and not (key == "out" and args.dry_run):
            setattr(args, key, value)
    return args


def parse_bits(text: str) -> list[int]:
    """'4,6,8' -> [4, 6, 8]; '2-8' -> [2, ..., 8]; every width within 2..8."""
    bits: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            bits.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise CLIError(f"--bits {text!r} is not a list like 4,6,8 or a range like 2-8") from None
    if not bits or min(bits) < 2 or max(bits) > 8:
        raise CLIError(f"--bits {text!r}: every bit width must be in 2..8")
    return sorted(bits)


def split_names(text: str, flag: str, valid: tuple[str, ...]) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise CLIError(f"unknown {flag} {','.join(bad) or repr(text)}; choose from: {', '.join(valid)}")
    return names


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    bits: int
    method: str  # ptq, qat-ste or qat-lsq
    seed: int

    @property
    def quantizer(self) -> str:
        return self.method.partition("-")[2]

    @property
    def name(self) -> str:
        return f"{self.dataset} {self.model} {self.bits}-bit {self.method} seed {self.seed}"

    def flags(self, epochs: int | None, dry_run: bool) -> list[str]:
        """The flags of the run that change what it computes (its script's defaults do the rest)."""
        f = ["--dataset", self.dataset, "--model", self.model, "--bits", str(self.bits), "--seed", str(self.seed)]
        if self.quantizer:
            f += ["--quantizer", self.quantizer] + (["--epochs", str(epochs)] if epochs else [])
        return f + (["--dry-run"] if dry_run else [])


def make_cells(args: argparse.Namespace) -> list[Cell]:
    """The grid in run order; 'qat' becomes QAT.py's default quantizer at each bit width."""
    datasets = split_names(args.datasets, "--datasets", DATASETS)
    models = split_names(args.models, "--models", MODELS + ZOO_MODELS)
    methods = split_names(args.methods, "--methods", METHODS + ("qat",))
    for d in datasets:
        for m in models:
            check_names(d, m)
    cells: list[Cell] = []
    for d in datasets:
        for m in models:
            for b in parse_bits(args.bits):
                for method in methods:
                    method = f"qat-{QAT_RECIPES[b]['quantizer']}" if method == "qat" else method
                    for seed in range(1 if method == "ptq" else args.seeds):
                        cells.append(Cell(d, m, b, method, seed))
    return list(dict.fromkeys(cells))


def settings_hash(settings: dict) -> str:
    """A stable 12-hex-digit hash of a settings dict (sha1 of its JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def cell_settings(cell: Cell, epochs: int | None, dry_run: bool, float_id: str) -> dict:
    """Everything the cell's run computes from: its script's parsed flags with their defaults (QAT: the
    resolved recipe), without the flags that only say where to run or write, and the float checkpoint."""
    flags = cell.flags(epochs, dry_run)
    if cell.method == "ptq":
        settings = vars(ptq_parser().parse_args(flags))
    else:
        ns = qat_parser().parse_args(flags)
        settings = {**vars(ns), **fill_qat_recipe(ns)}
    settings = {k: v for k, v in settings.items()
                if k not in NOT_SETTINGS and not (k in NEUTRAL_SETTINGS and v == NEUTRAL_SETTINGS[k])}
    return {"script": "PTQ.py" if cell.method == "ptq" else "QAT.py", "method": cell.method, **settings,
            "float_ckpt": float_id}


def float_ckpt_id(cell: Cell, dry_run: bool) -> str:
    """The sha1 of ckpt/<dataset>_<model>.pt (retraining changes it); 'random-init' for PTQ.py's dry run,
    which does not load it (QAT.py's dry run fine-tunes the shipped weights on synthetic data)."""
    if dry_run and cell.method == "ptq":
        return "random-init"
    dataset, model = cell.dataset, cell.model
    path = REPO_ROOT / "ckpt" / f"{dataset}_{model}.pt"
    if not path.exists():
        raise CLIError(f"{path.relative_to(REPO_ROOT)} not found; train it with: python train.py --dataset {dataset} "
                       f"--model {model} (or pass --retrain)")
    return "sha1:" + file_sha1(path)


@functools.lru_cache(maxsize=None)
def file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def jobs_env(jobs: int) -> dict[str, str]:
    """The environment of a subprocess that runs beside ``jobs - 1`` others: cores / jobs threads each,
    unless OMP_NUM_THREADS is set already."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def retrain(args: argparse.Namespace, cells: list[Cell], out: Path, ckpt_dir: Path = REPO_ROOT / "ckpt") -> None:
    """Train the float checkpoint of every (data set, model) in the grid with train.py's default recipe,
    ``--jobs`` at once, each into <out>/float/ (every epoch, atomically); a finished one is then copied
    over ckpt/<dataset>_<model>.pt. Resumable: rerunning continues each training from its last epoch
    (train.py --resume), and an interrupted one never touches the shipped checkpoint."""
    pairs = list(dict.fromkeys((c.dataset, c.model) for c in cells))
    env = jobs_env(min(args.jobs, len(pairs)))

    def train(pair: tuple[str, str]) -> tuple[tuple[str, str], int, Path]:
        d, m = pair
        path = out / "float" / f"{d}_{m}.pt"
        cmd = [sys.executable, "train.py", "--dataset", d, "--model", m, "--device", args.device, "--out", str(path),
               "--results-dir", str(out)] + (["--data-root", args.data_root] if args.data_root else [])
        cmd += ["--resume"] if path.exists() else []
        print(f"training {d}/{m} into {path}: {' '.join(cmd[1:])}", flush=True)
        return pair, subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode, path

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(train, pairs))
    failed = [f"{d}/{m}" for (d, m), rc, _ in done if rc != 0]
    if failed:
        raise CLIError(f"train.py failed for {', '.join(failed)} (output above); fix it and rerun (the trainings "
                       f"continue from their last epoch), or drop --retrain")
    for (d, m), _, path in done:
        ckpt = load_checkpoint(path, "rerun with --retrain")
        if ckpt["epoch"] != ckpt["config"]["epochs"]:
            raise CLIError(f"{path} stopped after epoch {ckpt['epoch']} of {ckpt['config']['epochs']}; rerun to continue")
        target = ckpt_dir / f"{d}_{m}.pt"
        if not target.exists() or file_sha1(target) != file_sha1(path):
            atomic_write_bytes(target, path.read_bytes())
            print(f"{d}/{m}: {ckpt['metrics']['test_acc']:.2f}% after {ckpt['epoch']} epochs, copied to {target}")


@dataclass
class Run:
    """One cell to run: its settings hashes, command, and where its script writes."""
    cell: Cell
    cell_hash: str
    group: str
    float_id: str
    cmd: list[str]
    scratch_dir: Path


class Runner:
    """Runs cells as subprocesses (``jobs`` at once) and records each finished one from the main thread."""

    def __init__(self, args: argparse.Namespace, out: Path, scratch: Path):
        self.args, self.out, self.scratch = args, out, scratch
        self.procs: dict[Cell, subprocess.Popen] = {}
        self.env = jobs_env(args.jobs)

    def plan(self, cell: Cell, float_id: str) -> Run:
        a = self.args
        settings = cell_settings(cell, a.epochs, a.dry_run, float_id)
        group = settings_hash({k: v for k, v in settings.items() if k != "seed"})
        h = settings_hash(settings)
        stem = f"{cell.method}_{cell.dataset}_{cell.model}_w{cell.bits}a{cell.bits}_seed{cell.seed}"
        ckpt = (self.scratch if a.dry_run else self.out / "ckpt") / f"{stem}.pt"
        cmd = [sys.executable, "PTQ.py" if cell.method == "ptq" else "QAT.py", *cell.flags(a.epochs, a.dry_run),
               "--device", a.device, "--json", "--out", str(ckpt), "--results-dir", str(self.scratch / h)]
        return Run(cell, h, group, float_id, cmd + (["--data-root", a.data_root] if a.data_root else []),
                   self.scratch / h)

    def execute(self, run: Run) -> tuple[dict | None, str, float]:
        """Run the cell's script; (its JSON row or None, last stderr line, wall seconds)."""
        t0 = time.perf_counter()
        proc = subprocess.Popen(run.cmd, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        self.procs[run.cell] = proc
        stdout, stderr = proc.communicate()
        self.procs.pop(run.cell, None)
        seconds = time.perf_counter() - t0
        lines = stdout.strip().splitlines()
        err = (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if proc.returncode != 0 or not lines:
            return None, err, seconds
        try:
            return json.loads(lines[-1]), err, seconds
        except json.JSONDecodeError:
            return None, f"no JSON row on the last line of its output: {lines[-1][:200]}", seconds

    def record(self, run: Run, res: dict, seconds: float) -> dict:
        """Append the cell's row to results.csv and the script's own row to ptq.csv / qat.csv."""
        c = run.cell
        head = {"cell": run.cell_hash, "group": run.group, "dataset": c.dataset, "model": c.model, "bits": c.bits,
                "method": c.method, "quantizer": c.quantizer,
                "recipe_quantizer": QAT_RECIPES[c.bits]["quantizer"] if c.quantizer else "",
                "seed": c.seed, "epochs": res.get("epochs", ""), "float_acc": res["float_acc"],
                "fq_acc": res["fq_acc"], "int_acc": res["int_acc"], "agreement": res["agreement"],
                "cell_seconds": round(seconds, 1), "dry_run": self.args.dry_run}
        row = {**head, **{k: v for k, v in res.items() if k not in head}, "float_ckpt_sha1": run.float_id}
        append_csv_row(self.out / "results.csv", row)
        append_csv_row(self.out / ("ptq.csv" if c.method == "ptq" else "qat.csv"), res)
        shutil.rmtree(run.scratch_dir, ignore_errors=True)
        return row

    def stop(self) -> None:
        for proc in list(self.procs.values()):
            proc.terminate()


def finished_line(row: dict) -> str:
    return (f"float {row['float_acc']:6.2f}%  fake-quant {row['fq_acc']:6.2f}%  integer {row['int_acc']:6.2f}%  "
            f"agreement {row['agreement']:6.2f}%  {row['cell_seconds']:6.1f} s")


def run_grid(runner: Runner, runs: list[Run], cached: dict[str, dict], bar: tqdm) -> tuple[int, float, list[str]]:
    """Run what is not cached (at most --stop-after cells); returns (cells run, their seconds, failures)."""
    todo = []
    for run in runs:
        if run.cell_hash in cached:
            bar.write(f"{run.cell.name}: cached (integer {float(cached[run.cell_hash]['int_acc']):.2f}%)")
            bar.update(1)
        else:
            todo.append(run)
    if runner.args.stop_after is not None:
        todo = todo[:runner.args.stop_after]
    done, seconds, failures = 0, 0.0, []
    with ThreadPoolExecutor(max_workers=runner.args.jobs) as pool:
        pending: dict[Future, Run] = {pool.submit(runner.execute, run): run for run in todo}
        try:
            while pending:
                bar.set_postfix_str(", ".join(r.cell.name for f, r in pending.items() if f.running())[:80])
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    run = pending.pop(fut)
                    res, err, secs = fut.result()
                    if res is None:
                        failures.append(f"{run.cell.name} failed: {err}")
                        bar.write(failures[-1])
                        for f in pending:  # stop at the first failure; the running cells still finish
                            f.cancel()
                        pending = {f: r for f, r in pending.items() if not f.cancelled()}
                        continue
                    row = runner.record(run, res, secs)
                    done, seconds = done + 1, seconds + secs
                    bar.write(f"{run.cell.name}: {finished_line(row)}")
                    bar.update(1)
        except KeyboardInterrupt:
            for f in pending:
                f.cancel()
            runner.stop()
            raise
    return done, seconds, failures


def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4); I must be in 0..N-1."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise CLIError(f"--shard {text!r} is not I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise CLIError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def select(args: argparse.Namespace, runs: list[Run]) -> list[Run]:
    """The runs --shard and --cell keep (a cell's shard: its hash as an integer, modulo N)."""
    if args.shard:
        i, n = parse_shard(args.shard)
        runs = [r for r in runs if int(r.cell_hash, 16) % n == i]
    if args.cell:
        unknown = sorted(set(args.cell) - {r.cell_hash for r in runs})
        if unknown:
            raise CLIError(f"--cell {unknown[0]} is not a cell of this grid; list them with --list")
        runs = [r for r in runs if r.cell_hash in args.cell]
    return runs


def cell_command(args: argparse.Namespace, out: Path, cell_hash: str) -> str:
    """The shell command that runs one cell of this grid (what --list prints)."""
    flags = ["--datasets", args.datasets, "--models", args.models, "--bits", args.bits, "--methods", args.methods,
             "--seeds", str(args.seeds), "--device", args.device, "--jobs", "1", "--out", str(out)]
    flags += (["--epochs", str(args.epochs)] if args.epochs else []) + (["--dry-run"] if args.dry_run else [])
    flags += ["--data-root", args.data_root] if args.data_root else []
    return " ".join(shlex.quote(f) for f in ["python", "reproduce.py", *flags, "--cell", cell_hash])


def reproduce(args: argparse.Namespace, out: Path, scratch: Path) -> None:
    """Run the grid's missing cells into ``out``, then rewrite RESULTS.md and the plot from results.csv."""
    resolve_device(args.device)
    cells = make_cells(args)
    if args.retrain:
        retrain(args, cells, out)
    runner = Runner(args, out, scratch)
    runs = select(args, [runner.plan(c, float_ckpt_id(c, args.dry_run)) for c in cells])
    cached = {} if args.force else {r["cell"]: r for r in read_results(out / "results.csv")}
    if args.list:
        for run in runs:
            if run.cell_hash not in cached:
                print(cell_command(args, out, run.cell_hash))
        return
    t0 = time.perf_counter()
    with tqdm(total=len(runs), desc="reproduce", unit="run", position=0, dynamic_ncols=True) as bar:
        done, seconds, failures = run_grid(runner, runs, cached, bar)
    written = write_results(out)
    n_cached = sum(r.cell_hash in cached for r in runs)
    print(f"ran {done} cell(s) in {(time.perf_counter() - t0) / 60:.1f} min of wall time "
          f"({seconds / max(done, 1):.0f} s per cell on average), {n_cached} cached, "
          f"{len(runs) - done - n_cached} not run; wrote {', '.join(str(p) for p in written)}")
    if args.out is None:  # a dry run without --out: show the report, the files go with the temp dir
        print(render_results_md(read_results(out / "results.csv")))
    if failures:
        raise CLIError(f"{len(failures)} cell(s) failed, first: {failures[0]}; rerun to retry them")


@one_line_errors
def main() -> int:
    args = parse_args()
    if args.seeds < 1 or args.jobs < 1 or (args.epochs is not None and args.epochs < 1):
        raise CLIError("--seeds, --jobs and --epochs must be >= 1")
    if args.list and args.retrain:
        raise CLIError("--list prints the cells' commands; retrain first (python reproduce.py --retrain) or drop --retrain")
    if args.list and args.dry_run and not args.out:
        raise CLIError("--list --dry-run needs --out: the listed commands must write to one shared place")
    if args.retrain and args.dry_run:
        raise CLIError("--retrain trains on the real data but --dry-run runs on synthetic data; drop one of the two flags")
    if args.data_root:
        args.data_root = str(Path(args.data_root).resolve())  # the scripts run in the repository root
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        out = Path(args.out or Path(tmp) / "out").resolve()
        if args.report_only:
            if not (out / "results.csv").exists():
                raise CLIError(f"{out / 'results.csv'} not found; run python reproduce.py first")
            print("wrote", ", ".join(str(p) for p in write_results(out)))
            return 0
        try:
            reproduce(args, out, Path(tmp))
        except KeyboardInterrupt:
            print(f"interrupted; the finished cells are in {out / 'results.csv'}: rerun the same command to continue",
                  file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
