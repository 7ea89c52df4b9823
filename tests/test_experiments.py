"""The digits reproduction runs end to end (a smoke run: one seed, one epoch per phase)."""

import json

import torch

from depprune.experiments import rethinking


def test_digits_split_is_stratified_and_standardised():
    data = rethinking.digits()
    train_counts = torch.bincount(data.train_y, minlength=10)
    test_counts = torch.bincount(data.test_y, minlength=10)
    # Every class in both splits, in the same proportion (within one image).
    assert (test_counts > 0).all()
    assert ((train_counts / 3 - test_counts).abs() <= 2).all()
    assert abs(float(data.train_x.mean())) < 1e-5
    assert abs(float(data.train_x.std()) - 1) < 1e-3


def test_smoke_run_gives_every_row_and_column(tmp_path, capsys):
    settings = rethinking.Settings(seeds=(0,), epochs=1, finetune_epochs=1, sparse_epochs=1)
    results = rethinking.run(settings, progress=False)
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {
        "unpruned",
        "L1-norm filters",
        "Network Slimming",
        "DepGraph: group-sparse training, learned sparsity",
        "DepGraph: group-sparse training, uniform sparsity",
        "group L2 magnitude, uniform (no sparse training)",
    }
    for name in ("L1-norm filters", "Network Slimming"):
        assert set(rows[name]["columns"]) == {"unpruned", "fine-tuned", "Scratch-E", "Scratch-B"}
        # Pruned: fewer MACs and parameters than the full model.
        assert 0 < rows[name]["macs_kept"][0] < 100
        assert 0 < rows[name]["params_kept"][0] < 100
    for row in rows.values():
        for values in row["columns"].values():
            assert all(0.0 <= v <= 100.0 for v in values)
    # The magnitude baseline is pruned to the DepGraph model's MACs (within one bisection step).
    learned = rows["DepGraph: group-sparse training, learned sparsity"]["macs_kept"][0]
    magnitude = rows["group L2 magnitude, uniform (no sparse training)"]["macs_kept"][0]
    assert abs(learned - magnitude) < 0.25 * learned
    table = rethinking.markdown(results)
    assert table.count("\n| ") == 8  # two header rows and six method rows
    assert "torch " + torch.__version__ in table
    json.dumps(results)  # JSON-ready
