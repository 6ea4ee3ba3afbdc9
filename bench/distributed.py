"""Benchmark: seconds per training epoch with 1 process against N processes under torchrun.

    python bench/distributed.py                                   # 1 vs 2 processes, train.py, two models
    python bench/distributed.py --script QAT.py --repeats 1       # QAT.py's epoch instead (4-bit LSQ)
    python bench/distributed.py --processes 4 --threads 4         # a bigger machine

Each repeat runs one epoch (``--stop-after 1``, real data, the recipe's global batch) of the script in
one process with --threads threads, then under ``torchrun --nproc_per_node N`` with threads / N threads
per process (the same cores in all), interleaved so that both see the same machine load. The epoch
time is the script's own (the training pass, without start-up or evaluation). Reports medians and the
speed-up over one process, and appends one row per configuration to results/distributed_epoch_time.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from utils.io import append_csv_row, versions  # noqa: E402

DEFAULT_MODELS = ("fashion_mnist/cnn_bn", "cifar10/resnet8")


def one_epoch(script: str, dataset: str, model: str, processes: int, threads: int, extra: list[str]) -> float:
    """Seconds of one training epoch of ``script`` on ``processes`` processes of ``threads`` threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [script, "--dataset", dataset, "--model", model, "--stop-after", "1", "--json", "--device", "auto",
                "--out", str(Path(tmp) / "ckpt.pt"), *extra]
        launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc_per_node", str(processes)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        r = subprocess.run(launch + args, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{' '.join(launch + args)} failed:\n{r.stderr[-2000:]}")
        return float(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), help="dataset/model pairs (default: %(default)s)")
    p.add_argument("--script", default="train.py", choices=["train.py", "QAT.py"])
    p.add_argument("--processes", type=int, default=2, help="processes of the distributed run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads in all: the single process's, split among the processes (default: the CPU count)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (default: %(default)s)")
    p.add_argument("--out", default="results/distributed_epoch_time.csv", help="CSV to append to (default: %(default)s)")
    args = p.parse_args()
    if args.processes < 2 or args.threads < args.processes:
        raise SystemExit("error: --processes must be >= 2 and --threads >= --processes (one thread per process at least)")
    extra = ["--bits", "4", "--quantizer", "lsq"] if args.script == "QAT.py" else []
    configs = [(1, args.threads), (args.processes, args.threads // args.processes)]
    for pair in args.models:
        dataset, model = pair.split("/")
        times: dict[int, list[float]] = {n: [] for n, _ in configs}
        for _ in range(args.repeats):
            for n, t in configs:
                times[n].append(one_epoch(args.script, dataset, model, n, t, extra))
        base = statistics.median(times[1])
        for n, t in configs:
            epoch_s = statistics.median(times[n])
            row = {"script": args.script, "dataset": dataset, "model": model, "processes": n, "threads_per_process": t,
                   "repeats": args.repeats, "epoch_s": round(epoch_s, 2), "speedup_vs_1": round(base / epoch_s, 2),
                   "device": "cuda" if torch.cuda.is_available() else "cpu",
                   "load_avg_1min": round(os.getloadavg()[0], 2), **versions()}
            print(f"{args.script} {dataset}/{model}: {n} process(es) x {t} thread(s): epoch {epoch_s:.1f} s "
                  f"(median of {args.repeats}), {row['speedup_vs_1']:.2f}x one process")
            append_csv_row(REPO / args.out, row)


if __name__ == "__main__":
    main()
