"""Chat data: conversations rendered with the model's own chat template, loss on the assistant turns.

Rows hold ``messages: [{role, content}, ...]`` (OpenAI style) or ShareGPT's ``conversations:
[{from, value}, ...]`` (mapped: human -> user, gpt -> assistant), with an optional ``system`` column.

The label mask is exact token by token because it is read off the rendered text itself: for each
assistant turn ``i`` the template renders ``messages[:i]`` with the generation prompt and
``messages[:i+1]``; what the second adds to the first is exactly what the model must produce (its
content and the end-of-turn token). The whole conversation is tokenized once, and a token is a label
when its characters overlap one of those assistant spans: a BPE token that straddles the boundary
(``"\n "`` before a reply that starts with a space) carries assistant text, so it is learned, which
is also what transformers' ``return_assistant_tokens_mask`` marks. This needs no generation tags in
the template, so it works with every template that renders conversations prefix by prefix.

Two other paths, chosen per conversation (:func:`encode_chat`), cover templates that are not
prefix-stable (Qwen3 drops the ``<think>`` blocks of assistant turns before the last user turn;
some insert the date): a template with ``{% generation %}`` marks states its own assistant tokens,
so transformers' ``return_assistant_tokens_mask`` labels the whole conversation in one example;
without marks, each assistant turn becomes an example of its own, the conversation up to that turn
rendered exactly as the template renders it at inference, with the loss on that turn only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lrft.data.templates import CHATML, NAMED_TEMPLATES  # noqa: F401  (CHATML: re-exported)
from lrft.errors import UserError, did_you_mean

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}

# the named templates (chatml, qwen, llama3, gemma, mistral, phi3) live in lrft.data.templates
# end-of-turn markers of common templates: generation stops at them as well as at EOS
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")
Pair = tuple[list[int], list[int]]  # (input_ids, labels) of one example


class NotPrefixStable(UserError):
    """The template rewrites earlier turns: :func:`encode_chat` then encodes turn by turn."""


def check_chat_row(record: Any) -> tuple[dict[str, Any] | None, str | None, str]:
    """Normalise one record to ``{"messages": [{"role", "content"}, ...]}``.

    Returns (row, None, "") when valid, else (None, key, problem) for the caller to report with the
    file and row number.
    """
    if not isinstance(record, dict):
        return None, None, f"expected an object with a 'messages' list, got {type(record).__name__}"
    if record.get("messages") is not None:
        key, turns, role_key, text_key, roles = "messages", record["messages"], "role", "content", ROLES
    elif record.get("conversations") is not None:
        key, turns, role_key, text_key = "conversations", record["conversations"], "from", "value"
        roles = tuple(SHAREGPT_ROLES)
    else:
        return None, "messages", "missing key 'messages' (or ShareGPT 'conversations')"
    if not isinstance(turns, list) or not turns:
        return None, key, f"'{key}' must be a non-empty list of turns"
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            return None, where, f"{where} must be an object with '{role_key}' and '{text_key}'"
        role, content = turn.get(role_key), turn.get(text_key)
        if role not in roles:
            return (
                None,
                f"{where}.{role_key}",
                f"{where}: unknown role {role!r}.{did_you_mean(str(role), roles)}",
            )
        if not isinstance(content, str):
            got = "missing" if content is None else type(content).__name__
            return None, f"{where}.{text_key}", f"{where}.{text_key} must be text, got {got}"
        messages.append(
            {"role": SHAREGPT_ROLES[role] if key == "conversations" else role, "content": content}
        )
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            return None, "system", f"column 'system' must be text, got {type(system).__name__}"
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        return None, key, "the conversation has no assistant turn (nothing to learn from)"
    return {"messages": messages}, None, ""


def resolve_template(tokenizer: Any, choice: str | None) -> str:
    """The Jinja chat template to use: the tokenizer's own (``choice`` null), a named one, or a file."""
    if choice:
        if choice in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[choice]
        path = Path(choice).expanduser()
        if not path.is_file():
            names = ", ".join(NAMED_TEMPLATES)
            raise UserError(
                f"dataset.chat_template={choice}: not a named template ({names}) nor a Jinja file."
            )
        return path.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError(
            "The tokenizer has no chat template: set dataset.chat_template=chatml (or another named "
            "one: " + ", ".join(n for n in NAMED_TEMPLATES if n != "chatml") + "), or "
            "dataset.chat_template=PATH to a Jinja file."
        )
    return template if isinstance(template, str) else template.get("default", next(iter(template.values())))


def install_template(tokenizer: Any, choice: str | None) -> str:
    """Set the resolved template on the tokenizer: the run's saved tokenizer (and a merged folder)
    then renders chats exactly as training did, with plain transformers too."""
    template = resolve_template(tokenizer, choice)
    tokenizer.chat_template = template
    return template


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja's TemplateError, or raise_exception() inside the template
        raise UserError(f"The chat template cannot render this conversation: {err}") from None


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the full render) that the assistant turns produce."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1])
        start = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        if not upto.startswith(start):  # a template whose generation prompt is not a prefix
            start = render(tokenizer, messages[:i]) if i else ""
        if not (text.startswith(upto) and upto.startswith(start)):
            raise NotPrefixStable(
                "The chat template does not render a conversation prefix by prefix (it rewrites earlier "
                "turns), so the assistant tokens cannot be located: use another template "
                "(dataset.chat_template=chatml or a Jinja file)."
            )
        end = len(upto.rstrip())  # whitespace after the end-of-turn token is never generated
        if end > len(start):
            spans.append((len(start), end))
    return spans


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> Pair:
    """(input_ids, labels) of one conversation: labels are the ids on assistant spans, -100 elsewhere."""
    text = render(tokenizer, messages)
    return label_spans(tokenizer, text, assistant_spans(tokenizer, messages, text))


def label_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> Pair:
    """``text`` tokenized once; a token is a label when its characters overlap one of ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (s, e) in enumerate(enc["offset_mapping"]):
        if any((s < b and e > a) if e > s else a <= s < b for a, b in spans):
            labels[k] = ids[k]
    return ids, labels


def encode_marked(tokenizer: Any, messages: list[dict[str, str]]) -> Pair:
    """One conversation labelled by the template's own ``{% generation %}`` marks: they hold even
    where the template rewrites earlier turns, since the whole conversation renders once."""
    try:
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as err:  # jinja's TemplateError, or raise_exception() inside the template
        raise UserError(f"The chat template cannot render this conversation: {err}") from None
    ids = [int(i) for i in enc["input_ids"]]
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, enc["assistant_masks"], strict=True)]
    if all(x == IGNORE_INDEX for x in labels):
        raise UserError(
            "The chat template's {% generation %} marks cover no token of this conversation: mark "
            "each assistant turn's content and end-of-turn token."
        )
    return ids, labels


def encode_last_turn(tokenizer: Any, messages: list[dict[str, str]]) -> Pair:
    """The conversation rendered as the template renders it at inference (earlier turns as it
    rewrites them), loss on its last assistant turn only: what the render adds after the prompt
    (``messages[:-1]`` with the generation prompt), which must be a prefix of it."""
    text = render(tokenizer, messages)
    head = messages[:-1]
    start = render(tokenizer, head, generation_prompt=True) if head else ""
    if not text.startswith(start):  # a template whose generation prompt is not a prefix
        start = render(tokenizer, head) if head else ""
    if not text.startswith(start):
        raise UserError(
            "The chat template does not render a conversation prefix by prefix, not even one "
            "assistant turn after its own prompt, so the assistant tokens cannot be located: use "
            "another template (dataset.chat_template=chatml or a Jinja file), or mark the assistant "
            "turns with {% generation %} ... {% endgeneration %}."
        )
    end = len(text.rstrip())  # whitespace after the end-of-turn token is never generated
    return label_spans(tokenizer, text, [(len(start), end)] if end > len(start) else [])


def fit(
    encode: Callable[[Any, list[dict[str, str]]], Pair],
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_length: int,
) -> Pair:
    """``encode(tokenizer, messages)`` within ``max_length``: whole earlier exchanges go first
    (system turns stay), then the one left is cut (:func:`cut`)."""
    ids, labels = encode(tokenizer, messages)
    while len(ids) > max_length:
        shorter = drop_first_exchange(messages)
        if shorter is None:
            break
        messages = shorter
        ids, labels = encode(tokenizer, messages)
    return cut(ids, labels, max_length)


def encode_row(tokenizer: Any, messages: list[dict[str, str]], max_length: int, marked: bool) -> list[Pair]:
    """The examples of one conversation: one, unless the template is not prefix-stable on it and
    has no generation marks; then one per assistant turn (:func:`encode_last_turn`)."""
    if marked:
        return [fit(encode_marked, tokenizer, messages, max_length)]
    try:
        return [fit(encode_conversation, tokenizer, messages, max_length)]
    except NotPrefixStable:
        ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
        return [fit(encode_last_turn, tokenizer, messages[:end], max_length) for end in ends]


def has_generation_marks(template: str | None) -> bool:
    return bool(template) and GENERATION_MARK.search(template) is not None


def encode_chat(
    rows: list[dict[str, Any]], dcfg: Any, tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """Encode chat rows; installs the resolved template on ``tokenizer`` (see :func:`install_template`).

    Too long: whole earlier exchanges go first (system turns stay), then the one left is cut. A row
    may give several examples (one per assistant turn, :func:`encode_row`); which path was taken is
    said once per call (:func:`chat_note`), unless the caller reports for the whole dataset.
    """
    template = install_template(tokenizer, getattr(dcfg, "chat_template", None))
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "dataset=chat needs a fast tokenizer (character offsets locate the assistant tokens)."
        )
    marked = has_generation_marks(template)
    out = []
    for row in rows:
        try:
            pairs = encode_row(tokenizer, row["messages"], max_length, marked)
        except UserError as err:
            where = row.get("_where")
            raise UserError(f"{where}: {err}" if where else str(err)) from None
        out += [{"input_ids": ids, "labels": labels} for ids, labels in pairs]
    if _NOTES["on"]:
        note = chat_note(template, len(rows), len(out))
        if note:
            say(note)
    return out


_NOTES = {"on": True}


@contextmanager
def notes_off() -> Iterator[None]:
    """No :func:`chat_note` from :func:`encode_chat` inside: the cached pipeline encodes in batches
    (and once for the column types) and says the note once, for the whole dataset."""
    before = _NOTES["on"]
    _NOTES["on"] = False
    try:
        yield
    finally:
        _NOTES["on"] = before


def chat_note(template: str | None, conversations: int, examples: int) -> str | None:
    """The one line that says which path labelled the data, or None for the plain one."""
    if has_generation_marks(template):
        return (
            "chat template has generation marks: assistant tokens from its {% generation %} marks "
            f"({conversations} conversations)"
        )
    if examples > conversations:
        return (
            "chat template is not prefix-stable: one example per assistant turn "
            f"({conversations} conversations -> {examples} examples)"
        )
    return None


def say(text: str) -> None:
    """A note on stderr, from the first process only (as :mod:`lrft.data.load` says its notes)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        from rich.console import Console

        Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def drop_first_exchange(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """Without its oldest user/assistant exchange (leading system turns kept); None when only the
    last exchange with an assistant turn is left."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    body = messages[head:]
    first_reply = next((i for i, m in enumerate(body) if m["role"] == "assistant"), None)
    if first_reply is None:
        return None
    rest = body[first_reply + 1 :]
    if not any(m["role"] == "assistant" for m in rest):
        return None
    return messages[:head] + rest


def cut(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut one conversation to ``max_length`` tokens, keeping assistant tokens to learn from: the end
    goes, unless that would leave no label; then the start goes so the first reply sits at 3/4."""
    if len(ids) <= max_length:
        return ids, labels
    first = next((k for k, x in enumerate(labels) if x != IGNORE_INDEX), 0)
    start = (
        0 if first < max_length - max(1, max_length // 4) else first - (max_length - max(1, max_length // 4))
    )
    return ids[start : start + max_length], labels[start : start + max_length]


def end_of_turn_tokens(tokenizer: Any, template: str | None) -> list[str]:
    """The end-of-turn markers the template writes (generation stops at each)."""
    if not template:
        return []
    return [t for t in END_OF_TURN if t in template]
