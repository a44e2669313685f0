"""A small CNN that fits any input size: the embedded default's model."""

from collections import OrderedDict

from torch import nn

from sparsebench.models import register, scaled


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), bn=nn.BatchNorm2d(c_out), relu=nn.ReLU(inplace=True)
        )
    )


@register("convnet")
def convnet(*, in_channels: int, num_classes: int, image_size: int, width: float = 1.0) -> nn.Module:
    c1, c2, c3 = scaled(32, width), scaled(64, width), scaled(128, width)
    # Pool only while the feature map is still larger than 2x2, so 8x8 digits work too.
    pool = lambda: nn.MaxPool2d(2) if image_size >= 8 else nn.Identity()  # noqa: E731
    # Named parts, so layers.csv and per-layer overrides read "block2.conv", "fc".
    return nn.Sequential(
        OrderedDict(
            block1=conv_bn_relu(in_channels, c1),
            block2=conv_bn_relu(c1, c2),
            pool=pool(),
            block3=conv_bn_relu(c2, c3),
            gap=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(c3, num_classes),
        )
    )
