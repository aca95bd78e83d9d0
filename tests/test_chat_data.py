"""dataset=chat: row checks, the assistant label mask token by token, truncation, eval holdout."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lrft.data import encode_rows, load_rows
from lrft.data.chat import CHATML, encode_conversation, install_template
from lrft.errors import UserError
from lrft.model.load import byte_tokenizer
from lrft.schema import DatasetConfig

# ChatML with generation tags: transformers' own return_assistant_tokens_mask is the reference
TAGGED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "2+2?\n"},
    {"role": "assistant", "content": " 4 \n"},
]


def dcfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"name": "chat", "kind": "chat", **kw})


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_text(tok, ids, labels) -> list[str]:
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return [*runs, tok.decode(cur)] if cur else runs


def test_mask_is_exactly_the_assistant_tokens_of_every_turn():
    tok = byte_tokenizer()
    tok.chat_template = TAGGED
    ids, labels = encode_conversation(tok, CHAT)
    assert any(lab == -100 for lab in labels) and any(lab != -100 for lab in labels)
    # the same ids the template gives, and the mask transformers computes from generation tags
    ref = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"]) == encode_conversation(tok, CHAT)[0]
    tok.chat_template = CHATML  # the same text without tags: the mask must not change
    assert encode_conversation(tok, CHAT) == (ids, labels)
    assert [lab != -100 for lab in labels] == [bool(m) for m in ref["assistant_masks"]]
    assert label_text(tok, ids, labels) == ["hello!<|im_end|>", " 4 \n<|im_end|>"]


def test_rows_openai_sharegpt_and_system_column(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        [
            {"messages": CHAT[1:3]},
            {
                "system": "S",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
        ],
    )
    rows = load_rows(dcfg(data_files={"train": str(path), "validation": str(path)}), "train")
    assert rows[0]["messages"] == CHAT[1:3]
    assert rows[1]["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert rows[1]["_where"].endswith("row 2")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"text": "x"}, r"row 2: missing key 'messages'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"row 2: messages\[0\]: unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"row 2: the conversation has no assistant turn"),
        ({"messages": [{"role": "user", "content": 3}]}, r"row 2: messages\[0\].content must be text"),
    ],
)
def test_bad_rows_name_file_row_and_key(tmp_path, row, match):
    path = write(tmp_path / "bad.jsonl", [{"messages": CHAT[1:3]}, row])
    with pytest.raises(UserError, match=match) as err:
        load_rows(dcfg(data_files={"train": str(path), "validation": str(path)}), "train")
    assert str(path) in str(err.value)


def test_no_template_needs_a_named_fallback():
    tok = byte_tokenizer()
    with pytest.raises(UserError, match=r"dataset.chat_template=chatml"):
        encode_rows([{"messages": CHAT}], dcfg(), "causal", tok)
    ex = encode_rows([{"messages": CHAT}], dcfg(chat_template="chatml"), "causal", tok)
    assert tok.chat_template == CHATML  # installed: the run's saved tokenizer renders as training did
    assert label_text(tok, ex[0]["input_ids"], ex[0]["labels"]) == ["hello!<|im_end|>", " 4 \n<|im_end|>"]


def test_a_jinja_file_is_a_template(tmp_path):
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    tok = byte_tokenizer()
    install_template(tok, str(tmp_path / "t.jinja"))
    ids, labels = encode_conversation(tok, CHAT[1:3])
    assert tok.decode(ids) == "[user]hi there[assistant]hello!"
    # no generation prompt in this template: the assistant's header is learned with its content
    assert label_text(tok, ids, labels) == ["[assistant]hello!"]


def test_truncation_drops_earlier_exchanges_keeps_system_then_cuts():
    tok = byte_tokenizer()
    install_template(tok, "chatml")
    long = [
        CHAT[0],
        *[{"role": r, "content": f"{r} turn {i} " * 3} for i in range(4) for r in ("user", "assistant")],
    ]
    full, _ = encode_conversation(tok, long)
    last_two, _ = encode_conversation(tok, [long[0], *long[-2:]])
    ex = encode_rows(
        [{"messages": long}], dcfg(chat_template="chatml", max_length=len(last_two) + 5), "causal", tok
    )
    text = tok.decode(ex[0]["input_ids"])
    assert len(full) > len(last_two) + 5
    assert text.startswith("<|im_start|>system\nBe brief.") and "turn 0" not in text and "turn 3" in text
    cut = encode_rows([{"messages": long}], dcfg(chat_template="chatml", max_length=40), "causal", tok)[0]
    assert len(cut["input_ids"]) == 40 and any(x != -100 for x in cut["labels"])


def test_lone_train_file_holds_out_rows_deterministically(tmp_path, capsys):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(60)
    ]
    path = write(tmp_path / "c.jsonl", rows)
    d = dcfg(data_files={"train": str(path)})
    train, held = load_rows(d, "train"), load_rows(d, "eval")
    assert len(held) == 3 and len(train) == 57  # 5 % of 60
    users = lambda rs: {r["messages"][0]["content"] for r in rs}  # noqa: E731
    assert not users(train) & users(held) and len(users(train) | users(held)) == 60
    assert users(load_rows(d, "eval")) == users(held)  # same rows on every launch
    assert "3 of its 60 rows held out" in capsys.readouterr().err
    assert len(load_rows(dcfg(data_files={"train": str(path)}, eval_holdout=10), "eval")) == 10
    none = dcfg(data_files={"train": str(path)}, eval_holdout=0)
    assert load_rows(none, "eval") == [] and len(load_rows(none, "train")) == 60


@pytest.mark.parametrize(
    ("name", "marker"),
    [("chatml", "<|im_end|>"), ("qwen", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>"),
     ("mistral", "</s>"), ("phi3", "<|end|>")],
)  # fmt: skip
def test_named_templates_learn_exactly_the_assistant_turns_and_stop_at_their_marker(name, marker):
    """Issue 23: the named templates of modern families, for tokenizers that ship none. The labels
    are each assistant turn's text plus the family's end-of-turn marker, nothing of the prompt."""
    from lrft.data.chat import encode_conversation, end_of_turn_tokens, install_template
    from lrft.export.generate import stop_markers
    from lrft.model.load import byte_tokenizer

    tok = byte_tokenizer("llama")
    install_template(tok, name)
    msgs = [{"role": "system", "content": "Be loud."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "HELLO"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "BYE"}]  # fmt: skip
    ids, labels = encode_conversation(tok, msgs)
    learned = "".join(tok.decode([i]) for i, y in zip(ids, labels, strict=True) if y != -100)
    assert learned == f"HELLO{marker}BYE{marker}"
    assert "Be loud." in tok.decode(ids)  # the system message is rendered (Gemma, Mistral: in turn 1)
    # generation stops there: the marker is a stop string, or (Mistral) the EOS token itself
    ids_stop, strings = stop_markers(tok, tok.chat_template)
    assert marker in strings or (marker == tok.eos_token and tok.eos_token_id in ids_stop)
    assert name == "mistral" or end_of_turn_tokens(tok, tok.chat_template) == [marker]
