"""io stage, for the command line: a MODEL argument resolved into a module and example inputs.

Takes what a user types as MODEL (a Hugging Face checkpoint directory, a
``package.module:callable``, or a torchvision or timm model name) and gives a
:class:`ResolvedModel`: the ``nn.Module`` (built on the meta device when it
can be, so inspecting a 70B model reads no weight and allocates nothing) and
example inputs to trace it with. Nothing is downloaded: zoo models are built
without weights.

>>> resolved = resolve_model("resnet18")
>>> resolved.source, type(resolved.model).__name__, resolved.example_inputs.shape
('torchvision', 'ResNet', torch.Size([1, 3, 224, 224]))
>>> resolved.model.conv1.weight.device.type  # built on meta: no memory, no init cost
'meta'
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depprune.errors import CheckpointError, DeppruneError

__all__ = [
    "DEFAULT_IMAGE_SHAPE",
    "ModelSpecError",
    "ResolvedModel",
    "parse_shape",
    "resolve_model",
    "zoo_names",
]

#: The example input of vision models (and of callables) when no shape is given.
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)

# Close names offered for a mistyped model name.
_SUGGESTIONS = 5


class ModelSpecError(DeppruneError, ValueError):
    """A MODEL argument names no checkpoint directory, callable or zoo model."""


@dataclass
class ResolvedModel:
    """A MODEL argument made into a module, with inputs to trace it on."""

    #: The model, in eval mode; on the meta device when it could be built there.
    model: nn.Module
    #: Inputs for ``depprune.trace(model, example_inputs)``, on the model's device.
    example_inputs: Any
    #: Where it came from: "checkpoint", "callable", "torchvision" or "timm".
    source: str
    #: The MODEL argument as given.
    name: str
    #: The checkpoint directory, when ``source == "checkpoint"``.
    checkpoint: Path | None = None


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape typed as ``1,3,224,224`` (or ``1x3x224x224``), as a tuple of positive ints.

    >>> parse_shape("1,3,224,224"), parse_shape("2x8")
    ((1, 3, 224, 224), (2, 8))
    >>> parse_shape("1,-3")
    Traceback (most recent call last):
    ...
    ValueError: '1,-3' is not a shape: give positive sizes separated by commas, e.g. 1,3,224,224
    """
    parts = re.split(r"[,x]", text.strip().lower())
    if not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise ValueError(
            f"{text!r} is not a shape: give positive sizes separated by commas, e.g. 1,3,224,224"
        )
    return tuple(int(part) for part in parts)


def resolve_model(
    spec: str,
    *,
    input_shape: Sequence[int] | None = None,
    seq_len: int = 8,
    device: str = "meta",
) -> ResolvedModel:
    """The module and example inputs a MODEL argument names, tried in this order.

    1. an existing directory with ``config.json``: a Hugging Face checkpoint,
       built by :func:`depprune.io.load_skeleton` (parameters on meta, always);
       its input is ``input_ids`` of shape ``(1, seq_len)``, or ``pixel_values``
       from the config's image size, named by the model's ``main_input_name``;
    2. ``package.module:callable`` (``callable`` may be dotted): imported (the
       current directory is searched first) and called with no arguments;
    3. a torchvision model name (``torchvision.models.get_model``), then a timm
       one (``timm.create_model``), both without weights.

    Callables and zoo models are built under ``torch.device(device)``, falling
    back to the CPU if they cannot be built on meta. ``input_shape`` (default
    :data:`DEFAULT_IMAGE_SHAPE`, or timm's configured input size) is the shape
    of the float input. An unknown name raises :class:`ModelSpecError` with
    the closest zoo names.

    >>> resolve_model("resnet_18")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    depprune.cli.models.ModelSpecError: unknown model 'resnet_18'...did you mean resnet18, resnetv2_18...
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _checkpoint(spec, path, input_shape, seq_len)
        raise CheckpointError(
            f"{spec!r} is a directory without config.json; a checkpoint directory is what "
            "save_pretrained writes (config.json and *.safetensors)"
        )
    if path.is_file():
        raise ModelSpecError(
            f"{spec!r} is a file; MODEL is a checkpoint directory (with config.json), a "
            "package.module:callable, or a torchvision/timm model name (plan files end in .npz)"
        )
    if ":" in spec:
        factory = _imported_callable(spec)
        return _built(spec, "callable", factory, input_shape or DEFAULT_IMAGE_SHAPE, device)
    if _looks_like_path(spec):
        hub = (
            "; to use a Hub model, download it first (hf download "
            f"{spec} --local-dir DIR) and pass DIR"
            if re.fullmatch(r"[\w.-]+/[\w.-]+", spec)
            else ""
        )
        raise CheckpointError(f"no such directory: {spec!r}{hub}")
    torchvision_names, timm_names = zoo_names()
    if spec in torchvision_names:
        import torchvision

        extra = {}
        builder = torchvision.models.get_model_builder(spec)
        if "weights_backbone" in inspect.signature(builder).parameters:
            # Detection and segmentation builders fetch a pretrained backbone unless told not to.
            extra["weights_backbone"] = None

        def build_torchvision() -> nn.Module:
            return torchvision.models.get_model(spec, weights=None, **extra)

        return _built(
            spec, "torchvision", build_torchvision, input_shape or DEFAULT_IMAGE_SHAPE, device
        )
    if _is_timm_model(spec):
        import timm

        def build_timm() -> nn.Module:
            return timm.create_model(spec, pretrained=False)

        return _built(spec, "timm", build_timm, input_shape, device)
    # Names both zoos have are offered once.
    names = list(dict.fromkeys(torchvision_names + timm_names))
    close = difflib.get_close_matches(spec, names, n=_SUGGESTIONS)
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else "see torchvision.models.list_models() and timm.list_models() for the names"
    )
    raise ModelSpecError(
        f"unknown model {spec!r}: not a checkpoint directory, a package.module:callable, or "
        f"a torchvision/timm model name; {hint}"
    )


def zoo_names() -> tuple[list[str], list[str]]:
    """The model names torchvision and timm can build (empty for one not installed).

    >>> torchvision_names, timm_names = zoo_names()
    >>> "resnet18" in torchvision_names
    True
    """
    try:
        import torchvision

        torchvision_names = list(torchvision.models.list_models())
    except ImportError:
        torchvision_names = []
    try:
        import timm

        timm_names = list(timm.list_models())
    except ImportError:
        timm_names = []
    return torchvision_names, timm_names


def _is_timm_model(spec: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    # is_model also accepts names with a pretrained tag (resnet50.a1_in1k).
    return bool(timm.is_model(spec))


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~"))


def _checkpoint(
    spec: str, path: Path, input_shape: Sequence[int] | None, seq_len: int
) -> ResolvedModel:
    from depprune.errors import CheckpointError
    from depprune.io.skeleton import example_inputs_for, load_skeleton

    model = load_skeleton(path).eval()
    try:
        inputs = example_inputs_for(model, seq_len=seq_len, input_shape=input_shape)
    except CheckpointError as exc:
        raise ModelSpecError(str(exc)) from exc
    return ResolvedModel(model, inputs, "checkpoint", spec, path)


def _imported_callable(spec: str) -> Callable[[], Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelSpecError(
            f"{spec!r} is not package.module:callable (e.g. mypkg.models:build_model)"
        )
    # As `python -m` does: modules next to where the command runs are importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelSpecError(
            f"cannot import {module_name!r} ({type(exc).__name__}: {exc}); is it on "
            "PYTHONPATH or in the current directory?"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelSpecError(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSpecError(f"{spec} is an object of type {type(target).__name__}, not a callable")
    return target


def _built(
    spec: str,
    source: str,
    factory: Callable[[], Any],
    input_shape: Sequence[int] | None,
    device: str,
) -> ResolvedModel:
    """``factory()`` under ``torch.device(device)`` (the CPU if it fails there), checked."""
    model = None
    if device != "cpu":
        try:
            with torch.device(device):
                model = factory()
        except Exception:
            model = None  # some inits read values (.item(), .tolist()); the CPU can
    if model is None:
        try:
            model = factory()
        except Exception as exc:
            raise ModelSpecError(f"building {spec} failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{spec}() returned an object of type {type(model).__name__}, not a torch nn.Module"
        )
    if input_shape is None:
        configured = getattr(model, "pretrained_cfg", {}).get("input_size")  # timm's
        input_shape = (1, *configured) if configured else DEFAULT_IMAGE_SHAPE
    model.eval()
    inputs = torch.zeros(tuple(input_shape), dtype=_float_dtype(model), device=_device_of(model))
    return ResolvedModel(model, inputs, source, spec)


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype:
    floating = (p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    return next(floating, torch.float32)
