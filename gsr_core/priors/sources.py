"""Where a prior comes from: ``builtin:NAME``, a gsr prior folder, or a source its kind converts.

``materialize_prior(kind, source, out)`` writes a self-contained prior folder (``prior.json`` + weights) into
``out``: builtin priors and gsr prior folders are copied; anything else (a diffusers folder or hub id, an
original checkpoint file) goes through the kind's converter, which ends in a strict ``load_state_dict``.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from gsr_core.priors.base import PRIOR_FILE

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_PREFIX = "builtin:"

# kind -> ("module:function", fixed keyword arguments); each writes a prior folder from a source
CONVERTERS = {
    "sr3": ("gsr_core.priors.sr3_convert:materialize", {}),
    "stablesr": ("gsr_core.priors.stablesr_convert:materialize", {}),
    "stablesr_turbo": ("gsr_core.priors.stablesr_convert:materialize", {"turbo": True}),
    "sd_upscaler": ("gsr_core.priors.sd_upscaler:materialize", {}),
    "ldm_sr": ("gsr_core.priors.ldm_sr:materialize", {}),
}


def builtin_names() -> list[str]:
    """Names of the priors shipped in the package (``builtin:NAME``)."""
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / PRIOR_FILE).is_file()) if BUILTIN_DIR.is_dir() else []


def builtin_folder(name: str) -> Path:
    folder = BUILTIN_DIR / name
    if not (folder / PRIOR_FILE).is_file():
        raise ValueError(f"unknown builtin prior {BUILTIN_PREFIX}{name}; shipped: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in builtin_names()) or 'none'}")
    return folder


def local_source(source: str) -> Path | None:
    """The folder or file a source names on this machine (builtin or a path that exists), else None (a hub id)."""
    if source.startswith(BUILTIN_PREFIX):
        return builtin_folder(source[len(BUILTIN_PREFIX):])
    path = Path(source).expanduser()
    return path if path.exists() else None


def materialize_prior(kind: str, source: str, out: Path, **options) -> None:
    """Write the prior of ``kind`` named by ``source`` into the folder ``out`` (see the module docstring).

    ``options`` (e.g. ``vae``, ``config``) go to the kind's converter; ones left None are dropped.
    """
    if kind not in CONVERTERS:
        raise ValueError(f"unknown prior kind {kind!r}; expected one of {sorted(CONVERTERS)}")
    folder = local_source(source)
    if folder is not None and folder.is_dir() and (folder / PRIOR_FILE).is_file():
        found = json.loads((folder / PRIOR_FILE).read_text()).get("kind")
        if found != kind:
            raise ValueError(f"{source} holds a prior of kind {found!r}, but kind {kind!r} was asked for")
        shutil.copytree(folder, out, dirs_exist_ok=True)
        return
    target, fixed = CONVERTERS[kind]
    module_name, function_name = target.split(":")
    convert = getattr(importlib.import_module(module_name), function_name)
    paths = {k: _expanded(v) for k, v in options.items() if v is not None}
    convert(str(folder) if folder is not None else source, out, **fixed, **paths)


def _expanded(value):
    """``~/x`` -> the home folder's ``x`` for path-valued options; anything else unchanged."""
    return str(Path(value).expanduser()) if isinstance(value, str) and value.startswith("~") else value
