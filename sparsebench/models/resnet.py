"""ResNets for CIFAR-sized inputs: ResNet-18 (3x3 stem, no max-pool) and ResNet-20/56
(He et al. 2016, three stages of 16/32/64 channels)."""

from typing import List

from torch import Tensor, nn

from sparsebench.models import register, scaled


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, stage_channels: List[int], blocks_per_stage: List[int]):
        super().__init__()
        c = stage_channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        )
        stages = []
        for i, (c_out, n) in enumerate(zip(stage_channels, blocks_per_stage)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, c_out, stride=2 if i > 0 and j == 0 else 1))
                c = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


@register("resnet18")
def resnet18(*, in_channels: int, num_classes: int, image_size: int, width: float = 1.0) -> nn.Module:
    return ResNet(in_channels, num_classes, [scaled(c, width) for c in (64, 128, 256, 512)], [2, 2, 2, 2])


def _cifar_resnet(depth: int, in_channels: int, num_classes: int, width: float) -> nn.Module:
    n = (depth - 2) // 6
    return ResNet(in_channels, num_classes, [scaled(c, width) for c in (16, 32, 64)], [n, n, n])


@register("resnet20")
def resnet20(*, in_channels: int, num_classes: int, image_size: int, width: float = 1.0) -> nn.Module:
    return _cifar_resnet(20, in_channels, num_classes, width)


@register("resnet56")
def resnet56(*, in_channels: int, num_classes: int, image_size: int, width: float = 1.0) -> nn.Module:
    return _cifar_resnet(56, in_channels, num_classes, width)
