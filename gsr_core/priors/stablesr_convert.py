"""Converting StableSR's released checkpoints into a gsr prior folder (``materialize``).

Inputs (github.com/IceClear/StableSR, huggingface.co/Iceclear/StableSR):
- the diffusion checkpoint, ``stablesr_000117.ckpt`` or ``stablesr_turbo.ckpt`` (``stablesr_768v_000139.ckpt``
  with ``config={"prediction_type": "v_prediction"}``): a Lightning ``state_dict`` with the denoiser under
  ``model.diffusion_model.``, the time-aware encoder under ``structcond_stage_model.``, SD's autoencoder under
  ``first_stage_model.``, the OpenCLIP text encoder under ``cond_stage_model.model.`` and the schedule buffers;
- the CFW autoencoder, ``vqgan_cfw_00011.ckpt``: ``encoder.``, ``decoder.`` (with ``decoder.fusion_layer_{1,2}``),
  ``quant_conv``, ``post_quant_conv`` and its training losses under ``loss.`` (dropped). Without it the diffusion
  checkpoint's own autoencoder is used and CFW is off (``dec_w`` 0).

Files are read with ``torch.load(weights_only=True)`` or safetensors only. The original key layout (LDM's
``input_blocks.k.i`` / ``down.i.block.j`` naming) maps onto diffusers' by tables built from the architecture
(``unet_parts``, ``encoder_parts``, ``vae_parts``): ResNet blocks rename their layers, the autoencoder's 1x1-conv
attention becomes linear layers, and the time-aware encoder's fused ``qkv`` (per head: q, k, v) splits into
``to_q``/``to_k``/``to_v``. Conversion checks that the checkpoint has the architecture's numbers of SPADE blocks,
``fea_tran`` layers and fusion layers (22, 4 and 2 for the released models), that its schedule is the
architecture's, and ends in a strict ``load_state_dict``; mismatches raise ValueError listing the first few keys.

The text context: StableSR samples with the empty prompt. Its embedding (OpenCLIP ViT-H's penultimate layer,
final LayerNorm, tokens ``<start> <end>`` padded with zeros, [1,77,1024]) is computed once from the checkpoint's
``cond_stage_model`` and stored; ``context=`` supplies it instead: a tensor file (safetensors or torch, one
[1,77,1024] or [77,1024] tensor) or a diffusers SD-2.x folder (its ``text_encoder`` already ends one layer early).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from gsr_core.priors.stablesr import DEFAULT_STEPS, SHOWN_KEYS, StableSRSettings, load_strict, write_folder
from gsr_core.priors.stablesr_modules import StableSRArchitecture, build_model, count_modules

UNET_PREFIX = "model.diffusion_model."
ENCODER_PREFIX = "structcond_stage_model."
FIRST_STAGE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
VAE_TRAINING_PREFIX = "loss."  # LPIPS and discriminator of the CFW training, not part of the model
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar", "scale_factor")
START_TOKEN, END_TOKEN = 49406, 49407  # CLIP's BPE vocabulary; OpenCLIP pads with token 0

# parameter renames inside a module, by part kind: original sub-module -> ours (a prefix match keeps the rest)
RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
            "out_layers.3": "conv2", "skip_connection": "conv_shortcut", "spade": "spade"}
VAE_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LEGACY_ATTENTION = {"norm": "group_norm", "qkv": "qkv", "proj_out": "to_out.0"}
RENAMES = {"resblock": RESBLOCK, "vae_resblock": VAE_RESBLOCK, "vae_attention": VAE_ATTENTION,
           "legacy_attention": LEGACY_ATTENTION}


@dataclass(frozen=True)
class Part:
    """One module: its path in the original checkpoint, in ``StableSRModel``'s state dict, and how its
    parameters map ('same', 'resblock', 'vae_resblock', 'vae_attention' or 'legacy_attention' with ``heads``)."""

    original: str
    ours: str
    kind: str = "same"
    heads: int = 0


def unet_parts(arch: StableSRArchitecture) -> list[Part]:
    """The denoiser (``UNetModelDualcondV2``, under ``model.diffusion_model.``) -> ``unet.`` (diffusers)."""
    parts = [Part("time_embed.0", "unet.time_embedding.linear_1"), Part("time_embed.2", "unet.time_embedding.linear_2"),
             Part("input_blocks.0.0", "unet.conv_in")]
    attention = [2 ** level in arch.attention_resolutions for level in range(arch.levels)]
    index = 1
    for level in range(arch.levels):
        for block in range(arch.num_res_blocks):
            parts.append(Part(f"input_blocks.{index}.0", f"unet.down_blocks.{level}.resnets.{block}", "resblock"))
            if attention[level]:
                parts.append(Part(f"input_blocks.{index}.1", f"unet.down_blocks.{level}.attentions.{block}"))
            index += 1
        if level < arch.levels - 1:
            parts.append(Part(f"input_blocks.{index}.0.op", f"unet.down_blocks.{level}.downsamplers.0.conv"))
            index += 1
    parts += [Part("middle_block.0", "unet.mid_block.resnets.0", "resblock"),
              Part("middle_block.1", "unet.mid_block.attentions.0"),
              Part("middle_block.2", "unet.mid_block.resnets.1", "resblock")]
    index = 0
    for up, level in enumerate(reversed(range(arch.levels))):
        for block in range(arch.num_res_blocks + 1):
            parts.append(Part(f"output_blocks.{index}.0", f"unet.up_blocks.{up}.resnets.{block}", "resblock"))
            if attention[level]:
                parts.append(Part(f"output_blocks.{index}.1", f"unet.up_blocks.{up}.attentions.{block}"))
            if level > 0 and block == arch.num_res_blocks:
                parts.append(Part(f"output_blocks.{index}.{1 + attention[level]}.conv",
                                  f"unet.up_blocks.{up}.upsamplers.0.conv"))
            index += 1
    return parts + [Part("out.0", "unet.conv_norm_out"), Part("out.2", "unet.conv_out")]


def encoder_parts(arch: StableSRArchitecture) -> list[Part]:
    """The time-aware encoder (``EncoderUNetModelWT``, under ``structcond_stage_model.``) -> ``structcond.``."""
    heads = arch.encoder_num_heads
    parts = [Part("time_embed.0", "structcond.time_embedding.linear_1"),
             Part("time_embed.2", "structcond.time_embedding.linear_2"), Part("input_blocks.0.0", "structcond.conv_in")]
    levels = len(arch.encoder_channel_mult)
    index = 1
    for level in range(levels):
        for block in range(arch.encoder_num_res_blocks):
            parts.append(Part(f"input_blocks.{index}.0", f"structcond.down_blocks.{level}.resnets.{block}", "resblock"))
            if 2 ** level in arch.encoder_attention_resolutions:
                parts.append(Part(f"input_blocks.{index}.1", f"structcond.down_blocks.{level}.attentions.{block}",
                                  "legacy_attention", heads))
            index += 1
        if level < levels - 1:
            parts.append(Part(f"input_blocks.{index}.0.op", f"structcond.down_blocks.{level}.downsample"))
            index += 1
    parts += [Part("middle_block.0", "structcond.mid_block.resnets.0", "resblock"),
              Part("middle_block.1", "structcond.mid_block.attention", "legacy_attention", heads),
              Part("middle_block.2", "structcond.mid_block.resnets.1", "resblock")]
    return parts + [Part(f"fea_tran.{i}", f"structcond.fea_tran.{i}", "resblock") for i in range(levels)]


def vae_parts(arch: StableSRArchitecture) -> list[Part]:
    """The autoencoder (``AutoencoderKLResi`` / ``AutoencoderKL``) -> ``vae.kl.`` (diffusers) and ``vae.fusion.``."""
    levels = len(arch.vae_channel_mult)
    parts = [Part("quant_conv", "vae.kl.quant_conv"), Part("post_quant_conv", "vae.kl.post_quant_conv")]
    for side in ("encoder", "decoder"):
        ours = f"vae.kl.{side}"
        parts += [Part(f"{side}.conv_in", f"{ours}.conv_in"), Part(f"{side}.norm_out", f"{ours}.conv_norm_out"),
                  Part(f"{side}.conv_out", f"{ours}.conv_out"),
                  Part(f"{side}.mid.block_1", f"{ours}.mid_block.resnets.0", "vae_resblock"),
                  Part(f"{side}.mid.attn_1", f"{ours}.mid_block.attentions.0", "vae_attention"),
                  Part(f"{side}.mid.block_2", f"{ours}.mid_block.resnets.1", "vae_resblock")]
    for level in range(levels):
        for block in range(arch.vae_num_res_blocks):
            parts.append(Part(f"encoder.down.{level}.block.{block}",
                              f"vae.kl.encoder.down_blocks.{level}.resnets.{block}", "vae_resblock"))
        if level < levels - 1:
            parts.append(Part(f"encoder.down.{level}.downsample.conv",
                              f"vae.kl.encoder.down_blocks.{level}.downsamplers.0.conv"))
        up = levels - 1 - level
        for block in range(arch.vae_num_res_blocks + 1):
            parts.append(Part(f"decoder.up.{level}.block.{block}", f"vae.kl.decoder.up_blocks.{up}.resnets.{block}",
                              "vae_resblock"))
        if level > 0:
            parts.append(Part(f"decoder.up.{level}.upsample.conv", f"vae.kl.decoder.up_blocks.{up}.upsamplers.0.conv"))
    return parts + [Part(f"decoder.fusion_layer_{level}", f"vae.fusion.{level}") for level in arch.fusion_levels]


# --- renaming ---------------------------------------------------------------------------------------------------------


def convert_weights(weights: dict[str, torch.Tensor], parts: list[Part]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our state dict, original keys no part accounts for) for ``weights`` in the original layout."""
    by_path = {part.original: part for part in parts}
    converted, unmatched = {}, []
    for key, value in weights.items():
        part, suffix = _owner(by_path, key)
        mapped = _map_parameter(part, suffix, value) if part is not None else None
        if mapped is None:
            unmatched.append(key)
        else:
            converted.update(mapped)
    return converted, unmatched


def _owner(by_path: dict[str, Part], key: str) -> tuple[Part | None, str]:
    """The part whose module path is the longest prefix of ``key``, and the rest of the key."""
    position = len(key)
    while (position := key.rfind(".", 0, position)) > 0:
        if key[:position] in by_path:
            return by_path[key[:position]], key[position + 1:]
    return None, key


def _map_parameter(part: Part, suffix: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Our key(s) and tensor(s) for one original parameter, or None if the module has no such parameter."""
    if part.kind == "same":
        return {f"{part.ours}.{suffix}": value}
    module, _, name = suffix.rpartition(".")
    renames = RENAMES[part.kind]
    match = next((m for m in renames if module == m or module.startswith(m + ".")), None)
    if match is None or name not in ("weight", "bias"):
        return None
    target = renames[match] + module[len(match):]
    if part.kind == "vae_attention" and match != "norm" and name == "weight":
        value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv -> linear
    if part.kind == "legacy_attention":
        if match == "proj_out" and name == "weight":
            value = value.reshape(value.shape[0], value.shape[1])  # 1-d conv of width 1 -> linear
        if match == "qkv":
            return _split_qkv(part, name, value)
    return {f"{part.ours}.{target}.{name}": value}


def _split_qkv(part: Part, name: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The legacy attention's fused projection ([3C,C,1] weight or [3C] bias, laid out per head as q, k, v) as
    diffusers' ``to_q``, ``to_k``, ``to_v``."""
    channels = value.shape[0] // 3
    if value.shape[0] % (3 * part.heads):
        return None
    per_head = value.reshape(part.heads, 3, channels // part.heads, *value.shape[1:])
    tail = () if name == "bias" else (value.shape[1],)
    return {f"{part.ours}.{projection}.{name}": per_head[:, index].reshape(channels, *tail).contiguous()
            for index, projection in enumerate(("to_q", "to_k", "to_v"))}


# --- reading checkpoints -------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, role: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a torch checkpoint (its ``state_dict`` if it has one; a file of one
    tensor gives ``{"tensor": it}``), read with ``torch.load(weights_only=True)``; ``role`` names the argument in
    errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"`{role}`: checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for refused or broken pickles
        raise ValueError(f"`{role}`: {path} could not be read with torch.load(weights_only=True) ({error}). Only "
                         f"tensors are loaded from checkpoints; re-save its state_dict as .safetensors in an "
                         f"environment you trust") from error
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if isinstance(data, torch.Tensor):  # a file holding one tensor (a stored context)
        data = {"tensor": data}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"`{role}`: {path} is not a state dict of tensors (nor a checkpoint with one under "
                         f"'state_dict')")
    return data


def _with_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (f", ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else "")


def _check_diffusion_checkpoint(weights: dict[str, torch.Tensor], path: str) -> None:
    if any(k.startswith("decoder.fusion_layer_") for k in weights):
        raise ValueError(f"`source`: {path} is a CFW autoencoder checkpoint (vqgan_cfw_*.ckpt); pass it as `vae` "
                         f"and the diffusion checkpoint (stablesr_*.ckpt) as `source`")
    if not any(k.startswith(UNET_PREFIX) for k in weights):
        raise ValueError(f"`source`: {path} is not a StableSR diffusion checkpoint: no {UNET_PREFIX}* keys (found "
                         f"{_listed(sorted(weights))})")
    if not any(k.startswith(ENCODER_PREFIX) for k in weights):
        raise ValueError(f"`source`: {path} has a denoiser but no time-aware encoder ({ENCODER_PREFIX}*): a Stable "
                         f"Diffusion checkpoint, not StableSR")


def _check_vae_checkpoint(weights: dict[str, torch.Tensor], path: str) -> None:
    if any(k.startswith(UNET_PREFIX) for k in weights):
        raise ValueError(f"`vae`: {path} is a diffusion checkpoint (stablesr_*.ckpt); pass it as `source` and the "
                         f"CFW autoencoder (vqgan_cfw_*.ckpt) as `vae`")
    if not any(k.startswith("decoder.fusion_layer_") for k in weights):
        raise ValueError(f"`vae`: {path} is not a CFW autoencoder checkpoint: no decoder.fusion_layer_* keys "
                         f"(leave `vae` out to use the diffusion checkpoint's own autoencoder without CFW)")


def check_counts(arch: StableSRArchitecture, unet: dict, encoder: dict, vae: dict, paths: dict[str, str]) -> None:
    """ValueError unless the original-layout weights have the architecture's SPADE, fea_tran and fusion counts."""
    found = {"spade": {m.group(1) for k in unet if (m := re.match(r"(.+)\.spade\.mlp_shared\.0\.weight$", k))},
             "fea_tran": {m.group(1) for k in encoder if (m := re.match(r"fea_tran\.(\d+)\.", k))},
             "fusion": {m.group(1) for k in vae if (m := re.match(r"decoder\.fusion_layer_(\d+)\.", k))}}
    where = {"spade": paths["source"], "fea_tran": paths["source"], "fusion": paths.get("vae", paths["source"])}
    for name, expected in arch.expected_counts().items():
        if len(found[name]) != expected:
            raise ValueError(f"{where[name]} has {len(found[name])} {name} layers where the architecture has "
                             f"{expected}: a checkpoint of another architecture (pass `config` to describe it)")


def _check_schedule(weights: dict[str, torch.Tensor], arch: StableSRArchitecture, path: str) -> None:
    """ValueError if the checkpoint's ``alphas_cumprod`` or ``scale_factor`` buffers differ from the architecture's."""
    scale = weights.get("scale_factor")
    if scale is not None and abs(float(scale) - arch.scale_factor) > 1e-6:
        raise ValueError(f"`source`: {path} scales its latents by {float(scale)}, the architecture by "
                         f"{arch.scale_factor}; pass `config` with its scale_factor")
    stored = weights.get("alphas_cumprod")
    if stored is None:
        return
    betas = torch.linspace(arch.beta_start ** 0.5, arch.beta_end ** 0.5, arch.num_train_timesteps,
                           dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, dim=0)
    if stored.shape != expected.shape or not torch.allclose(stored.double(), expected, atol=1e-5):
        raise ValueError(f"`source`: {path} was trained with another noise schedule than the architecture's "
                         f"(scaled-linear {arch.beta_start}-{arch.beta_end}, {arch.num_train_timesteps} steps); pass "
                         f"`config` with its beta_start, beta_end and num_train_timesteps")


# --- the text context ------------------------------------------------------------------------------------------------


def open_clip_null_context(weights: dict[str, torch.Tensor], heads: int, tokens: int) -> torch.Tensor:
    """The empty prompt's embedding [1,tokens,D] by an OpenCLIP text tower (``weights`` without the
    ``cond_stage_model.model.`` prefix): ids ``<start> <end> 0 ...``, all blocks but the last (causal
    self-attention and a GELU MLP, each pre-LayerNorm and residual), then ``ln_final``."""
    def get(name: str) -> torch.Tensor:
        if name not in weights:
            raise ValueError(f"the checkpoint's OpenCLIP text encoder lacks {TEXT_PREFIX}{name}; pass `context`")
        return weights[name].double()

    ids = torch.zeros(tokens, dtype=torch.long)
    ids[:2] = torch.tensor([START_TOKEN, END_TOKEN])
    x = get("token_embedding.weight")[ids] + get("positional_embedding")[:tokens]
    width = x.shape[-1]
    layers = len({k.split(".")[2] for k in weights if k.startswith("transformer.resblocks.")})
    for layer in range(layers - 1):  # the penultimate layer's output
        p = f"transformer.resblocks.{layer}."
        h = F.layer_norm(x, (width,), get(p + "ln_1.weight"), get(p + "ln_1.bias"))
        q, k, v = (t.reshape(tokens, heads, -1).transpose(0, 1)
                   for t in F.linear(h, get(p + "attn.in_proj_weight"), get(p + "attn.in_proj_bias")).chunk(3, -1))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(tokens, width)
        x = x + F.linear(attended, get(p + "attn.out_proj.weight"), get(p + "attn.out_proj.bias"))
        h = F.layer_norm(x, (width,), get(p + "ln_2.weight"), get(p + "ln_2.bias"))
        x = x + F.linear(F.gelu(F.linear(h, get(p + "mlp.c_fc.weight"), get(p + "mlp.c_fc.bias"))),
                         get(p + "mlp.c_proj.weight"), get(p + "mlp.c_proj.bias"))
    return F.layer_norm(x, (width,), get("ln_final.weight"), get("ln_final.bias"))[None].float()


def load_context(path: str | Path, arch: StableSRArchitecture) -> torch.Tensor:
    """The null-text context [1,tokens,dim] from a tensor file or a diffusers SD-2.x (text encoder) folder."""
    path = Path(path).expanduser()
    expected = (1, arch.context_tokens, arch.context_dim)
    if path.is_dir():
        from transformers import CLIPTextModel

        folder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        if not (folder / "config.json").is_file():
            raise ValueError(f"`context`: {path} is neither a diffusers SD-2.x folder nor a text encoder folder "
                             f"(no text_encoder/ or config.json)")
        encoder = CLIPTextModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        ids = torch.zeros(1, arch.context_tokens, dtype=torch.long)
        ids[0, :2] = torch.tensor([START_TOKEN, END_TOKEN])
        with torch.no_grad():
            context = encoder(input_ids=ids).last_hidden_state.float()
    else:
        tensors = list(read_checkpoint(path, "context").values())
        if len(tensors) != 1:
            raise ValueError(f"`context`: {path} must hold exactly one tensor of shape {expected}, found "
                             f"{len(tensors)}")
        context = tensors[0].float()
        context = context[None] if context.dim() == 2 else context
    if tuple(context.shape) != expected:
        raise ValueError(f"`context`: {path} gives a context of shape {tuple(context.shape)}, expected {expected}")
    return context


# --- the folder ------------------------------------------------------------------------------------------------------


def architecture(config: dict | str | Path | None, cfw: bool) -> StableSRArchitecture:
    """The architecture from ``config`` overrides (a dict or a JSON/YAML file of one); ``cfw`` follows ``vae``."""
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if not path.is_file():
            raise ValueError(f"`config`: {path} does not exist")
        config = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"`config`: {path} must hold a mapping of architecture fields")
    overrides = dict(config or {})
    if overrides.get("cfw", cfw) != cfw:
        raise ValueError(f"`config` says cfw={overrides['cfw']}, but a CFW autoencoder was "
                         f"{'given' if cfw else 'not given'} as `vae`")
    return StableSRArchitecture(**{**overrides, "cfw": cfw})


def materialize(source: str, out: Path, *, vae: str | None = None, config: dict | str | Path | None = None,
                turbo: bool = False, context: str | None = None, settings: dict | None = None) -> None:
    """Write a StableSR prior folder ``out`` (``prior.json``, ``weights.safetensors``) from the original checkpoints.

    Args:
        source: the diffusion checkpoint (``stablesr_000117.ckpt``, ``stablesr_turbo.ckpt``; ``.safetensors`` too).
        out: the folder to write.
        vae: the CFW autoencoder (``vqgan_cfw_00011.ckpt``); None uses ``source``'s autoencoder, without CFW.
        config: architecture overrides (``StableSRArchitecture`` fields; a dict or a JSON/YAML file), e.g.
            ``{"prediction_type": "v_prediction"}`` for the 768v model, or a tiny test model's sizes.
        turbo: write kind ``stablesr_turbo`` (4 sampling steps by default) instead of ``stablesr`` (200).
        context: the empty-prompt context (see the module docstring); None computes it from ``source``.
        settings: ``StableSRSettings`` overrides (``dec_w``, ``colour_fix``, ``default_steps``, ``tile_size``, ...).
    """
    arch = architecture(config, cfw=vae is not None)
    kind = "stablesr_turbo" if turbo else "stablesr"
    overrides = {"default_steps": DEFAULT_STEPS[kind], **({} if vae is not None else {"dec_w": 0.0}),
                 **(settings or {})}
    sources = {"source": str(source), **({"vae": str(vae)} if vae else {}), "context": str(context or source)}
    prior_settings = StableSRSettings(**overrides, architecture=arch, sources=sources)

    weights = read_checkpoint(source, "source")
    _check_diffusion_checkpoint(weights, str(source))
    _check_schedule(weights, arch, str(source))
    if vae is not None:
        vae_weights = read_checkpoint(vae, "vae")
        _check_vae_checkpoint(vae_weights, str(vae))
        vae_weights = {k: v for k, v in vae_weights.items() if not k.startswith(VAE_TRAINING_PREFIX)}
    else:
        vae_weights = _with_prefix(weights, FIRST_STAGE_PREFIX)
    unet, encoder = _with_prefix(weights, UNET_PREFIX), _with_prefix(weights, ENCODER_PREFIX)
    paths = {"source": str(source), **({"vae": str(vae)} if vae else {})}
    check_counts(arch, unet, encoder, vae_weights, paths)
    known = (UNET_PREFIX, ENCODER_PREFIX, FIRST_STAGE_PREFIX, "cond_stage_model.")
    stray = [k for k in weights if not k.startswith(known) and k not in SCHEDULE_BUFFERS]
    if stray:
        raise ValueError(f"`source`: {source} has unexpected keys outside StableSR's modules: {_listed(stray)}")

    state = {}
    for name, part_weights, parts, prefix, path in (
            ("denoiser", unet, unet_parts(arch), UNET_PREFIX, source),
            ("time-aware encoder", encoder, encoder_parts(arch), ENCODER_PREFIX, source),
            ("autoencoder", vae_weights, vae_parts(arch), "" if vae else FIRST_STAGE_PREFIX, vae or source)):
        converted, unmatched = convert_weights(part_weights, parts)
        if unmatched:
            raise ValueError(f"{path}: unexpected keys in the {name}: {_listed([prefix + k for k in unmatched])}")
        state.update(converted)
    if context is not None:
        state["null_context"] = load_context(context, arch)
    else:
        text = _with_prefix(weights, TEXT_PREFIX)
        if not text:
            raise ValueError(f"`source`: {source} has no text encoder ({TEXT_PREFIX}*) to compute the empty-prompt "
                             f"context from; pass `context` (a [1,77,1024] tensor file or a diffusers SD-2.x folder)")
        state["null_context"] = open_clip_null_context(text, arch.text_heads, arch.context_tokens)

    model = build_model(arch, device="meta")
    load_strict(model, state, f"{source}" + (f" + {vae}" if vae else ""))
    found = count_modules(model)
    assert found == arch.expected_counts(), (found, arch.expected_counts())
    write_folder(out, model, prior_settings, kind)
