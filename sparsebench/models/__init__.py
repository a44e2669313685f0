"""One registry of models: ``build_model(name, in_channels, num_classes, image_size, width)``."""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

ModelFactory = Callable[..., nn.Module]
MODELS: Dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def wrap(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory

    return wrap


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier, never below 1."""
    return max(1, int(round(channels * width)))


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int, width: float = 1.0) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not allowed: one of {', '.join(sorted(MODELS))}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)


# Importing the modules fills the registry.
from sparsebench.models import convnet, lenet, resnet, vgg  # noqa: E402,F401
