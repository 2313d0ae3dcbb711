"""Train the ``toy-shapes`` text-to-image model from scratch on CPU.

Stages (each resumable; finished stages are skipped on a re-run with the same ``--out``):

1. tokenizer (every caption word one token) and a frozen, randomly initialised tiny ``CLIPTextModel``;
2. the synthetic dataset, generated in memory from ``--seed``;
3. a tiny ``AutoencoderKL`` (32x32x3 <-> 16x16x4), then every image encoded once (latent means) and the
   latent scaling factor set to ``1 / std``;
4. a ``UNet2DConditionModel`` (epsilon prediction, min-SNR-gamma weighting, caption dropout to ``""``
   for classifier-free guidance, AdamW with linear warm-up and cosine decay, EMA);
5. export of a standard diffusers ``StableDiffusionPipeline`` directory (EMA weights, fp16 safetensors).

Usage::

    python -m attnctl.toy.train --out /work/toy-run --export attnctl/assets/toy-shapes   # the shipped model: the defaults

Progress (step, loss, seconds per step) goes to ``OUT/train.log`` and stdout; checkpoints to
``OUT/ckpt``; a killed run resumes from its last checkpoint when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as toy_data
from .grounding import grounding_losses, grounding_targets, record_cross_attention
from .tokenizer import make_tokenizer


# --------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything that determines the trained model (saved as ``OUT/config.json``)."""

    seed: int = 0
    n_samples: int = 40_000
    threads: int = 2  # 0: adapt to the machine's load (2 threads when it is idle, 1 when it is shared)
    # text encoder (frozen, random)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    text_init_factor: float = 5.0  # CLIP ``initializer_factor``: larger -> more distinct random word embeddings
    # VAE
    vae_channels: tuple[int, ...] = (32, 64)
    vae_steps: int = 1_000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-7
    # UNet
    unet_channels: tuple[int, ...] = (64, 96, 128)
    unet_attention: str = "8,4"  # latent sides (16 / 8 / 4) whose blocks have attention; the mid block has it iff the coarsest does
    unet_heads: int = 4
    unet_steps: int = 4_000
    unet_batch: int = 48
    unet_lr: float = 8e-4
    unet_warmup: int = 200
    unet_weight_decay: float = 0.01
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # TokenCompose's grounding losses on the cross-attention maps (attnctl/toy/grounding.py); 0 = off (the shipped model)
    ground_token_weight: float = 0.0
    ground_pixel_weight: float = 0.0
    ground_kinds: str = "one,one_pos,two_pos,two,one_of_two"  # the sample kinds whose captions are grounded
    # bookkeeping
    log_every: int = 25
    ckpt_every: int = 250
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(toy_data.KIND_WEIGHTS))


#: Settings that do not change the trained model; a run may be resumed with other values.
RUNTIME_ONLY = ("threads", "log_every", "ckpt_every")
#: Settings that determine the VAE and the latents (``--reuse-vae`` needs them equal).
VAE_KEYS = ("seed", "n_samples", "kind_weights", "vae_channels", "vae_steps", "vae_batch", "vae_lr", "vae_kl_weight")


def config_diff(saved: dict, cfg: TrainConfig, ignore: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> list[str]:
    """Names of settings where a saved config differs from ``cfg`` (missing saved keys take the defaults)."""
    defaults = json.loads(json.dumps(asdict(TrainConfig())))
    wanted = json.loads(json.dumps(asdict(cfg)))
    keys = [k for k in (only or wanted) if k not in ignore]
    return sorted(k for k in keys if saved.get(k, defaults[k]) != wanted[k])

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


# --------------------------------------------------------------------------- small helpers
class Logger:
    """Prints and appends to ``train.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def pick_threads(requested: int) -> int:
    """``requested`` threads, or for 0 a choice by load: 2 threads when the machine is otherwise idle."""
    if requested > 0:
        return requested
    busy = os.getloadavg()[0] - torch.get_num_threads()  # load caused by other processes
    return 2 if busy < 1.0 else 1


class ThreadGovernor:
    """For ``threads=0``: on a shared, oversubscribed CPU one thread is several times faster than two (the
    OpenMP barriers wait for descheduled threads), so drop to one thread as soon as a two-thread step takes
    much longer than the best two-thread step, and try two again at each log interval if the load allows."""

    def __init__(self, requested: int) -> None:
        self.auto = requested == 0
        self.best2 = float("inf")
        torch.set_num_threads(pick_threads(requested))

    def after_step(self, seconds: float) -> None:
        if not self.auto or torch.get_num_threads() != 2:
            return
        self.best2 = min(self.best2, seconds)
        if seconds > 2.0 * self.best2:
            torch.set_num_threads(1)

    def at_interval(self) -> None:
        if self.auto:
            torch.set_num_threads(pick_threads(0))


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 2% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file so a kill never leaves a torn checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, h, w, 3)`` -> float ``(n, 3, h, w)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------- model builders
def build_text_encoder(cfg: TrainConfig, tokenizer):
    """A seeded, randomly initialised tiny CLIP text encoder (never trained)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed + 1)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_hidden,
        initializer_factor=cfg.text_init_factor,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_vae(cfg: TrainConfig):
    """Tiny ``AutoencoderKL``: two blocks (one downsampling), no mid-block attention, 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed + 2)
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=toy_data.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def attention_levels(cfg: TrainConfig, latent_size: int) -> tuple[bool, ...]:
    """For each UNet level (finest first), whether its blocks have (self- and cross-) attention."""
    sides = [latent_size // 2**i for i in range(len(cfg.unet_channels))]
    try:
        wanted = {int(part) for part in cfg.unet_attention.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"--unet-attention must list latent sides such as '8,4', got {cfg.unet_attention!r}") from None
    if not wanted or not wanted <= set(sides):
        raise ValueError(f"--unet-attention {cfg.unet_attention!r}: choose one or more of the latent sides {sides}")
    return tuple(side in wanted for side in sides)


def build_unet(cfg: TrainConfig, latent_size: int):
    """``UNet2DConditionModel`` with attention at the levels ``cfg.unet_attention`` names (default 8x8 and 4x4)."""
    from diffusers import UNet2DConditionModel

    levels = attention_levels(cfg, latent_size)
    torch.manual_seed(cfg.seed + 3)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        mid_block_type="UNetMidBlock2DCrossAttn" if levels[-1] else "UNetMidBlock2D",
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=32,
    )


# --------------------------------------------------------------------------- stages
@torch.no_grad()
def encode_texts(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """Prompt embeddings exactly as ``StableDiffusionPipeline.encode_prompt`` computes them (77 tokens)."""
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def train_vae(cfg: TrainConfig, images: torch.Tensor, ckpt: Path, log: Logger):
    """Train the VAE (resumable); returns it in eval mode."""
    vae = build_vae(cfg)
    final = ckpt / "vae_final.pt"
    if final.exists():
        vae.load_state_dict(torch.load(final, weights_only=True))
        log(f"vae: loaded {final}")
        return vae.eval()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    start = 0
    state_path = ckpt / "vae_state.pt"
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start = st["step"]
        log(f"vae: resumed at step {start}")
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"vae: {n_params / 1e6:.3f}M params, {cfg.vae_steps} steps, batch {cfg.vae_batch}")
    vae.train()
    t_last, run_loss = time.time(), 0.0
    for step in range(start, cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, 50)
        idx = torch.randint(0, images.shape[0], (cfg.vae_batch,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        rec = vae.decode(z).sample
        recon = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = recon + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run_loss += recon.item()
        if (step + 1) % cfg.log_every == 0:
            dt = (time.time() - t_last) / cfg.log_every
            log(f"vae step {step + 1}/{cfg.vae_steps} recon {run_loss / cfg.log_every:.5f} {dt:.3f} s/step")
            t_last, run_loss = time.time(), 0.0
        if (step + 1) % cfg.ckpt_every == 0:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step + 1},
                        state_path)
    atomic_save(vae.state_dict(), final)
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Latent means of all images (unscaled)."""
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mode() for i in range(0, len(images), batch)])


def train_unet(cfg: TrainConfig, latents: torch.Tensor, cond: torch.Tensor, caption_idx: torch.Tensor,
               null_idx: int, ckpt: Path, log: Logger, stats: dict,
               grounding: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Train the UNet (resumable); returns the EMA UNet.

    ``grounding``: per sample, the grounded words' token indices and their objects' masks
    (:func:`.grounding.grounding_targets`), when the grounding losses are on.
    """
    from diffusers import DDPMScheduler

    unet = build_unet(cfg, latents.shape[-1])
    maps = record_cross_attention(unet) if grounding is not None else None
    ema = build_unet(cfg, latents.shape[-1]).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    final = ckpt / "unet_ema_final.pt"
    if final.exists():
        ema.load_state_dict(torch.load(final, weights_only=True))
        log(f"unet: loaded {final}")
        return ema.eval()
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = sched.alphas_cumprod.float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction

    decay, no_decay = [], []
    for name, p in unet.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.unet_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.unet_lr, betas=(0.9, 0.99),
    )
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    start = 0
    state_path = ckpt / "unet_state.pt"
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        unet.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start = st["step"]
        stats["unet_seconds_before_resume"] = st.get("seconds", 0.0)
        log(f"unet: resumed at step {start}")
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"unet: {n_params / 1e6:.3f}M params, {cfg.unet_steps} steps, batch {cfg.unet_batch}")
    ema_params = list(ema.parameters())
    params = list(unet.parameters())
    unet.train()
    t_start = time.time()
    t_last, run_loss, last_losses, last_weighted, last_ground = time.time(), 0.0, [], [], []
    governor = ThreadGovernor(cfg.threads)
    for step in range(start, cfg.unet_steps):
        t_step = time.time()
        lr = lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.unet_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, latents.shape[0], (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        cidx = caption_idx[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        cidx[drop] = null_idx
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        if maps is not None:
            maps.clear()
        pred = unet(xt, t, cond[cidx]).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        denoising = (per * loss_weight[t]).mean()
        loss = denoising
        if maps is not None:
            words = grounding[0][idx].masked_fill(drop[:, None, None], -1)  # a dropped caption grounds nothing
            token_loss, pixel_loss = grounding_losses(maps, words, grounding[1][idx])
            loss = loss + cfg.ground_token_weight * token_loss + cfg.ground_pixel_weight * pixel_loss
            last_ground = (last_ground + [(token_loss.item(), pixel_loss.item())])[-cfg.log_every:]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - d)
        run_loss += denoising.item()
        governor.after_step(time.time() - t_step)
        last_losses = (last_losses + [per.mean().item()])[-200:]
        last_weighted = (last_weighted + [denoising.item()])[-200:]
        if (step + 1) % cfg.log_every == 0:
            dt = (time.time() - t_last) / cfg.log_every
            log(f"unet step {step + 1}/{cfg.unet_steps} loss {run_loss / cfg.log_every:.4f} "
                f"(unweighted {np.mean(last_losses[-cfg.log_every:]):.4f}) lr {lr:.2e} {dt:.3f} s/step "
                f"threads {torch.get_num_threads()}"
                + (f" grounding token {np.mean([g[0] for g in last_ground]):.4f} pixel {np.mean([g[1] for g in last_ground]):.4f}"
                   if last_ground else ""))
            governor.at_interval()
            t_last, run_loss = time.time(), 0.0
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.unet_steps:
            seconds = stats.get("unet_seconds_before_resume", 0.0) + time.time() - t_start
            atomic_save({"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "gen": gen.get_state(), "step": step + 1, "seconds": seconds}, state_path)
    stats["unet_final_loss_weighted_last200"] = float(np.mean(last_weighted)) if last_weighted else None
    stats["unet_final_loss_unweighted_last200"] = float(np.mean(last_losses)) if last_losses else None
    atomic_save(ema.state_dict(), final)
    return ema.eval()


def grounding_for(cfg: TrainConfig, log: Logger) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The grounding targets of the training samples, or None when both grounding weights are 0."""
    for name in ("ground_token_weight", "ground_pixel_weight"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.ground_token_weight == 0 and cfg.ground_pixel_weight == 0:
        return None
    t0 = time.time()
    samples = toy_data.make_samples(cfg.n_samples, seed=cfg.seed, kind_weights=cfg.kind_weights)
    grounding = grounding_targets(samples, kinds=tuple(k.strip() for k in cfg.ground_kinds.split(",") if k.strip()))
    log(f"grounding: {int((grounding[0][..., 0] >= 0).sum())} named objects' masks in {time.time() - t0:.1f}s")
    return grounding


# --------------------------------------------------------------------------- export
_LOG_RE = re.compile(r"(?P<stage>vae|unet) step (?P<step>\d+)/(?P<total>\d+) (?:recon|loss) (?P<loss>[\d.]+)"
                     r"(?: \(unweighted (?P<unweighted>[\d.]+)\))?.* (?P<dt>[\d.]+) s/step")


def summarize_log(log_path: Path, vae_log_path: Path | None = None) -> dict:
    """Training summary from a run's ``train.log`` (robust to resumed runs: every logged interval counts once).
    A run that reused another run's VAE passes that run's log as ``vae_log_path``: only its VAE steps count."""
    rows: dict[str, dict[int, dict]] = {"vae": {}, "unet": {}}
    for path, stages in ((vae_log_path, ("vae",)), (log_path, ("vae", "unet"))):
        if path is None:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            m = _LOG_RE.search(line)
            if m and m["stage"] in stages:
                rows[m["stage"]][int(m["step"])] = m.groupdict()
    out: dict = {}
    for stage, by_step in rows.items():
        if not by_step:
            continue
        steps = sorted(by_step)
        dts = [float(by_step[s]["dt"]) for s in steps]
        intervals = np.diff([0, *steps])  # steps covered by each logged line (log_every may change on resume)
        out[f"{stage}_steps"] = steps[-1]
        out[f"{stage}_minutes"] = float(np.dot(dts, intervals)) / 60.0
        out[f"{stage}_seconds_per_step"] = float(np.median(dts))
        out[f"{stage}_minutes_at_median_rate"] = float(np.median(dts)) * steps[-1] / 60.0
        last = [by_step[s] for s in steps[-8:]]
        out[f"{stage}_final_loss"] = float(np.mean([float(r["loss"]) for r in last]))
        if stage == "unet":
            out["final_loss"] = out["unet_final_loss"]
            out["final_loss_unweighted"] = float(np.mean([float(r["unweighted"]) for r in last]))
    out["total_minutes"] = out.get("vae_minutes", 0.0) + out.get("unet_minutes", 0.0)
    out["total_minutes_at_median_rate"] = sum(out.get(f"{s}_minutes_at_median_rate", 0.0) for s in ("vae", "unet"))
    out["note"] = ("minutes are the sums of logged training-step times (data generation, latent encoding and "
                   "export add about a minute); final losses are means over the last 200 steps "
                   "(unet: min-SNR-weighted epsilon MSE; vae: MSE + 0.5 L1)")
    return out


def export_pipeline(out_dir: Path, tokenizer, text_encoder, vae, unet, scheduler_class: str = "DDIMScheduler") -> Path:
    """Save a standard ``StableDiffusionPipeline`` directory with fp16 safetensors weights."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    sched_cls = getattr(diffusers, scheduler_class)
    extra = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1} if scheduler_class == "DDIMScheduler" else {}
    scheduler = sched_cls(**SCHEDULER_CONFIG, **extra)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    cfg = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m attnctl.toy.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run directory (log, checkpoints, model)")
    p.add_argument("--export", type=Path, default=None, help="also copy the final model here (e.g. attnctl/assets/toy-shapes)")
    p.add_argument("--scheduler", default="DDIMScheduler", help="scheduler class saved with the model")
    p.add_argument("--reuse-vae", type=Path, default=None,
                   help="copy the trained VAE and latents of another run with the same data and VAE settings")
    p.add_argument("--kind-weights", default=None, metavar="KIND=W,...",
                   help="the caption kinds' mixture weights (default: attnctl.toy.data.KIND_WEIGHTS); kinds left out get 0, "
                        "e.g. one=0.35,one_pos=0.3,two_pos=0.3,two=0.05 (no one-of-two captions)")
    p.add_argument("--snapshot", action="store_true",
                   help="only export the latest checkpoint's EMA weights to OUT/snapshot (inspect a run in progress)")
    for name, value in asdict(cfg).items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    for name, value in asdict(cfg).items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            setattr(cfg, name, getattr(args, name))
    if args.kind_weights is not None:
        cfg.kind_weights = parse_kind_weights(args.kind_weights)
    return args, cfg


def parse_kind_weights(text: str) -> dict[str, float]:
    """``"one=0.35,two=0.05"`` -> every kind of ``KIND_WEIGHTS`` with its weight (0 where not named)."""
    weights = dict.fromkeys(toy_data.KIND_WEIGHTS, 0.0)
    for item in (part.strip() for part in text.split(",") if part.strip()):
        kind, _, value = item.partition("=")
        if kind not in weights:
            raise ValueError(f"--kind-weights: unknown kind {kind!r}; the kinds are {', '.join(weights)}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"--kind-weights: {item!r} is not KIND=WEIGHT with a number") from None
        if not weights[kind] >= 0:
            raise ValueError(f"--kind-weights: the weight of {kind!r} must be >= 0, got {value}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"--kind-weights: {text!r} gives no kind a positive weight")
    return weights


def snapshot(out: Path, cfg: TrainConfig, scheduler_class: str, log: Logger) -> Path:
    """Export the EMA weights of the latest UNet checkpoint of a run (in progress) to ``OUT/snapshot``."""
    from .tokenizer import load_tokenizer

    ckpt = out / "ckpt"
    tokenizer = load_tokenizer(out / "tokenizer")
    text_encoder = build_text_encoder(cfg, tokenizer)
    vae = build_vae(cfg)
    vae.load_state_dict(torch.load(ckpt / "vae_final.pt", weights_only=True))
    vae.register_to_config(scaling_factor=float(1.0 / torch.load(ckpt / "latents.pt", weights_only=True).std()))
    unet = build_unet(cfg, toy_data.IMAGE_SIZE // 2)
    final = ckpt / "unet_ema_final.pt"
    if final.exists():
        unet.load_state_dict(torch.load(final, weights_only=True))
        step = cfg.unet_steps
    else:
        state = torch.load(ckpt / "unet_state.pt", weights_only=False)
        unet.load_state_dict(state["ema"])
        step = state["step"]
    path = export_pipeline(out / "snapshot", tokenizer, text_encoder.eval(), vae.eval(), unet.eval(), scheduler_class)
    log(f"snapshot: EMA weights at unet step {step} exported to {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    out: Path = args.out
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train.log")
    torch.set_num_threads(pick_threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        diff = config_diff(json.loads(cfg_path.read_text()), cfg, ignore=RUNTIME_ONLY)
        if diff:
            log(f"config differs from {cfg_path} in {diff}; refusing to resume a different run (use a new --out)")
            return 2
    if args.reuse_vae is not None and not (ckpt / "vae_final.pt").exists():
        other = json.loads((args.reuse_vae / "config.json").read_text())
        diff = config_diff(other, cfg, only=VAE_KEYS)
        if diff:
            log(f"cannot reuse the VAE of {args.reuse_vae}: its config differs in {diff}")
            return 2
        for name in ("vae_final.pt", "latents.pt"):
            shutil.copy2(args.reuse_vae / "ckpt" / name, ckpt / name)
        (ckpt / "vae_source.json").write_text(json.dumps({"run": str(args.reuse_vae.resolve())}) + "\n")
        log(f"vae: reusing the trained VAE and latents of {args.reuse_vae} (same data and VAE config)")
    if args.snapshot:
        snapshot(out, cfg, args.scheduler, log)
        return 0
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log(f"start: {' '.join(sys.argv)}")
    stats: dict = {"config": asdict(cfg)}
    t_all = time.time()

    tokenizer = make_tokenizer(out / "tokenizer")
    text_encoder = build_text_encoder(cfg, tokenizer)

    t0 = time.time()
    images_u8, captions = toy_data.make_dataset(cfg.n_samples, seed=cfg.seed, kind_weights=cfg.kind_weights)
    images = images_to_tensor(images_u8)
    log(f"data: {len(captions)} samples in {time.time() - t0:.1f}s")

    t0 = time.time()
    vae = train_vae(cfg, images, ckpt, log)
    stats["vae_seconds"] = time.time() - t0
    with torch.no_grad():
        rec = vae.decode(vae.encode(images[:500]).latent_dist.mode()).sample
        stats["vae_recon_mse"] = F.mse_loss(rec, images[:500]).item()
    log(f"vae: held-in recon MSE {stats['vae_recon_mse']:.5f}")

    lat_path = ckpt / "latents.pt"
    if lat_path.exists():
        latents = torch.load(lat_path, weights_only=True)
    else:
        t0 = time.time()
        latents = encode_latents(vae, images)
        atomic_save(latents, lat_path)
        log(f"latents: {tuple(latents.shape)} encoded in {time.time() - t0:.1f}s")
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latents: mean {latents.mean():.3f} std {latents.std():.3f} -> scaling_factor {scaling:.4f}")
    latents = latents * scaling

    unique = sorted(set(captions))
    texts = [""] + unique
    cond = encode_texts(tokenizer, text_encoder, texts)
    index = {c: i for i, c in enumerate(texts)}
    caption_idx = torch.tensor([index[c] for c in captions])
    log(f"text: {len(unique)} distinct captions embedded, shape {tuple(cond.shape)}")

    grounding = grounding_for(cfg, log)
    t0 = time.time()
    unet = train_unet(cfg, latents, cond, caption_idx, 0, ckpt, log, stats, grounding)
    stats["unet_seconds_this_process"] = time.time() - t0

    model_dir = export_pipeline(out / "model", tokenizer, text_encoder, vae, unet, args.scheduler)
    vae_log = None
    if (ckpt / "vae_source.json").exists():
        source = Path(json.loads((ckpt / "vae_source.json").read_text())["run"])
        vae_log = source / "train.log"
        stats["vae_reused_from"] = str(source)
    summary = {**summarize_log(out / "train.log", vae_log), "config": asdict(cfg), "vae_reused_from": stats.get("vae_reused_from"),
               "scaling_factor": scaling, "vae_recon_mse": stats["vae_recon_mse"]}
    (model_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    stats["model_bytes"] = size
    stats["total_seconds_this_process"] = time.time() - t_all
    log(f"export: {model_dir} ({size / 1e6:.2f} MB)")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if args.export is not None:
        if args.export.exists():
            shutil.rmtree(args.export)
        shutil.copytree(model_dir, args.export)
        log(f"export: copied to {args.export}")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
