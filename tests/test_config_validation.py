"""A pruned Hugging Face model's config must pass the checks save_pretrained runs."""

import torch
import transformers
from tiny_models import TINY_DECODER, tokens

import depprune
from depprune.methods import unstructured


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER)).eval()


def round_trips(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens(1)
    with torch.no_grad():
        return torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_hidden_size_the_heads_do_not_divide_is_kept_whole_and_the_model_saves(tmp_path):
    model = llama()
    # 30% of 32 leaves 23, which LlamaConfig's validation rejects with 4 attention heads.
    report = depprune.prune(model, tokens(0), ratio=0.3, progress=False)
    assert model.config.hidden_size == 32
    assert any("hidden" in why and "not a multiple" in why for why in report.kept_whole)
    assert model.config.intermediate_size < 64  # the rest is still pruned
    assert round_trips(model, tmp_path)


def test_masked_weights_are_described_by_the_config_like_plain_ones(tmp_path):
    plain, masked = llama(), llama()
    unstructured.prune(masked, amount=0.5)
    with torch.no_grad():
        masked(tokens(0))  # torch.nn.utils.prune's hooks set the masked weights
    expected = depprune.prune(plain, tokens(0), ratio=0.5, progress=False)
    report = depprune.prune(masked, tokens(0), ratio=0.5, progress=False)
    assert report.params_after < report.params_before
    assert masked.config.to_dict() == plain.config.to_dict()
    assert len(report.kept_whole) == len(expected.kept_whole)
    unstructured.make_permanent(masked)
    assert round_trips(masked, tmp_path)
