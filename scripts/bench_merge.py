"""Benchmark ``lrft merge``: wall time and peak memory (RSS) as the model grows.

Each size is a LLaMA-shaped model with random weights, saved as a local base checkpoint, plus a run
folder as training leaves it (LoRA r=16 on every linear layer, B random so the merge is not a no-op).
Each merge runs in a fresh process whose peak RSS is read from the kernel (``wait4``); a process
that only loads the base gives the "one model" reference the merge's peak is compared with.

    python scripts/bench_merge.py                          # tiny, 0.1B, 0.5B, 1B in bfloat16
    python scripts/bench_merge.py --sizes 1B --dtype float32
    python scripts/bench_merge.py --write docs/merge.md    # replace the table between the markers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# hidden, intermediate, layers, heads, kv heads; vocab 32000, untied head (as LLaMA / TinyLlama)
SHAPES = {
    "tiny": (128, 256, 2, 4, 2),
    "0.1B": (768, 2048, 12, 12, 12),
    "0.5B": (1536, 4096, 16, 12, 4),
    "1B": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shape
    "3B": (3200, 8640, 26, 32, 32),  # OpenLLaMA-3B's shape: ~7 GB in bfloat16, not run by default
}
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
MERGE = "import sys; from lrft.cli.merge import merge_main; sys.exit(merge_main(sys.argv[1:]))"
LOAD = (
    "import sys, torch; from transformers import AutoModelForCausalLM; "
    "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')"
)


def make_run(work: Path, size: str, dtype: str) -> tuple[Path, int]:
    """A base checkpoint and a finished LoRA run on it; returns (run folder, parameter count)."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from lrft.config.compose import compose
    from lrft.methods import LowRankLinear, get_method
    from lrft.model.load import byte_tokenizer
    from lrft.run.final import save_final

    hidden, inter, layers, heads, kv = SHAPES[size]
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.set_default_dtype(getattr(torch, dtype))  # built in the target dtype: no float32 copy first
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    base, run = work / "base", work / "run"
    tokenizer = byte_tokenizer("llama")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    overrides = [f"model.name_or_path={base}", "model.tokenizer=null", f"model.dtype={dtype}"]
    overrides += ["method=lora", "method.r=16", "method.target_modules=[all-linear]", f"output_dir={run}"]
    cfg = compose(overrides)
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    method = get_method("lora")(OmegaConf.to_object(cfg.method))
    model = method.apply(model, {"target_modules": [], "modules_to_save": []})
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LowRankLinear):
                layer.lora_B.normal_(std=0.02)
    save_final(run, method, model, tokenizer, cfg)
    return run, n_params


def measure(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one fresh Python process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args[1:])}\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 2**20  # KiB -> GiB


def bench(size: str, dtype: str, root: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{size}-", dir=root))
    try:
        run, n_params = make_run(work, size, dtype)
        row = {"size": size, "params": n_params, "dtype": dtype}
        row["model_gib"] = n_params * torch.empty(0, dtype=getattr(torch, dtype)).element_size() / 2**30
        row["load_s"], row["load_rss"] = measure([LOAD, str(work / "base")])
        for verify in ("true", "false"):
            out = work / f"merged-{verify}"
            args = [MERGE, f"checkpoint={run}", f"output={out}", f"merge.verify={verify}"]
            args.append("merge.max_shard_size=1GB")
            wall, rss = measure(args)
            record = json.loads((out / "lrft_merge.json").read_text())
            row[f"verify_{verify}"] = {"wall_s": wall, "merge_s": record["seconds"], "rss": rss}
            if verify == "true":
                row["max_logit_diff"], row["tolerance"] = record["max_logit_diff"], record["tolerance"]
                row["shards"] = len(list(out.glob("*.safetensors")))
            shutil.rmtree(out)
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict], machine: str) -> str:
    lines = [
        f"Measured on {machine}; bases in {rows[0]['dtype']}, LoRA r=16 on every linear layer.",
        "",
        "| model | params | weights | load only: peak RSS | merge: wall (in-merge) | merge: peak RSS "
        "| + verify: wall | + verify: peak RSS | max logit diff (tolerance) | shards |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        off, on = r["verify_false"], r["verify_true"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:,.0f} M | {r['model_gib']:.2f} GiB "
            f"| {r['load_rss']:.2f} GiB "
            f"| {off['wall_s']:.1f} s ({off['merge_s']:.1f} s) | {off['rss']:.2f} GiB "
            f"| {on['wall_s']:.1f} s | {on['rss']:.2f} GiB "
            f"| {r['max_logit_diff']:.2g} ({r['tolerance']:.2g}) | {r['shards']} |"
        )
    return "\n".join(lines)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--sizes", default="tiny,0.1B,0.5B,1B", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--root", default=tempfile.gettempdir(), help="where the checkpoints are written")
    parser.add_argument("--write", help="markdown file whose table between the bench markers is replaced")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for size in args.sizes.split(","):
        rows.append(bench(size, args.dtype, Path(args.root)))
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    text = table(rows, machine)
    print(text)
    if args.write:
        doc = Path(args.write).read_text()
        head, _, rest = doc.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        Path(args.write).write_text(f"{head}{MARK_START}\n{text}\n{MARK_END}{tail}")


if __name__ == "__main__":
    main()
