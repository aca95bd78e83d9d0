"""``lrft generate`` and ``lrft chat``: what a trained run (or a merged folder, or a base model) answers.

The run's own prompt format is applied automatically, read from its config.yaml: the chat template
its tokenizer was trained with (dataset=chat), the Alpaca or plain prompt (instruction data).
Generation stops at EOS and at the template's end-of-turn marker, so it answers the way training
taught it to. Greedy unless ``temperature > 0``; batches are left-padded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lrft.errors import UserError
from lrft.run.atomic import check_file_output, publish_file

FORMATS = ("auto", "chat", "alpaca", "plain")


@dataclass
class GenModel:
    name_or_path: str | None = None  # a merged export or any causal LM folder / hub id
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class GenerateConfig:
    """What ``lrft generate`` / ``lrft chat`` run on and how (configs/generate.yaml documents each)."""

    checkpoint: str | None = None
    model: GenModel = field(default_factory=GenModel)
    prompt: str | None = None
    system: str | None = None
    input_file: str | None = None
    output_file: str | None = None
    overwrite: bool = False  # replace an existing output_file (never the input_file)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    prompt_format: str = "auto"
    chat_template: str | None = None
    device: str = "auto"
    stream: bool = True


@dataclass
class Generator:
    """A loaded model with its tokenizer and prompt format, ready to answer rows."""

    model: nn.Module
    tokenizer: Any
    fmt: str  # chat | alpaca | plain
    device: torch.device
    stops: list[str]  # end-of-turn strings that are not single tokens (cut from the text)
    eos_ids: list[int]

    def inputs(self, row: dict[str, Any], system: str | None = None) -> list[int]:
        """The prompt's token ids, exactly as training rendered prompts."""
        tok = self.tokenizer
        if self.fmt == "chat":
            messages = row_messages(row, system)
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        from lrft.data.instruction import build_prompt

        prompt = build_prompt(row_instruction(row), self.fmt)
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return head + list(tok(prompt, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def answer(self, prompts: list[list[int]], cfg: GenerateConfig, streamer: Any = None) -> list[str]:
        """Generate for a batch of prompt ids (left-padded); returns the decoded answers."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        kw: dict[str, Any] = dict(
            max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=pad
        )
        if cfg.temperature > 0:
            kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.stops:
            kw.update(stop_strings=self.stops, tokenizer=self.tokenizer)
        torch.manual_seed(cfg.seed)
        out = self.model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kw)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [cut_at_stop(t, self.stops).strip() for t in texts]


def row_messages(row: dict[str, Any], system: str | None = None) -> list[dict[str, str]]:
    if row.get("messages") is not None:
        messages = list(row["messages"])
    else:
        messages = [{"role": "user", "content": _user_text(row)}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def row_instruction(row: dict[str, Any]) -> dict[str, str]:
    if row.get("instruction") is not None:
        return {"instruction": row["instruction"], "input": row.get("input") or ""}
    if row.get("messages") is not None:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        return {"instruction": users[-1], "input": ""}
    return {"instruction": row["prompt"], "input": ""}


def _user_text(row: dict[str, Any]) -> str:
    if row.get("prompt") is not None:
        return row["prompt"]
    inp = row.get("input") or ""
    return f"{row['instruction']}\n\n{inp}" if inp else row["instruction"]


def check_prompt_row(record: Any, where: str) -> dict[str, Any]:
    """A batch row must hold ``prompt``, ``messages`` or Alpaca's ``instruction`` (+ ``input``)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with 'prompt', 'messages' or 'instruction'.")
    for key in ("prompt", "instruction"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise UserError(f"{where}: '{key}' must be text, got {type(record[key]).__name__}.")
    if record.get("messages") is not None:
        from lrft.data.chat import ROLES

        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: messages[{i}] needs a role ({', '.join(ROLES)}) and text content.")
    elif record.get("prompt") is None and record.get("instruction") is None:
        raise UserError(f"{where}: no 'prompt', 'messages' or 'instruction' key.")
    return record


def stop_markers(tokenizer: Any, template: str | None) -> tuple[list[int], list[str]]:
    """(ids to stop at, end-of-turn strings that are not single tokens: cut from the text)."""
    from lrft.data.chat import end_of_turn_tokens

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    strings = []
    for marker in end_of_turn_tokens(tokenizer, template):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.decode([tid]) == marker:
            ids.append(tid)
        else:
            strings.append(marker)
    return list(dict.fromkeys(ids)), strings


def cut_at_stop(text: str, stops: list[str]) -> str:
    for s in stops:
        if s in text:
            text = text[: text.index(s)]
    return text


def run_prompt_format(run_cfg: Any) -> str:
    """The prompt format a run trained with: chat (its template), alpaca or plain."""
    d = run_cfg.dataset
    if d.kind == "preference":
        return _preference_format(d)
    return "chat" if d.kind == "chat" else str(getattr(d, "prompt_template", None) or "plain")


def _preference_format(d: Any) -> str:
    """Preference rows trained as prompt + completion text (plain: no template), or as messages
    rendered with the chat template (chat); the training file's first row says which. A file that
    is gone reads as plain."""
    from lrft.data.files import iter_rows

    files = (d.get("data_files") or {}).get("train") if hasattr(d, "get") else None
    path = files if isinstance(files, str) or files is None else next(iter(files), None)
    if not path:
        return "plain"
    try:
        _number, row = next(iter(iter_rows(path)), (0, None))
    except Exception:  # moved or unreadable: generation still works, plainly
        return "plain"
    return "chat" if isinstance(row, dict) and isinstance(row.get("prompt"), list) else "plain"


def generation_defaults(model: nn.Module, tokenizer: Any) -> None:
    """Make the model's generation config stop where lrft generate stops (a merged folder then
    answers the same under plain transformers): EOS plus the chat template's end-of-turn token."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    ids, _ = stop_markers(tokenizer, getattr(tokenizer, "chat_template", None))
    if ids:
        gc.eos_token_id = ids if len(ids) > 1 else ids[0]
    if gc.pad_token_id is None and tokenizer.pad_token_id is not None:
        gc.pad_token_id = tokenizer.pad_token_id


def load_generator(cfg: GenerateConfig) -> Generator:
    """The model (a run's final state, or a folder / hub id), its tokenizer and prompt format."""
    from lrft.evaluate.run import place

    if cfg.prompt_format not in FORMATS:
        from lrft.errors import did_you_mean

        raise UserError(
            f"prompt_format={cfg.prompt_format!r} is not valid.{did_you_mean(cfg.prompt_format, FORMATS)}"
        )
    if bool(cfg.checkpoint) == bool(cfg.model.name_or_path):
        raise UserError("Say what to run: checkpoint=RUN_DIR (a training run) or model.name_or_path=DIR.")
    if cfg.checkpoint:
        model, tokenizer, fmt, template = _from_run(cfg)
    else:
        model, tokenizer, fmt, template = _from_folder(cfg)
    if cfg.prompt_format != "auto":
        fmt = cfg.prompt_format
    if fmt == "chat":
        from lrft.data.chat import install_template

        # the tokenizer's own (a run saves the one it trained with), unless one is named here
        if cfg.chat_template or not getattr(tokenizer, "chat_template", None):
            install_template(tokenizer, cfg.chat_template or template)
        template = tokenizer.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids, strings = stop_markers(tokenizer, template if fmt == "chat" else None)
    device = place(model, cfg.device)
    return Generator(model.eval(), tokenizer, fmt, device, strings, ids)


def _from_run(cfg: GenerateConfig) -> tuple[nn.Module, Any, str, str | None]:
    from lrft.run.final import load_run
    from lrft.run.output import resolve_run

    where = Path(cfg.checkpoint).expanduser()
    if not where.is_dir():
        what = "is a file: give the run folder" if where.is_file() else "folder not found"
        raise UserError(f"checkpoint={cfg.checkpoint}: {what}.")
    run = load_run(resolve_run(Path(cfg.checkpoint).expanduser()))
    if run.cfg.model.task != "causal":
        raise UserError(
            f"{cfg.checkpoint} trained a {run.cfg.model.task} model: lrft generate runs causal LMs."
        )
    fmt = run_prompt_format(run.cfg)
    return run.model, run.tokenizer, fmt, getattr(run.cfg.dataset, "chat_template", None)


def _from_folder(cfg: GenerateConfig) -> tuple[nn.Module, Any, str, str | None]:
    from lrft.model.load import load_model, load_tokenizer
    from lrft.model.resolve import checkpoint_config, checkpoint_name
    from lrft.schema import ModelConfig

    where = str(cfg.model.name_or_path)
    config = checkpoint_config(where, cfg.model.revision, cfg.model.trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{where} is an encoder-decoder model: lrft generate runs causal LMs.")
    mcfg = OmegaConf.structured(ModelConfig(name=checkpoint_name(where), task="causal", **vars(cfg.model)))
    tokenizer = load_tokenizer(mcfg)
    model = load_model(mcfg)
    merged = Path(where).expanduser() / "lrft_merge.json"
    fmt = json.loads(merged.read_text()).get("prompt_format") if merged.is_file() else None
    return model, tokenizer, fmt or ("chat" if getattr(tokenizer, "chat_template", None) else "plain"), None


def read_prompts(path: str) -> list[dict[str, Any]]:
    from lrft.data.files import read_rows

    return [check_prompt_row(rec, f"{path}, row {n}") for n, rec in read_rows(path)]


def run_generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """One prompt (streamed to stdout) or a batch file (rows + ``response`` into ``output_file``)."""
    if bool(cfg.prompt) == bool(cfg.input_file):
        raise UserError('Give prompt="..." or input_file=prompts.jsonl (with output_file=out.jsonl).')
    rows = [{"prompt": cfg.prompt}] if cfg.prompt else read_prompts(cfg.input_file)  # before loading
    if cfg.input_file and not cfg.output_file:
        raise UserError("input_file= needs output_file=out.jsonl (where the responses go).")
    if cfg.output_file:  # before the model loads: a refused output costs nothing
        check_file_output(Path(cfg.output_file), **_output_rules(cfg))
    gen = load_generator(cfg)
    if cfg.prompt:
        streamer = StopStreamer(gen.tokenizer, gen.stops) if cfg.stream else None
        answer = gen.answer([gen.inputs(rows[0], cfg.system)], cfg, streamer)[0]
        if streamer is None:
            print(answer)
        out = [{**rows[0], "response": answer}]
        if not cfg.output_file:
            return out
    else:
        out = []
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start : start + cfg.batch_size]
            answers = gen.answer([gen.inputs(r, cfg.system) for r in batch], cfg)
            out += [{**r, "response": a} for r, a in zip(batch, answers, strict=True)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    path = publish_file(
        Path(cfg.output_file), lambda tmp: tmp.write_text(text, encoding="utf-8"), **_output_rules(cfg)
    )
    print(f"{len(out)} responses written to {path}", file=sys.stderr)
    return out


def _output_rules(cfg: GenerateConfig) -> dict[str, Any]:
    return dict(overwrite=cfg.overwrite, flag="overwrite=true", reads=(cfg.input_file,))


class StopStreamer:
    """Prints new text to stdout as it comes (like transformers' TextStreamer), holding back what may
    be the start of an end-of-turn string so that the marker itself is never printed."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        from transformers import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.inner.on_finalized_text = self._text  # type: ignore[method-assign]
        self.stops, self.held, self.done = stops, "", False

    def put(self, value: torch.Tensor) -> None:
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()

    def _text(self, text: str, stream_end: bool = False) -> None:
        if self.done:
            return
        self.held += text
        cut = cut_at_stop(self.held, self.stops)
        if cut != self.held:
            self.done = True
            sys.stdout.write(cut)
            self.held = ""
        elif not stream_end:
            hold = 0  # the longest tail that may still grow into a stop string
            for stop in self.stops:
                for k in range(min(len(stop) - 1, len(self.held)), 0, -1):
                    if self.held.endswith(stop[:k]):
                        hold = max(hold, k)
                        break
            sys.stdout.write(self.held[: len(self.held) - hold])
            self.held = self.held[len(self.held) - hold :]
        else:
            sys.stdout.write(self.held)
            self.held = ""
        if stream_end or self.done:
            sys.stdout.write("\n")
        sys.stdout.flush()
