"""Seconds per denoising step of the SR priors at the demo's resolution (LR 64x64 -> HR 256x256), per prior.

    python -m benchmarks.bench_priors [--priors sd_upscaler ldm_sr] [--sizes tiny real] [--lr 64] [--repeats 2]
                                      [--threads 2] [--device cpu] [--dtype float32]

Every prior is built in memory with random weights from its architecture's config: ``real`` is the released
model's architecture (the configs on the hub, written out below), ``tiny`` the toy size the tests use. Timings
do not depend on the weights, so random ones stand in for downloads. Per prior and size the table gives:
parameters of the denoiser, seconds per denoising step (one ``predict_eps`` on batch 1, the median of
``--repeats`` after one warm-up) and seconds for one ``decode`` of the latent to the HR image (latent priors).

Adding a prior: write ``<kind>_prior(size, device, dtype) -> SRPrior`` and add it to ``PRIORS``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable

import torch

from gsr_core.priors.base import SRPrior

# --- stabilityai/stable-diffusion-x4-upscaler -----------------------------------------------------------------------

SD_UPSCALER = {
    "real": {
        "unet": dict(sample_size=128, in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024),
                     layers_per_block=2, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                     up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=1024,
                     attention_head_dim=8, num_class_embeds=1000, only_cross_attention=(True, True, True, False),
                     use_linear_projection=True),
        "vae": dict(block_out_channels=(128, 256, 512), latent_channels=4, layers_per_block=2, sample_size=256),
        "text_dim": 1024,
    },
    "tiny": {
        "unet": dict(sample_size=8, in_channels=7, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                     norm_num_groups=8, num_class_embeds=1000, use_linear_projection=True),
        "vae": dict(block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                    sample_size=32),
        "text_dim": 16,
    },
}


def sd_upscaler_prior(size: str, device: torch.device, dtype: torch.dtype) -> SRPrior:
    """The x4 upscaler with random weights; its text encoder is one small layer of the right width (the prior
    embeds the prompt once at load, so the encoder's size does not enter a step)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gsr_core.priors.sd_upscaler import SDUpscalerPrior, SDUpscalerSettings

    config = SD_UPSCALER[size]
    blocks = len(config["vae"]["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        scaling_factor=0.08333, **config["vae"])
    tokenizer = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[], model_max_length=77)
    width = config["text_dim"]
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=2, hidden_size=width, intermediate_size=width,
                                                num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1)
    low_res = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    return SDUpscalerPrior(vae, UNet2DConditionModel(**config["unet"]), text_encoder, tokenizer, low_res, scheduler,
                           SDUpscalerSettings(), device=device, dtype=dtype, name=f"sd_upscaler-{size}")


# --- CompVis/ldm-super-resolution-4x-openimages --------------------------------------------------------------------

LDM_SR = {
    "real": {
        "unet": dict(sample_size=64, in_channels=6, out_channels=3, block_out_channels=(160, 320, 320, 640),
                     layers_per_block=2, down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
                     up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 3, attention_head_dim=32),
        "vqvae": dict(block_out_channels=(128, 256, 512), latent_channels=3, num_vq_embeddings=8192, layers_per_block=2,
                      sample_size=256),
    },
    "tiny": {
        "unet": dict(sample_size=8, in_channels=6, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=8, norm_num_groups=8),
        "vqvae": dict(block_out_channels=(8, 16, 16), latent_channels=3, num_vq_embeddings=32, layers_per_block=1,
                      norm_num_groups=8, sample_size=32),
    },
}


def ldm_sr_prior(size: str, device: torch.device, dtype: torch.dtype) -> SRPrior:
    """LDM-SR with random weights."""
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    from gsr_core.priors.ldm_sr import LDMSRPrior, LDMSRSettings

    config = LDM_SR[size]
    blocks = len(config["vqvae"]["block_out_channels"])
    vqvae = VQModel(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                    **config["vqvae"])
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1)
    return LDMSRPrior(vqvae, UNet2DModel(**config["unet"]), scheduler, LDMSRSettings(), device=device, dtype=dtype,
                      name=f"ldm_sr-{size}")


# --- IceClear/StableSR (stablesr_000117.ckpt, stablesr_turbo.ckpt + vqgan_cfw_00011.ckpt) --------------------------

STABLESR = {
    "real": {},  # StableSRArchitecture's defaults are the released models'
    "tiny": dict(model_channels=32, channel_mult=(1, 2, 2, 2), num_head_channels=16, context_dim=32, semb_channels=64,
                 encoder_channels=32, encoder_channel_mult=(1, 1, 2, 2), vae_channels=32,
                 vae_channel_mult=(1, 1, 2, 2), text_heads=2, fuse_rrdb_blocks=1),
}


def stablesr_prior(size: str, device: torch.device, dtype: torch.dtype) -> SRPrior:
    """StableSR with random weights: SD-2.1's UNet with 22 SPADE blocks, the time-aware encoder (run inside every
    step) and the CFW autoencoder; StableSR-Turbo has the same networks, so its steps cost the same."""
    from gsr_core.priors.stablesr import StableSRPrior, StableSRSettings
    from gsr_core.priors.stablesr_modules import StableSRArchitecture, build_model

    arch = StableSRArchitecture(**STABLESR[size])
    return StableSRPrior(build_model(arch), StableSRSettings(architecture=arch), device=device, dtype=dtype,
                         name=f"stablesr-{size}")


PRIORS: dict[str, Callable[[str, torch.device, torch.dtype], SRPrior]] = {
    "sd_upscaler": sd_upscaler_prior,
    "ldm_sr": ldm_sr_prior,
    "stablesr": stablesr_prior,
}


# --- measuring ------------------------------------------------------------------------------------------------------

def _seconds(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(prior: SRPrior, lr_size: int, repeats: int) -> dict:
    """Seconds per ``predict_eps`` (median of ``repeats`` after one warm-up) and per ``decode``, batch 1."""
    lr = torch.zeros(1, 3, lr_size, lr_size, device=prior.device)
    with torch.no_grad():
        z = prior.encode(torch.zeros(1, 3, lr_size * prior.scale, lr_size * prior.scale, device=prior.device))
        cond = prior.condition(lr)
        t = prior.num_train_timesteps // 2
        prior.predict_eps(z, t, cond)  # warm-up
        step = statistics.median(_seconds(lambda: prior.predict_eps(z, t, cond), prior.device) for _ in range(repeats))
        decode = _seconds(lambda: prior.decode(z), prior.device) if prior.latent else None
    parameters = sum(p.numel() for p in prior.unet.parameters())
    return {"latent": tuple(z.shape[1:]), "parameters": parameters, "step_s": step, "decode_s": decode}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", nargs="+", choices=sorted(PRIORS), default=sorted(PRIORS))
    parser.add_argument("--sizes", nargs="+", choices=("tiny", "real"), default=["tiny", "real"])
    parser.add_argument("--lr", type=int, default=64, help="LR side in pixels (HR = scale x LR)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="the denoiser's precision (half needs CUDA; autoencoders stay float32)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"LR {args.lr}x{args.lr}, batch 1, {args.device} {args.dtype}, {args.threads} threads, "
          f"median of {args.repeats} steps after 1 warm-up")
    print(f"{'prior':>12} {'size':>5} {'latent':>12} {'params (M)':>10} {'s/step':>8} {'decode s':>8}")
    for name in args.priors:
        for size in args.sizes:
            torch.manual_seed(0)
            prior = PRIORS[name](size, device, dtype)
            row = measure(prior, args.lr, args.repeats)
            decode = f"{row['decode_s']:8.3f}" if row["decode_s"] is not None else f"{'-':>8}"
            print(f"{name:>12} {size:>5} {'x'.join(map(str, row['latent'])):>12} {row['parameters'] / 1e6:10.1f} "
                  f"{row['step_s']:8.3f} {decode}", flush=True)
            del prior
            gc.collect()


if __name__ == "__main__":
    main()
