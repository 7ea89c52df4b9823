"""io stage, on the command line: the arguments and options the commands share, parsed.

The typer annotations of every MODEL, SRC_DIR and option the commands take,
and the helpers that turn an option's text or file into what the library
takes (a shape, kinds, calibration batches, an importance criterion), raising
a usage error or a :class:`depprune.errors.DeppruneError` naming the fix.

>>> _shape_option("1,3,224,224"), _kinds_option("heads, neurons")
((1, 3, 224, 224), ('heads', 'neurons'))
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer


@dataclass
class _Options:
    """--quiet and --debug, given before the command's name or after it."""

    quiet: bool = False
    debug: bool = False


def _options(ctx: typer.Context, quiet: bool, debug: bool) -> _Options:
    """The root's options merged with the command's; quiet mode silences logs and warnings."""
    options = ctx.obj if isinstance(ctx.obj, _Options) else _Options()
    options.quiet |= quiet
    options.debug |= debug
    if options.quiet:
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
    return options


# The options every command takes (before or after its name).
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Print nothing but errors (inspect --json still prints its JSON)."
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]


# The arguments and options of some commands.
_MODEL_HELP = (
    "A checkpoint directory (config.json + safetensors), a package.module:callable that "
    "returns an nn.Module, or a torchvision or timm model name"
)
ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help=f"{_MODEL_HELP}.")]
ModelOrPlanArg = Annotated[
    str, typer.Argument(metavar="MODEL", help=f"{_MODEL_HELP}; or a plan file (.npz) to summarise.")
]
SrcDir = Annotated[
    Path, typer.Argument(metavar="SRC_DIR", help="The checkpoint directory to read.")
]
InputShape = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        metavar="SHAPE",
        help="Shape of the example input, e.g. 1,3,224,224 (vision default) or 1,128 (tokens).",
    ),
]
SeqLen = Annotated[
    int, typer.Option("--seq-len", min=1, help="Token count of a checkpoint's example input.")
]
Ratio = Annotated[
    float,
    typer.Option("--ratio", "-r", min=0.0, max=1.0, help="Share of each group's units to remove."),
]
Kinds = Annotated[
    str | None,
    typer.Option(
        "--kinds",
        metavar="K1,K2",
        help="Kinds of groups to prune: hidden, heads, head_dim, neurons, channels, conv_groups "
        "[default: every kind]",
        show_default=False,
    ),
]
ImportanceName = Annotated[
    Literal["l2", "l1", "random", "wanda"],
    typer.Option(
        "--importance",
        "-i",
        help="How units are scored: l2/l1 magnitude, random, or wanda (needs --calibration).",
    ),
]
RoundTo = Annotated[
    int | None, typer.Option("--round-to", min=1, help="Keep a multiple of N units per group.")
]
TensorParallelSize = Annotated[
    int | None,
    typer.Option(
        "--tensor-parallel",
        min=1,
        metavar="N",
        help="Keep every one of N tensor-parallel ranks an equal share (from the tp_plan).",
    ),
]
GlobalRanking = Annotated[
    bool, typer.Option("--global", help="Rank the groups of a scope together, not each alone.")
]
Calibration = Annotated[
    Path | None,
    typer.Option(
        "--calibration",
        metavar="FILE",
        help="Token ids for wanda: a .pt (tensor or list of batches) or .npy file.",
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace OUT_DIR once the new checkpoint is complete.")
]
OutDir = Annotated[
    Path,
    typer.Option(
        "--output", "-o", metavar="OUT_DIR", help="Directory to write the pruned checkpoint to."
    ),
]


def _shape_option(text: str | None) -> tuple[int, ...] | None:
    from depprune.cli.models import parse_shape

    if text is None:
        return None
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--input-shape'") from None


def _kinds_option(text: str | None) -> tuple[str, ...] | None:
    from depprune.kinds import KINDS

    if text is None:
        return None
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise typer.BadParameter(
            f"{text!r} holds {'unknown kinds ' + ', '.join(unknown) if unknown else 'no kind'}; "
            f"choose from {','.join(KINDS)}",
            param_hint="'--kinds'",
        )
    return kinds


def _calibration(path: Path | None) -> list | None:
    """Calibration batches from a .pt (a tensor, or a list of batches) or .npy file of token ids.

    A tensor or array of token ids of shape (samples, length) is split into
    batches of 8 samples.
    """
    if path is None:
        return None
    import numpy as np
    import torch

    from depprune.errors import ImportanceError

    if not path.is_file():
        raise FileNotFoundError(2, "no such calibration file", os.fspath(path))
    try:
        if path.suffix == ".npy":
            data: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ImportanceError(
            f"cannot read calibration file {os.fspath(path)!r} ({type(exc).__name__}: {exc}); "
            "save token ids with torch.save(tensor, 'calib.pt') or numpy.save"
        ) from exc
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            data = data.unsqueeze(0)
        return list(torch.split(data, 8))
    if isinstance(data, (list, tuple)) and data:
        return list(data)
    raise ImportanceError(
        f"calibration file {os.fspath(path)!r} holds a {type(data).__name__}; save a tensor of "
        "token ids (samples, length) or a non-empty list of input batches"
    )


def _importance(name: str, model: Any, calibration: list | None) -> Any:
    """The criterion of a name, for a model in memory (checkpoints use depprune.io's)."""
    from depprune.errors import ImportanceError
    from depprune.importance import magnitude, random, wanda

    if name == "wanda":
        if calibration is None:
            raise ImportanceError("--importance wanda needs --calibration FILE (token ids)")
        return wanda(model, calibration, progress=False)
    return {"l2": magnitude(2), "l1": magnitude(1), "random": random(0)}[name]


def _checked_output_file(path: Path) -> None:
    """Fail before the work when a file could not be written where asked."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(2, "no such directory for the output file", os.fspath(parent))
    if path.is_dir():
        raise IsADirectoryError(21, "the output is a directory, not a file", os.fspath(path))
