"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016), CIFAR variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snapens.models._common import check_common, dropout_layer, init_weights

__all__ = ["WideResNet", "wrn_blocks_per_stage", "wrn_name_from_legacy"]


def wrn_blocks_per_stage(depth: int) -> int:
    """Number of residual blocks N per stage for a WRN of the given depth.

    Two depth counts are accepted:

    * the WRN paper's ``D = 6N + 4`` (WRN-16-4: N = 2; WRN-28-10: N = 4), and
    * the ResNet-style ``D = 6N + 2`` used by the snapshot-ensembles paper for its "Wide-ResNet-32"
      (WRN-32-4: N = 5, widen factor 4).

    The two sets are disjoint (they differ by 2 modulo 6), so a depth names one N. N must be >= 1.

    Raises:
        ValueError: if the depth is of neither form.
    """
    if isinstance(depth, int) and not isinstance(depth, bool):
        if depth >= 10 and (depth - 4) % 6 == 0:
            return (depth - 4) // 6
        if depth >= 8 and (depth - 2) % 6 == 0:
            return (depth - 2) // 6
    raise ValueError(
        f"invalid Wide ResNet depth {depth!r}: expected D = 6N+4 (10, 16, 22, 28, ...) "
        f"or D = 6N+2 (8, 14, 20, 26, 32, ...) with N >= 1"
    )


def wrn_name_from_legacy(n: int, k: int) -> str:
    """Model name for the Keras implementation's ``--wrn_N N --wrn_k K``: ``wrn-(6N+4)-K``.

    Example:
        >>> wrn_name_from_legacy(2, 4)
        'wrn-16-4'
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"wrn_N must be a positive integer, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"wrn_k must be a positive integer, got {k!r}")
    return f"wrn-{6 * n + 4}-{k}"


class _PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus the shortcut.

    The shortcut is the identity, or a 1x1 projection (applied to the activated input) where the shape changes.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.dropout = dropout_layer(dropout)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-D-K: a pre-activation ResNet of three stages with widths 16K, 32K, 64K (after a 16-channel stem).

    Each stage has N pre-activation basic blocks (see :func:`wrn_blocks_per_stage` for N from the depth D);
    the first block of stages 2 and 3 halves the resolution with a strided 3x3 convolution and a 1x1
    projection shortcut. Dropout (paper section 2.4) sits between the two convolutions of every block.
    The head is BN-ReLU, global average pooling (adaptive, so any input of at least 8x8 works) and a linear layer.

    Args:
        depth: D, either 6N+4 (the WRN paper's count) or 6N+2 (the snapshot-ensembles paper's WRN-32).
        widen_factor: K >= 1.
        num_classes: Number of output logits.
        in_channels: Input channels (3 for CIFAR, 1 for digits).
        dropout: Dropout probability between the convolutions of each block.
    """

    def __init__(
        self, *, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_common(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
        n = wrn_blocks_per_stage(depth)
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen factor must be a positive integer, got {widen_factor!r}")
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        stages = []
        in_planes = 16
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_PreActBlock(in_planes, width, stride, dropout))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]``, H, W >= 8."""
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        x = self.pool(F.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))
