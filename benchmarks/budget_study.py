"""When does a snapshot ensemble beat the single model? Aggregate a grid of `snapens train` run folders.

Each run folder (written by ``snapens train``, which evaluated it on the test split into ``summary.json``) is
read; the snapshots' validation probabilities are computed (cached in ``RUN/val_member_probs.pt``) to choose m.
Every choice is made on VALIDATION data:

* ``single``: the final model of a ``--schedule step`` run (its last snapshot) at the same budget and seed;
* ``last``: the last snapshot of a cyclic run;
* ``equal``: the paper's ensemble, equal weights over all M snapshots;
* ``last-m (val)``: equal weights over the last m snapshots, m chosen by validation NLL;
* ``fitted``: weights fitted on validation NLL (train's evaluation, ``snapens.weighting.fit_ensemble_weights``);
* ``recommended``: what a user gets by default (``snapens.guidance.recommend``: the fewest forward passes within
  one standard error of the lowest validation NLL, temperature only where cross-validation supports it), from the
  run's ``summary.json`` when ``snapens evaluate`` of this version wrote it; ``passes`` is its members run.

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
from snapens.runs import read_run_info
from snapens.workflows.evaluation import load_run_dataset
from snapens.ensemble import SnapshotEnsemble
from snapens.models import build_model


def val_member_probs(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation probabilities of every snapshot ([M, N, C]) and the labels, cached in the run folder."""
    cache = run_dir / "val_member_probs.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        return saved["probs"], saved["labels"]
    info = read_run_info(run_dir)
    data = load_run_dataset(info)
    # every member, as train's own evaluation computes them (not the recommended subset)
    ens = SnapshotEnsemble.from_run(run_dir, build_model, precision="auto", weights="equal", temperature=False)
    probs, labels = ens.member_probs(data.val.images, batch_size=256), torch.as_tensor(data.val.labels)
    torch.save({"probs": probs, "labels": labels}, cache)
    return probs, labels


def _test(row: dict[str, Any]) -> dict[str, float]:
    return {"error": row["error"], "nll": row["nll"]}


def run_rows(run_dir: Path) -> dict[str, Any]:
    """One run's setting and its test error/NLL for every way of combining its snapshots.

    The test numbers are those of the run's own evaluation (``summary.json``, written by ``snapens train``);
    only the validation probabilities are computed here, to choose m for the last-m ensemble.
    """
    cfg = read_run_info(run_dir)["config"]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {"last": _test(summary["last_snapshot"])}
    if summary.get("ensemble_recommended"):
        rec = summary["ensemble_recommended"]
        rows["recommended"] = {**_test(rec), "passes": rec["members_run"], "use": rec["use"]}
    if cfg["schedule"] != "step" and summary["num_members"] > 1:
        val, yv = val_member_probs(run_dir)
        m_total = val.shape[0]
        rows["equal"] = _test(summary["ensemble_equal"])
        val_nll = [metrics.nll(val[-m:].mean(0), yv) for m in range(1, m_total + 1)]
        m_best = 1 + min(range(m_total), key=lambda i: val_nll[i])
        curve = summary["ensemble_size_curve"]
        rows["last-m (val)"] = {"error": curve["error"][curve["m"].index(m_best)], "nll": None, "m": m_best}
        rows["fitted"] = {**_test(summary["ensemble_weighted"]),
                          "weights": [round(float(x), 3) for x in summary["ensemble_weighted"]["weights"]]}
        rows["members"] = [round(s["error"], 2) for s in summary["snapshots"]]
    return {"name": run_dir.name, "schedule": cfg["schedule"], "epochs": cfg["epochs"], "seed": cfg["seed"],
            "snapshots": summary["num_members"], "cycle_mult": cfg.get("cycle_mult"),
            "cycle_decay": cfg.get("cycle_decay"), "limit_train": cfg.get("limit_train"), "rows": rows}


def setting(r: dict[str, Any]) -> str:
    if r["schedule"] == "step":
        return "single (step)"
    if r["schedule"] == "cosine-cycles" and r["snapshots"] == 1:
        return "single (1 cosine cycle)"
    if r["schedule"] in ("fge", "swa"):
        return f"{r['schedule']} (M={r['snapshots']})"
    shape = "".join([f", mult {r['cycle_mult']:g}" if r["cycle_mult"] not in (None, 1.0) else "",
                     f", decay {r['cycle_decay']:g}" if r["cycle_decay"] not in (None, 1.0) else ""])
    return f"cosine M={r['snapshots']}{shape}"


def _ms(values: list[float], spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec.lstrip('+'))}"


def _delta(values: list[float | None], bases: list[dict[str, Any] | None], key: str, spec: str) -> str:
    if any(b is None for b in bases) or any(v is None for v in values):
        return ""
    return _ms([v - b[key] for v, b in zip(values, bases)], spec)


def markdown(results: list[dict[str, Any]]) -> str:
    """Table: per (budget, setting), mean ± std over seeds of test error / NLL, and the differences from the two
    single models of the same budget and seed: the step schedule and one cosine cycle (M=1)."""
    step = {(r["limit_train"], r["epochs"], r["seed"]): r["rows"]["last"] for r in results if r["schedule"] == "step"}
    one = {(r["limit_train"], r["epochs"], r["seed"]): r["rows"]["last"]
           for r in results if r["schedule"] == "cosine-cycles" and r["snapshots"] == 1}
    groups: dict[tuple[Any, int, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["limit_train"], r["epochs"], setting(r)), []).append(r)
    lines = ["| train images | epochs | setting | seeds | combine | test error % | Δ vs step (pp) | Δ vs 1 cycle (pp) "
             "| NLL | Δ NLL vs step | Δ NLL vs 1 cycle |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (limit, epochs, name), runs in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1], kv[0][2])):
        combos = [c for c in ("last", "equal", "last-m (val)", "fitted", "recommended")
                  if all(c in r["rows"] for r in runs)]
        for combo in combos:
            err = [r["rows"][combo]["error"] for r in runs]
            nll = [r["rows"][combo]["nll"] for r in runs]
            keys = [(limit, epochs, r["seed"]) for r in runs]
            cells = [_ms(err, ".2f"), _delta(err, [step.get(k) for k in keys], "error", "+.2f"),
                     _delta(err, [one.get(k) for k in keys], "error", "+.2f"),
                     "—" if None in nll else _ms(nll, ".3f"), _delta(nll, [step.get(k) for k in keys], "nll", "+.3f"),
                     _delta(nll, [one.get(k) for k in keys], "nll", "+.3f")]
            label = combo
            if combo == "last-m (val)":
                label = "last-m (val: m=" + ",".join(str(r["rows"][combo]["m"]) for r in runs) + ")"
            elif combo == "recommended":
                label = "recommended (passes " + ",".join(str(r["rows"][combo]["passes"]) for r in runs) + ")"
            seeds = ",".join(str(r["seed"]) for r in runs)
            lines.append(f"| {limit or 'all'} | {epochs} | {name} | {seeds} | {label} | " + " | ".join(cells) + " |")
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
