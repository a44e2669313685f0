"""VGG-16 with BatchNorm, CIFAR variant: 13 3x3 convs and a single linear classifier."""

from torch import nn

from sparsebench.models import register, scaled

VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@register("vgg16")
def vgg16(*, in_channels: int, num_classes: int, image_size: int, width: float = 1.0) -> nn.Module:
    layers: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for item in VGG16_LAYOUT:
        if item == "M":
            # Small inputs (tests) stop pooling at 1x1 rather than failing.
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            continue
        c_out = scaled(item, width)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)
