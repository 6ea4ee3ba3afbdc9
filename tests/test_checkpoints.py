"""The shipped float checkpoints reach the accuracy the foundation issue requires (real data only)."""

import pytest
import torch

from data import Loader
from models import build_model
from tests.conftest import REPO, real_split
from utils.training import evaluate

REQUIRED = [("fashion_mnist", "cnn", 91.5), ("fashion_mnist", "cnn_bn", 91.5),
            ("cifar10", "cnn", 77.0), ("cifar10", "cnn_bn", 78.0)]


@pytest.mark.parametrize("dataset,model,required", REQUIRED, ids=[f"{d}-{m}" for d, m, _ in REQUIRED])
def test_shipped_checkpoint_accuracy(dataset, model, required):
    path = REPO / "ckpt" / f"{dataset}_{model}.pt"
    assert path.exists(), f"{path} is missing: train it with python train.py --dataset {dataset} --model {model}"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert (ckpt["config"]["dataset"], ckpt["config"]["model"]) == (dataset, model)
    net = build_model(model, dataset)
    net.load_state_dict(ckpt["model"])
    test = real_split(dataset, "test")
    acc = evaluate(net, Loader(test.images, test.labels, dataset, 1000), torch.device("cpu"))["test_acc"]
    assert acc >= required, f"{dataset}/{model}: {acc:.2f}% < required {required}%"
    assert abs(acc - ckpt["metrics"]["test_acc"]) < 0.05  # the checkpoint's own record is honest
