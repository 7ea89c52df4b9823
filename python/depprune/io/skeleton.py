"""io stage, the skeleton: a checkpoint's ``config.json`` to its architecture with no weights.

:func:`load_skeleton` builds the Hugging Face model class the config names
with every parameter on the meta device (shapes and dtypes, no storage), so
a 70B checkpoint's architecture costs no memory; tracing, planning and the
plan's proof all run on it. :func:`stored_as` maps the model's tensor names to the checkpoint's (a tied
tensor is stored once; transformers' legacy names are renamed).

>>> import tempfile, transformers
>>> folder = tempfile.mkdtemp()
>>> transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...     num_attention_heads=2, vocab_size=10).save_pretrained(folder)
>>> model = load_skeleton(folder)
>>> type(model).__name__, model.lm_head.weight.device.type
('LlamaForCausalLM', 'meta')
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from depprune.errors import CheckpointError

__all__ = [
    "example_inputs_for",
    "load_config",
    "load_skeleton",
    "real_buffers",
    "stored_as",
    "stored_names",
]


def load_config(folder: str | os.PathLike):
    """The transformers config of the checkpoint in ``folder`` (never from the network)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{os.fspath(folder)!r} has no config.json, so its architecture is unknown; pass "
            "model= (the architecture, e.g. built on the meta device) to plan or apply"
        )
    try:
        import transformers
    except ImportError as exc:
        raise CheckpointError(
            "reading a Hugging Face checkpoint needs transformers: pip install 'depprune[hf]'"
        ) from exc
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"transformers cannot read {folder / 'config.json'} ({type(exc).__name__}: "
            f"{str(exc)[:300]}); is this transformers version new enough for the model?"
        ) from exc


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise CheckpointError(
        f"transformers has no model class for {type(config).__name__} "
        f"(architectures {getattr(config, 'architectures', None)}); pass model= instead"
    )


def load_skeleton(folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The model ``folder``'s ``config.json`` describes, with every tensor on the meta device.

    The class is the first of the config's ``architectures`` that transformers
    has (else its causal-LM or base model). Floating tensors take ``dtype``,
    by default the config's own. The model is in eval mode.
    """
    config = load_config(folder)
    cls = _model_class(config)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls(config)
    except Exception as exc:
        raise CheckpointError(
            f"{cls.__name__} could not be built from {os.fspath(folder)!r}'s config "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        model.to(dtype)
    return model.eval()


def example_inputs_for(
    model: nn.Module, *, seq_len: int = 8, input_shape: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Inputs to trace a Hugging Face model with: zeros on its device, by its main input.

    ``input_ids`` of shape ``(1, seq_len)`` for text models, ``pixel_values``
    of the config's image size for vision models; ``input_shape`` overrides
    the shape. Another main input raises :class:`CheckpointError`.

    >>> import transformers
    >>> with torch.device("meta"):
    ...     vit = transformers.ViTModel(transformers.ViTConfig(image_size=32, hidden_size=16,
    ...         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    >>> {k: tuple(v.shape) for k, v in example_inputs_for(vit).items()}
    {'pixel_values': (1, 3, 32, 32)}
    """
    name = getattr(model, "main_input_name", "input_ids")
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    if name == "input_ids":
        shape = tuple(input_shape) if input_shape else (1, seq_len)
        return {name: torch.zeros(shape, dtype=torch.long, device=device)}
    if input_shape or name == "pixel_values":
        config = getattr(model, "config", None)
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        shape = tuple(input_shape or (1, getattr(config, "num_channels", 3), *size))
        floating = (p.dtype for p in model.parameters() if p.dtype.is_floating_point)
        return {name: torch.zeros(shape, dtype=next(floating, torch.float32), device=device)}
    raise CheckpointError(
        f"{type(model).__name__} takes {name!r}, whose shape depprune cannot guess; pass "
        "example_inputs= (on the command line, --input-shape)"
    )


@contextlib.contextmanager
def real_buffers() -> Iterator[None]:
    """Build modules with parameters on meta but buffers real (what the constructor computes).

    A layer-by-layer forward needs the buffers a constructor derives and no
    checkpoint stores (rotary frequencies, causal masks), and nothing else.

    >>> with real_buffers():
    ...     norm = torch.nn.BatchNorm1d(3)
    >>> norm.weight.device.type, norm.running_var.device.type
    ('meta', 'cpu')
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        # Already on meta: a tied parameter assigned again keeps its identity.
        if param is not None and not param.is_meta:
            stored = module._parameters[name]
            module._parameters[name] = type(stored)(
                stored.to("meta"), requires_grad=stored.requires_grad
            )

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def stored_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each name of a parameter or persistent buffer -> every name of the same tensor.

    A checkpoint stores a tied tensor once, under any one of its names
    (``lm_head.weight`` or ``model.embed_tokens.weight`` when the embeddings
    are tied); buffers the model does not save are absent.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> model[1].weight = model[0].weight
    >>> stored_names(model)["1.weight"]
    ('0.weight', '1.weight')
    """
    by_tensor: dict[int, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: tuple(by_tensor[id(tensor)]) for name, tensor in state.items()}


def stored_as(model: nn.Module, checkpoint_names: Iterable[str]) -> dict[str, str]:
    """Each model tensor name -> the checkpoint name that stores it, where one does.

    The same name, a tied copy's (:func:`stored_names`), or the legacy name
    transformers renames on load and back on save (ViT's
    ``encoder.layer.0.attention.attention.key`` is ``layers.0.attention.k_proj``
    in transformers 5): its renaming rules are applied to the checkpoint's
    names. Tensors transformers *converts* (per-expert MoE weights fused into
    one) have no entry.

    >>> stored_as(torch.nn.Linear(2, 2), ["weight"])
    {'weight': 'weight'}
    """
    checkpoint_names = list(checkpoint_names)
    as_model = dict(zip(checkpoint_names, _renamed(model, checkpoint_names), strict=True))
    by_model: dict[str, str] = {}
    for stored, name in as_model.items():
        if name is not None:
            by_model.setdefault(name, stored)
    where = {}
    for name, names in stored_names(model).items():
        found = next((by_model[alias] for alias in names if alias in by_model), None)
        if found is not None:
            where[name] = found
    return where


def _renamed(model: nn.Module, checkpoint_names: list[str]) -> list[str | None]:
    """The model name of each checkpoint name by transformers' load-time renaming rules;
    None where a conversion (not a rename) would make the tensor."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return list(checkpoint_names)  # older transformers: checkpoints use the model's names
    if not hasattr(model, "config") or not hasattr(model, "base_model_prefix"):
        return list(checkpoint_names)
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:
        return list(checkpoint_names)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    state = model.state_dict(keep_vars=True)
    renamed: list[str | None] = []
    for name in checkpoint_names:
        new, converted = rename_source_key(
            name,
            renamings,
            converters,
            base_model_prefix=model.base_model_prefix,
            meta_state_dict=state,
        )
        renamed.append(None if converted is not None else new)
    return renamed
