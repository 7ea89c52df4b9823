"""Wanda layer by layer from a checkpoint: the same norms and plan as with the model loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import depprune
from depprune.errors import ImportanceError
from depprune.importance import wanda
from depprune.io import Checkpoint, plan_checkpoint
from depprune.io.layerwise import _run_tail, blocks_of, layerwise_wanda

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = [torch.tensor([[1, 5, 9, 3, 7, 2]]), torch.tensor([[4, 4, 8, 1], [2, 3, 5, 7]])]


@pytest.fixture
def checkpoint_dir(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src", max_shard_size="30KB")
    return tmp_path / "src"


def test_layer_by_layer_norms_equal_the_loaded_models(checkpoint_dir):
    loaded = transformers.LlamaForCausalLM.from_pretrained(checkpoint_dir).eval()
    expected = wanda(loaded, BATCHES, progress=False).input_norms
    found = layerwise_wanda(
        checkpoint_dir, Checkpoint(checkpoint_dir), BATCHES, progress=False
    ).input_norms
    assert found.keys() == expected.keys()
    for name, norm in expected.items():
        torch.testing.assert_close(found[name], norm, rtol=1e-5, atol=1e-6, msg=name)


def test_the_streamed_wanda_plan_is_the_in_memory_plan(checkpoint_dir):
    kinds = ("heads", "neurons")
    plan = plan_checkpoint(
        checkpoint_dir,
        ratio=0.5,
        kinds=kinds,
        importance="wanda",
        calibration=BATCHES,
        progress=False,
    )
    loaded = transformers.LlamaForCausalLM.from_pretrained(checkpoint_dir).eval()
    expected = depprune.make_plan(
        loaded,
        {"input_ids": BATCHES[0]},
        ratio=0.5,
        kinds=kinds,
        importance=wanda(loaded, BATCHES, progress=False),
    )
    assert plan.kept.keys() == expected.kept.keys()
    for key, kept in plan.kept.items():
        np.testing.assert_array_equal(kept, expected.kept[key])


def test_wanda_without_calibration_says_what_to_pass(checkpoint_dir):
    with pytest.raises(ImportanceError, match="calibration"):
        plan_checkpoint(checkpoint_dir, importance="wanda", progress=False)
    with pytest.raises(ImportanceError, match="unknown importance"):
        plan_checkpoint(checkpoint_dir, importance="l3", progress=False)


class NotAChain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])

    def forward(self, x):
        first = self.blocks[0](x)
        return self.blocks[1](x) + first  # the second block reads the input, not the first's output


def test_blocks_that_are_not_a_chain_are_refused():
    model = NotAChain()
    assert blocks_of(model)[0] == "blocks"
    x = torch.ones(1, 2)
    with pytest.raises(ImportanceError, match="previous block's output"):
        _run_tail(model, model.blocks, [((x,), {})], [model.blocks[1](model.blocks[0](x))], False)
    assert "forward" not in vars(model.blocks[0])  # the blocks are restored


def test_batches_the_model_cannot_take_are_an_importance_error(checkpoint_dir):
    with pytest.raises(ImportanceError, match="layer-by-layer Wanda forward failed"):
        layerwise_wanda(
            checkpoint_dir, Checkpoint(checkpoint_dir), [torch.ones(1, 3)], progress=False
        )


def test_one_block_is_resident_at_a_time(checkpoint_dir, monkeypatch):
    from depprune.io import layerwise

    resident_after_drop = []
    drop = layerwise._Resident.drop

    def recording_drop(self, module):
        drop(self, module)
        # What the bookkeeping still holds: only tensors outside the blocks may stay.
        resident_after_drop.append(sum(p.numel() for p in self.real_of.values()))

    monkeypatch.setattr(layerwise._Resident, "drop", recording_drop)
    layerwise_wanda(checkpoint_dir, Checkpoint(checkpoint_dir), BATCHES, progress=False)
    loaded = transformers.LlamaForCausalLM.from_pretrained(checkpoint_dir)
    outside = sum(p.numel() for n, p in loaded.named_parameters() if ".layers." not in n)
    assert resident_after_drop == [outside] * 3
