"""When does a snapshot ensemble beat the single model? Aggregate a grid of `snapens train` run folders.

Each run folder (written by ``snapens train``) is evaluated member by member on its validation and test
splits (the probabilities are cached in ``RUN/member_probs.pt``). Every choice is made on VALIDATION data:

* ``single``: the final model of a ``--schedule step`` run (its last snapshot) at the same budget and seed;
* ``last``: the last snapshot of a cyclic run;
* ``equal``: the paper's ensemble, equal weights over all M snapshots;
* ``last-m (val)``: equal weights over the last m snapshots, m chosen by validation NLL;
* ``fitted``: weights fitted on validation NLL (``snapens.weighting.fit_ensemble_weights``).

Usage::

    python benchmarks/budget_study.py RUNS_ROOT --md benchmarks/results/budget_study.md \
        --json benchmarks/results/budget_study.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from snapens import metrics
from snapens.cli.evaluate import load_run_dataset, read_run_info
from snapens.ensemble import SnapshotEnsemble
from snapens.models import build_model
from snapens.weighting import fit_ensemble_weights, weighted_average


def member_probs(run_dir: Path) -> dict[str, torch.Tensor]:
    """Validation and test probabilities of every snapshot ([M, N, C]) with the labels, cached in the run."""
    cache = run_dir / "member_probs.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    info = read_run_info(run_dir)
    data = load_run_dataset(info)
    ens = SnapshotEnsemble.from_run(run_dir, build_model, precision="auto")
    out = {"val": ens.member_probs(data.val.images, batch_size=256),
           "test": ens.member_probs(data.test.images, batch_size=256),
           "val_labels": torch.as_tensor(data.val.labels), "test_labels": torch.as_tensor(data.test.labels)}
    torch.save(out, cache)
    return out


def _scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"error": metrics.error_rate(probs, labels), "nll": metrics.nll(probs, labels)}


def run_rows(run_dir: Path) -> dict[str, Any]:
    """One run's setting and its test error/NLL for every way of combining its snapshots."""
    cfg = read_run_info(run_dir)["config"]
    p = member_probs(run_dir)
    val, test, yv, yt = p["val"], p["test"], p["val_labels"], p["test_labels"]
    m_total = val.shape[0]
    rows = {"last": _scores(test[-1], yt)}
    if cfg["schedule"] != "step":
        rows["equal"] = _scores(test.mean(0), yt)
        val_nll = [metrics.nll(val[-m:].mean(0), yv) for m in range(1, m_total + 1)]
        m_best = 1 + min(range(m_total), key=lambda i: val_nll[i])
        rows["last-m (val)"] = {**_scores(test[-m_best:].mean(0), yt), "m": m_best}
        w = fit_ensemble_weights(val, yv)
        rows["fitted"] = {**_scores(weighted_average(test, w), yt), "weights": [round(float(x), 3) for x in w]}
        rows["members"] = [round(metrics.error_rate(test[i], yt), 2) for i in range(m_total)]
    return {"name": run_dir.name, "schedule": cfg["schedule"], "epochs": cfg["epochs"], "seed": cfg["seed"],
            "snapshots": m_total, "cycle_mult": cfg.get("cycle_mult"), "cycle_decay": cfg.get("cycle_decay"),
            "limit_train": cfg.get("limit_train"), "rows": rows}


def setting(r: dict[str, Any]) -> str:
    if r["schedule"] == "step":
        return "single (step)"
    if r["schedule"] == "fge":
        return f"fge (M={r['snapshots']})"
    shape = "".join([f", mult {r['cycle_mult']:g}" if r["cycle_mult"] not in (None, 1.0) else "",
                     f", decay {r['cycle_decay']:g}" if r["cycle_decay"] not in (None, 1.0) else ""])
    return f"cosine M={r['snapshots']}{shape}"


def _ms(values: list[float], spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def markdown(results: list[dict[str, Any]]) -> str:
    """Table: per (budget, setting), mean ± std over seeds of test error / NLL, and the gain over single."""
    single = {(r["limit_train"], r["epochs"], r["seed"]): r["rows"]["last"]
              for r in results if r["schedule"] == "step"}
    groups: dict[tuple[Any, int, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["limit_train"], r["epochs"], setting(r)), []).append(r)
    lines = ["| train images | epochs | setting | seeds | combine | test error % | Δ error vs single (pp) | NLL "
             "| Δ NLL vs single |", "|---|---|---|---|---|---|---|---|---|"]
    for (limit, epochs, name), runs in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1], kv[0][2])):
        combos = ["last"] if runs[0]["schedule"] == "step" else ["last", "equal", "last-m (val)", "fitted"]
        for combo in combos:
            err = [r["rows"][combo]["error"] for r in runs]
            nll = [r["rows"][combo]["nll"] for r in runs]
            base = [single.get((limit, epochs, r["seed"])) for r in runs]
            if all(b is not None for b in base) and runs[0]["schedule"] != "step":
                d_err = _ms([e - b["error"] for e, b in zip(err, base)], "+.2f")
                d_nll = _ms([n - b["nll"] for n, b in zip(nll, base)], "+.3f")
            else:
                d_err = d_nll = ""
            label = combo if combo != "last-m (val)" else "last-m (val: m=" + ",".join(
                str(r["rows"][combo]["m"]) for r in runs) + ")"
            seeds = ",".join(str(r["seed"]) for r in runs)
            lines.append(f"| {limit or 'all'} | {epochs} | {name} | {seeds} | {label} | {_ms(err, '.2f')} | "
                         f"{d_err} | {_ms(nll, '.3f')} | {d_nll} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_root", type=Path)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = [run_rows(d) for d in sorted(args.runs_root.iterdir()) if (d / "summary.json").exists()]
    table = markdown(results)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
