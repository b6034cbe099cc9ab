"""Densely connected networks (Huang, Liu, van der Maaten & Weinberger, "Densely Connected Convolutional
Networks", CVPR 2017), CIFAR variant: three dense blocks, plain (DenseNet) or bottleneck-compressed (DenseNet-BC)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from snapens.models._common import check_common, dropout_layer, init_weights

__all__ = ["DenseNet", "densenet_layers_per_block", "densenet_name_from_legacy"]


def densenet_layers_per_block(depth: int, *, bottleneck: bool) -> int:
    """Layers per dense block: ``(D - 4) / 3`` for DenseNet, ``(D - 4) / 6`` for DenseNet-BC.

    The 4 counts the stem convolution, the two transition convolutions and the classifier; a BC layer holds two
    convolutions (1x1 bottleneck, 3x3), a plain layer one.

    Raises:
        ValueError: if the depth does not give a whole number (>= 1) of layers per block.
    """
    per_layer = 6 if bottleneck else 3
    if isinstance(depth, int) and not isinstance(depth, bool) and depth > 4 and (depth - 4) % per_layer == 0:
        return (depth - 4) // per_layer
    kind = "DenseNet-BC" if bottleneck else "DenseNet"
    examples = "10, 16, 40, 100, 190, 250" if bottleneck else "7, 10, 40, 100"
    raise ValueError(f"invalid {kind} depth {depth!r}: expected D = {per_layer}L+4 with L >= 1 ({examples}, ...)")


def densenet_name_from_legacy(depth: int, growth_rate: int) -> str:
    """Model name for the Keras implementation's ``--dn_depth D --dn_growth_rate K``: ``densenet-D-K``.

    Note that the Keras model had a single dense block; the name here builds the paper's three-block network
    of the same depth and growth rate, so old weight files do not load into it.

    Example:
        >>> densenet_name_from_legacy(40, 12)
        'densenet-40-12'
    """
    densenet_layers_per_block(depth, bottleneck=False)
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
        raise ValueError(f"growth rate must be a positive integer, got {growth_rate!r}")
    return f"densenet-{depth}-{growth_rate}"


class _DenseLayer(nn.Module):
    """H_l of the paper: BN-ReLU-Conv3x3 (DenseNet) or BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3 (DenseNet-BC), each
    convolution followed by dropout, applied to the concatenation of all earlier feature maps of the block.

    With ``memory_efficient`` the first stage (concatenation, BN, ReLU, first convolution) is recomputed in the
    backward pass instead of stored (Pleiss et al. 2017), which keeps memory linear in depth. Its recomputation
    normalises with the batch statistics but does not update the running statistics a second time.
    """

    def __init__(
        self, in_channels: int, growth_rate: int, *, bottleneck: bool, dropout: float, memory_efficient: bool
    ) -> None:
        super().__init__()
        first_out = 4 * growth_rate if bottleneck else growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(
            in_channels, first_out, 1 if bottleneck else 3, padding=0 if bottleneck else 1, bias=False
        )
        self.norm2: nn.Module | None = None
        self.conv2: nn.Module | None = None
        if bottleneck:
            self.norm2 = nn.BatchNorm2d(first_out)
            self.conv2 = nn.Conv2d(first_out, growth_rate, 3, padding=1, bias=False)
        self.dropout = dropout_layer(dropout)
        self.memory_efficient = memory_efficient
        self._recomputing = False

    @contextlib.contextmanager
    def _recompute_context(self) -> Iterator[None]:
        self._recomputing = True
        try:
            yield
        finally:
            self._recomputing = False

    def _first_stage(self, *features: Tensor) -> Tensor:
        x = torch.cat(features, 1)
        norm = self.norm1
        if self._recomputing and norm.running_mean is not None and norm.running_var is not None:
            # Same normalisation as the first pass (batch statistics), but the running-stat update goes to
            # throw-away copies: the real buffers were already updated once. Copies rather than None keep the
            # op and its saved tensors identical to the first pass, which the checkpoint checks.
            x = F.batch_norm(
                x, norm.running_mean.clone(), norm.running_var.clone(), norm.weight, norm.bias, True, 0.1, norm.eps
            )
        else:
            x = self.norm1(x)
        return self.conv1(F.relu(x))

    def forward(self, features: list[Tensor]) -> Tensor:
        if self.memory_efficient and self.training and torch.is_grad_enabled():
            out = checkpoint(
                self._first_stage,
                *features,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), self._recompute_context()),
            )
        else:
            out = self._first_stage(*features)
        out = self.dropout(out)
        if self.conv2 is not None and self.norm2 is not None:
            out = self.dropout(self.conv2(F.relu(self.norm2(out))))
        return out


class _DenseBlock(nn.Module):
    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        *,
        bottleneck: bool,
        dropout: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(
                in_channels + i * growth_rate,
                growth_rate,
                bottleneck=bottleneck,
                dropout=dropout,
                memory_efficient=memory_efficient,
            )
            for i in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


def _transition(in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
    """Between dense blocks: BN-ReLU-Conv1x1-(dropout)-AvgPool2x2."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        dropout_layer(dropout),
        nn.AvgPool2d(2),
    )


class DenseNet(nn.Module):
    """DenseNet-D-k / DenseNet-BC-D-k for CIFAR-sized inputs.

    A 3x3 stem convolution (16 channels; 2k for BC), three dense blocks of L layers joined by transitions that
    halve the resolution, then BN-ReLU, global average pooling (adaptive, so any input of at least 8x8 works)
    and a linear classifier. Layer l of a block sees the concatenation ``[x_0, x_1, ..., x_{l-1}]`` and adds k
    ("growth rate") feature maps. DenseNet: L = (D-4)/3 single-convolution layers, transitions keep the channel
    count. DenseNet-BC: L = (D-4)/6 bottleneck layers (1x1 convolution to 4k channels first) and transitions
    that compress the channels by theta = 0.5 (floor). Dropout, when set, follows every convolution but the stem
    (paper sec. 4.2).

    Args:
        depth: D (40 and 100 for DenseNet; 100, 190, 250 for DenseNet-BC in the paper).
        growth_rate: k.
        num_classes: Number of output logits.
        in_channels: Input channels (3 for CIFAR, 1 for digits).
        bottleneck: Build DenseNet-BC (bottleneck layers and compression 0.5).
        dropout: Dropout probability after each convolution except the stem.
        memory_efficient: Recompute each layer's concatenation, BN, ReLU and first convolution in the backward
            pass (``torch.utils.checkpoint``) instead of storing them; same results, less memory, some extra time.
    """

    def __init__(
        self,
        *,
        depth: int,
        growth_rate: int,
        num_classes: int,
        in_channels: int = 3,
        bottleneck: bool = False,
        dropout: float = 0.0,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        check_common(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
        num_layers = densenet_layers_per_block(depth, bottleneck=bottleneck)
        if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
            raise ValueError(f"growth rate must be a positive integer, got {growth_rate!r}")
        if not isinstance(memory_efficient, bool):
            raise ValueError(f"memory_efficient must be a bool, got {memory_efficient!r}")
        compression = 0.5 if bottleneck else 1.0

        channels = 2 * growth_rate if bottleneck else 16
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for i in range(3):
            blocks.append(
                _DenseBlock(
                    num_layers,
                    channels,
                    growth_rate,
                    bottleneck=bottleneck,
                    dropout=dropout,
                    memory_efficient=memory_efficient,
                )
            )
            channels += num_layers * growth_rate
            if i < 2:
                out_channels = int(channels * compression)
                blocks.append(_transition(channels, out_channels, dropout))
                channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]``, H, W >= 8."""
        x = self.features(self.stem(x))
        x = self.pool(F.relu(self.norm(x)))
        return self.fc(torch.flatten(x, 1))
