"""Stable Diffusion v1.5's exact component configurations, for random-weight builds of the full size.

The values are those of the published checkpoint's ``unet/``, ``vae/``, ``text_encoder/`` and ``scheduler/``
config files; the parameter counts below are what they must reproduce. The full-size architecture test and
the GPU benchmark build from these (no download), so both exercise exactly SD v1.5's shapes.
"""

from __future__ import annotations

__all__ = ["CLIP_L14_TEXT", "CLIP_L14_VISION", "SD15_PARAMS", "SD15_SCHEDULER", "SD15_UNET", "SD15_VAE"]

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
)
CLIP_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
# the vision tower of openai/clip-vit-large-patch14 (its config.json's vision_config; 768-d projection as the text
# width), the guidance model of the paper presets (models.clip): 303,966,208 parameters with the projection
CLIP_L14_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu", projection_dim=768,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)
# parameter counts of the published SD v1.5 weights
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
