"""`attnctl.interpolate`: images between two prompts by attention interpolation (AID, He et al. NeurIPS 2024).

    import attnctl
    pipe = attnctl.toy.load_toy_shapes()
    images = attnctl.interpolate(pipe, "a red circle on the left", "a red circle on the right", n=5,
                                 generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from typing import Any

import torch

from .controls.cross_image.interpolation import DEFAULT_BETA, AttentionInterpolation, beta_points, sequence_prompts
from .errors import ConfigError
from .handle import _control_tuple, apply
from .pipelines.protocol import named_call_arguments
from .render.generate import embedded_pipeline_defaults, row_arguments


def interpolate(
    pipe: Any, prompt_a: str, prompt_b: str, n: int = 5, *, mode: str = "outer", alpha: float = DEFAULT_BETA,
    beta: float = DEFAULT_BETA, self_attention: bool = True, controls: Any = (),
    **pipeline_kwargs: Any,
) -> list[Any]:
    """n images from `prompt_a` (t = 0) to `prompt_b` (t = 1), in one pipeline call of n rows.

    The points are `beta_points(n, alpha, beta)` (AID §4.3); `mode` "outer" or "inner" and `self_attention` are
    `AttentionInterpolation`'s. Every image starts from the same initial noise: one seed is drawn from `generator`
    (a `torch.Generator`, or a list holding one) and every row gets a generator with that seed, so the endpoints are
    exactly the stock rows of the two prompts with that noise in the same batched call (alone, a prompt may differ by
    diffusers' own batching rounding: 1e-6 in latents on Qwen-Image and Wan). The interpolated rows are encoded with the nearer
    endpoint's prompt (t < 0.5: `prompt_a`; this gives their pooled embeddings and, on joint families, the start of
    their text stream; their image tokens read only the endpoints' text). `pipeline_kwargs` go to the pipeline call;
    on the embedded toy model its `CALL_DEFAULTS` apply where not given. A negative prompt (`negative_prompt`,
    `negative_prompt_2`, `negative_prompt_3`) is one string for every image or a list of n; a second / third encoder's
    prompt (`prompt_2`, `prompt_3`) is a list of n, one per image in order (one string would give every image the same
    text on that encoder; on Flux `prompt_2` is the only text the transformer attends to), or left out.
    `controls`: more controls for the call.
    Returns the n PIL images in order (for a video pipeline such as Wan: the n videos, each a list of frames).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"interpolate: n must be an integer >= 2 (the two endpoints included), got {n!r}")
    for name, value in (("prompt_a", prompt_a), ("prompt_b", prompt_b)):
        if not isinstance(value, str):
            raise ConfigError(f"interpolate: {name} must be a string, got {value!r}")
    for name in ("prompt", "prompt_embeds", "num_images_per_prompt", "output_type"):
        if name in pipeline_kwargs:
            raise ConfigError(f"interpolate: {name} is set by interpolate itself; leave it out of the pipeline arguments")
    _check_arguments(pipe, pipeline_kwargs)
    controls = _control_tuple(controls)
    points = beta_points(n, alpha, beta)
    control = AttentionInterpolation(points=points, mode=mode, self_attention=self_attention)
    options = {**embedded_pipeline_defaults(pipe), **pipeline_kwargs}
    options["generator"] = _same_noise(options.get("generator"), n, pipe)
    prompts = sequence_prompts(prompt_a, prompt_b, points)
    options = row_arguments(options, prompts, "interpolate")
    handle = apply(pipe, [control, *controls])
    try:
        result = pipe(prompt=prompts, output_type="pil", **options)  # Flux.2 klein takes `image` first
    finally:
        handle.remove()
    images = getattr(result, "images", None)
    if images is None:
        images = getattr(result, "frames", None)
    return list(images)


def _check_arguments(pipe: Any, pipeline_kwargs: dict[str, Any]) -> None:
    """Every pipeline argument must be a named argument of the pipeline call: diffusers swallows an unknown one (a
    typo such as `num_inference_step`) into `**kwargs` and ignores it (`Model.generate` checks the same)."""
    named = named_call_arguments(pipe)
    unknown = [name for name in pipeline_kwargs if name not in named]
    if unknown:
        raise ConfigError(
            f"interpolate: {type(pipe).__name__}.__call__ takes no argument(s) {', '.join(map(repr, unknown))}; it "
            f"takes: {', '.join(named)}"
        )


def _same_noise(generator: Any, n: int, pipe: Any) -> list[torch.Generator]:
    """n generators on `generator`'s device with one seed, drawn from `generator` (None: from torch's global
    generator)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise ConfigError(
                f"interpolate: give one generator (every image starts from the same noise), got a list of {len(generator)}"
            )
        generator = generator[0]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"interpolate: generator must be a torch.Generator, got {generator!r}")
    # None: a draw of torch's global generator (so torch.manual_seed makes the call repeat, as for a pipeline call)
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    return [torch.Generator(device).manual_seed(seed) for _ in range(n)]


__all__ = ["interpolate"]
