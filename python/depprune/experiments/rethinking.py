"""Experiment: the two papers' comparisons, rerun end to end on real handwritten digits.

Takes nothing but installed packages (scikit-learn's 1,797 real 8x8 digits;
CIFAR and ImageNet are downloads) and gives, over several seeds, mean and
spread of test accuracy for:

- *Rethinking the Value of Network Pruning* (Liu et al., ICLR 2019), Tables
  1-4 in small: the unpruned model, the pruned model fine-tuned from its
  inherited weights, and the pruned architecture trained from scratch for
  the same epochs (Scratch-E) or the same compute (Scratch-B), for one
  predefined method (L1-norm filter pruning, a fixed per-layer profile) and
  one automatic method (Network Slimming, one global threshold on BatchNorm
  scales after sparsity training).
- *DepGraph* (Fang et al., CVPR 2023), Table 5 in small: group-sparse
  training then learned (global) or uniform pruning, versus plain group
  magnitude pruning at equal MACs, all fine-tuned alike.

Run it as one command (about 5 minutes on 2 CPU cores; ``--quick``: one
seed, few epochs, under a minute)::

    python -m depprune.experiments.rethinking --out benches/results

>>> from depprune.experiments.rethinking import DigitsVGG, digits
>>> data = digits()
>>> tuple(data.train_x.shape), tuple(data.test_x.shape)
((1347, 1, 8, 8), (450, 1, 8, 8))
>>> DigitsVGG()(data.test_x[:2]).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import depprune
from depprune.errors import MethodError

__all__ = ["DigitsData", "DigitsVGG", "Settings", "digits", "main", "run"]


@dataclass(frozen=True)
class DigitsData:
    """Standardised digits as (N, 1, 8, 8) float tensors, with integer labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits(split_seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """scikit-learn's handwritten digits, split by class (stratified), standardised on train.

    >>> data = digits()
    >>> int(data.train_y.max()), abs(round(float(data.train_x.mean()), 4))
    (9, 0.0)
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise MethodError(
            "the digits experiment needs scikit-learn: pip install 'depprune[experiments]'"
        ) from None
    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    mean, std = train_x.mean(), train_x.std()

    def tensor(x):
        return torch.tensor((x - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)

    return DigitsData(tensor(train_x), torch.tensor(train_y), tensor(test_x), torch.tensor(test_y))


class DigitsVGG(nn.Module):
    """A VGG-style CNN for 8x8 digits: two stages of two conv-BN-ReLU, a linear classifier.

    The classifier reads the flattened last stage, so its channels own 2x2
    input columns each: the case where a channel is not one index.
    """

    def __init__(self, widths: Sequence[int] = (32, 32, 64, 64), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
            layers.append(nn.ReLU(inplace=True))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]


@dataclass(frozen=True)
class Settings:
    """Every knob of the experiment; the defaults are the ones the README's table used."""

    seeds: tuple[int, ...] = (0, 1, 2)
    #: Epochs of normal training (the unpruned model; Scratch-E trains as long).
    epochs: int = 30
    #: Epochs of fine-tuning after a cut, at a tenth of the learning rate (the papers' practice).
    finetune_epochs: int = 15
    #: Epochs of DepGraph's group-sparse training, started from the trained model.
    sparse_epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 0.05
    weight_decay: float = 5e-4
    #: L1-norm filters: the predefined profile (fraction of filters removed per conv, in order;
    #: the first conv kept whole, as Li et al. keep their sensitive layers).
    l1_profile: tuple[float, ...] = (0.0, 0.75, 0.75, 0.75)
    #: Network Slimming: BatchNorm-scale sparsity strength and the global channel ratio.
    slimming_strength: float = 1e-3
    slimming_ratio: float = 0.75
    #: DepGraph: regulariser strength and the global channel ratio after sparse training.
    group_strength: float = 3e-2
    depgraph_ratio: float = 0.75
    #: Scratch-B's epochs cap, as a multiple of ``epochs`` (None: same compute, uncapped).
    scratch_b_cap: float | None = None


def _shifted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random shift of up to one pixel for the whole batch (cheap augmentation)."""
    dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    return padded[:, :, 1 + dy : 9 + dy, 1 + dx : 9 + dx]


def train(
    model: nn.Module,
    data: DigitsData,
    epochs: int,
    *,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    regularizer=None,
) -> nn.Module:
    """SGD with Nesterov momentum and a cosine schedule; ``regularizer.step()`` after backward."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=learning_rate,
        momentum=0.9,
        nesterov=True,
        weight_decay=weight_decay,
    )
    batches = math.ceil(len(data.train_y) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * batches))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(
                model(_shifted(data.train_x[rows], generator)), data.train_y[rows]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if regularizer is not None:
                regularizer.step()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: DigitsData) -> float:
    """Test accuracy in percent."""
    model.eval()
    return 100.0 * float((model(data.test_x).argmax(1) == data.test_y).float().mean())


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one 8x8 image."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 1, 8, 8))
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Row:
    """One method's accuracies over seeds, and what the pruned model keeps."""

    method: str
    columns: dict[str, list[float]] = field(default_factory=dict)
    macs_kept: list[float] = field(default_factory=list)
    params_kept: list[float] = field(default_factory=list)

    def add(self, column: str, value: float) -> None:
        self.columns.setdefault(column, []).append(value)


def _example() -> torch.Tensor:
    return torch.zeros(2, 1, 8, 8)


class _Experiment:
    """One seed's runs, sharing the trained model between methods."""

    def __init__(self, settings: Settings, data: DigitsData, seed: int) -> None:
        self.settings, self.data, self.seed = settings, data, seed

    def fit(self, model: nn.Module, epochs: int, *, finetune: bool = False, regularizer=None):
        s = self.settings
        torch.manual_seed(self.seed)
        return train(
            model,
            self.data,
            epochs,
            learning_rate=s.learning_rate / (10 if finetune else 1),
            weight_decay=s.weight_decay,
            batch_size=s.batch_size,
            seed=self.seed + (1000 if finetune else 0),
            regularizer=regularizer,
        )

    def fresh(self) -> DigitsVGG:
        torch.manual_seed(self.seed)
        return DigitsVGG()

    def rethinking(self, row: Row, full: nn.Module, pruned: nn.Module) -> None:
        """Fine-tune the pruned model; train its architecture from scratch for E and B."""
        s = self.settings
        macs_full, macs_pruned = count_macs(full), count_macs(pruned)
        row.macs_kept.append(100.0 * macs_pruned / macs_full)
        row.params_kept.append(100.0 * count_params(pruned) / count_params(full))
        architecture = copy.deepcopy(pruned)
        row.add(
            "fine-tuned", accuracy(self.fit(pruned, s.finetune_epochs, finetune=True), self.data)
        )
        budget = {
            "Scratch-E": depprune.scratch_budget(macs_full, macs_pruned, s.epochs, mode="E"),
            "Scratch-B": depprune.scratch_budget(
                macs_full, macs_pruned, s.epochs, mode="B", cap=s.scratch_b_cap
            ),
        }
        for column, epochs in budget.items():
            model = depprune.scratch(copy.deepcopy(architecture), seed=self.seed)
            row.add(column, accuracy(self.fit(model, epochs), self.data))

    def l1_norm(self, row: Row, trained: DigitsVGG) -> None:
        from depprune.methods import l1_filter

        pruned = copy.deepcopy(trained)
        ratios = {
            conv: r for conv, r in zip(pruned.convs(), self.settings.l1_profile, strict=True) if r
        }
        l1_filter.prune(pruned, _example(), ratio=0.0, ratios=ratios, progress=False)
        row.add("unpruned", accuracy(trained, self.data))
        self.rethinking(row, trained, pruned)

    def slimming(self, row: Row) -> None:
        from depprune.methods import slimming

        s = self.settings
        sparse = self.fresh()
        self.fit(sparse, s.epochs, regularizer=slimming.regularizer(sparse, s.slimming_strength))
        row.add("unpruned", accuracy(sparse, self.data))
        pruned = copy.deepcopy(sparse)
        slimming.prune(pruned, _example(), ratio=s.slimming_ratio, progress=False)
        self.rethinking(row, sparse, pruned)

    def depgraph(self, rows: dict[str, Row], trained: DigitsVGG) -> None:
        """Sparse training + learned or uniform pruning, versus magnitude at equal MACs."""
        from depprune.methods import depgraph
        from depprune.sparsity import GroupRegularizer

        s = self.settings
        sparse = copy.deepcopy(trained)
        regularizer = GroupRegularizer(
            sparse, depprune.trace(sparse, _example()), strength=s.group_strength
        )
        self.fit(sparse, s.sparse_epochs, finetune=True, regularizer=regularizer)
        plain = self.fit(copy.deepcopy(trained), s.sparse_epochs, finetune=True)
        learned = copy.deepcopy(sparse)
        depgraph.prune(
            learned,
            _example(),
            regularizer=regularizer,
            ratio=s.depgraph_ratio,
            sparsity="learned",
            progress=False,
        )
        target = count_macs(learned)
        candidates = {
            "DepGraph: group-sparse training, learned sparsity": learned,
            "DepGraph: group-sparse training, uniform sparsity": _at_macs(
                sparse,
                target,
                lambda m, r: depgraph.prune(
                    m,
                    _example(),
                    regularizer=regularizer,
                    ratio=r,
                    sparsity="uniform",
                    progress=False,
                ),
            ),
            "group L2 magnitude, uniform (no sparse training)": _at_macs(
                plain, target, lambda m, r: depprune.prune(m, _example(), ratio=r, progress=False)
            ),
        }
        full = count_macs(trained)
        for name, model in candidates.items():
            row = rows.setdefault(name, Row(name))
            row.macs_kept.append(100.0 * count_macs(model) / full)
            row.params_kept.append(100.0 * count_params(model) / count_params(trained))
            row.add("pruned", accuracy(model, self.data))
            row.add(
                "fine-tuned", accuracy(self.fit(model, s.finetune_epochs, finetune=True), self.data)
            )


def _at_macs(model: nn.Module, target: int, prune: Callable[[nn.Module, float], object]):
    """A pruned copy of ``model`` whose MACs are the closest to ``target`` (bisection on ratio)."""
    low, high = 0.0, 0.95
    best, best_gap = copy.deepcopy(model), abs(count_macs(model) - target)
    for _ in range(10):
        ratio = (low + high) / 2
        candidate = copy.deepcopy(model)
        prune(candidate, ratio)
        macs = count_macs(candidate)
        if abs(macs - target) < best_gap:
            best, best_gap = candidate, abs(macs - target)
        low, high = (ratio, high) if macs > target else (low, ratio)
    return best


def run(settings: Settings = Settings(), *, progress: bool | None = None) -> dict:
    """Every run of the experiment; returns the results as a JSON-ready dict."""
    data = digits()
    rows: dict[str, Row] = {}
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # Tiny convolutions: one thread is fastest, and a second fights other work for the cores.
    torch.set_num_threads(1)
    try:
        _run_seeds(settings, data, rows, progress)
    finally:
        torch.set_num_threads(threads)
    return {
        "settings": asdict(settings),
        "rows": [asdict(row) for row in rows.values()],
        "seconds": round(time.perf_counter() - started, 1),
        "versions": _versions(),
    }


def _run_seeds(settings: Settings, data: DigitsData, rows: dict[str, Row], progress) -> None:
    for seed in tqdm(
        settings.seeds, desc="seeds", disable=None if progress is None else not progress
    ):
        experiment = _Experiment(settings, data, seed)
        trained = experiment.fit(experiment.fresh(), settings.epochs)
        rows.setdefault("unpruned", Row("unpruned")).add("unpruned", accuracy(trained, data))
        experiment.l1_norm(rows.setdefault("L1-norm filters", Row("L1-norm filters")), trained)
        experiment.slimming(rows.setdefault("Network Slimming", Row("Network Slimming")))
        experiment.depgraph(rows, trained)


def _versions() -> dict[str, str]:
    import numpy
    import sklearn

    return {
        "depprune": depprune.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread",
    }


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(results: dict) -> str:
    """The results as Markdown tables (mean ± standard deviation over seeds)."""
    rows = results["rows"]
    seeds = len(results["settings"]["seeds"])
    rethinking_columns = ["unpruned", "fine-tuned", "Scratch-E", "Scratch-B"]
    lines = [
        f"Test accuracy (%) on scikit-learn's digits (450 held-out images), mean ± std over "
        f"{seeds} seed{'s' if seeds > 1 else ''}.",
        "",
        "| method | " + " | ".join(rethinking_columns) + " | MACs kept | params kept |",
        "|---|" + "---:|" * (len(rethinking_columns) + 2),
    ]
    for row in rows:
        if "Scratch-E" in row["columns"] or row["method"] == "unpruned":
            cells = [_mean_spread(row["columns"].get(c, [])) for c in rethinking_columns]
            kept = [_mean_spread(row["macs_kept"]) or "-", _mean_spread(row["params_kept"])]
            lines.append(f"| {row['method']} | " + " | ".join(cells + kept) + " |")
    lines += [
        "",
        "| pruning at equal MACs | pruned | fine-tuned | MACs kept | params kept |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "pruned" in row["columns"]:
            cells = [_mean_spread(row["columns"][c]) for c in ("pruned", "fine-tuned")]
            cells += [_mean_spread(row["macs_kept"]), _mean_spread(row["params_kept"])]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines += ["", f"{results['seconds']} s; {versions}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: run, print the tables, optionally write ``rethinking.{json,md}``."""
    parser = argparse.ArgumentParser(
        prog="python -m depprune.experiments.rethinking",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs: a smoke run")
    parser.add_argument("--out", type=Path, help="write rethinking.json and rethinking.md here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    settings = Settings(seeds=tuple(range(args.seeds)))
    if args.quick:
        settings = Settings(seeds=(0,), epochs=2, finetune_epochs=1, sparse_epochs=1)
    results = run(settings, progress=False if args.quiet else None)
    table = markdown(results)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rethinking.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "rethinking.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
