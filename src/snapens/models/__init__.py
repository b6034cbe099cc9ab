"""The model zoo: CIFAR-style networks from the snapshot-ensembles paper, built by name.

A model is fully described by its name and a JSON-serialisable dict of keyword arguments, which is what a
snapshot manifest stores::

    model = build_model("wrn-16-4", num_classes=10, dropout=0.3)
    again = build_model("wrn-16-4", **{"num_classes": 10, "dropout": 0.3})

Name forms (see :func:`model_forms`): ``wrn-D-K``, ``densenet-D-K``, ``densenet-bc-D-K``, ``resnet-D``,
``cnn-small``. Every network ends in adaptive average pooling, so any input of at least 8x8 pixels with any
number of channels works (digits: 1x8x8, CIFAR: 3x32x32).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from snapens.models.cnn import SmallCNN
from snapens.models.densenet import DenseNet, densenet_layers_per_block, densenet_name_from_legacy
from snapens.models.resnet import CifarResNet, resnet_blocks_per_stage
from snapens.models.wrn import WideResNet, wrn_blocks_per_stage, wrn_name_from_legacy

__all__ = [
    "build_model",
    "list_models",
    "model_forms",
    "WideResNet",
    "DenseNet",
    "CifarResNet",
    "SmallCNN",
    "wrn_name_from_legacy",
    "densenet_name_from_legacy",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Family:
    form: str
    description: str
    pattern: re.Pattern[str]
    examples: tuple[str, ...]
    options: tuple[str, ...]
    #: Checks the numbers in the name (raising ValueError) and returns the architecture's keyword arguments.
    parse: Callable[[re.Match[str]], dict[str, Any]]
    build: Callable[..., nn.Module]


def _parse_wrn(m: re.Match[str]) -> dict[str, Any]:
    depth, k = int(m[1]), int(m[2])
    wrn_blocks_per_stage(depth)
    if k < 1:
        raise ValueError(f"widen factor must be >= 1, got {k}")
    return {"depth": depth, "widen_factor": k}


def _parse_densenet(bottleneck: bool) -> Callable[[re.Match[str]], dict[str, Any]]:
    def parse(m: re.Match[str]) -> dict[str, Any]:
        depth, k = int(m[1]), int(m[2])
        densenet_layers_per_block(depth, bottleneck=bottleneck)
        if k < 1:
            raise ValueError(f"growth rate must be >= 1, got {k}")
        return {"depth": depth, "growth_rate": k, "bottleneck": bottleneck}

    return parse


def _densenet_family(form: str, description: str, examples: tuple[str, ...], *, bottleneck: bool) -> _Family:
    """A DenseNet family: ``form`` ends in ``D-K`` (depth, growth rate)."""
    return _Family(form=form, description=description, pattern=re.compile(form.replace("D-K", r"(\d+)-(\d+)")),
                   examples=examples, options=("dropout", "memory_efficient"), parse=_parse_densenet(bottleneck),
                   build=DenseNet)


def _parse_resnet(m: re.Match[str]) -> dict[str, Any]:
    depth = int(m[1])
    resnet_blocks_per_stage(depth)
    return {"depth": depth}


_FAMILIES: tuple[_Family, ...] = (
    _Family(
        form="wrn-D-K",
        description="Wide ResNet, depth D = 6N+4 (or 6N+2 as in the snapshot-ensembles paper's WRN-32), "
        "widen factor K >= 1",
        pattern=re.compile(r"wrn-(\d+)-(\d+)"),
        examples=("wrn-16-4", "wrn-28-10", "wrn-32-4"),
        options=("dropout",),
        parse=_parse_wrn,
        build=WideResNet,
    ),
    _densenet_family("densenet-D-K", "DenseNet, depth D = 3L+4, growth rate K",
                     ("densenet-40-12", "densenet-100-24"), bottleneck=False),
    _densenet_family("densenet-bc-D-K", "DenseNet-BC (bottleneck, compression 0.5), depth D = 6L+4, growth rate K",
                     ("densenet-bc-100-12",), bottleneck=True),
    _Family(
        form="resnet-D",
        description="ResNet for CIFAR, depth D = 6n+2 (20, 32, 44, 56, 110, ...)",
        pattern=re.compile(r"resnet-(\d+)"),
        examples=("resnet-20", "resnet-32", "resnet-44", "resnet-56", "resnet-110"),
        options=("dropout", "shortcut"),
        parse=_parse_resnet,
        build=CifarResNet,
    ),
    _Family(
        form="cnn-small",
        description="three-layer CNN for 8x8 digits and quick tests",
        pattern=re.compile(r"cnn-small"),
        examples=("cnn-small",),
        options=("dropout",),
        parse=lambda m: {},
        build=SmallCNN,
    ),
)


def model_forms() -> list[str]:
    """The accepted name forms, each with a one-line description, e.g. ``"resnet-D: ResNet for CIFAR, ..."``."""
    return [f"{family.form}: {family.description}" for family in _FAMILIES]


def list_models() -> list[str]:
    """Example model names, one or more per form (the paper's networks); every one builds with :func:`build_model`."""
    return [name for family in _FAMILIES for name in family.examples]


def _forms_message() -> str:
    # Short enough for one terminal line: the forms and one example each; model_forms() describes them.
    forms = [family.form for family in _FAMILIES]
    examples = [family.examples[0] for family in _FAMILIES if family.examples[0] not in forms]
    return f"expected {', '.join(forms[:-1])} or {forms[-1]} (e.g. {', '.join(examples)})"


def build_model(name: str, *, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised network from its registry name.

    Args:
        name: One of the forms of :func:`model_forms`, e.g. ``"wrn-16-4"`` or ``"densenet-bc-100-12"``.
        num_classes: Number of output logits.
        in_channels: Input channels (3 for CIFAR, 1 for digits).
        **kwargs: Architecture options (all JSON-serialisable): ``dropout`` (float, default 0) for every
            family, ``memory_efficient`` (bool) for DenseNets, ``shortcut`` (``"A"`` or ``"B"``) for ResNets.

    Returns:
        The model in training mode, on the CPU (or the current default device), in float32.

    Raises:
        ValueError: for an unknown name, a malformed depth, an option the family does not take, or a bad value.
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}; {_forms_message()}")
    for family in _FAMILIES:
        match = family.pattern.fullmatch(name)
        if match is None:
            continue
        try:
            arch_kwargs = family.parse(match)
        except ValueError as exc:
            raise ValueError(f"invalid model name {name!r}: {exc}; {_forms_message()}") from None
        unknown = sorted(set(kwargs) - set(family.options))
        if unknown:
            raise ValueError(
                f"model {name!r} does not take option(s) {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(family.options)}"
            )
        model = family.build(num_classes=num_classes, in_channels=in_channels, **arch_kwargs, **kwargs)
        logger.debug(
            "built %s (%s) with %d parameters", name, kwargs, sum(p.numel() for p in model.parameters())
        )
        return model
    raise ValueError(f"unknown model name {name!r}; {_forms_message()}")
