"""Group-sparse training (DepGraph), its importance, ratio schedules and iterative pruning."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import depprune
from depprune import MethodError
from depprune.importance import ScoreContext
from depprune.methods import depgraph
from depprune.selection import units_to_keep
from depprune.sparsity import (
    BatchNormL1,
    GroupRegularizer,
    IterativePruner,
    ratio_schedule,
    step_ratio,
)

pytestmark = pytest.mark.usefixtures("one_thread")


IMAGE = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))


class SmallCNN(nn.Module):
    """conv-bn, conv-bn, flattened into a linear: each conv2 channel owns 4 fc columns."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 2 * 2, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.out(torch.relu(self.fc(torch.flatten(x, 1))))


class TiedLM(nn.Module):
    """Embedding tied to the output layer, with a residual MLP on the hidden stream."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        hidden = self.embed(tokens)
        hidden = hidden + self.down(torch.relu(self.up(hidden)))
        return self.head(hidden)


TOKENS = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.2, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def tied_lm() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


def unit_importance_by_slicing(graph, model, group, members):
    """I_k by a loop over units: each member's slice for unit k, squared and summed."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    maps = graph.unit_maps(group)
    importance = torch.zeros(group.size, dtype=torch.float64)
    for name, dim in members:
        weight = tensors[name].detach().double()
        units = torch.as_tensor(maps[(name, dim)].copy())
        for k in range(group.size):
            rows = torch.nonzero(units == k).flatten()
            importance[k] += weight.index_select(dim, rows).square().sum()
    return importance


def expected_strengths(importance, strength, alpha):
    spread = importance.max() - importance.min()
    return strength * 2 ** (alpha * (importance.max() - importance) / spread)


def parameter_members(graph, model, group):
    """The group's (parameter, dim) members, a tied parameter once (its first name)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    members, seen = [], set()
    for name, dim in graph.unit_maps(group):
        if name in tensors and (id(tensors[name]), dim) not in seen:
            seen.add((id(tensors[name]), dim))
            members.append((name, dim))
    return members


def expected_gradients(graph, model, strength, alpha):
    """2 * gamma_k * w for every member slice, gamma_k from the sliced I_k, summed over groups."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    grads = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in tensors.values()}
    total = torch.zeros((), dtype=torch.float64)
    for group in graph.groups:
        members = parameter_members(graph, model, group)
        importance = unit_importance_by_slicing(graph, model, group, members)
        gamma = expected_strengths(importance, strength, alpha)
        total += (gamma * importance).sum()
        for name, dim in members:
            units = torch.as_tensor(graph.unit_maps(group)[(name, dim)].copy())
            weight = tensors[name].detach().double()
            shape = [1] * weight.dim()
            shape[dim] = -1
            per_index = torch.where(units >= 0, gamma[units.clamp_min(0)], 0.0)
            grads[id(tensors[name])] += 2 * per_index.view(shape) * weight
    return {name: grads[id(p)] for name, p in tensors.items()}, total


def gradients_of(model, fill):
    model.zero_grad(set_to_none=True)
    fill()
    return {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters(remove_duplicate=False)
    }


@pytest.mark.parametrize("make, inputs", [(small_cnn, IMAGE), (tied_lm, TOKENS)])
def test_step_adds_the_gradient_of_penalty_and_of_the_formula(make, inputs):
    model = make()
    graph = depprune.trace(model, inputs)
    reg = GroupRegularizer(model, graph, strength=0.1, alpha=4.0)
    expected, expected_penalty = expected_gradients(graph, model, 0.1, 4.0)

    by_step = gradients_of(model, reg.step)
    by_autograd = gradients_of(model, lambda: reg.penalty().backward())
    assert math.isclose(reg.penalty().item(), expected_penalty.item(), rel_tol=1e-5)
    for name, want in expected.items():
        assert torch.allclose(by_step[name].double(), want, atol=1e-6), name
        assert torch.allclose(by_autograd[name].double(), want, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in by_step.values())


def test_the_cnn_exercises_multi_index_units_and_the_tied_model_counts_once():
    model = small_cnn()
    graph = depprune.trace(model, IMAGE)
    conv2 = next(g for g in graph.groups if g.members[0] == ("conv2.weight", 0))
    fc_columns = graph.unit_maps(conv2)[("fc.weight", 1)]
    assert fc_columns.tolist() == [k for k in range(6) for _ in range(4)]

    model = tied_lm()
    graph = depprune.trace(model, TOKENS)
    reg = GroupRegularizer(model, graph)
    hidden = next(g for g in graph.groups if g.kind == "hidden")
    names = {name for name, _ in graph.unit_maps(hidden)}
    assert {"embed.weight", "head.weight"} <= names
    penalised = [name for name, _ in reg.members[hidden.index]]
    assert ("embed.weight" in penalised) != ("head.weight" in penalised)
    # Counted once: I_k has ||embed column k||^2 once, not twice.
    once = unit_importance_by_slicing(graph, model, hidden, parameter_members(graph, model, hidden))
    assert torch.allclose(reg.unit_importance()[hidden.index].double(), once, rtol=1e-5)


def test_weaker_units_get_larger_strengths_from_strength_to_two_to_the_alpha():
    model = small_cnn()
    reg = GroupRegularizer(model, depprune.trace(model, IMAGE), strength=0.01, alpha=3.0)
    for key, importance in reg.unit_importance().items():
        gamma = reg.unit_strengths()[key]
        order = torch.argsort(importance)
        assert torch.all(gamma[order][1:] < gamma[order][:-1]), key
        assert math.isclose(gamma[order[0]].item(), 0.01 * 2**3, rel_tol=1e-5)
        assert math.isclose(gamma[order[-1]].item(), 0.01, rel_tol=1e-5)
        assert torch.allclose(gamma, expected_strengths(importance, 0.01, 3.0).float())


def test_equal_units_all_get_the_base_strength_and_strengths_refresh_every_n_steps():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    reg = GroupRegularizer(
        model, depprune.trace(model, torch.zeros(1, 2)), strength=0.2, update_every=3
    )
    assert reg.unit_strengths()[0].tolist() == pytest.approx([0.2] * 3)
    with torch.no_grad():
        model[0].weight[0].zero_()  # unit 0 is now the weakest
    for call in range(1, 4):
        reg.step()
        weakest = reg.unit_strengths()[0][0].item()
        assert weakest == pytest.approx(0.2 * 16 if call == 3 else 0.2), call
    reg.update_strengths()
    assert reg.unit_strengths()[0][0].item() == pytest.approx(0.2 * 16)


def train(strength, steps=60):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=data)
    y = torch.tanh(x @ torch.randn(8, 4, generator=data))
    reg = GroupRegularizer(model, depprune.trace(model, x[:1]), strength=strength, update_every=10)
    before = reg.unit_importance()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if strength:
            reg.step()
        optimizer.step()
    return before, reg.unit_importance()[0]


def test_training_shrinks_the_weak_units_group_norms_more_than_the_strong_ones():
    """60 seeded SGD steps on an MLP: the weakest half of the hidden units (lowest I_k at
    the start, largest gamma) lose more than 60% of I_k (geometric mean of I_after /
    I_before < 0.4), the strongest half keep more than 60% of theirs (> 0.6), and without
    the regulariser the weak half does not shrink at all (>= 1), so the fall is its doing."""

    def geometric_mean(values):
        return values.log().mean().exp().item()

    before, after = train(strength=0.01)
    control_before, control_after = train(strength=0.0)
    assert torch.equal(before, control_before)
    order = torch.argsort(before)
    weak, strong = order[:8], order[8:]
    assert geometric_mean(after[weak] / before[weak]) < 0.4
    assert geometric_mean(after[strong] / before[strong]) > 0.6
    assert geometric_mean(control_after[weak] / before[weak]) >= 1.0


def test_grouping_strategies_penalise_the_expected_members():
    model = small_cnn()
    graph = depprune.trace(model, IMAGE)
    conv1 = next(g for g in graph.groups if g.members[0] == ("conv1.weight", 0)).index
    full = GroupRegularizer(model, graph, grouping="full")
    linear = GroupRegularizer(model, graph, grouping="linear")
    alone = GroupRegularizer(model, graph, grouping="none")
    everything = [
        ("conv1.weight", 0),
        ("conv1.bias", 0),
        ("bn1.weight", 0),
        ("bn1.bias", 0),
        ("conv2.weight", 1),
    ]
    assert list(full.members[conv1]) == everything  # buffers (running stats) never
    assert list(linear.members[conv1]) == [
        ("conv1.weight", 0),
        ("conv1.bias", 0),
        ("conv2.weight", 1),
    ]
    assert [key for key in alone.members if key[0] == conv1] == [(conv1, m) for m in everything]
    # "none": each member its own I_k, so its strengths follow its own norms.
    for member in everything:
        own = unit_importance_by_slicing(graph, model, graph.groups[conv1], [member])
        assert torch.allclose(alone.unit_importance()[(conv1, member)].double(), own, rtol=1e-5)
        want = expected_strengths(own, 1e-4, 4.0)
        assert torch.allclose(alone.unit_strengths()[(conv1, member)].double(), want, rtol=1e-4)


def test_linear_grouping_counts_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(8, 4), nn.LayerNorm(8), nn.ReLU(), Conv1D(2, 8))
    graph = depprune.trace(model, torch.randn(2, 4))
    reg = GroupRegularizer(model, graph, grouping="linear")
    assert list(reg.members[0]) == [("0.weight", 1), ("0.bias", 0), ("3.weight", 0)]


@pytest.mark.parametrize("grouping", ["full", "linear", "none"])
def test_importance_is_the_group_norm_under_the_grouping(grouping):
    model = small_cnn()
    graph = depprune.trace(model, IMAGE)
    reg = GroupRegularizer(model, graph, grouping=grouping)
    ctx = ScoreContext.from_model(graph, model)
    score = reg.importance()
    for group in graph.groups:
        members = (
            reg.members.get(group.index)
            or [key for key in reg.members if isinstance(key, tuple) and key[0] == group.index][:1]
        )
        if grouping == "none":
            members = [members[0][1]]  # the group's first parameter member
        want = unit_importance_by_slicing(graph, model, group, members).sqrt()
        assert torch.allclose(score(group, ctx).double(), want, rtol=1e-5), group.index


def test_penalty_is_float32_under_bfloat16_autocast_and_for_a_bfloat16_model():
    model = small_cnn()
    reg = GroupRegularizer(model, depprune.trace(model, IMAGE), strength=0.1)
    plain = reg.penalty().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IMAGE).float().square().mean()
        penalty = reg.penalty()
        assert loss.dtype == torch.float32 and penalty.dtype == torch.float32
        assert penalty.item() == pytest.approx(plain, rel=1e-6)
    by_autograd = gradients_of(model, penalty.backward)
    by_step = gradients_of(model, reg.step)
    for name, grad in by_step.items():
        assert torch.allclose(grad, by_autograd[name], atol=1e-6), name

    low = small_cnn().to(torch.bfloat16)
    reg = GroupRegularizer(low, depprune.trace(low, IMAGE.bfloat16()), strength=0.1)
    penalty = reg.penalty()
    exact = sum(
        (gamma.double() * importance.double()).sum()
        for gamma, importance in zip(
            reg.unit_strengths().values(), reg.unit_importance().values(), strict=True
        )
    )
    assert penalty.dtype == torch.float32
    assert penalty.item() == pytest.approx(exact.item(), rel=1e-5)
    reg.step()
    assert low.fc.weight.grad.dtype == torch.bfloat16


def mlp_with_a_sparse_layer():
    """Two hidden groups of 8; units 0-5 of the first are near zero (as after sparse training)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[:6] *= 1e-3
        model[0].bias[:6] *= 1e-3
        model[2].weight[:, :6] *= 1e-3
    return model


def test_learned_sparsity_removes_where_training_made_it_and_uniform_from_every_group():
    x = torch.randn(1, 4)
    reference = mlp_with_a_sparse_layer()
    graph = depprune.trace(reference, x)
    reg = GroupRegularizer(reference, graph)
    ctx = ScoreContext.from_model(graph, reference)
    norms = {g.index: reg.importance()(g, ctx) for g in graph.groups}
    assert sorted(norms) == [0, 1]

    learned = depgraph.prune(mlp_with_a_sparse_layer(), x, reg, ratio=0.5, sparsity="learned")
    # Direct: rank all 16 units by norm / group mean, remove the lowest 8.
    normalised = torch.cat([norms[g] / norms[g].mean() for g in (0, 1)])
    lowest = set(torch.argsort(normalised)[:8].tolist())
    want = {g: sorted(k - 8 * g for k in lowest if k // 8 == g) for g in (0, 1)}
    assert {g: learned.plan.removed[g].tolist() for g in (0, 1)} == want
    assert want[0] == [0, 1, 2, 3, 4, 5] and len(want[1]) == 2

    uniform = depgraph.prune(mlp_with_a_sparse_layer(), x, reg, ratio=0.5, sparsity="uniform")
    for g in (0, 1):
        assert uniform.plan.removed[g].tolist() == sorted(torch.argsort(norms[g])[:4].tolist())

    plain = depgraph.prune(mlp_with_a_sparse_layer(), x, ratio=0.5)  # group L2, learned
    assert {g: plain.plan.removed[g].tolist() for g in (0, 1)} == want


def test_depgraph_prune_rejects_what_it_sets_itself():
    model = mlp_with_a_sparse_layer()
    with pytest.raises(MethodError, match="sparsity="):
        depgraph.prune(model, torch.randn(1, 4), global_ranking=True)
    with pytest.raises(MethodError, match="'learned'"):
        depgraph.prune(model, torch.randn(1, 4), sparsity="global")
    with pytest.raises(MethodError, match="GroupRegularizer"):
        depgraph.prune(model, torch.randn(1, 4), regularizer=BatchNormL1(small_cnn()))
    assert model[0].out_features == 8


def test_bad_arguments_and_a_pruned_model_raise_method_errors():
    model = small_cnn()
    graph = depprune.trace(model, IMAGE)
    with pytest.raises(MethodError, match="grouping"):
        GroupRegularizer(model, graph, grouping="conv")
    with pytest.raises(MethodError, match="strength"):
        GroupRegularizer(model, graph, strength=-1.0)
    with pytest.raises(MethodError, match="update_every"):
        GroupRegularizer(model, graph, update_every=0)
    with pytest.raises(MethodError, match="kind names"):
        GroupRegularizer(model, graph, kinds=("filters",))
    with pytest.raises(MethodError, match="does not have"):
        GroupRegularizer(tied_lm(), graph)
    reg = GroupRegularizer(model, graph)
    depprune.prune(model, IMAGE, ratio=0.5)
    with pytest.raises(MethodError, match="build a new GroupRegularizer"):
        reg.step()
    GroupRegularizer(model, depprune.trace(model, IMAGE)).step()  # a new trace works


def test_step_under_distributed_data_parallel_matches_the_plain_model(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        plain, wrapped = small_cnn(), small_cnn()
        ddp = nn.parallel.DistributedDataParallel(wrapped)
        grads = []
        for model, net in ((plain, plain), (ddp, wrapped)):
            group = GroupRegularizer(model, depprune.trace(net, IMAGE), strength=0.05)
            slimming = BatchNormL1(model, strength=0.05)
            model(IMAGE).square().mean().backward()
            group.step()
            slimming.step()
            grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    finally:
        dist.destroy_process_group()


def test_ratio_schedules_follow_their_formulas():
    assert ratio_schedule(0.6, 4) == pytest.approx([0.15, 0.3, 0.45, 0.6])
    cubic = ratio_schedule(0.8, 5, "cubic")
    assert cubic == pytest.approx([0.8 * (1 - (1 - t / 5) ** 3) for t in range(1, 6)])
    geometric = ratio_schedule(0.9, 3, "geometric")
    remaining = [1.0] + [1 - r for r in geometric]
    fractions = [b / a for a, b in itertools.pairwise(remaining)]
    assert fractions == pytest.approx([0.1 ** (1 / 3)] * 3)  # the same share kept each step
    for kind in ("linear", "cubic", "geometric"):
        ratios = ratio_schedule(0.55, 7, kind)
        assert ratios[-1] == 0.55 and all(a < b for a, b in itertools.pairwise(ratios))
    # Steps compose: what each removes of what is left gives the cumulative ratio.
    kept = 1.0
    for previous, current in itertools.pairwise([0.0, *cubic]):
        kept *= 1 - step_ratio(previous, current)
        assert kept == pytest.approx(1 - current)
    for bad in [
        (1.0, 3, "linear"),
        (0.5, 0, "linear"),
        (0.5, 3, "exponential"),
        (-0.1, 2, "cubic"),
    ]:
        with pytest.raises(MethodError):
            ratio_schedule(*bad)


def three_groups():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
        nn.ReLU(),
        nn.Linear(10, 7),
        nn.ReLU(),
        nn.Linear(7, 2),
    )


def widths(model):
    return [model[i].out_features for i in (0, 2, 4)]


@pytest.mark.parametrize("schedule", ["linear", "cubic", "geometric"])
def test_iterative_pruning_ends_where_one_shot_does(schedule):
    """Each step keeps its cumulative ratio of every group's *original* size, so the last
    step's widths are one-shot pruning's at the final ratio, whatever the steps' rounding."""
    x = torch.randn(1, 3)
    one_shot = three_groups()
    depprune.prune(one_shot, x, ratio=0.6)
    model = three_groups()
    steps = 3
    pruner = IterativePruner(model, x, final_ratio=0.6, steps=steps, schedule=schedule)
    cumulative = ratio_schedule(0.6, steps, schedule)
    for t in range(steps):
        assert not pruner.done
        report = pruner.step()
        assert widths(model) == [
            units_to_keep(size, cumulative[t], None, 1) for size in (16, 10, 7)
        ]
        assert report.params_after == sum(p.numel() for p in model.parameters())
    assert pruner.done and pruner.ratio == 0.6
    assert widths(model) == widths(one_shot)
    with pytest.raises(MethodError, match="done"):
        pruner.step()


def test_iterative_pruning_reaches_small_groups_a_step_ratio_would_never_cut():
    """Two units at 0.5 in two steps: step ratios 0.25 then 1/3 each remove floor(< 1) = 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    pruner = IterativePruner(model, torch.randn(1, 3), final_ratio=0.5, steps=2)
    pruner.step()
    assert model[0].out_features == 2
    pruner.step()
    assert model[0].out_features == 1


def test_iterative_pruning_matches_one_shot_when_the_arithmetic_is_exact_and_trains_between():
    x = torch.randn(32, 3)
    y = torch.randn(32, 2)
    model = three_groups()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = IterativePruner(model, x[:1], final_ratio=0.5, steps=2, ratios={model[2]: 0.2})
    seen = []
    while not pruner.done:
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        pruner.step(optimizers=[optimizer])
        seen.append(widths(model))
    # 16 -> 12 -> 8 (0.25 then a third of 12); model[2] at its own 0.2: 10 -> 9 -> 8; 7 -> 6 -> 4.
    assert seen == [[12, 9, 6], [8, 8, 4]]
    one_shot = three_groups()
    depprune.prune(one_shot, x[:1], ratio=0.5, ratios={one_shot[2]: 0.2})
    assert widths(one_shot) == [8, 8, 4]
    model(x).sum().backward()
    optimizer.step()  # the optimizer's state was cut with the model


def test_iterative_pruner_rejects_bad_options():
    model = three_groups()
    with pytest.raises(MethodError, match="sets itself"):
        IterativePruner(model, torch.zeros(1, 3), 0.5, 2, ratio=0.5)
    with pytest.raises(MethodError, match="does not take"):
        IterativePruner(model, torch.zeros(1, 3), 0.5, 2, rounding=4)
    with pytest.raises(MethodError, match="cumulative ratios"):
        IterativePruner(model, torch.zeros(1, 3), 0.5, 2, schedule=[0.4, 0.3])
    pruner = IterativePruner(model, torch.zeros(1, 3), 0.5, 2, schedule=[0.1, 0.5])
    pruner.step()
    assert widths(model) == [15, 9, 7]


def test_iterative_pruning_tells_conv_groups_from_the_channels_they_share_a_member_with():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 32, 1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, groups=8),
            nn.ReLU(),
            nn.Conv2d(32, 4, 1),
        )

    x = torch.randn(1, 3, 8, 8)
    model, one_shot = net(), net()
    pruner = IterativePruner(model, x, final_ratio=0.5, steps=2, progress=False)
    while not pruner.done:
        pruner.step()
    depprune.prune(one_shot, x, ratio=0.5, progress=False)
    assert model[2].weight.shape == one_shot[2].weight.shape
    assert model[2].groups == one_shot[2].groups
