"""Tiny offline pipelines of the newer families (issue #19): `tiny-chroma`, `tiny-qwenimage`, `tiny-zimage`,
`tiny-flux2`, `tiny-wan`.

Built from configs with random weights, deterministic from their seed, generating a 2-step 32x32 image in
well under a second on a CPU. Their classes appeared after diffusers 0.35, the oldest supported diffusers:
`available(name)` says whether the installed diffusers has a fixture's classes.
"""

from __future__ import annotations

from typing import Any

import torch

from .components import _t5_encoder, _vae
from .tokenizers import tiny_t5_tokenizer

#: The diffusers classes each fixture needs (absent from older diffusers releases).
REQUIRES: dict[str, tuple[str, ...]] = {
    "tiny-chroma": ("ChromaPipeline", "ChromaTransformer2DModel"),
    "tiny-qwenimage": ("QwenImagePipeline", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage"),
    "tiny-flux2": ("Flux2KleinPipeline", "Flux2Transformer2DModel", "AutoencoderKLFlux2"),
    "tiny-wan": ("WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan"),
    "tiny-zimage": ("ZImagePipeline", "ZImageTransformer2DModel"),
}
NEW_TINY_MODELS: tuple[str, ...] = tuple(REQUIRES)

NEW_CALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny-chroma": {"height": 32, "width": 32, "max_sequence_length": 32},
    # true CFG needs a negative prompt (QwenImagePipeline runs it when true_cfg_scale > 1 and one is given)
    "tiny-qwenimage": {"height": 32, "width": 32, "negative_prompt": "", "true_cfg_scale": 4.0},
    # klein stacks the hidden states of three text-encoder layers (9, 18, 27 in the real model)
    "tiny-flux2": {"height": 32, "width": 32, "max_sequence_length": 48, "text_encoder_out_layers": (1, 2, 3)},
    # 64x48 pixels, 9 frames -> latents of 3 frames of 8x6 -> a 3 x 4 x 3 token grid (not square, several frames)
    "tiny-wan": {"height": 64, "width": 48, "num_frames": 9, "max_sequence_length": 32},
    "tiny-zimage": {"height": 32, "width": 32, "max_sequence_length": 32},
}

#: Pipelines whose first positional argument is not the prompt (Flux2KleinPipeline: `image`): call with prompt=.
PROMPT_KEYWORD: tuple[str, ...] = ("tiny-flux2",)


def available(name: str) -> bool:
    """Whether the installed diffusers has the classes of the tiny model `name` (read from the lazy module's
    names, without importing the pipelines: that would import transformers' image processors)."""
    import diffusers

    names = set(dir(diffusers))
    major, minor = diffusers.__version__.split(".")[:2]
    recent = (int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)) >= (0, 42)  # families/adapters_new.py
    return recent and all(cls in names for cls in REQUIRES[name])


def tiny_chroma(seed: int = 0):
    """Chroma-like: 1 double block ([text; image]) and 2 single blocks, RoPE, T5 only (with its padding mask),
    2x2 packed latents, true CFG as two calls."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(latent_channels=1, seed=seed + 1, flow=True),
        text_encoder=_t5_encoder(seed=seed + 3), tokenizer=tiny_t5_tokenizer(), transformer=transformer,
    )


def _qwen_vl_encoder(seed: int = 0):
    """A tiny Qwen2.5-VL (2 text layers, M-RoPE; a 1-layer vision tower the pipeline never calls for text)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .qwen_tokenizer import qwen_vocab_size

    torch.manual_seed(seed)
    vocab = qwen_vocab_size()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32, "patch_size": 2,
            "spatial_merge_size": 1, "temporal_patch_size": 1, "window_size": 8, "fullatt_block_indexes": [0],
        },
        vocab_size=vocab, hidden_size=32,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage(seed: int = 0):
    """Qwen-Image-like: 2 double-stream blocks (joint `[text; image]`, text padding mask, separate RoPE), 2x2 packed
    latents of a 1-level Qwen-Image VAE, true CFG as cond / uncond calls.

    Text encoder: a tiny random Qwen2.5-VL with an offline byte-level BPE `Qwen2Tokenizer`
    (`qwen_tokenizer.py`) whose words are single tokens. The pipeline drops the chat template's prefix from the
    embeddings by a token count (`prompt_template_encode_start_idx`, 34 with the real tokenizer); it is set here to
    the prefix's length under the tiny tokenizer, so the prompt's tokens come first as with the real model.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from .qwen_tokenizer import tiny_qwen_tokenizer

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False], latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_qwen_vl_encoder(seed + 2),
        tokenizer=tiny_qwen_tokenizer(), transformer=transformer,
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix).input_ids)
    return pipe


#: Qwen3's chat template (the part Flux.2 klein uses: user turn, generation prompt, thinking off).
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_flux2(seed: int = 0):
    """Flux.2-klein-like: 1 double-stream and 2 single-stream (fused attention + MLP) blocks, 4-axis RoPE, a
    1-level Flux.2 VAE (2x2 patchified latents), true CFG as cond / uncond calls.

    Text encoder: a tiny random Qwen3 (3 layers, whose hidden states are stacked as klein stacks layers 9, 18,
    27) with the offline whole-word `Qwen2Tokenizer` of `qwen_tokenizer.py` and Qwen3's chat template (its
    `<think>` block closed, as klein asks for `enable_thinking=False`)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .qwen_tokenizer import qwen_vocab_size, tiny_qwen_tokenizer

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32,
    ).eval()
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=qwen_vocab_size(), hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
    )).eval()
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )


def tiny_wan(seed: int = 0):
    """Wan-2.1-like text-to-video: 2 blocks of self-attention over a (frames x height x width) token grid with 3-D
    RoPE and cross-attention to umT5 tokens; a tiny Wan VAE (8x spatial, 4x temporal, the factors the pipelines
    assume); true CFG as cond / uncond calls. Text encoder: a tiny random UMT5 with the offline whole-word T5
    tokenizer (umT5's is a SentencePiece unigram model too)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .tokenizers import t5_vocab_size

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()  # 8x spatial, 4x temporal, as Wan 2.1's
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=t5_vocab_size(), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    )).eval()
    return WanPipeline(
        tokenizer=tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


#: Qwen3's chat template with thinking on (Z-Image): the generation prompt ends after "assistant\n".
QWEN3_THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_zimage(seed: int = 0):
    """Z-Image-like: 1 image-refiner and 1 caption-refiner block, 2 main blocks over `[image; text]` (each padded
    to a multiple of 32 tokens), RoPE over (t, h, w); batched CFG as `[cond, uncond]`. Text encoder: a tiny random
    Qwen3 (Z-Image reads the second-to-last hidden states) with the offline whole-word `Qwen2Tokenizer` and
    Qwen3's chat template."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .qwen_tokenizer import qwen_vocab_size, tiny_qwen_tokenizer

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
    ).eval()
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=qwen_vocab_size(), hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
    )).eval()
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_THINKING_TEMPLATE
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed=seed + 1, flow=True), text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer,
    )


NEW_BUILDERS = {"tiny-zimage": tiny_zimage, "tiny-chroma": tiny_chroma, "tiny-qwenimage": tiny_qwenimage, "tiny-flux2": tiny_flux2, "tiny-wan": tiny_wan}


def tiny_wan22(seed: int = 0, boundary_ratio: float = 0.7):
    """Wan-2.2-A14B-like: tiny-wan with a second expert (`transformer_2`, the low-noise expert: same config, its own
    random weights) switched in below `boundary_ratio * 1000` timesteps. With tiny-wan's scheduler (shift 3), 4
    steps put the first 2 on `transformer` and the last 2 on `transformer_2` at the default ratio."""
    from diffusers import WanPipeline

    pipe = tiny_wan(seed)
    torch.manual_seed(seed + 5)
    second = type(pipe.transformer)(**pipe.transformer.config).eval()
    return WanPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
        transformer=pipe.transformer, transformer_2=second, boundary_ratio=boundary_ratio,
    )


class TinyQwenVLProcessor:
    """The nearest honest substitute of `Qwen2VLProcessor` that builds offline here (the real one needs torchvision for
    its video processor): Qwen2-VL's own PIL image processor and the tiny Qwen tokenizer, with the processor's rule of
    expanding each `<|image_pad|>` into one token per merged image patch (`image_grid_thw.prod() // merge_size**2`)."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer: Any, image_processor: Any):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, text: Any = None, images: Any = None, padding: bool = True, return_tensors: str = "pt", **kwargs: Any):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        image_inputs: dict[str, Any] = {}
        if images is not None:
            image_inputs = dict(self.image_processor(images=images, return_tensors=return_tensors))
            merge = self.image_processor.merge_size**2
            counts = iter(int(grid.prod()) // merge for grid in image_inputs["image_grid_thw"])
            expanded = []
            for item in texts:
                while self.image_token in item:
                    item = item.replace(self.image_token, "<|placeholder|>" * next(counts), 1)
                expanded.append(item.replace("<|placeholder|>", self.image_token))
            texts = expanded
        tokens = self.tokenizer(texts, padding=padding, return_tensors=return_tensors)
        return BatchFeature(data={**tokens, **image_inputs}, tensor_type=return_tensors)


def tiny_qwenimage_edit(seed: int = 0, zero_cond_t: bool = False):
    """Qwen-Image-Edit-like: tiny-qwenimage's transformer with a Qwen-Image VAE of factor 8 (the edit pipeline encodes
    its reference image at a ~1024x1024 area whatever the output size: 4096 reference tokens here), a tiny Qwen2.5-VL
    whose vision tower reads the prompt image (2x2 patches, at most 32x32 pixels: 256 vision tokens) and
    `TinyQwenVLProcessor`; `prompt_template_encode_start_idx` is the template prefix's length under the tiny tokenizer
    (64 with the real one), so the kept embeddings start with the vision tokens, as with the real model.
    `zero_cond_t=True`: Qwen-Image-Edit-2511's transformer (the reference tokens modulated with t = 0)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from .qwen_tokenizer import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"))}
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=2, z_dim=4, dim_mult=[1, 1, 1, 1, 1, 1], num_res_blocks=0, temperal_downsample=[False] * 5,
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    torch.manual_seed(seed + 2)
    vocab = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 8192, "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32, "patch_size": 2,
            "spatial_merge_size": 1, "temporal_patch_size": 1, "window_size": 8, "fullatt_block_indexes": [0],
        },
        vocab_size=vocab, hidden_size=32, **ids,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    images = Qwen2VLImageProcessorPil(patch_size=2, merge_size=1, temporal_patch_size=1, min_pixels=16, max_pixels=32 * 32)
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        processor=TinyQwenVLProcessor(tokenizer, images), transformer=transformer,
    )
    prefix = pipe.prompt_template_encode.split("<|image_pad|>")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    return pipe
