"""Load a model and tokenizer for a task: causal LM, sequence classification, or text-to-text.

Real models come through ``from_pretrained`` (hub id or local folder, dtype, device map); the tiny
ones are built at random from a config with a byte-level tokenizer made in code, so they need no
download at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrft.errors import UserError
from lrft.model.dtypes import TORCH_DTYPES
from lrft.model.resolve import looks_like_path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]  # ids 0..4, then the 256 bytes


def byte_tokenizer(style: str = "llama") -> Any:
    """A byte-level tokenizer (261 ids) that needs no file: every text encodes, one id per byte.

    ``style`` sets the special-token template: ``llama`` (``<s> A``), ``roberta``
    (``<s> A </s></s> B </s>``) or ``t5`` (``A </s>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    ids = {t: vocab[t] for t in SPECIALS}
    templates = {
        "llama": ("<s> $A", "<s> $A $B"),
        "roberta": ("<s> $A </s>", "<s> $A </s> </s> $B </s>"),
        "t5": ("$A </s>", "$A </s> $B </s>"),
    }
    if style not in templates:
        raise ValueError(f"unknown tokenizer style {style!r}")
    single, pair = templates[style]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, ids[t]) for t in ("<s>", "</s>")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        padding_side="right",
    )


def _auto_class(task: str) -> Any:
    import transformers as tf

    return {
        "causal": tf.AutoModelForCausalLM,
        "classification": tf.AutoModelForSequenceClassification,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
    }[task]


def head_kwargs(task: str, num_labels: int | None) -> dict[str, Any]:
    """Config kwargs for the task head: label count, and regression for one label (STS-B)."""
    if task != "classification" or num_labels is None:
        return {}
    kw: dict[str, Any] = {"num_labels": num_labels}
    if num_labels == 1:
        kw["problem_type"] = "regression"
    return kw


def load_tokenizer(mcfg: Any) -> Any:
    """The model's tokenizer, with a pad token (causal LMs often lack one: reuse EOS).

    A checkpoint's own tokenizer wins whenever ``name_or_path`` is set: a model fed another
    tokenizer's ids is silently wrong (``model.tokenizer`` only serves folders that ship none).
    A tokenizer with more ids than the model's embedding rows is refused, naming both sizes.
    """
    from transformers import AutoTokenizer

    source = mcfg.tokenizer
    if (mcfg.name_or_path and has_tokenizer(str(mcfg.name_or_path))) or (mcfg.name_or_path and not source):
        source = mcfg.name_or_path
    if source is None or source == "byte":
        tok = byte_tokenizer(mcfg.arch or "llama")
    else:
        from lrft.model.hub import require_hub  # offline: one message now, not a minute of retries

        require_hub(
            source, "model.tokenizer" if mcfg.tokenizer else "model.name_or_path", revision=mcfg.revision
        )
        try:
            tok = AutoTokenizer.from_pretrained(
                source, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot load the tokenizer from '{source}': {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    check_vocab(tok, mcfg, str(source))
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "spiece.model")


def has_tokenizer(name_or_path: str) -> bool:
    """A local folder holding tokenizer files, or a hub id (which is assumed to ship one)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return any((folder / f).is_file() for f in TOKENIZER_FILES)
    return not looks_like_path(name_or_path)


def embedding_rows(mcfg: Any) -> int | None:
    """The model's vocabulary size from its config (no weights loaded), or None when unknown."""
    if mcfg.name_or_path:
        config = Path(str(mcfg.name_or_path)).expanduser() / "config.json"
        if not config.is_file():
            return None
        data = json.loads(config.read_text())
        size = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
        return int(size) if size else None
    size = dict(mcfg.from_config or {}).get("vocab_size")
    return int(size) if size else None


def check_vocab(tokenizer: Any, mcfg: Any, source: str) -> None:
    """Refuse a tokenizer whose ids would index past the embedding matrix."""
    rows = embedding_rows(mcfg)
    if rows is not None and len(tokenizer) > rows:
        raise UserError(
            f"The tokenizer from '{source}' has {len(tokenizer)} tokens but model "
            f"'{mcfg.name_or_path or mcfg.name}' has {rows} embedding rows: its ids would not fit. "
            "Use the checkpoint's own tokenizer (model.tokenizer=FOLDER) or a model built for this one."
        )


def load_model(mcfg: Any, num_labels: int | None = None, qcfg: Any = None) -> nn.Module:
    """Build the model for ``mcfg.task``: ``from_pretrained`` when ``name_or_path`` is set,
    else random init from ``from_config`` (the offline tiny models)."""
    from transformers import AutoConfig

    auto = _auto_class(mcfg.task)
    kw = head_kwargs(mcfg.task, num_labels)
    if mcfg.name_or_path:
        load_kw: dict[str, Any] = dict(
            revision=mcfg.revision,
            trust_remote_code=mcfg.trust_remote_code,
            dtype="auto" if mcfg.dtype == "auto" else TORCH_DTYPES[mcfg.dtype],
            **kw,
        )
        if mcfg.device_map:
            load_kw["device_map"] = mcfg.device_map
        if mcfg.attn_implementation:
            load_kw["attn_implementation"] = mcfg.attn_implementation
        quantized = qcfg is not None and qcfg.name != "none"
        if quantized:
            from lrft.model.quantization import from_pretrained_kwargs

            load_kw.update(from_pretrained_kwargs(qcfg, mcfg))
        where = str(mcfg.name_or_path)
        if looks_like_path(where) and not Path(where).expanduser().exists():
            raise UserError(f"model.name_or_path={where}: folder not found.")
        from lrft.model.hub import require_hub  # offline: one message now, not a minute of retries

        require_hub(mcfg.name_or_path, "model.name_or_path", revision=mcfg.revision)
        try:
            model = auto.from_pretrained(mcfg.name_or_path, **load_kw)
        except OSError as err:
            raise UserError(
                f"Cannot load model '{mcfg.name_or_path}': {err}\n"
                "Offline? Point model.name_or_path at a local folder, or use a tiny_* model."
            ) from None
        except Exception as err:  # a damaged local weights file (safetensors' own error types)
            if not (looks_like_path(where) and "safetensor" in type(err).__module__.lower() + str(err)):
                raise
            raise UserError(
                f"Cannot read the weights in {where}: {err}. The folder is damaged (a truncated or "
                "partly copied file): copy it again, or retrain if it is a run's base/."
            ) from None
        if quantized:
            from lrft.model.quantization import finish_pretrained

            finish_pretrained(model, mcfg)
        return model
    if not mcfg.arch:
        raise UserError(f"model '{mcfg.name}' builds from_config and needs model.arch (llama, roberta, t5).")
    config = AutoConfig.for_model(mcfg.arch, **dict(mcfg.from_config), **kw)
    if mcfg.attn_implementation:
        config._attn_implementation = mcfg.attn_implementation
    model = auto.from_config(config)
    if mcfg.dtype not in ("float32", "auto"):
        model = model.to(TORCH_DTYPES[mcfg.dtype])
    return quantize(model, mcfg, qcfg)


def quantize(model: nn.Module, mcfg: Any, qcfg: Any) -> nn.Module:
    """Quantize a model built in memory (the random-init tiny ones) as ``qcfg`` says; no-op for none."""
    if qcfg is None or qcfg.name == "none":
        return model
    from lrft.model.quantization import quantize_built

    dtype = TORCH_DTYPES.get(mcfg.dtype, torch.float32)
    return quantize_built(model, _auto_class(mcfg.task), qcfg, mcfg, dtype)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ---------------------------------------------------------------- model=hf: any checkpoint
