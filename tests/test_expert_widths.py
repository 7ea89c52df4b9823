"""Per-expert widths: each expert of a fused MoE tensor keeps its own neurons, exactly.

The oracle: zeroing, in slice ``e`` of every fused tensor, the neurons expert
``e`` drops (and the uniform cuts elsewhere) gives the pruned model's outputs.
Every family of test_experts with a neuron group runs, generates with the
cache like the no-cache loop and reloads exactly; the plan file keeps the
choice; edited choices are refused before anything changes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from pruning_oracle import assert_generates_and_reloads, assert_same_outputs, outputs, zeroed_copy
from test_experts import FAMILIES, TOKENS, Fused, assert_same_state, make, state
from torch import nn

import depprune
from depprune import ImportanceError, PlanMismatchError, SelectionError
from depprune.expert_widths import (
    ExpertWidthGroup,
    check_per_expert,
    expert_unit_magnitude,
    expert_width_groups,
)
from depprune.importance import ScoreContext

pytestmark = pytest.mark.usefixtures("one_thread")

#: GPT-OSS interleaves gate and up (``[..., ::2]``): its expert widths are frozen whole.
WITH_NEURONS = sorted(f for f in FAMILIES if f != "gpt_oss")


def zeroed(model: nn.Module, graph, plan) -> nn.Module:
    """The model with every unit the plan removes set to zero, expert by expert where it says."""
    own = {g.group for g in expert_width_groups(graph, model)}
    twin = zeroed_copy(model, graph, {g: u for g, u in plan.removed.items() if g not in own})
    tensors = dict(twin.named_parameters())
    with torch.no_grad():
        for (name, dim), rows in plan.per_expert.items():
            tensor = tensors[name]
            for expert, row in enumerate(rows):
                drop = np.setdiff1d(np.arange(tensor.shape[dim]), row)
                tensor[expert].index_fill_(dim - 1, torch.from_numpy(drop), 0.0)
    return twin


def neuron_plan(model, **options):
    options = {"per_expert": True, **options}
    return depprune.make_plan(
        model, TOKENS, ratio=0.5, kinds=("neurons",), progress=False, **options
    )


@pytest.mark.parametrize("family", WITH_NEURONS)
def test_each_expert_keeps_its_own_neurons_exactly(family, tmp_path):
    model = make(family)
    graph = depprune.trace(model, TOKENS)
    uniform = depprune.make_plan(model, TOKENS, ratio=0.5, kinds=("neurons",), progress=False)
    plan = neuron_plan(model)
    groups = expert_width_groups(graph, model)
    assert groups and {m for g in groups for m in g.unit_maps} == set(plan.per_expert)
    for (name, dim), rows in plan.per_expert.items():
        assert rows.shape == (model.get_parameter(name).shape[0], plan.kept[(name, dim)].size)
    # Random weights: some expert keeps other neurons than the first (else nothing is shown).
    assert any(len({tuple(r) for r in rows}) > 1 for rows in plan.per_expert.values())
    expected = outputs(zeroed(model, graph, plan), TOKENS)
    plan.apply(model)
    assert_same_outputs(expected, outputs(model, TOKENS))
    # The same shapes, config and parameter count as the uniform plan of the same ratio.
    assert plan.params_after(model) == sum(p.numel() for p in model.parameters())
    assert plan.kept.keys() == uniform.kept.keys()
    assert all(plan.kept[k].size == uniform.kept[k].size for k in plan.kept)
    assert_generates_and_reloads(model, TOKENS, tmp_path)


def test_each_expert_keeps_its_strongest_neurons():
    model = make("mixtral")
    plan = neuron_plan(model)
    experts = model.model.layers[0].mlp.experts
    width = experts.down_proj.shape[2]
    # A neuron's weights in expert e: its gate and up rows and its down column.
    norms = (
        experts.gate_up_proj.detach().square().sum(2)[:, :width]
        + experts.gate_up_proj.detach().square().sum(2)[:, width:]
        + experts.down_proj.detach().square().sum(1)
    )
    rows = plan.per_expert[("model.layers.0.mlp.experts.down_proj", 2)]
    keep = rows.shape[1]
    for expert, row in enumerate(rows):
        assert row.tolist() == sorted(norms[expert].argsort(descending=True)[:keep].tolist())
    gate_up = plan.per_expert[("model.layers.0.mlp.experts.gate_up_proj", 1)]
    np.testing.assert_array_equal(gate_up, np.concatenate([rows, rows + width], axis=1))


def test_a_score_function_chooses_and_bad_scores_raise():
    model = make("mixtral")

    def first_neurons_last(group: ExpertWidthGroup, ctx: ScoreContext) -> torch.Tensor:
        return torch.arange(group.size, dtype=torch.float32).expand(group.num_experts, -1)

    plan = neuron_plan(model, per_expert=first_neurons_last)
    rows = plan.per_expert[("model.layers.0.mlp.experts.down_proj", 2)]
    assert (rows == np.arange(8, 16)).all() and plan.choices["per_expert"] == "first_neurons_last"
    with pytest.raises(ImportanceError, match=r"shape \(4, 16\)"):
        neuron_plan(model, per_expert=lambda group, ctx: torch.ones(group.size))
    with pytest.raises(ImportanceError, match="not all finite"):
        neuron_plan(model, per_expert=lambda g, ctx: torch.full((g.num_experts, g.size), np.nan))
    with pytest.raises(ImportanceError, match="finite p"):
        expert_unit_magnitude(0)
    with pytest.raises(SelectionError, match="per_expert must be"):
        neuron_plan(model, per_expert="yes")
    with pytest.raises(SelectionError, match="tensor_parallel"):
        neuron_plan(model, tensor_parallel=2)


def test_with_whole_experts_removed_in_one_plan(tmp_path):
    model = make("qwen3_moe")
    graph = depprune.trace(model, TOKENS)
    plan = depprune.make_plan(
        model,
        TOKENS,
        ratio=0.5,
        kinds=("neurons", "experts"),
        per_expert=True,
        progress=False,
    )
    assert plan.structure and plan.per_expert
    layer = model.model.layers[0].mlp
    kept_experts = plan.structure.tensors[("model.layers.0.mlp.experts.down_proj", 0)]
    rows = plan.per_expert[("model.layers.0.mlp.experts.down_proj", 2)][kept_experts]
    down = layer.experts.down_proj.detach().clone()
    plan.apply(model)
    expected = torch.stack([down[e][:, r] for e, r in zip(kept_experts, rows, strict=True)])
    assert torch.equal(layer.experts.down_proj, expected)
    assert model.config.num_experts == 2 and model.config.moe_intermediate_size == 16
    assert graph.groups  # the trace of the unpruned model was not disturbed
    assert_generates_and_reloads(model, TOKENS, tmp_path)


def test_plan_file_keeps_the_choice_and_plain_plans_stay_version_3(tmp_path):
    model = make("olmoe")
    plan = neuron_plan(model)
    path = tmp_path / "plan.npz"
    plan.save(path)
    assert depprune.plan.read_summary(path)["version"] == 4
    loaded = depprune.Plan.load(path)
    assert loaded.per_expert.keys() == plan.per_expert.keys()
    for key, rows in plan.per_expert.items():
        np.testing.assert_array_equal(loaded.per_expert[key], rows)
    twin = make("olmoe")
    plan.apply(model)
    loaded.apply(twin)  # proved again from the file: the choice is whole units
    assert_same_state(state(model), twin)

    plain = depprune.make_plan(make("olmoe"), TOKENS, kinds=("neurons",), progress=False)
    plain.save(tmp_path / "plain.npz")
    assert depprune.plan.read_summary(tmp_path / "plain.npz")["version"] == 3


def test_damaged_per_expert_records_are_refused(tmp_path):
    from test_plan_file import meta_of, npy, rewritten

    from depprune.errors import InvalidPlanError

    plan = neuron_plan(make("mixtral"))
    path = tmp_path / "plan.npz"
    plan.save(path)
    with np.load(path) as data:
        offsets, values = data["per_expert_offsets"], data["per_expert_indices"]
    short = io.BytesIO()
    np.lib.format.write_array(short, np.concatenate([offsets[:-1], [offsets[-1] - 1]]))
    cut = io.BytesIO()
    np.lib.format.write_array(cut, values[:-1])
    damaged = rewritten(
        path,
        tmp_path / "short.npz",
        per_expert_offsets_npy=short.getvalue(),
        per_expert_indices_npy=cut.getvalue(),
    )
    with pytest.raises(InvalidPlanError, match="do not match its kept indices"):
        depprune.Plan.load(damaged)
    meta = meta_of(path)
    meta["per_expert"] = meta["per_expert"][:1]  # the summary still lists both
    with pytest.raises(InvalidPlanError):
        depprune.Plan.load(rewritten(path, tmp_path / "edited.npz", meta_npy=npy(meta)))


def test_edited_choices_are_refused_and_the_model_is_unchanged():
    model = make("mixtral")
    before = state(model)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    plan = neuron_plan(model)
    edited = depprune.Plan(**{**vars(plan), "per_expert": dict(plan.per_expert), "_proved": None})
    rows = edited.per_expert[(name, 1)].copy()
    rows[1, -1] = 31 if rows[1, -1] != 31 else 30  # expert 1's up half no longer its gate half
    rows[1].sort()
    edited.per_expert[(name, 1)] = rows
    with pytest.raises(PlanMismatchError, match="whole units"):
        edited.apply(model)
    assert_same_state(before, model)
    edited.per_expert = {(name, 1): plan.per_expert[(name, 1)]}  # down_proj left uniform
    with pytest.raises(PlanMismatchError, match="cut alike"):
        edited.apply(model)
    assert_same_state(before, model)
    graph = depprune.trace(model, TOKENS)
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(PlanMismatchError, match="not a fused expert width"):
        check_per_expert(graph, model, {(q, 1): np.zeros((4, 2), dtype=np.int64)}, plan.kept)
    assert_same_state(before, model)


def test_adam_state_is_cut_expert_by_expert():
    model = make("mixtral")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    plan = neuron_plan(model)
    down = model.model.layers[0].mlp.experts.down_proj
    old = optimizer.state[down]["exp_avg"].clone()
    rows = plan.per_expert[("model.layers.0.mlp.experts.down_proj", 2)]
    plan.apply(model, optimizers=[optimizer])
    down = model.model.layers[0].mlp.experts.down_proj
    expected = torch.stack([old[e][:, r] for e, r in enumerate(rows)])
    assert torch.equal(optimizer.state[down]["exp_avg"], expected)
    optimizer.zero_grad()
    model(TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()  # training goes on


class FusedMLP(nn.Module):
    """Hand-written fused experts: a linear gate, top-2, ``up[chosen]`` gathered per token."""

    def __init__(self, experts=4, hidden=6, width=8):
        super().__init__()
        self.num_experts, self.top_k = experts, 2
        self.embed = nn.Linear(3, hidden)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = Fused(experts, hidden, width)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        x = self.embed(x)
        weights, chosen = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        up = torch.einsum("nh,nkwh->nkw", x, self.experts.up[chosen]).relu()
        return self.head(torch.einsum("nkw,nkhw,nk->nh", up, self.experts.down[chosen], weights))


def test_hand_written_fused_experts_keep_their_own_neurons_exactly():
    torch.manual_seed(0)
    model = FusedMLP()
    x = torch.randn(9, 3)
    plan = depprune.make_plan(model, x, ratio=0.5, kinds=("neurons",), per_expert=True)
    graph = depprune.trace(model, x)
    assert set(plan.per_expert) == {("experts.up", 1), ("experts.down", 2)}
    expected = outputs(zeroed(model, graph, plan), x)
    plan.apply(model)
    assert model.experts.up.shape[:2] == (4, 4)  # the hidden width is a neuron group too
    assert_same_outputs(expected, outputs(model, x))


def test_models_without_fused_experts_plan_as_before():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    plan = depprune.make_plan(model, torch.randn(2, 4), per_expert=True, progress=False)
    assert plan.per_expert == {} and plan.kept


def test_streamed_and_rank_folder_cuts_refuse_per_expert_plans(tmp_path):
    from depprune.distributed import apply_to_tp_shards
    from depprune.errors import CheckpointError
    from depprune.io import apply_to_checkpoint

    model = make("mixtral")
    model.save_pretrained(tmp_path / "src")
    plan = neuron_plan(model)
    with pytest.raises(CheckpointError, match="prune in memory"):
        apply_to_checkpoint(tmp_path / "src", plan, tmp_path / "out")
    with pytest.raises(CheckpointError, match="per_expert"):
        apply_to_tp_shards([tmp_path / "src"] * 2, plan, [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "a").exists()


def test_per_slice_indices_are_checked_and_cut_with_the_slices_kept():
    from depprune.apply import apply_kept_indices
    from depprune.apply.cuts import cut_tensor

    values = torch.arange(24.0).view(3, 2, 4)
    rows = torch.tensor([[0, 3], [1, 2], [2, 3]])
    cut = cut_tensor(values, {0: torch.tensor([0, 2]), 2: rows})
    assert cut.tolist() == [[[0, 3], [4, 7]], [[18, 19], [22, 23]]]
    holder = nn.Module()
    holder.w = nn.Parameter(values.clone())
    with pytest.raises(PlanMismatchError, match="one row for each of the 3 slices"):
        apply_kept_indices(holder, {("w", 2): np.zeros((2, 2), dtype=np.int64)})
    with pytest.raises(PlanMismatchError, match="sorted and unique"):
        apply_kept_indices(holder, {("w", 2): np.array([[0, 1], [1, 0], [0, 1]])})
    with pytest.raises(PlanMismatchError, match="keeps index 4"):
        apply_kept_indices(holder, {("w", 2): np.array([[0, 1], [1, 4], [0, 1]])})
    assert torch.equal(holder.w, values)
    apply_kept_indices(holder, {("w", 2): rows.numpy()})
    assert torch.equal(holder.w, torch.stack([values[s][:, r] for s, r in enumerate(rows)]))


def test_a_budget_plan_gives_each_expert_its_own_neurons():
    model = make("mixtral")
    plan = depprune.make_plan(
        model,
        TOKENS,
        kinds=("neurons",),
        target={"params": "80%"},
        per_expert=True,
        progress=False,
    )
    before = sum(p.numel() for p in model.parameters())
    assert plan.per_expert and plan.params_after(model) <= 0.8 * before
    plan.apply(model)
    assert model(TOKENS).logits.shape == (2, 7, 100)


def test_an_optimizer_statistic_shared_by_the_slices_is_refused():
    from depprune.apply import apply_kept_indices

    holder = nn.Module()
    holder.w = nn.Parameter(torch.randn(3, 2, 4))
    before = holder.w.detach().clone()
    optimizer = torch.optim.SGD([holder.w], lr=0.1)
    optimizer.state[holder.w]["per_column"] = torch.ones(1, 2, 4)  # one row for every slice
    rows = np.array([[0, 1], [1, 2], [2, 3]])
    with pytest.raises(PlanMismatchError, match="shared by slices cut apart"):
        apply_kept_indices(holder, {("w", 2): rows}, optimizers=[optimizer])
    assert torch.equal(holder.w, before) and optimizer.param_groups[0]["params"][0] is holder.w
