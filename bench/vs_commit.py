"""Benchmark: this tree's quant/ against another commit's, side by side in one run (medians).

    python bench/vs_commit.py --ref 7332790                  # integer engine and QAT steps, four shipped models
    python bench/vs_commit.py --ref HEAD~1 --rounds 6 --what engine

Checks the commit out in a temporary git worktree, then alternates worker processes of the two trees
(old, new, old, new, ...), each timing on one thread, on the shipped checkpoints:
  engine: ``IntModel.forward_int`` over 4,000 test images (batch 1000), median of 5 passes;
  qat:    60 QAT training steps (batch 128) of the ste and lsq quantizers, BN and ranges unfrozen
          (the dearer phase), median of 3 passes of 20 steps.
Prints, per model, the medians over the rounds and the ratio new / old; appends rows to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = [("fashion_mnist", "cnn"), ("fashion_mnist", "cnn_bn"), ("cifar10", "cnn"), ("cifar10", "cnn_bn")]


def worker(tree: str, what: str, data_root: str | None) -> dict[str, float]:
    """Times in the quant/ of ``tree`` (run in a fresh process)."""
    sys.path.insert(0, tree)
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    import quant
    from data import Loader, load_split
    from models import build_model
    from utils.io import load_checkpoint
    out: dict[str, float] = {}
    for ds, name in MODELS:
        train, test = load_split(ds, "train", data_root, verbose=False), load_split(ds, "test", data_root, verbose=False)
        m = build_model(name, ds).eval()
        m.load_state_dict(load_checkpoint(REPO / f"ckpt/{ds}_{name}.pt", "train it first")["model"])
        q = quant.quantize(m, quant.QuantConfig(weight_bits=4, act_bits=4))
        quant.calibrate(q, Loader(train.images, train.labels, ds, 256, train=True), num_batches=4)
        if what == "engine":
            im = quant.convert(q)
            xs = [x for x, _ in Loader(test.images[:4000], test.labels[:4000], ds, 1000)]
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                for x in xs:
                    im.forward_int(x)
                ts.append(time.perf_counter() - t0)
            out[f"{ds}/{name}/engine"] = statistics.median(ts)
            continue
        batches = [b for _, b in zip(range(20), Loader(train.images, train.labels, ds, 128, train=True, seed=1))]
        import copy
        for quantizer in ("ste", "lsq"):
            qq = quant.prepare_qat(copy.deepcopy(q), quant.QATConfig(quantizer=quantizer)).train()
            opt = torch.optim.SGD(qq.parameters(), lr=1e-3, momentum=0.9)
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                for x, y in batches:
                    loss = F.cross_entropy(qq(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    quant.clamp_lsq_(qq)
                ts.append(time.perf_counter() - t0)
            out[f"{ds}/{name}/qat-{quantizer}"] = statistics.median(ts)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the commit to compare against (e.g. HEAD~1)")
    p.add_argument("--what", choices=["engine", "qat"], nargs="*", default=["engine", "qat"])
    p.add_argument("--rounds", type=int, default=4, help="alternating old/new worker pairs (default: %(default)s)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="results/vs_commit_speed.csv", help="CSV to append to (default: %(default)s)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    # the other tree has no datasets/ of its own: both read this repository's data lookup root
    args.data_root = args.data_root or os.environ.get("QDNN_DATA_ROOT") or str(REPO / "datasets")
    if args.worker:
        print(json.dumps(worker(args.worker, args.what[0], args.data_root)))
        return
    sys.path.insert(0, str(REPO))
    from utils.io import append_csv_row, versions
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.ref], cwd=REPO, check=True,
                       capture_output=True)
        try:
            times: dict[str, dict[str, list[float]]] = {}
            for what in args.what:
                for _ in range(args.rounds):
                    for tree, path in (("old", old), ("new", REPO)):
                        cmd = [sys.executable, str(Path(__file__).resolve()), "--ref", args.ref, "--what", what,
                               "--worker", str(path), "--data-root", args.data_root]
                        run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                        if run.returncode:
                            raise SystemExit(f"the {tree} worker failed: {run.stderr.strip().splitlines()[-1]}")
                        res = json.loads(run.stdout.strip().splitlines()[-1])
                        for k, v in res.items():
                            times.setdefault(k, {"old": [], "new": []})[tree].append(v)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)
    for k, t in times.items():
        o, n = statistics.median(t["old"]), statistics.median(t["new"])
        print(f"{k}: {args.ref} {o:.3f} s, this tree {n:.3f} s, ratio {n / o:.3f} ({len(t['new'])} rounds)")
        ds, model, what = k.split("/")
        append_csv_row(args.out, {"dataset": ds, "model": model, "what": what, "ref": args.ref, "rounds": len(t["new"]),
                                  "old_s": round(o, 3), "new_s": round(n, 3), "new_over_old": round(n / o, 3),
                                  "threads": 1, **versions()})


if __name__ == "__main__":
    main()
