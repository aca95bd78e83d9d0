"""``lrft merge``: fold a finished run into its ORIGINAL base weights and write a plain transformers folder.

For each adapted layer the merged weight is ``W_orig + ΔW``, added in float32 and cast once to
``merge.dtype``; ``ΔW = layer.delta()`` is relative to the original base weight for every variant
(see :class:`~lrft.methods.layers.LowRankLinear`). Modules trained in full (a task head) are already
in the rebuilt model; methods that train every weight (``full_weights``) are re-saved as they are.

Memory: the base is loaded once, each layer's delta is added into its weight in place and the
adapter wrapper is dropped, so the peak is about one model plus one layer's float32 temporaries
(measured in docs/merge.md). Everything goes to a hidden sibling folder that is renamed into place
only after the weights are written and (by default) verified: a killed merge leaves no output.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from torch import nn

from lrft.errors import UserError, did_you_mean
from lrft.export.peft import find_adapted
from lrft.methods.base import Method
from lrft.model.dtypes import TORCH_DTYPES
from lrft.model.quantization import dense_weight, is_quantized
from lrft.model.resolve import prequantized_checkpoint
from lrft.run.final import read_run_config
from lrft.run.lock import writing
from lrft.run.output import (
    check_free_space,
    check_plain_keys,
    refuse_inside_run,
    refuse_overlap,
    resolve_run,
    say,
    shard_progress,
    staged_output,
)

BASES = ("original", "dequantized")
# largest |merged - adapter| logit difference accepted, relative to max(1, max |logit|). The merge is
# exact up to the rounding of each weight and activation in the dtype, compounded over the layers:
# a random-init 1B LLaMA in bfloat16 differs by 3.5 % of its largest logit (docs/merge.md)
TOLERANCE = {torch.float32: 5e-4, torch.float16: 2e-2, torch.bfloat16: 0.1}
INT8_RTOL = 0.1  # int8 matmuls also quantize the activations, row by row
PROBE_TEXTS = ["The quick brown fox jumps", "Merged: same logits 42"]  # short: CPU bf16 matmuls are slow


@dataclass
class MergeOptions:
    dtype: str = "auto"  # auto (the original base's dtype) | float32 | bfloat16 | float16
    base: str = "original"  # original: full-precision base | dequantized: the base a quantized run saw
    max_shard_size: str = "2GB"  # safetensors shards past this size
    verify: bool = True  # reload the output and compare logits with the adapter model
    tolerance: float | None = None  # null: by dtype, relative to max(1, max |logit|)
    overwrite: bool = False  # replace an output folder an earlier lrft merge wrote (nothing else)


@dataclass
class MergeJob:
    """Fold a finished run into its original base weights: a plain transformers folder."""

    checkpoint: str = MISSING  # the run folder (RUN_DIR, or RUN_DIR/final)
    output: str = MISSING  # the folder to write
    merge: MergeOptions = field(default_factory=MergeOptions)


@dataclass
class Source:
    """The run's trained model rebuilt on the base the merge starts from, before any folding."""

    model: nn.Module
    tokenizer: Any
    method: Method
    base_path: str
    base_dtype: torch.dtype
    rtol: float  # the unmerged model's own precision (a quantized base: its matmuls), see TOLERANCE
    changed: set[str]  # adapted layers whose base weight the method replaced (PiSSA-style residuals)


def merge_run(checkpoint: str | Path, output: str | Path, opts: MergeOptions | None = None) -> dict[str, Any]:
    """Merge the run at ``checkpoint`` into ``output``; returns what ``lrft_merge.json`` records."""
    opts = opts or MergeOptions()
    _check_options(opts)
    run_dir, output = resolve_run(checkpoint), Path(output).resolve()
    cfg = read_run_config(run_dir)
    refuse_overlap(output, run_dir, cfg.model.name_or_path)
    refuse_inside_run(output, "merge")
    # one lrft writer per output (lrft.run.lock), then: a non-empty output is refused (unless lrft
    # wrote it and overwrite is on) before any loading
    with writing(output, "lrft merge"), staged_output(output, opts.overwrite, "merge.overwrite") as tmp:
        start = time.perf_counter()
        src = load_source(run_dir, cfg, opts.base)
        model, task = src.model, cfg.model.task
        out_dtype = src.base_dtype if opts.dtype == "auto" else TORCH_DTYPES[opts.dtype]
        batch = probe_batch(src.tokenizer, model.config, task)
        reference = logits(model, batch) if opts.verify else None
        n_layers = fold_adapters(model, out_dtype, src.changed, src.base_path, cfg.model.revision)
        dequantize_rest(model, out_dtype)
        model.to(out_dtype)
        check_free_space(output, sum(p.numel() * p.element_size() for p in model.parameters()))
        say(f"merged {n_layers} adapted layers into {src.base_path} ({_name(out_dtype)})")
        from lrft.export.generate import generation_defaults, run_prompt_format

        generation_defaults(model, src.tokenizer)  # stop at the chat template's end-of-turn, as lrft generate
        with shard_progress():
            model.save_pretrained(tmp, max_shard_size=opts.max_shard_size)
        src.tokenizer.save_pretrained(tmp)
        record = {
            "run": str(run_dir),
            "method": src.method.name,
            "base": opts.base,
            "base_model": src.base_path,
            "base_dtype": _name(src.base_dtype),
            "dtype": _name(out_dtype),
            "quantization": str(OmegaConf.select(cfg, "quantization.name", default="none")),
            "adapted_layers": n_layers,
            "prompt_format": run_prompt_format(cfg),  # lrft generate on the folder prompts as the run did
            "verified": False,
        }
        del model, src.model  # the reload below must not hold two models
        gc.collect()
        check_plain_keys(tmp)
        if reference is not None:
            rtol = max(TOLERANCE[out_dtype], src.rtol)
            diff, tol = verify(tmp, task, batch, reference, rtol, opts.tolerance)
            record.update(verified=True, max_logit_diff=diff, tolerance=tol)
        record["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "lrft_merge.json").write_text(json.dumps(record, indent=2) + "\n")
    say(f"wrote {output}")
    return record


def load_source(run_dir: Path, cfg: Any, base: str) -> Source:
    """Load the base (``original``: unquantized, as stored; ``dequantized``: quantized as in training),
    apply the method and load the trained state, exactly as :func:`lrft.run.final.load_run` does."""
    from transformers import AutoTokenizer

    from lrft.data import num_labels
    from lrft.methods import get_method
    from lrft.methods.base import ApplyContext
    from lrft.model.load import load_model
    from lrft.run.final import TRAINABLE, _method_config, load_state

    method = get_method(cfg.method.name)(_method_config(cfg))
    final = run_dir / "final"
    full = method.full_weights
    qcfg = OmegaConf.select(cfg, "quantization")
    quantized = qcfg is not None and qcfg.name != "none"
    mcfg = cfg.model.copy()
    mcfg.device_map = None  # the merge runs on the CPU, where every weight can be edited in place
    if full:
        mcfg.name_or_path = str(final)
    elif mcfg.name_or_path is None:
        if not (run_dir / "base").is_dir():
            raise UserError(f"{run_dir} trained a random-init model but has no saved base ({run_dir}/base).")
        mcfg.name_or_path = str(run_dir / "base")
    if base == "dequantized" and not quantized:
        raise UserError("merge.base=dequantized is for quantized runs; this run's base was not quantized.")
    if base == "original" or full:
        mcfg.dtype, qcfg = "auto", None  # as stored: the full-precision weights
        if prequantized_checkpoint(mcfg):
            raise UserError(
                f"The base checkpoint {mcfg.name_or_path} is stored quantized, so there is no full-precision "
                "base to merge into: use merge.base=dequantized (the base training saw)."
            )
    model = load_model(mcfg, num_labels=num_labels(cfg.dataset), qcfg=qcfg)
    base_dtype = _dominant_dtype(model)
    before = {n: _identity(m.weight) for n, m in model.named_modules() if _has_weight(m)}
    if not full:
        defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
        model = method.apply(model, defaults, ApplyContext(restoring=True))
        method.load_trainable(model, load_state(final / TRAINABLE))
    model.eval()
    # layers whose base the method moved (PiSSA, LoRA-GA residuals): the original is read back from disk
    changed = {n for n, layer in find_adapted(model) if _identity(layer.base_layer.weight) != before.get(n)}
    if base == "dequantized":
        changed = set()  # the layer's own view (dequantized residual + offset) is what training saw
    rtol = TOLERANCE.get(base_dtype, TOLERANCE[torch.bfloat16])
    if qcfg is not None:  # the reference runs the quantized matmuls training ran
        rtol = max(rtol, INT8_RTOL if qcfg.name == "int8" else TOLERANCE[TORCH_DTYPES[qcfg.compute_dtype]])
    tokenizer = AutoTokenizer.from_pretrained(final)
    return Source(model, tokenizer, method, str(mcfg.name_or_path), base_dtype, rtol, changed)


@torch.no_grad()
def fold_adapters(
    model: nn.Module, dtype: torch.dtype, changed: set[str], base_path: str, revision: str | None = None
) -> int:
    """Replace every adapted layer by a plain linear layer holding ``W_orig + ΔW`` in ``dtype``."""
    from lrft.methods.base import replace_module

    originals = OriginalWeights(base_path, revision) if changed else None
    layers = find_adapted(model)
    _refuse_tied(model, [n for n, _ in layers])
    for name, layer in layers:
        base = layer.base_layer
        original = originals.get(f"{name}.weight", tuple(base.weight.shape)) if originals else None
        if original is None:  # the base as it is, plus any offset the layer moved it by
            original = layer.original_weight() if hasattr(layer, "original_weight") else dense_weight(base)
        merged = (original.float() + layer.delta().float()).to(dtype)
        if type(base) is nn.Linear and base.weight.dtype == dtype:
            # in place: the loaded weight's memory (often an mmap of the checkpoint, copied on
            # write) becomes the merged weight, instead of a second copy next to it
            base.weight.data.copy_(merged)
            replace_module(model, name, base)
        else:
            replace_module(model, name, plain_linear(base, merged, dtype))
        del original, merged
    return len(layers)


@torch.no_grad()
def dequantize_rest(model: nn.Module, dtype: torch.dtype) -> None:
    """Turn the remaining bitsandbytes layers into plain ones and drop the quantization config."""
    from lrft.methods.base import replace_module

    for name, module in list(model.named_modules()):
        if is_quantized(module):
            replace_module(model, name, plain_linear(module, dense_weight(module).to(dtype), dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def plain_linear(base: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """``base`` itself when it is an ``nn.Linear`` (keeps its hooks), else a new one with ``weight``."""
    bias = getattr(base, "bias", None)
    if type(base) is nn.Linear:
        layer = base
    else:
        with torch.device("meta"):  # no throwaway random init: both tensors are set right after
            layer = nn.Linear(base.in_features, base.out_features, bias=bias is not None)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


class OriginalWeights:
    """Single tensors of the original base checkpoint, read on demand from its safetensors files."""

    def __init__(self, source: str, revision: str | None = None) -> None:
        from safetensors import safe_open

        folder = Path(source)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, revision=revision, allow_patterns=["*.safetensors"]))
        self.index: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                self.index.update(dict.fromkeys(fh.keys(), path))

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The tensor for ``key`` (a bare backbone's checkpoint may lack the "model." prefix), or None."""
        from safetensors import safe_open

        hits = [k for k in self.index if k == key or key.endswith("." + k)]
        for k in sorted(hits, key=len, reverse=True):
            with safe_open(str(self.index[k]), framework="pt") as fh:
                tensor = fh.get_tensor(k)
            if tuple(tensor.shape) == shape:
                return tensor
        say(f"[yellow]note:[/] {key} not found in the base checkpoint; using the layer's own copy")
        return None


def probe_batch(tokenizer: Any, config: Any, task: str) -> dict[str, torch.Tensor]:
    """A fixed two-row padded batch the merged and the adapter model both see."""
    enc = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=16)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if task == "seq2seq":
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else 0
        first = torch.full((len(PROBE_TEXTS), 1), start, dtype=torch.long)
        batch["decoder_input_ids"] = torch.cat([first, enc["input_ids"][:, :7]], dim=1)
    return batch


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 logits on ``batch``. bitsandbytes layers run in train mode (they have no dropout):
    in eval mode on a CPU with AVX512-BF16 they repack their 4-bit weights in place, rounding the
    block scales, and would then no longer hold the weights training used."""
    quantized = [m for m in model.modules() if is_quantized(m) and not m.training]
    for module in quantized:
        module.train()
    try:
        device = next(model.parameters()).device
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    finally:
        for module in quantized:
            module.eval()


def verify(
    folder: Path,
    task: str,
    batch: dict[str, torch.Tensor],
    reference: torch.Tensor,
    rtol: float,
    tolerance: float | None,
) -> tuple[float, float]:
    """Reload ``folder`` with plain transformers and compare its logits with ``reference``."""
    from lrft.model.load import _auto_class

    model = _auto_class(task).from_pretrained(folder, dtype="auto")
    got = logits(model.eval(), batch)
    del model
    diff = float((got - reference).abs().max())
    tol = tolerance if tolerance is not None else rtol * max(1.0, float(reference.abs().max()))
    say(f"verify: largest logit difference merged vs adapter model {diff:.3g} (tolerance {tol:.3g})")
    if not diff <= tol:  # NaN fails too
        raise UserError(
            f"The merged model's logits differ from the adapter model's by {diff:.4g} (tolerance {tol:.4g}); "
            "nothing was written. merge.tolerance=X accepts a larger difference, merge.verify=false skips it."
        )
    return diff, tol


def _refuse_tied(model: nn.Module, names: list[str]) -> None:
    """Folding into a weight another module shares (tied embeddings) would change that module too."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), []).append(pname)
    for name in names:
        weight = model.get_submodule(name).base_layer.weight
        sharing = [o for o in owners.get(weight.data_ptr(), []) if not o.startswith(name + ".")]
        if sharing:
            raise UserError(f"{name} shares its weight with {sharing[0]} (tied): cannot merge into it.")


def _check_options(opts: MergeOptions) -> None:
    if opts.dtype != "auto" and opts.dtype not in TORCH_DTYPES:
        hint = did_you_mean(opts.dtype, ["auto", *TORCH_DTYPES])
        raise UserError(f"merge.dtype={opts.dtype!r} is not valid.{hint}")
    if opts.base not in BASES:
        raise UserError(f"merge.base={opts.base!r} is not valid.{did_you_mean(opts.base, BASES)}")


def _identity(t: torch.Tensor) -> tuple[int, int, int]:
    # same object, same storage, no in-place write since: the weight is still the original one
    return id(t), t.data_ptr(), t._version


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def _dominant_dtype(model: nn.Module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
