"""Checkpoints of the reference SR3 implementation as SR3 prior folders (``gsr_core.priors.sr3``).

The reference (github.com/Janspiry/Image-Super-Resolution-via-Iterative-Refinement) saves its diffusion module's
state dict as ``I{iter}_E{epoch}_gen.pth``: the denoiser under ``denoise_fn.`` plus the noise-schedule buffers
(``betas``, ``alphas_cumprod``, ...). Its UNet and ``SR3UNet`` compute the same function; they differ in module
paths (``_module_pairs``) and in three layouts:

- input channels: the reference concatenates [upsampled LR, noisy HR], SR3UNet [noisy HR, upsampled LR];
- self-attention: one bias-free 1x1 conv [3C,C,1,1] makes q, k, v (its output channels in that order, one
  head); SR3UNet has three Linear maps [C,C] whose biases are set to zero; the output 1x1 conv becomes a Linear;
- 1x1 convs and Linear maps otherwise match one to one.

Both feed sqrt(gamma) itself to the sinusoidal embedding and predict the noise of the HR image, so the prior
folder says ``noise_level_scale: 1`` and ``residual: false``.

Settings. Without a config, the architecture is read off the weights (input channels, channels per level,
ResNet blocks per level, which levels have attention; GroupNorm groups are the reference's default, 32), the
schedule off the checkpoint's ``betas`` buffer, and the scale must be passed. With the reference's JSON config
(``//`` comments allowed) the architecture comes from ``model.unet`` and ``model.diffusion.image_size`` (the
strict key match then checks it against the weights), the sampling schedule from ``model.beta_schedule.val``
(``train`` when there is no ``val``) and the scale from ``datasets.*.r_resolution / l_resolution``.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from gsr_core.priors.sr3 import SR3Settings, SR3UNet, save_sr3, sr3_unet

PREFIX = "denoise_fn."
# GaussianDiffusion.set_new_noise_schedule registers these next to the denoiser; only ``betas`` is read.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"})
SHOWN = 5  # keys listed in an error before "... and N more"

Rule = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # one reference tensor -> SR3UNet tensors by key


@dataclass(frozen=True)
class ReferenceUNet:
    """The reference UNet's constructor settings that shape its state dict (``model.unet`` in its config)."""

    inner_channel: int
    channel_multiplier: tuple[int, ...]
    res_blocks: int
    attention_levels: frozenset[int]
    in_channel: int = 6
    out_channel: int = 3
    norm_groups: int = 32
    dropout: float = 0.0

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.inner_channel * m for m in self.channel_multiplier)

    def build(self, where: str) -> SR3UNet:
        """A freshly initialised ``SR3UNet`` of this shape (ValueError naming ``where`` when it has none)."""
        if (self.in_channel, self.out_channel) != (6, 3):
            raise ValueError(f"{where}: the UNet maps {self.in_channel} -> {self.out_channel} channels; an SR3 "
                             f"super-resolution denoiser maps 6 (upsampled LR + noisy HR) -> 3")
        try:
            return sr3_unet(self.channels, self.res_blocks, sorted(self.attention_levels), self.norm_groups,
                            self.dropout)
        except ValueError as error:
            raise ValueError(f"{where}: SR3UNet cannot take this architecture ({self}): {error}") from None


def materialize(source: str, out: Path, *, config: str | None = None, scale: int | None = None) -> None:
    """Convert a reference checkpoint into an SR3 prior folder at ``out`` (``prior.json``, ``unet/``, ``scheduler/``).

    Args:
        source: the ``*_gen.pth`` file (or a ``.safetensors`` file with the same keys).
        out: the prior folder to write.
        config: the reference's JSON config the checkpoint was trained with.
        scale: the super-resolution factor; needed without ``config``, checked against it otherwise.

    Raises ValueError naming the file and key for a file that is not a reference SR3 generator checkpoint, a
    config that does not match it, or settings that neither the config nor the checkpoint supply.
    """
    path = Path(source)
    weights, buffers = split_checkpoint(load_checkpoint(path), path)
    if config is not None:
        options = read_reference_config(config)
        architecture = architecture_from_config(options, config)
        steps, beta_start, beta_end = schedule_from_config(options, config)
        scale = scale_from_config(options, config, scale)
    else:
        architecture = infer_architecture(weights, path)
        steps, beta_start, beta_end = schedule_from_betas(buffers, path)
        if scale is None:
            raise ValueError(f"{path}: the checkpoint does not record its super-resolution factor; pass `scale` "
                             f"or the reference `config` it was trained with")
    unet = convert(weights, architecture, path)
    save_sr3(out, unet, SR3Settings(scale=int(scale), residual=False, noise_level_scale=1.0,
                                    num_train_timesteps=steps, beta_start=beta_start, beta_end=beta_end))


# --- reading the checkpoint ---------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The saved object: safetensors for ``.safetensors``, else ``torch.load(weights_only=True)`` on the CPU."""
    if not path.is_file():
        raise ValueError(f"SR3 checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"{path}: not a plain torch state dict (refused by torch.load(weights_only=True): "
                         f"{reason})") from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable torch checkpoint ({error})") from None


def split_checkpoint(state: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(denoiser weights without the ``denoise_fn.`` prefix, float32; schedule buffers) of a generator state dict."""
    if isinstance(state, Mapping) and "optimizer" in state:
        raise ValueError(f"{path}: this is the reference's optimizer state (an `*_opt.pth` file with keys "
                         f"{sorted(map(str, state))}); pass the generator weights, the matching `*_gen.pth`")
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, Mapping) else \
            f"non-tensor values under {_listing([k for k, v in state.items() if not torch.is_tensor(v)])}"
        raise ValueError(f"{path}: expected the reference's generator state dict (tensors under "
                         f"'{PREFIX}*'), found {found}")
    weights = {k[len(PREFIX):]: v.to(torch.float32) if v.is_floating_point() else v
               for k, v in state.items() if k.startswith(PREFIX)}
    if not weights:
        raise ValueError(f"{path}: no '{PREFIX}*' keys, so this is not a checkpoint of the reference SR3 "
                         f"diffusion model; it holds {_listing(list(state))}")
    others = [k for k in state if not k.startswith(PREFIX) and k not in SCHEDULE_BUFFERS]
    if others:
        raise ValueError(f"{path}: unexpected keys beside '{PREFIX}*' and the schedule buffers: {_listing(others)}")
    _check_denoiser_kind(weights, path)
    return weights, {k: v for k, v in state.items() if k in SCHEDULE_BUFFERS}


def _check_denoiser_kind(weights: Mapping[str, torch.Tensor], path: Path) -> None:
    """ValueError for the reference's other networks and options that SR3UNet does not implement."""
    if "time_mlp.1.weight" in weights:
        raise ValueError(f"{path}: '{PREFIX}time_mlp.*' marks the reference's 'ddpm' network "
                         f"(which_model_G: ddpm); only its 'sr3' network converts")
    if "noise_level_mlp.1.weight" not in weights:
        raise ValueError(f"{path}: '{PREFIX}noise_level_mlp.1.weight' is missing: the denoiser has no noise-level "
                         f"embedding (with_noise_level_emb=False), which an SR3 prior needs")
    for key, weight in weights.items():
        if key.endswith("res_block.noise_func.noise_func.0.weight"):
            block = key[:-len("noise_func.noise_func.0.weight")]
            conv = weights.get(block + "block1.block.3.weight")
            if conv is not None and weight.shape[0] == 2 * conv.shape[0]:
                raise ValueError(f"{path}: '{PREFIX}{key}' has {weight.shape[0]} = 2 x {conv.shape[0]} outputs: "
                                 f"the checkpoint uses use_affine_level=True (scale and shift by the noise "
                                 f"level); SR3UNet adds the noise embedding only (use_affine_level=False)")


# --- settings -----------------------------------------------------------------------------------------------------


def infer_architecture(weights: Mapping[str, torch.Tensor], path: Path) -> ReferenceUNet:
    """The reference UNet's settings read off its weights (``downs.*`` in order; norm_groups: the default 32)."""
    for key in ("downs.0.weight", "final_conv.block.3.weight"):
        if key not in weights:
            raise ValueError(f"{path}: '{PREFIX}{key}' is missing, so the architecture cannot be read off the "
                             f"weights; pass the reference `config`")
    inner, in_channel = weights["downs.0.weight"].shape[:2]
    levels: list[list[tuple[int, bool]]] = [[]]  # per level: (output channels, has attention) per ResNet block
    index = 1
    while True:
        block = f"downs.{index}."
        if block + "res_block.block1.block.3.weight" in weights:
            channels = weights[block + "res_block.block1.block.3.weight"].shape[0]
            levels[-1].append((channels, block + "attn.qkv.weight" in weights))
        elif block + "conv.weight" in weights:
            levels.append([])
        else:
            break
        index += 1
    counts = {len(level) for level in levels}
    shapes = [set(level) for level in levels]
    if 0 in counts or len(counts) > 1 or any(len(shape) > 1 for shape in shapes):
        raise ValueError(f"{path}: the '{PREFIX}downs.*' blocks do not form the reference UNet's levels (equal "
                         f"ResNet blocks per level, one channel count and attention setting per level): "
                         f"{levels}; pass the reference `config`")
    per_level = [shape.pop() for shape in shapes]
    if any(channels % inner for channels, _ in per_level):
        raise ValueError(f"{path}: level channels {[c for c, _ in per_level]} are not multiples of the input "
                         f"conv's {inner} channels (inner_channel)")
    return ReferenceUNet(
        inner_channel=int(inner), channel_multiplier=tuple(int(c // inner) for c, _ in per_level),
        res_blocks=counts.pop(), attention_levels=frozenset(i for i, (_, attn) in enumerate(per_level) if attn),
        in_channel=int(in_channel), out_channel=int(weights["final_conv.block.3.weight"].shape[0]))


def read_reference_config(path: str | Path) -> dict:
    """The reference's JSON config (its ``//`` line comments removed outside strings)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference config {path} does not exist")
    try:
        return json.loads(_strip_comments(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON config ({error})") from None


def architecture_from_config(options: dict, where: str | Path) -> ReferenceUNet:
    """The UNet settings of a reference config; attention levels from ``attn_res`` and the image size."""
    model = _option(options, "model", where)
    kind = model.get("which_model_G", "sr3")
    if kind != "sr3":
        raise ValueError(f"{where}: model.which_model_G is {kind!r}; only the reference's 'sr3' network converts")
    if not model.get("diffusion", {}).get("conditional", True):
        raise ValueError(f"{where}: model.diffusion.conditional is false: an unconditional generator, not a "
                         f"super-resolution model")
    unet = _option(options, "model.unet", where)
    multipliers = tuple(int(m) for m in _option(options, "model.unet.channel_multiplier", where))
    attn_res = _option(options, "model.unet.attn_res", where)
    attn_res = {int(r) for r in (attn_res if isinstance(attn_res, list) else [attn_res])}
    resolution, attention = int(_option(options, "model.diffusion.image_size", where)), set()
    for level in range(len(multipliers)):  # the reference halves the resolution after every level but the last
        if resolution in attn_res:
            attention.add(level)
        resolution //= 2
    return ReferenceUNet(
        inner_channel=int(_option(options, "model.unet.inner_channel", where)), channel_multiplier=multipliers,
        res_blocks=int(_option(options, "model.unet.res_blocks", where)), attention_levels=frozenset(attention),
        in_channel=int(_option(options, "model.unet.in_channel", where)),
        out_channel=int(_option(options, "model.unet.out_channel", where)),
        norm_groups=int(unet.get("norm_groups") or 32), dropout=float(unet.get("dropout", 0.0)))


def schedule_from_config(options: dict, where: str | Path) -> tuple[int, float, float]:
    """(T, beta_start, beta_end) of the config's sampling schedule (``val``, else ``train``); linear only."""
    schedules = _option(options, "model.beta_schedule", where)
    phase = "val" if "val" in schedules else "train"
    schedule = _option(options, f"model.beta_schedule.{phase}", where)
    if schedule.get("schedule") != "linear":
        raise ValueError(f"{where}: model.beta_schedule.{phase}.schedule is {schedule.get('schedule')!r}; SR3 "
                         f"priors use linear betas")
    return (int(_option(options, f"model.beta_schedule.{phase}.n_timestep", where)),
            float(_option(options, f"model.beta_schedule.{phase}.linear_start", where)),
            float(_option(options, f"model.beta_schedule.{phase}.linear_end", where)))


def schedule_from_betas(buffers: Mapping[str, torch.Tensor], path: Path) -> tuple[int, float, float]:
    """(T, beta_start, beta_end) of the checkpoint's ``betas`` buffer, which must be linear."""
    if "betas" not in buffers:
        raise ValueError(f"{path}: the checkpoint has no 'betas' buffer to read the noise schedule from; pass the "
                         f"reference `config`")
    betas = buffers["betas"].to(torch.float64).flatten()
    start, end = float(f"{betas[0].item():.6g}"), float(f"{betas[-1].item():.6g}")
    if len(betas) < 2 or not torch.allclose(betas, torch.linspace(start, end, len(betas), dtype=torch.float64),
                                            rtol=1e-5, atol=0):
        raise ValueError(f"{path}: the 'betas' buffer ({len(betas)} values, {start:g} .. {end:g}) is not a linear "
                         f"schedule; SR3 priors use linear betas")
    return len(betas), start, end


def scale_from_config(options: dict, where: str | Path, scale: int | None) -> int:
    """r_resolution / l_resolution of the config's datasets (all must agree, and with ``scale`` when given)."""
    datasets = _option(options, "datasets", where)
    factors = {}
    for name, dataset in datasets.items():
        if isinstance(dataset, dict) and "l_resolution" in dataset and "r_resolution" in dataset:
            low, high = int(dataset["l_resolution"]), int(dataset["r_resolution"])
            if high % low:
                raise ValueError(f"{where}: datasets.{name} goes from {low} to {high} pixels, not an integer factor")
            factors[name] = high // low
    if not factors:
        raise ValueError(f"{where}: no datasets.*.l_resolution / r_resolution to read the scale from; pass `scale`")
    if len(set(factors.values())) > 1 or (scale is not None and {int(scale)} != set(factors.values())):
        given = f", `scale` {scale}" if scale is not None else ""
        raise ValueError(f"{where}: the super-resolution factors disagree: {factors}{given}")
    return factors.popitem()[1]


def _option(options: dict, dotted: str, where: str | Path) -> Any:
    value = options
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where}: the reference config has no {dotted}")
        value = value[part]
    return value


def _strip_comments(text: str) -> str:
    """JSON text without ``//`` comments (to the end of the line), leaving strings untouched."""
    kept, index, in_string = [], 0, False
    while index < len(text):
        char = text[index]
        if in_string:
            if char == "\\":
                kept.append(text[index:index + 2])
                index += 2
                continue
            in_string = char != '"'
        elif char == '"':
            in_string = True
        elif text.startswith("//", index):
            end = text.find("\n", index)
            index = len(text) if end < 0 else end
            continue
        kept.append(char)
        index += 1
    return "".join(kept)


# --- converting the weights ---------------------------------------------------------------------------------------


def convert(weights: Mapping[str, torch.Tensor], architecture: ReferenceUNet, path: Path) -> SR3UNet:
    """An ``SR3UNet`` holding the reference denoiser's ``weights`` (prefix removed), loaded strictly."""
    unet = architecture.build(str(path))
    target = unet.state_dict()
    rules = _parameter_rules(architecture, target)
    missing = [PREFIX + k for k in rules if k not in weights]
    unexpected = [PREFIX + k for k in weights if k not in rules]
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not match the reference UNet {architecture}: "
                         f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}")
    converted, sources = {}, {}
    for key, rule in rules.items():
        for name, tensor in rule(weights[key]).items():
            converted[name], sources[name] = tensor, PREFIX + key
    mismatched = [f"{sources[k]} -> {k}: checkpoint {list(v.shape)}, model {list(target[k].shape)}"
                  for k, v in converted.items() if v.shape != target[k].shape]
    if mismatched:
        raise ValueError(f"{path}: shapes differ from the reference UNet {architecture}: {_listing(mismatched)}")
    unet.load_state_dict(converted, strict=True)
    return unet


def _module_pairs(architecture: ReferenceUNet) -> list[tuple[str, str, str]]:
    """(reference module, SR3UNet module, kind) for every module with weights; kind: input/copy/resnet/attention."""
    levels = len(architecture.channels)
    pairs = [("noise_level_mlp.1", "time_embedding.linear_1", "copy"),
             ("noise_level_mlp.3", "time_embedding.linear_2", "copy"),
             ("downs.0", "conv_in", "input")]
    index = 1
    for level in range(levels):
        for block in range(architecture.res_blocks):
            pairs += _block_pairs(f"downs.{index}", f"down_blocks.{level}", block, level, architecture)
            index += 1
        if level < levels - 1:
            pairs.append((f"downs.{index}.conv", f"down_blocks.{level}.downsamplers.0.conv", "copy"))
            index += 1
    pairs += [("mid.0.res_block", "mid_block.resnets.0", "resnet"),
              ("mid.0.attn", "mid_block.attentions.0", "attention"),
              ("mid.1.res_block", "mid_block.resnets.1", "resnet")]
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for block in range(architecture.res_blocks + 1):
            pairs += _block_pairs(f"ups.{index}", f"up_blocks.{up}", block, level, architecture)
            index += 1
        if level > 0:
            pairs.append((f"ups.{index}.conv", f"up_blocks.{up}.upsamplers.0.conv", "copy"))
            index += 1
    return pairs + [("final_conv.block.0", "conv_norm_out", "copy"), ("final_conv.block.3", "conv_out", "copy")]


def _block_pairs(reference: str, ours: str, block: int, level: int, architecture: ReferenceUNet) -> list:
    """A reference ``ResnetBlocWithAttn``: its ResNet block, then its attention at attention levels."""
    pairs = [(f"{reference}.res_block", f"{ours}.resnets.{block}", "resnet")]
    if level in architecture.attention_levels:
        pairs.append((f"{reference}.attn", f"{ours}.attentions.{block}", "attention"))
    return pairs


def _parameter_rules(architecture: ReferenceUNet, target: Mapping[str, torch.Tensor]) -> dict[str, Rule]:
    """Reference parameter key (no prefix) -> how it becomes SR3UNet parameters."""
    rules: dict[str, Rule] = {}

    def copy(reference: str, ours: str, flatten: bool = False) -> None:
        rules[f"{reference}.weight"] = lambda w, k=f"{ours}.weight": {k: w.flatten(1) if flatten else w}
        rules[f"{reference}.bias"] = lambda b, k=f"{ours}.bias": {k: b}

    for reference, ours, kind in _module_pairs(architecture):
        if kind == "copy":
            copy(reference, ours)
        elif kind == "input":  # [C, 6, 3, 3]: reference inputs (LR, noisy HR) -> ours (noisy HR, LR)
            rules[f"{reference}.weight"] = lambda w, k=f"{ours}.weight": {k: torch.cat([w[:, 3:], w[:, :3]], 1)}
            rules[f"{reference}.bias"] = lambda b, k=f"{ours}.bias": {k: b}
        elif kind == "resnet":
            for theirs, mine in (("block1.block.0", "norm1"), ("block1.block.3", "conv1"),
                                 ("noise_func.noise_func.0", "time_emb_proj"), ("block2.block.0", "norm2"),
                                 ("block2.block.3", "conv2")):
                copy(f"{reference}.{theirs}", f"{ours}.{mine}")
            if f"{ours}.conv_shortcut.weight" in target:  # both have a 1x1 shortcut iff the channels change
                copy(f"{reference}.res_conv", f"{ours}.conv_shortcut")
        else:
            copy(f"{reference}.norm", f"{ours}.group_norm")
            rules[f"{reference}.qkv.weight"] = lambda w, k=ours: _split_qkv(w, k)
            copy(f"{reference}.out", f"{ours}.to_out.0", flatten=True)
    return rules


def _split_qkv(weight: torch.Tensor, ours: str) -> dict[str, torch.Tensor]:
    """[3C,C,1,1] bias-free 1x1 conv -> to_q/to_k/to_v Linear weights [C,C] (output chunks q, k, v), zero biases."""
    query, key, value = weight.flatten(1).chunk(3, dim=0)
    out = {}
    for name, part in (("to_q", query), ("to_k", key), ("to_v", value)):
        out[f"{ours}.{name}.weight"] = part
        out[f"{ours}.{name}.bias"] = torch.zeros(part.shape[0], dtype=part.dtype)
    return out


def _listing(keys: list[str]) -> str:
    """The first few keys, and how many more."""
    if not keys:
        return "none"
    more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(map(str, keys[:SHOWN])) + more
