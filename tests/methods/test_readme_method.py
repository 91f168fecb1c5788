"""README.md's "Adding a method" example works: its code blocks, read from the README so they cannot drift from it,
declare and register a defense that trains through the engine, reports every step and resumes bit-identically."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from methods.core.context import LocalContext, StopRun
from methods.core.method import RUNS, get_method
from methods.core.registry import METHODS

README = Path(__file__).resolve().parents[2] / "README.md"
NAME = "mydefense"


def example_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("### 6. Adding a method") :]
    section = section[: section.index("\n#", 1)]
    return re.findall(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL)


@pytest.fixture
def example():
    """The example's two blocks run as the modules they belong in: its config module and its run module."""
    config_block, run_block = example_blocks()
    names = [f"methods.defenses.configs.{NAME}", f"methods.defenses.{NAME}"]
    try:
        for name, block in zip(names, (config_block, run_block)):
            module = sys.modules[name] = types.ModuleType(name)
            # compiled on its own, so that this file's `from __future__` does not leak into the example
            exec(compile(block, f"README.md ({name})", "exec", dont_inherit=True), module.__dict__)
        yield get_method(NAME)
    finally:  # the registries are global: later registry-wide tests must not meet the example
        METHODS._items.pop(NAME, None)
        RUNS._items.pop(NAME, None)
        for name in names:
            sys.modules.pop(name, None)


def test_the_readme_declares_a_config_and_a_run():
    assert len(example_blocks()) == 2


def test_the_readme_example_trains_reports_and_resumes(example, tiny_backdoor):
    cfg = example.make_config({"epochs": 2})

    def context(**kwargs) -> LocalContext:
        return LocalContext(backdoor_provider=lambda: tiny_backdoor, **kwargs)

    straight = context()
    result = example.run(straight, cfg)
    assert [s for s, _ in straight.reports] == [1, 2]
    assert {"train_loss", "val_acc", "test_asr"} <= set(straight.reports[-1][1])
    assert any(not torch.equal(v, tiny_backdoor.model_state[k]) for k, v in result.model_state.items())

    interrupted = context(stop_after_step=1)
    with pytest.raises(StopRun):
        example.run(interrupted, cfg)
    resumed = context(checkpoint=interrupted.checkpoint)
    again = example.run(resumed, cfg)
    assert interrupted.reports + resumed.reports == straight.reports
    assert all(torch.equal(v, again.model_state[k]) for k, v in result.model_state.items())
