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


def test_load_saved_directory_in_a_dtype_without_a_deprecation_warning(tmp_path):
    import warnings

    attnctl.load_pipeline("tiny-sd").save_pretrained(tmp_path / "sd", safe_serialization=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*", category=FutureWarning)
        loaded = attnctl.load_pipeline(str(tmp_path / "sd"), torch_dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16


def test_load_errors():
    with pytest.raises(ConfigError, match="neither an embedded model"):
        attnctl.load_pipeline("./does/not/exist")
    with pytest.raises(ConfigError, match="remote code"):
        attnctl.load_pipeline("owner/model", trust_remote_code=True)
    with pytest.raises(ConfigError):
        attnctl.load_pipeline("")


@pytest.mark.parametrize("make, match", [
    (lambda: attnctl.PAG(scale=10**400), "PAG.scale must be a finite number"),
    (lambda: attnctl.PAG(scale=1e39), "float32"),
    (lambda: attnctl.Reweight({"red": 1e39}), "float32"),
    (lambda: attnctl.Reweight({"red": 10**400}), "float32"),
    (lambda: attnctl.PAG(steps=(0, 10**400)), "steps must hold two finite numbers"),
    (lambda: attnctl.Region("a cat", box=(0, 0, 10**400, 1)), "box coordinates must be finite"),
    (lambda: attnctl.ReferenceAttention(image="reference.png", seed=2**64), "seed must be <= 18446744073709551615"),
    (lambda: attnctl.AttentionInterpolation(alpha=600.0), "alpha must be <= 400"),
    (lambda: attnctl.AttentionMaps(["cat"], resolution=100_000), "at most 8192 pixels"),
], ids=["huge-int", "beyond-float32", "reweight-float32", "reweight-huge-int", "steps-huge-int", "box-huge-int", "seed",
        "beta", "resolution"])
def test_out_of_range_numbers_are_config_errors_naming_the_field(make, match):
    """Values that overflowed later (float32 infinities gave NaN images, 2**64 seeds and Beta(600, 600) failed in the
    call, huge ints raised OverflowError) are refused where the control is made."""
    with pytest.raises(attnctl.ConfigError, match=match):
        make()


def test_numpy_scalars_and_0d_tensors_are_numbers():
    import numpy as np

    assert attnctl.PAG(scale=np.float32(2.5), steps=(np.float64(0.0), torch.tensor(0.5))) == attnctl.PAG(scale=2.5, steps=(0.0, 0.5))
    assert attnctl.ToMe(seed=np.int64(3)).seed == 3
    assert attnctl.Reweight({"red": np.float64(2.0)}) == attnctl.Reweight({"red": 2.0})


def test_reweight_factors_whose_product_leaves_float32_are_refused_at_the_call(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.Reweight({"red": 1e20, ("red", 0): 1e20})]):
        with pytest.raises(attnctl.ConfigError, match="beyond float32's range"):
            pipe("a red car", num_inference_steps=2, height=32, width=32, output_type="latent")


@pytest.mark.parametrize("make, match", [
    (lambda: attnctl.PromptToPrompt(edits=["a dog"], reweight={"cat": 2.0, " cat": 3.0}), "names 'cat' twice"),
    (lambda: attnctl.FastAttn(techniques=()), "one or more distinct names"),
], ids=["p2p-reweight-twice", "fastattn-no-technique"])
def test_other_controls_refuse_settings_that_contradict_or_do_nothing(make, match):
    with pytest.raises(attnctl.ConfigError, match=match):
        make()
