"""The Reweight and AttentionMaps examples run offline on the embedded tiny models."""

from __future__ import annotations

import os
import runpy
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("script, model", [("reweight.py", "tiny-sd"), ("reweight.py", "tiny-flux"),
                                           ("attention_maps.py", "tiny-sd3"), ("attention_maps.py", "tiny-pixart")])
def test_example_runs_offline(script, model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [script, "--model", model, "--out", str(out)])
    runpy.run_path(os.path.join(EXAMPLES, script), run_name="__main__")
    files = sorted(os.listdir(out))
    if script == "reweight.py":
        assert files == ["reweighted.png", "side_by_side.png", "stock.png"]
    else:
        assert files == ["image0_car.png", "image0_grid.png", "image0_red.png", "image0_street.png"]
    assert model in capsys.readouterr().out
