"""Small pieces shared by the architectures: argument checks and the standard initialisation."""

from __future__ import annotations

from torch import nn


def check_common(*, num_classes: int, in_channels: int, dropout: float) -> None:
    """Validate the arguments every architecture takes; raise ``ValueError`` naming the bad value."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an identity when ``p == 0`` (no mask work in training)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def init_weights(model: nn.Module) -> None:
    """Standard initialisation (He et al. 2015): Kaiming-normal convolutions (fan-out, ReLU gain),
    BatchNorm weight 1 and bias 0, linear bias 0 (linear weight keeps PyTorch's default)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
