"""The diffusers-pipeline priors (x4 upscaler, LDM-SR) on tiny random pipelines, offline, on the CPU.

Each tiny pipeline is saved as a real diffusers pipeline folder, made into a prior folder by ``materialize``
and loaded back; sampling is checked against the diffusers pipelines themselves.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, LDMSuperResolutionPipeline,
                       StableDiffusionUpscalePipeline, UNet2DConditionModel, UNet2DModel, VQModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gsr_core.priors import load_prior
from gsr_core.priors import hub
from gsr_core.priors.ldm_sr import LDMSRPrior, LDMSRSettings
from gsr_core.priors.ldm_sr import materialize as materialize_ldm
from gsr_core.priors.prediction import eps_from_output
from gsr_core.priors.sd_upscaler import SDUpscalerPrior, SDUpscalerSettings
from gsr_core.priors.sd_upscaler import materialize as materialize_sd

LR = 8  # LR side; HR is 32


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters, built from a written vocab.json and merges.txt."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def tiny_upscale_pipeline(folder: Path) -> Path:
    """A StableDiffusionUpscalePipeline with the x4 upscaler's structure at toy width, saved to ``folder``."""
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        sample_size=32, scaling_factor=0.08333)
    unet = UNet2DConditionModel(
        sample_size=LR, in_channels=7, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, num_class_embeds=1000,
        use_linear_projection=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu"))
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1)
    low_res = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=True)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(folder.parent /
                                          "tokenizer-files"), unet=unet, low_res_scheduler=low_res, scheduler=scheduler,
                                          max_noise_level=350)
    pipe.save_pretrained(folder)
    return folder


def tiny_ldm_pipeline(folder: Path) -> Path:
    """An LDMSuperResolutionPipeline with LDM-SR's structure at toy width, saved to ``folder``."""
    torch.manual_seed(1)
    vqvae = VQModel(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    block_out_channels=(8, 16, 16), latent_channels=3, num_vq_embeddings=32, layers_per_block=1,
                    norm_num_groups=8, sample_size=32)
    unet = UNet2DModel(sample_size=LR, in_channels=6, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1)
    LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: threads only contend


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diffusers-priors")


@pytest.fixture(scope="module")
def sd_pipeline(work) -> Path:
    return tiny_upscale_pipeline(work / "sd-pipeline")


@pytest.fixture(scope="module")
def ldm_pipeline(work) -> Path:
    return tiny_ldm_pipeline(work / "ldm-pipeline")


@pytest.fixture(scope="module")
def sd_folder(work, sd_pipeline) -> Path:
    materialize_sd(str(sd_pipeline), work / "sd-prior")
    return work / "sd-prior"


@pytest.fixture(scope="module")
def ldm_folder(work, ldm_pipeline) -> Path:
    materialize_ldm(str(ldm_pipeline), work / "ldm-prior")
    return work / "ldm-prior"


@pytest.fixture(scope="module")
def sd_prior(sd_folder) -> SDUpscalerPrior:
    return load_prior(sd_folder, device="cpu")


@pytest.fixture(scope="module")
def ldm_prior(ldm_folder) -> LDMSRPrior:
    return load_prior(ldm_folder, device="cpu")


def lr_images(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, LR, LR, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- prior folders ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind, components", [
    ("sd_folder", "sd_upscaler", {"vae", "text_encoder", "tokenizer", "unet", "low_res_scheduler", "scheduler"}),
    ("ldm_folder", "ldm_sr", {"vqvae", "unet", "scheduler"}),
])
def test_prior_folder_is_self_contained(request, name, kind, components):
    folder = request.getfixturevalue(name)
    settings = json.loads((folder / "prior.json").read_text())
    assert settings["kind"] == kind and settings["scale"] == 4
    index = json.loads((folder / "model_index.json").read_text())
    assert {k for k, v in index.items() if isinstance(v, list)} == components
    weights = {p.parent.name for p in folder.rglob("*.safetensors")}
    assert weights == components - {"tokenizer", "low_res_scheduler", "scheduler"}
    assert not list(folder.rglob("*.bin"))


def test_registry_loads_both_kinds(sd_prior, ldm_prior):
    assert isinstance(sd_prior, SDUpscalerPrior) and isinstance(ldm_prior, LDMSRPrior)
    for prior in (sd_prior, ldm_prior):
        assert prior.latent and prior.scale == 4 and prior.num_train_timesteps == 1000
        assert not any(p.requires_grad for p in prior.unet.parameters())
    assert not hasattr(sd_prior, "text_encoder")  # embeddings computed once at load, encoder dropped
    assert sd_prior.describe()["noise_level"] == 20


# --- the x4 upscaler ----------------------------------------------------------------------------------------------

def test_sd_upscaler_shapes(sd_prior):
    hr = torch.rand(2, 3, 4 * LR, 4 * LR) * 2 - 1
    z = sd_prior.encode(hr)
    assert z.shape == (2, 4, LR, LR) and z.dtype == torch.float32
    assert sd_prior.decode(z).shape == hr.shape
    cond = sd_prior.condition(lr_images())
    assert cond.image.shape == (2, 3, LR, LR) and cond.noise_level.tolist() == [20, 20]
    assert cond.text.shape == (2, 77, 16) and cond.negative_text is None
    eps = sd_prior.predict_eps(torch.randn(2, 4, LR, LR), torch.tensor([10, 900]), cond)
    assert eps.shape == (2, 4, LR, LR) and torch.isfinite(eps).all()


def test_sd_upscaler_encode_uses_scaling_factor(sd_prior):
    hr = torch.rand(1, 3, 4 * LR, 4 * LR) * 2 - 1
    mean = sd_prior.vae.encode(hr).latent_dist.mean
    torch.testing.assert_close(sd_prior.encode(hr), mean * 0.08333)
    torch.testing.assert_close(sd_prior.decode(mean * 0.08333), sd_prior.vae.decode(mean).sample)


def test_sd_upscaler_condition_noises_lr_with_low_res_scheduler(sd_prior):
    lr = lr_images()
    cond = sd_prior.condition(lr, torch.Generator().manual_seed(5))
    noise = torch.randn(lr.shape, generator=torch.Generator().manual_seed(5))
    expected = sd_prior.low_res_scheduler.add_noise(lr, noise, torch.tensor([20]))
    torch.testing.assert_close(cond.image, expected)
    torch.testing.assert_close(sd_prior.condition(lr).image, sd_prior.condition(lr).image)  # seeded by default


def test_sd_upscaler_converts_v_to_eps(sd_prior):
    cond = sd_prior.condition(lr_images())
    z_t = torch.randn(2, 4, LR, LR, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([50, 700])
    with torch.no_grad():
        v = sd_prior.unet(torch.cat([z_t, cond.image], 1), t, encoder_hidden_states=cond.text,
                          class_labels=cond.noise_level).sample
        eps = sd_prior.predict_eps(z_t, t, cond)
        x0 = sd_prior.predict_x0(z_t, t, cond)
    a = sd_prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(eps, a.sqrt() * v + (1 - a).sqrt() * z_t)
    torch.testing.assert_close(x0, a.sqrt() * z_t - (1 - a).sqrt() * v, atol=1e-5, rtol=1e-4)  # v-param x0


def _pipeline_output(pipe, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(output_type="pt", **kwargs).images


def test_sd_upscale_matches_the_diffusers_pipeline(sd_folder, sd_prior):
    lr = lr_images()
    ours = sd_prior.upscale(lr, steps=2, generator=torch.Generator().manual_seed(11))
    assert ours.shape == (2, 3, 4 * LR, 4 * LR) and torch.isfinite(ours).all()
    assert ours.min() >= -1 and ours.max() <= 1
    pipe = StableDiffusionUpscalePipeline.from_pretrained(sd_folder)  # the prior folder is a pipeline folder too
    theirs = _pipeline_output(pipe, prompt=["", ""], image=(lr + 1) / 2, num_inference_steps=2, guidance_scale=1.0,
                              noise_level=20, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=1e-4, rtol=1e-4)


def test_sd_guidance_matches_the_pipelines_cfg(sd_pipeline, tmp_path):
    settings = SDUpscalerSettings(guidance_scale=3.0, prompt="a cat", negative_prompt="", noise_level=40)
    materialize_sd(str(sd_pipeline), tmp_path / "guided", settings)
    prior = SDUpscalerPrior.from_folder(tmp_path / "guided")
    assert prior.negative_text is not None
    lr = lr_images(batch=1)
    ours = prior.upscale(lr, steps=2, generator=torch.Generator().manual_seed(2))
    pipe = StableDiffusionUpscalePipeline.from_pretrained(sd_pipeline)
    theirs = _pipeline_output(pipe, prompt="a cat", negative_prompt="", image=(lr + 1) / 2, num_inference_steps=2,
                              guidance_scale=3.0, noise_level=40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=1e-4, rtol=1e-4)


# --- LDM-SR -------------------------------------------------------------------------------------------------------

def test_ldm_sr_shapes_and_eps(ldm_prior):
    hr = torch.rand(2, 3, 4 * LR, 4 * LR) * 2 - 1
    z = ldm_prior.encode(hr)
    assert z.shape == (2, 3, LR, LR)
    torch.testing.assert_close(z, ldm_prior.vqvae.encode(hr).latents)
    assert ldm_prior.decode(z).shape == hr.shape
    lr = lr_images()
    cond = ldm_prior.condition(lr)
    z_t, t = torch.randn(2, 3, LR, LR), torch.tensor([3, 999])
    with torch.no_grad():
        eps = ldm_prior.predict_eps(z_t, t, cond)
        output = ldm_prior.unet(torch.cat([z_t, lr], 1), t).sample
    assert ldm_prior.prediction_type == "epsilon"
    torch.testing.assert_close(eps, output)


def test_ldm_upscale_matches_the_diffusers_pipeline(ldm_folder, ldm_prior):
    lr = lr_images()
    ours = ldm_prior.upscale(lr, steps=2, generator=torch.Generator().manual_seed(4))
    assert ours.shape == (2, 3, 4 * LR, 4 * LR) and torch.isfinite(ours).all()
    assert ours.min() >= -1 and ours.max() <= 1
    pipe = LDMSuperResolutionPipeline.from_pretrained(ldm_folder)
    theirs = _pipeline_output(pipe, image=lr, num_inference_steps=2, eta=0.0,
                              generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=1e-4, rtol=1e-4)


# --- parameterisations --------------------------------------------------------------------------------------------

def test_eps_from_every_prediction_type():
    z0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    a = torch.tensor([0.9, 0.5, 0.01]).view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    torch.testing.assert_close(eps_from_output(eps, z_t, a, "epsilon"), eps)
    torch.testing.assert_close(eps_from_output(v, z_t, a, "v_prediction"), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_from_output(z0, z_t, a, "sample"), eps, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_output(v, z_t, a, "flow")


# --- bad input ----------------------------------------------------------------------------------------------------

def test_wrong_pipeline_kind_names_folder_expected_and_found(sd_pipeline, ldm_pipeline, tmp_path):
    with pytest.raises(ValueError, match="expects a StableDiffusionUpscalePipeline folder, found "
                                         "LDMSuperResolutionPipeline.*'ldm_sr'") as error:
        materialize_sd(str(ldm_pipeline), tmp_path / "x")
    assert str(ldm_pipeline) in str(error.value)
    with pytest.raises(ValueError, match="expects a LDMSuperResolutionPipeline folder, found "
                                         "StableDiffusionUpscalePipeline"):
        materialize_ldm(str(sd_pipeline), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_wrong_prior_folder_kind(sd_folder, ldm_folder, tmp_path):
    with pytest.raises(ValueError, match="expected prior kind 'sd_upscaler', found 'ldm_sr'"):
        SDUpscalerPrior.from_folder(ldm_folder)
    with pytest.raises(ValueError, match="expected prior kind 'ldm_sr', found 'sd_upscaler'"):
        LDMSRPrior.from_folder(sd_folder)
    with pytest.raises(ValueError, match="prior.json is missing"):
        LDMSRPrior.from_folder(tmp_path)


def test_file_and_non_pipeline_sources(tmp_path):
    checkpoint = tmp_path / "x4-upscaler-ema.ckpt"
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; expected a diffusers pipeline folder"):
        materialize_sd(str(checkpoint), tmp_path / "out")
    with pytest.raises(ValueError, match="model_index.json is missing"):
        materialize_ldm(str(tmp_path), tmp_path / "out")
    with pytest.raises(ValueError, match="neither an existing folder nor a Hugging Face hub id"):
        materialize_ldm("no/such/folder", tmp_path / "out")


def test_scale_noise_level_and_precision_errors(sd_pipeline, ldm_pipeline, sd_folder, tmp_path):
    with pytest.raises(ValueError, match="scale 2, but the VAE downsamples by 4"):
        materialize_sd(str(sd_pipeline), tmp_path / "a", SDUpscalerSettings(scale=2))
    with pytest.raises(ValueError, match="scale 8, but the VQ model downsamples by 4"):
        materialize_ldm(str(ldm_pipeline), tmp_path / "b", LDMSRSettings(scale=8))
    with pytest.raises(ValueError, match=r"noise_level` must lie in \[0, 350\]"):
        materialize_sd(str(sd_pipeline), tmp_path / "c", SDUpscalerSettings(noise_level=400))
    with pytest.raises(ValueError, match="float16/bfloat16 on CUDA"):
        SDUpscalerPrior.from_folder(sd_folder, dtype=torch.float16)


def test_size_mismatches(sd_prior, ldm_prior):
    cond = ldm_prior.condition(lr_images())
    with pytest.raises(ValueError, match="latent has the LR's size"):
        ldm_prior.predict_eps(torch.randn(2, 3, LR + 2, LR), 10, cond)
    with pytest.raises(ValueError, match="must be a multiple of the scale 4"):
        sd_prior.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"latents must be \[B,4,h,w\]"):
        sd_prior.decode(torch.zeros(1, 3, LR, LR))


# --- hub ids, offline ---------------------------------------------------------------------------------------------

def test_unknown_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match="hub id gsr-test/no-such-upscaler is not in the local Hugging Face cache "
                                         r"and the network is off/unreachable .*huggingface-cli download"):
        materialize_sd("gsr-test/no-such-upscaler", tmp_path / "out")
    assert time.monotonic() - start < 5


def test_unreachable_hub_falls_back_to_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.HUB_CHECK_TIMEOUT_S: False)
    with pytest.raises(ValueError, match="the Hugging Face hub is unreachable"):
        hub.pipeline_folder("gsr-test/no-such-model", ("unet",))


def test_cached_hub_id_loads_offline(monkeypatch, tmp_path, ldm_pipeline):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--gsr-test--tiny-ldm-sr"
    shutil.copytree(ldm_pipeline, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    materialize_ldm("gsr-test/tiny-ldm-sr", tmp_path / "prior")
    prior = load_prior(tmp_path / "prior", device="cpu")
    assert prior.settings.source == "gsr-test/tiny-ldm-sr" and prior.scale == 4


def test_weight_file_choice():
    both = ["unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert hub._weight_files(both) == ["unet/diffusion_pytorch_model.safetensors"]
    assert hub._weight_files(["vqvae/diffusion_pytorch_model.bin", "vqvae/config.json"]) == [
        "vqvae/diffusion_pytorch_model.bin"]
    shards = ["text_encoder/model.safetensors.index.json", "text_encoder/model-00001-of-00002.safetensors",
              "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.fp16-00001-of-00002.safetensors"]
    assert hub._weight_files(shards) == shards[:3]


def test_online_download_fetches_only_what_the_prior_uses(monkeypatch, tmp_path):
    import huggingface_hub

    listing = ["README.md", "model_index.json", "x4-upscaler-ema.ckpt", "x4-upscaler-ema.safetensors",
               "low_res_scheduler/scheduler_config.json", "scheduler/scheduler_config.json",
               "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
               "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/vocab.json",
               "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet/config.json",
               "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
               "unet/diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.bin",
               "images/cat.png"]
    requested = {}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.HUB_CHECK_TIMEOUT_S: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: requested.setdefault(repo_id, allow_patterns) and str(tmp_path))
    folder = hub.pipeline_folder("stabilityai/stable-diffusion-x4-upscaler",
                                 ("vae", "text_encoder", "tokenizer", "unet", "low_res_scheduler", "scheduler"))
    assert folder == tmp_path
    assert sorted(requested["stabilityai/stable-diffusion-x4-upscaler"]) == sorted([
        "model_index.json", "low_res_scheduler/scheduler_config.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.bin"])
