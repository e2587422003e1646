"""StableSR / StableSR-Turbo priors on a tiny random model: conversion from the original checkpoint layout, strict
loading, sampling, colour fixes, tiling and the errors bad inputs give. CPU, offline.

The original-layout checkpoint is written from a tiny ``StableSRModel`` by ``to_original`` below (the inverse of the
converter's tables). So that this is not circular, ``ORIGINAL_KEYS`` lists key names and shapes read off StableSR's
own modules (``UNetModelDualcondV2``, ``EncoderUNetModelWT``, ``Encoder``/``Decoder_Mix``, ``Fuse_sft_block_RRDB``),
the fused-qkv layout is checked against a direct evaluation of StableSR's legacy attention, and the null-text
context against ``torch.nn.MultiheadAttention`` (OpenCLIP's attention) and transformers' CLIP text model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gsr_core.priors import load_prior
from gsr_core.priors.colour_fix import adain, colour_fix, wavelet_decompose, wavelet_fix
from gsr_core.priors.stablesr import (StableSRPrior, StableSRSettings, read_folder_settings, respaced_timesteps,
                                      tile_origins, tiled)
from gsr_core.priors.stablesr_convert import (RENAMES, START_TOKEN, END_TOKEN, Part, encoder_parts, load_context,
                                              materialize, open_clip_null_context, unet_parts, vae_parts)
from gsr_core.priors.stablesr_modules import StableSRArchitecture, build_model, count_modules

TINY = dict(model_channels=32, channel_mult=(1, 2, 2, 2), num_head_channels=16, context_dim=32, semb_channels=64,
            encoder_channels=32, encoder_channel_mult=(1, 1, 2, 2), vae_channels=32, vae_channel_mult=(1, 1, 2, 2),
            text_heads=2, fuse_rrdb_blocks=1)
TEXT_LAYERS = 2

# (key, shape) in the original checkpoints for TINY, from StableSR's module definitions
ORIGINAL_KEYS = {
    "model.diffusion_model.time_embed.0.weight": (128, 32),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
    "model.diffusion_model.input_blocks.1.0.spade.param_free_norm.weight": (32,),
    "model.diffusion_model.input_blocks.1.0.spade.mlp_shared.0.weight": (128, 64, 3, 3),
    "model.diffusion_model.input_blocks.1.0.spade.mlp_gamma.weight": (32, 128, 3, 3),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32),
    "model.diffusion_model.input_blocks.3.0.op.weight": (32, 32, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (64, 32, 1, 1),
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (64, 128),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (64, 32),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (64, 64, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (64, 64, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (32, 64, 1, 1),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (256, 32),
    "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
    "structcond_stage_model.input_blocks.1.1.qkv.weight": (96, 32, 1),
    "structcond_stage_model.input_blocks.9.0.op.weight": (64, 64, 3, 3),
    "structcond_stage_model.middle_block.1.proj_out.weight": (64, 64, 1),
    "structcond_stage_model.fea_tran.0.skip_connection.weight": (64, 32, 1, 1),
    "structcond_stage_model.fea_tran.3.out_layers.3.weight": (64, 64, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (64, 64, 1, 1),
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (32, 64, 1, 1),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (96, 32),
}
CFW_KEYS = {
    "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
    "decoder.up.3.upsample.conv.weight": (64, 64, 3, 3),
    "decoder.fusion_layer_1.encode_enc_1.conv_out.weight": (32, 64, 1, 1),
    "decoder.fusion_layer_2.encode_enc_2.0.rdb3.conv5.weight": (64, 192, 3, 3),
    "decoder.fusion_layer_2.encode_enc_3.norm1.weight": (64,),
    "quant_conv.weight": (8, 8, 1, 1),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: threads only contend


# --- writing checkpoints in the original layout ---------------------------------------------------------------------


def to_original(state: dict[str, torch.Tensor], parts: list[Part]) -> dict[str, torch.Tensor]:
    """Our state dict (one part of it) in the original layout: inverse renames, 1x1 convs, fused per-head qkv."""
    out = {}
    for part in parts:
        own = {k[len(part.ours) + 1:]: v for k, v in state.items() if k.startswith(part.ours + ".")}
        if part.kind == "same":
            out.update({f"{part.original}.{k}": v for k, v in own.items()})
            continue
        inverse = {ours: original for original, ours in RENAMES[part.kind].items()}
        for suffix, value in own.items():
            module, _, name = suffix.rpartition(".")
            if module in ("to_k", "to_v") and part.kind == "legacy_attention":
                continue
            if module == "to_q" and part.kind == "legacy_attention":
                heads, parts_qkv = part.heads, [own[f"to_{p}.{name}"] for p in "qkv"]
                fused = torch.stack([p.reshape(heads, -1, *p.shape[1:]) for p in parts_qkv], 1)
                fused = fused.reshape(-1, *value.shape[1:])
                out[f"{part.original}.qkv.{name}"] = fused[..., None] if name == "weight" else fused
                continue
            match = next(m for m in inverse if module == m or module.startswith(m + "."))
            if name == "weight" and value.dim() == 2 and part.kind in ("vae_attention", "legacy_attention"):
                value = value[..., None, None] if part.kind == "vae_attention" else value[..., None]
            out[f"{part.original}.{inverse[match] + module[len(match):]}.{name}"] = value
    return out


def random_open_clip(width: int, layers: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's weights (``cond_stage_model.model.`` layout) with random values."""
    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale
    weights = {"token_embedding.weight": rand(49408, width, scale=0.02),
               "positional_embedding": rand(77, width, scale=0.01),
               "ln_final.weight": 1 + rand(width, scale=0.1), "ln_final.bias": rand(width, scale=0.1),
               "text_projection": rand(width, width), "logit_scale": torch.tensor(4.6)}
    for layer in range(layers):
        p = f"transformer.resblocks.{layer}."
        weights.update({
            p + "ln_1.weight": 1 + rand(width, scale=0.1), p + "ln_1.bias": rand(width, scale=0.1),
            p + "attn.in_proj_weight": rand(3 * width, width, scale=width ** -0.5),
            p + "attn.in_proj_bias": rand(3 * width, scale=0.1),
            p + "attn.out_proj.weight": rand(width, width, scale=width ** -0.5),
            p + "attn.out_proj.bias": rand(width, scale=0.1),
            p + "ln_2.weight": 1 + rand(width, scale=0.1), p + "ln_2.bias": rand(width, scale=0.1),
            p + "mlp.c_fc.weight": rand(4 * width, width, scale=width ** -0.5),
            p + "mlp.c_fc.bias": rand(4 * width, scale=0.1),
            p + "mlp.c_proj.weight": rand(width, 4 * width, scale=(4 * width) ** -0.5),
            p + "mlp.c_proj.bias": rand(width, scale=0.1)})
    return weights


def schedule_buffers(arch: StableSRArchitecture) -> dict[str, torch.Tensor]:
    betas = torch.linspace(arch.beta_start ** 0.5, arch.beta_end ** 0.5, arch.num_train_timesteps,
                           dtype=torch.float64) ** 2
    return {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}


def original_checkpoints(model, arch: StableSRArchitecture, generator: torch.Generator
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(diffusion checkpoint state dict, CFW autoencoder state dict) in StableSR's key layout."""
    state = model.state_dict()
    vae = to_original(state, vae_parts(arch))
    diffusion = {**{"model.diffusion_model." + k: v for k, v in to_original(state, unet_parts(arch)).items()},
                 **{"structcond_stage_model." + k: v for k, v in to_original(state, encoder_parts(arch)).items()},
                 **{"first_stage_model." + k: v for k, v in vae.items() if "fusion_layer" not in k},
                 **{"cond_stage_model.model." + k: v for k, v in random_open_clip(arch.context_dim, TEXT_LAYERS,
                                                                                  generator).items()},
                 **schedule_buffers(arch)}
    training_only = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}
    return diffusion, {**vae, **training_only}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny random model, its checkpoints in the original layout (torch .ckpt files) and the converted folder."""
    folder = tmp_path_factory.mktemp("stablesr")
    arch = StableSRArchitecture(**TINY)
    torch.manual_seed(0)
    model = build_model(arch).eval()
    diffusion, cfw = original_checkpoints(model, arch, torch.Generator().manual_seed(1))
    torch.save({"state_dict": diffusion, "global_step": 117}, folder / "stablesr_tiny.ckpt")
    torch.save({"state_dict": cfw}, folder / "vqgan_cfw_tiny.ckpt")
    materialize(str(folder / "stablesr_tiny.ckpt"), folder / "prior", vae=str(folder / "vqgan_cfw_tiny.ckpt"),
                config=TINY)
    return {"folder": folder, "model": model, "arch": arch, "diffusion": diffusion, "cfw": cfw,
            "source": str(folder / "stablesr_tiny.ckpt"), "vae": str(folder / "vqgan_cfw_tiny.ckpt")}


def lr_images(size: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Smooth random LR images [B,3,size,size] in [-1,1]."""
    coarse = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


# --- conversion ----------------------------------------------------------------------------------------------------


def test_original_layout_has_stablesr_key_names_and_shapes(tiny):
    for key, shape in ORIGINAL_KEYS.items():
        assert tuple(tiny["diffusion"][key].shape) == shape, key
    for key, shape in CFW_KEYS.items():
        assert tuple(tiny["cfw"][key].shape) == shape, key
    spade = {k.split(".spade.")[0] for k in tiny["diffusion"] if ".spade." in k}
    assert len(spade) == tiny["arch"].expected_counts()["spade"] == 22


def test_converted_folder_loads_strictly_with_the_source_weights(tiny):
    prior = load_prior(tiny["folder"] / "prior")
    assert isinstance(prior, StableSRPrior) and prior.kind == "stablesr" and prior.latent and prior.scale == 4
    assert count_modules(prior.model) == {"spade": 22, "fea_tran": 4, "fusion": 2}
    ours, source = prior.model.state_dict(), tiny["model"].state_dict()
    assert set(ours) == set(source)
    assert all(torch.equal(ours[k], source[k]) for k in source if k != "null_context")
    assert not any(p.requires_grad for p in prior.model.parameters())
    saved = json.loads((tiny["folder"] / "prior" / "prior.json").read_text())
    assert saved["kind"] == "stablesr" and saved["default_steps"] == 200 and saved["dec_w"] == 0.5
    assert saved["architecture"]["model_channels"] == 32 and saved["sources"]["vae"] == tiny["vae"]


def legacy_attention(x: torch.Tensor, norm: torch.nn.GroupNorm, qkv_w, qkv_b, proj_w, proj_b, heads: int):
    """StableSR's ``AttentionBlock`` with ``QKVAttentionLegacy`` evaluated directly from the fused weights."""
    b, c, h, w = x.shape
    qkv = F.conv1d(norm(x).reshape(b, c, -1), qkv_w, qkv_b)
    q, k, v = qkv.reshape(b * heads, 3 * c // heads, -1).split(c // heads, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c // heads), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    return x + F.conv1d(attended, proj_w, proj_b).reshape(b, c, h, w)


def test_fused_qkv_converts_to_the_same_attention(tiny):
    prior = load_prior(tiny["folder"] / "prior")
    attention = prior.model.structcond.down_blocks[1].attentions[0]
    key = "structcond_stage_model.input_blocks.4.1."
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(3))
    d = tiny["diffusion"]
    norm = torch.nn.GroupNorm(32, 32, eps=1e-5)
    norm.load_state_dict({"weight": d[key + "norm.weight"], "bias": d[key + "norm.bias"]})
    expected = legacy_attention(x, norm, d[key + "qkv.weight"], d[key + "qkv.bias"], d[key + "proj_out.weight"],
                                d[key + "proj_out.bias"], heads=4)
    with torch.no_grad():
        assert torch.allclose(attention(x), expected, atol=1e-5)


def open_clip_reference(weights: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """OpenCLIP's text transformer (``nn.MultiheadAttention`` blocks), penultimate layer + ln_final, empty prompt."""
    width = weights["positional_embedding"].shape[1]
    ids = torch.tensor([START_TOKEN, END_TOKEN] + [0] * 75)
    x = (weights["token_embedding.weight"][ids] + weights["positional_embedding"])[:, None]  # [L,1,D]
    mask = torch.full((77, 77), float("-inf")).triu(1)
    for layer in range(TEXT_LAYERS - 1):
        p = f"transformer.resblocks.{layer}."
        ln_1, ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        ln_1.load_state_dict({"weight": weights[p + "ln_1.weight"], "bias": weights[p + "ln_1.bias"]})
        ln_2.load_state_dict({"weight": weights[p + "ln_2.weight"], "bias": weights[p + "ln_2.bias"]})
        attn = torch.nn.MultiheadAttention(width, heads)
        attn.load_state_dict({k[len(p + "attn."):]: v for k, v in weights.items() if k.startswith(p + "attn.")})
        x = x + attn(ln_1(x), ln_1(x), ln_1(x), need_weights=False, attn_mask=mask)[0]
        hidden = F.gelu(F.linear(ln_2(x), weights[p + "mlp.c_fc.weight"], weights[p + "mlp.c_fc.bias"]))
        x = x + F.linear(hidden, weights[p + "mlp.c_proj.weight"], weights[p + "mlp.c_proj.bias"])
    return F.layer_norm(x[:, 0], (width,), weights["ln_final.weight"], weights["ln_final.bias"])[None]


def test_null_context_is_open_clips_empty_prompt_embedding(tiny, tmp_path):
    text = {k[len("cond_stage_model.model."):]: v for k, v in tiny["diffusion"].items()
            if k.startswith("cond_stage_model.model.")}
    prior = load_prior(tiny["folder"] / "prior")
    with torch.no_grad():
        expected = open_clip_reference(text, heads=2)
    assert prior.model.null_context.shape == (1, 77, 32)
    assert torch.allclose(prior.model.null_context, expected, atol=1e-5)
    # SD-2.x's diffusers text encoder is OpenCLIP's tower cut one layer short: same embedding via transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128,
                                           num_attention_heads=2, num_hidden_layers=TEXT_LAYERS - 1,
                                           max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5))
    hf = {"embeddings.token_embedding.weight": text["token_embedding.weight"],
          "embeddings.position_embedding.weight": text["positional_embedding"],
          "final_layer_norm.weight": text["ln_final.weight"],
          "final_layer_norm.bias": text["ln_final.bias"]}
    for layer in range(TEXT_LAYERS - 1):
        p, q = f"transformer.resblocks.{layer}.", f"encoder.layers.{layer}."
        for name in ("weight", "bias"):
            for proj, part in zip("qkv", text[p + f"attn.in_proj_{name}"].chunk(3)):
                hf[q + f"self_attn.{proj}_proj.{name}"] = part
            hf.update({q + f"self_attn.out_proj.{name}": text[p + f"attn.out_proj.{name}"],
                       q + f"layer_norm1.{name}": text[p + f"ln_1.{name}"],
                       q + f"layer_norm2.{name}": text[p + f"ln_2.{name}"],
                       q + f"mlp.fc1.{name}": text[p + f"mlp.c_fc.{name}"],
                       q + f"mlp.fc2.{name}": text[p + f"mlp.c_proj.{name}"]})
    missing, unexpected = encoder.load_state_dict(hf, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    encoder.save_pretrained(tmp_path / "sd21" / "text_encoder")
    arch = tiny["arch"]
    assert torch.allclose(load_context(tmp_path / "sd21", arch), expected, atol=1e-5)
    assert torch.allclose(open_clip_null_context(text, 2, 77), expected, atol=1e-5)


def test_full_size_architecture_has_stablesrs_counts_and_converts(tmp_path):
    arch = StableSRArchitecture()
    model = build_model(arch, device="meta")  # nothing allocated
    assert arch.expected_counts() == count_modules(model) == {"spade": 22, "fea_tran": 4, "fusion": 2}
    spade = sum(p.numel() for n, p in model.unet.named_parameters() if ".spade." in n)
    assert sum(p.numel() for p in model.unet.parameters()) - spade == 865_910_724  # SD-2.1's UNet
    state = model.state_dict()
    unet = to_original(state, unet_parts(arch))
    assert len(unet) == 686 + 22 * 8  # SD-2.1's UNet keys plus 8 per SPADE block
    for key, shape in {"input_blocks.1.0.spade.mlp_shared.0.weight": (128, 256, 3, 3),
                       "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight": (1280, 1024),
                       "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                       "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
                       "middle_block.2.spade.mlp_beta.weight": (1280, 128, 3, 3)}.items():
        assert tuple(unet[key].shape) == shape, key
    encoder = to_original(state, encoder_parts(arch))
    assert tuple(encoder["fea_tran.2.in_layers.2.weight"].shape) == (256, 512, 3, 3)
    assert tuple(encoder["input_blocks.7.1.qkv.weight"].shape) == (1536, 512, 1)
    vae = to_original(state, vae_parts(arch))
    assert tuple(vae["decoder.fusion_layer_2.encode_enc_1.conv1.weight"].shape) == (512, 1024, 3, 3)
    assert tuple(vae["decoder.up.3.block.0.conv1.weight"].shape) == (512, 512, 3, 3)


# --- sampling ------------------------------------------------------------------------------------------------------


def test_upscale_samples_two_steps(tiny):
    prior = load_prior(tiny["folder"] / "prior")
    lr = lr_images(8, batch=2)
    calls = []
    hr = prior.upscale(lr, steps=2, generator=torch.Generator().manual_seed(0), progress=calls.append)
    assert hr.shape == (2, 3, 32, 32) and torch.isfinite(hr).all() and hr.abs().max() <= 1
    assert calls == [1, 1]
    again = prior.upscale(lr, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hr, again)
    odd = prior.upscale(lr_images(6), steps=2, generator=torch.Generator().manual_seed(0))  # padded, cropped
    assert odd.shape == (1, 3, 24, 24) and torch.isfinite(odd).all()


def test_turbo_samples_at_999_666_333_0(tiny, tmp_path):
    assert respaced_timesteps(1000, 4) == [999, 666, 333, 0]
    full = respaced_timesteps(1000, 200)
    assert len(full) == 200 and full[0] == 999 and full[-1] == 0 and all(a > b for a, b in zip(full, full[1:]))
    materialize(tiny["source"], tmp_path / "turbo", vae=tiny["vae"], config=TINY, turbo=True)
    prior = load_prior(tmp_path / "turbo")
    assert prior.kind == "stablesr_turbo" and prior.settings.default_steps == 4
    seen, predict = [], prior.predict_eps
    prior.predict_eps = lambda z, t, cond: seen.append(t) or predict(z, t, cond)
    prior.upscale(lr_images(8), generator=torch.Generator().manual_seed(0))
    assert seen == [999, 666, 333, 0]


def test_predict_eps_converts_v_predictions(tiny, tmp_path):
    materialize(tiny["source"], tmp_path / "v", vae=tiny["vae"], config={**TINY, "prediction_type": "v_prediction"})
    prior = load_prior(tmp_path / "v")
    cond = prior.condition(lr_images(8))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([600])
    with torch.no_grad():
        v = prior.model_output(z, t, cond)
        a = prior.alphas_cumprod[600].float()
        assert torch.allclose(prior.predict_eps(z, t, cond), a.sqrt() * v + (1 - a).sqrt() * z, atol=1e-6)


def test_encode_decode_and_cfw(tiny):
    prior = load_prior(tiny["folder"] / "prior")
    lr = lr_images(8)
    cond = prior.condition(lr)
    images = cond.upsampled.clone().requires_grad_(True)
    z = prior.encode(images)
    assert z.shape == (1, 4, 4, 4)
    z.sum().backward()  # SDS differentiates through the encoder
    assert images.grad is not None and torch.isfinite(images.grad).all()
    with torch.no_grad():
        plain, fused = prior.decode(z), prior.decode(z, cond)
        prior.settings.dec_w = 0.0
        unfused = prior.decode(z, cond)
    assert plain.shape == (1, 3, 32, 32) and torch.equal(plain, unfused) and not torch.allclose(plain, fused)


# --- colour fix ------------------------------------------------------------------------------------------------------


def test_adain_takes_the_references_channel_statistics():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=generator)
    reference = 0.3 * torch.randn(2, 3, 8, 8, generator=generator) + 0.5
    fixed = adain(images, reference)
    assert torch.allclose(fixed.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(fixed.flatten(2).std(dim=2), reference.flatten(2).std(dim=2), atol=1e-3)
    # the image's pattern is kept: per channel an increasing affine map of the input
    assert torch.allclose(torch.corrcoef(torch.stack([fixed[0, 0].flatten(), images[0, 0].flatten()]))[0, 1],
                          torch.tensor(1.0), atol=1e-5)


def test_wavelet_keeps_the_references_low_and_the_images_high_frequencies():
    rows, cols = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    checker = ((rows + cols) % 2 * 2 - 1).float() * 0.2  # Nyquist pattern: the first blur removes it exactly
    images = (torch.tensor([0.3, -0.2, 0.1])[:, None, None] + checker)[None]
    reference = torch.tensor([-0.5, 0.4, 0.0])[None, :, None, None].expand(1, 3, 96, 96)
    fixed = wavelet_fix(images, reference)
    inner = (..., slice(32, 64), slice(32, 64))  # beyond the decomposition's reach (31 px) from the edges
    assert torch.allclose(fixed[inner], (reference + checker)[inner], atol=1e-6)
    detail, low = wavelet_decompose(images)
    assert torch.allclose(detail + low, images)
    assert torch.equal(colour_fix(images, reference, "none"), images)
    with pytest.raises(ValueError, match="same size|images' size"):
        wavelet_fix(images, reference[..., :48, :48])


# --- tiling ----------------------------------------------------------------------------------------------------------


def test_tiles_cover_and_blend_to_a_partition_of_unity():
    assert tile_origins(16, 8, 4) == [0, 4, 8] and tile_origins(20, 8, 3) == [0, 5, 10, 12]
    assert tile_origins(8, 8, 4) == [0]
    x = torch.randn(2, 4, 21, 34, generator=torch.Generator().manual_seed(0))
    pointwise = tiled(lambda a, b: torch.tanh(a) * b, x, x.flip(1), tile=8, overlap=3)
    assert torch.allclose(pointwise, torch.tanh(x) * x.flip(1), atol=1e-5)


def test_tiled_upscale_equals_untiled_within_one_tile_and_stays_finite(tiny):
    prior = load_prior(tiny["folder"] / "prior")
    lr = lr_images(16, seed=4)  # latent 8x8
    untiled = prior.upscale(lr, steps=2, generator=torch.Generator().manual_seed(0))
    prior.settings.tile_overlap = 4
    prior.settings.tile_size = 8  # one tile covers the latent exactly
    assert torch.equal(prior.upscale(lr, steps=2, generator=torch.Generator().manual_seed(0)), untiled)
    big = lr_images(32, seed=5)  # latent 16x16: 3x3 tiles of 8
    cond = prior.condition(big)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eps_tiled = prior.predict_eps(z, 500, cond)
        prior.settings.tile_size = 64
        eps_whole = prior.predict_eps(z, 500, cond)
    assert torch.isfinite(eps_tiled).all()
    # seamless: the tiled estimate is a smooth blend, no jumps at tile borders beyond the whole-image estimate's
    jumps = (eps_tiled[..., 1:, :] - eps_tiled[..., :-1, :]).abs().amax(dim=(0, 1, 3))
    assert jumps.max() <= 1.5 * (eps_whole[..., 1:, :] - eps_whole[..., :-1, :]).abs().max()
    prior.settings.tile_size = 8
    hr = prior.upscale(big, steps=2, generator=torch.Generator().manual_seed(0))
    assert hr.shape == (1, 3, 128, 128) and torch.isfinite(hr).all()


# --- bad inputs ------------------------------------------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    broken = dict(tiny["diffusion"])
    del broken["model.diffusion_model.input_blocks.1.0.spade.mlp_beta.bias"]
    torch.save({"state_dict": broken}, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing keys \(unet\.down_blocks\.0\.resnets\.0\.spade\.mlp_beta\.bias"):
        materialize(str(tmp_path / "missing.ckpt"), tmp_path / "out", vae=tiny["vae"], config=TINY)
    extra = {**tiny["diffusion"], "model.diffusion_model.input_blocks.1.0.extra.weight": torch.zeros(1)}
    save_file({k: v.contiguous() for k, v in extra.items()}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys in the denoiser: model\.diffusion_model\.input_blocks\.1\.0"
                                         r"\.extra\.weight"):
        materialize(str(tmp_path / "extra.safetensors"), tmp_path / "out", vae=tiny["vae"], config=TINY)
    stray = {**tiny["diffusion"], "model_ema.decay": torch.tensor(0.999)}
    torch.save({"state_dict": stray}, tmp_path / "stray.ckpt")
    with pytest.raises(ValueError, match="unexpected keys outside StableSR's modules: model_ema.decay"):
        materialize(str(tmp_path / "stray.ckpt"), tmp_path / "out", vae=tiny["vae"], config=TINY)
    assert not (tmp_path / "out" / "prior.json").exists()


def test_wrong_checkpoint_kinds_are_named(tiny, tmp_path):
    with pytest.raises(ValueError, match="CFW autoencoder checkpoint.*pass it as `vae`"):
        materialize(tiny["vae"], tmp_path / "out", config=TINY)
    with pytest.raises(ValueError, match="`vae`: .* is a diffusion checkpoint"):
        materialize(tiny["source"], tmp_path / "out", vae=tiny["source"], config=TINY)
    sd_only = {k: v for k, v in tiny["diffusion"].items() if not k.startswith("structcond_stage_model.")}
    torch.save({"state_dict": sd_only}, tmp_path / "sd21.ckpt")
    with pytest.raises(ValueError, match="no time-aware encoder.*not StableSR"):
        materialize(str(tmp_path / "sd21.ckpt"), tmp_path / "out", config=TINY)
    with pytest.raises(ValueError, match="has 22 spade layers where the architecture has 14"):
        materialize(tiny["source"], tmp_path / "out", vae=tiny["vae"], config={**TINY, "num_res_blocks": 1})
    torch.save({"state_dict": tiny["diffusion"], "callback": Path("/somewhere")}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match=r"could not be read with torch.load\(weights_only=True\)"):
        materialize(str(tmp_path / "pickled.ckpt"), tmp_path / "out", config=TINY)
    with pytest.raises(ValueError, match="`source`: checkpoint .* does not exist"):
        materialize(str(tmp_path / "nowhere.ckpt"), tmp_path / "out", config=TINY)


def test_without_cfw_the_checkpoints_own_autoencoder_is_used(tiny, tmp_path):
    materialize(tiny["source"], tmp_path / "plain", config=TINY)
    prior = load_prior(tmp_path / "plain")
    assert not prior.arch.cfw and prior.settings.dec_w == 0 and count_modules(prior.model)["fusion"] == 0
    hr = prior.upscale(lr_images(8), steps=2, generator=torch.Generator().manual_seed(0))
    assert hr.shape == (1, 3, 32, 32) and torch.isfinite(hr).all()
    with pytest.raises(ValueError, match="`dec_w` 0.5 needs CFW fusion layers"):
        materialize(tiny["source"], tmp_path / "bad", config=TINY, settings={"dec_w": 0.5})


def test_wrong_prior_kind_and_context_and_scale_errors(tiny, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "prior.json").write_text(json.dumps({"kind": "sr3"}))
    with pytest.raises(ValueError, match="expected prior kind 'stablesr' or 'stablesr_turbo', found 'sr3'"):
        StableSRPrior.from_folder(folder)
    kind, settings = read_folder_settings(tiny["folder"] / "prior")
    assert kind == "stablesr" and isinstance(settings, StableSRSettings)
    save_file({"context": torch.zeros(1, 77, 16)}, tmp_path / "context.safetensors")
    with pytest.raises(ValueError, match=r"context of shape \(1, 77, 16\), expected \(1, 77, 32\)"):
        materialize(tiny["source"], tmp_path / "out", vae=tiny["vae"], config=TINY,
                    context=str(tmp_path / "context.safetensors"))
    save_file({"context": torch.ones(77, 32)}, tmp_path / "ones.safetensors")
    materialize(tiny["source"], tmp_path / "given", vae=tiny["vae"], config=TINY,
                context=str(tmp_path / "ones.safetensors"))
    prior = load_prior(tmp_path / "given")
    assert torch.equal(prior.model.null_context, torch.ones(1, 77, 32))
    cond = prior.condition(lr_images(8))  # HR 32: latent 4x4
    with pytest.raises(ValueError, match=r"latents \(8, 8\) .* do not match the condition.*scale 4"):
        prior.predict_eps(torch.zeros(1, 4, 8, 8), 10, cond)  # HR views at x8 of the LR
    with pytest.raises(ValueError, match=r"`steps` must lie in \[2, 1000\]"):
        prior.upscale(lr_images(8), steps=1)
