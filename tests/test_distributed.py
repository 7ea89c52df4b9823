"""Plans made and applied where tensors live: accelerate offload (CPU, disk), FSDP2 shards over gloo."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile

import pytest
import torch
from gloo_workers import run_workers
from tiny_models import TINY_DECODER, tokens
from torch import nn

import depprune
from depprune.importance import ScoreContext, magnitude, score_groups, wanda

pytestmark = pytest.mark.usefixtures("one_thread")

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")


def _decoder(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY_DECODER)
    return transformers.LlamaForCausalLM(config).eval()


_CPU_AND_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _generate(model, x):
    mask = torch.ones_like(x)
    return model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False)


def test_disk_offload_plans_scores_and_cuts_in_the_offload_folder(tmp_path):
    plain = _decoder()
    model = accelerate.dispatch_model(
        copy.deepcopy(plain), device_map=_CPU_AND_DISK, offload_dir=str(tmp_path)
    )
    x = tokens(0)
    plan = depprune.make_plan(model, x, ratio=0.5)
    # Magnitude read the real values from the .dat files, not the meta placeholders.
    assert plan.fingerprint() == depprune.make_plan(plain, x, ratio=0.5).fingerprint()
    plan.apply(model)
    plan.apply(plain)
    up = model.model.layers[1].mlp.up_proj
    assert up.weight.is_meta and up.weight.shape == plain.model.layers[1].mlp.up_proj.weight.shape
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["model.layers.1.mlp.up_proj.weight"]["shape"] == list(up.weight.shape)
    assert not [name for name in os.listdir(tmp_path) if "depprune" in name]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=0)
    assert torch.equal(_generate(model, x), _generate(plain, x))


def test_cpu_offload_cuts_the_weights_map_in_memory():
    plain = _decoder(1)
    model = accelerate.cpu_offload(copy.deepcopy(plain), execution_device="cpu")
    x = tokens(1)
    plan = depprune.make_plan(model, x, ratio=0.25)
    assert plan.fingerprint() == depprune.make_plan(plain, x, ratio=0.25).fingerprint()
    plan.apply(model)
    plan.apply(plain)
    hook = model.model.layers[0].mlp.down_proj._hf_hook
    assert hook.weights_map["weight"].shape == plain.model.layers[0].mlp.down_proj.weight.shape
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=0)


def test_wanda_runs_through_the_hooks_onloading(tmp_path):
    plain = _decoder(5)
    model = accelerate.dispatch_model(
        copy.deepcopy(plain), device_map=_CPU_AND_DISK, offload_dir=str(tmp_path)
    )
    x, calibration = tokens(1), [tokens(2), tokens(3)]
    plan = depprune.make_plan(
        model, x, ratio=0.25, importance=wanda(model, calibration, progress=False)
    )
    reference = wanda(plain, calibration, progress=False)
    assert (
        plan.fingerprint()
        == depprune.make_plan(plain, x, ratio=0.25, importance=reference).fingerprint()
    )


def test_from_pretrained_offload_never_writes_the_checkpoint(tmp_path):
    plain = _decoder(2)
    plain.save_pretrained(tmp_path / "saved")
    checkpoint = tmp_path / "saved" / "model.safetensors"
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "saved", device_map=_CPU_AND_DISK, offload_folder=str(tmp_path / "off")
    ).eval()
    x = tokens(4)
    plan = depprune.make_plan(model, x, ratio=0.5)
    plan.apply(model)
    plan.apply(plain)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    written = json.loads((tmp_path / "off" / "index.json").read_text())
    gate = plain.model.layers[1].mlp.gate_proj.weight
    assert written["model.layers.1.mlp.gate_proj.weight"]["shape"] == list(gate.shape)
    assert gate.shape != (64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=0)


def test_a_failed_cut_leaves_the_offload_folder_as_it_was(tmp_path, monkeypatch):
    model = accelerate.dispatch_model(
        _decoder(3), device_map=_CPU_AND_DISK, offload_dir=str(tmp_path)
    )
    x = tokens(5)
    plan = depprune.make_plan(model, x, ratio=0.5)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    from depprune.apply import cuts

    assign, calls = cuts._Cut.assign, []

    def fail_late(self, new, undo):
        calls.append(self)
        if len(calls) == 20:  # after the offloaded tensors' commits
            raise RuntimeError("disk full")
        assign(self, new, undo)

    monkeypatch.setattr(cuts._Cut, "assign", fail_late)
    with pytest.raises(depprune.PlanMismatchError, match="disk full"):
        plan.apply(model)
    assert any(cut.mirror is not None for cut in calls[:19])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert model.model.layers[1].mlp.up_proj.weight.shape == (64, 32)


# FSDP2 over gloo: two CPU processes -------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))


def _fsdp_worker(rank: int, store_path: str, results: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from depprune.distributed import broadcast_plan

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        plain, model = _mlp(), _mlp()
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
        graph = depprune.trace(plain, x)
        # Importance of sharded parameters: local partial sums, all_reduced.
        sharded = score_groups(graph.groups, magnitude(), ScoreContext.from_model(graph, model))
        whole = score_groups(graph.groups, magnitude(), ScoreContext.from_model(graph, plain))
        same_scores = all(torch.allclose(sharded[g], whole[g]) for g in whole)
        # 10 -> 7 and 7 -> 5 kept: uneven over two ranks.
        plan = depprune.make_plan(plain, x, ratio=0.3) if rank == 0 else None
        plan = broadcast_plan(plan)
        # Planned on the sharded model itself: its meta shadow holds the global shapes.
        same_plan_sharded = (
            depprune.make_plan(model, x, ratio=0.3).fingerprint() == plan.fingerprint()
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        plain_optimizer = torch.optim.Adam(plain.parameters(), lr=0.01)
        for net, opt in ((model, optimizer), (plain, plain_optimizer)):
            net(x).sum().backward()
            opt.step()
            opt.zero_grad()
        # The optimizers go on: their Adam moments are cut with each parameter's own cut,
        # on the sharded side as DTensors, so the next step must match the plain one.
        plan.apply(model, verify=False, optimizers=[optimizer])
        plan.apply(plain, verify=False, optimizers=[plain_optimizer])
        moments = optimizer.state[model[0].weight]["exp_avg"]
        moments_sharded = type(moments).__name__ == "DTensor" and list(moments.shape) == [7, 6]
        local_rows = model[0].weight.to_local().shape[0]
        equal_after_cut = torch.allclose(model(x), plain(x), atol=1e-6)
        for net, opt in ((model, optimizer), (plain, plain_optimizer)):
            net(x).sum().backward()
            opt.step()
        equal_after_step = torch.allclose(model(x), plain(x), atol=1e-5)
        report = dict(
            rank=rank,
            same_scores=bool(same_scores),
            global_shape=list(model[0].weight.shape),
            local_rows=local_rows,
            equal_after_cut=bool(equal_after_cut),
            equal_after_step=bool(equal_after_step),
            moments_sharded=bool(moments_sharded),
            same_plan_sharded=bool(same_plan_sharded),
        )
        with open(os.path.join(results, f"{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_are_cut_per_rank_and_training_continues():
    with tempfile.TemporaryDirectory() as folder:
        reports = run_workers(_fsdp_worker, folder, limit_s=120)
    for report in reports:
        assert report["same_scores"]
        assert report["global_shape"] == [7, 6]
        assert report["equal_after_cut"] and report["equal_after_step"]
        assert report["moments_sharded"] and report["same_plan_sharded"]
    # torch.chunk's layout of 7 rows over two ranks: 4 and 3.
    assert [r["local_rows"] for r in reports] == [4, 3]
