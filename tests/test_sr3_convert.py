"""Converting reference SR3 checkpoints (Janspiry/Image-Super-Resolution-via-Iterative-Refinement).

The reference's network is re-implemented here as plain functions over a state dict in its layout (the math of
its UNet: sinusoidal encoding of sqrt(gamma), MLP, GroupNorm-Swish-conv blocks with the noise embedding added
between them, single-head self-attention from one qkv conv, skip concatenations, nearest upsampling + conv), so
the converted SR3UNet is checked against an independent forward pass, not against the converter's own mapping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gsr_core.priors import load_prior
from gsr_core.priors.sr3 import SR3Prior
from gsr_core.priors.sr3_convert import materialize

GROUPS = 32
T, BETA_START, BETA_END = 2000, 1e-6, 1e-2  # the reference's sr_sr3_16_128 schedule


# --- the reference layout and forward pass, written from its math ----------------------------------------------


def reference_state_dict(inner: int = 32, multipliers=(1, 2), res_blocks: int = 1, attention_levels=(1,),
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """A random generator state dict in the reference's layout (``denoise_fn.*`` plus schedule buffers)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=generator) * std

    def conv(name, cin, cout, size, bias=True):
        state[f"{name}.weight"] = randn(cout, cin, size, size, std=1 / math.sqrt(cin * size * size))
        if bias:
            state[f"{name}.bias"] = randn(cout, std=0.1)

    def linear(name, cin, cout):
        state[f"{name}.weight"] = randn(cout, cin, std=1 / math.sqrt(cin))
        state[f"{name}.bias"] = randn(cout, std=0.1)

    def norm(name, channels):
        state[f"{name}.weight"] = 1 + randn(channels, std=0.1)
        state[f"{name}.bias"] = randn(channels, std=0.1)

    def block(name, cin, cout):  # GroupNorm (.0), Swish, Dropout/Identity, Conv3x3 (.3)
        norm(f"{name}.block.0", cin)
        conv(f"{name}.block.3", cin, cout, 3)

    def resnet_with_attention(name, cin, cout, attention):
        block(f"{name}.res_block.block1", cin, cout)
        linear(f"{name}.res_block.noise_func.noise_func.0", inner, cout)
        block(f"{name}.res_block.block2", cout, cout)
        if cin != cout:
            conv(f"{name}.res_block.res_conv", cin, cout, 1)
        if attention:
            norm(f"{name}.attn.norm", cout)
            conv(f"{name}.attn.qkv", cout, 3 * cout, 1, bias=False)
            conv(f"{name}.attn.out", cout, cout, 1)

    linear("noise_level_mlp.1", inner, 4 * inner)
    linear("noise_level_mlp.3", 4 * inner, inner)
    conv("downs.0", 6, inner, 3)
    skips, current, index = [inner], inner, 1
    for level, multiplier in enumerate(multipliers):
        for _ in range(res_blocks):
            resnet_with_attention(f"downs.{index}", current, inner * multiplier, level in attention_levels)
            current = inner * multiplier
            skips.append(current)
            index += 1
        if level < len(multipliers) - 1:
            conv(f"downs.{index}.conv", current, current, 3)
            skips.append(current)
            index += 1
    resnet_with_attention("mid.0", current, current, True)
    resnet_with_attention("mid.1", current, current, False)
    index = 0
    for level in reversed(range(len(multipliers))):
        for _ in range(res_blocks + 1):
            resnet_with_attention(f"ups.{index}", current + skips.pop(), inner * multipliers[level],
                                  level in attention_levels)
            current = inner * multipliers[level]
            index += 1
        if level > 0:
            conv(f"ups.{index}.conv", current, current, 3)
            index += 1
    block("final_conv", current, 3)
    checkpoint = {f"denoise_fn.{k}": v for k, v in state.items()}
    betas = torch.linspace(BETA_START, BETA_END, T, dtype=torch.float64)
    checkpoint["betas"] = betas.float()
    checkpoint["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return checkpoint


def reference_forward(checkpoint: dict[str, torch.Tensor], x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The reference denoiser: x [B,6,H,W] = (upsampled LR, noisy HR), level [B] = sqrt(gamma) -> eps [B,3,H,W]."""
    w = {k[len("denoise_fn."):]: v for k, v in checkpoint.items() if k.startswith("denoise_fn.")}

    def block(h, name):
        h = F.group_norm(h, GROUPS, w[f"{name}.block.0.weight"], w[f"{name}.block.0.bias"], eps=1e-5)
        h = h * torch.sigmoid(h)
        return F.conv2d(h, w[f"{name}.block.3.weight"], w[f"{name}.block.3.bias"], padding=1)

    def resnet(h, name, embedding):
        out = block(h, f"{name}.block1")
        noise = embedding @ w[f"{name}.noise_func.noise_func.0.weight"].T + w[f"{name}.noise_func.noise_func.0.bias"]
        out = block(out + noise[:, :, None, None], f"{name}.block2")
        shortcut = F.conv2d(h, w[f"{name}.res_conv.weight"], w[f"{name}.res_conv.bias"]) \
            if f"{name}.res_conv.weight" in w else h
        return out + shortcut

    def attention(h, name):
        batch, channels, height, width = h.shape
        normed = F.group_norm(h, GROUPS, w[f"{name}.norm.weight"], w[f"{name}.norm.bias"], eps=1e-5)
        qkv = F.conv2d(normed, w[f"{name}.qkv.weight"]).reshape(batch, 3, channels, height * width)
        query, key, value = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        weights = torch.softmax(torch.einsum("bci,bcj->bij", query, key) / math.sqrt(channels), dim=-1)
        mixed = torch.einsum("bij,bcj->bci", weights, value).reshape(batch, channels, height, width)
        return h + F.conv2d(mixed, w[f"{name}.out.weight"], w[f"{name}.out.bias"])

    def resnet_with_attention(h, name, embedding):
        h = resnet(h, f"{name}.res_block", embedding)
        return attention(h, f"{name}.attn") if f"{name}.attn.qkv.weight" in w else h

    inner = w["downs.0.weight"].shape[0]
    frequencies = torch.exp(-math.log(1e4) * torch.arange(inner // 2, dtype=level.dtype) / (inner // 2))
    angles = level[:, None] * frequencies[None]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    embedding = embedding @ w["noise_level_mlp.1.weight"].T + w["noise_level_mlp.1.bias"]
    embedding = embedding * torch.sigmoid(embedding)
    embedding = embedding @ w["noise_level_mlp.3.weight"].T + w["noise_level_mlp.3.bias"]

    h = F.conv2d(x, w["downs.0.weight"], w["downs.0.bias"], padding=1)
    skips, index = [h], 1
    while f"downs.{index}.conv.weight" in w or f"downs.{index}.res_block.block1.block.0.weight" in w:
        if f"downs.{index}.conv.weight" in w:
            h = F.conv2d(h, w[f"downs.{index}.conv.weight"], w[f"downs.{index}.conv.bias"], stride=2, padding=1)
        else:
            h = resnet_with_attention(h, f"downs.{index}", embedding)
        skips.append(h)
        index += 1
    h = resnet_with_attention(h, "mid.0", embedding)
    h = resnet_with_attention(h, "mid.1", embedding)
    index = 0
    while f"ups.{index}.conv.weight" in w or f"ups.{index}.res_block.block1.block.0.weight" in w:
        if f"ups.{index}.conv.weight" in w:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = F.conv2d(h, w[f"ups.{index}.conv.weight"], w[f"ups.{index}.conv.bias"], padding=1)
        else:
            h = resnet_with_attention(torch.cat([h, skips.pop()], dim=1), f"ups.{index}", embedding)
        index += 1
    assert not skips
    return block(h, "final_conv")


REFERENCE_CONFIG = """{
    "name": "tiny", // comments as the reference writes them
    "datasets": {
        "train": {"dataroot": "http://example.org/data", "l_resolution": 4, "r_resolution": 16}, // x4
        "val": {"l_resolution": 4, "r_resolution": 16}
    },
    "model": {
        "which_model_G": "sr3",
        "unet": {"in_channel": 6, "out_channel": 3, "inner_channel": 32, "channel_multiplier": [1, 2],
                 "attn_res": [8], "res_blocks": 1, "dropout": 0.2},
        "beta_schedule": {
            "train": {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2},
            "val": {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2}
        },
        "diffusion": {"image_size": 16, "channels": 3, "conditional": true}
    }
}"""


@pytest.fixture
def checkpoint_file(tmp_path: Path) -> Path:
    path = tmp_path / "I1000_E1_gen.pth"
    torch.save(reference_state_dict(), path)
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "sr_sr3_tiny.json"
    path.write_text(REFERENCE_CONFIG)
    return path


# --- equivalence --------------------------------------------------------------------------------------------------


def test_converted_prior_matches_the_reference_forward_pass(tmp_path: Path, checkpoint_file: Path, config_file: Path):
    materialize(str(checkpoint_file), tmp_path / "prior", config=str(config_file))
    prior = load_prior(tmp_path / "prior", device="cpu")
    assert isinstance(prior, SR3Prior) and prior.scale == 4 and prior.num_train_timesteps == T
    assert not prior.settings.residual and prior.settings.noise_level_scale == 1.0
    checkpoint = reference_state_dict()
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(3, 3, 16, 16, generator=generator)
    cond = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
    level = torch.tensor([0.02, 0.5, 0.999])
    with torch.no_grad():
        ours = prior.eps_at_level(noisy, level, cond)
        theirs = reference_forward(checkpoint, torch.cat([cond, noisy], dim=1), level)
    assert ours.shape == (3, 3, 16, 16) and theirs.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # Discrete steps feed sqrt(alphas_cumprod[t]) of the reference's own (float64) schedule.
    t = torch.tensor([0, 900, T - 1])
    gammas = torch.cumprod(1 - torch.linspace(BETA_START, BETA_END, T, dtype=torch.float64), 0)
    with torch.no_grad():
        theirs = reference_forward(checkpoint, torch.cat([cond, noisy], dim=1), gammas[t].sqrt().float())
        torch.testing.assert_close(prior.predict_eps(noisy, t, cond), theirs, rtol=1e-5, atol=1e-5)


def test_settings_are_read_off_the_checkpoint_without_a_config(tmp_path: Path, checkpoint_file: Path,
                                                               config_file: Path):
    materialize(str(checkpoint_file), tmp_path / "inferred", scale=4)
    materialize(str(checkpoint_file), tmp_path / "configured", config=str(config_file))
    inferred = json.loads((tmp_path / "inferred" / "prior.json").read_text())
    configured = json.loads((tmp_path / "configured" / "prior.json").read_text())
    assert inferred == configured
    assert inferred | {"beta_start": 1e-6, "beta_end": 1e-2} == inferred  # the float32 buffer, read back exactly
    unet_config = json.loads((tmp_path / "inferred" / "unet" / "config.json").read_text())
    assert unet_config["block_out_channels"] == [32, 64]
    assert unet_config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    with pytest.raises(ValueError, match="does not record its super-resolution factor"):
        materialize(str(checkpoint_file), tmp_path / "no-scale")
    with pytest.raises(ValueError, match=r"factors disagree.*`scale` 2"):
        materialize(str(checkpoint_file), tmp_path / "wrong-scale", config=str(config_file), scale=2)


def test_safetensors_checkpoints_convert_too(tmp_path: Path, checkpoint_file: Path):
    from safetensors.torch import save_file

    path = tmp_path / "gen.safetensors"
    save_file({k: v.contiguous() for k, v in reference_state_dict().items()}, path)
    materialize(str(path), tmp_path / "a", scale=4)
    materialize(str(checkpoint_file), tmp_path / "b", scale=4)
    a, b = SR3Prior.from_folder(tmp_path / "a"), SR3Prior.from_folder(tmp_path / "b")
    for (key, left), (_, right) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(left, right), key


# --- bad input ----------------------------------------------------------------------------------------------------


def _convert_edited(tmp_path: Path, edit) -> None:
    checkpoint = reference_state_dict()
    edit(checkpoint)
    path = tmp_path / "edited_gen.pth"
    torch.save(checkpoint, path)
    materialize(str(path), tmp_path / "out", scale=4)


def test_missing_key_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match=r"missing keys denoise_fn\.ups\.1\.res_block\.block2\.block\.3\.bias;"):
        _convert_edited(tmp_path, lambda c: c.pop("denoise_fn.ups.1.res_block.block2.block.3.bias"))


def test_unexpected_keys_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unexpected keys denoise_fn\.extra\.weight"):
        _convert_edited(tmp_path, lambda c: c.update({"denoise_fn.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"beside 'denoise_fn\.\*' and the schedule buffers: ema_step"):
        _convert_edited(tmp_path, lambda c: c.update({"ema_step": torch.zeros(())}))


def test_shape_mismatch_names_both_keys(tmp_path: Path):
    def widen(checkpoint):
        checkpoint["denoise_fn.mid.0.attn.out.bias"] = torch.zeros(65)

    with pytest.raises(ValueError, match=r"mid\.0\.attn\.out\.bias -> mid_block\.attentions\.0\.to_out\.0\.bias: "
                                         r"checkpoint \[65\], model \[64\]"):
        _convert_edited(tmp_path, widen)


def test_config_that_does_not_match_the_weights_lists_the_keys(tmp_path: Path, checkpoint_file: Path):
    config = tmp_path / "no_attention.json"
    config.write_text(REFERENCE_CONFIG.replace('"attn_res": [8]', '"attn_res": []'))
    with pytest.raises(ValueError, match=r"unexpected keys denoise_fn\.downs\.3\.attn\.norm\.weight, "):
        materialize(str(checkpoint_file), tmp_path / "out", config=str(config))


def test_affine_level_checkpoints_are_refused(tmp_path: Path):
    def affine(checkpoint):
        key = "denoise_fn.downs.1.res_block.noise_func.noise_func.0"
        checkpoint[f"{key}.weight"] = torch.zeros(64, 32)
        checkpoint[f"{key}.bias"] = torch.zeros(64)

    with pytest.raises(ValueError, match="use_affine_level=True"):
        _convert_edited(tmp_path, affine)


def test_optimizer_state_is_refused(tmp_path: Path):
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([parameter])
    parameter.grad = torch.ones(3)
    optimizer.step()
    path = tmp_path / "I1000_E1_opt.pth"
    torch.save({"epoch": 1, "iter": 1000, "scheduler": None, "optimizer": optimizer.state_dict()}, path)
    with pytest.raises(ValueError, match=r"optimizer state \(an `\*_opt.pth` file.*matching `\*_gen.pth`"):
        materialize(str(path), tmp_path / "out", scale=4)


def test_files_that_are_not_reference_generators_are_refused(tmp_path: Path):
    pickled = tmp_path / "object.pth"
    torch.save({"weights": torch.zeros(1), "settings": Path("x")}, pickled)  # needs a non-weights global
    with pytest.raises(ValueError, match=r"not a plain torch state dict \(refused by torch.load\(weights_only=True\)"):
        materialize(str(pickled), tmp_path / "out", scale=4)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=r"no 'denoise_fn\.\*' keys.*conv\.weight"):
        materialize(str(other), tmp_path / "out", scale=4)
    ddpm = tmp_path / "ddpm_gen.pth"
    torch.save({"denoise_fn.time_mlp.1.weight": torch.zeros(1)}, ddpm)
    with pytest.raises(ValueError, match="'ddpm' network"):
        materialize(str(ddpm), tmp_path / "out", scale=4)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        materialize(str(garbage), tmp_path / "out", scale=4)
    with pytest.raises(ValueError, match="does not exist"):
        materialize(str(tmp_path / "absent_gen.pth"), tmp_path / "out", scale=4)


def test_unusable_configs_are_refused(tmp_path: Path, checkpoint_file: Path):
    cases = {
        "quad": (REFERENCE_CONFIG.replace('"val": {"schedule": "linear"', '"val": {"schedule": "quad"'),
                 r"beta_schedule\.val\.schedule is 'quad'"),
        "ddpm": (REFERENCE_CONFIG.replace('"which_model_G": "sr3"', '"which_model_G": "ddpm"'), "'ddpm'"),
        "no-unet": (REFERENCE_CONFIG.replace('"unet"', '"unet_3d"'), "has no model.unet"),
        "broken": (REFERENCE_CONFIG[:-5], "not a JSON config"),
    }
    for name, (text, message) in cases.items():
        config = tmp_path / f"{name}.json"
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            materialize(str(checkpoint_file), tmp_path / "out", config=str(config))
