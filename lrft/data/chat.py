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
"""

from __future__ import annotations

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
            raise UserError(
                "The chat template does not render a conversation prefix by prefix (it rewrites earlier "
                "turns), so the assistant tokens cannot be located: use another template "
                "(dataset.chat_template=chatml or a Jinja file)."
            )
        end = len(upto.rstrip())  # whitespace after the end-of-turn token is never generated
        if end > len(start):
            spans.append((len(start), end))
    return spans


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: labels are the ids on assistant spans, -100 elsewhere."""
    text = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (s, e) in enumerate(enc["offset_mapping"]):
        if any((s < b and e > a) if e > s else a <= s < b for a, b in spans):
            labels[k] = ids[k]
    return ids, labels


def encode_chat(
    rows: list[dict[str, Any]], dcfg: Any, tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """Encode chat rows; installs the resolved template on ``tokenizer`` (see :func:`install_template`).

    Too long: whole earlier exchanges go first (system turns stay), then the one left is cut.
    """
    install_template(tokenizer, getattr(dcfg, "chat_template", None))
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "dataset=chat needs a fast tokenizer (character offsets locate the assistant tokens)."
        )
    out = []
    for row in rows:
        messages = row["messages"]
        try:
            ids, labels = encode_conversation(tokenizer, messages)
            while len(ids) > max_length:
                shorter = drop_first_exchange(messages)
                if shorter is None:
                    break
                messages = shorter
                ids, labels = encode_conversation(tokenizer, messages)
        except UserError as err:
            where = row.get("_where")
            raise UserError(f"{where}: {err}" if where else str(err)) from None
        ids, labels = cut(ids, labels, max_length)
        out.append({"input_ids": ids, "labels": labels})
    return out


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
