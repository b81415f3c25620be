"""Fine-tune a tiny diffusers UNet with DoRA on synthetic images, then save it for diffusers and for ComfyUI/A1111.

    .venv/bin/python examples/diffusion_dora.py                      # output axis (PEFT's, diffusers')
    .venv/bin/python examples/diffusion_dora.py --magnitude-axis in  # LyCORIS's legacy input axis (kohya file only)

No model hub: the UNet is built from a config (random weights) and the "images" are 4-channel latents of
squares and discs, each shape with its own fixed caption embedding for the cross-attention. Training is
DDPM's noise prediction. Writes OUT/diffusers/pytorch_lora_weights.safetensors (diffusers'
``pipe.load_lora_weights`` reads it) and OUT/unet_dora.safetensors (kohya/LyCORIS names: ComfyUI, A1111),
then loads both back and prints how far each is from the trained model.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

import dorakit
from dorakit.integrations.diffusers import UNET_ATTENTION, UNET_CONVS, UNET_FEED_FORWARD


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )


def synthetic_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [batch, 4, 16, 16] of a square or a disc at a random place, and the caption of each shape."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    shape = torch.randint(0, 2, (batch,), generator=generator)
    centre = torch.randint(4, 12, (batch, 2), generator=generator).float()
    dy, dx = yy - centre[:, 0, None, None], xx - centre[:, 1, None, None]  # [batch, 16, 16]
    square = (dy.abs() < 3) & (dx.abs() < 3)
    disc = dy * dy + dx * dx < 10
    mask = torch.where(shape[:, None, None] == 0, square, disc).float()
    colour = torch.tensor([1.0, -0.5, 0.5, -1.0])
    latents = mask[:, None] * colour[None, :, None, None]  # [batch, 4, 16, 16]
    captions = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(42))  # one per shape
    return latents, captions[shape]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--magnitude-axis", choices=["out", "in"], default="out")
    parser.add_argument("--out", default="runs/diffusion_dora")
    args = parser.parse_args()

    base = tiny_unet()
    unet = copy.deepcopy(base)
    config = dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=UNET_ATTENTION + UNET_FEED_FORWARD + UNET_CONVS,
                                magnitude_axis=args.magnitude_axis)
    dorakit.inject_adapters(unet, config)
    dorakit.print_trainable_parameters(unet)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    unet.train()
    for step in range(args.steps):
        latents, captions = synthetic_batch(args.batch, generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, captions).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    unet.eval()

    out = Path(args.out)
    latents, captions = synthetic_batch(2, torch.Generator().manual_seed(7))
    probe = (latents, torch.tensor([10, 600]), captions)
    with torch.no_grad():
        trained = unet(*probe).sample

        def distance(model) -> float:
            return ((model(*probe).sample - trained).norm() / trained.norm()).item()

        kohya = dorakit.save_kohya(unet, out / "unet_dora.safetensors", overwrite=True)
        print(f"kohya/LyCORIS file (ComfyUI, A1111): {kohya}")
        print(f"  dorakit.load_adapter(base, file) vs trained, relative difference: "
              f"{distance(dorakit.load_adapter(copy.deepcopy(base), kohya)):.2e}")
        if args.magnitude_axis == "out":
            directory = dorakit.save_diffusers(unet, out / "diffusers", overwrite=True)
            print(f"diffusers file (pipe.load_lora_weights): {directory}")
            theirs = copy.deepcopy(base)
            theirs.load_lora_adapter(str(directory), prefix="unet", use_safetensors=True)
            print(f"  diffusers' load_lora_adapter vs trained, relative difference: {distance(theirs):.2e}")
        else:
            print("diffusers file: not written (diffusers computes the output axis only; see docs/formats.md)")
        merged = dorakit.merge_and_unload(unet)
        print(f"merged into the weights vs trained, relative difference: {distance(merged):.2e}")


if __name__ == "__main__":
    main()
