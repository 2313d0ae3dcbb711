"""A/B of the cache controls (TGATE, DiTFastAttn) against the uncached pipeline, per family and method.

For each family and method: the end-to-end time ratio against the stock pipeline (cached / stock, medians after a
warm-up round, the variants interleaved in one process), the attention FLOPs ratio (from the handle's report:
`Q K^T` and `A V` of every attention layer, window attention counted as the pairs a block-sparse kernel computes),
and the fidelity against the uncached output: PSNR of the decoded image and the max abs difference of the latents.

Also the TGATE measurement of issue #6 on the SD-like config (25 steps, gate step 10): the cost of a denoiser
step with CFG (batch 2) and without (batch 1) is measured in the same run, and the bound that dropping CFG alone
allows, `T_cfg / (10/25 T_cfg + 15/25 T_nocfg)`, is printed beside the measured speedup.

The models are random-weight configs built offline (attnctl.testing's tiny encoders and VAE, larger denoisers so
that attention dominates). Random weights make the fidelity numbers weak: a trained model's attention is far more
structured (and its features change more smoothly across steps), so PSNR here says little about image quality.

    python benchmarks/cache_ab.py [--repeats 3] [--families sd,pixart,sd3,flux] [--threads 1] [--clock cpu|wall] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import torch

CALIBRATION_PROMPTS = ["a red circle on a blue square", "a cat on a chair in a garden", "a boat on the sea at sunset"]
PROMPT = "a photo of a dog under a tree"


def _overhead_build(latent: int):
    """The SD-like UNet pipeline of benchmarks/overhead.py, loaded by path: the benchmarks folder is never put on
    sys.path, where a module of it could shadow an installed package."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead.py")
    spec = importlib.util.spec_from_file_location("attnctl_bench_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(latent)


# -- models ---------------------------------------------------------------------------------------------------------
def build_sd(latent: int):
    """SD-like: UNet 32/64 channels, cross-attention at both levels (the model of benchmarks/overhead.py)."""
    return _overhead_build(latent), {}


def build_pixart(latent: int):
    """PixArt-Sigma-like: 8 blocks, 4 heads of 16, patch 2, self-attention over (latent/2)^2 tokens, T5 cross-attention."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from attnctl.testing.pipelines import _t5_encoder, _vae
    from attnctl.testing.tokenizers import tiny_t5_tokenizer

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=latent, num_layers=8, patch_size=2, attention_head_dim=16, num_attention_heads=4, caption_channels=32,
        in_channels=4, cross_attention_dim=64, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    pipe = PixArtSigmaPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=_t5_encoder(), vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    return pipe, {"use_resolution_binning": False, "max_sequence_length": 32, "clean_caption": False}


def build_sd3(latent: int):
    """SD3-like: 4 joint blocks, 4 heads of 16, patch 2, [image; CLIP 77 + T5 32 tokens]."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from attnctl.testing.pipelines import _clip_text_encoder, _t5_encoder, _vae
    from attnctl.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=4,
        caption_projection_dim=64, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(flow=True),
        text_encoder=_clip_text_encoder(hidden=16, projection=16, seed=2), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_clip_text_encoder(hidden=16, projection=16, seed=3), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed=4), tokenizer_3=tiny_t5_tokenizer(),
    )
    return pipe, {"max_sequence_length": 32}


def build_flux(latent: int):
    """Flux-like: 2 double and 4 single blocks, 4 heads of 16, RoPE, [T5 32 tokens; (latent/2)^2 image tokens]."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from attnctl.testing.pipelines import _clip_text_encoder, _t5_encoder, _vae
    from attnctl.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(latent_channels=1, flow=True), text_encoder=_clip_text_encoder(),
        tokenizer=tiny_clip_tokenizer(), text_encoder_2=_t5_encoder(), tokenizer_2=tiny_t5_tokenizer(), transformer=transformer,
    )
    return pipe, {"max_sequence_length": 32}


# family: (builder, latent size, steps, guidance scale, methods)
FAMILIES: dict[str, tuple[Any, int, int, float, tuple[str, ...]]] = {
    "sd": (build_sd, 32, 25, 7.5, ("tgate", "fastattn", "fastattn-nowindow")),
    "pixart": (build_pixart, 64, 20, 4.5, ("tgate", "fastattn", "fastattn-nowindow")),
    "sd3": (build_sd3, 64, 20, 7.0, ("fastattn", "fastattn-nowindow")),
    "flux": (build_flux, 64, 20, 1.0, ("fastattn", "fastattn-nowindow")),
}


# -- measurement ----------------------------------------------------------------------------------------------------
def psnr(a, b) -> float:
    mse = float(((torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()


def call(pipe, options: dict[str, Any], output_type: str):
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return pipe(PROMPT, generator=generator, output_type=output_type, **options).images


def gate_step(options: dict[str, Any], args) -> int:
    """The gate step, scaled from 25 steps when a run has fewer (--quick)."""
    steps = options["num_inference_steps"]
    return args.gate if steps >= 25 else max(1, round(args.gate * steps / 25))


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def make_controls(method: str, pipe, options: dict[str, Any], args) -> tuple[list, float]:
    """The controls of a method, and the seconds its calibration took (0 when none)."""
    import attnctl

    if method == "tgate":
        return [attnctl.TGate(gate_step=gate_step(options, args))], 0.0
    techniques = ("window_residual", "step_share", "cfg_share") if method == "fastattn" else ("step_share", "cfg_share")
    window = args.window if "window_residual" in techniques else None  # a window is refused where no method reads it
    control = attnctl.FastAttn(threshold=args.threshold, window=window, techniques=techniques)
    start = time.perf_counter()
    with torch.inference_mode():
        plan = attnctl.calibrate(control, pipe, CALIBRATION_PROMPTS, backend=args.backend, generator=torch.Generator().manual_seed(1), **options)
    return [attnctl.FastAttn(plan=plan)], time.perf_counter() - start


def measure_family(name: str, args) -> list[dict[str, Any]]:
    import attnctl

    builder, latent, steps, guidance, methods = FAMILIES[name]
    if args.quick:
        latent, steps = latent // 2, min(steps, 10)
    clock = CLOCKS[args.clock]
    pipe, extra = builder(latent)
    pipe.set_progress_bar_config(disable=True)
    size = latent * pipe.vae_scale_factor
    options = {"num_inference_steps": steps, "guidance_scale": guidance, "height": size, "width": size, **extra}
    variants: dict[str, list] = {"uncached": []}
    calibration: dict[str, float] = {}
    for method in methods:
        variants[method], calibration[method] = make_controls(method, pipe, options, args)

    reports: dict[str, Any] = {}
    latents: dict[str, torch.Tensor] = {}
    for variant, controls in variants.items():  # latents and reports, untimed
        with attnctl.apply(pipe, controls, backend=args.backend) if controls else _null() as handle:
            latents[variant] = call(pipe, options, "latent")
            if handle is not None:
                reports[variant] = next(iter(handle.outputs.values()))
    images: dict[str, Any] = {}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for repeat in range(args.repeats + 1):  # the first round is warm-up; its images are the ones compared
        for variant, controls in variants.items():
            handle = attnctl.apply(pipe, controls, backend=args.backend) if controls else None
            start = clock()
            image = call(pipe, options, "pt")
            elapsed = clock() - start
            if handle is not None:
                handle.remove()
            if repeat:
                times[variant].append(elapsed)
            else:
                images[variant] = image
    base = statistics.median(times["uncached"])
    rows = []
    for variant in variants:
        if variant == "uncached":
            continue
        report = reports[variant]
        rows.append({
            "family": name, "method": variant, "steps": options["num_inference_steps"], "tokens": _tokens(pipe, latent),
            "time_ratio": statistics.median(times[variant]) / base, "uncached_s": base,
            "flops_ratio": report.flops_ratio(), "psnr": psnr(images[variant], images["uncached"]),
            "latent_max_abs": float((latents[variant] - latents["uncached"]).abs().max()),
            "latent_rel_l1": float((latents[variant] - latents["uncached"]).abs().sum() / latents["uncached"].abs().sum()),
            "calibration_s": calibration[variant], "counts": report.counts(),
        })
    if name == "sd" and "tgate" in variants:
        rows[0]["bound"] = tgate_bound(pipe, options, args)
    return rows


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _tokens(pipe, latent: int) -> int:
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    patch = getattr(denoiser.config, "patch_size", None) or 1
    if type(denoiser).__name__ == "FluxTransformer2DModel":
        patch = 2  # 2x2 latent packing
    return (latent // patch) ** 2


def tgate_bound(pipe, options: dict[str, Any], args) -> dict[str, float]:
    """T_cfg and T_nocfg of one UNet step, measured here, and the speedup bound of dropping CFG after the gate."""
    captured: dict[str, Any] = {}

    def grab(module, a, kw):
        captured.setdefault("inputs", (a, kw))

    hook = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        call(pipe, {**options, "num_inference_steps": 2}, "latent")
    finally:
        hook.remove()
    a, kw = captured["inputs"]

    def half(value):
        return value[: value.shape[0] // 2] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 2 else value

    single = (tuple(half(v) for v in a), {k: half(v) for k, v in kw.items()})
    samples: dict[str, list[float]] = {"cfg": [], "nocfg": []}
    clock = CLOCKS[args.clock]
    with torch.inference_mode():
        for repeat in range(5 * args.repeats + 1):
            for variant, (pa, pkw) in (("cfg", (a, kw)), ("nocfg", single)):
                start = clock()
                pipe.unet(*pa, **pkw)
                if repeat:
                    samples[variant].append(clock() - start)
    t_cfg, t_nocfg = statistics.median(samples["cfg"]), statistics.median(samples["nocfg"])
    n, g = options["num_inference_steps"], gate_step(options, args)
    bound = t_cfg / (g / n * t_cfg + (n - g) / n * t_nocfg)
    return {"t_cfg": t_cfg, "t_nocfg": t_nocfg, "bound": bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", default="sd,pixart,sd3,flux")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                        help="cpu: the process's CPU time (robust when other jobs share the cores); wall: wall time")
    parser.add_argument("--gate", type=int, default=10, help="TGATE gate step")
    parser.add_argument("--threshold", type=float, default=0.1, help="FastAttn calibration threshold")
    parser.add_argument("--window", type=int, default=64, help="FastAttn 1-D band half-width (tokens)")
    parser.add_argument("--backend", default="auto", help="attention backend of the cached variants (auto, sdpa, flex, triton)")
    parser.add_argument("--quick", action="store_true", help="half the latent size and at most 10 steps (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads}, clock {args.clock}")
    print(f"repeats {args.repeats} (+1 warm-up round), variants interleaved, medians; FastAttn threshold {args.threshold}, "
          f"window band {args.window}; TGATE gate step {args.gate}; backend {args.backend}; random weights (fidelity "
          "numbers are weak)")
    rows = []
    for name in args.families.split(","):
        start = time.perf_counter()
        rows.extend(measure_family(name.strip(), args))
        print(f"  {name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(f"{'family':<7} {'method':<18} {'steps':>5} {'tokens':>6} {'time ratio':>10} {'speedup':>8} {'attn FLOPs':>10} "
          f"{'PSNR dB':>8} {'max|dlat|':>9} {'relL1 lat':>9}  plan / what ran")
    for row in rows:
        counts = ", ".join(f"{k} {v}" for k, v in row["counts"].items() if v)
        print(f"{row['family']:<7} {row['method']:<18} {row['steps']:>5} {row['tokens']:>6} {row['time_ratio']:>10.3f} "
              f"{1 / row['time_ratio']:>7.2f}x {row['flops_ratio']:>10.3f} {row['psnr']:>8.2f} {row['latent_max_abs']:>9.4f} {row['latent_rel_l1']:>9.4f}  {counts}")
    for row in rows:
        if "bound" in row:
            b = row["bound"]
            print(f"\nTGATE on the SD-like config, {row['steps']} steps, gate step {gate_step({'num_inference_steps': row['steps']}, args)}: T_cfg {b['t_cfg'] * 1000:.1f} ms, "
                  f"T_nocfg {b['t_nocfg'] * 1000:.1f} ms per step (ratio {b['t_cfg'] / b['t_nocfg']:.2f}); bound from dropping CFG "
                  f"alone {b['bound']:.3f}x; measured end-to-end speedup {1 / row['time_ratio']:.3f}x "
                  f"= {1 / row['time_ratio'] / b['bound']:.1%} of the bound")
    for row in rows:
        if row["calibration_s"]:
            print(f"calibration {row['family']} {row['method']}: {row['calibration_s']:.1f} s on {len(CALIBRATION_PROMPTS)} prompts")
    print("\ntime ratio: cached / stock time of a whole pipeline call (decoded image out); attn FLOPs: computed / "
          "full attention over every attention layer; windows on the sdpa backend run as dense masked attention, so "
          "their FLOPs saving is not a time saving on this backend.")


if __name__ == "__main__":
    main()
