"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, as commonly trained on MNIST."""

from torch import nn

from sparsebench.models import register, scaled


@register("lenet5")
def lenet5(*, in_channels: int, num_classes: int, image_size: int, width: float = 1.0) -> nn.Module:
    c1, c2 = scaled(6, width), scaled(16, width)
    f1, f2 = scaled(120, width), scaled(84, width)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2) if image_size >= 8 else nn.Identity(),
        nn.Conv2d(c1, c2, 5, padding=2 if image_size < 16 else 0),
        nn.ReLU(inplace=True),
        # 28x28 input gives 5x5 here, as in the original; other sizes are pooled to fit.
        nn.AdaptiveMaxPool2d(5),
        nn.Flatten(),
        nn.Linear(c2 * 25, f1),
        nn.ReLU(inplace=True),
        nn.Linear(f1, f2),
        nn.ReLU(inplace=True),
        nn.Linear(f2, num_classes),
    )
