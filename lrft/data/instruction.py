"""Instruction data (alpaca schema: ``instruction``, optional ``input``, ``output``) and its prompts."""

from __future__ import annotations

from typing import Any

from lrft.errors import UserError, did_you_mean

REQUIRED = ("instruction", "output")
OPTIONAL = ("input",)
COLUMNS = ("instruction", "input", "output")

# The Stanford Alpaca prompts (https://github.com/tatsu-lab/stanford_alpaca), verbatim, so that
# models tuned with them behave as the Alpaca recipe expects.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "plain")


def build_prompt(row: dict[str, Any], template: str) -> str:
    """The prompt a model sees before the response; the response itself is never part of it."""
    instruction, inp = row["instruction"], row.get("input") or ""
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
        return fmt.format(instruction=instruction, input=inp)
    if template == "plain":
        return f"{instruction}\n{inp}\n" if inp else f"{instruction}\n"
    raise UserError(f"Unknown dataset.prompt_template '{template}'.{did_you_mean(template, TEMPLATES)}")


def check_instruction_row(record: Any) -> tuple[dict[str, str] | None, str | None, str]:
    """Normalise one record to ``{instruction, input, output}``.

    Returns (row, None, "") when valid, else (None, column, problem) for the caller to report with
    the file and row number.
    """
    if not isinstance(record, dict):
        return None, None, f"expected an object with columns, got {type(record).__name__}"
    row: dict[str, str] = {}
    for col in REQUIRED:
        if col not in record:
            return None, col, f"missing column '{col}'"
        if record[col] is None:  # issue 24, finding 10: present, but without a value
            return None, col, f"column '{col}' has no value (null, or a short line)"
        if not isinstance(record[col], str):
            return None, col, f"column '{col}' must be a string, got {type(record[col]).__name__}"
        row[col] = record[col]
    inp = record.get("input")
    if inp is not None and not isinstance(inp, str):
        return None, "input", f"column 'input' must be a string, got {type(inp).__name__}"
    row["input"] = inp or ""
    return row, None, ""


def fit(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Shorten prompt + response to ``budget`` tokens, keeping some response to learn from.

    Plain right truncation would leave examples with long prompts with no response at all (no
    loss, NaN for a batch of them). So the response keeps at least a quarter of the budget, and the
    prompt loses its start rather than its end ("### Response:" is what cues the answer).
    """
    if len(prompt) + len(response) <= budget:
        return prompt, response
    keep_response = min(len(response), max(1, budget // 4))
    keep_prompt = min(len(prompt), budget - keep_response)
    prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt > 0 else []
    return prompt, response[: budget - keep_prompt]
