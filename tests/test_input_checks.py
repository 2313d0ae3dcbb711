"""Bad-input review r3: numpy / 0-d tensor scalars in the maps result's arguments, `save` checks its arguments
before it creates anything, and a float32 scalar of an unused option's default is that default. Plain tensors only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import attnctl
from attnctl import ConfigError
from attnctl.controls.maps.capture import AttentionMapResult


def _result(video: bool = False) -> AttentionMapResult:
    shape = (2, 1, 3, 8, 8) if video else (2, 1, 8, 8)
    maps = torch.arange(float(np.prod(shape))).reshape(shape)
    return AttentionMapResult(words=("cat",), maps=maps, grid_maps=maps, prompts=("a cat", "a cat"), layers=("x",),
                              contributions=(1, 1), frames=3 if video else None)


@pytest.mark.parametrize("threshold", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)],
                         ids=["np-float32", "np-float64", "tensor-float32", "tensor-float64"])
def test_mask_threshold_takes_numpy_and_tensor_scalars(threshold):
    # the binary mask is `soft >= threshold` on the min-max normalised map (docs/methods.md), whatever scalar type
    result = _result()
    maps = result["cat"]
    low, high = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    assert torch.equal(result.masks("cat", threshold=threshold), (maps - low) / (high - low) >= 0.5)


@pytest.mark.parametrize("threshold", [0, np.float32(0.0), 1.5, float("nan"), True, "0.5", torch.tensor([0.5])])
def test_mask_threshold_outside_its_range_is_refused(threshold):
    with pytest.raises(ConfigError, match=r"threshold must be a number in \(0, 1\]"):
        _result().masks("cat", threshold=threshold)


def test_mask_soft_must_be_a_bool():
    with pytest.raises(ConfigError, match="soft must be True .* or False .*, got 'yes'"):
        _result().masks("cat", soft="yes")


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("arguments, match", [
    ({"scaling": "bogus"}, "scaling must be one of 'max', 'minmax', got 'bogus'"),
    ({"fps": 0}, "fps must be a positive int .*, got 0"),
    ({"fps": 2.5}, "fps must be a positive int .*, got 2.5"),
    ({"directory": 123}, r"directory must be a folder path .*, got 123"),
    ({"directory": b"maps"}, r"directory must be a folder path .*, got b'maps'"),
    ({"directory": ""}, r"directory must be a folder path .*, got ''"),
])
def test_save_refuses_bad_arguments_before_creating_the_folder(video, arguments, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arguments = {"directory": str(tmp_path / "maps"), **arguments}
    with pytest.raises(ConfigError, match=match):
        _result(video).save(**arguments)
    assert os.listdir(tmp_path) == []  # no folder left behind


def test_save_takes_a_path_object_and_numpy_fps(tmp_path):
    written = _result(video=True).save(Path(tmp_path / "video"), fps=np.int64(8))
    assert sorted(os.path.basename(p) for p in written) == ["video0_cat.gif", "video0_cat_strip.png",
                                                            "video1_cat.gif", "video1_cat_strip.png"]
    assert len(_result().save(tmp_path / "image")) == 4


@pytest.mark.parametrize("make, name, default", [
    (lambda v: attnctl.PromptToPrompt(blend_threshold=v), "blend_threshold", 0.3),
    (lambda v: attnctl.BoxGuidance({"cat": (0.0, 0.0, 0.5, 0.5)}, topk=v), "topk", 0.2),
], ids=["p2p-blend-threshold", "box-topk"])
def test_a_float32_scalar_of_an_unused_default_is_the_default(make, name, default):
    for value in (np.float32(default), torch.tensor(default)):
        control = make(value)
        assert getattr(control, name) == default and control == make(default)
    with pytest.raises(ConfigError, match=f"{name}=0.4000000059604645 does nothing"):
        make(np.float32(0.4))  # a float32 away from the default is still refused


def test_fastattn_threshold_equal_to_its_plans_at_float32_is_accepted():
    from attnctl.controls.fastattn import FastAttnPlan
    plan = FastAttnPlan(model="m", fingerprint="f", steps=2, resolution=(32, 32), window=8, threshold=0.3,
                        methods=(("layer", ("full", "full")),))
    assert attnctl.FastAttn(plan=plan, threshold=np.float32(0.3)).threshold == 0.3
    with pytest.raises(ConfigError, match="calibrated at its own threshold"):
        attnctl.FastAttn(plan=plan, threshold=np.float32(0.31))


@pytest.mark.parametrize("directory", [123, b"masks", ""], ids=["int", "bytes", "empty"])
def test_regions_with_mask_files_checks_before_it_creates_anything(directory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    soft = torch.zeros(8, 8)
    soft[2:6, 2:6] = 1.0
    with pytest.raises(ConfigError, match="directory must be a folder path"):
        attnctl.Regions([attnctl.Region("a cat", mask=soft)]).with_mask_files(directory)
    frames = attnctl.Regions([attnctl.Region("a cat", mask=torch.stack([soft, soft]))])
    with pytest.raises(ConfigError, match="per-frame masks"):
        frames.with_mask_files(tmp_path / "masks")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [lambda n: attnctl.AttendExcite(["cat"], max_refinement_steps=n),
                                  lambda n: attnctl.BoxGuidance({"cat": (0, 0, 0.5, 1)}, iterations=n)],
                         ids=["attend-excite", "box-guidance"])
def test_optimiser_iteration_counts_are_bounded(make):
    from attnctl.controls.optimize.controls import MAX_ITERATIONS
    make(np.int64(MAX_ITERATIONS))
    with pytest.raises(ConfigError, match=f"must be <= {MAX_ITERATIONS}, got {10**30}"):
        make(10**30)
