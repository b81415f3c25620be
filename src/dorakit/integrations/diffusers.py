"""Which modules of diffusers' models to adapt: the names of their attention, feed-forward and conv layers.

dorakit wraps diffusers' models like any ``nn.Module`` (``inject_adapters`` finds modules by name); these
lists name the layers image-model trainers adapt, for ``DoraConfig(target_modules=...)``:

    UNet2DConditionModel (SD 1.x/2.x, SDXL)     UNET_ATTENTION + UNET_FEED_FORWARD (+ UNET_CONVS)
    SD3Transformer2DModel, FluxTransformer2DModel, other MMDiT/DiT transformers
                                                TRANSFORMER_ATTENTION + TRANSFORMER_FEED_FORWARD
    CLIP / T5 text encoders (transformers)      TEXT_ENCODER

``proj_in``/``proj_out`` are 1x1 convolutions in SD 1.x and Linear layers in SDXL (``use_linear_projection``);
both are adapted, and kohya/diffusers files convert between the two shapes.

Example::

    from dorakit.integrations.diffusers import UNET_ATTENTION, UNET_CONVS
    cfg = dorakit.DoraConfig(r=8, lora_alpha=16, target_modules=UNET_ATTENTION + UNET_CONVS)
    unet = dorakit.inject_adapters(unet, cfg)
"""

from __future__ import annotations

# Attention projections of diffusers' Attention (self- and cross-attention), and the transformer blocks' edges.
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]
UNET_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
# The ResNet blocks: 3x3 convolutions, the 1x1 shortcut, and the time-embedding projection.
UNET_CONVS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]

# Joint attention (SD3/Flux): the image stream's projections and the text stream's ("add_*", "to_add_out").
TRANSFORMER_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TRANSFORMER_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"]

TEXT_ENCODER = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
