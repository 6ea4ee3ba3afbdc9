"""Training on several processes (utils/distributed.py): the sharded loader, the global batch statistics
and ranges on 2 gloo processes, the check that ranks hold the same state, and train.py / QAT.py under
torchrun against one process with the same global batch."""
from __future__ import annotations

import csv
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import quant
from data import Loader, synthetic_split
from tests.conftest import REPO, run_script
from utils import distributed


def test_shards_are_the_slices_of_the_augmented_global_batch():
    split = synthetic_split("cifar10", 96, seed=3)
    make = lambda: Loader(split.images, split.labels, "cifar10", 32, train=True, augment="crop4,flip", seed=7)
    whole = list(make())
    parts = []
    for rank in range(4):
        loader = make()
        loader.shard(rank, 4)
        parts.append(list(loader))
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x) and torch.equal(torch.cat([p[i][1] for p in parts]), y)
    with pytest.raises(ValueError, match="divisible by 3"):
        make().shard(0, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` on 2 gloo processes."""
    mp.spawn(_init_and_run, args=(_free_port(), fn, args), nprocs=2)


def _init_and_run(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _global_bn(rank: int, out: str) -> None:
    torch.manual_seed(0)
    bn = distributed.global_batchnorm(nn.Sequential(nn.BatchNorm2d(5, momentum=None)))
    x = (torch.randn(8, 5, 6, 6) * 3 + 1)[rank * 4:(rank + 1) * 4].requires_grad_()
    ddp = nn.parallel.DistributedDataParallel(bn, broadcast_buffers=False)
    for _ in range(2):
        y = ddp(x)
        (y * torch.arange(8 * 5 * 6 * 6).reshape(8, 5, 6, 6).sin()[rank * 4:(rank + 1) * 4]).sum().backward()
    torch.save({"y": y.detach(), "x_grad": x.grad, "state": bn.state_dict(),
                "grads": [p.grad for p in bn.parameters()]}, f"{out}.{rank}")


@pytest.mark.slow
def test_global_batchnorm_equals_batchnorm_over_the_global_batch(tmp_path):
    _spawn(_global_bn, str(tmp_path / "bn"))
    torch.manual_seed(0)
    bn = nn.Sequential(nn.BatchNorm2d(5, momentum=None))
    x = (torch.randn(8, 5, 6, 6) * 3 + 1).requires_grad_()
    w = torch.arange(8 * 5 * 6 * 6).reshape(8, 5, 6, 6).sin()
    for _ in range(2):
        y = bn(x)
        # each rank's loss is its half of the sum, and DDP averages: the reference loss is half the sum
        ((y * w).sum() / 2).backward()
    got = [torch.load(tmp_path / f"bn.{r}") for r in range(2)]
    assert torch.allclose(torch.cat([g["y"] for g in got]), y.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([g["x_grad"] for g in got]) / 2, x.grad, atol=1e-5)  # local loss not halved
    for g in got:
        for k, v in bn.state_dict().items():
            assert torch.allclose(g["state"][k].double(), v.double(), atol=1e-5), k  # running stats, count
        for mine, ref in zip(g["grads"], bn.parameters()):
            assert torch.allclose(mine, ref.grad, atol=1e-4)


def _ste_model() -> tuple[nn.Module, torch.Tensor]:
    """A calibrated ste QAT model in train mode and its global batch (each half with its own range)."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, 4, 4) * torch.arange(1, 9).view(8, 1, 1, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    qmodel = quant.quantize(model, quant.QuantConfig(weight_bits=8, act_bits=8, observer="minmax"))
    quant.calibrate(qmodel, [(x, None)], num_batches=1)  # same whole batch on every rank
    quant.prepare_qat(qmodel, quant.QATConfig(quantizer="ste", ema_momentum=0.5))
    return qmodel, x


def _ranges(rank: int, out: str) -> None:
    qmodel, x = _ste_model()
    quant.sync_act_ranges(qmodel, distributed.reduce_range)
    qmodel.train()
    for step in range(3):
        qmodel(x.roll(step, 0)[rank * 4:(rank + 1) * 4])
    torch.save({k: v for k, v in qmodel.state_dict().items() if k.endswith(("min_val", "max_val"))}, f"{out}.{rank}")


@pytest.mark.slow
def test_ema_ranges_move_with_the_global_batch(tmp_path):
    _spawn(_ranges, str(tmp_path / "r"))
    qmodel, x = _ste_model()
    qmodel.train()
    for step in range(3):
        qmodel(x.roll(step, 0))
    ref = {k: v for k, v in qmodel.state_dict().items() if k.endswith(("min_val", "max_val"))}
    got = [torch.load(tmp_path / f"r.{r}") for r in range(2)]
    assert "input_quant.observer.min_val" in ref and "0.act_quant.observer.max_val" in ref
    for g in got:
        assert g.keys() == ref.keys()
        # the input's range: exact; the conv output's: one ulp apart (a conv over 4 images rounds differently)
        assert all(torch.equal(g[k], ref[k]) if k.startswith("input") else torch.allclose(g[k], ref[k], rtol=1e-6)
                   for k in ref)


def _same_state(rank: int, out: str) -> None:
    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.fill_(0.5)
    distributed.check_same_state(m, distributed.Dist(rank, 2), "equal")
    with torch.no_grad():
        m.bias[1] += rank * 1e-7  # one bit in one value of rank 1
    try:
        distributed.check_same_state(m, distributed.Dist(rank, 2), "perturbed")
    except RuntimeError as e:
        open(f"{out}.{rank}", "w").write(str(e))


@pytest.mark.slow
def test_check_same_state_finds_one_differing_value(tmp_path):
    _spawn(_same_state, str(tmp_path / "s"))
    for r in range(2):
        msg = (tmp_path / f"s.{r}").read_text()
        assert "rank 1's state differs from rank 0's in 1 entries (bias)" in msg


def _update_error(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||a - start|| over the weights ``start`` has: how far two runs ended apart, relative to how
    far they moved."""
    keys = [k for k in start if k.endswith("weight") and k in a and a[k].shape == start[k].shape]
    assert keys
    num = sum((a[k] - b[k]).double().square().sum() for k in keys) ** 0.5
    den = sum((a[k] - start[k]).double().square().sum() for k in keys) ** 0.5
    return float(num / den)


def _torchrun(*args: str):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args, timeout=600)


def _model(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# The tolerances are not zero because two processes add the two halves' gradients and BN sums in another
# order than one process does, and float addition is not associative. A BN layer's input gradient is a
# difference of nearly equal terms, which turns the 1e-7 rounding into ~1e-5 of the conv weights' gradient,
# growing over the steps: train.py ends 1.4e-3 of the update apart (the same as one process run with 1
# thread against 2). Fake quantization is discontinuous: a one-ulp change moves a value across a rounding
# boundary by a whole step, so QAT runs end ~2% of the update apart, 2 processes against 1 as well as 1
# thread against 2. A real mismatch (per-rank BN statistics or ranges, gradients summed not averaged) is
# caught by check_same_state or is of the size of the update itself.
@pytest.mark.slow
@pytest.mark.parametrize("script,extra,tol", [
    ("train.py", ("--model", "cnn_bn", "--epochs", "2"), 1e-2),
    ("QAT.py", ("--model", "cnn_bn", "--bits", "8", "--quantizer", "lsq", "--lr", "1e-3", "--epochs", "1"), 0.1),
    ("QAT.py", ("--model", "cnn_bn", "--bits", "8", "--quantizer", "ste", "--lr", "1e-3", "--epochs", "1"), 0.1),
], ids=["train-bn", "qat-lsq-bn", "qat-ste-bn"])
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, script, extra, tol):
    common = (script, "--dataset", "cifar10", "--dry-run", "--device", "cpu", "--seed", "3", *extra)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r = run_script(*common, "--out", str(one))
    assert r.returncode == 0, r.stderr
    r = _torchrun(*common, "--out", str(two), "--results-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stdout and r.stdout.count("epoch   1/") == 1  # rank 0 alone prints
    if script == "train.py":
        from models import build_model
        from utils.cli import set_seed
        set_seed(3)
        start = build_model("cnn_bn", "cifar10").state_dict()  # the scripts' initial weights
    else:
        start = _model(REPO / "ckpt" / "cifar10_cnn_bn.pt")
        with open(tmp_path / "qat.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1 and rows[0]["processes"] == "2"  # one row, from rank 0
    assert _update_error(_model(one), _model(two), start) < tol


@pytest.mark.slow
def test_batch_that_does_not_divide_is_a_one_line_error(tmp_path):
    r = _torchrun("train.py", "--dry-run", "--device", "cpu", "--batch-size", "127", "--out", str(tmp_path / "x.pt"))
    assert r.returncode != 0 and "error: --batch-size 127 is the global batch and must divide among the 2" in r.stderr
