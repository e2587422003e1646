"""StableSR's networks (Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution") from
diffusers parts plus the modules StableSR adds to Stable Diffusion 2.1.

- ``StableSRArchitecture``: the hyperparameters, defaulting to the released models' (StableSR's
  ``v2-finetune_text_T_512.yaml`` and ``autoencoder_kl_64x64x4_resi.yaml``); tiny test models override them.
- The denoiser is diffusers' ``UNet2DConditionModel`` in SD-2.1's configuration whose ResNet blocks are
  ``SpadeResnetBlock2D``: after the block's second convolution, a SPADE layer modulates the features with the
  time-aware encoder's features at the block's resolution, h <- GN(h) * (1 + gamma(f)) + beta(f), before the skip
  connection is added. ``StableSRModel.denoise`` runs it (diffusers' own ``forward`` has no place for the features).
- ``TimeAwareEncoder`` (StableSR's ``EncoderUNetModelWT``): a half UNet over the LR image's latent, conditioned on
  the timestep; the features before each downsampling and after the middle block go through one ResNet block each
  (``fea_tran``) to ``semb_channels`` channels: one feature map per denoiser resolution level.
- ``CFWAutoencoder`` (``AutoencoderKLResi``): SD's KL autoencoder (diffusers' ``AutoencoderKL``) whose decoder adds
  controllable feature wrapping: at the inner levels 1..n-2 the decoder features d become
  d + w * F(encoder features of the LR image, d), F = ResBlock(2C->C), RRDBs, ResBlock(C->C); w is ``dec_w``.

Shapes: latents [B,4,H/8,W/8]; timesteps [B] (integers in [0, 1000)); context [B,77,1024] for the released model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

NORM_GROUPS = 32  # every GroupNorm of the original networks has 32 groups
SPADE_HIDDEN = 128  # SPADE's hidden width, fixed in the original
RRDB_GROWTH = 32  # channels added by each convolution of a residual dense block


class StableSRArchitecture(BaseModel):
    """Network hyperparameters (original config names in brackets); defaults are the released StableSR's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latent_channels: int = Field(4, ge=1, description="VAE latent channels [z_channels, embed_dim]")
    model_channels: int = Field(320, ge=32, description="denoiser width at the first level [model_channels]")
    channel_mult: tuple[int, ...] = Field((1, 2, 4, 4), min_length=2, description="denoiser width per level")
    num_res_blocks: int = Field(2, ge=1, description="ResNet blocks per denoiser level on the way down")
    attention_resolutions: tuple[int, ...] = Field((4, 2, 1), description="downsampling factors with transformers")
    num_head_channels: int = Field(64, ge=1, description="channels per attention head in the denoiser")
    transformer_depth: int = Field(1, ge=1, description="transformer blocks per attention layer")
    context_dim: int = Field(1024, ge=1, description="cross-attention context width (OpenCLIP ViT-H text)")
    context_tokens: int = Field(77, ge=2, description="tokens of the (empty-prompt) text context")
    semb_channels: int = Field(256, ge=32, description="time-aware encoder output channels [semb_channels, "
                                                       "out_channels]")
    encoder_channels: int = Field(256, ge=32, description="time-aware encoder width [model_channels]")
    encoder_channel_mult: tuple[int, ...] = Field((1, 1, 2, 2), min_length=2, description="encoder width per level")
    encoder_num_res_blocks: int = Field(2, ge=1, description="ResNet blocks per encoder level")
    encoder_attention_resolutions: tuple[int, ...] = Field((4, 2, 1), description="encoder levels with attention")
    encoder_num_heads: int = Field(4, ge=1, description="attention heads in the encoder")
    vae_channels: int = Field(128, ge=32, description="autoencoder width at full resolution [ch]")
    vae_channel_mult: tuple[int, ...] = Field((1, 2, 4, 4), min_length=3, description="autoencoder width per level")
    vae_num_res_blocks: int = Field(2, ge=1, description="ResNet blocks per autoencoder level")
    cfw: bool = Field(True, description="the decoder has CFW fusion layers (a vqgan_cfw checkpoint)")
    fuse_rrdb_blocks: int = Field(2, ge=1, description="RRDBs per fusion layer [num_fuse_block]")
    scale_factor: float = Field(0.18215, gt=0, description="latent scaling of SD's autoencoder")
    text_heads: int = Field(16, ge=1, description="attention heads of the OpenCLIP text encoder (null context)")
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="what the denoiser predicts: 'epsilon' (the 512 models and Turbo), 'v_prediction' "
                               "(stablesr_768v) [parameterization]")
    num_train_timesteps: int = Field(1000, ge=2, description="training timesteps [timesteps]")
    beta_start: float = Field(0.00085, gt=0, description="scaled-linear schedule start [linear_start]")
    beta_end: float = Field(0.012, gt=0, description="scaled-linear schedule end [linear_end]")

    @model_validator(mode="after")
    def _consistent(self) -> "StableSRArchitecture":
        if len(self.encoder_channel_mult) != len(self.channel_mult):
            raise ValueError(f"the time-aware encoder must have one level per denoiser level for SPADE: "
                             f"`encoder_channel_mult` {self.encoder_channel_mult} vs `channel_mult` "
                             f"{self.channel_mult}")
        widths = {"model_channels * channel_mult": [self.model_channels * m for m in self.channel_mult],
                  "encoder_channels * encoder_channel_mult": [self.encoder_channels * m for m in
                                                              self.encoder_channel_mult],
                  "vae_channels * vae_channel_mult": [self.vae_channels * m for m in self.vae_channel_mult],
                  "semb_channels": [self.semb_channels]}
        for name, values in widths.items():
            if any(v % NORM_GROUPS for v in values):
                raise ValueError(f"`{name}` must be multiples of {NORM_GROUPS} (GroupNorm groups), got {values}")
        if any(w % self.num_head_channels for w in widths["model_channels * channel_mult"]):
            raise ValueError(f"denoiser widths {widths['model_channels * channel_mult']} must be multiples of "
                             f"`num_head_channels` {self.num_head_channels}")
        if any(w % self.encoder_num_heads for w in widths["encoder_channels * encoder_channel_mult"]):
            raise ValueError(f"encoder widths must be multiples of `encoder_num_heads` {self.encoder_num_heads}")
        if self.context_dim % self.text_heads:
            raise ValueError(f"`context_dim` {self.context_dim} must be a multiple of `text_heads` {self.text_heads}")
        return self

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this (the denoiser halves them ``levels - 1`` times)."""
        return 2 ** (self.levels - 1)

    @property
    def vae_factor(self) -> int:
        """HR pixels per latent pixel (8 for SD's autoencoder)."""
        return 2 ** (len(self.vae_channel_mult) - 1)

    @property
    def fusion_levels(self) -> tuple[int, ...]:
        """Decoder levels with a CFW fusion layer (1 .. n-2; none without CFW)."""
        return tuple(range(1, len(self.vae_channel_mult) - 1)) if self.cfw else ()

    def expected_counts(self) -> dict[str, int]:
        """How many SPADE blocks, ``fea_tran`` layers and fusion layers this architecture has (22, 4, 2 released)."""
        return {"spade": self.levels * self.num_res_blocks + 2 + self.levels * (self.num_res_blocks + 1),
                "fea_tran": len(self.encoder_channel_mult), "fusion": len(self.fusion_levels)}


# --- SPADE in the denoiser ----------------------------------------------------------------------------------------


class SPADE(nn.Module):
    """h [B,C,h,w], f [B,S,h,w] -> GN(h) * (1 + gamma(f)) + beta(f); gamma, beta: 3x3 conv, ReLU, 3x3 conv.

    The GroupNorm is affine although the checkpoints call it ``param_free_norm`` (names follow the checkpoints).
    """

    def __init__(self, channels: int, feature_channels: int):
        super().__init__()
        self.param_free_norm = nn.GroupNorm(NORM_GROUPS, channels, eps=1e-5)
        self.mlp_shared = nn.Sequential(nn.Conv2d(feature_channels, SPADE_HIDDEN, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(SPADE_HIDDEN, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(SPADE_HIDDEN, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        if feature.shape[-2:] != h.shape[-2:]:
            raise ValueError(f"SPADE: encoder features {tuple(feature.shape[-2:])} do not match the block's "
                             f"resolution {tuple(h.shape[-2:])}")
        shared = self.mlp_shared(feature)
        return self.param_free_norm(h) * (1 + self.mlp_gamma(shared)) + self.mlp_beta(shared)


class SpadeResnetBlock2D(ResnetBlock2D):
    """diffusers' ResNet block with SPADE on the residual branch (StableSR's ``ResBlockDual``).

    forward(x [B,Cin,h,w], temb [B,T], feature [B,S,h,w]) -> [B,Cout,h,w].
    """

    def __init__(self, *, semb_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.spade = SPADE(self.out_channels, semb_channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        h = self.spade(h, feature)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


def build_unet(arch: StableSRArchitecture) -> UNet2DConditionModel:
    """SD-2.1's UNet (linear transformer projections, head width ``num_head_channels``) with SPADE ResNet blocks."""
    attention = [2 ** level in arch.attention_resolutions for level in range(arch.levels)]
    channels = tuple(arch.model_channels * m for m in arch.channel_mult)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=channels, layers_per_block=arch.num_res_blocks, cross_attention_dim=arch.context_dim,
        attention_head_dim=tuple(c // arch.num_head_channels for c in channels),  # diffusers: heads per level
        transformer_layers_per_block=arch.transformer_depth, use_linear_projection=True,
        norm_num_groups=NORM_GROUPS, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for index, resnet in enumerate(block.resnets):
            block.resnets[index] = SpadeResnetBlock2D(
                in_channels=resnet.in_channels, out_channels=resnet.out_channels,
                temb_channels=resnet.time_emb_proj.in_features, eps=resnet.norm1.eps, groups=NORM_GROUPS,
                semb_channels=arch.semb_channels)
    return unet


# --- the time-aware LR encoder --------------------------------------------------------------------------------------


class _EncoderLevel(nn.Module):
    """One encoder level: ResNet blocks, each optionally followed by attention, then an optional downsampling."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.downsample = downsample


class _EncoderMiddle(nn.Module):
    def __init__(self, channels: int, temb: int, heads: int):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, temb), _resnet(channels, channels, temb)])
        self.attention = _attention(channels, heads)


def _resnet(channels: int, out_channels: int, temb: int) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=channels, out_channels=out_channels, temb_channels=temb, eps=1e-5,
                         groups=NORM_GROUPS)


def _attention(channels: int, heads: int) -> Attention:
    """Self-attention over all positions of [B,C,h,w] with GroupNorm in front and the input added back."""
    return Attention(channels, heads=heads, dim_head=channels // heads, bias=True, norm_num_groups=NORM_GROUPS,
                     eps=1e-5, residual_connection=True)


class TimeAwareEncoder(nn.Module):
    """StableSR's ``EncoderUNetModelWT``: forward(LR latent [B,4,h,w], t [B]) -> one feature map per level,
    [B,semb,h/2^l,w/2^l] for l = 0 .. levels-1."""

    def __init__(self, arch: StableSRArchitecture):
        super().__init__()
        width, temb = arch.encoder_channels, 4 * arch.encoder_channels
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, temb)
        self.conv_in = nn.Conv2d(arch.latent_channels, width, 3, padding=1)
        levels, feature_channels, channels = [], [], width
        last = len(arch.encoder_channel_mult) - 1
        for level, mult in enumerate(arch.encoder_channel_mult):
            resnets, attentions = [], []
            for _ in range(arch.encoder_num_res_blocks):
                resnets.append(_resnet(channels, width * mult, temb))
                channels = width * mult
                if 2 ** level in arch.encoder_attention_resolutions:
                    attentions.append(_attention(channels, arch.encoder_num_heads))
            downsample = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if level < last else None
            levels.append(_EncoderLevel(resnets, attentions, downsample))
            if level < last:
                feature_channels.append(channels)
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = _EncoderMiddle(channels, temb, arch.encoder_num_heads)
        feature_channels.append(channels)
        self.fea_tran = nn.ModuleList(_resnet(c, arch.semb_channels, temb) for c in feature_channels)

    def forward(self, latent: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        emb = self.time_embedding(self.time_proj(t).to(latent.dtype))
        h = self.conv_in(latent)
        features = []
        for level in self.down_blocks:
            for index, resnet in enumerate(level.resnets):
                h = resnet(h, emb)
                if len(level.attentions):
                    h = level.attentions[index](h)
            if level.downsample is not None:
                features.append(h)
                h = level.downsample(h)
        h = self.mid_block.resnets[1](self.mid_block.attention(self.mid_block.resnets[0](h, emb)), emb)
        features.append(h)
        return [transform(f, emb) for transform, f in zip(self.fea_tran, features)]


# --- the autoencoder with controllable feature wrapping --------------------------------------------------------------


class FuseResBlock(nn.Module):
    """GN, swish, 3x3 conv, GN, swish, 3x3 conv, plus the input (1x1 conv ``conv_out`` when widths differ)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(NORM_GROUPS, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.conv_out is None else self.conv_out(x))


class ResidualDenseBlock(nn.Module):
    """ESRGAN's dense block: five 3x3 convs, each seeing the input and all earlier outputs; 0.2-scaled residual."""

    def __init__(self, channels: int, growth: int = RRDB_GROWTH):
        super().__init__()
        for index in range(1, 6):
            out = channels if index == 5 else growth
            setattr(self, f"conv{index}", nn.Conv2d(channels + (index - 1) * growth, out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for index in range(1, 5):
            outputs.append(F.leaky_relu(getattr(self, f"conv{index}")(torch.cat(outputs, 1)), 0.2))
        return self.conv5(torch.cat(outputs, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three residual dense blocks in a 0.2-scaled residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(channels) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class FuseBlock(nn.Module):
    """CFW: forward(encoder features [B,C,h,w], decoder features [B,C,h,w], w) -> dec + w * F(cat(enc, dec))."""

    def __init__(self, channels: int, rrdb_blocks: int):
        super().__init__()
        self.encode_enc_1 = FuseResBlock(2 * channels, channels)
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels) for _ in range(rrdb_blocks)))
        self.encode_enc_3 = FuseResBlock(channels, channels)

    def forward(self, encoder: torch.Tensor, decoder: torch.Tensor, weight: float) -> torch.Tensor:
        fused = self.encode_enc_3(self.encode_enc_2(self.encode_enc_1(torch.cat([encoder, decoder], 1))))
        return decoder + weight * fused


class CFWAutoencoder(nn.Module):
    """SD's KL autoencoder (``kl``) with CFW fusion layers (``fusion``, keyed by decoder level) in the decoder."""

    def __init__(self, arch: StableSRArchitecture):
        super().__init__()
        channels = tuple(arch.vae_channels * m for m in arch.vae_channel_mult)
        levels = len(channels)
        self.kl = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=channels,
            layers_per_block=arch.vae_num_res_blocks, latent_channels=arch.latent_channels,
            norm_num_groups=NORM_GROUPS, sample_size=512, scaling_factor=arch.scale_factor)
        self.fusion = nn.ModuleDict({str(level): FuseBlock(channels[level], arch.fuse_rrdb_blocks)
                                     for level in arch.fusion_levels})
        self.latent_channels = arch.latent_channels

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images [B,3,H,W] -> (posterior mean [B,4,H/8,W/8] unscaled, encoder features at the fusion levels)."""
        encoder = self.kl.encoder
        h = encoder.conv_in(images)
        features = []
        for level, block in enumerate(encoder.down_blocks):
            for resnet in block.resnets:
                h = resnet(h, None)
            if str(level) in self.fusion:
                features.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
        h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(h))))
        return self.kl.quant_conv(h)[:, :self.latent_channels], features

    def decode(self, latents: torch.Tensor, features: list[torch.Tensor] | None = None,
               weight: float = 0.0) -> torch.Tensor:
        """Unscaled latents [B,4,h,w] -> images [B,3,8h,8w]; CFW adds ``weight`` x fusion of ``features``."""
        fuse = features is not None and weight != 0 and len(self.fusion) > 0
        if fuse and len(features) != len(self.fusion):
            raise ValueError(f"CFW decoding needs {len(self.fusion)} encoder feature maps, got {len(features)}")
        decoder = self.kl.decoder
        h = decoder.mid_block(decoder.conv_in(self.kl.post_quant_conv(latents)), None)
        last = len(decoder.up_blocks) - 1
        for index, block in enumerate(decoder.up_blocks):
            for resnet in block.resnets:
                h = resnet(h, None)
            level = last - index
            if fuse and str(level) in self.fusion:
                feature = features[list(self.fusion).index(str(level))]
                if feature.shape[-2:] != h.shape[-2:]:
                    raise ValueError(f"CFW: LR encoder features {tuple(feature.shape[-2:])} at decoder level {level} "
                                     f"do not match the latents' {tuple(h.shape[-2:])}: the condition was built for "
                                     f"another image size")
                h = self.fusion[str(level)](feature, h, weight)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h)
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))


# --- all of StableSR ----------------------------------------------------------------------------------------------


class StableSRModel(nn.Module):
    """The denoiser (``unet``), the time-aware encoder (``structcond``), the CFW autoencoder (``vae``) and the
    empty-prompt text context (buffer ``null_context`` [1,tokens,context_dim])."""

    def __init__(self, arch: StableSRArchitecture):
        super().__init__()
        self.arch = arch
        self.unet = build_unet(arch)
        self.structcond = TimeAwareEncoder(arch)
        self.vae = CFWAutoencoder(arch)
        self.register_buffer("null_context", torch.zeros(1, arch.context_tokens, arch.context_dim))

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, lr_latent: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's output [B,4,h,w] (eps or v) for z_t [B,4,h,w] at t [B] given the scaled LR latent
        [B,4,h,w]; ``context`` [B,tokens,dim] defaults to the null context. h, w: multiples of ``latent_multiple``."""
        features = self.structcond(lr_latent, t)
        context = self.null_context.expand(z_t.shape[0], -1, -1) if context is None else context
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(t).to(z_t.dtype))
        h = unet.conv_in(z_t)
        skips = [h]
        for level, block in enumerate(unet.down_blocks):
            for index, resnet in enumerate(block.resnets):
                h = resnet(h, emb, features[level])
                if getattr(block, "attentions", None) is not None:
                    h = block.attentions[index](h, encoder_hidden_states=context, return_dict=False)[0]
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                skips.append(h)
        middle = unet.mid_block
        h = middle.resnets[0](h, emb, features[-1])
        h = middle.attentions[0](h, encoder_hidden_states=context, return_dict=False)[0]
        h = middle.resnets[1](h, emb, features[-1])
        for index, block in enumerate(unet.up_blocks):
            level = len(unet.up_blocks) - 1 - index
            for position, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb, features[level])
                if getattr(block, "attentions", None) is not None:
                    h = block.attentions[position](h, encoder_hidden_states=context, return_dict=False)[0]
            if block.upsamplers is not None:
                h = block.upsamplers[0](h)
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def build_model(arch: StableSRArchitecture, device: torch.device | str | None = None) -> StableSRModel:
    """A StableSR model with fresh weights; ``device='meta'`` allocates nothing (for loading with ``assign``)."""
    if device is None:
        return StableSRModel(arch)
    with torch.device(device):
        return StableSRModel(arch)


def count_modules(model: StableSRModel) -> dict[str, int]:
    """SPADE blocks, ``fea_tran`` layers and fusion layers actually present (compare ``expected_counts``)."""
    return {"spade": sum(isinstance(m, SPADE) for m in model.modules()),
            "fea_tran": len(model.structcond.fea_tran), "fusion": len(model.vae.fusion)}
