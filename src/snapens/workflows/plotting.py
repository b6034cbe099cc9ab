"""PNG figures of a run into ``RUN_DIR/plots/`` (:func:`plot_run`, what ``snapens plot`` draws).

The figures (schedule, training curves, ensemble size, snapshot correlation, price) are described once, in
``snapens plot --help`` (:mod:`snapens.cli.plot`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapens import runs
from snapens._io import atomic_path, read_json
from snapens.runs import SUMMARY_FILE, read_run_info

if TYPE_CHECKING:
    import torch

__all__ = ["PLOT_FILES", "plot", "plot_run", "plot_if_possible", "plot_price", "price_points", "price_outliers",
           "lr_curve", "snapshot_epochs", "read_metrics_csv", "correlation_labels"]

logger = logging.getLogger(__name__)

PLOT_FILES = ("lr_schedule.png", "training_curves.png", "ensemble_size.png", "snapshot_correlation.png", "price.png")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _steps_per_epoch(info: dict[str, Any]) -> int:
    cfg, ds = info["config"], info.get("dataset", {})
    num_train = int(ds.get("num_train", 0))
    if num_train < 1:
        raise ValueError("config.json has no dataset.num_train: cannot recompute the learning-rate schedule")
    return math.ceil(num_train / int(cfg["batch_size"]))


def lr_curve(info: dict[str, Any], steps_per_epoch: int | None = None) -> tuple[list[float], list[int]]:
    """The learning rate of every optimizer step of a run and the 0-based steps where snapshots are taken.

    Cyclic and single-cycle runs follow :func:`snapens.schedule.cosine_snapshot_lr` over the whole budget (a
    single-cycle run trains M models one cycle each, the same curve); the step baseline follows
    :func:`snapens.schedule.step_decay_lr`, fge :func:`~snapens.schedule.fge_lr` and swa
    :func:`~snapens.schedule.swa_lr`. Options missing from an older config.json take today's defaults.
    """
    from snapens import schedule as sch
    from snapens.config import TrainConfig

    cfg = {**TrainConfig().to_dict(), **info["config"]}
    spe = steps_per_epoch if steps_per_epoch is not None else _steps_per_epoch(info)
    total, m = int(cfg["epochs"]) * spe, int(cfg["snapshots"])
    lr, lr_min = float(cfg["lr"]), float(cfg.get("lr_min", 0.0))
    kind = cfg.get("schedule")
    if kind == "step":
        return [sch.step_decay_lr(s, total, lr) for s in range(total)], sch.cosine_snapshot_steps(total, m)
    if kind == "fge":
        args = (total, int(cfg["cycle_epochs"]) * spe)
        lrs = [sch.fge_lr(s, *args, lr, cfg["fge_start"], cfg["fge_lr1"], cfg["fge_lr2"]) for s in range(total)]
        return lrs, sch.fge_snapshot_steps(*args, cfg["fge_start"])
    if kind == "swa":
        factor = {} if cfg["swa_lr"] is None else {"swa_factor": float(cfg["swa_lr"]) / lr}
        lrs = [sch.swa_lr(s, total, lr, cfg["swa_start"], **factor) for s in range(total)]
        return lrs, sch.swa_snapshot_steps(total, spe, cfg["swa_start"])
    decay, mult = float(cfg["cycle_decay"]), float(cfg["cycle_mult"])
    lrs = [sch.cosine_snapshot_lr(s, total, m, lr, lr_min, decay, mult) for s in range(total)]
    return lrs, sch.cosine_snapshot_steps(total, m, mult)


def read_metrics_csv(path: Path) -> list[dict[str, float | None]]:
    """Rows of ``metrics.csv`` with numbers parsed (empty cells, e.g. no validation split, become ``None``)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in raw.items()})
    return rows


def _save(fig: Any, path: Path) -> None:
    # Written atomically: a reader never sees a half-written PNG.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _measured_steps_per_epoch(info: dict[str, Any], rows: list[dict[str, float | None]]) -> int | None:
    # metrics.csv's cumulative step count is exact whatever the loader did with a short last batch.
    epochs, last_step = len(rows), rows[-1].get("step") if rows else None
    return int(last_step) // epochs if last_step and epochs == int(info["config"]["epochs"]) else None


def _plot_lr(plt: Any, info: dict[str, Any], rows: list[dict[str, float | None]], out: Path) -> None:
    lrs, bounds = lr_curve(info, _measured_steps_per_epoch(info, rows))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(range(len(lrs)), lrs, lw=1.2)
    ax.scatter(bounds, [lrs[b] for b in bounds], color="C3", zorder=3, label="snapshot")
    ax.set(xlabel="optimizer step", ylabel="learning rate",
           title=f"{info['config'].get('schedule')} schedule, {len(bounds)} snapshots")
    ax.legend()
    _save(fig, out)
    plt.close(fig)


def snapshot_epochs(info: dict[str, Any], steps_per_epoch: int | None = None) -> list[float]:
    """Where the snapshots (the cycle ends) fall, in epochs: ``(step + 1) / steps_per_epoch`` for each
    0-based last step of a cycle (:func:`snapens.schedule.cosine_snapshot_steps`); epoch ``e`` of metrics.csv ends at ``e``."""
    from snapens.schedule import cosine_snapshot_steps

    cfg = info["config"]
    spe = steps_per_epoch if steps_per_epoch is not None else _steps_per_epoch(info)
    return [(b + 1) / spe for b in cosine_snapshot_steps(int(cfg["epochs"]) * spe, int(cfg["snapshots"]))]


def _plot_curves(plt: Any, info: dict[str, Any], rows: list[dict[str, float | None]], out: Path) -> None:
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, ax, label in (("train_loss", ax_loss, "train"), ("val_loss", ax_loss, "validation"),
                           ("train_acc", ax_acc, "train"), ("val_acc", ax_acc, "validation")):
        points = [(e, r.get(key)) for e, r in zip(epochs, rows) if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    # The step baseline has no cycles; its snapshots are taken where the cyclic run's cycles end.
    marker = "snapshot" if info["config"].get("schedule") == "step" else "cycle end (snapshot)"
    for ax in (ax_loss, ax_acc):
        for k, x in enumerate(snapshot_epochs(info, _measured_steps_per_epoch(info, rows))):
            ax.axvline(x, color="0.6", ls=":", lw=1, label=marker if k == 0 else None)
        ax.legend()
    _save(fig, out)
    plt.close(fig)


def _nan(value: float | None) -> float:
    # summary.json stores a non-finite number as null
    return float("nan") if value is None else float(value)


def _plot_size(plt: Any, summary: dict[str, Any], out: Path) -> None:
    curve = summary["ensemble_size_curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve["m"], [_nan(e) for e in curve["error"]], marker="o", label="ensemble of the last m snapshots")
    ax.axhline(_nan(summary["single_best"]["error"]), color="C3", ls="--",
               label="single best (chosen on validation)")
    ax.set(xlabel="ensemble size m", ylabel="test error (%)", xticks=curve["m"], title="error vs ensemble size")
    ax.legend()
    _save(fig, out)
    plt.close(fig)


def _plot_correlation(plt: Any, summary: dict[str, Any], out: Path) -> None:
    # Snapshots of one run are typically 0.99+ correlated: a map of the correlation itself is uniformly "1.00".
    # 1 - correlation, on a scale from 0 to the largest pair's value, shows which members differ and by how much.
    from matplotlib.ticker import FormatStrFormatter

    apart = [[1.0 - _nan(v) for v in row] for row in summary["diversity"]["correlation"]]
    names = correlation_labels(summary)
    fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.8 * len(names)), max(3.8, 1.2 + 0.8 * len(names))))
    finite = [v for row in apart for v in row if math.isfinite(v)]
    top = max(finite, default=0.0)
    im = ax.imshow(apart, vmin=0.0, vmax=top if top > 0 else 1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(apart):
        for j, v in enumerate(row):
            text = "0" if v == 0 else f"{v:.2g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if v < 0.6 * top else "k")
    ax.set(xlabel="member", ylabel="member")
    ax.set_title("1 - correlation of member predictions (test)", fontsize=10)
    # Plain tick labels: the default formatter adds an offset or exponent label above the bar, over the title.
    fig.colorbar(im, ax=ax, format=FormatStrFormatter("%.2g"))
    _save(fig, out)
    plt.close(fig)


def price_points(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The methods of a summary with a price (:func:`snapens.report.add_prices`): ``{"label", "error",
    "forward_passes", "images_per_second"}`` each; empty for a summary without one."""
    from snapens.report import ENSEMBLE_ROWS, SINGLE_ROWS

    if not summary.get("price"):
        return []
    labels = {"single_best": "single best", "last_snapshot": "last snapshot", "ensemble_equal": "ensemble (equal)",
              "ensemble_weighted": "ensemble (fitted weights)", "ensemble_temperature": "ensemble + temperature"}
    return [{"label": labels[key], **{k: summary[key][k] for k in ("error", "forward_passes", "images_per_second")}}
            for key in SINGLE_ROWS + ENSEMBLE_ROWS if summary.get(key)]


#: A price plot's y axis ends above the highest error it shows; higher errors sit on that edge (see
#: :func:`price_outliers`): one method at 82 % error would otherwise flatten 24 others between 0.5 and 4 %.
OUTLIER_SPAN_FACTOR = 4.0
#: Spreads narrower than this (percentage points), or than a fifth of the errors' level, count as that wide when
#: judging outliers: a 1.95 % point over four at 0.56 % is no outlier, it is the only spread there is.
OUTLIER_MIN_SPAN = 1.0


def price_outliers(errors: list[float]) -> list[int]:
    """Indices (0-based) of the errors a price plot puts off its scale, highest first.

    With the finite errors sorted, ``e_min`` the lowest, the ``j`` highest are outliers for the smallest ``j``
    (``1 <= j <= len(errors) // 4``) where the lowest of them lies far above the rest: ``e_j - e_min >
    OUTLIER_SPAN_FACTOR * max(e_rest - e_min, OUTLIER_MIN_SPAN, e_rest / 5)``, ``e_rest`` the highest error
    kept. Showing them would squeeze the others into under a quarter of the height. Non-finite errors are
    never plotted and never outliers; none are outliers when no ``j`` qualifies.
    """
    order = sorted((i for i, e in enumerate(errors) if math.isfinite(e)), key=lambda i: errors[i])
    for j in range(1, min(len(errors) // 4, len(order) - 2) + 1):
        lo, rest, lowest_out = errors[order[0]], errors[order[-j - 1]], errors[order[-j]]
        if lowest_out - lo > OUTLIER_SPAN_FACTOR * max(rest - lo, OUTLIER_MIN_SPAN, rest / 5):
            return order[-j:][::-1]
    return []


def _log_ticks(lo: float, hi: float) -> list[float]:
    # Few ticks with plain labels: 1-2-5 per decade, or 1..9 when the range holds fewer than two of those.
    for mantissas in ((1, 2, 5), range(1, 10)):
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mantissas]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 2:
            return ticks[:: math.ceil(len(ticks) / 6)]
    return [float(f"{lo:.2g}"), float(f"{hi:.2g}")] if hi > lo else [float(f"{lo:.2g}")]


# Label offsets (points) tried in order around a marker: right, then left, then further out.
_LABEL_OFFSETS = [(5, 1), (5, -9), (-5, 1), (-5, -9), (5, 10), (-5, 10), (5, -18), (-5, -18),
                  (14, 1), (14, -9), (-14, 1), (-14, -9), (14, 10), (-14, 10), (14, -18), (-14, -18),
                  (5, 19), (-5, 19), (5, -27), (-5, -27), (23, 1), (-23, 1), (23, -9), (-23, -9)]


def _place_labels(ax: Any, placed: list[tuple[int, float, float]]) -> None:
    # Greedy placement in display space: each number goes to the first offset where its box overlaps neither a
    # marker nor a number already placed. Methods of equal cost and error (a measured price is shared by every
    # combination of the same members) would otherwise print their numbers on top of each other.
    scale = ax.figure.dpi / 72.0
    centres = [ax.transData.transform((x, y)) for _, x, y in placed]
    boxes: list[tuple[float, float, float, float]] = [(cx - 3.5 * scale, cy - 3.5 * scale, cx + 3.5 * scale,
                                                       cy + 3.5 * scale) for cx, cy in centres]
    for (k, x, y), (cx, cy) in zip(placed, centres):
        w, h = (4.2 * len(str(k)) + 1) * scale, 7.5 * scale
        for n, (dx, dy) in enumerate(_LABEL_OFFSETS):
            x0 = cx + dx * scale - (w if dx < 0 else 0)
            box = (x0, cy + dy * scale, x0 + w, cy + dy * scale + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        far = n >= 4  # away from its marker: a thin leader line says whose number it is
        ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                    ha="right" if dx < 0 else "left", va="bottom",
                    arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35", "shrinkA": 0, "shrinkB": 2}
                    if far else None)


def plot_price(points: list[dict[str, Any]], out: Path, *,
               title: str = "error vs inference cost") -> dict[str, Any]:
    """Test error (%) against milliseconds per test image (log x axis), one numbered point per method; the
    legend beside the plot names each number's method and its forward passes per image.

    ``points``: ``{"label", "error", "forward_passes", "images_per_second"}`` each (see :func:`price_points`).
    Errors far above the rest (:func:`price_outliers`) are drawn as a triangle on the top edge with their value,
    so that they do not flatten the others. Returns ``{"off_scale": [1-based numbers of those points],
    "ylim": (bottom, top)}``.
    """
    from matplotlib.ticker import FixedLocator, NullFormatter

    plt = _pyplot()
    ms = [1000.0 / _nan(p["images_per_second"]) for p in points]
    errors = [_nan(p["error"]) for p in points]
    off = set(price_outliers(errors))
    shown = [e for i, e in enumerate(errors) if i not in off and math.isfinite(e)]
    lo, hi = (min(shown), max(shown)) if shown else (0.0, 1.0)
    pad = max(hi - lo, 0.5) * 0.08
    ylim = (max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + (3 if off else 1) * pad)
    fig, ax = plt.subplots(figsize=(9, max(4.0, 1.0 + 0.22 * len(points))))
    ax.set_ylim(*ylim)
    placed = []
    for k, (p, x, err) in enumerate(zip(points, ms, errors), start=1):
        passes = _nan(p["forward_passes"])
        label = f"{k}: {p['label']} ({passes:g} pass{'' if passes == 1 else 'es'})"
        # White edges and a little transparency: markers of equal cost and error stay visible as a stack.
        style = {"color": f"C{(k - 1) % 10}", "zorder": 3, "s": 44, "edgecolors": "white", "linewidths": 0.6,
                 "alpha": 0.9}
        if k - 1 in off:
            ax.scatter([x], [ylim[1]], marker="^", clip_on=False, label=f"{label}: {err:.2f} %, off the scale",
                       **style)
            ax.annotate(f"{k}: {err:.2f} %", (x, ylim[1]), textcoords="offset points", xytext=(0, -11),
                        fontsize=7, ha="center", va="top", color=f"C{(k - 1) % 10}")
            continue
        ax.scatter([x], [err], marker="os^Dv"[(k - 1) // 10 % 5], label=label, **style)
        placed.append((k, x, err))
    finite_ms = [x for x in ms if math.isfinite(x) and x > 0]
    ax.set_xscale("log")
    if finite_ms:
        x_lo, x_hi = min(finite_ms), max(finite_ms)
        ax.set_xlim(x_lo / 1.25, x_hi * 1.25)
        ax.xaxis.set_major_locator(FixedLocator(_log_ticks(x_lo / 1.25, x_hi * 1.25)))
        ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:g}")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="test-time cost (ms per image, measured)", ylabel="test error (%)", title=title)
    ax.grid(True, which="major", color="0.9", lw=0.6)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    _place_labels(ax, placed)
    _save(fig, out)
    plt.close(fig)
    return {"off_scale": [i + 1 for i in sorted(off)], "ylim": ylim}


def correlation_labels(summary: dict[str, Any]) -> list[str]:
    """The names of the rows (and columns) of the summary's diversity matrices, in order."""
    return [str(n) for n in summary["diversity"].get("members", summary["member_names"])]


def plot_run(
    run_dir: Path,
    *,
    device: str | torch.device = "cpu",
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    announce: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the PNGs of a run (:data:`PLOT_FILES`) into ``run_dir/plots/`` and return their paths.

    Evaluates the run first (:func:`snapens.workflows.evaluation.evaluate_run`, on ``device`` with the dataset at
    ``data_dir``) when it has no ``summary.json``; ``announce`` then receives a note saying so, once the device,
    matplotlib and the run folder (config.json, metrics.csv) have been checked.

    Raises:
        ImportError: no matplotlib.
        ValueError / FileNotFoundError: a bad device, or not a complete run folder.
    """
    from snapens.distributed import resolve_device
    from snapens.workflows.evaluation import evaluate_run

    dev = resolve_device(device)
    plt = _pyplot()
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    metrics_path = run_dir / runs.METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} does not exist: is {run_dir} a finished run?")
    rows = read_metrics_csv(metrics_path)
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.exists():
        try:
            summary = read_json(summary_path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {summary_path}: {exc}; delete it to evaluate the run again") from exc
    else:
        if announce is not None:
            announce(f"{run_dir} has no {SUMMARY_FILE}: evaluating it first")
        summary = evaluate_run(run_dir, device=dev, data_dir=data_dir, progress=progress)
    out_dir = run_dir / runs.PLOTS_DIR
    out_dir.mkdir(exist_ok=True)
    paths = [out_dir / name for name in PLOT_FILES]
    _plot_lr(plt, info, rows, paths[0])
    _plot_curves(plt, info, rows, paths[1])
    _plot_size(plt, summary, paths[2])
    _plot_correlation(plt, summary, paths[3])
    points = price_points(summary)
    if not points:  # a summary from before the price columns
        return paths[:4]
    plot_price(points, paths[4])
    return paths


def plot_if_possible(run_dir: Path, device: torch.device | str, announce: Callable[[str], None]) -> list[Path]:
    """The run's PNGs (:func:`plot_run`) when matplotlib is installed; a note otherwise, never a failure.

    Plots are optional output: a failure to draw or write them (e.g. an unwritable ``plots/``) is logged as a
    warning and nothing is raised. ``announce`` receives one line: the files written, or why there are none.
    """
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        announce("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    try:
        paths = plot_run(run_dir, device=str(device))
    except Exception as exc:  # noqa: BLE001 - any plotting failure: the run itself is complete
        logger.warning("snapens: warning: plots not written (%s); the run is complete, retry with: snapens plot %s",
                       exc, run_dir)
        return []
    announce(f"plots: {', '.join(str(p) for p in paths)}")
    return paths


def plot(
    run_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    announce: Callable[[str], None] | None = None,
) -> list[Path]:
    """:func:`plot_run` holding the run folder's lock (it writes ``plots/``, maybe ``summary.json``), on device
    ``"auto"`` by default: ``snapens plot RUN_DIR`` as a function.

    Raises:
        ImportError / ValueError / FileNotFoundError: see :func:`plot_run`.
        snapens._lock.RunFolderBusy: another process holds the run folder.
    """
    from snapens._lock import run_lock

    with run_lock(run_dir):
        return plot_run(Path(run_dir), device=device, data_dir=data_dir, progress=progress, announce=announce)
