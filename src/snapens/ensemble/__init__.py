"""Snapshot ensembles at test time: the weighted mean of the members' softmax probabilities.

For members :math:`f_1, \\dots, f_M` (snapshots of one architecture) and weights :math:`w_m \\ge 0`,
:math:`\\sum_m w_m = 1` (equal, :math:`w_m = 1/M`, in the paper):

.. math::

    p(y \\mid x) = \\sum_{m=1}^{M} w_m \\, \\mathrm{softmax}(f_m(x))_y

Probabilities are averaged, never logits or weights (Huang et al., 2017, Sec. 3).

Two forms share one scikit-learn-like interface (``member_probs`` [M, N, C], ``predict_proba`` [N, C],
``predict`` [N]):

* :class:`SnapshotEnsemble` (default) keeps the members' state dicts off the device (CPU unless told otherwise)
  and streams them through ONE working model on the device, so device memory holds one model, not M.
* :class:`MaterializedEnsemble` (``SnapshotEnsemble.materialize()``) holds all M members as submodules; its
  ``forward`` is plain tensor code that ``torch.export.export`` and ``torch.jit.trace`` can capture.

Both always run in eval mode (BatchNorm uses its running statistics); the prediction methods run in
``torch.inference_mode``.

Inputs. Built with the training set's per-channel ``mean`` / ``std`` (as :meth:`SnapshotEnsemble.from_run` does
by default), an ensemble takes images as a user has them: a uint8 tensor ``[N, C, H, W]`` with values 0..255, or
a floating tensor ``[N, C, H, W]`` with values in [0, 1] (the uint8 pixels divided by 255), and normalises them
itself, ``(x - mean) / std``; floating input outside [0, 1] is refused. Without ``mean`` / ``std``
(``from_run(..., inputs="normalized")``, or the constructor without them) it takes what the network was trained
on: images already normalised by the caller.

Precision. ``precision="auto"`` (default) runs the members in bf16 autocast where the device computes bf16
natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16) and in fp32 elsewhere; ``"fp32"`` forces fp32
(the numbers of earlier versions, bit for bit), ``"bf16"`` forces bf16 and ``"fp16"`` is fp16 autocast on CUDA.
Softmax and the weighted mean are always computed in fp32. Conv nets run in channels-last memory format
under bf16/fp16 (where it is faster) and in the default format under fp32.

Example:
    >>> ens = SnapshotEnsemble.from_run("runs/c10", build_model, last=3, device="cuda")  # doctest: +SKIP
    >>> probs = ens.predict_proba(test_loader)                                          # doctest: +SKIP
    >>> program = torch.export.export(ens.materialize(), (x,))                          # doctest: +SKIP
"""

from __future__ import annotations

from snapens._precision import Precision
from snapens.ensemble._base import DEFAULT_BATCH_SIZE, INPUTS, resolve_member_weights
from snapens.ensemble.materialized import MaterializedEnsemble
from snapens.ensemble.snapshot import SnapshotEnsemble

__all__ = ["SnapshotEnsemble", "MaterializedEnsemble", "Precision", "resolve_member_weights", "DEFAULT_BATCH_SIZE",
           "INPUTS"]
