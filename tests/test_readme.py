"""The README's code, as a user pastes it.

Every ```python block of README.md runs in a fresh interpreter with an empty working folder. A block that uses
objects of the reader's own (``model``, ``optimizer``, ``loader``, ...) says so in an HTML comment on the line
before it, hidden on GitHub::

    <!-- readme-test: prelude=NAME (what the prelude defines) -->

and this file's ``PRELUDES[NAME]`` defines just those objects, tiny, before the block's own text runs unchanged;
its ``check`` runs after the block and asserts that the block did what the README says. ``<!-- readme-test: skip
(why) -->`` skips a block another test already runs. A prelude that needs an optional extra (keras, lightning,
transformers) imports it first, in the same fresh interpreter, and exits with ``MISSING_EXTRA`` when it is not
installed: the test is then skipped (``pytest.importorskip``'s rule, without importing the extra twice); the
``test`` extra installs them all, so CI runs every block.

Bash blocks are not run; the flags of every ``snapens SUBCOMMAND ... --flag`` line in them (and in the ``$ snapens``
transcripts) must exist in that subcommand's parser, the one ``snapens SUBCOMMAND --help`` prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import snapens

README = Path(__file__).parents[1] / "README.md"
MISSING_EXTRA = 77
_MARKER = re.compile(r"<!--\s*readme-test:\s*(skip|prelude=([\w-]+))\b.*?-->")


@dataclass(frozen=True)
class Prelude:
    code: str  # runs before the block: the reader's own objects, tiny
    check: str  # runs after it: what the block should have done
    extras: tuple[str, ...] = ()  # optional modules; missing ones skip the test


def _needs(*modules: str) -> str:
    # Imported in the fresh interpreter: a missing extra (or keras without a usable backend) skips the test.
    return textwrap.dedent(f"""\
        import importlib, sys
        for _name in {modules!r}:
            try:
                importlib.import_module(_name)
            except ImportError as _exc:
                print(f"missing extra: {{_exc}}")
                sys.exit({MISSING_EXTRA})
        """)


PRELUDES: dict[str, Prelude] = {
    # "Use it in your own loop": a linear model on 64 random 8x8 images, 4 epochs of 4 steps, M=2.
    "loop": Prelude(
        code="""\
import torch
from torch import nn

torch.manual_seed(0)
def make_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
model = make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
loader = torch.utils.data.DataLoader(data, batch_size=16)
loss_fn = nn.CrossEntropyLoss()
epochs, M = 4, 2
x_test = torch.randn(8, 1, 8, 8)
""",
        check="""\
assert [info.index for info in store.list()] == [1, 2], store.list()
assert probs.shape == (8, 10) and torch.allclose(probs.sum(1), torch.ones(8))
""",
    ),
    # The run-folder block: a 3-epoch, 3-snapshot digits run at runs/RUN (what `snapens train` writes).
    "run": Prelude(
        code="""\
import torch
import snapens
from snapens.config import TrainConfig

snapens.train(TrainConfig(epochs=3, snapshots=3, limit_train=300, device="cpu", precision="fp32", threads=1),
              "runs/RUN", evaluate=False)
images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
""",
        check="""\
assert len(ens) == 3 and probs.shape == (5, 10)
assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
""",
    ),
    # The .pt2 block: a program exported from a 2-epoch, 2-snapshot digits run (what `snapens export` writes).
    "pt2": Prelude(
        code="""\
import torch
import snapens
from snapens.config import TrainConfig
from snapens.workflows.exporting import export

snapens.train(TrainConfig(epochs=2, snapshots=2, limit_train=300, device="cpu", precision="fp32", threads=1),
              "runs/RUN")
export("runs/RUN", "ens.pt2", precision="fp32")
images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
""",
        check="""\
assert probs.shape == (5, 10)
assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
""",
    ),
    # Keras 3 on the torch backend: a softmax regression on random data, T=4 epochs, M=2.
    "keras": Prelude(
        extras=("h5py", "keras"),
        code="""\
import numpy as np
import keras

T, M, alpha_zero = 4, 2, 0.1
rng = np.random.default_rng(0)
x, y = rng.random((64, 8), dtype=np.float32), rng.integers(0, 3, 64)
x_val, y_val = x[:16], y[:16]
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
""",
        check="""\
import os
assert {"Model_-1.weights.h5", "Model_-2.weights.h5", "Model_-Best.weights.h5"} <= set(os.listdir("weights"))
""",
    ),
    # Lightning: an MLP LightningModule; one batch of 32 random 64-dim inputs per epoch (30 steps, 5 cycles).
    "lightning": Prelude(
        extras=("lightning",),
        code="""\
import torch
from torch import nn
import lightning

class MyModule(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True)

torch.manual_seed(0)
module = MyModule()
data = torch.utils.data.TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,)))
train_loader = torch.utils.data.DataLoader(data, batch_size=32)
""",
        check="""\
assert len(ensemble) == 5
probs = ensemble.predict_proba(torch.randn(4, 64))
assert probs.shape == (4, 10) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
""",
    ),
    # Hugging Face Trainer: a plain nn.Module whose forward returns the loss given labels; 16 random examples.
    "transformers": Prelude(
        extras=("transformers", "accelerate"),
        code="""\
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)
    def forward(self, x, labels=None):
        logits = self.linear(x)
        return logits if labels is None else {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

class Data(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}

torch.manual_seed(0)
model, train = Model(), Data()
""",
        check="""\
import json
manifest = json.load(open("runs/x/snapshots/manifest.json"))
assert len(manifest["snapshots"]) == 5, manifest
""",
    ),
}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None  # "skip", a prelude name, or None (the block must run on its own)


def python_blocks(text: str) -> list[Block]:
    """Every ```python block of ``text`` with the readme-test marker on the line before it (if any)."""
    lines, blocks = text.splitlines(), []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            found = _MARKER.search(lines[i - 1]) if i > 0 else None
            marker = None if found is None else (found.group(2) or "skip")
            blocks.append(Block(i + 1, "\n".join(lines[i + 1:end]) + "\n", marker))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_its_python_blocks_and_known_preludes() -> None:
    assert len(BLOCKS) >= 6  # the loop, the run folder, the Python API, Keras, Lightning, Hugging Face
    unknown = [(b.line, b.marker) for b in BLOCKS if b.marker not in (None, "skip", *PRELUDES)]
    assert unknown == []
    assert set(b.marker for b in BLOCKS if b.marker in PRELUDES) == set(PRELUDES)  # none unused
    assert [b.marker for b in python_blocks("<!-- readme-test: prelude=loop (x) -->\n```python\nx = 1\n```\n"
                                            "```python\ny = 2\n```\n")] == ["loop", None]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(snapens.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch"),
           "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker != "skip"],
                         ids=lambda b: f"line{b.line}-{b.marker or 'standalone'}")
def test_readme_python_block_runs_as_pasted(block: Block, tmp_path: Path) -> None:
    prelude = PRELUDES.get(block.marker or "", Prelude("", ""))
    head = (_needs(*prelude.extras) if prelude.extras else "") + prelude.code
    # The block's text is compiled as it stands (its own line numbers in a traceback), between prelude and check.
    code = (f"{head}\nexec(compile({block.code!r}, 'README.md block at line {block.line}', 'exec'))\n"
            f"{prelude.check}")
    done = _run(code, tmp_path)
    if done.returncode == MISSING_EXTRA:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, f"README.md block at line {block.line} failed:\n{done.stderr[-3000:]}"


def _snapens_commands(text: str) -> list[tuple[int, str, list[str]]]:
    """``(line, subcommand, flags)`` for each ``snapens SUB ...`` command line in the README's bash blocks and
    ``$ snapens ...`` transcript lines (a trailing backslash continues a line; flags in ``#`` comments count)."""
    found, in_block, lang = [], False, ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_block, lang = (not in_block, line[3:].strip()) if not in_block else (False, "")
        elif in_block and (lang == "bash" or (lang == "" and line.startswith("$ "))):
            command = line.strip().removeprefix("$ ")
            start = i
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            for part in command.split("&&"):  # pip install ... && snapens train
                words = part.split()
                if len(words) >= 2 and words[0] == "snapens" and not words[1].startswith("-"):
                    found.append((start + 1, words[1], re.findall(r"(?<![\w-])(--[a-z][\w-]*)", part)))
        i += 1
    return found


def test_readme_snapens_commands_use_flags_that_exist() -> None:
    from snapens.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # the subparsers action
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    commands = _snapens_commands(README.read_text())
    assert {c for _, c, _ in commands} >= {"train", "evaluate", "plot", "export", "reproduce", "distill"}
    unknown = [(line, cmd, flag) for line, cmd, flags in commands
               for flag in ([] if cmd not in options else flags) if flag not in options[cmd]]
    assert unknown == [] and all(cmd in options for _, cmd, _ in commands), (unknown, commands)
    sample = "```bash\nsnapens plot RUN --nope  # --also\npip install -e . && snapens train --x\n```\n$ snapens a\n"
    assert _snapens_commands(sample) == [(2, "plot", ["--nope", "--also"]), (3, "train", ["--x"])]
