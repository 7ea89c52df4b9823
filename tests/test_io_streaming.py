"""Streaming a checkpoint: the file-to-file cut equals the in-memory prune, byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import depprune
from depprune.errors import CheckpointError, PlanMismatchError
from depprune.importance import magnitude
from depprune.io import Checkpoint, apply_to_checkpoint, load_skeleton, plan_checkpoint

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("hidden", "heads", "neurons")
TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def tiny_llama(tied: bool, dtype: torch.dtype = torch.float32, layers: int = 2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def save(model, folder: Path, sharded: bool) -> Path:
    model.save_pretrained(folder, max_shard_size="20KB" if sharded else "5GB")
    (folder / "tokenizer.json").write_text('{"dummy": true}')
    return folder


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})
    return found


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize(
    ("tied", "sharded", "dtype"),
    [(True, False, torch.float32), (False, True, torch.float32), (True, True, torch.bfloat16)],
)
def test_streamed_cut_is_byte_identical_to_the_in_memory_prune(tmp_path, tied, sharded, dtype):
    src = save(tiny_llama(tied, dtype), tmp_path / "src", sharded)
    assert (src / "model.safetensors.index.json").exists() == sharded
    plan = plan_checkpoint(src, ratio=0.5, kinds=KINDS, progress=False)

    # The plan scored from the files is the plan scored from the loaded weights.
    loaded = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    in_memory = depprune.make_plan(
        loaded, {"input_ids": TOKENS}, ratio=0.5, kinds=KINDS, importance=magnitude(2)
    )
    assert plan.kept.keys() == in_memory.kept.keys()
    for key, kept in plan.kept.items():
        np.testing.assert_array_equal(kept, in_memory.kept[key])

    report = apply_to_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert report.tensors_cut > 0 and report.params_after < report.params_before
    plan.apply(loaded)
    loaded.save_pretrained(tmp_path / "memory")

    streamed, memory = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for name, tensor in streamed.items():
        assert tensor.dtype == memory[name].dtype == dtype or tensor.dtype == memory[name].dtype
        assert torch.equal(bits(tensor), bits(memory[name])), name
    # Same partition into shards, a valid index, the other files copied.
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(
        p.name for p in src.glob("*.safetensors")
    )
    if sharded:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == report.bytes_written
        assert set(index["weight_map"]) == set(streamed)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"dummy": true}'

    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, loaded(TOKENS).logits)
    if tied:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_a_saved_plan_file_streams_and_is_proved_again(tmp_path):
    src = save(tiny_llama(False), tmp_path / "src", sharded=False)
    plan_checkpoint(src, ratio=0.25, kinds=("neurons",), progress=False).save(tmp_path / "p.npz")
    plan = depprune.Plan.load(tmp_path / "p.npz")
    ticks = []
    report = apply_to_checkpoint(
        src, plan, tmp_path / "out", progress=False, callback=lambda *a: ticks.append(a)
    )
    assert ticks[-1] == (report.bytes_read, report.bytes_read, report.tensors, report.tensors)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["intermediate_size"] == 48
    # Fields the cut does not change are written exactly as the source had them.
    source = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "intermediate_size"} == {
        k: v for k, v in source.items() if k != "intermediate_size"
    }


def nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_plan_for_another_shape_is_refused_before_writing(tmp_path):
    src = save(tiny_llama(False, layers=1), tmp_path / "src", sharded=False)
    narrower = tiny_llama(False, layers=1).config
    narrower.intermediate_size = 32
    transformers.LlamaForCausalLM(narrower).save_pretrained(tmp_path / "narrow")
    plan = plan_checkpoint(tmp_path / "narrow", ratio=0.5, kinds=("neurons",), progress=False)
    with pytest.raises(CheckpointError, match="was made for"):
        apply_to_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path)
    # A config.json that is not the checkpoint's own is refused when planning too.
    (src / "config.json").write_text((tmp_path / "narrow" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"config\.json the checkpoint's own"):
        plan_checkpoint(src, ratio=0.5, kinds=("neurons",), progress=False)


def test_a_tensor_missing_from_the_checkpoint_is_refused_before_writing(tmp_path):
    src = save(tiny_llama(False, layers=1), tmp_path / "src", sharded=False)
    plan = plan_checkpoint(src, ratio=0.5, kinds=("neurons",), progress=False)
    tensors = tensors_of(src)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not store"):
        apply_to_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path)


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    src = save(tiny_llama(False, layers=1), tmp_path / "src", sharded=False)
    plan = plan_checkpoint(src, ratio=0.5, kinds=("neurons",), progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="exists"):
        apply_to_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "old.txt").exists()
    apply_to_checkpoint(src, plan, tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "old.txt").exists()
    assert Checkpoint(tmp_path / "out").shape("model.layers.0.mlp.up_proj.weight") == (32, 32)
    with pytest.raises(CheckpointError, match="being read"):
        apply_to_checkpoint(src, plan, src, overwrite=True, progress=False)


def test_an_interrupted_run_leaves_no_checkpoint(tmp_path):
    src = save(tiny_llama(False), tmp_path / "src", sharded=True)
    plan = plan_checkpoint(src, ratio=0.5, kinds=("neurons",), progress=False)

    def interrupt(done, total, tensors, count):
        if tensors == count // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        apply_to_checkpoint(src, plan, tmp_path / "out", progress=False, callback=interrupt)
    assert nothing_written(tmp_path)


def test_a_config_that_cannot_describe_the_cut_writes_nothing(tmp_path):
    src = save(tiny_llama(False), tmp_path / "src", sharded=False)
    model = load_skeleton(src)
    graph = depprune.trace(model, {"input_ids": TOKENS.to("meta")})
    neurons = graph.groups("neurons")
    # Different widths per layer: one config.json cannot size both MLPs.
    removed = {neurons[0].index: np.arange(8), neurons[1].index: np.arange(16)}
    plan = depprune.Plan.from_kept(
        model, graph.kept_indices(removed), example_inputs={"input_ids": TOKENS}
    )
    with pytest.warns(depprune.ConfigWarning), pytest.raises(CheckpointError, match="config"):
        apply_to_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path)


def test_an_edited_plan_is_refused(tmp_path):
    src = save(tiny_llama(False, layers=1), tmp_path / "src", sharded=False)
    plan = plan_checkpoint(src, ratio=0.5, kinds=("neurons",), progress=False)
    key = ("model.layers.0.mlp.up_proj.weight", 0)
    edited = depprune.Plan(
        kept={**plan.kept, key: plan.kept[key][:-1]}, shapes=plan.shapes, inputs=plan.inputs
    )
    with pytest.raises(PlanMismatchError):
        apply_to_checkpoint(src, edited, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path)


def test_damaged_and_missing_checkpoints_say_so(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        Checkpoint(tmp_path / "empty")
    src = save(tiny_llama(False, layers=1), tmp_path / "src", sharded=False)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(src)
    (src / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"not a safetensors file|damaged"):
        Checkpoint(src)


def test_other_weight_formats_are_left_out(tmp_path):
    src = save(tiny_llama(False, layers=1), tmp_path / "src", sharded=False)
    (src / "pytorch_model.bin").write_bytes(b"unpruned weights")
    plan = plan_checkpoint(src, ratio=0.5, kinds=("neurons",), progress=False)
    report = apply_to_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert report.skipped == ["pytorch_model.bin"]
    assert "tokenizer.json" in report.copied
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert "pytorch_model.bin" in str(report)


@pytest.mark.parametrize("code", ["F8_E4M3", "I8", "BF16", "F64"])
def test_every_byte_width_is_cut_bit_for_bit(code):
    from depprune.io.safetensors_files import DTYPE_BYTES, TensorEntry, cut_bytes

    width = DTYPE_BYTES[code]
    raw = np.random.default_rng(0).integers(0, 256, size=3 * 5 * width, dtype=np.uint8)
    entry = TensorEntry("t", code, (3, 5), 0, raw.size)
    rows, cols = np.array([0, 2]), np.array([1, 3, 4])
    cut = cut_bytes(raw, entry, {0: rows, 1: cols})
    expected = raw.reshape(3, 5, width)[rows][:, cols]
    assert cut.tobytes() == expected.tobytes()


def test_os_copy_fallback_copies_exactly(tmp_path, monkeypatch):
    from depprune.io import safetensors_files

    source = tmp_path / "a"
    source.write_bytes(bytes(range(256)) * 1000)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    with open(source, "rb") as handle, open(tmp_path / "b", "wb", buffering=0) as out:
        safetensors_files.copy_range(handle, out, 100, 5000)
    assert (tmp_path / "b").read_bytes() == source.read_bytes()[100:5100]


class SmallResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = x + self.conv2(x).relu()
        return self.head(x.mean(dim=(2, 3)))


def test_any_module_streams_with_its_architecture_given(tmp_path):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    (tmp_path / "src").mkdir()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "src" / "model.safetensors")
    skeleton = SmallResNet().to("meta")
    plan = plan_checkpoint(tmp_path / "src", model=skeleton, example_inputs=x, ratio=0.5)
    apply_to_checkpoint(tmp_path / "src", plan, tmp_path / "out", model=skeleton, progress=False)
    assert skeleton.conv1.weight.is_meta and skeleton.conv1.out_channels == 8  # unchanged
    plan.apply(model)
    pruned = SmallResNet().eval()
    plan.apply(pruned)
    written = tensors_of(tmp_path / "out")
    pruned.load_state_dict(written, strict=True)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        apply_to_checkpoint(tmp_path / "src", plan, tmp_path / "out2", progress=False)


def test_direct_reads_give_the_buffered_bytes(tmp_path):
    from depprune.io.safetensors_files import buffer_for

    src = save(tiny_llama(False, dtype=torch.bfloat16), tmp_path / "src", sharded=True)
    buffered, direct = Checkpoint(src, direct=False), Checkpoint(src, direct=True)
    assert not Checkpoint(src).direct  # a small checkpoint goes through the page cache
    reused = buffer_for(direct.largest)
    for name in buffered.names:
        expected = buffered.read_raw(name).tobytes()
        assert direct.read_raw(name).tobytes() == expected, name
        assert direct.read_raw(name, reused).tobytes() == expected, name  # a reused buffer


def test_a_scaled_embedding_streams_exactly(tmp_path):
    # Gemma multiplies embeddings by sqrt(hidden_size): cutting the hidden size moves the old
    # scale into the weights (and into the final norm the tied head reads), on disk too.
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=50,
    )
    transformers.GemmaForCausalLM(config).eval().save_pretrained(tmp_path / "src")
    plan = plan_checkpoint(tmp_path / "src", ratio=0.5, kinds=KINDS, progress=False)
    apply_to_checkpoint(tmp_path / "src", plan, tmp_path / "out", progress=False)
    model = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "src").eval()
    plan.apply(model)
    model.save_pretrained(tmp_path / "memory")
    streamed, memory = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for name, tensor in streamed.items():
        assert torch.equal(bits(tensor), bits(memory[name])), name
    reloaded = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)


def test_a_checkpoint_transformers_renames_on_load_is_refused(tmp_path):
    # transformers 5 stores Mixtral's experts one by one and fuses them when it loads them.
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        num_local_experts=4,
    )
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "src")
    with pytest.raises(CheckpointError, match=r"under other names.*in memory"):
        plan_checkpoint(tmp_path / "src", ratio=0.5, progress=False)
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "src").eval()
    plan = depprune.make_plan(loaded, {"input_ids": TOKENS}, ratio=0.5, kinds=("hidden",))
    with pytest.raises(CheckpointError, match="does not store"):
        apply_to_checkpoint(tmp_path / "src", plan, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path)


def test_legacy_tensor_names_are_renamed_as_transformers_does(tmp_path):
    # transformers 5 saves ViT under its legacy names (encoder.layer.0.attention.attention.key)
    # and renames them on load (layers.0.attention.k_proj): planning and the cut follow it.
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    transformers.ViTForImageClassification(config).eval().save_pretrained(tmp_path / "src")
    stored = Checkpoint(tmp_path / "src").names
    skeleton = load_skeleton(tmp_path / "src")
    assert not set(stored) <= set(skeleton.state_dict())  # the names do differ
    plan = plan_checkpoint(tmp_path / "src", ratio=0.5, progress=False)
    apply_to_checkpoint(tmp_path / "src", plan, tmp_path / "out", progress=False)
    model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "src").eval()
    in_memory = depprune.make_plan(
        model, {"pixel_values": torch.zeros(1, 3, 16, 16)}, ratio=0.5, importance=magnitude(2)
    )
    assert plan.kept.keys() == in_memory.kept.keys()
    for key, kept in plan.kept.items():
        np.testing.assert_array_equal(kept, in_memory.kept[key])
    plan.apply(model)
    model.save_pretrained(tmp_path / "memory")
    streamed, memory = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "memory")
    assert streamed.keys() == memory.keys() == set(stored)
    for name, tensor in streamed.items():
        assert torch.equal(bits(tensor), bits(memory[name])), name
    reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).logits, model(pixels).logits)


def test_a_failed_write_is_a_checkpoint_error_and_leaves_nothing(tmp_path, monkeypatch):
    from depprune.io import streaming

    src = save(tiny_llama(False, layers=1), tmp_path / "src", sharded=False)
    plan = plan_checkpoint(src, ratio=0.5, kinds=("neurons",), progress=False)

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streaming, "write_all", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*nothing was written"):
        apply_to_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path)
