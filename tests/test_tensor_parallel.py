"""Tensor parallelism: plans that keep every rank's share equal, TP models and per-rank shards.

The two-process test runs transformers' own tensor parallelism (``tp_plan="auto"``)
over gloo: the same plan cuts the TP model in memory and its per-rank
checkpoint folders, and both must equal the plain model pruned by the plan
(and what transformers shards from the pruned full checkpoint).
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from gloo_workers import run_workers
from tiny_models import TINY_DECODER, tokens

import depprune
from depprune.distributed import TensorParallel, apply_to_tp_shards
from depprune.distributed.tensor_parallel import Split
from depprune.errors import CheckpointError, PlanMismatchError, SelectionError

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# The tiny decoder with 8 query heads over 4 KV heads: two KV heads and their queries per rank.
_CONFIG = {
    **TINY_DECODER,
    "intermediate_size": 48,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 8,
}


def _llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**_CONFIG, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def _rank_state(model, splits: dict[str, Split], ranks: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s local tensors, split as transformers' tp_plan splits them."""
    state = {}
    for name, tensor in model.state_dict().items():
        split = splits.get(name)
        if split is not None:
            parts = tensor.chunk(split.parts, dim=split.dim)
            tensor = torch.cat([p.chunk(ranks, dim=split.dim)[rank] for p in parts], split.dim)
        state[name] = tensor.contiguous()
    return state


def test_a_tensor_parallel_plan_keeps_equal_shares_per_rank():
    model = _llama()
    x = tokens(0)
    plan = depprune.make_plan(model, x, ratio=0.5, tensor_parallel=2)
    assert plan.choices["tensor_parallel"] == 2
    splits = TensorParallel(2).splits(model)
    assert splits["model.layers.0.self_attn.q_proj.weight"] == Split(0)
    assert splits["model.layers.0.self_attn.o_proj.weight"] == Split(1)
    assert "model.layers.0.self_attn.o_proj.bias" not in splits  # rowwise bias: replicated
    for (name, dim), kept in plan.kept.items():
        split = splits.get(name)
        if split is not None and split.dim == dim:
            counts = split.counts(kept, plan.shapes[name][dim], 2)
            assert (counts == counts[0, 0]).all(), (name, counts)
    heads = [g for g in plan.groups if g.kind == "heads" and g.size == 4]
    assert heads and all(g.kept == 2 for g in heads)  # one KV head of each rank's two
    # The same plan without the constraint keeps what the ranking says, unevenly here.
    free = depprune.make_plan(model, x, ratio=0.5)
    free.choices["tensor_parallel_splits"] = plan.choices["tensor_parallel_splits"]
    with pytest.raises(PlanMismatchError, match="tensor_parallel=2"):
        TensorParallel(2).check(free)
    # A 2-rank plan holds for one rank; a 4-rank split of 4 KV heads keeps one per rank.
    TensorParallel(1).check(plan)
    four = depprune.make_plan(model, x, ratio=0.5, tensor_parallel=4)
    assert all(g.kept % 4 == 0 for g in four.groups if g.kind == "neurons")
    # A budget search keeps the shares equal too (the search's tp_size, then the constraint).
    budget = depprune.make_plan(model, x, target={"params": "60%"}, tensor_parallel=2)
    TensorParallel(2).check(budget)
    assert budget.params_after(model) < model.num_parameters()


def _qwen3_moe(seed: int):
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        **{**_CONFIG, "intermediate_size": 32},
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


@pytest.mark.parametrize("build", [_llama, _qwen3_moe], ids=["llama", "qwen3_moe"])
def test_the_local_cuts_of_every_rank_make_up_the_global_cut(build):
    model = build(1)
    plan = depprune.make_plan(model, tokens(1), ratio=0.5, tensor_parallel=2)
    splits = TensorParallel(2).splits(model)
    pruned = build(1)
    plan.apply(pruned)
    # Fused experts: gate and up packed in one tensor, each half split over the ranks.
    assert any(s.parts == 2 for s in splits.values()) == (build is _qwen3_moe)
    for rank in range(2):
        local = _rank_state(model, splits, 2, rank)
        expected = _rank_state(pruned, splits, 2, rank)
        for (name, dim), kept in TensorParallel(2).local_kept(plan, rank).items():
            local[name] = local[name].index_select(dim, torch.from_numpy(kept))
        for name, tensor in expected.items():
            assert torch.equal(local[name], tensor), name


def test_packed_splits_keep_each_half_balanced():
    split = Split(dim=0, parts=2)  # gate and up fused: rank r holds chunk r of each half
    kept = np.array([0, 2, 5, 6, 8, 9, 13, 15])  # of 16: halves of 8, chunks of 4
    assert split.counts(kept, 16, 2).tolist() == [[2, 2], [2, 2]]
    assert split.local(kept, 16, 2, 0).tolist() == [0, 2, 4, 5]
    assert split.local(kept, 16, 2, 1).tolist() == [1, 2, 5, 7]


def test_models_without_a_tp_plan_and_uneven_sizes_are_refused_with_the_fix():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    with pytest.raises(SelectionError, match="no tensor-parallel plan"):
        depprune.make_plan(mlp, torch.zeros(1, 4), tensor_parallel=2)
    given = TensorParallel(4, plan={"0": "colwise", "2": "rowwise"})
    with pytest.raises(SelectionError, match="4 tensor-parallel ranks cannot split evenly"):
        depprune.make_plan(mlp, torch.zeros(1, 4), tensor_parallel=given)
    plan = depprune.make_plan(mlp, torch.zeros(1, 4), tensor_parallel=TensorParallel(2, given.plan))
    assert plan.groups[0].kept % 2 == 0
    with pytest.raises(SelectionError, match="not one depprune knows"):
        depprune.make_plan(mlp, torch.zeros(1, 4), tensor_parallel=TensorParallel(2, {"0": "odd"}))
    with pytest.raises(SelectionError, match="positive int"):
        depprune.make_plan(mlp, torch.zeros(1, 4), tensor_parallel=0)


def _save_rank_folders(model, splits, ranks: int, root) -> list[str]:
    folders = []
    for rank in range(ranks):
        folder = os.path.join(root, f"rank{rank}")
        os.makedirs(folder)
        state = _rank_state(model, splits, ranks, rank)
        state.pop("lm_head.weight", None)  # tied to the embedding, as save_pretrained stores it
        safetensors_torch.save_file(
            state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"}
        )
        model.config.save_pretrained(folder)
        folders.append(folder)
    return folders


def test_per_rank_folders_are_cut_to_the_pruned_models_shards(tmp_path):
    model = _llama(2, tie_word_embeddings=True)
    plan = depprune.make_plan(model, tokens(2), ratio=0.5, tensor_parallel=2)
    splits = TensorParallel(2).splits(model)
    sources = _save_rank_folders(model, splits, 2, tmp_path / "in")
    outs = [str(tmp_path / "out" / f"rank{r}") for r in range(2)]
    plan.save(tmp_path / "plan.npz")  # the splits travel in the plan file
    plan = depprune.Plan.load(tmp_path / "plan.npz")
    reports = apply_to_tp_shards(sources, plan, outs, progress=False)
    stored_cut = {n for n, _ in plan.kept} - {"lm_head.weight"}  # tied: stored once
    assert [r.tensors_cut for r in reports] == [len(stored_cut)] * 2
    pruned = _llama(2, tie_word_embeddings=True)
    plan.apply(pruned)
    for rank, out in enumerate(outs):
        written = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
        expected = _rank_state(pruned, splits, 2, rank)
        for name, tensor in written.items():
            assert torch.equal(tensor, expected[name]), name
        config = json.loads(open(os.path.join(out, "config.json")).read())
        assert config["num_key_value_heads"] == pruned.config.num_key_value_heads
        assert config["intermediate_size"] == pruned.config.intermediate_size
    # Folders of another rank count, or another model's shards, write nothing.
    with pytest.raises(PlanMismatchError, match="tensor-parallel"):
        apply_to_tp_shards(sources[:1] * 3, plan, [str(tmp_path / f"x{i}") for i in range(3)])
    with pytest.raises(CheckpointError, match="not this model's tensor-parallel shards"):
        apply_to_tp_shards(
            _save_rank_folders(model, {}, 2, tmp_path / "whole"),  # full tensors in each folder
            plan,
            [str(tmp_path / "y0"), str(tmp_path / "y1")],
        )
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("x", "y", ".y", ".x"))]


def _tp_worker(rank: int, store_path: str, folder: str) -> None:
    import torch.distributed as dist

    from depprune.distributed import broadcast_plan

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        source = os.path.join(folder, "full")
        sharded = transformers.LlamaForCausalLM.from_pretrained(source, tp_plan="auto").eval()
        plain = transformers.LlamaForCausalLM.from_pretrained(source).eval()
        x = tokens(3)
        # This rank's shards, as a tensor-parallel run saves them.
        own = os.path.join(folder, f"rank{rank}")
        os.makedirs(own)
        local = {
            name: (p.to_local() if hasattr(p, "to_local") else p).detach().contiguous()
            for name, p in sharded.state_dict().items()
        }
        local.pop("lm_head.weight")  # tied
        safetensors_torch.save_file(local, os.path.join(own, "model.safetensors"))
        sharded.config.save_pretrained(own)

        uneven = broadcast_plan(depprune.make_plan(plain, x, ratio=0.5) if rank == 0 else None)
        with torch.no_grad():
            before = sharded(x).logits
        try:
            uneven.apply(sharded)
            refused = False
        except PlanMismatchError:
            refused = True
        with torch.no_grad():
            unchanged = torch.equal(sharded(x).logits, before)

        made = depprune.make_plan(plain, x, ratio=0.5, tensor_parallel=2) if rank == 0 else None
        plan = broadcast_plan(made)
        # Planned on the TP model itself (its shadow has the global shapes): the same plan.
        direct = depprune.make_plan(sharded, x, ratio=0.5, tensor_parallel=2)
        same_plan_sharded = direct.fingerprint() == plan.fingerprint()
        plan.apply(plain)
        plan.apply(sharded)
        with torch.no_grad():
            equal_in_memory = torch.allclose(sharded(x).logits, plain(x).logits, atol=1e-5)
        local_kv_rows = sharded.model.layers[0].self_attn.k_proj.weight.to_local().shape[0]
        # One training step on both: the TP model's gradients flow through the cut shards.
        for net in (sharded, plain):
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            net.train()
            net(x, labels=x).loss.backward()
            opt.step()
            net.eval()
        with torch.no_grad():
            equal_after_step = torch.allclose(sharded(x).logits, plain(x).logits, atol=1e-4)

        dist.barrier()
        if rank == 0:
            sources = [os.path.join(folder, f"rank{r}") for r in range(2)]
            outs = [os.path.join(folder, f"pruned{r}") for r in range(2)]
            apply_to_tp_shards(sources, plan, outs, progress=False)
            pruned_full = transformers.LlamaForCausalLM.from_pretrained(source).eval()
            plan.apply(pruned_full)
            pruned_full.save_pretrained(os.path.join(folder, "pruned_full"))
        dist.barrier()
        # What transformers shards from the pruned full checkpoint is what the rank folder holds.
        reloaded = transformers.LlamaForCausalLM.from_pretrained(
            os.path.join(folder, "pruned_full"), tp_plan="auto"
        ).eval()
        written = safetensors_torch.load_file(
            os.path.join(folder, f"pruned{rank}", "model.safetensors")
        )
        same_shards = all(
            torch.equal((p.to_local() if hasattr(p, "to_local") else p), written[name])
            for name, p in reloaded.state_dict().items()
            if name in written
        )
        report = dict(
            refused=refused,
            unchanged=bool(unchanged),
            equal_in_memory=bool(equal_in_memory),
            equal_after_step=bool(equal_after_step),
            local_kv_rows=local_kv_rows,
            same_shards=bool(same_shards),
            shards_compared=len(written),
            same_plan_sharded=bool(same_plan_sharded),
        )
        with open(os.path.join(folder, f"{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def test_transformers_tensor_parallel_model_and_rank_folders_prune_alike():
    with tempfile.TemporaryDirectory() as folder:
        _llama(3, tie_word_embeddings=True).save_pretrained(os.path.join(folder, "full"))
        reports = run_workers(_tp_worker, folder, limit_s=180)
    for report in reports:
        assert report["refused"] and report["unchanged"]
        assert report["equal_in_memory"] and report["equal_after_step"]
        assert report["same_shards"] and report["shards_compared"] > 10
        assert report["same_plan_sharded"]
    # Two KV heads of head_dim 8 kept: one per rank.
    assert [r["local_kv_rows"] for r in reports] == [8, 8]
