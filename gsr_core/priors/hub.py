"""Diffusers pipeline sources for priors: a local pipeline folder or a Hugging Face hub id, offline-safe.

``pipeline_folder(source, components)`` returns a local folder holding ``model_index.json`` and the named
component folders:

- an existing folder is used as it is;
- a hub id (``owner/name``) is looked up **only in the local Hugging Face cache** when ``HF_HUB_OFFLINE`` (or
  ``TRANSFORMERS_OFFLINE``) is set or when one request to the hub (``HUB_CHECK_TIMEOUT_S``, no retries) fails;
  a hub id missing from the cache then raises a ValueError saying how to get it. huggingface_hub's own retries
  and timeouts never come into play offline;
- otherwise (online) only what the prior needs is downloaded into the cache: ``model_index.json``, each
  component's ``*.json``/``*.txt`` files and one weight format per component (safetensors when the repository
  has it, else the ``.bin`` files; never fp16 variants or the single-file ``.ckpt`` beside them).

Weights are read with safetensors, or for ``.bin`` files by diffusers' and transformers' loaders, which call
``torch.load(weights_only=True)`` (checked for diffusers 0.42.1 ``models.model_loading_utils.load_state_dict``
and transformers 5; torch >= 2.6 defaults to ``weights_only=True`` as well). ``load_kwargs`` picks the format.

``check_pipeline`` checks that a folder holds the pipeline class a prior kind expects and names the folder,
the expected and the found class otherwise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

MODEL_INDEX = "model_index.json"
HUB_CHECK_TIMEOUT_S = 2.0  # the one connectivity check before any hub call
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers and transformers file names
WEIGHT_FORMATS = (".safetensors", ".bin")  # in order of preference
PIPELINE_KINDS = {"StableDiffusionUpscalePipeline": "sd_upscaler", "LDMSuperResolutionPipeline": "ldm_sr"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value (read now, not at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(str(v).upper() in {"1", "ON", "YES", "TRUE"} for v in flags if v)


def hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint (``HF_ENDPOINT``, proxies as huggingface_hub has them), no retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any failure (DNS, refused, timeout, proxy, offline mode) means: do not use the network
        return False
    return True


def pipeline_folder(source: str, components: Sequence[str]) -> Path:
    """A local diffusers pipeline folder for ``source`` (a folder or a hub id); see the module docstring.

    Args:
        source: a local folder or a hub id such as ``stabilityai/stable-diffusion-x4-upscaler``.
        components: the component folders the prior loads (only these are downloaded).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"source {source} is a file; expected a diffusers pipeline folder ({MODEL_INDEX} and one "
                         f"folder per component) or a Hugging Face hub id such as owner/name")
    if not HUB_ID.fullmatch(source):
        raise ValueError(f"source {source!r} is neither an existing folder nor a Hugging Face hub id (owner/name)")
    if hub_offline():
        return _cached_snapshot(source, "HF_HUB_OFFLINE is set")
    if not hub_reachable():
        return _cached_snapshot(source, "the Hugging Face hub is unreachable")
    return _download(source, components)


def _cached_snapshot(repo_id: str, reason: str) -> Path:
    """The cached snapshot of ``repo_id`` without any network call (ValueError when it is not cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=[MODEL_INDEX]))
    except LocalEntryNotFoundError:
        raise ValueError(
            f"hub id {repo_id} is not in the local Hugging Face cache and the network is off/unreachable ({reason}): "
            f"download it on a machine with network (`huggingface-cli download {repo_id}`) or pass a local folder"
        ) from None


def _download(repo_id: str, components: Sequence[str]) -> Path:
    """Download ``model_index.json`` and the named components of ``repo_id`` (one weight format each)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        files = HfApi().list_repo_files(repo_id)
    except RepositoryNotFoundError:
        raise ValueError(f"hub id {repo_id} does not exist on the Hugging Face hub (or is private)") from None
    if MODEL_INDEX not in files:
        raise ValueError(f"hub repository {repo_id} is not a diffusers pipeline: it has no {MODEL_INDEX}")
    wanted = [MODEL_INDEX]
    for component in components:
        inside = [f for f in files if f.startswith(component + "/") and f.count("/") == 1]
        if not inside:
            raise ValueError(f"hub repository {repo_id} has no {component}/ folder")
        wanted += [f for f in inside if f.endswith((".json", ".txt"))] + _weight_files(inside)
    return Path(snapshot_download(repo_id, allow_patterns=wanted))


def _weight_files(paths: Iterable[str]) -> list[str]:
    """The weight files (and their shard index) of one component, in the first format present; [] if none."""
    paths = list(paths)
    for suffix in WEIGHT_FORMATS:
        chosen = [p for p in paths if _weight_stem(p.rsplit("/", 1)[-1], suffix) in WEIGHT_STEMS]
        if chosen:
            return chosen
    return []


def _weight_stem(name: str, suffix: str) -> str | None:
    """'diffusion_pytorch_model' for 'diffusion_pytorch_model[-00001-of-00002]<suffix>[.index.json]'; variants
    such as '.fp16<suffix>' give None."""
    for ending in (suffix, suffix + ".index.json"):
        if name.endswith(ending):
            stem = name[: -len(ending)].split("-", 1)[0]
            return None if "." in stem else stem
    return None


def check_pipeline(folder: Path, expected: str, kind: str) -> dict:
    """``model_index.json`` of ``folder`` after checking it names pipeline class ``expected`` (for ``kind``)."""
    index_file = Path(folder) / MODEL_INDEX
    if not index_file.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder ({MODEL_INDEX} is missing); prior kind "
                         f"{kind!r} expects a {expected} folder")
    index = json.loads(index_file.read_text())
    found = index.get("_class_name")
    if found != expected:
        hint = f" (that is prior kind {PIPELINE_KINDS[found]!r})" if found in PIPELINE_KINDS else ""
        raise ValueError(f"{folder}: prior kind {kind!r} expects a {expected} folder, found {found}{hint}")
    return index


def component_folder(folder: Path, name: str) -> Path:
    """``folder/name`` after checking it holds a config (ValueError naming what is missing)."""
    path = Path(folder) / name
    configs = [path / c for c in ("config.json", "scheduler_config.json", "tokenizer_config.json")]
    if not any(c.is_file() for c in configs):
        raise ValueError(f"{folder}: component {name}/ is missing or has no config file")
    return path


def load_kwargs(component: Path) -> dict:
    """``from_pretrained`` keywords for a local component folder: no network, safetensors whenever present."""
    has_safetensors = any(component.glob("*.safetensors"))
    return {"local_files_only": True, "use_safetensors": has_safetensors}
