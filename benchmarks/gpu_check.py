"""One command that checks snapens on a CUDA GPU and answers the paper's question at its scale (issue 22).

Stages, in order, each with its own time budget inside one overall budget (default 540 s); a stage that runs
long is cut (its processes get SIGTERM, so training runs stay resumable) and reported as ``cut``, and the
results file is rewritten after every stage, so nothing measured is lost:

1. ``env``: GPU, driver, torch, CUDA, bf16 support, CPU count, git commit.
2. ``tests``: ``python -m pytest -m gpu -q tests/test_gpu.py``, pass/fail/skip counts (pytest missing: recorded).
3. ``train``: ``snapens train`` for a few epochs at ``--precision auto``, ``fp16`` and with ``--compile``; each run
   gets one SIGTERM after its first epoch and is finished with ``--resume``; checked: exit codes, finite losses,
   summary.json written.
4. ``throughput``: ``engine.fit`` (as ``snapens train`` runs it) against the minimal hand loop of
   benchmarks/bench_engine.py over the same on-device batches; resnet-20 and wrn-16-4, bf16, channels-last,
   without and with ``torch.compile``. Goal: engine / hand >= 0.95.
5. ``inference``: benchmarks/bench_inference.py: ensemble img/s against M passes of the best single model.
   Goal: ratio >= 0.95.
6. ``study``: the budget study at the paper's scale (45,000 training, 5,000 validation, 10,000 test images,
   resnet-20, batch 128, lr 0.1): the step-schedule single model, one cosine cycle, M = 2, 4, 6 at the same
   budget, as separate processes sharing the GPU. A calibration epoch (one process alone, then all at once)
   measures the epoch time and how well the processes share the GPU; the epoch count is sized from it so that
   every run finishes inside the window; two seeds when that still gives the target epochs, else one.
7. ``export``: the best ensemble of the study (lowest validation NLL of the equal-weight ensemble) as a
   pre-trained bundle (float16, see ``snapens.pretrained``), evaluated again from the bundle itself, with the
   registry entry to commit.

``--dry-run`` does all of it tiny on a CPU (digits, cnn-small, a few hundred images, 2-4 epochs) and marks the
GPU-only parts (fp16, compile, wrn-16-4) as skipped: tests/test_gpu_check.py runs it so that it cannot rot.

Usage (from the repository root, without installing)::

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out "$OUT"
    PYTHONPATH=src python3 benchmarks/gpu_check.py --stages study,export --budget-s 540 --out "$OUT"
    PYTHONPATH=src python3 benchmarks/gpu_check.py --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "train", "throughput", "inference", "study", "export")
#: Seconds per stage on a GPU (the study gets what is left of --budget-s, minus the export's share).
GPU_BUDGETS = {"env": 15, "tests": 60, "train": 130, "throughput": 75, "inference": 45, "study": 0, "export": 40}
DRY_BUDGETS = {"env": 10, "tests": 40, "train": 40, "throughput": 30, "inference": 30, "study": 0, "export": 30}
STUDY_MEMBERS = (2, 4, 6)
PRETRAINED_MAX_BYTES = 6_000_000


# --------------------------------------------------------------------------------------------------- plumbing


def _env() -> dict[str, str]:
    """The child processes' environment: this tree's snapens first, one OpenMP thread each."""
    src = str(REPO / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "OMP_NUM_THREADS": "1"}


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group we started (training saves a resumable state), SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w")  # noqa: SIM115 - the child owns it; closed when the parent exits
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _run(cmd: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion or ``timeout``; returns rc, seconds, cut, and the last lines of its output."""
    t0 = time.perf_counter()
    proc = _start(cmd, log)
    cut = False
    try:
        proc.wait(max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        cut = True
        _stop(proc)
    return {"cmd": shlex.join(cmd), "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
            "cut": cut, "output_tail": _tail(log)}


def _tail(log: Path, lines: int = 12) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class Check:
    """The run's options, results and clock: ``budget(stage)`` is what a stage may spend."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {"dry_run": args.dry_run, "budget_s": args.budget_s, "stages": {}}
        self.budgets = dict(DRY_BUDGETS if args.dry_run else GPU_BUDGETS)
        for item in args.stage_budget:
            name, _, seconds = item.partition("=")
            if name not in STAGES:
                raise SystemExit(f"gpu_check: --stage-budget: unknown stage {name!r}; stages are {', '.join(STAGES)}")
            self.budgets[name] = float(seconds)
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="snapens-gpu-check-"))
        self.out = Path(args.out)
        self.name = "cpu-dry-run" if args.dry_run else "no-gpu"  # the GPU's name once stage env has seen it

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def budget(self, stage: str) -> float:
        if stage == "study" and not self.budgets["study"]:
            later = self.budgets["export"] if "export" in self.args.stages else 0
            return max(0.0, self.left() - later)
        return max(0.0, min(self.budgets[stage], self.left()))

    def device(self) -> str:
        return "cpu" if self.args.dry_run else "cuda"

    def paths(self) -> tuple[Path, Path]:
        stem = self.out / f"gpu-{self.name}"
        return stem.with_suffix(".md"), stem.with_suffix(".json")

    def save(self) -> None:
        """Rewrite the results (JSON and Markdown), atomically, after every stage."""
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        md, js = self.paths()
        self.out.mkdir(parents=True, exist_ok=True)
        for path, text in ((js, json.dumps(self.results, indent=1, default=str) + "\n"), (md, markdown(self.results))):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ stages


def stage_env(check: Check) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                    gpus=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
        check.name = re.sub(r"[^A-Za-z0-9.]+", "-", props.name).strip("-")
    elif not check.args.dry_run:
        raise RuntimeError("no CUDA device: run with --dry-run on a CPU")
    return info


def stage_tests(check: Check) -> dict[str, Any]:
    probe = subprocess.run([sys.executable, "-c", "import pytest"], capture_output=True, env=_env())
    if probe.returncode != 0:
        return {"status": "unavailable", "note": "pytest is not installed in this python"}
    # every file holding a gpu-marked test (tests/test_gpu.py and a few in other files), not the whole suite:
    # files of the optional integrations would fail to import where keras or lightning are missing
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    res = _run(cmd, check.budget("tests"), check.work / "logs" / "tests.log")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", res["output_tail"])}
    res.update(counts=counts, status="cut" if res["cut"] else ("ok" if res["rc"] == 0 else "failed"))
    return res


def _train_cmd(check: Check, run_dir: Path, *extra: str) -> list[str]:
    a = check.args
    data = ["--dataset", a.dataset] + (["--data-dir", str(a.data_dir)] if a.data_dir else [])
    return [sys.executable, "-m", "snapens", "train", *data, "--run-dir", str(run_dir), "--quiet",
            "--device", check.device(), "--threads", "1", *extra]


def _interrupted_run(check: Check, cmd: list[str], run_dir: Path, deadline: float) -> dict[str, Any]:
    """Run ``cmd``, SIGTERM it once its first epoch is on disk, then finish it with ``--resume``."""
    t0 = time.perf_counter()
    proc = _start(cmd, run_dir.with_suffix(".log"))
    sent = False
    while proc.poll() is None and time.perf_counter() < deadline:
        if not sent and _metrics_rows(run_dir):
            os.killpg(proc.pid, signal.SIGTERM)
            sent = True
        time.sleep(0.01)
    if proc.poll() is None:
        _stop(proc)
        return {"status": "cut", "seconds": round(time.perf_counter() - t0, 1), "cmd": shlex.join(cmd)}
    first_rc = proc.returncode
    resume = _run(cmd + ["--resume"], deadline - time.perf_counter(), run_dir.with_suffix(".resume.log")) \
        if sent and first_rc == 143 else None
    rows = _metrics_rows(run_dir)
    losses = [r.get("train_loss") for r in rows]
    summary = _summary(run_dir)
    ok = (first_rc == 143 and resume is not None and resume["rc"] == 0 and bool(losses)
          and all(map(_finite, losses)) and summary is not None)
    note = "" if sent and first_rc == 143 else (
        "the run ended before the SIGTERM landed: give it more epochs" if first_rc == 0 else "the first run failed")
    return {"status": "ok" if ok else ("cut" if resume and resume["cut"] else "failed"), "note": note,
            "cmd": shlex.join(cmd),
            "sigterm_sent": sent, "first_rc": first_rc, "resume_rc": resume and resume["rc"],
            "epochs_done": len(rows), "train_losses": losses, "losses_finite": all(map(_finite, losses)),
            "test_error_equal": summary and summary["ensemble_equal"]["error"],
            "seconds": round(time.perf_counter() - t0, 1),
            "output_tail": (resume or {}).get("output_tail") or _tail(run_dir.with_suffix(".log"))}


def _summary(run_dir: Path, name: str = "summary.json") -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / name).read_text())
    except (OSError, ValueError):
        return None


def stage_train(check: Check) -> dict[str, Any]:
    a = check.args
    deadline = time.perf_counter() + check.budget("train")
    if a.dry_run:
        common = ["--model", "cnn-small", "--limit-train", "240", "--limit-test", "100", "--batch-size", "16",
                  "--epochs", "3", "--snapshots", "1"]
        variants = {"auto": ["--precision", "auto"], "fp16": None, "compile": None}
    else:
        # 6 epochs of 10,000 images: the SIGTERM after the first must land while ~5 epochs are still to go
        common = ["--model", "resnet-20", "--limit-train", "10000", "--limit-test", "1000", "--val-size", "1000",
                  "--epochs", "6", "--snapshots", "2"]
        variants = {"auto": ["--precision", "auto"], "fp16": ["--precision", "fp16"],
                    "compile": ["--precision", "auto", "--compile"]}
    out: dict[str, Any] = {}
    for label, flags in variants.items():
        if flags is None:
            out[label] = {"status": "skipped", "note": "GPU only"}
            continue
        if time.perf_counter() >= deadline:
            out[label] = {"status": "cut", "note": "no time left in the stage"}
            continue
        run_dir = check.work / "train" / label
        out[label] = _interrupted_run(check, _train_cmd(check, run_dir, *common, *flags), run_dir, deadline)
        check.results["stages"]["train"] = {"status": "running", "variants": out}
        check.save()
    statuses = {v["status"] for v in out.values()} - {"skipped"}
    status = "failed" if "failed" in statuses else ("cut" if "cut" in statuses else "ok")
    return {"status": status, "variants": out}


def stage_throughput(check: Check) -> dict[str, Any]:
    if check.args.dry_run:
        cfg = {"device": "cpu", "models": ["cnn-small"], "compile": [False], "images": 256, "batch_size": 64,
               "epochs": 1, "repeats": 1, "precision": "auto"}
        skipped = ["resnet-20 and wrn-16-4 (GPU only)", "torch.compile (GPU only)"]
    else:
        cfg = {"device": "cuda", "models": ["resnet-20", "wrn-16-4"], "compile": [False, True], "images": 10240,
               "batch_size": 128, "epochs": 2, "repeats": 3, "precision": "bf16"}
        skipped = []
    log = check.work / "logs" / "throughput.log"
    res = _run([sys.executable, str(Path(__file__).resolve()), "--worker", "throughput", json.dumps(cfg)],
               check.budget("throughput"), log)
    rows = [json.loads(line[4:]) for line in log.read_text().splitlines() if line.startswith("ROW ")]
    goal = 0.95
    res.update(config=cfg, rows=rows, skipped=skipped, goal=goal,
               status="cut" if res["cut"] else ("ok" if res["rc"] == 0 and rows else "failed"),
               goal_met=bool(rows) and all(r["ratio"] >= goal for r in rows))
    return res


def throughput_worker(cfg: dict[str, Any]) -> None:
    """(Child process.) Engine against hand loop, per model and compile setting; one ``ROW {json}`` line each."""
    import statistics

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_engine  # the hand loop the engine is measured against (benchmarks/bench_engine.py)

    from snapens.data import AugmentSpec, BatchLoader, Split

    torch.set_num_threads(1)
    device = torch.device(cfg["device"])
    g = torch.Generator().manual_seed(0)
    n = cfg["images"]
    train = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g))
    loader = BatchLoader(train, cfg["batch_size"], seed=0, augment=AugmentSpec(4, True), mean=(0.5,) * 3,
                         std=(0.29,) * 3, device=device, channels_last=True)
    images = cfg["epochs"] * loader.num_samples
    for compiled in cfg["compile"]:  # every model uncompiled first: compiling is what a cut stage loses
        for name in cfg["models"]:
            hand, eng = _timed_pairs(bench_engine, name, compiled, loader, device, cfg)
            h, e = statistics.median(images / s for s in hand), statistics.median(images / s for s in eng)
            print("ROW " + json.dumps({"model": name, "compile": compiled, "precision": cfg["precision"],
                                       "channels_last": True, "hand_img_s": round(h, 1), "engine_img_s": round(e, 1),
                                       "ratio": round(e / h, 3), "repeats": cfg["repeats"]}), flush=True)


def _timed_pairs(bench_engine: Any, name: str, compiled: bool, loader: Any, device: Any,
                 cfg: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Seconds of the hand loop and of engine.fit, interleaved after one untimed warm-up of each."""
    import torch

    from snapens import engine
    from snapens.models import build_model
    from snapens.schedule import SnapshotLR

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10).to(device).to(memory_format=torch.channels_last)
        return model

    def hand(epochs: int) -> float:
        model = fresh()
        return bench_engine.hand_loop(torch.compile(model) if compiled else model, loader, epochs, device,
                                      cfg["precision"], True)

    def fit(epochs: int) -> float:
        model = fresh()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        sched = SnapshotLR(opt, total_steps=epochs * len(loader), n_cycles=1)
        with tempfile.TemporaryDirectory() as tmp:
            bench_engine._sync(device)
            t0 = time.perf_counter()
            engine.fit(model=model, optimizer=opt, scheduler=sched, train_loader=loader, epochs=epochs,
                       run_dir=Path(tmp) / "run", model_name=name, model_kwargs={"num_classes": 10}, device=device,
                       precision=cfg["precision"], channels_last=True, compile=compiled, handle_signals=False)
            bench_engine._sync(device)
            return time.perf_counter() - t0

    hand(1), fit(1)  # warm-up: kernel choice, allocator, and the compilation itself
    hands, fits = [], []
    for r in range(cfg["repeats"]):
        order = (hand, fit) if r % 2 == 0 else (fit, hand)
        for fn in order:
            (hands if fn is hand else fits).append(fn(cfg["epochs"]))
    return hands, fits


def stage_inference(check: Check) -> dict[str, Any]:
    if check.args.dry_run:
        flags = ["--device", "cpu", "--model", "cnn-small", "--images", "64", "--batch-size", "32",
                 "--max-members", "2", "--repeats", "1", "--threads", "1"]
    else:
        flags = ["--device", "cuda", "--images", "10000", "--batch-size", "1000", "--max-members", "6",
                 "--repeats", "3", "--threads", "4"]
    log = check.work / "logs" / "inference.log"
    res = _run([sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), *flags], check.budget("inference"),
               log)
    rows, device = [], None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("== "):
            device = line.split()[1]
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s*$", line)
        if m:
            rows.append({"device": device, "M": int(m[1]), "ensemble_img_s": int(m[2]), "single_img_s": int(m[3]),
                         "limit_img_s": int(m[4]), "ratio": float(m[5])})
    singles = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.startswith("single model")]
    goal = 0.95
    res.update(rows=rows, single_rows=singles, goal=goal, goal_met=bool(rows) and all(r["ratio"] >= goal for r in rows),
               status="cut" if res["cut"] else ("ok" if res["rc"] == 0 and rows else "failed"))
    return res


# -------------------------------------------------------------------------------------------------- the study


def _study_plan(check: Check) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The flags every study run shares, and (label, flags) of one seed's runs."""
    a = check.args
    if a.dry_run:
        common = ["--model", "cnn-small", "--limit-train", "300", "--limit-test", "200", "--batch-size", "32",
                  "--lr", "0.1"]
        members = (2,)
    else:
        common = ["--model", "resnet-20", "--val-size", "5000", "--batch-size", "128", "--lr", "0.1"]
        members = STUDY_MEMBERS
    runs = [("step", ["--schedule", "step", "--snapshots", "1"]), ("cosine-M1", ["--snapshots", "1"])]
    runs += [(f"cosine-M{m}", ["--snapshots", str(m)]) for m in members]
    return common, runs


def _concurrent(check: Check, jobs: list[tuple[Path, list[str]]], deadline: float) -> list[dict[str, Any]]:
    """Start every job at once; wait for all or until ``deadline`` (then SIGTERM the rest, resumable)."""
    t0 = time.perf_counter()
    procs = [(run_dir, cmd, _start(cmd, run_dir.with_suffix(".log"))) for run_dir, cmd in jobs]
    while any(p.poll() is None for _, _, p in procs) and time.perf_counter() < deadline:
        time.sleep(0.5)
    out = []
    for run_dir, cmd, proc in procs:
        cut = proc.poll() is None
        if cut:
            _stop(proc)
        rows = _metrics_rows(run_dir)
        epoch_s = [float(r["seconds"]) for r in rows if _finite(r.get("seconds"))]
        out.append({"run_dir": str(run_dir), "cmd": shlex.join(cmd), "rc": proc.returncode, "cut": cut,
                    "wall_s": round(time.perf_counter() - t0, 1), "epochs_done": len(rows), "epoch_seconds": epoch_s,
                    "output_tail": _tail(run_dir.with_suffix(".log"), 4) if proc.returncode else ""})
    return out


def _calibrate(check: Check, common: list[str], n_runs: int, deadline: float) -> dict[str, Any]:
    """One epoch alone, then ``n_runs`` at once: the epoch time under sharing and the startup+eval overhead."""
    root = check.work / "calibration"
    alone = _concurrent(check, [(root / "alone", _train_cmd(check, root / "alone", *common, "--epochs", "1",
                                                            "--snapshots", "1", "--no-eval"))], deadline)[0]
    many = _concurrent(check, [(root / f"shared-{i}", _train_cmd(check, root / f"shared-{i}", *common, "--epochs",
                                                                 "1", "--snapshots", "1", "--no-eval"))
                          for i in range(n_runs)], deadline)
    ok = alone["epoch_seconds"] and all(r["epoch_seconds"] for r in many)
    if not ok:
        return {"ok": False, "alone": alone, "shared": many}
    t1 = alone["epoch_seconds"][0]
    tk = max(r["epoch_seconds"][0] for r in many)
    overhead = max(r["wall_s"] - r["epoch_seconds"][0] for r in many)
    return {"ok": True, "processes": n_runs, "epoch_s_alone": round(t1, 2), "epoch_s_shared": round(tk, 2),
            "startup_s": round(overhead, 1),
            # n_runs epochs in tk seconds against one in t1: n_runs = perfect sharing, 1 = nothing gained
            "aggregate_speedup": round(n_runs * t1 / tk, 2), "slowdown_per_process": round(tk / t1, 2)}


def _size_epochs(check: Check, cal: dict[str, Any], window: float, n_seed_runs: int) -> tuple[int, int, float]:
    """(seeds, epochs, estimated epoch seconds): two seeds when they still reach the target epochs."""
    a = check.args
    t1, tk, k = cal["epoch_s_alone"], cal["epoch_s_shared"], cal["processes"]
    # Final evaluation (val + test for every member, plots) is of the order of a few epochs: keep 3 + 15 %.
    usable = window - cal["startup_s"] * 2
    for seeds in sorted({min(a.seeds, 2), 1}, reverse=True):
        n = seeds * n_seed_runs
        # linear in the number of processes between the two measured points: above the truth when the GPU
        # saturates early, so the estimate errs on the side of finishing in time
        t_epoch = t1 + (tk - t1) * (n - 1) / max(k - 1, 1)
        epochs = int(usable / (t_epoch * 1.15) - 3)
        epochs = min(epochs, a.max_epochs)
        epochs -= epochs % 12 if epochs >= 24 and not a.dry_run else 0  # whole cycles for M = 2, 4, 6
        if epochs >= a.target_epochs or seeds == 1:
            return seeds, max(epochs, 1), t_epoch
    raise AssertionError("unreachable")


def stage_study(check: Check) -> dict[str, Any]:
    a = check.args
    deadline = time.perf_counter() + check.budget("study")
    common, seed_runs = _study_plan(check)
    if a.dry_run:
        seeds, epochs, cal = 1, 2, {"ok": True, "note": "dry run: fixed 2 epochs"}
        cal.update(_calibrate(check, common, 2, deadline))
        est = None
    else:
        cal = _calibrate(check, common, min(a.seeds, 2) * len(seed_runs), deadline)
        if not cal["ok"]:
            return {"status": "failed", "calibration": cal}
        seeds, epochs, est = _size_epochs(check, cal, deadline - time.perf_counter(), len(seed_runs))
        # cycles need at least one epoch each: drop an M the budget cannot hold rather than fail the run
        seed_runs = [(label, flags) for label, flags in seed_runs
                     if not label.startswith("cosine-M") or int(label[8:]) <= epochs]
    check.results["stages"]["study"] = {"status": "running", "calibration": cal, "epochs": epochs, "seeds": seeds}
    check.save()
    jobs = []
    for seed in range(seeds):
        for label, flags in seed_runs:
            run_dir = check.work / "study" / f"{label}-seed{seed}"
            jobs.append((run_dir, _train_cmd(check, run_dir, *common, *flags, "--epochs", str(epochs), "--seed",
                                             str(seed))))
    runs = _concurrent(check, jobs, deadline)
    for run in runs:
        run.update(_run_rows(Path(run["run_dir"])))
    _fill_last_m_nll(check, runs, deadline)
    done = [r for r in runs if r.get("rows")]
    status = "ok" if len(done) == len(runs) else ("cut" if any(r["cut"] for r in runs) else "failed")
    return {"status": status, "calibration": cal, "epochs": epochs, "target_epochs": a.target_epochs,
            "seeds": seeds, "estimated_epoch_s": est, "runs": runs,
            "note": f"{epochs} epochs per run ({'reached' if epochs >= a.target_epochs else 'below'} the target of "
                    f"{a.target_epochs})"}


def _run_rows(run_dir: Path) -> dict[str, Any]:
    """Test error / NLL of last, equal, fitted and the recommended combination, from the run's summary.json."""
    s = _summary(run_dir)
    if s is None:
        return {}
    pick = lambda row: {"error": row["error"], "nll": row["nll"]}  # noqa: E731
    rows = {"last": pick(s["last_snapshot"])}
    rec = s.get("recommendation") or {}
    if s["num_members"] > 1:
        rows.update(equal=pick(s["ensemble_equal"]), fitted=pick(s["ensemble_weighted"]))
        use, m = rec.get("use"), rec.get("last_m")
        if use == "equal" or (use == "last-m" and m == s["num_members"]):
            rows["recommended"] = {**rows["equal"], "use": "equal"}
        elif use == "fitted":
            rows["recommended"] = {**rows["fitted"], "use": "fitted"}
        elif use == "last-m" and m == 1:
            rows["recommended"] = {**rows["last"], "use": "last-m (m=1)"}
        elif use == "last-m":
            curve = s["ensemble_size_curve"]
            rows["recommended"] = {"error": curve["error"][curve["m"].index(m)], "nll": None, "use": f"last-m (m={m})"}
    return {"rows": rows, "members": s["num_members"], "val_nll_equal": rec.get("equal_val_nll"),
            "member_errors": [round(x["error"], 2) for x in s["snapshots"]]}


def _fill_last_m_nll(check: Check, runs: list[dict[str, Any]], deadline: float) -> None:
    """The NLL of a recommended last-m ensemble (1 < m < M) is not in summary.json: ``snapens evaluate --last m``."""
    for run in runs:
        rec = (run.get("rows") or {}).get("recommended")
        if not rec or rec["nll"] is not None or time.perf_counter() >= deadline:
            continue
        m = int(re.search(r"m=(\d+)", rec["use"])[1])
        run_dir = Path(run["run_dir"])
        cmd = [sys.executable, "-m", "snapens", "evaluate", str(run_dir), "--last", str(m), "--optimize", "-1",
               "--quiet", "--json", "--device", check.device()] + (
            ["--data-dir", str(check.args.data_dir)] if check.args.data_dir else [])
        res = _run(cmd, deadline - time.perf_counter(), run_dir.with_suffix(f".last{m}.log"))
        s = _summary(run_dir, f"summary-last{m}.json")
        if res["rc"] == 0 and s:
            rec["nll"] = s["ensemble_equal"]["nll"]


def stage_export(check: Check) -> dict[str, Any]:
    """The study's best ensemble (lowest validation NLL, equal weights) as a pre-trained bundle."""
    from snapens import pretrained

    deadline = time.perf_counter() + check.budget("export")
    study = check.results["stages"].get("study") or {}
    runs = [r for r in study.get("runs", []) if r.get("rows") and r.get("members", 1) > 1 and
            _finite(r.get("val_nll_equal"))]
    if not runs:
        return {"status": "skipped", "note": "no finished ensemble in the study"}
    best = min(runs, key=lambda r: r["val_nll_equal"])
    name = f"dry-run-{check.args.dataset}" if check.args.dry_run else "resnet-20-cifar10"
    bundle = check.out / "pretrained" / name
    if bundle.exists():
        import shutil

        shutil.rmtree(bundle)
    command = (best["cmd"].replace(sys.executable, "python3").replace(str(check.work / "study"), "runs")
               .replace(str(REPO) + os.sep, ""))
    pretrained.export_pretrained(best["run_dir"], bundle, name=name, command=command, max_bytes=PRETRAINED_MAX_BYTES)
    # The card's numbers: the float16 members themselves, evaluated from a verified copy of the bundle.
    copy = check.work / "export-eval"
    pretrained.extract(bundle, copy)
    cmd = [sys.executable, "-m", "snapens", "evaluate", str(copy), "--quiet", "--json", "--device", check.device()]
    cmd += ["--data-dir", str(check.args.data_dir)] if check.args.data_dir else []
    res = _run(cmd, deadline - time.perf_counter(), check.work / "logs" / "export-eval.log")
    summary = _summary(copy)
    if res["rc"] == 0 and summary:
        if (copy / "recommended.json").is_file():  # the choice made on the float16 members, as the card's rows
            import shutil

            shutil.copyfile(copy / "recommended.json", bundle / "recommended.json")
        entry = pretrained.write_card(bundle, summary, measured_on="this bundle (float16 members)")
    else:
        entry = {"files": pretrained.bundle_files(bundle)}
    ens = pretrained.load(bundle)  # the recommended combination: the members a user's predictions run
    bundled = pretrained.load(bundle, weights="equal").n_members
    (check.out / "pretrained" / "registry-entry.json").write_text(json.dumps({name: entry}, indent=2) + "\n")
    return {"status": "ok" if res["rc"] == 0 else ("cut" if res["cut"] else "failed"), "name": name,
            "source_run": Path(best["run_dir"]).name, "members": bundled, "members_run": ens.n_members,
            "bundle": str(bundle),
            "snapshot_bytes": json.loads((bundle / "card.json").read_text())["snapshot_bytes"],
            "evaluated_from_bundle": res["rc"] == 0, "registry_entry": entry,
            "test_equal_fp16": summary and {"error": summary["ensemble_equal"]["error"],
                                            "nll": summary["ensemble_equal"]["nll"]}}


# ------------------------------------------------------------------------------------------------------ report


def _fmt(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else ("—" if v is None else str(v))


def _study_md(st: dict[str, Any]) -> list[str]:
    cal = st.get("calibration") or {}
    lines = [f"Epochs per run: {st.get('epochs')} (target {st.get('target_epochs')}), seeds: {st.get('seeds')}. "
             f"Calibration: one epoch alone {cal.get('epoch_s_alone')} s, {cal.get('processes')} processes at once "
             f"{cal.get('epoch_s_shared')} s per epoch each (all together x{cal.get('aggregate_speedup')} the epochs per "
             f"second of one alone); process start-up {cal.get('startup_s')} s.", "",
             "| run | epochs done | combine | test error % | Δ vs step (pp) | Δ vs 1 cycle (pp) | NLL | Δ NLL vs step |",
             "|---|---|---|---|---|---|---|---|"]
    runs = st.get("runs") or []
    seed_of = lambda r: Path(r["run_dir"]).name.rpartition("-seed")[2]  # noqa: E731
    step = {seed_of(r): r["rows"]["last"] for r in runs if r.get("rows") and Path(r["run_dir"]).name.startswith("step-")}
    one = {seed_of(r): r["rows"]["last"] for r in runs
           if r.get("rows") and Path(r["run_dir"]).name.startswith("cosine-M1-")}
    for r in runs:
        name, base_step, base_one = Path(r["run_dir"]).name, step.get(seed_of(r)), one.get(seed_of(r))
        if not r.get("rows"):
            lines.append(f"| {name} | {r['epochs_done']} | {'cut' if r['cut'] else 'failed'} | | | | | |")
        for combo, row in (r.get("rows") or {}).items():
            def d(b: dict[str, Any] | None, k: str) -> str:
                if not b or row.get(k) is None or b.get(k) is None:
                    return ""
                return _fmt(row[k] - b[k], "+.2f" if k == "error" else "+.3f")
            label = combo + (f" ({row['use']})" if "use" in row else "")
            lines.append(f"| {name} | {r['epochs_done']} | {label} | {_fmt(row['error'])} | {d(base_step, 'error')} | "
                         f"{d(base_one, 'error')} | {_fmt(row['nll'], '.3f')} | {d(base_step, 'nll')} |")
    return lines


def markdown(res: dict[str, Any]) -> str:
    """The results file: one section per stage, what was measured and its status."""
    st = res["stages"]
    env = st.get("env", {})
    lines = [f"# GPU check{' (dry run on a CPU)' if res['dry_run'] else ''}: {env.get('gpu', 'no GPU')}", "",
             f"Written by `benchmarks/gpu_check.py` after {res.get('elapsed_s')} s of a {res['budget_s']} s budget. "
             "Every number below was measured by that run.", ""]
    for name in STAGES:
        s = st.get(name)
        if s is None:
            continue
        lines += [f"## {name}: {s.get('status')}", ""]
        if name == "env":
            lines += [f"- {k}: {v}" for k, v in s.items() if k not in ("status", "error")]
        elif name == "tests":
            lines += [f"`{s.get('cmd', '')}`: {s.get('counts') or s.get('note')}"]
        elif name == "train":
            lines += ["| variant | status | SIGTERM -> rc | resume rc | epochs | losses finite | test error % (equal) |",
                      "|---|---|---|---|---|---|---|"]
            for v, r in s.get("variants", {}).items():
                lines.append(f"| {v} | {r['status']} | {r.get('first_rc', '')} | {r.get('resume_rc', '')} | "
                             f"{r.get('epochs_done', '')} | {r.get('losses_finite', '')} | "
                             f"{_fmt(r.get('test_error_equal'))} |")
        elif name == "throughput":
            lines += [f"Goal engine / hand >= {s.get('goal')}: {'met' if s.get('goal_met') else 'NOT met'}. "
                      f"Skipped: {', '.join(s.get('skipped') or []) or 'nothing'}.", "",
                      "| model | compile | hand img/s | engine img/s | engine / hand |", "|---|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['compile']} | {r['hand_img_s']} | {r['engine_img_s']} | {r['ratio']} |"
                      for r in s.get("rows", [])]
        elif name == "inference":
            lines += [f"Goal ratio >= {s.get('goal')}: {'met' if s.get('goal_met') else 'NOT met'}.", ""]
            lines += [f"- {x}" for x in s.get("single_rows", [])] + ["", "| device | M | ensemble img/s | "
                      "single img/s | limit (single/M) | ratio |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['device']} | {r['M']} | {r['ensemble_img_s']} | {r['single_img_s']} | {r['limit_img_s']} "
                      f"| {r['ratio']} |" for r in s.get("rows", [])]
        elif name == "study":
            lines += _study_md(s)
        elif name == "export":
            lines += [f"- {k}: {v}" for k, v in s.items() if k not in ("status", "registry_entry")]
        if s.get("error"):
            lines += ["", f"Error: `{s['error']}`"]
        lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the results files go")
    p.add_argument("--dry-run", action="store_true", help="tiny, on a CPU: checks the script, measures nothing")
    p.add_argument("--budget-s", type=float, default=None, help="overall seconds (default 540; dry run 150)")
    p.add_argument("--stage-budget", action="append", default=[], metavar="STAGE=SECONDS",
                   help="seconds for one stage (the study takes what is left unless given)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--dataset", default=None, help="default cifar10-jpeg (dry run: digits)")
    p.add_argument("--data-dir", default=None, help="default data/cifar10-jpeg under the repository (dry run: none)")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the study, where time allows (default 2)")
    p.add_argument("--target-epochs", type=int, default=150)
    p.add_argument("--max-epochs", type=int, default=300)
    p.add_argument("--work-dir", default=None, help="run folders and logs (default: a new temporary folder)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stages = ["env"] + [s for s in args.stages.split(",") if s and s != "env"]  # env names the results
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; stages are {', '.join(STAGES)}")
    if args.budget_s is None:
        args.budget_s = 150.0 if args.dry_run else 540.0
    if args.dataset is None:
        args.dataset = "digits" if args.dry_run else "cifar10-jpeg"
    if args.data_dir is None and args.dataset == "cifar10-jpeg":
        args.data_dir = str(REPO / "data" / "cifar10-jpeg")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        throughput_worker(json.loads(args.worker[1]))
        return 0
    check = Check(args)
    stages: dict[str, Callable[[Check], dict[str, Any]]] = {
        "env": stage_env, "tests": stage_tests, "train": stage_train, "throughput": stage_throughput,
        "inference": stage_inference, "study": stage_study, "export": stage_export}
    print(f"gpu_check: work folder {check.work}", flush=True)
    for name in STAGES:
        if name not in args.stages:
            continue
        t0 = time.perf_counter()
        if check.budget(name) <= 0 and name != "env":
            result = {"status": "cut", "note": "the overall budget was spent before this stage"}
        else:
            try:
                result = stages[name](check)
            except Exception as exc:  # a stage's failure is a result; the later stages still run
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        result["stage_seconds"] = round(time.perf_counter() - t0, 1)
        check.results["stages"][name] = {"status": result.pop("status", "ok"), **result}
        check.save()
        print(f"gpu_check: {name}: {check.results['stages'][name]['status']} "
              f"({result['stage_seconds']} s)", flush=True)
        if name == "env" and check.results["stages"]["env"]["status"] != "ok":
            break  # no CUDA device (or no torch): every later stage would fail the same way
    md, js = check.paths()
    print(f"gpu_check: results in {md} and {js}", flush=True)
    return 0 if all(s["status"] in ("ok", "skipped", "unavailable") for s in check.results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
