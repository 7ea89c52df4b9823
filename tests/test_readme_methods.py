"""Every example of the README's methods section runs, each after the section's preamble."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTION = README.split("## The papers' methods", 1)[1].split("\n## ", 1)[0]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION, re.S)
PREAMBLE, EXAMPLES = BLOCKS[0], BLOCKS[1:]


def test_the_section_has_an_example_per_method():
    names = ("depgraph", "IterativePruner", "l1_filter", "thinet", "channel_regression")
    names += ("slimming", "sss", "unstructured", "scratch_budget", "apply_architecture", "lamp")
    for name in names:
        assert any(name in example for example in EXAMPLES), name


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.split("\n", 1)[0][:40] for e in EXAMPLES])
def test_example_runs(example, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples may write files (an architecture's JSON)
    namespace: dict = {}
    exec(compile(PREAMBLE + example, "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip()  # every example prints what it did
