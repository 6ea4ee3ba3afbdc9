"""The shipped float checkpoints reach the accuracy the foundation issue requires (real data only)."""

import pytest
import torch

from data import Loader
from models import build_model
from tests.conftest import REPO, real_split
from utils.training import evaluate

REQUIRED = [pytest.param("fashion_mnist", "cnn", 91.5, id="fashion_mnist-cnn"),
            pytest.param("fashion_mnist", "cnn_bn", 91.5, id="fashion_mnist-cnn_bn"),
            pytest.param("cifar10", "cnn", 77.0, id="cifar10-cnn"),
            pytest.param("cifar10", "cnn_bn", 78.0, id="cifar10-cnn_bn")]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,model,required", REQUIRED)
def test_shipped_checkpoint_accuracy(dataset, model, required):
    path = REPO / "ckpt" / f"{dataset}_{model}.pt"
    assert path.exists(), f"{path} is missing: train it with python train.py --dataset {dataset} --model {model}"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert (ckpt["config"]["dataset"], ckpt["config"]["model"]) == (dataset, model)
    net = build_model(model, dataset)
    net.load_state_dict(ckpt["model"])
    test = real_split(dataset, "test")
    acc = evaluate(net, Loader(test.images, test.labels, dataset, 1000), torch.device("cpu"))["test_acc"]
    assert abs(acc - ckpt["metrics"]["test_acc"]) < 0.05  # the checkpoint's own record is honest
    assert acc >= required, f"{dataset}/{model}: {acc:.2f}% < required {required}%"


@pytest.mark.parametrize("dataset,model", [(d, m) for d in ("fashion_mnist", "cifar10") for m in ("cnn", "cnn_bn")])
def test_shipped_checkpoint_was_trained_with_the_default_recipe(dataset, model):
    """README's command (python train.py --dataset D --model M) is what made the shipped checkpoint, and a
    distillation teacher it names is committed (no data needed)."""
    from utils import recipes
    ckpt = torch.load(REPO / "ckpt" / f"{dataset}_{model}.pt", map_location="cpu", weights_only=False)
    recipe = recipes.model_recipe(dataset, model)
    cfg = ckpt["config"]
    assert cfg.get("kd_weight", 0.0) == recipe["kd_weight"] and ckpt["epoch"] == recipe["epochs"] == cfg["epochs"]
    assert all(cfg[k] == recipe[k] for k in ("lr", "batch_size", "weight_decay", "label_smoothing", "augment"))
    if recipe["kd_weight"] > 0:
        assert cfg["teacher"] == recipe["teacher"]
        assert all((REPO / path).exists() for path in recipe["teacher"].split(","))
