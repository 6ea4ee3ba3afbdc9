import pytest
import torch
import torch.nn as nn

from models import MODELS, build_model

SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("dataset,name", [(d, m) for d in MODELS for m in MODELS[d]])
def test_output_shape_and_layers(dataset, name):
    model = build_model(name, dataset).eval()
    out = model(torch.randn(5, *SHAPES[dataset]))
    assert out.shape == (5, 10)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if name in ("cnn", "cnn_bn"):
        assert n_bn == (2 if name == "cnn_bn" else 0)


def test_seed_architectures_exact():
    f = build_model("cnn", "fashion_mnist")
    convs = [m for m in f.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 40, (3, 3)), (40, 40, (3, 3))]
    assert [(l.in_features, l.out_features) for l in f.modules() if isinstance(l, nn.Linear)] == [(1000, 10)]
    c = build_model("cnn_bn", "cifar10")
    convs = [m for m in c.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 16, (5, 5)), (16, 32, (5, 5))]
    assert [(l.in_features, l.out_features) for l in c.modules() if isinstance(l, nn.Linear)] == \
        [(800, 120), (120, 84), (84, 10)]


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="cnn, cnn_bn"):
        build_model("resnet", "cifar10")
    with pytest.raises(ValueError, match="fashion_mnist, cifar10"):
        build_model("cnn", "mnist")
