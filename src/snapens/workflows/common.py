"""What every whole-run workflow needs: threads, the environment record, the default run folder, the loaders,
the evaluation batch size, the model-name check and the check that a rebuilt split is the recorded one."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

import snapens

__all__ = [
    "EVAL_MIN_BATCH",
    "MAX_LR",
    "THREADS_PER_CPU",
    "build_loaders",
    "check_lr",
    "check_recorded_split",
    "check_model_name",
    "check_threads",
    "default_run_dir",
    "environment_info",
    "eval_batch_size",
    "max_threads",
    "plural",
    "set_threads",
]

#: Evaluation batches are never smaller than this: no gradients are kept, so big batches are cheap.
EVAL_MIN_BATCH = 256


def eval_batch_size(train_batch_size: int) -> int:
    """The batch size of every evaluation pass (validation, test, teacher): ``max(256, train_batch_size)``."""
    return max(EVAL_MIN_BATCH, int(train_batch_size))


#: At most this many threads per CPU core: far more threads than cores only slow a run down, and OpenBLAS
#: crashes (SIGSEGV, no message) when asked for tens of thousands.
THREADS_PER_CPU = 4
#: The largest learning rate accepted: 50 times the largest lr0 of the papers (0.2). It stops absurd values
#: before anything is written: SGD applies ``lr * grad`` in float32, and ``--lr 1e300`` overflowed mid-step (a
#: RuntimeError) after config.json and state.pt were written, leaving a run that neither resumed nor restarted.
MAX_LR = 10.0


def max_threads() -> int:
    """The most threads :func:`set_threads` accepts: :data:`THREADS_PER_CPU` per core of this machine."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def check_threads(threads: int) -> int:
    """``threads`` if it is a positive integer of at most :func:`max_threads`.

    Raises:
        ValueError: anything else (one line).
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if threads > max_threads():
        raise ValueError(f"threads {threads} is more than {THREADS_PER_CPU} per CPU core of this machine "
                         f"({os.cpu_count() or 1} cores): at most {max_threads()}")
    return threads


def check_lr(lr: float, name: str = "lr") -> float:
    """``lr`` if it is a finite learning rate in (0, :data:`MAX_LR`].

    Raises:
        ValueError: anything else, naming ``name`` (one line).
    """
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and 0 < lr <= MAX_LR):
        raise ValueError(f"{name} must be a finite learning rate in (0, {MAX_LR:g}], got {lr!r}")
    return float(lr)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads (``None`` keeps the default); returns the number in use.

    Raises:
        ValueError: ``threads`` < 1 or more than :func:`max_threads`.
    """
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    return torch.get_num_threads()


def environment_info(device: torch.device, precision: str, world_size: int = 1) -> dict[str, Any]:
    """Versions and hardware for ``config.json``: what a reader needs to reproduce a number.

    ``device`` is rank 0's; ``world_size`` the number of training processes (torchrun).
    """
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        name = f"{device} ({platform.processor() or platform.machine()})"
    return {
        "snapens": snapens.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": name,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


def plural(count: int, noun: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``: a count with its noun, in the singular for one."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def default_run_dir(dataset: str, model: str, now: _dt.datetime | None = None, root: str = "runs") -> Path:
    """``runs/<dataset>-<model>-<YYYYmmdd-HHMMSS>``, with characters unsafe in file names replaced by ``_``.

    An image folder (``folder:PATH``) is named by the folder's own name (``folder-cifar10-jpeg-...``), not by
    its whole path.
    """
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    if dataset.lower().startswith("folder:"):
        path = Path(dataset[len("folder:"):]).expanduser()
        dataset = f"folder-{path.name if path.name not in ('', '.', '..') else path.resolve().name}"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}-{model}").strip("_")
    return Path(root) / f"{safe}-{stamp}"


def check_model_name(name: str, **model_kwargs: Any) -> None:
    """Build ``name`` once on a 3-channel, 10-class input (the global RNG untouched) so that an unknown model
    fails before any data is read.

    Raises:
        ValueError: an unknown model name or bad keyword arguments, with a pointer to the list of models.
    """
    from snapens.models import build_model

    with torch.random.fork_rng(devices=[]):
        try:
            build_model(name, num_classes=10, in_channels=3, **model_kwargs)
        except ValueError as exc:
            raise ValueError(f"{exc}; `snapens train --list-models` lists them all") from exc


def build_loaders(
    cfg: Any, splits: Any, device: torch.device | str, *, rank: int = 0, world_size: int = 1
) -> tuple[Any, Any | None]:
    """Training and validation :class:`~snapens.data.BatchLoader` for a :class:`~snapens.config.TrainConfig`.

    The training loader shuffles and augments as a function of ``(cfg.seed, epoch)``; ``cfg.augment`` None
    keeps the dataset's default augmentation and False turns it off. With ``world_size`` > 1 it yields rank
    ``rank``'s block of ``cfg.batch_size`` images from every global batch of ``cfg.batch_size * world_size``.
    The validation loader (None when the validation split is empty) keeps order, never augments, uses
    :func:`eval_batch_size` and is not sharded (rank 0 validates alone).
    """
    from snapens.data import AugmentSpec, BatchLoader

    augment = AugmentSpec() if cfg.augment is False else splits.augment
    train = BatchLoader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment,
                        mean=splits.mean, std=splits.std, device=device, channels_last=cfg.channels_last,
                        rank=rank, world_size=world_size)
    val = None
    if len(splits.val) > 0:
        val = BatchLoader(splits.val, eval_batch_size(cfg.batch_size), shuffle=False, augment=None,
                          mean=splits.mean, std=splits.std, device=device, channels_last=cfg.channels_last)
    return train, val


def check_recorded_split(data: Any, info: dict[str, Any]) -> None:
    """Refuse a dataset rebuilt from config.json that is not the one the run was trained on: other image shapes
    than ``dataset.image_shape`` or another split than ``dataset.split_sha256`` (older runs lack them: unchecked).

    Raises:
        ValueError: one line, pointing at config.json.
    """
    from snapens.data import split_fingerprint

    recorded, cfg = info["dataset"], info["config"]
    shape = recorded.get("image_shape")
    if shape is not None and list(shape) != [data.in_channels, *data.image_size]:
        raise ValueError(f"config.json's dataset.image_shape {list(shape)} is not the shape of the run's images "
                         f"{[data.in_channels, *data.image_size]}: config.json was likely edited; restore the value "
                         "the run was trained with")
    expected = recorded.get("split_sha256")
    if expected is not None and split_fingerprint(data) != expected:
        raise ValueError(f"the train/validation/test split rebuilt from config.json (seed {cfg['seed']}, val_size "
                         f"{cfg['val_size']}, limit_train {cfg.get('limit_train')}, limit_test "
                         f"{cfg.get('limit_test')}) is not the one the run was trained on: config.json was likely "
                         "edited (seed, val_size or limits) or the dataset's files changed; restore the values the run "
                         "was trained with")
