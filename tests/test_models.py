"""The model registry builds every architecture at the published sizes."""

import pytest
import torch
from torch import nn

from sparsebench.layers import weight_layers
from sparsebench.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_every_model_runs_on_every_input_size(name, channels, size):
    model = build_model(name, in_channels=channels, num_classes=7, image_size=size, width=0.25)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize(
    "name,params,convs",
    [
        ("resnet20", 0.27e6, 21),  # He et al. 2016: 0.27M
        ("resnet56", 0.85e6, 57),  # 0.85M
        ("vgg16", 14.7e6, 13),  # VGG-16-BN for CIFAR: 13 convs, ~14.7M
        ("resnet18", 11.2e6, 20),  # CIFAR ResNet-18: ~11.2M
        ("lenet5", 61.7e3, 2),  # LeCun et al.: ~61.7k
    ],
)
def test_published_sizes(name, params, convs):
    model = build_model(
        name, in_channels=3 if name != "lenet5" else 1, num_classes=10, image_size=32 if name != "lenet5" else 28
    )
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(params, rel=0.03)
    assert sum(isinstance(m, nn.Conv2d) for m in weight_layers(model).values()) == convs


def test_width_multiplier_scales_channels():
    narrow = build_model("vgg16", in_channels=3, num_classes=10, image_size=32, width=0.25)
    assert [m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)][:3] == [16, 16, 32]


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="model.name='alexnet' is not allowed: one of convnet"):
        build_model("alexnet", in_channels=3, num_classes=10, image_size=32)
