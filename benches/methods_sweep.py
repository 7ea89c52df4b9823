"""Methods sweep: run every pruning method of depprune on models no test names, say what breaks.

For each model (torchvision, timm, tiny Hugging Face configs) and each method
(L1-norm filters, Network Slimming, DepGraph, iterative pruning, Sparse Structure
Selection, non-structured magnitude, Scratch-E/B, architecture export, the
importances LAMP, FPGM, Hessian and element-wise Taylor, ThiNet and LASSO where
installed), the method runs on a fresh copy of the model, with two tiny random
training steps where it trains, and gets one status:

- ``ok``: it ran, the pruned model runs on the example input with the same output
  shape and finite values, and a structural prune that claims to remove units
  made the parameter count go down (and a fine-tuning step after it runs);
- ``refused``: a ``DeppruneError`` was raised and the model is exactly as it was
  (the message is kept; ``fix?`` says whether it seems to name a fix);
- ``BUG``: another exception escaped (or an ``InternalError``): the traceback is kept;
- ``BROKEN``: the output after the method does not run, changed shape, has NaN or
  inf, or the parameter count did not go down although units were removed, or a
  defining check of the method failed (scratch left weights as they were ...);
- ``CHANGED``: a call raised and left the model changed (weights, modules, hooks,
  training modes), or a call that must not change the model did;
- ``nothing``: it ran but removed no unit (every group kept whole);
- ``timeout``; ``unavailable`` (a method module that does not import yet, a model
  the installed library lacks).

Not a CI test: a benchmark of robustness, of the checkout's ``python/depprune``. One
torch thread; about 15 minutes on a 2-core machine for the whole sweep (ThiNet and
LASSO get 20 s per model; torchvision's vit_b_16 is replaced by a 2-layer
VisionTransformer of the same class).

    python benches/methods_sweep.py                      # everything, writes the results
    python benches/methods_sweep.py --quick              # 4 models, fewer method variants
    python benches/methods_sweep.py --models resnet18,hf-gpt2 --methods slimming,sss

Results: a table on stdout and ``benches/results/methods_sweep.md`` (written by an
unfiltered run, or wherever ``--out`` says).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

ROOT = Path(__file__).resolve().parent.parent
# The checkout's depprune (it ships its built core), not whatever copy is installed.
sys.path.insert(0, str(ROOT / "python"))

import depprune  # noqa: E402
from depprune import architecture as arch_module  # noqa: E402
from depprune.errors import DeppruneError, InternalError  # noqa: E402
from depprune.importance import fpgm, hessian, lamp, taylor_elementwise  # noqa: E402
from depprune.methods import depgraph, l1_filter, slimming, sss, unstructured  # noqa: E402
from depprune.sparsity import IterativePruner  # noqa: E402

RESULTS = ROOT / "benches" / "results"
RATIO = 0.3
IMAGE = 64
#: Seconds for ThiNet and LASSO per model (--reconstruction-timeout): LASSO alone would take
#: more than the rest of the sweep (over 120 s on ResNet-50, VGG-11 and EfficientNet-B0).
RECONSTRUCTION_LIMIT = 20.0


# -- models -------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """A model to sweep: how to build it, its example input, its loss, a sibling for roles."""

    name: str
    build: Callable[[], nn.Module]
    #: "image" (classifier on 1x3xSxS), "lm" (causal LM on tokens), "tokens" (classifier).
    task: str
    image_size: int = IMAGE
    #: A deeper or wider model of the same family (apply_architecture by role).
    sibling: Callable[[], nn.Module] | None = None
    quick: bool = False


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10, **kwargs)

    return build


def _tiny_vit(layers: int = 2) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import VisionTransformer

        return VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=layers,
            num_heads=4,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        )

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


#: Tiny decoder as in tests/tiny_models.py: 4 query heads in 2 KV groups, hidden 32.
TINY_DECODER = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _hf(model_class: str, config_class: str, layers: int = 2, **fields: Any) -> Callable:
    def build() -> nn.Module:
        import transformers

        layer_field = "n_layer" if config_class == "GPT2Config" else "num_hidden_layers"
        config = getattr(transformers, config_class)(**{**fields, layer_field: layers})
        return getattr(transformers, model_class)(config)

    return build


GPT2 = dict(vocab_size=100, n_embd=32, n_head=4, n_positions=64)
BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=2,
)

MODELS = [
    ModelSpec(
        "resnet18", _torchvision("resnet18"), "image", sibling=_torchvision("resnet34"), quick=True
    ),
    ModelSpec("resnet50", _torchvision("resnet50"), "image"),
    ModelSpec("vgg11_bn", _torchvision("vgg11_bn"), "image", sibling=_torchvision("vgg13_bn")),
    ModelSpec(
        "mobilenet_v2",
        _torchvision("mobilenet_v2"),
        "image",
        sibling=_torchvision("mobilenet_v2", width_mult=1.25),
    ),
    ModelSpec("mobilenet_v3_small", _torchvision("mobilenet_v3_small"), "image", quick=True),
    ModelSpec(
        "efficientnet_b0",
        _torchvision("efficientnet_b0"),
        "image",
        sibling=_torchvision("efficientnet_b1"),
    ),
    ModelSpec("densenet121", _torchvision("densenet121"), "image"),
    ModelSpec(
        "regnet_x_400mf",
        _torchvision("regnet_x_400mf"),
        "image",
        sibling=_torchvision("regnet_x_800mf"),
    ),
    ModelSpec(
        "shufflenet_v2_x0_5",
        _torchvision("shufflenet_v2_x0_5"),
        "image",
        sibling=_torchvision("shufflenet_v2_x1_0"),
    ),
    # torchvision's VisionTransformer class at 2 layers, hidden 32, rather than vit_b_16 (86M
    # parameters at 224x224): the same modules, in the time budget.
    ModelSpec("vit_tiny", _tiny_vit(), "image", image_size=32, sibling=_tiny_vit(3), quick=True),
    ModelSpec(
        "timm-convnext_atto", _timm("convnext_atto"), "image", sibling=_timm("convnext_femto")
    ),
    ModelSpec("timm-resnet18", _timm("resnet18"), "image", sibling=_timm("resnet34")),
    ModelSpec(
        "hf-llama",
        _hf("LlamaForCausalLM", "LlamaConfig", **TINY_DECODER),
        "lm",
        sibling=_hf("LlamaForCausalLM", "LlamaConfig", layers=3, **TINY_DECODER),
        quick=True,
    ),
    ModelSpec(
        "hf-gpt2",
        _hf("GPT2LMHeadModel", "GPT2Config", **GPT2),
        "lm",
        sibling=_hf("GPT2LMHeadModel", "GPT2Config", layers=3, **GPT2),
    ),
    ModelSpec(
        "hf-bert-cls",
        _hf("BertForSequenceClassification", "BertConfig", **BERT),
        "tokens",
        sibling=_hf("BertForSequenceClassification", "BertConfig", layers=3, **BERT),
    ),
]


def redraw_zero_weights(model: nn.Module, seed: int = 0) -> None:
    """Zero-initialised heads and residual norms (torchvision ViT's head, timm's
    zero_init_last) get seeded small values, so no check compares zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.numel() <= 1 or name.endswith("bias") or bool(param.any()):
                continue
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(noise * 0.02 if param.ndim >= 2 else 1.0 + 0.1 * noise)


def built(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    redraw_zero_weights(model)
    return model.eval()


# -- inputs, losses, training ------------------------------------------------------------


@dataclass
class Context:
    """What a method gets besides its model: inputs, batches, the loss, fresh builds."""

    spec: ModelSpec
    pristine: nn.Module
    example: Any
    batches: list[Any]
    calibration: list[Any]
    output_shape: tuple[int, ...]
    calls: Calls
    steps: int = 2

    def fresh(self) -> nn.Module:
        """A new build of the model (a copy of the pristine one: the same weights)."""
        return copy.deepcopy(self.pristine)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.spec.task == "image":
            images, labels = batch
            return functional.cross_entropy(forward(model, images), labels)
        return model(**batch).loss

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        after_backward: Callable[[], None] | None = None,
        after_step: Callable[[float], None] | None = None,
        steps: int | None = None,
    ) -> torch.optim.Optimizer:
        """A few SGD steps (with momentum, so the optimizer has state to cut) on random data."""
        lr = 1e-2
        optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for step in range(self.steps if steps is None else steps):
            optimizer.zero_grad()
            self.loss(model, self.batches[step % len(self.batches)]).backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            if after_step is not None:
                after_step(lr)
        model.eval()
        optimizer.zero_grad()
        return optimizer


def make_inputs(spec: ModelSpec) -> tuple[Any, list[Any], list[Any]]:
    """(example input, training batches, calibration batches), seeded."""
    generator = torch.Generator().manual_seed(1)
    if spec.task == "image":
        size = spec.image_size

        def images(n: int) -> torch.Tensor:
            return torch.randn(n, 3, size, size, generator=generator)

        batches = [(images(4), torch.randint(0, 10, (4,), generator=generator)) for _ in range(2)]
        return images(1), batches, [images(4) for _ in range(2)]

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(0, 100, (n, 8), generator=generator)

    batches = []
    for _ in range(2):
        ids = tokens(4)
        labels = ids if spec.task == "lm" else torch.randint(0, 2, (4,), generator=generator)
        batches.append({"input_ids": ids, "labels": labels})
    return {"input_ids": tokens(1)}, batches, [{"input_ids": tokens(4)} for _ in range(2)]


def forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return out[0]


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- calls: timing, snapshots, errors -----------------------------------------------------


class Timeout(BaseException):
    """The method ran past its time limit (a BaseException: depprune's handlers pass it on)."""


class CallFailed(Exception):
    """A depprune call raised; ``changed`` names the watched models it left changed."""

    def __init__(self, label: str, error: BaseException, changed: list[str], tb: str) -> None:
        super().__init__(label)
        self.label, self.error, self.changed, self.tb = label, error, changed, tb


class Problem(Exception):
    """The method ran but its result is wrong (a defining check failed)."""


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    structure = [
        (name, type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ]
    return state, structure


def _difference(snapshot: tuple[dict[str, torch.Tensor], list[tuple]], model: nn.Module) -> str:
    """'' when ``model`` is exactly as snapshotted, else what differs first."""
    state, structure = snapshot
    now_state, now_structure = _snapshot(model)
    if list(state) != list(now_state):
        added = sorted(set(now_state) - set(state))[:3]
        gone = sorted(set(state) - set(now_state))[:3]
        return f"state_dict keys differ (added {added}, removed {gone})"
    for key, old in state.items():
        new = now_state[key]
        if old.shape != new.shape:
            return f"{key} shape {tuple(old.shape)} -> {tuple(new.shape)}"
        if not torch.equal(old, new) and not (old.isnan().any() and new.isnan().any()):
            return f"{key} values changed"
    if structure != now_structure:
        for old, new in zip(structure, now_structure, strict=False):
            if old != new:
                return f"module {old} -> {new}"
        return "modules added or removed"
    return ""


@dataclass
class Calls:
    """Runs depprune calls: times them, and on an error checks the watched models."""

    timings: list[tuple[str, float]] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)

    def __call__(
        self,
        label: str,
        fn: Callable[..., Any],
        *args: Any,
        watch: tuple[nn.Module, ...] = (),
        unchanged: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)``; ``unchanged``: the watched models must not change even on
        success (make_plan, hessian, architecture)."""
        snapshots = [(model, _snapshot(model)) for model in watch]
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn(*args, **kwargs)
        except Timeout as exc:
            self.timings.append((label, time.perf_counter() - start))
            raise Timeout(f"{label}: {exc}") from None
        except Exception as exc:
            self.timings.append((label, time.perf_counter() - start))
            changed = [why for m, snap in snapshots if (why := _difference(snap, m))]
            raise CallFailed(label, exc, changed, traceback.format_exc()) from exc
        self.timings.append((label, time.perf_counter() - start))
        self.warned += [f"{label}: {w.category.__name__}: {w.message}" for w in caught]
        if unchanged:
            for model, snap in snapshots:
                why = _difference(snap, model)
                if why:
                    raise Problem(f"{label} changed the model, which it must not: {why}")
        return result


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Timeout(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- methods ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a method gives back for the checks: the model to check and what it claims."""

    model: nn.Module
    params_before: int
    #: Whether it claims to remove units (so the parameter count must go down).
    claims_pruned: bool
    #: The output shape the checked model had before (None: the pristine model's).
    output_shape: tuple[int, ...] | None = None
    #: An optimizer that followed the cut: one more training step must run.
    optimizer: torch.optim.Optimizer | None = None
    notes: list[str] = field(default_factory=list)
    #: A structural method: removing no unit at all is worth a status of its own.
    structural: bool = True


def _claims(report: Any) -> bool:
    return any(g.kept < g.size for g in report.plan.groups)


def _structural(model: nn.Module, report: Any, before: int, optimizer: Any = None) -> Outcome:
    notes = []
    if report.kept_whole:
        notes.append(f"{len(report.kept_whole)} group(s) kept whole")
    notes += [n[:120] for n in report.notes]
    return Outcome(model, before, _claims(report), optimizer=optimizer, notes=notes)


def m_l1_filter(model: nn.Module, ctx: Context, skip_residual: bool = True) -> Outcome:
    before = param_count(model)
    optimizer = ctx.train(model)
    report = ctx.calls(
        "l1_filter.prune",
        l1_filter.prune,
        model,
        ctx.example,
        ratio=RATIO,
        skip_residual=skip_residual,
        optimizers=[optimizer],
        progress=False,
        watch=(model,),
    )
    return _structural(model, report, before, optimizer)


def m_slimming(model: nn.Module, ctx: Context) -> Outcome:
    before = param_count(model)
    reg = ctx.calls("slimming.regularizer", slimming.regularizer, model, 1e-4, watch=(model,))
    optimizer = ctx.train(model, after_backward=reg.step)
    report = ctx.calls(
        "slimming.prune",
        slimming.prune,
        model,
        ctx.example,
        ratio=RATIO,
        optimizers=[optimizer],
        progress=False,
        watch=(model,),
    )
    return _structural(model, report, before, optimizer)


def m_depgraph(model: nn.Module, ctx: Context, grouping: str | None, sparsity: str) -> Outcome:
    before = param_count(model)
    reg = None
    after_backward = None
    if grouping is not None:
        reg = ctx.calls(
            "depgraph.regularizer",
            depgraph.regularizer,
            model,
            ctx.example,
            strength=1e-3,
            grouping=grouping,
            update_every=1,
            watch=(model,),
            unchanged=True,
        )
        after_backward = reg.step
    optimizer = ctx.train(model, after_backward=after_backward)
    report = ctx.calls(
        "depgraph.prune",
        depgraph.prune,
        model,
        ctx.example,
        reg,
        ratio=RATIO,
        sparsity=sparsity,
        optimizers=[optimizer],
        progress=False,
        watch=(model,),
    )
    return _structural(model, report, before, optimizer)


def m_iterative(model: nn.Module, ctx: Context) -> Outcome:
    before = param_count(model)
    pruner = ctx.calls(
        "IterativePruner",
        IterativePruner,
        model,
        ctx.example,
        final_ratio=RATIO,
        steps=2,
        progress=False,
        watch=(model,),
        unchanged=True,
    )
    optimizer = None
    claims = False
    notes: list[str] = []
    while not pruner.done:
        optimizer = ctx.train(model, optimizer)
        report = ctx.calls(
            f"IterativePruner.step {pruner.steps_taken + 1}",
            pruner.step,
            optimizers=[optimizer],
            watch=(model,),
        )
        claims = claims or _claims(report)
        if report.kept_whole:
            notes = [f"{len(report.kept_whole)} group(s) kept whole"]
    # The pruner's promise: it ends at the widths one-shot pruning at the final ratio gives.
    one_shot = ctx.fresh()
    once = ctx.calls(
        "one-shot prune", depprune.prune, one_shot, ctx.example, ratio=RATIO, progress=False
    )
    factored = any(g.kind == "conv_groups" for g in once.graph.groups) or any(
        g.kind == "head_dim" for g in once.graph.groups
    )
    if param_count(one_shot) != param_count(model) and (once.kept_whole or factored):
        # Documented differences: the proof refuted a final count (one-shot keeps the group
        # whole, a step may have cut it part-way), or units factor as outer x inner (a step
        # too small to cut the outer factor cuts the inner one).
        notes.append(
            f"differs from one-shot ({param_count(model):,} vs {param_count(one_shot):,} "
            f"parameters: {_width_difference(one_shot, model)})"
        )
    elif param_count(one_shot) != param_count(model):
        raise Problem(
            f"2 steps to ratio {RATIO} leave {param_count(model):,} parameters, one-shot "
            f"pruning at {RATIO} {param_count(one_shot):,}: {_width_difference(one_shot, model)}"
        )
    return Outcome(model, before, claims, optimizer=optimizer, notes=notes)


def _width_difference(expected: nn.Module, got: nn.Module) -> str:
    """The first module whose weight shape differs between two prunings of one model."""
    shapes = {name: tuple(p.shape) for name, p in expected.named_parameters()}
    for name, param in got.named_parameters():
        if name in shapes and shapes[name] != tuple(param.shape):
            return f"{name} is {tuple(param.shape)}, one-shot {shapes[name]}"
    return "the same shapes by name"


def m_sss(model: nn.Module, ctx: Context) -> Outcome:
    before = param_count(model)
    scales = ctx.calls(
        "sss.StructureScales",
        sss.StructureScales,
        model,
        example_inputs=ctx.example,
        strength=1e-2,
        watch=(model,),
    )
    # The optimizer is made after the scales, so it trains them.
    ctx.train(model, after_step=scales.step)
    # As if trained long: every other structure's scale reached zero.
    with torch.no_grad():
        for scale in scales.parameters()[::2]:
            scale.zero_()
    report = ctx.calls("sss.prune", sss.prune, model, ctx.example, watch=(model,))
    notes = [f"{len(scales.names)} structures, {len(report.removed)} removed"]
    if report.buffered:
        notes.append(f"{len(report.buffered)} scale(s) kept as buffers")
    notes += [n[:120] for n in report.notes]
    if report.params_after != param_count(model):
        raise Problem(
            f"StructureReport.params_after {report.params_after} but the model has "
            f"{param_count(model)}"
        )
    # The scales were added as parameters: compare with the count once they are in.
    return Outcome(model, before + len(scales.names), bool(report.removed), notes=notes)


def _nonconstant_unchanged(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Parameters scratch left as they were although their values are not a constant init."""
    stale = []
    for name, param in model.named_parameters():
        old = before.get(name)
        if old is None or old.shape != param.shape or param.numel() < 2:
            continue
        if torch.equal(old, param.detach()) and not bool((param == param.flatten()[0]).all()):
            stale.append(name)
    return stale


def m_unstructured_scratch(model: nn.Module, ctx: Context) -> Outcome:
    before = param_count(model)
    ctx.train(model)
    report = ctx.calls("unstructured.prune", unstructured.prune, model, 0.5, watch=(model,))
    zeros = report.zeros
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx.calls("scratch", depprune.scratch, model, seed=0, watch=(model,))
    after = unstructured.sparsity(model).zeros
    if after < zeros:
        raise Problem(f"scratch lost the masks: {zeros} masked zeros before, {after} after")
    stale = _nonconstant_unchanged(trained, model)
    if stale:
        raise Problem(f"scratch left {len(stale)} parameter(s) as trained: {stale[:4]}")
    return Outcome(model, before, False, notes=[f"sparsity {report.overall:.2f}"], structural=False)


def m_unstructured_structural(model: nn.Module, ctx: Context) -> Outcome:
    before = param_count(model)
    ctx.calls("unstructured.prune", unstructured.prune, model, 0.5, watch=(model,))
    optimizer = ctx.train(model)
    report = ctx.calls(
        "depprune.prune (masked)",
        depprune.prune,
        model,
        ctx.example,
        ratio=RATIO,
        optimizers=[optimizer],
        progress=False,
        watch=(model,),
    )
    return _structural(model, report, before, optimizer)


def m_scratch(model: nn.Module, ctx: Context) -> Outcome:
    before = param_count(model)
    ctx.train(model)
    report = ctx.calls(
        "depprune.prune", depprune.prune, model, ctx.example, ratio=RATIO, progress=False
    )
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx.calls("scratch", depprune.scratch, model, seed=0, watch=(model,))
    stale = _nonconstant_unchanged(trained, model)
    if stale:
        raise Problem(f"scratch left {len(stale)} parameter(s) as trained: {stale[:4]}")
    return _structural(model, report, before)


def m_scratch_from_plan(model: nn.Module, ctx: Context) -> Outcome:
    plan = ctx.calls(
        "make_plan",
        depprune.make_plan,
        model,
        ctx.example,
        ratio=RATIO,
        progress=False,
        watch=(model,),
        unchanged=True,
    )
    fresh = ctx.fresh()
    before = param_count(fresh)
    ctx.calls(
        "scratch_from_plan",
        depprune.scratch_from_plan,
        fresh,
        plan,
        example_inputs=ctx.example,
        seed=0,
        watch=(fresh,),
    )
    return Outcome(fresh, before, any(g.kept < g.size for g in plan.groups))


def _exported(model: nn.Module, ctx: Context) -> tuple[Any, nn.Module, str]:
    """A plan's architecture saved and loaded back, the model it was cut to, the file."""
    plan = ctx.calls(
        "make_plan",
        depprune.make_plan,
        model,
        ctx.example,
        ratio=RATIO,
        progress=False,
        watch=(model,),
        unchanged=True,
    )
    reference = copy.deepcopy(model)
    plan.apply(reference)
    arch = ctx.calls(
        "architecture",
        arch_module.architecture,
        plan,
        reference,
        watch=(reference,),
        unchanged=True,
    )
    path = os.path.join(tempfile.mkdtemp(prefix="methods_sweep_"), "arch.json")
    ctx.calls("Architecture.save", arch.save, path)
    return ctx.calls("Architecture.load", arch_module.Architecture.load, path), reference, path


def m_architecture_member(model: nn.Module, ctx: Context) -> Outcome:
    arch, reference, _ = _exported(model, ctx)
    fresh = ctx.fresh()
    before = param_count(fresh)
    report = ctx.calls(
        "apply_architecture(by=member)",
        arch_module.apply_architecture,
        fresh,
        ctx.example,
        arch,
        by="member",
        progress=False,
        watch=(fresh,),
    )
    if param_count(fresh) != param_count(reference):
        raise Problem(
            f"apply_architecture by member gave {param_count(fresh):,} parameters, the plan "
            f"{param_count(reference):,}"
        )
    return _structural(fresh, report, before)


def m_architecture_role(model: nn.Module, ctx: Context) -> Outcome:
    arch, reference, _ = _exported(model, ctx)
    target = built(ctx.spec.sibling) if ctx.spec.sibling else ctx.fresh()
    before = param_count(target)
    with torch.no_grad():
        shape = tuple(forward(target, ctx.example).shape)
    report = ctx.calls(
        "apply_architecture(by=role)",
        arch_module.apply_architecture,
        target,
        ctx.example,
        arch,
        by="role",
        progress=False,
        watch=(target,),
    )
    outcome = _structural(target, report, before)
    outcome.output_shape = shape
    where = "on sibling" if ctx.spec.sibling else "on same model"
    if ctx.spec.sibling is None and param_count(target) != param_count(reference):
        # A role's fraction is rounded per group, so groups of one role may differ by a unit.
        where += (
            f" ({param_count(target):,} parameters, the plan {param_count(reference):,}: "
            "per-group rounding of the role's fraction)"
        )
    outcome.notes.insert(0, where)
    return outcome


def _with_importance(model: nn.Module, ctx: Context, label: str, importance: Any, **kw) -> Outcome:
    before = param_count(model)
    optimizer = ctx.train(model)
    report = ctx.calls(
        f"prune(importance={label})",
        depprune.prune,
        model,
        ctx.example,
        ratio=RATIO,
        importance=importance,
        optimizers=[optimizer],
        progress=False,
        watch=(model,),
        **kw,
    )
    return _structural(model, report, before, optimizer)


def m_lamp(model: nn.Module, ctx: Context) -> Outcome:
    return _with_importance(model, ctx, "lamp", lamp(), global_ranking=True)


def m_fpgm(model: nn.Module, ctx: Context) -> Outcome:
    return _with_importance(model, ctx, "fpgm", fpgm())


def m_hessian(model: nn.Module, ctx: Context) -> Outcome:
    score = ctx.calls(
        "hessian",
        hessian,
        model,
        ctx.loss,
        ctx.batches,
        progress=False,
        watch=(model,),
        unchanged=True,
    )
    return _with_importance(model, ctx, "hessian", score)


def m_taylor_elementwise(model: nn.Module, ctx: Context) -> Outcome:
    before = param_count(model)
    optimizer = ctx.train(model)
    model.zero_grad()
    ctx.loss(model, ctx.batches[0]).backward()
    report = ctx.calls(
        "prune(importance=taylor_elementwise)",
        depprune.prune,
        model,
        ctx.example,
        ratio=RATIO,
        importance=taylor_elementwise,
        optimizers=[optimizer],
        progress=False,
        watch=(model,),
    )
    return _structural(model, report, before, optimizer)


def _reconstruction(module_name: str) -> Callable[[nn.Module, Context], Outcome] | str:
    """The method of a reconstruction module, or why it is unavailable."""
    try:
        module = importlib.import_module(f"depprune.methods.{module_name}")
    except Exception as exc:
        return f"does not import: {type(exc).__name__}: {exc}"
    if not callable(getattr(module, "prune", None)):
        return "has no prune"

    def run(model: nn.Module, ctx: Context) -> Outcome:
        before = param_count(model)
        optimizer = ctx.train(model)
        report = ctx.calls(
            f"{module_name}.prune",
            module.prune,
            model,
            ctx.example,
            ctx.calibration,
            ratio=RATIO,
            optimizers=[optimizer],
            progress=False,
            watch=(model,),
        )
        return _structural(model, report, before, optimizer)

    return run


@dataclass
class MethodSpec:
    name: str
    run: Callable[[nn.Module, Context], Outcome] | str  # a str: why it is unavailable
    quick: bool = True
    #: Seconds per model (None: --timeout); the slow reconstruction methods get less.
    limit: float | None = None


def methods(reconstruction_limit: float = RECONSTRUCTION_LIMIT) -> list[MethodSpec]:
    def dg(grouping: str | None, sparsity: str) -> Callable[[nn.Module, Context], Outcome]:
        return lambda model, ctx: m_depgraph(model, ctx, grouping, sparsity)

    return [
        MethodSpec("l1_filter", m_l1_filter),
        MethodSpec("l1_filter-all", lambda m, c: m_l1_filter(m, c, False), quick=False),
        MethodSpec("slimming", m_slimming),
        MethodSpec("dg-full-learned", dg("full", "learned")),
        MethodSpec("dg-full-uniform", dg("full", "uniform"), quick=False),
        MethodSpec("dg-linear-learned", dg("linear", "learned"), quick=False),
        MethodSpec("dg-none-uniform", dg("none", "uniform")),
        MethodSpec("dg-noreg-learned", dg(None, "learned"), quick=False),
        MethodSpec("iterative", m_iterative),
        MethodSpec("sss", m_sss),
        MethodSpec("unstructured+scratch", m_unstructured_scratch),
        MethodSpec("unstructured+prune", m_unstructured_structural, quick=False),
        MethodSpec("prune+scratch", m_scratch),
        MethodSpec("scratch_from_plan", m_scratch_from_plan),
        MethodSpec("arch-member", m_architecture_member),
        MethodSpec("arch-role", m_architecture_role),
        MethodSpec("lamp", m_lamp),
        MethodSpec("fpgm", m_fpgm),
        MethodSpec("hessian", m_hessian),
        MethodSpec("taylor_elementwise", m_taylor_elementwise),
        MethodSpec("thinet", _reconstruction("thinet"), limit=reconstruction_limit),
        MethodSpec(
            "channel_regression", _reconstruction("channel_regression"), limit=reconstruction_limit
        ),
    ]


# -- running and checking ----------------------------------------------------------------


@dataclass
class Result:
    model: str
    method: str
    status: str
    seconds: float = 0.0
    #: Seconds inside depprune calls.
    call_seconds: float = 0.0
    params: str = ""
    message: str = ""
    #: For refusals: whether the message seems to name a fix.
    names_fix: bool | None = None
    traceback: str = ""
    notes: list[str] = field(default_factory=list)


#: Words a message that says how to fix the problem uses.
FIX_WORDS = re.compile(
    r"\b(use|pass|give|choose|set|name|call|make|build|load|attach|train|scale|keep|lower|"
    r"add|remove|move|trace|write|prune|report|check|try|raise|rename|register|install|apply|"
    r"wrap|export|define|ask)\b",
    re.IGNORECASE,
)


def names_fix(message: str) -> bool:
    """A rough test: after the problem (a ';', ':' or '(' part) comes an imperative verb."""
    tail = re.split(r"[;(]|: ", message, maxsplit=1)
    return len(tail) == 2 and bool(FIX_WORDS.search(tail[1]))


def _last_frames(tb: str, lines: int = 14) -> str:
    return "\n".join(tb.rstrip().splitlines()[-lines:])


def check_outcome(outcome: Outcome, ctx: Context) -> list[str]:
    """What is wrong with the result ([] when nothing)."""
    model = outcome.model
    problems = []
    model.eval()
    try:
        with torch.no_grad():
            out = forward(model, ctx.example)
    except Exception as exc:
        return [f"forward after the method fails: {type(exc).__name__}: {exc}"[:300]]
    expected = outcome.output_shape or ctx.output_shape
    if tuple(out.shape) != expected:
        problems.append(f"output shape {tuple(out.shape)}, was {expected}")
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        problems.append("output has NaN or inf")
    after = param_count(model)
    if outcome.claims_pruned and after >= outcome.params_before:
        problems.append(
            f"units removed but parameters {outcome.params_before:,} -> {after:,} did not go down"
        )
    if outcome.optimizer is not None:
        try:
            ctx.train(model, outcome.optimizer, steps=1)
        except Exception as exc:
            problems.append(
                f"a training step after the cut fails: {type(exc).__name__}: {exc}"[:300]
            )
    return problems


def run_one(spec: ModelSpec, method: MethodSpec, ctx: Context, limit: float) -> Result:
    result = Result(spec.name, method.name, "ok")
    if isinstance(method.run, str):
        result.status, result.message = "unavailable", method.run
        return result
    ctx.calls = Calls()
    model = ctx.fresh()
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        with time_limit(limit):
            outcome = method.run(model, ctx)
            problems = check_outcome(outcome, ctx)
        after = param_count(outcome.model)
        result.params = f"{after / outcome.params_before:.0%}" if outcome.params_before else "-"
        result.notes = outcome.notes
        if problems:
            result.status, result.message = "BROKEN", "; ".join(problems)
        elif outcome.structural and not outcome.claims_pruned:
            result.status = "nothing"
            result.message = "ran, but removed no unit: " + "; ".join(outcome.notes)
    except CallFailed as failed:
        error = failed.error
        result.message = f"{failed.label}: {type(error).__name__}: {error}"
        if isinstance(error, Timeout):
            result.status = "timeout"
        elif failed.changed:
            result.status = "CHANGED"
            result.message += f" [model changed: {'; '.join(failed.changed)}]"
            result.traceback = _last_frames(failed.tb)
        elif isinstance(error, DeppruneError) and not isinstance(error, InternalError):
            result.status = "refused"
            result.names_fix = names_fix(str(error))
        else:
            result.status = "BUG"
            result.traceback = _last_frames(failed.tb)
    except Problem as problem:
        result.status, result.message = "BROKEN", str(problem)
        result.traceback = _last_frames(traceback.format_exc(), 6)
    except Timeout as exc:
        result.status, result.message = "timeout", f"{exc} (limit {limit:g} s)"
    except Exception as exc:
        # Outside a depprune call: training or running the model a method left behind.
        after = ctx.calls.timings[-1][0] if ctx.calls.timings else None
        if after is None:
            result.status = "BUG"
            result.message = f"the sweep itself: {type(exc).__name__}: {exc}"
        else:
            result.status = "BROKEN"
            result.message = f"training after {after} fails: {type(exc).__name__}: {exc}"
        result.traceback = _last_frames(traceback.format_exc())
    result.seconds = time.perf_counter() - start
    result.call_seconds = sum(s for _, s in ctx.calls.timings)
    result.notes = result.notes + [w[:160] for w in dict.fromkeys(ctx.calls.warned)][:3]
    result.message = result.message.replace("\n", " ")
    return result


def sweep(
    models: list[ModelSpec],
    chosen: list[MethodSpec],
    *,
    limit: float,
    steps: int,
    report: Callable[[Result], None],
) -> list[Result]:
    results = []
    for spec in models:
        try:
            pristine = built(spec.build)
            example, batches, calibration = make_inputs(spec)
            with torch.no_grad():
                shape = tuple(forward(pristine, example).shape)
        except Exception as exc:
            for method in chosen:
                result = Result(spec.name, method.name, "unavailable", message=f"build: {exc}")
                results.append(result)
                report(result)
            continue
        ctx = Context(spec, pristine, example, batches, calibration, shape, Calls(), steps)
        for method in chosen:
            result = run_one(spec, method, ctx, min(limit, method.limit or limit))
            results.append(result)
            report(result)
    return results


# -- output ----------------------------------------------------------------------------------


SHORT = {
    "ok": "ok",
    "refused": "refused",
    "BUG": "BUG",
    "BROKEN": "BROKEN",
    "CHANGED": "CHANGED",
    "timeout": "timeout",
    "nothing": "nothing",
    "unavailable": "n/a",
}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "machine": platform.machine()}
    for module in ("torch", "torchvision", "timm", "transformers", "numpy", "depprune"):
        try:
            found[module] = importlib.import_module(module).__version__
        except Exception:
            found[module] = "-"
    found["depprune from"] = str(Path(depprune.__file__).parent)
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
        found["depprune commit"] = commit + ("+dirty" if dirty else "")
    except Exception:
        found["depprune commit"] = "-"
    return found


def _cell(r: Result) -> str:
    text = SHORT[r.status]
    if r.status == "ok" and r.params:
        text += f" {r.params}"
    if r.status == "refused" and r.names_fix is False:
        text += " (no fix?)"
    return f"{text} {r.call_seconds:.1f}s" if r.status != "unavailable" else text


def matrix(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    """Rows of models, columns of methods: status, parameters kept, seconds in depprune."""
    models = list(dict.fromkeys(r.model for r in results))
    names = list(dict.fromkeys(r.method for r in results))
    cells = {(r.model, r.method): _cell(r) for r in results}
    rows = [[m, *(cells.get((m, n), "") for n in names)] for m in models]
    return ["model", *names], rows


def counts(results: list[Result]) -> str:
    found: dict[str, int] = {}
    for r in results:
        found[r.status] = found.get(r.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(found.items(), key=lambda kv: -kv[1]))


def per_model_seconds(results: list[Result]) -> dict[str, float]:
    found: dict[str, float] = {}
    for r in results:
        found[r.model] = found.get(r.model, 0.0) + r.seconds
    return found


def print_table(results: list[Result]) -> None:
    header, rows = matrix(results)
    # Transposed for a terminal: one row per method, one column per model.
    columns = [header[0]] + [row[0] for row in rows]
    lines = [[name, *(row[i + 1] for row in rows)] for i, name in enumerate(header[1:])]
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *lines, strict=True)]
    print("  ".join(str(c).ljust(w) for c, w in zip(["method", *columns[1:]], widths, strict=True)))
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
    print()
    for r in results:
        if r.status not in ("ok", "unavailable"):
            print(f"{r.status:<8} {r.model} / {r.method}: {r.message[:400]}")
    print(f"\n{counts(results)}")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(
    results: list[Result],
    info: dict[str, str],
    path: Path,
    total: float,
    argv: list[str],
    limit: float,
    reconstruction_limit: float,
) -> None:
    header, rows = matrix(results)
    lines = [
        "# Methods sweep",
        "",
        f"`python benches/methods_sweep.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        "Every method on a fresh copy of every model, ratio "
        f"{RATIO}, {IMAGE}x{IMAGE} images (32x32 for the tiny ViT), 8 tokens. Cells: status, "
        "parameters kept, seconds inside depprune calls. ok: ran, output runs with the same "
        "shape and finite values, parameters went down where units were removed, a training "
        "step after the cut runs. refused: a DeppruneError, model unchanged ('no fix?': the "
        "message seems not to say how to fix it). BUG: another exception. BROKEN: the result "
        "is wrong. CHANGED: an error left the model changed. nothing: ran but removed no unit.",
        "",
        f"Time limits: {limit:g} s per method run, {reconstruction_limit:g} s for ThiNet and "
        "LASSO. torchvision's vit_b_16 is replaced by its VisionTransformer class at 2 layers, "
        "hidden 32 (vit_tiny), to fit the time budget; arch-role applies the exported "
        "architecture to a deeper or wider sibling where one is listed (resnet18 -> resnet34, "
        "vgg11_bn -> vgg13_bn, mobilenet_v2 -> width 1.25, efficientnet_b0 -> b1, regnet_x_400mf "
        "-> 800mf, shufflenet x0.5 -> x1.0, convnext_atto -> femto, 2 -> 3 layers for ViT and the "
        "Hugging Face models), else to the same model.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows),
        "",
        f"Totals: {counts(results)}.",
        "",
        "Wall seconds per model (all methods, training and checks included): "
        + ", ".join(f"{m} {s:.0f}" for m, s in per_model_seconds(results).items())
        + ".",
        "",
    ]
    problems = [
        r for r in results if r.status in ("BUG", "BROKEN", "CHANGED", "timeout", "nothing")
    ]
    if problems:
        lines += ["## Failures", ""]
        for r in problems:
            lines += [f"### {r.status}: {r.model} / {r.method}", "", _md_escape(r.message), ""]
            if r.traceback:
                lines += ["```", r.traceback, "```", ""]
    refusals = [r for r in results if r.status == "refused"]
    if refusals:
        lines += [
            "## Refusals",
            "",
            "| model | method | names a fix | message |",
            "|---|---|---|---|",
        ]
        for r in refusals:
            fix = "yes" if r.names_fix else "no?"
            lines.append(f"| {r.model} | {r.method} | {fix} | {_md_escape(r.message[:500])} |")
        lines.append("")
    noted = [r for r in results if r.notes and r.status == "ok"]
    if noted:
        lines += ["## Notes on ok cells", "", "| model | method | notes |", "|---|---|---|"]
        for r in noted:
            lines.append(f"| {r.model} | {r.method} | {_md_escape('; '.join(r.notes))[:400]} |")
        lines.append("")
    missing = [r for r in results if r.status == "unavailable"]
    for message in dict.fromkeys(f"{r.method}: {r.message}" for r in missing):
        lines.append(f"- unavailable: {_md_escape(message)}")
    lines += [
        "",
        f"{total:.0f} s; "
        + ", ".join(f"{k} {v}" for k, v in info.items())
        + f", {os.cpu_count()} cores, 1 torch thread.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _select(items: list[Any], wanted: str | None, what: str) -> list[Any]:
    """The items named in ``wanted`` (comma-separated): a name matches itself exactly, or
    else every item whose name contains it (``dg`` for every DepGraph variant)."""
    if not wanted:
        return items
    names = {i.name for i in items}
    chosen: set[str] = set()
    for part in (w.strip() for w in wanted.split(",")):
        if part:
            chosen |= {part} if part in names else {n for n in names if part in n}
    if not chosen:
        raise SystemExit(f"no {what} matches {wanted!r}; known: {', '.join(sorted(names))}")
    return [i for i in items if i.name in chosen]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (or parts of names)")
    parser.add_argument("--methods", help="comma-separated names (or parts of names)")
    parser.add_argument("--quick", action="store_true", help="4 models, the main variants")
    parser.add_argument("--steps", type=int, default=2, help="training steps where a method trains")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per method run")
    parser.add_argument(
        "--reconstruction-timeout",
        type=float,
        default=RECONSTRUCTION_LIMIT,
        help="seconds per ThiNet or LASSO run",
    )
    parser.add_argument("--out", type=Path, help="markdown path (default: written unfiltered)")
    parser.add_argument("--list", action="store_true", help="list models and methods")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    all_methods = methods(args.reconstruction_timeout)
    if args.list:
        print("models: ", ", ".join(m.name for m in MODELS))
        print("methods:", ", ".join(m.name for m in all_methods))
        return 0
    models = [m for m in MODELS if m.quick] if args.quick else MODELS
    chosen = [m for m in all_methods if m.quick] if args.quick else all_methods
    models = _select(models, args.models, "model")
    chosen = _select(chosen, args.methods, "method")

    def progress(r: Result) -> None:
        print(f"{r.model:<20} {r.method:<22} {_cell(r):<24} {r.message[:90]}", flush=True)

    start = time.perf_counter()
    results = sweep(models, chosen, limit=args.timeout, steps=args.steps, report=progress)
    total = time.perf_counter() - start
    print()
    print_table(results)
    out = args.out
    if out is None and not (args.models or args.methods or args.quick):
        out = RESULTS / "methods_sweep.md"
    if out is not None:
        write_markdown(
            results, versions(), out, total, argv, args.timeout, args.reconstruction_timeout
        )
        print(f"\nwrote {out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
