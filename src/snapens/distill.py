"""Knowledge distillation of a snapshot ensemble into one student network (Hinton et al. 2015).

The teacher is the run's ensemble as ``snapens evaluate`` calibrates it: member weights ``w`` and a temperature
``T_cal`` fitted on validation, so its probabilities are ``softmax(log p / T_cal)`` with
``p = sum_m w_m softmax(f_m(x))``. Its "logits" are therefore ``z = log p / T_cal`` (up to a constant per
image, which no softmax sees). The student ``s(x)`` is trained on

.. math::

    L = (1 - \\alpha)\\, \\mathrm{CE}(s, y)
        + \\alpha\\, T^2\\, \\mathrm{KL}\\big(\\mathrm{softmax}(z / T) \\,\\|\\, \\mathrm{softmax}(s / T)\\big)

(batch means; the ``T^2`` keeps the soft term's gradients on the scale of the hard term's as ``T`` grows). The
teacher runs online on the batch the student sees, augmentation included, in eval mode (BatchNorm uses its
running statistics) and without gradients: every step costs ``M`` teacher forward passes and one student
forward and backward pass. The student then predicts with one forward pass per image.

Nothing here reads a run folder or a dataset: ``snapens distill`` (:mod:`snapens.workflows.distillation`) builds the
teacher from a run and trains the student with :func:`snapens.engine.fit`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EnsembleTeacher", "distillation_loss", "make_loss_fn", "top1_agreement"]

logger = logging.getLogger(__name__)

# log(0) would give -inf teacher logits, and 0 * (-inf - x) = NaN in the KL term.
_TINY = torch.finfo(torch.float32).tiny


def _check(temperature: float, alpha: float) -> None:
    if not (0 < temperature < math.inf):
        raise ValueError(f"the distillation temperature must be > 0 and finite, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (the weight of the teacher's soft targets) must be in [0, 1], got {alpha}")


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float,
                      alpha: float) -> Tensor:
    """``(1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(z / T) || softmax(s / T))``, batch means, in float32.

    Args:
        student_logits: ``[B, C]`` student outputs (gradients flow through them).
        teacher_logits: ``[B, C]`` teacher logits ``z`` (no gradient), e.g. :meth:`EnsembleTeacher.logits`.
        labels: ``[B]`` class indices.
        temperature: ``T > 0``.
        alpha: weight of the soft term in ``[0, 1]``.
    """
    _check(temperature, alpha)
    s = student_logits.float()
    if teacher_logits.shape != s.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(s.shape)} differ")
    hard = F.cross_entropy(s, labels)
    if alpha == 0:
        return hard
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_q = F.log_softmax(s / temperature, dim=1)
    soft = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft


class EnsembleTeacher:
    """A calibrated ensemble as a teacher: ``logits(x) = log(ensemble(x)) / T_cal``, no gradients, eval mode.

    Args:
        ensemble: a :class:`snapens.ensemble.SnapshotEnsemble` (or any ``_Ensemble``) holding the fitted weights,
            taking the inputs the student is trained on (normalised batches: build it with
            ``inputs="normalized"``), on the training device.
        calibration_temperature: ``T_cal``, fitted on validation (1: uncalibrated).
    """

    def __init__(self, ensemble: torch.nn.Module, *, calibration_temperature: float = 1.0) -> None:
        if not (0 < calibration_temperature < math.inf):
            raise ValueError(f"calibration_temperature must be > 0 and finite, got {calibration_temperature}")
        self.ensemble = ensemble.eval()
        self.calibration_temperature = float(calibration_temperature)

    def logits(self, x: Tensor) -> Tensor:
        """``[B, C]`` float32 teacher logits for the batch ``x`` (on the ensemble's device)."""
        device_type = x.device.type
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            # The ensemble applies its own precision; the student's autocast must not leak into it.
            probs = self.ensemble(x)
        # clone(): the ensemble computes in inference mode, whose tensors autograd cannot save.
        return torch.log(probs.float().clone().clamp_min(_TINY)) / self.calibration_temperature


def make_loss_fn(teacher: EnsembleTeacher, *, temperature: float,
                 alpha: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The ``loss_fn(logits, y, x)`` of :func:`snapens.engine.fit` for distilling ``teacher``: the teacher runs on
    ``x``, the batch the student just saw (see :func:`distillation_loss`)."""
    _check(temperature, alpha)

    def loss_fn(logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        return distillation_loss(logits, teacher.logits(x), y, temperature=temperature, alpha=alpha)

    return loss_fn


def top1_agreement(a_probs: Tensor, b_probs: Tensor) -> float:
    """Percentage of rows whose argmax (top-1 class) is the same in ``a_probs`` and ``b_probs`` (``[N, C]``)."""
    if a_probs.shape != b_probs.shape or a_probs.dim() != 2 or a_probs.shape[0] == 0:
        raise ValueError(f"need two non-empty [N, C] tensors of one shape, got {tuple(a_probs.shape)} and "
                         f"{tuple(b_probs.shape)}")
    return 100.0 * float((a_probs.argmax(1) == b_probs.argmax(1)).double().mean())
