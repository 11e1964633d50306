"""The pocket models' architectures, sized for training on two CPU cores in about an hour.

Arithmetic that sets the sizes:
- VAE: three encoder levels (16, 32, 64 channels) halve 64 px twice, so latents are 4 x 16 x 16, as SD's
  VAE turns 512 px into 4 x 64 x 64 (factor 8 there; factor 4 here keeps a 9-px shape a few latents wide).
- UNet: 64/128/128 channels over 16/8/4 latent pixels, cross-attention in the first two levels (SD 1.x
  attends at every level but the lowest); each 3x3 convolution costs about what one of the old tiny
  random model's did (64 ch x 16^2 = 32 ch x 32^2 in multiply-adds per output channel pair).
- CLIP: width 64, 4 layers in each tower, ViT patch 8 (64 tokens per image): a contrastive step on
  128 images and 256 captions took ~0.3 s here, against ~5 s at width 128. Its text tower, sharpened
  alone (fit.train_clip_text) and frozen, is the SD text encoder, as OpenAI CLIP's is in SD 1.x. The
  49,408-row token table (the real CLIP vocabulary) is 3.2 M of its ~3.6 M parameters; most rows are
  never used by the pocket world.
"""

from __future__ import annotations

from pocket.world import RESOLUTION

WIDTH = 64  # CLIP width in both towers = the UNet's cross-attention dimension
LATENT_FACTOR = 4


def clip_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, projection_dim=WIDTH)
    vision = dict(image_size=RESOLUTION, patch_size=8, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                  num_hidden_layers=4, num_attention_heads=4, projection_dim=WIDTH)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=WIDTH)


def image_processor():
    """What the evaluation feeds the pocket CLIP: 64-px RGB, CLIP's mean and std (no resizing of 64-px images)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION})


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, sample_size=RESOLUTION, norm_num_groups=16)


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // LATENT_FACTOR, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=4)


def new_scheduler():
    """SD 1.x's noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps), sampled with DDIM."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)
