"""The README's two functional scripts run, learn, and a vmapped run equals the same run alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import jaxft

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fine_tune_from_the_pieces_learns():
    result = _script("functional_finetune").main(["--steps", "40"])
    assert result["loss_after"] < result["loss_before"] - 0.1
    assert result["accuracy_after"] > 0.6


def test_vmapped_seeds_equal_each_seed_alone():
    seeds = _script("functional_seeds")
    together = seeds.main(["--seeds", "1", "2", "3", "4", "--epochs", "1"])
    alone = seeds.main(["--seeds", "3", "--epochs", "1"])
    assert together[2] == pytest.approx(alone[0], abs=1e-9)
    assert len(set(together)) > 1 or min(together) > 0.6  # different runs, or all of them learnt
    assert min(together) > 0.55


def test_public_functions_are_documented_and_typed():
    for name in jaxft.__all__:
        obj = getattr(jaxft, name)
        if callable(obj) and not isinstance(obj, type) and name != "__version__":
            assert obj.__doc__ and obj.__doc__.strip(), f"jaxft.{name} has no docstring"
            hints = getattr(obj, "__annotations__", {})
            assert "return" in hints, f"jaxft.{name} has no return type hint"
