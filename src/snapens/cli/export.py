"""``snapens export RUN_DIR OUT``: the whole snapshot ensemble as ONE self-contained module file.

The exported module takes float images in [0, 1], shaped ``[N, C, H, W]`` like the run's dataset (uint8 pixels
divided by 255), normalises them with the training set's mean and std, runs its members in the precision
chosen at export (``--precision``, recorded in the file: auto = bf16 where the exporting machine runs it
natively, else fp32) and returns the ensemble's probabilities ``[N, num_classes]`` = softmax(log(sum_m w_m
softmax(f_m(x))) / T): the same numbers as ``snapens evaluate``'s row with that precision.

Which members, weights and T (--weights):
  recommended (default)  the combination `snapens evaluate` chose on validation and stored in
                         RUN_DIR/recommended.json (the "ensemble, recommended" row, "You get: ..."): members of
                         weight 0 are left out, so the module runs only the members that count; T where validation
                         identifies one (--no-temperature: T=1). A run never evaluated is chosen on now, the same way.
  equal                  every member, equal weights, T=1: the paper (which lost to the last snapshot alone in every
                         cell of the README's budget study)
  fitted                 the weights saved in RUN_DIR/ensemble_weights.json by `snapens evaluate --optimize 1`, T=1;
                         members weighted below 0.001 are left out (the rest renormalised), so the module runs only
                         the members that count
With --last M / --include-best the files that evaluate wrote with the same flags are read, e.g.
recommended-last3.json, ensemble_weights-last3.json.

Formats (the default follows OUT's suffix: .pt is torchscript, anything else export):
  --format export (.pt2):       program = torch.export.load("ens.pt2"); probs = program.module()(x)
  --format torchscript (.pt):   module = torch.jit.load("ens.pt"); probs = module(x)
TorchScript is deprecated by PyTorch (it still loads, also from C++ with libtorch); it is kept for existing
deployments. Both files accept any batch size N.

Both files carry a JSON description (members, weights, temperature, classes, mean, std, input shape, precision)
as the extra
file "snapens.json": torch.jit.load(path, _extra_files=d) or torch.export.load(path, extra_files=d) with
d = {"snapens.json": ""} fills it in. Needs only torch to load, not snapens.
"""


from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from snapens.cli._common import configure_logging
from snapens.workflows.common import plural
from snapens.workflows.exporting import FORMATS, WEIGHT_CHOICES

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand to ``subparsers``."""
    p = subparsers.add_parser("export", help="export the ensemble as one torch.export (or TorchScript) file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by `snapens train`")
    p.add_argument("out", type=Path, metavar="OUT", help="the file to write (.pt2 for export, .pt for torchscript)")
    p.add_argument("--format", dest="fmt", choices=tuple(FORMATS), default=None,
                   help="export: torch.export, load with torch.export.load(...).module(); torchscript: "
                        "torch.jit.trace (deprecated by PyTorch), load with torch.jit.load (default: torchscript "
                        "when OUT ends in .pt, else export)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="recommended",
                   help="recommended: the members, weights and temperature validation supports (stored by `snapens "
                        "evaluate`); equal: every member, equal weights (the paper); fitted: the weights fitted by "
                        "`snapens evaluate --optimize 1` (default: recommended)")
    p.add_argument("--no-temperature", dest="temperature", action="store_false",
                   help="with --weights recommended, do not apply the temperature fitted on validation (T=1)")
    p.add_argument("--last", type=int, default=None, metavar="M", help="export only the last M snapshots")
    p.add_argument("--include-best", action="store_true", help="add best.safetensors as a member")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the dataset is now, instead of the data_dir stored in config.json")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the precision the exported module runs its members in (recorded in the file): auto = "
                        "bf16 where this CPU runs it natively, else fp32 (default: auto)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="accept a run that has not finished training (killed or still running): use the "
                        "snapshots it has")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``snapens export``: write OUT, check it against the ensemble, print one line; returns 0."""
    from snapens.workflows.exporting import export

    configure_logging(args.quiet)
    result = export(args.run_dir, args.out, fmt=args.fmt, weights=args.weights, temperature=args.temperature,
                    last=args.last, include_best=args.include_best, data_dir=args.data_dir, precision=args.precision,
                    allow_unfinished=args.allow_unfinished)
    if not args.quiet:
        of = len(result["members_of_run"])
        members = plural(len(result["members"]), "member") + ("" if len(result["members"]) == of else f" of {of}")
        temperature = f", T={result['temperature']:.3g}" if result["temperature"] != 1.0 else ""
        print(f"wrote {args.out}: {members}, {result['weights_source']} weights{temperature}, "
              f"precision {result['precision']}, input "
              f"{result['input_shape']}, checked against the ensemble (max |diff| {result['max_abs_diff']:.1e})",
              file=sys.stderr)
    return 0
