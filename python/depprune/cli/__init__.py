"""io stage, on the command line: ``depprune inspect | plan | apply | prune``.

Takes a MODEL (a Hugging Face checkpoint directory, a ``package.module:callable``
or a torchvision/timm name, see :func:`depprune.cli.models.resolve_model`), a
plan file or a checkpoint directory, and gives tables on the terminal, plan
files, and pruned checkpoints written a tensor at a time (:mod:`depprune.io`),
so a checkpoint larger than memory prunes::

    depprune inspect ./llama-3-8b                 # groups, layer sizes, what is frozen
    depprune plan ./llama-3-8b --ratio 0.25 -o plan.npz
    depprune inspect plan.npz                     # what a plan file cuts
    depprune apply ./llama-3-8b plan.npz -o ./llama-pruned
    depprune prune ./llama-3-8b -o ./llama-pruned --ratio 0.25 --kinds neurons

Exit codes: 0 success, 1 a depprune error (bad model, plan or checkpoint; a
missing file), 2 a usage error (a bad option), 3 an internal error (a bug:
rerun with ``--debug`` for the traceback), 130 interrupted. Errors print one
line, ``error: <message>``, on stderr.

The package, a module a job: :mod:`~depprune.cli.app` (the typer app, exit
codes, :func:`main`), :mod:`~depprune.cli.commands` (the four commands),
:mod:`~depprune.cli.options` (their shared arguments, parsed),
:mod:`~depprune.cli.models` (MODEL resolved), :mod:`~depprune.cli.summaries`
(what is shown, as data), :mod:`~depprune.cli.macs` (MACs per unit),
:mod:`~depprune.cli.tables` and :mod:`~depprune.cli.progress` (the terminal).

>>> main(["--version"])  # doctest: +ELLIPSIS
depprune ...
0
>>> import contextlib, io, json
>>> with contextlib.redirect_stdout(io.StringIO()) as out:
...     code = main(["inspect", "resnet18", "--json"])  # built on meta: nothing allocated
>>> code, json.loads(out.getvalue())["totals"]["groups"]
(0, 12)
"""

from depprune.cli.app import app, main
from depprune.cli.macs import macs_per_unit
from depprune.cli.models import (
    DEFAULT_IMAGE_SHAPE,
    ModelSpecError,
    ResolvedModel,
    parse_shape,
    resolve_model,
    zoo_names,
)
from depprune.cli.summaries import LayerRow, group_rows, layer_rows

__all__ = [
    "DEFAULT_IMAGE_SHAPE",
    "LayerRow",
    "ModelSpecError",
    "ResolvedModel",
    "app",
    "group_rows",
    "layer_rows",
    "macs_per_unit",
    "main",
    "parse_shape",
    "resolve_model",
    "zoo_names",
]
