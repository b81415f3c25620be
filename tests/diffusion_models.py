"""Tiny diffusion models built from configs (no model hub): a UNet, an SD3 transformer, a CLIP text encoder, and
a Stable Diffusion pipeline of them, for the diffusers and kohya format tests and the example."""

from __future__ import annotations

import torch

from dorakit.integrations.diffusers import (TEXT_ENCODER, TRANSFORMER_ATTENTION, TRANSFORMER_FEED_FORWARD, UNET_ATTENTION,
                                           UNET_CONVS, UNET_FEED_FORWARD)

UNET_TARGETS = UNET_ATTENTION + UNET_FEED_FORWARD + UNET_CONVS
# SD3 adapted with its patch embedding (a strided 2x2 conv) and output projection as well.
SD3_TARGETS = [t for t in TRANSFORMER_ATTENTION + TRANSFORMER_FEED_FORWARD if not t.startswith("ff_context")] + [
    "pos_embed.proj", "proj_out"]
FLUX_TARGETS = TRANSFORMER_ATTENTION + TRANSFORMER_FEED_FORWARD + ["proj_out", "x_embedder"]
CLIP_TARGETS = TEXT_ENCODER


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([3, 500][:batch]),
            torch.randn(batch, 5, 12, generator=g))


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=8, pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8,
    ).eval()


def sd3_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
                pooled_projections=torch.randn(2, 6, generator=g), timestep=torch.tensor([10, 700]))


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=4,
                                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
                                  axes_dims_rope=(2, 2, 0)).eval()


def flux_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 6, 4, generator=g), encoder_hidden_states=torch.randn(2, 3, 12, generator=g),
                pooled_projections=torch.randn(2, 6, generator=g), timestep=torch.tensor([0.1, 0.7]),
                img_ids=torch.zeros(6, 3), txt_ids=torch.zeros(3, 3))


def tiny_clip_text(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def clip_inputs():
    return torch.randint(2, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def tiny_pipeline(unet, text_encoder):
    """A StableDiffusionPipeline around the given UNet and text encoder (enough to load LoRA files into)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4, norm_num_groups=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def perturb(model, seed: int = 3) -> None:
    """Magnitudes off their norms (B is already non-zero with init_lora_weights=False): tests that can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=g, dtype=param.dtype))
