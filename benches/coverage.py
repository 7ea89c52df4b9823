"""Coverage sweep: prune every model we can build and say, per model, whether the result is exact.

Each model runs in a child process (one torch thread, a time limit) under two
settings, ``default`` (``prune(model, x, ratio=0.5)``) and ``heads+neurons``
(``kinds=("heads", "neurons")``), and gets one status:

- ``exact``: the forward pass runs with the same output shapes, the mask
  oracle holds on every removed group no norm spans (zeroing the removed
  units gives the output removing them gives), generate with the cache equals
  a greedy loop without it (causal LMs), and save_pretrained/from_pretrained
  gives the same logits (Hugging Face models with an Auto class);
- ``kept-whole-reported``: exact, and depprune reported groups it kept whole;
- ``refused``: a ``DeppruneError`` was raised and the model is bitwise unchanged;
- ``BROKEN``: the forward pass after prune fails or changes output shapes (or
  prune raised and left the model changed);
- ``WRONG``: the mask oracle fails;
- ``CACHE-MISMATCH``, ``RELOAD-MISMATCH``: generate or the reload differ, and
  depprune did not warn about it; ``reload-warned``: the reload differs and
  depprune warned that it would;
- ``error``: any other exception escaped (a bug: depprune raises only
  ``DeppruneError``), or the reference output is constant (the check could not fail);
- ``timeout``, ``unavailable`` (the installed library lacks the model),
  ``skipped`` (over ``--max-params``).

Zero-initialised weights (classifier heads of torchvision ViT, timm MLP-Mixer
and ResMLP, zero-init residual norms) are redrawn from a seeded normal first,
so no check compares zeros.

    python benches/coverage.py --suite all --jobs 1          # the full sweep (tens of minutes)
    python benches/coverage.py --quick                       # one model per rule family
    python benches/coverage.py --only llama --timeout 60     # names containing "llama"

Results: a table on stdout, ``benches/results/coverage.json`` and ``coverage.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"
# The mask oracle lives with the tests (one copy, shared).
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import TINY_DECODER  # noqa: E402  (the tests' tiny decoder: one copy)

SETTINGS: dict[str, tuple[str, ...] | None] = {
    "default": None,
    "heads+neurons": ("heads", "neurons"),
}
#: Statuses that are a depprune bug (or a bench bug, for ``error``).
FAILING = ("BROKEN", "WRONG", "error", "RELOAD-MISMATCH", "CACHE-MISMATCH")
GOOD = ("exact", "kept-whole-reported")


@dataclass
class Case:
    """One model of the sweep: ``build()`` returns ``(model, example_inputs)`` with random weights."""

    name: str
    suite: str  # torchvision | timm | hf
    family: str  # the rule family (for --quick and the summary)
    build: Callable[[], tuple[Any, Any]]
    #: Hugging Face Auto class name used for the reload check (None: no reload check).
    auto: str | None = None
    causal_lm: bool = False
    #: Output tolerance of the oracle, relative to the reference's largest magnitude.
    atol: float = 1e-4
    quick: bool = False
    #: Detection models: outputs may change length with tiny value changes (NMS).
    detection: bool = False


@dataclass
class Result:
    suite: str
    name: str
    family: str
    setting: str
    status: str
    reason: str = ""
    params_before: int = 0
    params_kept: float | None = None
    seconds: float | None = None
    kept_whole: list[str] = field(default_factory=list)
    oracle: str = ""
    notes: list[str] = field(default_factory=list)


# -- the per-model check ----------------------------------------------------------


def _seed(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)


def reinit_zero_weights(model, seed: int = 0) -> list[str]:
    """Redraw every all-zero non-bias parameter (zero-initialised heads, residual norms).

    Matrices get a seeded normal (std 0.02), vectors (norm scales, layer scales) ones plus a
    little noise. Returns the names redrawn.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    redrawn = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                not param.is_floating_point()
                or param.numel() <= 1
                or name.endswith("bias")
                or param.device.type == "meta"
                or bool(param.any())
            ):
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            value = noise * 0.02 if param.ndim >= 2 else 1.0 + 0.1 * noise
            param.copy_(value.to(param.dtype))
            redrawn.append(name)
    return redrawn


def _state(model) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise_equal(before: dict[str, Any], model) -> bool:
    import torch

    after = model.state_dict()
    if list(before) != list(after):
        return False
    for key, old in before.items():
        new = after[key]
        if old.shape != new.shape or old.dtype != new.dtype:
            return False
        try:
            same = torch.equal(
                old.contiguous().reshape(-1).view(torch.uint8),
                new.detach().contiguous().reshape(-1).view(torch.uint8),
            )
        except RuntimeError:
            same = torch.equal(old, new)
        if not same:
            return False
    return True


def _short(exc: BaseException, limit: int = 240) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    # Where it was raised: the last frame, so a reader knows which file to open.
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" [{Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""
    return (text[: limit - 3] + "...") if len(text) > limit else text + where


def _compare(expected, got, atol: float) -> str | None:
    """None when equal within tolerance (scaled by the reference's magnitude), else why not."""
    from pruning_oracle import assert_same_outputs

    scale = max(
        [1.0] + [float(t.abs().max()) for t in expected if t.is_floating_point() and t.numel()]
    )
    try:
        assert_same_outputs(expected, got, atol=atol * scale)
    except AssertionError as exc:
        return str(exc).strip().splitlines()[0][:200] + (
            " | " + " ".join(str(exc).split("\n")[2:4])[:160] if "\n" in str(exc) else ""
        )
    return None


def _removed_from_plan(graph, plan) -> dict[int, Any]:
    """The removed units of every group, read back from the plan's kept flat indices.

    Used until ``report.plan.removed`` exists: unit ``u`` is removed when none of a member's
    flat indices that belong to ``u`` is kept.
    """
    import numpy as np

    removed = {}
    for group in graph.groups:
        for key, unit_map in graph.unit_maps(group).items():
            if key not in plan.kept:
                continue
            units = np.unique(unit_map[unit_map >= 0])
            kept_units = np.unique(unit_map[plan.kept[key]])
            gone = np.setdiff1d(units, kept_units[kept_units >= 0]).astype(np.int64)
            if gone.size:
                removed[group.index] = gone
            break
    return removed


def _oracle_groups(graph, model, removed) -> tuple[dict[int, Any], int]:
    """The removed groups the mask oracle can check (no norm spans them), and how many not."""
    from pruning_oracle import norm_spanned_groups

    spanned = norm_spanned_groups(graph, model)
    if any(graph.groups[g].kind == "head_dim" for g in spanned):
        # Per-head q/k norms span q/k head_dim; v shares head_dim, so it cannot be checked either.
        spanned |= {g.index for g in graph.groups if g.kind == "head_dim"}
    free = {g: units for g, units in removed.items() if g not in spanned}
    return free, len(removed) - len(free)


def _greedy_without_cache(model, input_ids, steps: int):
    import torch

    ids = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1, :]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids


def _cache_mismatch(model, inputs) -> str | None:
    """None when generate (with its cache) equals a greedy loop without cache, else why not."""
    import torch

    input_ids = inputs["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
    steps = generated.shape[-1] - input_ids.shape[-1]  # fewer than 5 when EOS came first
    looped = _greedy_without_cache(model, input_ids, steps)
    if torch.equal(generated, looped):
        return None
    return (
        f"generate {generated[0, -steps:].tolist()} != no-cache loop {looped[0, -steps:].tolist()}"
    )


def _reload_mismatch(model, inputs, auto: str) -> str | None:
    import torch
    import transformers
    from pruning_oracle import outputs

    auto_class = getattr(transformers, auto)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp)
        reloaded = auto_class.from_pretrained(tmp).eval()
    if type(reloaded) is not type(model):
        return f"{auto} loaded {type(reloaded).__name__}, not {type(model).__name__}"
    expected, got = outputs(model, inputs), outputs(reloaded, inputs)
    if [t.shape for t in expected] != [t.shape for t in got]:
        return "reloaded output shapes differ"
    for e, g in zip(expected, got, strict=True):
        if e.is_floating_point() and not torch.allclose(g, e, atol=1e-5, rtol=1e-5):
            return f"reloaded logits differ by {float((g - e).abs().max()):.2e}"
    return None


def check(case: Case, setting: str = "default", *, max_params: int | None = None) -> Result:
    """Build ``case``, prune it with ``setting`` and run every check; never raises."""
    import torch

    import depprune
    from depprune.errors import DeppruneError

    result = Result(case.suite, case.name, case.family, setting, "error")
    try:
        _seed(0)
        built = case.build()
    except Exception as exc:  # the library lacks the model or its config is refused
        result.status, result.reason = "unavailable", _short(exc)
        return result
    model, inputs = built
    model = model.eval()
    result.params_before = sum(p.numel() for p in model.parameters())
    if max_params and result.params_before > max_params:
        result.status = "skipped"
        result.reason = f"{result.params_before / 1e6:.0f}M parameters > --max-params"
        return result
    redrawn = reinit_zero_weights(model)
    if redrawn:
        result.notes.append(f"redrew zero-initialised {', '.join(redrawn[:3])}")
    try:
        return _check_built(case, setting, model, inputs, result, torch, depprune, DeppruneError)
    except Exception as exc:  # a failure of a check itself, reported rather than lost
        result.status, result.reason = "error", "check failed: " + _short(exc)
        return result


def _split(inputs):
    from depprune.tracer import split_inputs

    return split_inputs(inputs)


def _check_built(case, setting, model, inputs, result, torch, depprune, DeppruneError) -> Result:
    from pruning_oracle import constant_outputs, outputs, zeroed_copy

    try:
        reference = outputs(model, inputs)
    except Exception as exc:
        result.reason = "the unpruned model's forward fails (a bench bug): " + _short(exc)
        return result
    constant = constant_outputs(reference)
    if case.detection and len(constant) < len(reference):
        # Random heads can give every detection the same score; the boxes still vary.
        if constant:
            result.notes.append(f"constant detection output(s) {constant} not compared")
    elif constant or not reference:
        result.reason = f"reference output(s) {constant} constant: the oracle could not fail"
        return result
    informative = [i for i in range(len(reference)) if i not in constant]
    cache_before = None
    if case.causal_lm:
        try:
            cache_before = _cache_mismatch(model, inputs)
        except Exception as exc:
            cache_before = "generate failed before pruning: " + _short(exc)
        if cache_before:
            result.notes.append(f"cache mismatch before pruning (not counted): {cache_before}")
    original = copy.deepcopy(model)
    before = _state(model)

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = depprune.prune(
                model, inputs, ratio=0.5, kinds=SETTINGS[setting], progress=False
            )
        except DeppruneError as exc:
            result.seconds = time.perf_counter() - start
            unchanged = _bitwise_equal(before, model)
            result.status = "refused" if unchanged else "BROKEN"
            result.reason = ("" if unchanged else "raised and left the model changed: ") + _short(
                exc
            )
            return result
        except Exception as exc:
            result.seconds = time.perf_counter() - start
            result.reason = _short(exc)
            if not _bitwise_equal(before, model):
                result.reason += " (and the model was left changed)"
            return result
    result.seconds = time.perf_counter() - start
    said = [
        str(w.message).replace("\n", " ")
        for w in caught
        if "depprune" in w.filename or "config" in str(w.message)
    ]
    result.notes += [f"warned: {m[:160]}" for m in said[:2]]
    result.params_kept = report.params_after / max(report.params_before, 1)
    result.kept_whole = [str(k)[:200] for k in list(getattr(report, "kept_whole", []) or [])[:3]]

    try:
        pruned_out = outputs(model, inputs)
    except Exception as exc:
        result.status, result.reason = "BROKEN", "forward after prune: " + _short(exc)
        return result
    if case.detection and len(pruned_out) == len(reference):
        # Detections after NMS follow the values: the oracle's zeroed copy is the reference.
        pass
    elif [t.shape for t in pruned_out] != [t.shape for t in reference]:
        result.status = "BROKEN"
        result.reason = f"output shapes {[tuple(t.shape) for t in pruned_out]} != {[tuple(t.shape) for t in reference]}"
        if case.detection:
            result.reason += " (detections after NMS; may be value-driven)"
        return result

    # The mask oracle on the removed groups no norm spans.
    graph = getattr(report, "graph", None) or depprune.trace(original, inputs)
    removed = getattr(report.plan, "removed", None)
    if removed is None:
        removed = _removed_from_plan(graph, report.plan)
    if not removed:
        result.notes.append("nothing was removed")
    free, spanned = _oracle_groups(graph, original, removed)
    if free and case.detection:
        # After NMS, detections follow tiny value differences (which boxes pass, in which
        # order): compare the backbone's feature maps, where the pruned channels live.
        images = original.transform(*_split(inputs)[0])[0].tensors
        inside = {
            g: u
            for g, u in free.items()
            if all(name.startswith("backbone.") for name, _ in graph.groups[g].members)
        }
        zeroed = zeroed_copy(original, graph, free)
        result.oracle = (
            f"{len(inside)}/{len(removed)} removed groups (those inside the backbone, on its "
            "features; detections after NMS are value-driven)"
        )
        expected, got = outputs(zeroed.backbone, images), outputs(model.backbone, images)

        def live(t):
            # Pruned output channels (an FPN's) are exactly zero in the zeroed copy, and so
            # are dead ReLU channels in both: compare the channels that are not, in order.
            return t[:, t.abs().amax(dim=(0, *range(2, t.dim()))) > 0] if t.dim() > 1 else t

        pairs = [
            (live(e), live(g)) if e.shape != g.shape else (e, g)
            for e, g in zip(expected, got, strict=True)
        ]
        why = _compare([e for e, _ in pairs], [g for _, g in pairs], case.atol)
        if why:
            result.status, result.reason = "WRONG", "mask oracle (backbone): " + why
            return result
        free = {}
    if free:
        expected = outputs(zeroed_copy(original, graph, free), inputs)
        if spanned:
            # Only the norm-free groups: apply them alone to a fresh copy.
            # The raw cut, as tests/test_models.py does: this subset is not what prune proved.
            from depprune.apply import apply_kept_indices

            subject = copy.deepcopy(original)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    apply_kept_indices(subject, graph.kept_indices(free))
                got = outputs(subject, inputs)
            except Exception as exc:
                result.oracle = (
                    f"not run: the norm-free part of the plan alone fails ({_short(exc, 120)})"
                )
                got = None
        else:
            got = pruned_out
        if got is not None:
            result.oracle = f"{len(free)}/{len(removed)} removed groups"
            why = _compare(
                [expected[i] for i in informative], [got[i] for i in informative], case.atol
            )
            if why:
                result.status, result.reason = "WRONG", "mask oracle: " + why
                return result
    else:
        result.oracle = f"0/{len(removed)} (all removed groups norm-spanned)" if removed else "-"

    if case.causal_lm and not cache_before:
        try:
            why = _cache_mismatch(model, inputs)
        except Exception as exc:
            why = "generate failed: " + _short(exc)
        if why:
            result.status, result.reason = "CACHE-MISMATCH", why
            return result

    if case.auto:
        try:
            why = _reload_mismatch(model, inputs, case.auto)
        except Exception as exc:
            why = "save/reload failed: " + _short(exc)
        if why:
            baseline = None
            with contextlib.suppress(Exception):
                baseline = _reload_mismatch(copy.deepcopy(original), inputs, case.auto)
            if baseline is not None or (not hasattr(original, "save_pretrained")):
                result.notes.append(f"reload differs before pruning too (not counted): {why}")
            elif any("differ" in m or "left unchanged" in m or "could not" in m for m in said):
                result.status, result.reason = "reload-warned", why
                return result
            else:
                result.status, result.reason = "RELOAD-MISMATCH", why
                return result

    result.status = "kept-whole-reported" if result.kept_whole else "exact"
    return result


# -- the models -------------------------------------------------------------------


def _image(size: int, batch: int = 1):
    import torch

    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _tokens(vocab: int = 100, length: int = 7):
    import torch

    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(2))


#: torchvision classification models that need their own image size or arguments.
TV_SIZE = {"inception_v3": 299}
TV_KWARGS = {
    "inception_v3": dict(aux_logits=False, init_weights=True),
    "googlenet": dict(aux_logits=False, init_weights=True),
}
TV_QUICK = {"resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5", "vit_b_16"}


def _tv_family(name: str) -> str:
    for prefix in (
        "vit",
        "swin",
        "maxvit",
        "convnext",
        "regnet",
        "efficientnet",
        "mobilenet",
        "shufflenet",
    ):
        if name.startswith(prefix):
            return prefix
    return "cnn"


def torchvision_cases() -> list[Case]:
    try:
        import torchvision.models as tv
    except ImportError:
        return []
    cases = []
    for name in tv.list_models(module=tv):
        fixed = name.startswith(("vit", "swin", "maxvit"))
        size = TV_SIZE.get(name, 224 if fixed else 64)

        def build(name=name, size=size):
            model = tv.get_model(name, weights=None, num_classes=10, **TV_KWARGS.get(name, {}))
            return model, _image(size)

        cases.append(
            Case(name, "torchvision", _tv_family(name), build, atol=1e-3, quick=name in TV_QUICK)
        )
    for name in tv.list_models(module=tv.segmentation):

        def build(name=name):
            model = tv.get_model(name, weights=None, weights_backbone=None, num_classes=5)
            return model, _image(64)

        cases.append(Case(name, "torchvision", "segmentation", build, atol=1e-3))
    for name in tv.list_models(module=tv.detection):

        def build(name=name):
            kwargs = dict(weights=None, weights_backbone=None, num_classes=5)
            if "rcnn" in name or name in (
                "retinanet_resnet50_fpn",
                "retinanet_resnet50_fpn_v2",
                "fcos_resnet50_fpn",
            ):
                kwargs.update(min_size=128, max_size=128)
            if "keypoint" in name:
                kwargs["num_classes"] = 2
            model = tv.get_model(name, **kwargs)
            return model, ([_image(128)[0]],)

        cases.append(Case(name, "torchvision", "detection", build, atol=1e-3, detection=True))
    return cases


#: timm: one small model per family (name -> family).
TIMM = {
    "resnet18": "resnet",
    "efficientnet_b0": "efficientnet",
    "mobilenetv3_small_050": "mobilenetv3",
    "mobilenetv4_conv_small": "mobilenetv4",
    "ghostnet_050": "ghostnet",
    "regnetx_002": "regnet",
    "convnext_atto": "convnext",
    "vit_tiny_patch16_224": "vit",
    "deit_tiny_patch16_224": "deit",
    "swin_tiny_patch4_window7_224": "swin",
    "maxvit_pico_rw_256": "maxvit",
    "mobilevit_xxs": "mobilevit",
    "levit_128s": "levit",
    "poolformer_s12": "poolformer",
    "mixer_s16_224": "mixer",
    "efficientformer_l1": "efficientformer",
    "fastvit_t8": "fastvit",
    "coatnet_nano_rw_224": "coatnet",
    "xcit_nano_12_p16_224": "xcit",
    "nf_resnet26": "nfnet",
    "repvgg_a0": "repvgg",
    "hrnet_w18_small": "hrnet",
    "dla46_c": "dla",
    "dpn68": "dpn",
    "inception_v3": "inception",
    "resmlp_12_224": "resmlp",
    "cait_xxs24_224": "cait",
    "pit_ti_224": "pit",
    "twins_pcpvt_small": "twins",
    "edgenext_xx_small": "edgenext",
    "densenet121": "densenet",
    "rexnet_100": "rexnet",
    "efficientvit_b0": "efficientvit",
    "crossvit_tiny_240": "crossvit",
    "gcvit_xxtiny": "gcvit",
    "hgnetv2_b0": "hgnet",
    "ese_vovnet19b_slim": "vovnet",
    "res2net50_14w_8s": "res2net",
    "resnest14d": "resnest",
    "mobileone_s0": "mobileone",
    "convit_tiny": "convit",
    "pvt_v2_b0": "pvt",
    "tiny_vit_5m_224": "tinyvit",
    "efficientformerv2_s0": "efficientformerv2",
    "repvit_m0_9": "repvit",
    "eva02_tiny_patch14_224": "eva",
    "mambaout_femto": "mambaout",
    "starnet_s1": "starnet",
    "sequencer2d_s": "sequencer (LSTM)",
}
TIMM_QUICK = {"vit_tiny_patch16_224", "convnext_atto"}


def timm_cases() -> list[Case]:
    try:
        import timm
    except ImportError:
        return []
    available = set(timm.list_models())
    cases = []
    for name, family in TIMM.items():

        def build(name=name):
            if name not in available:
                raise LookupError(f"timm {timm.__version__} has no {name}")
            model = timm.create_model(name, pretrained=False, num_classes=10)
            return model, _image(model.pretrained_cfg["input_size"][-1])

        cases.append(
            Case(f"timm/{name}", "timm", family, build, atol=1e-3, quick=name in TIMM_QUICK)
        )
    return cases


DECODER = TINY_DECODER
#: The same decoder with one KV head per query head (families without GQA).
MHA_DECODER = {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}
MOE = dict(DECODER, num_experts_per_tok=2)
VISION_TRANSFORMER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    num_labels=10,
)

#: name -> (model class, config class, config fields, family, input kind, auto class).
HF: dict[str, tuple[str, str, dict, str, str, str | None]] = {
    "Llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        DECODER,
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Mistral": (
        "MistralForCausalLM",
        "MistralConfig",
        DECODER,
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Qwen2": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        DECODER,
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Phi-3": (
        "Phi3ForCausalLM",
        "Phi3Config",
        dict(DECODER, pad_token_id=0),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Gemma": (
        "GemmaForCausalLM",
        "GemmaConfig",
        dict(DECODER, head_dim=8),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Gemma3-text": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(DECODER, head_dim=8, sliding_window=4),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Granite": (
        "GraniteForCausalLM",
        "GraniteConfig",
        DECODER,
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "SmolLM3": (
        "SmolLM3ForCausalLM",
        "SmolLM3Config",
        dict(DECODER, pad_token_id=0),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Ernie4.5": (
        "Ernie4_5ForCausalLM",
        "Ernie4_5Config",
        dict(DECODER, head_dim=8),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "HunYuan-dense": (
        "HunYuanDenseV1ForCausalLM",
        "HunYuanDenseV1Config",
        dict(DECODER, head_dim=8),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(MOE, intermediate_size=16, num_local_experts=4),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Qwen2-MoE": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            MOE,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
        ),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Qwen3-MoE": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(MOE, moe_intermediate_size=32, num_experts=4, head_dim=8),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Phi-MoE": (
        "PhimoeForCausalLM",
        "PhimoeConfig",
        dict(MOE, num_local_experts=4),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "DeepSeek-V3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            MOE,
            num_key_value_heads=4,  # MLA: one key/value per query head
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
        ),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Llama4-text": (
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        dict(MOE, intermediate_size_mlp=64, num_local_experts=2, num_experts_per_tok=1, head_dim=8),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "gpt-oss": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(
            MOE,
            num_local_experts=4,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "DBRX": (
        "DbrxForCausalLM",
        "DbrxConfig",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            vocab_size=100,
            attn_config={"kv_n_heads": 2},
            ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
        ),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Ernie4.5-MoE": (
        "Ernie4_5_MoeForCausalLM",
        "Ernie4_5_MoeConfig",
        dict(
            MOE,
            moe_intermediate_size=16,
            moe_num_experts=4,
            moe_k=2,
            moe_num_shared_experts=1,
            head_dim=8,
        ),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "HunYuan-MoE": (
        "HunYuanMoEV1ForCausalLM",
        "HunYuanMoEV1Config",
        dict(MOE, num_experts=4, moe_topk=2, head_dim=8),
        "moe",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Gemma3n-text": (
        "Gemma3nForCausalLM",
        "Gemma3nTextConfig",
        dict(
            DECODER,
            head_dim=8,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=100,
            laurel_rank=4,
            altup_num_inputs=2,
            num_kv_shared_layers=0,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            activation_sparsity_pattern=[0.0, 0.0],
            intermediate_size=[64, 64],
        ),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Falcon-new": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        ),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Falcon-old": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
        ),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Bloom": (
        "BloomForCausalLM",
        "BloomConfig",
        dict(vocab_size=100, hidden_size=32, n_layer=2, n_head=4),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "GPT-NeoX": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        MHA_DECODER,
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "GPT-J": (
        "GPTJForCausalLM",
        "GPTJConfig",
        dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "GPT-2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "OPT": (
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=100,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "StableLM": (
        "StableLmForCausalLM",
        "StableLmConfig",
        dict(DECODER, partial_rotary_factor=0.25),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Cohere": (
        "CohereForCausalLM",
        "CohereConfig",
        dict(DECODER),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "OLMo2": (
        "Olmo2ForCausalLM",
        "Olmo2Config",
        dict(DECODER),
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Phi-2": (
        "PhiForCausalLM",
        "PhiConfig",
        MHA_DECODER,
        "decoder",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Mamba": (
        "MambaForCausalLM",
        "MambaConfig",
        dict(
            vocab_size=100,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
        ),
        "ssm",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "Jamba": (
        "JambaForCausalLM",
        "JambaConfig",
        dict(
            MOE,
            num_experts=4,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
        ),
        "ssm",
        "tokens",
        "AutoModelForCausalLM",
    ),
    "T5": (
        "T5ForConditionalGeneration",
        "T5Config",
        dict(
            vocab_size=100,
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        "encoder-decoder",
        "seq2seq",
        "AutoModelForSeq2SeqLM",
    ),
    "BART": (
        "BartForConditionalGeneration",
        "BartConfig",
        dict(
            vocab_size=100,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        ),
        "encoder-decoder",
        "seq2seq",
        "AutoModelForSeq2SeqLM",
    ),
    "MarianMT": (
        "MarianMTModel",
        "MarianConfig",
        dict(
            vocab_size=100,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=0,
            decoder_start_token_id=0,
        ),
        "encoder-decoder",
        "seq2seq",
        "AutoModelForSeq2SeqLM",
    ),
    "BERT": (
        "BertModel",
        "BertConfig",
        MHA_DECODER,
        "encoder",
        "tokens",
        "AutoModel",
    ),
    "CLIP-text": (
        "CLIPTextModel",
        "CLIPTextConfig",
        MHA_DECODER,
        "encoder",
        "tokens",
        "AutoModel",
    ),
    "CLIP-vision": (
        "CLIPVisionModel",
        "CLIPVisionConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        "vision-transformer",
        "image32",
        "AutoModel",
    ),
    "ViT": (
        "ViTForImageClassification",
        "ViTConfig",
        VISION_TRANSFORMER,
        "vision-transformer",
        "image32",
        "AutoModelForImageClassification",
    ),
    "DeiT": (
        "DeiTForImageClassification",
        "DeiTConfig",
        VISION_TRANSFORMER,
        "vision-transformer",
        "image32",
        "AutoModelForImageClassification",
    ),
    "Swin": (
        "SwinForImageClassification",
        "SwinConfig",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            window_size=4,
            num_labels=10,
        ),
        "vision-transformer",
        "image32",
        "AutoModelForImageClassification",
    ),
    "wav2vec2": (
        "Wav2Vec2Model",
        "Wav2Vec2Config",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
        "audio",
        "audio",
        "AutoModel",
    ),
}
HF_QUICK = {"Llama", "OPT", "Mixtral", "T5"}


def hf_cases() -> list[Case]:
    try:
        import transformers
    except ImportError:
        return []
    cases = []
    for name, (model_class, config_class, fields, family, kind, auto) in HF.items():

        def build(model_class=model_class, config_class=config_class, fields=fields, kind=kind):
            import torch

            if not hasattr(transformers, model_class) or not hasattr(transformers, config_class):
                raise LookupError(f"transformers {transformers.__version__} has no {model_class}")
            config = getattr(transformers, config_class)(**copy.deepcopy(fields))
            model = getattr(transformers, model_class)(config)
            if kind == "tokens":
                return model, {"input_ids": _tokens()}
            if kind == "seq2seq":
                return model, {"input_ids": _tokens(), "decoder_input_ids": _tokens(length=5)}
            if kind == "image32":
                return model, {"pixel_values": _image(32)}
            audio = torch.randn(1, 1600, generator=torch.Generator().manual_seed(3))
            return model, {"input_values": audio}

        causal = auto == "AutoModelForCausalLM"
        cases.append(
            Case(
                f"hf/{name}",
                "hf",
                family,
                build,
                auto=auto,
                causal_lm=causal,
                quick=name in HF_QUICK,
            )
        )
    return cases


def all_cases() -> list[Case]:
    return torchvision_cases() + timm_cases() + hf_cases()


# -- children and the sweep -------------------------------------------------------


def quiet() -> None:
    """No progress bars or info logs from transformers' save/load in the sweep's output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def _worker(connection) -> None:
    """A child process: one torch thread; checks the cases it is sent, one at a time."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet()
    cases = {case.name: case for case in all_cases()}
    while True:
        message = connection.recv()
        if message is None:
            return
        name, settings, max_params = message
        for setting in settings:
            connection.send(check(cases[name], setting, max_params=max_params).__dict__)


class _Child:
    def __init__(self, context) -> None:
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker, args=(child_end,), daemon=True)
        self.process.start()
        child_end.close()
        self.warm = False  # True once it has sent a result (its imports are done)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def sweep(
    cases: list[Case], *, timeout: float, jobs: int, max_params: int, progress: Callable
) -> list[Result]:
    """Check every case in child processes; a case past ``timeout`` seconds is killed."""
    context = multiprocessing.get_context("spawn")
    settings = list(SETTINGS)
    pending = list(cases)
    children: list[_Child | None] = [None] * max(1, jobs)
    running: dict[int, tuple[Case, float, list[Result]]] = {}
    results: list[Result] = []
    # A child imports torch and friends once and then serves many cases; the clock of a
    # case starts when it is sent, and a fresh child's start-up is not counted against it.
    while pending or running:
        for slot in range(len(children)):
            if slot in running or not pending:
                continue
            if children[slot] is None or not children[slot].process.is_alive():
                children[slot] = _Child(context)
            case = pending.pop(0)
            children[slot].connection.send((case.name, settings, max_params))
            running[slot] = (case, time.monotonic(), [])
        for slot, (case, started, done) in list(running.items()):
            child = children[slot]
            deadline = started + timeout + (0 if child.warm else 60)
            try:
                while child.connection.poll(0.2):
                    done.append(Result(**child.connection.recv()))
                    progress(done[-1])
                    child.warm = True
            except (EOFError, OSError):
                pass
            if len(done) == len(settings):
                results += done
                del running[slot]
                continue
            crashed = not child.process.is_alive()
            if crashed or time.monotonic() > deadline:
                child.process.kill()
                child.process.join()
                children[slot] = None
                for setting in settings[len(done) :]:
                    status = "error" if crashed else "timeout"
                    reason = (
                        f"the child process died (exit code {child.process.exitcode})"
                        if crashed
                        else f"over {timeout:.0f} s"
                    )
                    done.append(Result(case.suite, case.name, case.family, setting, status, reason))
                    progress(done[-1])
                results += done
                del running[slot]
    for child in children:
        if child is not None:
            child.stop()
    return results


def versions() -> dict[str, str]:
    found = {
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    for module in ("torch", "torchvision", "timm", "transformers", "depprune"):
        try:
            found[module] = __import__(module).__version__
        except Exception:
            found[module] = "-"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        found["depprune commit"] = commit + ("+dirty" if dirty else "")
    except Exception:
        found["depprune commit"] = "-"
    return found


def totals(results: list[Result]) -> str:
    """One line per suite: models exact in every setting, and the count of each other status."""
    lines = []
    for suite in ("torchvision", "timm", "hf"):
        rows = [r for r in results if r.suite == suite]
        if not rows:
            continue
        names = sorted({r.name for r in rows})
        exact = sum(all(r.status in GOOD for r in rows if r.name == n) for n in names)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"{suite}: {exact}/{len(names)} exact in both settings ({len(rows)} runs: {detail})"
        )
    return "\n".join(lines)


def _row(r: Result) -> list[str]:
    kept = f"{r.params_kept:.0%}" if r.params_kept is not None else "-"
    seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
    why = r.reason or "; ".join(r.kept_whole) or "; ".join(r.notes)
    return [r.name, r.setting, r.status, kept, seconds, r.oracle, why[:160]]


HEADER = [
    "model",
    "setting",
    "status",
    "params kept",
    "prune s",
    "oracle on",
    "why / kept whole / notes",
]


def print_table(results: list[Result]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in results:
            print(" | ".join(_row(r)))
        return
    table = Table(*HEADER, show_lines=False)
    style = {s: "green" for s in GOOD} | {s: "bold red" for s in FAILING} | {"refused": "yellow"}
    for r in results:
        row = _row(r)
        row[2] = f"[{style.get(r.status, 'white')}]{row[2]}[/]"
        table.add_row(*row)
    Console(width=220).print(table)


def write_markdown(results: list[Result], info: dict[str, str], path: Path) -> None:
    lines = [
        "# depprune coverage",
        "",
        " ".join(f"{k} {v}," for k, v in info.items()).rstrip(","),
        "",
        "```",
        totals(results),
        "```",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for r in results:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _row(r)) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", help="models whose name contains this (case-insensitive; a,b,c for several)"
    )
    parser.add_argument("--suite", choices=("torchvision", "timm", "hf", "all"), default="all")
    parser.add_argument(
        "--quick", action="store_true", help="one model per rule family (~10 models)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per model, both settings"
    )
    parser.add_argument("--jobs", type=int, default=1, help="child processes at a time")
    parser.add_argument(
        "--max-params", type=float, default=200e6, help="skip models larger than this"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for coverage.json and .md"
    )
    args = parser.parse_args(argv)

    info = versions()
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    cases = all_cases()
    if args.suite != "all":
        cases = [c for c in cases if c.suite == args.suite]
    if args.quick:
        cases = [c for c in cases if c.quick]
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.name.lower() for w in wanted)]
    print(
        f"{len(cases)} models x {len(SETTINGS)} settings, timeout {args.timeout:.0f} s", flush=True
    )

    def progress(r: Result) -> None:
        print(f"  {r.name:<40} {r.setting:<14} {r.status:<20} {(r.reason or '')[:110]}", flush=True)

    start = time.perf_counter()
    results = sweep(
        cases,
        timeout=args.timeout,
        jobs=args.jobs,
        max_params=int(args.max_params),
        progress=progress,
    )
    order = {c.name: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: (order[r.name], list(SETTINGS).index(r.setting)))
    print_table(results)
    print(totals(results))
    print(f"{time.perf_counter() - start:.0f} s in all")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "versions": info,
        "totals": totals(results).splitlines(),
        "results": [r.__dict__ for r in results],
    }
    (args.out / "coverage.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_markdown(results, info, args.out / "coverage.md")
    print(f"wrote {args.out / 'coverage.json'} and {args.out / 'coverage.md'}")
    return 1 if any(r.status in FAILING for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
