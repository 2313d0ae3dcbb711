"""load_pipeline and control (de)serialisation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import attnctl
from attnctl.control import Bound, Control
from attnctl.errors import ConfigError
from attnctl.selection import validate_layers
from attnctl.steps import validate_steps
from attnctl.validation import number, set_field


@dataclass(frozen=True)
class Scaled(Control, type_name="test-scaled"):
    scale: float = 1.0
    layers: str | tuple[str, ...] | None = None
    steps: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        set_field(self, "scale", number(self.scale, "Scaled.scale", minimum=0))
        set_field(self, "layers", validate_layers(self.layers, name="Scaled.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="Scaled.steps"))

    def bind(self, context):
        return Bound(self, context.layers, self.steps)


def test_control_round_trip_and_errors():
    control = Scaled(scale=2, layers=["self", "mid"], steps=(0.1, 0.5))
    data = control.to_dict()
    assert data == {"type": "test-scaled", "scale": 2.0, "layers": ["self", "mid"], "steps": [0.1, 0.5]}
    assert Control.from_dict(data) == control
    with pytest.raises(ConfigError, match="unknown control type 'nope'"):
        Control.from_dict({"type": "nope"})
    with pytest.raises(ConfigError, match="has no field"):
        Control.from_dict({"type": "test-scaled", "scael": 1})
    with pytest.raises(ConfigError, match="needs a 'type' key"):
        Control.from_dict({"scale": 1})
    with pytest.raises(ConfigError, match=r"Scaled.scale must be >= 0, got -1.0"):
        Scaled(scale=-1)
    with pytest.raises(ConfigError, match="steps must satisfy"):
        Scaled(steps=(0.9, 0.1))


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_load_embedded_and_saved_directory(name, tmp_path):
    pipe = attnctl.load_pipeline(name)
    pipe.save_pretrained(tmp_path / name, safe_serialization=True)
    loaded = attnctl.load_pipeline(str(tmp_path / name))
    assert type(loaded) is type(pipe)
    denoiser = "unet" if name == "tiny-sd" else "transformer"
    for (key, a), (_, b) in zip(getattr(pipe, denoiser).state_dict().items(), getattr(loaded, denoiser).state_dict().items()):
        assert torch.equal(a, b), key


def test_load_errors():
    with pytest.raises(ConfigError, match="neither an embedded model"):
        attnctl.load_pipeline("./does/not/exist")
    with pytest.raises(ConfigError, match="remote code"):
        attnctl.load_pipeline("owner/model", trust_remote_code=True)
    with pytest.raises(ConfigError):
        attnctl.load_pipeline("")
