"""Preference pairs, in TRL's two standard shapes, encoded for a causal LM.

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``; the completion follows the prompt
  as plain text (BOS first, EOS after the completion, as instruction data);
- conversational: ``{"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}``,
  rendered with the model's chat template (``dataset.chat_template`` for a tokenizer without one).

KTO's unpaired shape, standard or conversational: ``{"prompt", "completion", "label": bool}``. Its
example holds the sequence (``input_ids``, ``labels``), ``desirable`` (1/0), and a mismatched row
(``kl_input_ids``, ``kl_labels``): the same prompt with the completion of the row before it in
the same encode chunk (cyclic; TRL pairs within a micro-batch the same way), which KTO's KL
estimate needs. Being fixed at encode time, the pairing does not change with the batch split.

An encoded pair holds the chosen sequence (``input_ids``, ``labels``) and the rejected one
(``rejected_input_ids``, ``rejected_labels``); labels are -100 on the prompt, so the loss and the
log-probabilities count completion tokens only. The two stay one example, so they always land in
the same micro-batch (:class:`~lrft.data.collate.Collator` stacks chosen rows, then rejected).
"""

from __future__ import annotations

from typing import Any

from lrft.data.chat import ROLES, install_template, render
from lrft.data.instruction import fit
from lrft.errors import UserError

IGNORE_INDEX = -100
EXPECTED = (
    "prompt, chosen, rejected: three strings (standard), or prompt a list of {role, content} messages "
    "and chosen / rejected lists of assistant messages (conversational); for objective=kto: prompt, "
    "completion (strings, or message lists) and label (true: a good completion, false: a bad one)"
)


def _check_unpaired(record: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, str]:
    for col in ("prompt", "completion", "label"):
        if record.get(col) is None:
            missing = col not in record
            return None, col, f"missing column '{col}'" if missing else f"column '{col}' has no value"
    if not isinstance(record["label"], bool):
        return None, "label", f"column 'label' must be true or false, got {record['label']!r}"
    pair = {"prompt": record["prompt"], "chosen": record["completion"], "rejected": record["completion"]}
    row, col, problem = check_preference_row(pair)
    if row is None:
        col = "completion" if col in ("chosen", "rejected") else col
        return None, col, problem.replace("'chosen'", "'completion'").replace("chosen[", "completion[")
    return {k: record[k] for k in ("prompt", "completion", "label")}, None, ""


def check_preference_row(record: Any) -> tuple[dict[str, Any] | None, str | None, str]:
    """Normalise one record to ``{prompt, chosen, rejected}`` (strings, or message lists).

    Returns (row, None, "") when valid, else (None, column, problem) for the caller to report with
    the file and row number.
    """
    if not isinstance(record, dict):
        return None, None, f"expected an object with prompt, chosen and rejected, got {type(record).__name__}"
    if "completion" in record and "chosen" not in record:
        return _check_unpaired(record)
    for col in ("prompt", "chosen", "rejected"):
        if col not in record:
            return None, col, f"missing column '{col}'"
        if record[col] is None:
            return None, col, f"column '{col}' has no value (null, or a short line)"
    prompt = record["prompt"]
    if isinstance(prompt, str):
        for col in ("chosen", "rejected"):
            if not isinstance(record[col], str):
                got = type(record[col]).__name__
                return None, col, f"column '{col}' must be text when the prompt is text, got {got}"
        return {k: record[k] for k in ("prompt", "chosen", "rejected")}, None, ""
    if not isinstance(prompt, list) or not prompt:
        return (
            None,
            "prompt",
            f"column 'prompt' must be text or a non-empty message list, got {type(prompt).__name__}",
        )
    for col in ("prompt", "chosen", "rejected"):
        value = record[col]
        if not isinstance(value, list) or not value:
            return None, col, f"column '{col}' must be a non-empty message list when the prompt is one"
        for i, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, col, f"{col}[{i}] needs a role ({', '.join(ROLES)}) and text content"
            if col != "prompt" and m["role"] != "assistant":
                return None, col, f"{col}[{i}] has role {m['role']!r}: completions are assistant messages"
    return {k: record[k] for k in ("prompt", "chosen", "rejected")}, None, ""


def encode_preference(
    rows: list[dict[str, Any]], dcfg: Any, tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """Encode pairs (or KTO rows); conversational rows install the resolved chat template on
    ``tokenizer``."""
    _same_shape(rows)
    if any(isinstance(r["prompt"], list) for r in rows):
        install_template(tokenizer, getattr(dcfg, "chat_template", None))
    if rows and "completion" in rows[0]:
        return _encode_unpaired(rows, tokenizer, max_length)
    out = []
    for row in rows:
        chosen, rejected = _encode_pair(tokenizer, row, row, max_length)
        out.append(
            {
                "input_ids": chosen[0],
                "labels": chosen[1],
                "rejected_input_ids": rejected[0],
                "rejected_labels": rejected[1],
            }
        )
    return out


Seq = tuple[list[int], list[int]]


def _encode_pair(
    tokenizer: Any, row: dict[str, Any], pair: dict[str, Any], max_length: int
) -> tuple[Seq, Seq]:
    """``pair``'s two sequences (plain text or rendered messages, as ``row``'s prompt is); a
    problem names ``row``'s file and row."""
    try:
        encode = _plain if isinstance(row["prompt"], str) else _conversational
        return encode(tokenizer, pair, max_length)
    except UserError as err:
        where = row.get("_where")
        raise UserError(f"{where}: {err}" if where else str(err)) from None


def _same_shape(rows: list[dict[str, Any]]) -> None:
    """One file, one shape: pairs or labelled completions, plain text or messages (a KTO row's
    mismatched completion comes from another row, so it must be of its kind)."""

    def shape(row: dict[str, Any]) -> tuple[str, ...]:
        if "completion" not in row:
            return ("chosen/rejected pairs",)  # a pair is encoded alone: text and messages may mix
        return ("labelled completions", "message lists" if isinstance(row["prompt"], list) else "text")

    first = shape(rows[0]) if rows else None
    for row in rows[1:]:
        if shape(row) != first:
            where = row.get("_where", "a row")
            raise UserError(
                f"{where}: this row holds {' of '.join(shape(row))}, and the first row "
                f"{' of '.join(first)}: a preference file holds one shape."
            )


def _encode_unpaired(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        other = rows[i - 1]["completion"]  # row 0 takes the chunk's last completion
        pair = {"prompt": row["prompt"], "chosen": row["completion"], "rejected": other}
        seq, mismatched = _encode_pair(tokenizer, row, pair, max_length)
        out.append(
            {
                "input_ids": seq[0],
                "labels": seq[1],
                "kl_input_ids": mismatched[0],
                "kl_labels": mismatched[1],
                "desirable": int(row["label"]),
            }
        )
    return out


def _plain(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[Seq, Seq]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    prompt = list(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    chosen = list(tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]) + tail
    rejected = list(tokenizer(row["rejected"], add_special_tokens=False)["input_ids"]) + tail
    budget = max_length - len(head)
    # one prompt for both: cut as the longer completion needs it, then each completion to fit
    prompt, _ = fit(prompt, max(chosen, rejected, key=len), budget)
    room = budget - len(prompt)
    return _seq(head + prompt, chosen[:room]), _seq(head + prompt, rejected[:room])


def _seq(prompt: list[int], completion: list[int]) -> Seq:
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def _conversational(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[Seq, Seq]:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("conversational preference data needs a fast tokenizer (character offsets).")
    start = render(tokenizer, row["prompt"], generation_prompt=True)
    pair = []
    for col in ("chosen", "rejected"):
        text = render(tokenizer, [*row["prompt"], *row[col]])
        if not text.startswith(start):
            raise UserError(
                "the chat template does not render the prompt as a prefix of prompt + completion, so "
                "the completion tokens cannot be located: use another template (dataset.chat_template)."
            )
        end = len(text.rstrip())  # whitespace after the end-of-turn token is never generated
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            ids[k] if (e > len(start) and s < end) else IGNORE_INDEX
            for k, (s, e) in enumerate(enc["offset_mapping"])
        ]
        pair.append(_cut(ids, labels, max_length))
    return pair[0], pair[1]


def _cut(ids: list[int], labels: list[int], max_length: int) -> Seq:
    """Too long: the prompt loses its start (the completion keeps at least a quarter)."""
    if len(ids) <= max_length:
        return ids, labels
    first = next((k for k, y in enumerate(labels) if y != IGNORE_INDEX), len(ids))
    prompt, completion = fit(ids[:first], ids[first:], max_length)
    keep = len(completion)
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + labels[first : first + keep]
