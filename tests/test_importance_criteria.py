"""LAMP, FPGM, the group Hessian and both Taylor forms, each against a direct computation.

Every expected score is written out per unit from slices gathered by hand
(the rows, columns and flattened positions a unit would remove), never from
depprune's unit maps, so a wrong map, a missed member or a buffer counted
would show.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import depprune
from depprune.importance import (
    ImportanceError,
    ScoreContext,
    fpgm,
    geometric_median,
    hessian,
    lamp,
    magnitude,
    score_groups,
    taylor,
    taylor_elementwise,
)
from depprune.selection import lowest


class MLP(nn.Module):
    """Linear-ReLU-Linear: one group of 8 hidden neurons."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def unit_slices(self, unit, of=lambda t: t):
        return [of(self.fc1.weight)[unit], of(self.fc1.bias)[unit], of(self.fc2.weight)[:, unit]]


class ConvNet(nn.Module):
    """Conv-BN-ReLU-Conv: one group of 6 channels, BatchNorm buffers among its members."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = (
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.Conv2d(6, 4, 3),
        )

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))

    def unit_slices(self, unit, of=lambda t: t):
        return [
            of(self.conv1.weight)[unit],
            of(self.conv1.bias)[unit],
            of(self.bn.weight)[unit],
            of(self.bn.bias)[unit],
            of(self.conv2.weight)[:, unit],
        ]


class FlattenNet(nn.Module):
    """A conv flattened into a linear: each of 4 channels owns 2 x 2 = 4 input columns."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Linear(16, 5),
        )

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

    def unit_slices(self, unit, of=lambda t: t):
        return [
            of(self.conv.weight)[unit],
            of(self.conv.bias)[unit],
            of(self.bn.weight)[unit],
            of(self.bn.bias)[unit],
            of(self.fc.weight)[:, 4 * unit : 4 * unit + 4],
        ]


#: (model class, input shape, units of its single group)
MODELS = [(MLP, (5, 6), 8), (ConvNet, (2, 3, 6, 6), 6), (FlattenNet, (2, 3, 2, 2), 4)]
MODEL_IDS = ["mlp", "conv-bn", "flatten"]


def build(cls, shape, seed=0):
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                # Non-trivial affine parameters and statistics, so none of them is neutral.
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(*shape)


def single_group(model, example):
    graph = depprune.trace(model, example)
    assert len(graph.groups) == 1
    return graph, graph.groups[0], ScoreContext.from_model(graph, model)


def unit_vector(model, unit, of=lambda t: t):
    return torch.cat([s.detach().reshape(-1) for s in model.unit_slices(unit, of)])


def backward(model, example, seed=1):
    target = torch.randn(model(example).shape, generator=torch.Generator().manual_seed(seed))
    nn.functional.mse_loss(model(example), target).backward()


# ---------------------------------------------------------------- Taylor


@pytest.mark.parametrize(("cls", "shape", "size"), MODELS, ids=MODEL_IDS)
def test_taylor_forms_match_sums_over_hand_gathered_slices(cls, shape, size):
    model, example = build(cls, shape)
    backward(model, example)
    _, group, ctx = single_group(model, example)
    assert group.size == size
    products = [
        [
            (w * g).detach()
            for w, g in zip(
                model.unit_slices(u), model.unit_slices(u, lambda t: t.grad), strict=True
            )
        ]
        for u in range(size)
    ]
    whole_unit = torch.tensor([abs(sum(float(p.sum()) for p in unit)) for unit in products])
    elementwise = torch.tensor([sum(float(p.abs().sum()) for p in unit) for unit in products])
    torch.testing.assert_close(taylor(group, ctx), whole_unit, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(taylor_elementwise(group, ctx), elementwise, rtol=1e-5, atol=1e-7)
    # The two differ exactly by cancellation: |sum| <= sum of |.|, strictly for some unit.
    assert bool((whole_unit < elementwise - 1e-6).any())


def test_taylor_elementwise_needs_gradients():
    model, example = build(MLP, (5, 6))
    _, group, ctx = single_group(model, example)
    with pytest.raises(ImportanceError, match=r"fc1.weight has no gradient; call loss.backward"):
        taylor_elementwise(group, ctx)


# ---------------------------------------------------------------- FPGM


def brute_force_fpgm(vectors, p):
    return torch.tensor(
        [
            sum(
                float((vectors[u] - vectors[v]).abs().pow(p).sum() ** (1 / p))
                for v in range(len(vectors))
            )
            for u in range(len(vectors))
        ]
    )


@pytest.mark.parametrize("p", [1, 2, 3.5])
@pytest.mark.parametrize(("cls", "shape", "size"), MODELS, ids=MODEL_IDS)
def test_fpgm_is_the_sum_of_distances_between_concatenated_unit_vectors(cls, shape, size, p):
    model, example = build(cls, shape)
    _, group, ctx = single_group(model, example)
    vectors = [unit_vector(model, u) for u in range(size)]
    torch.testing.assert_close(
        fpgm(p)(group, ctx), brute_force_fpgm(vectors, p), rtol=1e-4, atol=1e-4
    )


def test_fpgm_blocks_of_rows_and_columns_give_the_same_scores(monkeypatch):
    model, example = build(FlattenNet, (2, 3, 2, 2))
    _, group, ctx = single_group(model, example)
    whole = fpgm(2)(group, ctx)
    # One column and 3 distance rows at a time: every chunking path runs.
    monkeypatch.setattr(geometric_median, "_GATHER_ELEMENTS", 1)
    monkeypatch.setattr(geometric_median, "_DISTANCE_ELEMENTS", 3 * group.size)
    torch.testing.assert_close(fpgm(2)(group, ctx), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        fpgm(1)(group, ctx), brute_force_fpgm([unit_vector(model, u) for u in range(4)], 1)
    )


def test_fpgm_gathers_strided_head_dim_rows_and_skips_other_groups_indices():
    torch.manual_seed(0)
    eqs = depprune.AxisEquations()
    heads, head_dim = eqs.axis(2), eqs.axis(4)
    merged, extra = eqs.axis(8), eqs.axis(3)
    concat = eqs.axis(7)
    eqs.product(merged, [heads, head_dim])
    eqs.sum(concat, [head_dim, extra])
    eqs.param("proj", 0, merged)
    inputs = eqs.axis(5)
    eqs.param("proj", 1, inputs)
    eqs.freeze(inputs)
    eqs.param("cat", 0, concat)
    graph = eqs.solve()
    tensors = {"proj": nn.Parameter(torch.randn(8, 5)), "cat": nn.Parameter(torch.randn(7, 2))}
    ctx = ScoreContext(graph, tensors)
    proj, cat = tensors["proj"].detach(), tensors["cat"].detach()
    by_size = {g.size: g for g in graph.groups}
    # Head h owns rows 4h..4h+3; head_dim d owns rows d and 4 + d, and row d of cat.
    heads_vectors = [proj[4 * h : 4 * h + 4].reshape(-1) for h in range(2)]
    dim_vectors = [torch.cat([proj[d], proj[4 + d], cat[d]]) for d in range(4)]
    torch.testing.assert_close(
        fpgm(2)(by_size[2], ctx), brute_force_fpgm(heads_vectors, 2), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        fpgm(2)(by_size[4], ctx), brute_force_fpgm(dim_vectors, 2), rtol=1e-4, atol=1e-4
    )


def test_fpgm_counts_a_tied_tensor_once_and_never_a_buffer():
    def context(names):
        eqs = depprune.AxisEquations()
        units = eqs.axis(4)
        for name in names:
            eqs.param(name, 0, units)
        return eqs.solve()

    weight = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    alone = context(["w"])
    tied = context(["w", "w_alias", "running_stat"])
    tensors = {"w": weight, "w_alias": weight, "running_stat": torch.randn(4) * 100}
    expected = fpgm(2)(alone.groups[0], ScoreContext(alone, {"w": weight}))
    torch.testing.assert_close(fpgm(2)(tied.groups[0], ScoreContext(tied, tensors)), expected)
    torch.testing.assert_close(
        expected, brute_force_fpgm(list(weight.detach()), 2), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------- LAMP


def direct_lamp(scores):
    squares = [float(s) ** 2 for s in scores]
    return torch.tensor([sq / sum(o for o in squares if o >= sq) if sq else 0.0 for sq in squares])


class DeepMLP(nn.Module):
    """Two hidden groups: 8 neurons with magnitudes spread wide, 10 with nearly equal ones."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 10), nn.Linear(10, 3)
        with torch.no_grad():
            self.fc1.weight.mul_(torch.logspace(-2, 1, 8)[:, None])
            self.fc2.weight[:, :] = self.fc2.weight.sign() * 0.1
            self.fc2.bias.fill_(0.1)
            self.fc3.weight[:, :] = self.fc3.weight.sign() * torch.linspace(1.0, 1.2, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def group_slices(self, index, unit):
        if index == 0:
            return [self.fc1.weight[unit], self.fc1.bias[unit], self.fc2.weight[:, unit]]
        return [self.fc2.weight[unit], self.fc2.bias[unit], self.fc3.weight[:, unit]]


def deep_mlp():
    torch.manual_seed(0)
    model = DeepMLP()
    graph = depprune.trace(model, torch.zeros(1, 6))
    assert [g.size for g in graph.groups] == [8, 10]
    l2 = {
        g.index: torch.tensor(
            [
                float(
                    torch.cat(
                        [s.detach().reshape(-1) for s in model.group_slices(g.index, u)]
                    ).norm()
                )
                for u in range(g.size)
            ]
        )
        for g in graph.groups
    }
    return model, graph, l2


def test_lamp_of_l2_magnitude_matches_the_definition_in_every_group():
    model, graph, l2 = deep_mlp()
    ctx = ScoreContext.from_model(graph, model)
    for group in graph.groups:
        scores = lamp()(group, ctx)
        torch.testing.assert_close(scores, direct_lamp(l2[group.index]), rtol=1e-5, atol=1e-7)
        # The strongest unit is compared only with itself.
        assert float(scores.max()) == pytest.approx(1.0)


def test_lamp_ties_share_one_score_and_zero_scores_stay_zero():
    eqs = depprune.AxisEquations()
    eqs.param("w", 0, eqs.axis(6))
    graph = eqs.solve()
    base_scores = torch.tensor([3.0, 1.0, -2.0, 1.0, 3.0, 0.0])
    score = lamp(base=lambda group, ctx: base_scores)
    result = score(graph.groups[0], ScoreContext(graph, {}))
    torch.testing.assert_close(result, direct_lamp(base_scores))
    assert result[1] == result[3] and result[0] == result[4] == 0.5 and result[5] == 0.0
    assert torch.equal(score(graph.groups[0], ScoreContext(graph, {})), result)


def test_lamp_does_not_see_a_groups_scale():
    model, graph, _ = deep_mlp()
    ctx = ScoreContext.from_model(graph, model)
    l2 = magnitude(2)

    def scaled(group, ctx):
        return l2(group, ctx) * (1000.0 if group.index == 0 else 0.001)

    for group in graph.groups:
        torch.testing.assert_close(lamp(scaled)(group, ctx), lamp()(group, ctx))
    assert lamp().globally_comparable is True


def test_global_ranking_removes_the_lowest_raw_lamp_scores():
    model, _, l2 = deep_mlp()
    raw = {index: direct_lamp(scores) for index, scores in l2.items()}

    def expected(ranked):
        flat = torch.cat([ranked[0], ranked[1]])
        owner = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(10, dtype=torch.long)])
        counts = torch.bincount(owner[torch.argsort(flat, stable=True)[:9]], minlength=2)
        return {g: lowest(raw[g], int(counts[g])).tolist() for g in (0, 1) if counts[g]}

    by_raw = expected(raw)
    by_mean = expected({g: s / s.mean() for g, s in raw.items()})
    assert by_raw != by_mean  # the model tells the two rankings apart
    plan = depprune.make_plan(
        model, torch.zeros(1, 6), ratio=0.5, importance=lamp(), global_ranking=True, progress=False
    )
    assert {g: units.tolist() for g, units in plan.removed.items()} == by_raw


def test_lamp_refuses_a_base_that_is_not_an_importance():
    with pytest.raises(ImportanceError, match="lamp's base must be an importance callable"):
        lamp("magnitude")
    eqs = depprune.AxisEquations()
    eqs.param("w", 0, eqs.axis(3))
    graph = eqs.solve()
    with pytest.raises(
        ImportanceError, match=r"lamp's base returned torch.Size\(\[2\]\) for group 0"
    ):
        score_groups(graph.groups, lamp(lambda group, ctx: torch.ones(2)), ScoreContext(graph, {}))


# ---------------------------------------------------------------- group Hessian


def loss_fn(model, batch):
    inputs, target = batch
    return nn.functional.mse_loss(model(inputs), target)


def batches_for(model, shape, count=3, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out_shape = model.eval()(torch.zeros(*shape)).shape
    return [
        (torch.randn(*shape, generator=generator), torch.randn(*out_shape, generator=generator))
        for _ in range(count)
    ]


def hand_fisher(model, pieces):
    """Mean over ``pieces`` of each parameter's squared gradient, by plain backward passes."""
    model.eval()
    squares = {p: torch.zeros_like(p) for p in model.parameters()}
    for piece in pieces:
        model.zero_grad(set_to_none=True)
        loss_fn(model, piece).backward()
        for p in model.parameters():
            squares[p] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {p: total / len(pieces) for p, total in squares.items()}


def hand_hessian_scores(model, fisher, size):
    return torch.tensor(
        [
            sum(
                float((0.5 * w.detach() ** 2 * h).sum())
                for w, h in zip(
                    model.unit_slices(u), model.unit_slices(u, lambda t: fisher[t]), strict=True
                )
            )
            for u in range(size)
        ]
    )


@pytest.mark.parametrize(("cls", "shape", "size"), MODELS, ids=MODEL_IDS)
def test_hessian_is_half_w_squared_times_mean_squared_batch_gradients(cls, shape, size):
    model, _ = build(cls, shape)
    batches = batches_for(model, shape)
    expected = hand_hessian_scores(model, hand_fisher(model, batches), size)
    model.train()
    score = hessian(model, loss_fn, batches, progress=False)
    _, group, ctx = single_group(model, torch.zeros(*shape))
    torch.testing.assert_close(score(group, ctx), expected, rtol=1e-4, atol=1e-9)
    assert score.gradients == 3


def test_hessian_per_sample_averages_one_gradient_per_sample():
    model, _ = build(ConvNet, (2, 3, 6, 6))
    batches = batches_for(model, (2, 3, 6, 6), count=2)
    samples = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(2)]
    expected = hand_hessian_scores(model, hand_fisher(model, samples), 6)
    per_batch = hand_hessian_scores(model, hand_fisher(model, batches), 6)
    assert not torch.allclose(expected, per_batch, rtol=1e-2)  # the two estimates differ here
    score = hessian(model, loss_fn, batches, per_sample=True, progress=False)
    _, group, ctx = single_group(model, torch.zeros(2, 3, 6, 6))
    torch.testing.assert_close(score(group, ctx), expected, rtol=1e-4, atol=1e-9)
    assert score.gradients == 4


def test_hessian_leaves_gradients_modes_and_statistics_as_they_were():
    model, _ = build(ConvNet, (2, 3, 6, 6))
    batches = batches_for(model, (2, 3, 6, 6))
    model.train()
    model.conv2.eval()
    model.conv1.weight.grad = torch.randn_like(model.conv1.weight)
    earlier_grad = model.conv1.weight.grad
    earlier_values = earlier_grad.clone()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    hessian(model, loss_fn, batches, progress=False)
    assert model.conv1.weight.grad is earlier_grad and torch.equal(earlier_grad, earlier_values)
    assert all(p.grad is None for name, p in model.named_parameters() if name != "conv1.weight")
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())


def test_hessian_refuses_bad_arguments_and_leaves_the_model_on_error():
    model, _ = build(MLP, (5, 6))
    batches = batches_for(model, (5, 6))
    model.fc2.weight.grad = torch.ones_like(model.fc2.weight)
    model.train()

    def failing(model, batch):
        if batch[0].shape[0] == 1:
            raise RuntimeError("out of data")
        return loss_fn(model, batch)

    cases = [
        (lambda: hessian(model, loss_fn, [], progress=False), "batches gave no batch"),
        (lambda: hessian(model, loss_fn, 3, progress=False), "batches must be an iterable"),
        (lambda: hessian(model, "mse", batches, progress=False), "loss_fn must be a callable"),
        (lambda: hessian("model", loss_fn, batches, progress=False), "hessian needs the nn.Module"),
        (
            lambda: hessian(model, lambda m, b: (m(b[0]) - b[1]) ** 2, batches, progress=False),
            r"loss_fn returned torch.Size\(\[5, 3\]\) on batch 0; it must return a scalar",
        ),
        (
            lambda: hessian(model, lambda m, b: loss_fn(m, b).item(), batches, progress=False),
            "returned float",
        ),
        (
            lambda: hessian(model, lambda m, b: loss_fn(m, b).detach(), batches, progress=False),
            "does not depend on any parameter",
        ),
        (
            lambda: hessian(
                model, failing, [batches[0], (batches[1][0][:1], batches[1][1][:1])], progress=False
            ),
            r"loss_fn failed on batch 1 \(RuntimeError: out of data\)",
        ),
        (
            lambda: hessian(
                model,
                loss_fn,
                [(torch.zeros(5, 6), torch.zeros(4, 3))],
                per_sample=True,
                progress=False,
            ),
            r"dim 0 sizes \[4, 5\]",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ImportanceError, match=message):
            call()
        assert torch.equal(model.fc2.weight.grad, torch.ones_like(model.fc2.weight))
        assert model.fc1.weight.grad is None and model.training and model.fc1.training


# ---------------------------------------------------------------- all of them


def test_the_new_criteria_refuse_meta_weights():
    with torch.device("meta"):
        model = ConvNet()
    example = torch.zeros(2, 3, 6, 6)
    for importance in (lamp(), fpgm(), magnitude()):
        with pytest.raises(ImportanceError, match="the weights are on the meta device"):
            depprune.make_plan(model, example, importance=importance, progress=False)
    with pytest.raises(ImportanceError, match="the weights are on the meta device"):
        hessian(model, loss_fn, [(example, torch.zeros(2, 4, 4, 4))], progress=False)


@pytest.mark.parametrize("p", [0, -1.0, math.inf, math.nan, "2", True])
def test_fpgm_refuses_a_bad_p(p):
    with pytest.raises(ImportanceError, match=r"fpgm needs a finite p > 0"):
        fpgm(p)


CRITERIA = ["lamp", "fpgm", "hessian", "taylor", "taylor_elementwise"]


@pytest.mark.parametrize("name", CRITERIA)
@pytest.mark.parametrize(("cls", "shape", "size"), MODELS[1:], ids=MODEL_IDS[1:])
def test_make_plan_removes_the_lowest_units_of_each_criterion_and_the_cut_model_runs(
    cls, shape, size, name
):
    model, example = build(cls, shape)
    if name == "hessian":
        importance = hessian(model, loss_fn, batches_for(model, shape), progress=False)
    elif name.startswith("taylor"):
        backward(model, example)
        importance = taylor if name == "taylor" else taylor_elementwise
    else:
        importance = lamp() if name == "lamp" else fpgm()
    _, group, ctx = single_group(model, example)
    scores = importance(group, ctx)
    plan = depprune.make_plan(model, example, ratio=0.5, importance=importance, progress=False)
    removed = plan.removed[group.index]
    np.testing.assert_array_equal(removed, lowest(scores, size // 2))
    kept = np.setdiff1d(np.arange(size), removed)
    model.eval()
    before = model.conv2.weight[:, kept].clone() if cls is ConvNet else model.fc.weight.clone()
    plan.apply(model)
    assert model(example).shape[0] == shape[0]
    if cls is ConvNet:
        assert model.conv1.out_channels == size // 2
        torch.testing.assert_close(model.conv2.weight, before)
    else:
        columns = (4 * kept[:, None] + np.arange(4)).reshape(-1)
        torch.testing.assert_close(model.fc.weight, before[:, columns])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(9, 7), (6, 4, 3, 3), (3000, 700), (5, 1), (1, 6)])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_per_dim_sums_of_the_core_match_torch(dtype, shape, p):
    """|x|^p summed over all dims but one: the core's one-pass kernel (p 1 and 2 on
    float32 and bfloat16, threads for big tensors) agrees with torch's reductions."""
    from depprune.importance.context import Power, _all_dim_sums

    torch.manual_seed(0)
    tensor = torch.randn(*shape).to(dtype)
    sums = _all_dim_sums(tensor, Power(p))
    values = tensor.double().abs() ** p
    for dim in range(tensor.dim()):
        others = [d for d in range(tensor.dim()) if d != dim]
        expected = values.sum(dim=others).float()
        assert sums[dim].dtype == torch.float32 and sums[dim].shape == expected.shape
        torch.testing.assert_close(sums[dim], expected, rtol=2e-5, atol=1e-6)
    only = _all_dim_sums(tensor, Power(p), {1})
    assert only[0] is None and torch.equal(only[1], sums[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_lowest_is_the_stable_sort_prefix_with_ties_and_nans(dtype):
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        size = int(torch.randint(1, 40, (1,), generator=generator))
        if trial % 2:
            scores = torch.randint(0, 4, (size,), generator=generator).float()  # many ties
        else:
            scores = torch.randn(size, generator=generator)
        if trial % 5 == 0:
            scores[int(torch.randint(0, size, (1,), generator=generator))] = float("nan")
        scores = scores.to(dtype)
        count = int(torch.randint(0, size + 2, (1,), generator=generator))
        expected = torch.argsort(scores, stable=True)[: max(count, 0)].sort().values.numpy()
        np.testing.assert_array_equal(lowest(scores, count), expected)
