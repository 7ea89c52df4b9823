"""Depth pruning's first half: finding removable blocks, scoring them, choosing the kept ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import TINY_DECODER, tokens
from torch import nn

from depprune.depth import (
    LayerImportance,
    LayerList,
    block_influence,
    choose_layers,
    find_layer_lists,
    given_layers,
)
from depprune.errors import ImportanceError, SelectionError, TraceError

pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    """x + W2 relu(W1 x): a shape-preserving block."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Widen(nn.Module):
    """Doubles the width: never removable."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 2 * width)

    def forward(self, x):
        return self.proj(x)


class Blocks(nn.Module):
    """Embed, a ModuleList of residual blocks called in a loop, a head."""

    def __init__(self, depth: int = 4, width: int = 8):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.blocks = nn.ModuleList(Residual(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def state_of(model: nn.Module) -> tuple[dict, list]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def assert_unchanged(model: nn.Module, before: tuple[dict, list]) -> None:
    state, flags = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags
    assert not any(m._forward_hooks or m._forward_hooks_with_kwargs for m in model.modules())


def make_identity(block: Residual) -> None:
    """Zero the block's branch: its output equals its input."""
    with torch.no_grad():
        block.down.weight.zero_()
        block.down.bias.zero_()


# ---------------------------------------------------------------------------------------
# Discovery


def decoder(family: str):
    transformers = pytest.importorskip("transformers")
    shape = dict(TINY_DECODER, num_hidden_layers=3, head_dim=8)
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    if family == "gemma2":
        config = transformers.Gemma2Config(**shape)
        assert len(config.layer_types) == 3
        return transformers.Gemma2ForCausalLM(config)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.OPTConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    return transformers.OPTForCausalLM(config)


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("llama", "model.layers"),
        ("qwen2", "model.layers"),
        ("gemma2", "model.layers"),
        ("gpt2", "transformer.h"),
        ("opt", "model.decoder.layers"),
    ],
)
def test_hf_decoder_layers_are_found_and_removable(family, name):
    model = decoder(family).train()
    before = state_of(model)
    lists = find_layer_lists(model, tokens(0))
    assert lists == [LayerList(name, 3, (0, 1, 2))]
    assert lists[0].child_path(2) == f"{name}.2"
    assert_unchanged(model, before)


def test_bare_hf_model_names_its_own_layers():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaModel(transformers.LlamaConfig(**TINY_DECODER))
    assert find_layer_lists(model, {"input_ids": tokens(0)}) == [LayerList("layers", 2, (0, 1))]


def test_resnet_first_block_of_a_downsampling_stage_is_not_removable():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=4).train()
    before = state_of(model)
    lists = {
        entry.name: entry.removable for entry in find_layer_lists(model, torch.randn(1, 3, 32, 32))
    }
    assert lists == {"layer1": (0, 1), "layer2": (1,), "layer3": (1,), "layer4": (1,)}
    assert_unchanged(model, before)  # BatchNorm running statistics included


def test_vit_encoder_blocks_keep_their_names():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    (found,) = find_layer_lists(model, torch.randn(1, 3, 32, 32))
    assert (found.name, found.size, found.removable) == ("encoder.layers", 3, (0, 1, 2))
    assert found.child_path(1) == "encoder.layers.encoder_layer_1"


def test_sequential_stacks_of_blocks_and_of_linears():
    residual = nn.Sequential(nn.Linear(3, 8), *[Residual() for _ in range(3)], nn.Linear(8, 2))
    # The Linears are repeated too, but change the width; the residual blocks are removable.
    assert find_layer_lists(residual, torch.randn(2, 3)) == [LayerList("", 5, (1, 2, 3))]
    plain = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    # Activations have no parameters: never candidates.
    assert find_layer_lists(plain, torch.randn(2, 3)) == [LayerList("", 5, (2, 4))]


def test_blocks_that_change_the_width_are_not_removable():
    model = nn.Sequential(Widen(4), Widen(8), Widen(16))
    assert find_layer_lists(model, torch.randn(2, 4)) == []


def test_a_block_called_twice_is_not_removable():
    class Shared(Blocks):
        def forward(self, x):
            x = self.embed(x)
            for block in (self.blocks[0], self.blocks[1], self.blocks[1], self.blocks[2]):
                x = block(x)
            return self.head(x)

    assert find_layer_lists(Shared(depth=3), torch.randn(2, 3)) == [LayerList("blocks", 3, (0, 2))]
    block = Residual()
    twice = nn.Sequential(nn.Linear(3, 8), block, block, Residual())
    assert find_layer_lists(twice, torch.randn(2, 3)) == [LayerList("", 4, (3,))]


def test_a_block_off_the_chain_is_not_removable():
    class Parallel(Blocks):
        def forward(self, x):  # every block reads the embedding: no chain
            x = self.embed(x)
            return self.head(sum(block(x) for block in self.blocks))

    assert find_layer_lists(Parallel(), torch.randn(2, 3)) == []


def test_stages_are_pruned_inside_and_blocks_whole():
    stages = nn.Sequential(
        nn.Linear(3, 8),
        nn.Sequential(Residual(), Residual()),
        nn.Sequential(Residual(), Residual(), Residual()),
    )
    # A stage returns what its blocks computed: its blocks are the removable ones.
    assert find_layer_lists(stages, torch.randn(2, 3)) == [
        LayerList("1", 2, (0, 1)),
        LayerList("2", 3, (0, 1, 2)),
    ]

    class Wrapped(nn.Module):  # adds its input to what its inner list computed
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

        def forward(self, x):
            return x + self.inner(x)

    class AddedInPlace(Wrapped):  # as torchvision's MBConv: the inner output, then += input
        def forward(self, x):
            out = self.inner(x)
            out += x
            return out

    for block in (Wrapped, AddedInPlace):
        blocks = nn.Sequential(nn.Linear(3, 8), block(), block())
        assert find_layer_lists(blocks, torch.randn(2, 3)) == [LayerList("", 3, (1, 2))]


def test_a_forward_that_needs_values_runs_on_the_model_itself():
    class Checked(Blocks):
        def forward(self, x):
            if bool((x > 100).any()):  # reads data: cannot run on meta tensors
                raise ValueError("out of range")
            return super().forward(x)

    model = Checked().train()
    before = state_of(model)
    assert find_layer_lists(model, torch.randn(2, 3)) == [LayerList("blocks", 4, (0, 1, 2, 3))]
    assert_unchanged(model, before)


def test_inputs_that_do_not_run_raise_a_trace_error():
    model = Blocks()
    before = state_of(model)
    with pytest.raises(TraceError, match="example_inputs did not run model Blocks"):
        find_layer_lists(model, torch.randn(2, 5))
    assert_unchanged(model, before)


def test_meta_models_are_discovered_without_weights():
    with torch.device("meta"):
        model = Blocks()
    assert find_layer_lists(model, torch.randn(2, 3)) == [LayerList("blocks", 4, (0, 1, 2, 3))]


# ---------------------------------------------------------------------------------------
# Block influence


def calibration(seed: int, batches: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=generator) for _ in range(batches)]


def test_an_identity_block_scores_zero_and_goes_first():
    torch.manual_seed(0)
    model = Blocks().train()
    make_identity(model.blocks[2])
    before = state_of(model)
    importance = block_influence(model, calibration(1), progress=False)
    scores = importance.scores["blocks"]
    assert scores.dtype == torch.float64 and scores.device.type == "cpu"
    assert importance.metric == "cosine" and not importance.exact
    assert abs(scores[2].item()) < 1e-6
    assert (scores[[0, 1, 3]] > 1e-3).all()
    lists = find_layer_lists(model, calibration(1)[0])
    assert choose_layers(lists, importance, 1)["blocks"].tolist() == [0, 1, 3]
    assert_unchanged(model, before)


def test_cosine_score_is_the_mean_of_one_minus_cos_over_positions():
    torch.manual_seed(0)
    model = Blocks(depth=2)
    batches = calibration(2)
    with torch.no_grad():
        hidden = [model.embed(b) for b in batches]
        outputs = [model.blocks[0](h) for h in hidden]
    expected = torch.cat(
        [
            1 - nn.functional.cosine_similarity(h, o, dim=-1)
            for h, o in zip(hidden, outputs, strict=True)
        ]
    ).mean()
    score = block_influence(model, batches, progress=False).scores["blocks"][0]
    assert score.item() == pytest.approx(expected.item(), rel=1e-5)


def test_feature_maps_are_compared_along_channels():
    class ConvBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    torch.manual_seed(0)
    model = nn.Sequential(ConvBlock(), ConvBlock())
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        y = model[0](x)
    per_pixel = nn.functional.cosine_similarity(x, y, dim=1)  # (2, 5, 6)
    expected = torch.arccos(per_pixel.clamp(-1, 1)).mean() / math.pi
    score = block_influence(model, [x], metric="angular", progress=False).scores[""]
    assert score[0].item() == pytest.approx(expected.item(), rel=1e-5)
    along_width = block_influence(model, [x], metric="angular", dim=-1, progress=False)
    assert along_width.scores[""][0].item() != pytest.approx(score[0].item(), rel=1e-3)


def test_angular_and_cosine_order_blocks_alike():
    torch.manual_seed(0)
    model = Blocks(depth=4)
    with torch.no_grad():  # branches of growing strength: ever larger changes
        for k, block in enumerate(model.blocks):
            block.down.weight.mul_(0.1 * 4**k)
    cosine = block_influence(model, calibration(3), progress=False).scores["blocks"]
    angular = block_influence(model, calibration(3), metric="angular", progress=False)
    assert torch.argsort(cosine).tolist() == [0, 1, 2, 3]
    assert torch.argsort(angular.scores["blocks"]).tolist() == [0, 1, 2, 3]
    assert angular.metric == "angular"


def test_padding_positions_are_left_out():
    model = decoder("llama").eval()
    ids = tokens(4)
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 4 + [0] * 3] * 2)}
    short = block_influence(model, [{"input_ids": ids[:, :4]}], progress=False)
    masked = block_influence(model, [padded], progress=False)
    full = block_influence(model, [{"input_ids": ids}], progress=False)
    torch.testing.assert_close(masked.scores["model.layers"], short.scores["model.layers"])
    assert not torch.allclose(full.scores["model.layers"], short.scores["model.layers"])


def test_non_removable_children_score_inf():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    importance = block_influence(model, [torch.randn(1, 3, 32, 32)], progress=False)
    assert importance.scores["layer2"][0].item() == math.inf
    assert 0 < importance.scores["layer2"][1].item() < math.inf


def test_block_influence_refuses_meta_weights_and_empty_calibration():
    with torch.device("meta"):
        model = Blocks()
    with pytest.raises(ImportanceError, match="meta device"):
        block_influence(model, calibration(0), progress=False)
    model = Blocks()
    with pytest.raises(ImportanceError, match="calibration gave no batches"):
        block_influence(model, [], progress=False)
    with pytest.raises(ImportanceError, match="no removable repeated blocks"):
        block_influence(nn.Sequential(Widen(3), Widen(6)), calibration(0), progress=False)
    with pytest.raises(ImportanceError, match="has no removable child"):
        block_influence(model, calibration(0), lists=[LayerList("blocks", 4, ())], progress=False)
    with pytest.raises(ImportanceError, match="'head' is not a ModuleList or Sequential"):
        block_influence(model, calibration(0), lists=[LayerList("head", 4, (0,))], progress=False)
    with pytest.raises(ImportanceError, match="unknown block influence metric"):
        block_influence(model, calibration(0), metric="euclid", progress=False)


def test_a_failing_batch_leaves_the_model_as_it_was():
    model = Blocks().train()
    before = state_of(model)
    batches = [*calibration(0), torch.randn(4, 9)]
    with pytest.raises(ImportanceError, match="calibration batch 2 did not run model Blocks"):
        block_influence(model, batches, progress=False)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------
# Given layers


def test_given_layers_are_exact():
    model = Blocks()
    chosen = given_layers(model, torch.randn(2, 3), {"blocks": [3, 1, 1]})
    assert chosen.exact and chosen.metric == "given"
    assert chosen.scores["blocks"].tolist() == [0.0, -math.inf, 0.0, -math.inf]
    lists = find_layer_lists(model, torch.randn(2, 3))
    again = given_layers(model, lists, {"blocks": [1, 3]})
    assert again.scores["blocks"].tolist() == chosen.scores["blocks"].tolist()
    kept = choose_layers(lists, chosen, 0.75, consecutive=True)
    assert kept["blocks"].tolist() == [0, 2]


def test_given_layers_name_the_list_the_index_and_the_removable_ones():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=4)
    inputs = torch.randn(1, 3, 32, 32)
    lists = find_layer_lists(model, inputs)
    with pytest.raises(
        SelectionError, match=r"child 0 of layer list 'layer2'.*removable ones are \[1\]"
    ):
        given_layers(model, lists, {"layer2": [0]})
    with pytest.raises(SelectionError, match=r"child 7 of layer list 'layer1'.*\[0, 1\]"):
        given_layers(model, lists, {"layer1": [7]})
    with pytest.raises(SelectionError, match=r"'fc' is not a layer list.*'layer1'"):
        given_layers(model, lists, {"fc": [0]})
    with pytest.raises(SelectionError, match="must be integers; got True"):
        given_layers(model, lists, {"layer1": [True]})
    with pytest.raises(SelectionError, match="must be a list of integers"):
        given_layers(model, lists, {"layer1": "01"})
    with pytest.raises(SelectionError, match="must map layer list names"):
        given_layers(model, lists, [0, 1])


# ---------------------------------------------------------------------------------------
# Choosing


LISTS = [LayerList("a", 6, (0, 1, 2, 3, 4, 5)), LayerList("b", 4, (1, 3))]
SCORES = LayerImportance(
    {
        "a": torch.tensor([0.5, 0.1, 0.4, 0.3, 0.2, 0.9], dtype=torch.float64),
        "b": torch.tensor([math.inf, 0.7, math.inf, 0.6], dtype=torch.float64),
    },
    "cosine",
)


def test_ratio_removes_the_lowest_scores_rounded_half_up():
    kept = choose_layers(LISTS, SCORES, 0.5)
    assert {k: v.tolist() for k, v in kept.items()} == {"a": [0, 2, 5], "b": [0, 1, 2]}
    assert kept["a"].dtype == np.int64
    assert choose_layers(LISTS, SCORES, 0.0) == {}
    counted = choose_layers(LISTS, SCORES, 2)
    assert {k: v.tolist() for k, v in counted.items()} == {"a": [0, 2, 3, 5], "b": [0, 2]}
    only_b = choose_layers(LISTS, SCORES, {"b": 1.0})
    assert {k: v.tolist() for k, v in only_b.items()} == {"b": [0, 2]}


def test_min_layers_caps_the_removal():
    kept = choose_layers(LISTS, SCORES, 1.0, min_layers=4)
    assert {k: v.tolist() for k, v in kept.items()} == {"a": [0, 2, 3, 5]}
    assert choose_layers(LISTS, SCORES, 10, min_layers=0)["a"].tolist() == []


def test_ties_remove_the_lower_position_first():
    flat = LayerImportance({"a": torch.zeros(6, dtype=torch.float64)}, "cosine")
    assert choose_layers(LISTS[:1], flat, 2)["a"].tolist() == [2, 3, 4, 5]
    assert choose_layers(LISTS[:1], flat, 2, consecutive=True)["a"].tolist() == [2, 3, 4, 5]


def test_consecutive_removes_the_cheapest_run():
    # Windows of 3: 1.0, 0.8, 0.9, 1.4: positions 1..3 (0.1 + 0.4 + 0.3).
    kept = choose_layers(LISTS[:1], SCORES, 3, consecutive=True)
    assert kept["a"].tolist() == [0, 4, 5]
    assert choose_layers(LISTS[:1], SCORES, 3)["a"].tolist() == [0, 2, 5]
    with pytest.raises(SelectionError, match=r"no 2 adjacent removable children.*longest run is 1"):
        choose_layers(LISTS[1:], SCORES, 2, consecutive=True)


def test_bad_amounts_and_scores_raise_selection_errors():
    with pytest.raises(SelectionError, match="give a float in"):
        choose_layers(LISTS, SCORES, 1.5)
    with pytest.raises(SelectionError, match="give a count of 0 or more"):
        choose_layers(LISTS, SCORES, -1)
    with pytest.raises(SelectionError, match="must be a ratio"):
        choose_layers(LISTS, SCORES, True)
    with pytest.raises(SelectionError, match=r"ratios name \['c'\]"):
        choose_layers(LISTS, SCORES, {"c": 0.5})
    with pytest.raises(SelectionError, match="min_layers must be"):
        choose_layers(LISTS, SCORES, 0.5, min_layers=-1)
    with pytest.raises(SelectionError, match="no scores for layer list 'z'"):
        choose_layers([LayerList("z", 2, (0, 1))], SCORES, 0.5)
    nan = LayerImportance({"a": torch.full((6,), math.nan, dtype=torch.float64)}, "cosine")
    with pytest.raises(SelectionError, match="hold NaN"):
        choose_layers(LISTS[:1], nan, 0.5)
    short = LayerImportance({"a": torch.zeros(5, dtype=torch.float64)}, "cosine")
    with pytest.raises(SelectionError, match="list has 6 children"):
        choose_layers(LISTS[:1], short, 0.5)


def test_exact_choices_remove_exactly_their_children():
    exact = LayerImportance(
        {"a": torch.tensor([0, -math.inf, 0, 0, -math.inf, 0], dtype=torch.float64)},
        "given",
        exact=True,
    )
    assert choose_layers(LISTS[:1], exact, 0.0)["a"].tolist() == [0, 2, 3, 5]
    with pytest.raises(SelectionError, match="fewer than min_layers=5"):
        choose_layers(LISTS[:1], exact, 0.0, min_layers=5)
    wrong = LayerImportance(
        {"b": torch.tensor([-math.inf, 0, 0, 0], dtype=torch.float64)}, "given", exact=True
    )
    with pytest.raises(SelectionError, match=r"children \[0\] of 'b', which are not removable"):
        choose_layers(LISTS[1:], wrong, 0.0)
