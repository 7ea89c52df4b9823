"""io stage, on the command line: the typer app, its root options, and main's exit codes.

:func:`main` runs the app (the commands come from :mod:`depprune.cli.commands`)
and turns whatever goes wrong into one line on stderr and an exit code: 0
success, 1 a depprune error, 2 a usage error, 3 an internal error, 130
interrupted.

>>> [command.name for command in app.registered_commands]
['inspect', 'plan', 'apply', 'prune']
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Annotated

import typer

from depprune.cli.commands import register
from depprune.cli.options import Debug, Quiet, _Options

__all__ = ["app", "main"]

#: Exit codes, as ``depprune --help`` documents them.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_EPILOG = (
    "Exit codes: 0 success; 1 depprune error (bad model, plan or checkpoint, missing file); "
    "2 usage error (bad option or argument); 3 internal error (a bug: rerun with --debug and "
    "report it); 130 interrupted.\n\n"
    "Examples: depprune inspect resnet18 | depprune plan ./llama --ratio 0.25 -o plan.npz | "
    "depprune apply ./llama plan.npz -o ./llama-pruned"
)

# typer 0.29 vendors click: its exception classes, found through the public BadParameter.
_ClickException, _UsageError = (
    next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
    for name in ("ClickException", "UsageError")
)

app = typer.Typer(
    name="depprune",
    help="Structural pruning of PyTorch models and of checkpoints larger than memory.\n\n"
    "MODEL is a Hugging Face checkpoint directory (config.json and safetensors), a "
    "package.module:callable that returns an nn.Module, or a torchvision or timm model name; "
    "checkpoints are read a tensor at a time, never loaded whole.",
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"depprune {_installed_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    quiet: Quiet = False,
    debug: Debug = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """The options before the command's name, for every command."""
    ctx.obj = _Options(quiet=quiet, debug=debug)


# The commands, in the order --help lists them.
register(app)


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("depprune")
    except PackageNotFoundError:
        import depprune

        return depprune.__version__


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    # Plain writes: rich would wrap a long message over several lines.
    sys.stderr.write(f"error: {_one_line(message)}\n")
    sys.stderr.flush()


def _oserror_text(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {os.fspath(exc.filename)!r}"
    return str(exc)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(f"warning: {_one_line(str(message))}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     code = main(["plan", "resnet18", "--ratio", "2", "-o", "plan.npz"])
    >>> code, err.getvalue()  # doctest: +ELLIPSIS
    (2, "error: Invalid value for '--ratio' / '-r': ... (see 'depprune plan --help')\\n")
    """
    from depprune.errors import DeppruneError, InternalError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        disabled = logging.root.manager.disable
        try:
            result = command.main(args, prog_name="depprune", standalone_mode=False)
            if result == EXIT_INTERRUPTED:  # typer turns Ctrl-C into this exit code
                _error(f"interrupted after {time.perf_counter() - started:.1f} s")
            return result if isinstance(result, int) else EXIT_OK
        except _UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                return EXIT_USAGE  # the help is printed already
            if debug:
                traceback.print_exc()
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _error(f"{exc.format_message()}{where}")
            return EXIT_USAGE
        except _ClickException as exc:
            _error(exc.format_message())
            return exc.exit_code
        except (typer.Abort, KeyboardInterrupt):
            _error(f"interrupted after {time.perf_counter() - started:.1f} s")
            return EXIT_INTERRUPTED
        except InternalError as exc:
            if debug:
                traceback.print_exc()
            _error(f"{exc} (a bug in depprune; rerun with --debug for the traceback and report it)")
            return EXIT_INTERNAL
        except DeppruneError as exc:
            if debug:
                traceback.print_exc()
            _error(str(exc))
            return EXIT_ERROR
        except OSError as exc:
            if debug:
                traceback.print_exc()
            _error(_oserror_text(exc))
            return EXIT_ERROR
        except Exception as exc:
            if debug:
                traceback.print_exc()
            detail = f"{type(exc).__name__}: {exc}"
            _error(
                f"internal error ({detail[:300]}); rerun with --debug for the traceback, and "
                "please report it"
            )
            return EXIT_INTERNAL
        finally:
            logging.disable(disabled)
