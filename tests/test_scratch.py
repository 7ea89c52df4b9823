"""Scratch-E/B re-initialisation and budgets; non-structured magnitude pruning through torch masks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from pruning_oracle import assert_same_outputs, outputs
from tiny_models import TINY_DECODER, tokens
from torch import nn

import depprune
from depprune.apply import masked_tensors
from depprune.errors import MethodError, PlanMismatchError
from depprune.from_scratch import scratch, scratch_budget, scratch_from_plan
from depprune.methods import unstructured


def cnn() -> nn.Sequential:
    """conv-bn-relu twice, then a linear head (6x6 inputs)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter shifted by [2, 5) and running statistics set: no init gives these values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.rand(parameter.shape, generator=generator) * 3 + 2)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.fill_(3.0)
                module.running_var.fill_(7.0)
                module.num_batches_tracked.fill_(11)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


# --- scratch --------------------------------------------------------------------------------


def test_scratch_changes_every_parameter_and_keeps_the_pruned_architecture():
    model = perturbed(cnn())
    depprune.prune(model, images(), ratio=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    types = [type(m) for m in model.modules()]
    assert scratch(model, seed=0) is model
    assert [type(m) for m in model.modules()] == types
    for name, parameter in model.named_parameters():
        assert parameter.shape == before[name].shape, name
        assert bool((parameter != before[name]).all()), f"{name} kept some trained values"
    for bn in (model[1], model[4]):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert int(bn.num_batches_tracked) == 0
    # reset_parameters scales to the pruned fan-in: |w| <= 1 / sqrt(fan_in) for kaiming_uniform.
    for conv in (model[0], model[3], model[7]):
        fan_in = conv.weight[0].numel()
        assert float(conv.weight.detach().abs().max()) <= 1 / math.sqrt(fan_in) + 1e-6
    assert model(images()).shape == (2, 5)


def test_seed_reproduces_and_leaves_the_global_rng_untouched():
    a, b, c = (perturbed(cnn()) for _ in range(3))
    state = torch.get_rng_state()
    scratch(a, seed=3)
    scratch(b, seed=3)
    scratch(c, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.dim() > 1:  # BatchNorm's ones and zeros do not depend on the seed
            assert not torch.equal(pa, pc), name
    # Without a seed the global RNG draws, as a fresh build would.
    scratch(c)
    assert not torch.equal(torch.get_rng_state(), state)


def test_masks_are_kept_and_masked_weights_stay_zero():
    model = perturbed(cnn())
    unstructured.prune(model, 0.6)
    masks = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("_mask")}
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("_orig")}
    assert masks and originals
    scratch(model, seed=0)
    assert len(masked_tensors(model)) == len(masks)
    for name, mask in masks.items():
        assert torch.equal(dict(model.named_buffers())[name], mask), name
    for name, original in originals.items():
        module = model.get_submodule(name.rpartition(".")[0])
        fresh = module.weight_orig.detach()
        assert bool((fresh != original).all()), name
        effective = module.weight.detach()
        assert torch.equal(effective == 0, module.weight_mask == 0), name
        torch.testing.assert_close(effective, fresh * module.weight_mask)
    # The forward still runs through the masks: the same as with them folded in.
    folded = copy.deepcopy(model).eval()
    unstructured.make_permanent(folded)
    assert_same_outputs(outputs(folded, images()), outputs(model.eval(), images()))


def test_hugging_face_model_is_reinitialised_by_its_own_init():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_DECODER)
    torch.manual_seed(0)
    model = perturbed(LlamaForCausalLM(config))
    for parameter in model.parameters():
        parameter._is_hf_initialized = True  # as from_pretrained marks loaded weights
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    scratch(model, seed=0)
    for name, parameter in model.named_parameters():
        assert bool((parameter != before[name]).all()), name
        assert parameter._is_hf_initialized
    layer = model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.mlp.gate_proj, model.lm_head):
        # _init_weights: normal(0, initializer_range), not torch's kaiming (std ~0.1 here).
        assert abs(float(linear.weight.detach().std()) - config.initializer_range) < 0.004
    assert (
        abs(float(model.model.embed_tokens.weight.detach().std()) - config.initializer_range)
        < 0.004
    )
    for norm in (layer.input_layernorm, model.model.norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.isfinite(model(tokens(0)).logits).all()


class Gain(nn.Module):
    """A linear layer and a bare gain parameter that no reset_parameters covers."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.gain = nn.Parameter(torch.full((3,), 4.0))

    def forward(self, x):
        return self.linear(x) * self.gain


def test_a_bare_parameter_needs_an_init():
    model = nn.Sequential(Gain(), Gain())
    state = snapshot(model)
    with pytest.raises(MethodError, match=r"0 \(Gain: gain\); 1 \(Gain: gain\).*init="):
        scratch(model, seed=0)
    assert_same_state(model, state)

    calls = []

    def failing(module):
        calls.append(module)
        nn.init.zeros_(module.gain)
        if len(calls) == 2:
            raise RuntimeError("no init for this one")

    with pytest.raises(MethodError, match="init failed on module '1'"):
        scratch(model, seed=0, init=failing)
    assert_same_state(model, state)  # the first module's init is undone too

    scratch(model, seed=0, init=lambda module: nn.init.ones_(module.gain))
    assert torch.equal(model[0].gain, torch.ones(3)) and torch.equal(model[1].gain, torch.ones(3))
    assert not torch.equal(model[0].linear.weight, state["0.linear.weight"])


def test_scratch_rejects_bad_input_without_change():
    model = cnn()
    state = snapshot(model)
    with pytest.raises(MethodError, match="seed"):
        scratch(model, seed="0")
    with pytest.raises(MethodError, match="init"):
        scratch(model, init=3)
    with pytest.raises(MethodError, match=r"nn\.Module"):
        scratch([model])
    assert_same_state(model, state)
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    with pytest.raises(MethodError, match="meta"):
        scratch(meta)


def test_scratch_from_plan_takes_the_architecture_not_the_weights():
    trained = perturbed(cnn())
    plan = depprune.make_plan(trained, images(), ratio=0.5)
    expected = copy.deepcopy(trained)
    plan.apply(expected)
    fresh = cnn()
    assert scratch_from_plan(fresh, plan, seed=0) is fresh
    shapes = {name: p.shape for name, p in expected.named_parameters()}
    assert {name: p.shape for name, p in fresh.named_parameters()} == shapes
    for name, parameter in fresh.named_parameters():
        assert bool((parameter != dict(expected.named_parameters())[name]).all()), name
    assert fresh(images()).shape == (2, 5)

    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    state = snapshot(other)
    with pytest.raises(PlanMismatchError):
        scratch_from_plan(other, plan)
    assert_same_state(other, state)
    gained = nn.Sequential(Gain())
    state = snapshot(gained)
    with pytest.raises(MethodError, match="Gain"):
        scratch_from_plan(gained, plan)  # scratch's checks run before the cut
    assert_same_state(gained, state)
    with pytest.raises(MethodError, match=r"depprune\.Plan"):
        scratch_from_plan(cnn(), {"kept": {}})


# --- budgets ----------------------------------------------------------------------------------


def test_budget_arithmetic():
    assert scratch_budget(4e9, 1e9, 160, mode="E") == 160
    assert scratch_budget(None, None, 160, mode="E") == 160
    assert scratch_budget(4_000, 1_000, 160) == 640
    assert scratch_budget(3, 2, 5) == 7  # 7.5 rounded down: no more compute than the full model
    assert scratch_budget(1.0, 1 / 3, 3) == 9  # exact arithmetic, not 8.999...
    assert scratch_budget(100, 100, 90) == 90
    assert scratch_budget(4e9, 1e9, 90, cap=2) == 180  # the paper's ImageNet rule
    assert scratch_budget(3e9, 2e9, 90, cap=2) == 135  # under the cap: the same compute
    assert scratch_budget(4e9, 1e9, 5, cap=1.5) == 7


@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 1, 90, "C"), "mode"),
        ((4, 1, 0), "epochs"),
        ((4, 1, 2.5), "epochs"),
        ((4, 1, True), "epochs"),
        ((1, 4, 90), "more than macs_full"),
        ((None, 1, 90), "macs_full"),
        ((4, 0, 90), "macs_pruned"),
        ((4, float("nan"), 90), "macs_pruned"),
        ((4, 1, 90, "B", 0.5), "cap"),
        ((4, 1, 90, "B", float("inf")), "cap"),
    ],
)
def test_budget_bad_input(args, match):
    with pytest.raises(MethodError, match=match):
        scratch_budget(*args)


# --- non-structured magnitude pruning -------------------------------------------------------


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # larger weights: a global threshold spares them more
    return model


def effective(module: nn.Module) -> torch.Tensor:
    return (module.weight_orig * module.weight_mask).detach()


def test_global_and_layer_amounts_are_exact():
    model = two_layers()
    report = unstructured.prune(model, 0.5)
    assert (report.zeros, report.size) == (150, 300)
    weights = [model[i].weight_orig.detach().abs() for i in (0, 2)]
    masked = torch.cat([w[model[i].weight_mask == 0] for w, i in zip(weights, (0, 2), strict=True)])
    alive = torch.cat([w[model[i].weight_mask == 1] for w, i in zip(weights, (0, 2), strict=True)])
    assert float(masked.max()) <= float(alive.min())  # one threshold over both layers
    assert report["0.weight"].zeros > report["2.weight"].zeros
    assert "overall" in str(report) and "50.0%" in str(report)

    model = two_layers()
    report = unstructured.prune(model, 0.5, scope="layer")
    assert [layer.zeros for layer in report.layers] == [100, 50]
    for i in (0, 2):
        weight = model[i].weight_orig.detach().abs()
        assert float(weight[model[i].weight_mask == 0].max()) <= float(
            weight[model[i].weight_mask == 1].min()
        )

    model = two_layers()
    report = unstructured.prune(model, 0.3, modules=[model[2]])
    assert [layer.name for layer in report.layers] == ["2.weight"]
    assert report.zeros == 30 and not hasattr(model[0], "weight_mask")


def test_iterative_pruning_grows_the_masks():
    model = two_layers()
    unstructured.prune(model, 0.5)
    first = [model[i].weight_mask.clone() for i in (0, 2)]
    report = unstructured.prune(model, 0.8)
    assert report.zeros == 240
    for i, mask in zip((0, 2), first, strict=True):
        assert bool((model[i].weight_mask <= mask).all())  # masked weights stay masked
    state = snapshot(model)
    with pytest.raises(MethodError, match="already masked"):
        unstructured.prune(model, 0.5)
    with pytest.raises(MethodError, match="already"):
        unstructured.prune(model, 0.5, scope="layer")
    for bad, match in ((1.0, "amount"), ("0.5", "amount"), (True, "amount")):
        with pytest.raises(MethodError, match=match):
            unstructured.prune(model, bad)
    with pytest.raises(MethodError, match="scope"):
        unstructured.prune(model, 0.9, scope="net")
    with pytest.raises(MethodError, match="conv or linear"):
        unstructured.prune(model, 0.9, modules=[model[1]])
    assert_same_state(model, state)


def test_make_permanent_folds_the_masks_in():
    model = two_layers()
    unstructured.prune(model, 0.5)
    folded = [effective(model[i]) for i in (0, 2)]
    assert unstructured.make_permanent(model) == ["0.weight", "2.weight"]
    assert masked_tensors(model) == []
    for i, weight in zip((0, 2), folded, strict=True):
        assert isinstance(model[i].weight, nn.Parameter)
        assert not hasattr(model[i], "weight_orig") and not hasattr(model[i], "weight_mask")
        assert torch.equal(model[i].weight.detach(), weight)
    assert unstructured.sparsity(model).zeros == 150
    assert unstructured.make_permanent(model) == []


def test_structural_pruning_after_masking():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 4)
    )
    x = torch.randn(2, 3, 6, 6)
    unstructured.prune(model, 0.5)
    masks = {name: buf.clone() for name, buf in model.named_buffers()}
    with torch.no_grad():
        model(x)  # the masked product torch.nn.utils.prune caches is then a leaf deepcopy can copy
    original = copy.deepcopy(model)
    report = depprune.prune(model, x, ratio=0.5)
    assert report.plan.removed
    kept = report.plan.kept
    # The masks are cut like their weights: the same pattern on the kept weights.
    for name, mask in masks.items():
        index = [torch.arange(size) for size in mask.shape]
        for dim in range(mask.dim()):
            if (name, dim) in kept:
                index[dim] = torch.from_numpy(kept[(name, dim)])
        cut = mask[np.ix_(*index)]
        assert torch.equal(dict(model.named_buffers())[name], cut), name
    # Zeroing the removed units of the masked original gives the pruned model's output.
    twin = copy.deepcopy(original)
    parameters = dict(twin.named_parameters())
    with torch.no_grad():
        for index, units in report.plan.removed.items():
            for (name, dim), unit_map in report.graph.unit_maps(index).items():
                if name in parameters:
                    hit = np.flatnonzero(np.isin(unit_map, units))
                    parameters[name].index_fill_(dim, torch.from_numpy(hit), 0.0)
    assert_same_outputs(outputs(twin, x), outputs(model, x))
    sparsity = unstructured.sparsity(model)
    assert sparsity.zeros == sum(int((b == 0).sum()) for b in model.buffers())


def test_attention_out_projections_are_not_masked_and_training_goes_on():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    x = torch.randn(2, 5, 16)
    unstructured.prune(layer, amount=0.5)
    assert not hasattr(layer.self_attn.out_proj, "weight_mask")
    assert hasattr(layer.linear1, "weight_mask")
    for _ in range(2):  # a stale masked weight would fail the second backward
        layer(x).sum().backward()
