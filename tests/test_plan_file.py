"""Plan files, versions 2 and 3: the architecture record, choices, summary.json, and version 1 files."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_DECODER, tokens
from torch import nn

import depprune
from depprune.apply import named_tensors
from depprune.errors import InvalidPlanError, PlanMismatchError
from depprune.importance import random
from depprune.plan import GroupChoice, Plan, read_summary

pytestmark = pytest.mark.usefixtures("one_thread")

#: Made with depprune 0.1.0's version-1 Plan.save (before plan files recorded the architecture):
#:     torch.manual_seed(0)
#:     model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
#:     depprune.make_plan(model, torch.zeros(1, 3), ratio=0.5).save("tests/data/plan_v1.npz")
#: It keeps neurons [2, 3, 4, 7] of the 8 (the largest L2 norms of that seeded model).
PLAN_V1 = Path(__file__).parent / "data" / "plan_v1.npz"
#: The same plan from depprune 0.1.0 at commit ca8bd02, whose files were version 2
#: (the architecture record and summary.json, no structural cuts).
PLAN_V2 = Path(__file__).parent / "data" / "plan_v2.npz"


def mlp(out: int = 2, dtype=torch.float32, device="cpu") -> nn.Sequential:
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, out)).to(dtype)


class Heads(nn.Module):
    """Splits into ``self.num_heads`` heads: the plan records an attribute to set."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.num_heads = nn.Linear(4, 16), nn.Linear(16, 3), 4

    def forward(self, x):
        return self.b(self.a(x).view(x.shape[0], self.num_heads, -1).softmax(-1).flatten(1))


def tied_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_DECODER, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rewritten(path: Path, out: Path, **changes: bytes | None) -> Path:
    """A copy of the plan file with members replaced (``None``: removed); names use _ for ."""
    contents = members(path)
    for name, data in changes.items():
        name = name.replace("_json", ".json").replace("_npy", ".npy")
        if data is None:
            del contents[name]
        else:
            contents[name] = data
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return out


def meta_of(path: Path) -> dict:
    with np.load(path) as data:
        return json.loads(bytes(data["meta"]))


def npy(meta: dict) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return buffer.getvalue()


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_every_field_round_trips(tmp_path):
    model = tied_llama()
    plan = depprune.make_plan(model, {"input_ids": tokens(0)}, ratio=0.3)
    plan.choices = {
        "ratio": 0.3,
        "kinds": ["heads", "neurons"],
        "importance": "l2",
        "round_to": None,
    }
    heads = depprune.make_plan(Heads(), torch.randn(2, 4), ratio=0.5)
    # The two plans between them fill every field a file holds.
    assert plan.kept_whole and plan.removed and plan.widths and heads.attributes
    for made in (plan, heads):
        made.save(tmp_path / "plan.npz")
        made.save(tmp_path / "again.npz")  # nothing in the file depends on when it was written
        assert (tmp_path / "plan.npz").read_bytes() == (tmp_path / "again.npz").read_bytes()
        loaded = Plan.load(tmp_path / "plan.npz")
        assert loaded.kept.keys() == made.kept.keys()
        assert all(np.array_equal(loaded.kept[k], made.kept[k]) for k in made.kept)
        assert loaded.removed.keys() == made.removed.keys()
        assert all(np.array_equal(loaded.removed[g], made.removed[g]) for g in made.removed)
        for name in ("shapes", "groups", "inputs", "kept_whole", "attributes", "widths"):
            assert getattr(loaded, name) == getattr(made, name), name
        assert loaded.architecture == made.architecture is not None
        assert loaded.architecture_hash == made.architecture_hash
        assert loaded.choices == made.choices
        assert loaded.depprune_version == depprune.__version__


def test_the_architecture_record_is_every_tensor_and_the_config():
    model = tied_llama()
    record = depprune.make_plan(model, {"input_ids": tokens(0)}, ratio=0.3).architecture
    assert record["class"] == "LlamaForCausalLM"
    assert record["config"] == json.loads(json.dumps(model.config.to_dict()))
    parameters = dict(model.named_parameters(remove_duplicate=False))
    tensors = {**parameters, **dict(model.named_buffers(remove_duplicate=False))}
    assert record["tensors"].keys() == tensors.keys()
    for name, tensor in tensors.items():
        entry = record["tensors"][name]
        assert entry["shape"] == list(tensor.shape)
        assert entry["dtype"] == str(tensor.dtype).replace("torch.", "")
        assert entry["kind"] == ("parameter" if name in parameters else "buffer")
    tied = {name: e["tied_to"] for name, e in record["tensors"].items() if e["tied_to"]}
    assert tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_summary_counts_what_applying_the_plan_does(tmp_path):
    model = tied_llama()
    plan = depprune.make_plan(model, {"input_ids": tokens(0)}, ratio=0.3)
    plan.choices = {"ratio": 0.3, "kinds": ("heads", "neurons")}  # a tuple is saved as a list
    shapes = {name: tuple(getattr(m, a).shape) for name, (m, a, _) in named_tensors(model).items()}
    params_before = sum(p.numel() for p in model.parameters())
    plan.save(tmp_path / "plan.npz")
    plan.apply(model)
    summary = read_summary(tmp_path / "plan.npz")
    assert summary == plan.summary() == Plan.load(tmp_path / "plan.npz").summary()
    changed = {
        n for n, (m, a, _) in named_tensors(model).items() if getattr(m, a).shape != shapes[n]
    }
    assert summary["totals"] == {
        "tensors_cut": len(changed),
        "groups_cut": len(plan.removed),
        "units_removed": sum(ids.size for ids in plan.removed.values()),
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
    }
    assert summary["architecture"] == {
        "class": "LlamaForCausalLM",
        "hash": plan.architecture_hash,
        "model_type": "llama",
    }
    assert summary["choices"] == {"ratio": 0.3, "kinds": ["heads", "neurons"]}
    assert summary["inputs"] == plan.inputs
    assert [GroupChoice(**row) for row in summary["groups"]] == plan.groups
    assert {row["group"]: row["reason"] for row in summary["kept_whole"]} == plan.kept_whole
    assert (summary["format"], summary["version"]) == ("depprune-plan", 3)
    assert summary["depprune_version"] == depprune.__version__


def test_the_summary_is_read_without_numpy(tmp_path):
    plan = depprune.make_plan(mlp(), torch.zeros(1, 3), ratio=0.5)
    plan.save(tmp_path / "plan.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    package = Path(depprune.__file__).parent
    # Importing depprune imports torch and numpy, so read_summary runs on its own: it and
    # what it calls, cut out of plan.py, with only zipfile, json, os and the error class.
    script = textwrap.dedent(
        """
        import __future__, ast, importlib.util, json, os, sys, zipfile
        sys.modules["numpy"] = sys.modules["torch"] = None  # importing either now fails
        package, path, bad = sys.argv[1:]
        with zipfile.ZipFile(path) as archive:  # what any zip and JSON reader gets
            plain = json.loads(archive.read("summary.json"))
        spec = importlib.util.spec_from_file_location("errors", os.path.join(package, "errors.py"))
        errors = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(errors)
        tree = ast.parse(open(os.path.join(package, "plan.py")).read())
        named = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                named[node.name] = node
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                named[node.targets[0].id] = node
        needed, todo = set(), ["read_summary"]
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo += [n.id for n in ast.walk(named[name]) if isinstance(n, ast.Name) and n.id in named]
        body = [node for name, node in named.items() if name in needed]
        code = compile(ast.Module(body=body, type_ignores=[]), "plan.py", "exec",
                       flags=__future__.annotations.compiler_flag, dont_inherit=True)
        space = {"json": json, "zipfile": zipfile, "os": os, "InvalidPlanError": errors.InvalidPlanError}
        exec(code, space)
        try:
            space["read_summary"](bad)
            refused = None
        except errors.InvalidPlanError as exc:
            refused = str(exc)
        print(json.dumps({"plain": plain, "read": space["read_summary"](path), "refused": refused}))
        """
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(package),
            str(tmp_path / "plan.npz"),
            str(tmp_path / "bad.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["plain"] == result["read"] == plan.summary()
    assert "is not a readable depprune plan" in result["refused"]


def counted(size: int | None) -> nn.Sequential:
    """The MLP with a buffer of ``size`` its forward never reads (so no cut or proof sees it)."""
    model = mlp()
    if size is not None:
        model.register_buffer("calls", torch.zeros(size))
    return model


def test_a_model_of_another_architecture_is_refused_and_left_unchanged():
    for made_on, applied_to, match in [
        (1, 3, r"made for 'calls' of shape \(1,\), but the model's has shape \(3,\); was it"),
        (1, None, r"made for a model with 'calls', which Sequential does not have"),
        (None, 1, r"Sequential has 'calls', which the model the plan was made for did not have"),
    ]:
        plan = depprune.make_plan(counted(made_on), torch.zeros(1, 3), ratio=0.5)
        model = counted(applied_to)
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(PlanMismatchError, match=match) as refused:
            plan.apply(model)
        assert "nothing was changed" in str(refused.value)
        assert f"(Sequential, architecture {plan.architecture_hash})" in str(refused.value)
        assert same_state(model, state) and model[0].out_features == 8
        # Only the record tells: the tensors the plan cuts fit, so without it the plan applies.
        plan.architecture = None
        plan.apply(model)
        assert model[0].out_features == 4


def test_a_mismatch_names_the_first_five_differences():
    plan = depprune.make_plan(mlp(), torch.zeros(1, 3), ratio=0.5)
    extra = nn.Sequential(*mlp(), *(nn.Linear(2, 2) for _ in range(4)))  # 8 tensors more
    with pytest.raises(PlanMismatchError) as refused:
        plan.apply(extra)
    message = str(refused.value)
    named = [f"'{i}.{p}'" for i in range(3, 7) for p in ("weight", "bias")]
    assert [name in message for name in named] == [True] * 5 + [False] * 3
    assert "(and 3 more differences)" in message


def test_a_plan_made_in_another_dtype_on_meta_applies():
    skeleton = mlp(dtype=torch.bfloat16, device="meta")
    plan = depprune.make_plan(skeleton, torch.zeros(1, 3), ratio=0.5, importance=random(3))
    for dtype in (torch.float32, torch.float64):
        model = mlp(dtype=dtype)
        same = depprune.make_plan(model, torch.zeros(1, 3), ratio=0.5, importance=random(3))
        assert plan.architecture_hash == same.architecture_hash
        assert all(np.array_equal(plan.kept[k], same.kept[k]) for k in same.kept)
        assert plan.architecture["tensors"]["0.weight"]["dtype"] == "bfloat16"
        x = torch.randn(5, 3, dtype=dtype)
        kept = plan.kept[("0.weight", 0)]
        expected = torch.relu(x @ model[0].weight[kept].T + model[0].bias[kept])
        expected = expected @ model[2].weight[:, kept].T + model[2].bias
        plan.apply(model)
        assert model[0].weight.dtype == dtype and model[0].out_features == kept.size == 4
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_version_1_file_loads_and_applies(tmp_path):
    plan = Plan.load(PLAN_V1)
    assert (plan.architecture, plan.architecture_hash, plan.choices) == (None, None, {})
    assert plan.depprune_version is None and plan.kept_whole == {} and plan.removed == {}
    assert plan.groups == [GroupChoice(0, "neurons", 8, 4, "0.weight[0]")]
    assert plan.inputs == {"tensor": [[1, 3], "float32"]}
    model = mlp()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(np.array_equal(plan.kept[k], [2, 3, 4, 7]) for k in plan.kept)
    x = torch.randn(5, 3)
    hidden = torch.relu(x @ weights["0.weight"][[2, 3, 4, 7]].T + weights["0.bias"][[2, 3, 4, 7]])
    expected = hidden @ weights["2.weight"][:, [2, 3, 4, 7]].T + weights["2.bias"]
    plan.apply(model)  # proved with the input shapes the file keeps
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # Without a record, the tensors the plan cuts are checked as before.
    with pytest.raises(PlanMismatchError, match=r"made for '0.weight' of shape \(8, 3\)"):
        Plan.load(PLAN_V1).apply(model)
    with pytest.raises(InvalidPlanError, match=r"version-1 plan file.*Plan.load\(path\).summary"):
        read_summary(PLAN_V1)
    # Saved again, it is a version-3 file with a summary, and still no record.
    Plan.load(PLAN_V1).save(tmp_path / "again.npz")
    assert read_summary(tmp_path / "again.npz")["totals"]["units_removed"] == 4
    assert Plan.load(tmp_path / "again.npz").architecture is None


def test_a_version_2_file_loads_and_applies(tmp_path):
    plan = Plan.load(PLAN_V2)
    assert read_summary(PLAN_V2)["version"] == 2 and not plan.structure
    assert plan.architecture["class"] == "Sequential" and plan.depprune_version == "0.1.0"
    model = mlp()
    assert plan.kept[("0.weight", 0)].tolist() == [2, 3, 4, 7]
    plan.apply(model)
    assert model[0].out_features == 4
    plan.save(tmp_path / "again.npz")
    assert read_summary(tmp_path / "again.npz")["version"] == 3


def test_a_file_from_a_newer_depprune_says_to_upgrade(tmp_path):
    depprune.make_plan(mlp(), torch.zeros(1, 3), ratio=0.5).save(tmp_path / "plan.npz")
    meta = meta_of(tmp_path / "plan.npz") | {"version": 5}
    summary = read_summary(tmp_path / "plan.npz") | {"version": 5}
    newer = rewritten(
        tmp_path / "plan.npz",
        tmp_path / "newer.npz",
        meta_npy=npy(meta),
        summary_json=json.dumps(summary).encode(),
    )
    for read in (Plan.load, read_summary):
        with pytest.raises(InvalidPlanError, match=r"plan file version 5.*upgrade depprune"):
            read(newer)


def test_corrupt_summaries_and_records_are_refused(tmp_path):
    good = tmp_path / "plan.npz"
    depprune.make_plan(mlp(), torch.zeros(1, 3), ratio=0.5).save(good)
    meta, summary = meta_of(good), read_summary(good)

    def refused(match, readers=(Plan.load, read_summary), **changes):
        path = rewritten(good, tmp_path / "changed.npz", **changes)
        for read in readers:
            with pytest.raises(InvalidPlanError, match=match):
                read(path)

    refused(r"is not a readable depprune plan \(JSONDecodeError", summary_json=b"{not json")
    refused(r"a version-2 plan file without its summary\.json: it is damaged", summary_json=None)
    refused(
        r"has no summary\.json, so it is not a depprune plan",
        (read_summary,),
        meta_npy=None,
        summary_json=None,
        removed_units_npy=None,
    )
    refused(r"summary\.json is a JSON list, not an object", summary_json=b"[]")
    refused(r"lacks or misshapes totals", summary_json=json.dumps(summary | {"totals": 3}).encode())
    # An edited summary reads, but the plan it claims to summarise is not the one in the file.
    edited = summary | {"choices": {"ratio": 0.9}}
    refused(
        r"disagrees with the plan.*on choices",
        (Plan.load,),
        summary_json=json.dumps(edited).encode(),
    )
    # A byte flipped in the summary fails the zip's CRC check (rewritten stores it uncompressed).
    raw = bytearray(rewritten(good, tmp_path / "stored.npz").read_bytes())
    at = raw.index(b'"totals"')
    raw[at + 2] ^= 1
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    for read in (Plan.load, read_summary):
        with pytest.raises(InvalidPlanError, match=r"not a readable depprune plan \(BadZipFile"):
            read(tmp_path / "flipped.npz")

    record = meta["architecture"]
    tensors = record["tensors"]
    for change, match in [
        ({"architecture": record | {"tensors": 3}}, r"the architecture's tensors is 3, not a dict"),
        ({"architecture": {"class": "X"}}, r"architecture must be a JSON object of class"),
        (
            {"architecture": record | {"tensors": tensors | {"0.bias": {"shape": [-1]}}}},
            r"record of '0.bias' must have shape, dtype, kind, tied_to",
        ),
        (
            {
                "architecture": record
                | {"tensors": tensors | {"0.bias": tensors["0.bias"] | {"shape": [-4]}}}
            },
            r"recorded shape of '0.bias' is \[-4\]",
        ),
        (
            {
                "architecture": record
                | {"tensors": tensors | {"0.bias": tensors["0.bias"] | {"shape": [9]}}}
            },
            r"cuts '0.bias' of shape \(8,\), but its architecture record has \(9,\)",
        ),
        (
            {
                "architecture": record
                | {"tensors": tensors | {"2.bias": tensors["2.bias"] | {"tied_to": "0.bias"}}}
            },
            r"'2.bias' is recorded as tied to '0.bias', which is not a first name",
        ),
        ({"choices": [1]}, r"choices is \[1\], not a dict"),
        ({"depprune_version": 1}, r"depprune_version is 1, not a str"),
        ({"kept_whole": {"x": "why"}}, r"kept_whole names group 'x'"),
        ({"removed": [0, 0]}, r"removed lists a group twice"),
    ]:
        refused(match, (Plan.load,), meta_npy=npy(meta | change))
    with np.load(good) as data:
        units = data["removed_units"].copy()
    units[-1] = 8
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, units)
    refused(
        r"removes unit 8 of group 0, which has 8 units",
        (Plan.load,),
        removed_units_npy=buffer.getvalue(),
    )


def test_choices_must_be_plain_json(tmp_path):
    plan = depprune.make_plan(mlp(), torch.zeros(1, 3), ratio=0.5)
    for choices, match in [
        ({"ratio": np.int64(3)}, r"is of type int64: convert it"),
        ({"ratio": float("nan")}, r"nan is of type float"),
        ({"kinds": {1: "heads"}}, r"\{1: 'heads'\} is of type dict"),
        ([("ratio", 0.5)], r"must be a dict of JSON values, not a list"),
    ]:
        plan.choices = choices
        with pytest.raises(InvalidPlanError, match=match):
            plan.save(tmp_path / "plan.npz")
    plan.choices = {"ratio": 0.5, "nested": {"per_kind": [0.25, 0.5], "seed": None}}
    plan.save(tmp_path / "plan.npz")
    assert Plan.load(tmp_path / "plan.npz").choices == plan.choices
