"""``lrft generate`` / ``lrft chat`` CLIs: compose configs/generate.yaml, run; bad input exits 2."""

from __future__ import annotations

import re
import sys
from typing import Any

from omegaconf import OmegaConf

from lrft.errors import EXIT_USAGE, UserError
from lrft.export.generate import GenerateConfig, StopStreamer, load_generator, run_generate

TEXT_KEYS = ("prompt", "system")  # free text: taken verbatim, not parsed as Hydra values


def quote_text(arg: str) -> str:
    """``prompt=Hello, world`` would be a Hydra sweep (the comma) or a list (brackets): quote the text
    so it arrives as typed. Already-quoted values pass through."""
    key, _, value = arg.partition("=")
    if key not in TEXT_KEYS or value[:1] in ("'", '"'):
        return arg
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # escape quotes (and the
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)  # backslashes before them / at the end)
    return f"{key}='{value}'"


def compose_generate(argv: list[str]) -> GenerateConfig:
    from omegaconf.errors import OmegaConfBaseException

    from lrft.config.compose import compose

    cfg = compose([quote_text(a) for a in argv], "generate")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(GenerateConfig), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise UserError(f"Invalid value for {key}: {str(err).splitlines()[0]}") from None
    out = OmegaConf.to_object(typed)
    if out.max_new_tokens < 1 or out.batch_size < 1:
        raise UserError("max_new_tokens and batch_size must be >= 1.")
    if not out.temperature >= 0:  # issue 24, finding 7
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {out.temperature}.")
    if not 0.0 < out.top_p <= 1.0:
        raise UserError(f"top_p is a probability mass in (0, 1], got {out.top_p}.")
    return out


def run_chat(cfg: GenerateConfig, stdin: Any = None) -> list[dict[str, str]]:
    """Multi-turn chat on the terminal: each line is a user turn; /reset clears, /exit or EOF ends."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    stdin = stdin or sys.stdin
    gen = load_generator(cfg)
    if gen.fmt != "chat":
        err.print(
            f"[yellow]note:[/] this model uses the {gen.fmt} prompt, not a chat template: "
            "each line is answered on its own"
        )
    messages: list[dict[str, str]] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    err.print("[bold]lrft chat[/]: type a message; /reset starts over, /exit (or Ctrl-D) quits")
    while True:
        err.print("[bold cyan]you>[/] ", end="")
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = messages[:1] if cfg.system else []
            continue
        messages.append({"role": "user", "content": text})
        row = {"messages": messages} if gen.fmt == "chat" else {"prompt": text}
        streamer = StopStreamer(gen.tokenizer, gen.stops) if cfg.stream else None
        err.print("[bold green]assistant>[/] ", end="")
        answer = gen.answer([gen.inputs(row)], cfg, streamer)[0]
        if streamer is None:
            print(answer, flush=True)
        messages.append({"role": "assistant", "content": answer})
    return messages


def _main(argv: list[str], chat: bool) -> int:
    name = "chat" if chat else "generate"
    if any(a in ("-h", "--help") for a in argv):
        from lrft.config.compose import config_dir

        print(f"usage: lrft {name} checkpoint=RUN_DIR | model.name_or_path=DIR [key=value ...]\n")
        print((config_dir() / "generate.yaml").read_text())
        return 0
    try:
        cfg = compose_generate(argv)
        if chat:
            run_chat(cfg)
        else:
            run_generate(cfg)
    except UserError as err:
        from lrft.run.output import say

        say(f"[bold red]error:[/] {err}")
        return EXIT_USAGE
    return 0


def generate_main(argv: list[str]) -> int:
    return _main(argv, chat=False)


def chat_main(argv: list[str]) -> int:
    return _main(argv, chat=True)
