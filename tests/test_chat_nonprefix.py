"""Issue 23: chat templates that are not prefix-stable (they rewrite earlier turns, as Qwen3 drops
the <think> blocks of assistant turns before the last user turn). With {% generation %} marks the
whole conversation is one example labelled by the marks; without, one example per assistant turn,
rendered as the template renders it at inference; broken even per turn is a clear UserError."""

import json

import pytest
import torch

from lrft.cli.main import main
from lrft.data import encode_rows, load_rows
from lrft.data.chat import CHATML, encode_conversation
from lrft.errors import UserError
from lrft.model.load import byte_tokenizer
from tests.test_chat_data import CHAT, TAGGED, dcfg, label_text, write


def qwen3_like(marked: bool = False) -> str:
    """Qwen3's template (tools left out): reasoning is split off at '</think>'; assistant turns after
    the last user turn show their <think> block (the last one always, empty or not), earlier ones
    drop it. ``marked``: each reply (after its header, through <|im_end|>) in {% generation %}."""
    start, end = ("{%- generation %}", "{%- endgeneration %}") if marked else ("", "")
    return (
        "{%- set ns = namespace(last_query=-1) %}"
        "{%- for message in messages %}{%- if message.role == 'user' %}"
        "{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
        "{%- for message in messages %}"
        "{%- if message.role != 'assistant' %}"
        "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
        "{%- else %}{%- set content = message.content %}{%- set reasoning = '' %}"
        "{%- if '</think>' in content %}"
        "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
        "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
        "{{- '<|im_start|>assistant\n' }}"
        + start
        + "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
        "{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content }}"
        "{%- else %}{{- content }}{%- endif %}"
        "{{- '<|im_end|>' }}" + end + "{{- '\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    )


QWEN3_LIKE, MARKED = qwen3_like(), qwen3_like(marked=True)
# the generation prompt is not a prefix of the reply's render, with it or without it
BROKEN = (
    "{%- for m in messages %}{{- '[' + m.role + loop.length|string + ']' + m.content }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '[assistant]' }}{%- endif %}"
)
THINKING = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "<think>\n\n</think>\n\nwelcome"},
]


def tokenizer(template: str):
    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


def test_qwen3_like_template_gives_one_example_per_assistant_turn(tmp_path, capsys):
    tok = tokenizer(QWEN3_LIKE)
    with pytest.raises(UserError, match="prefix by prefix"):  # the one-example path cannot locate them
        encode_conversation(tok, THINKING)
    path = tmp_path / "t.jinja"
    path.write_text(QWEN3_LIKE)
    examples = encode_rows(
        [{"messages": THINKING}], dcfg(chat_template=str(path), max_length=2048), "causal", tok
    )
    ends = [i + 1 for i, m in enumerate(THINKING) if m["role"] == "assistant"]
    assert len(examples) == len(ends) == 3
    answers = [("add them", "4"), ("again", "6"), ("", "welcome")]
    for ex, end, (reasoning, answer) in zip(examples, ends, answers, strict=True):
        # the input is the template's own render of the conversation up to that turn
        rendered = tok.apply_chat_template(THINKING[:end], tokenize=False)
        assert tok.decode(ex["input_ids"]) == rendered
        # the loss is on that turn only: its <think> block, answer and end marker
        turn = f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>"
        assert label_text(tok, ex["input_ids"], ex["labels"]) == [turn]
    # earlier turns appear as the template rewrites them: their <think> blocks are gone
    assert "add them" not in tok.decode(examples[2]["input_ids"])
    err = capsys.readouterr().err
    assert "chat template is not prefix-stable: one example per assistant turn" in err
    assert "(1 conversations -> 3 examples)" in err
    # a single-turn conversation renders prefix by prefix: one example, as before, no note
    one = encode_rows([{"messages": THINKING[:3]}], dcfg(), "causal", tok)
    assert len(one) == 1 and "prefix-stable" not in capsys.readouterr().err


def test_prefix_stable_rows_beside_rewritten_ones_keep_their_one_example():
    tok = tokenizer(QWEN3_LIKE)
    plain = [THINKING[1], {"role": "assistant", "content": "4"}]  # one assistant turn: stable
    examples = encode_rows(
        [{"messages": plain}, {"messages": THINKING}], dcfg(max_length=2048), "causal", tok
    )
    assert len(examples) == 4
    assert (examples[0]["input_ids"], examples[0]["labels"]) == encode_conversation(tok, plain)


def test_truncation_per_turn_drops_earlier_exchanges_keeps_the_turn():
    tok = tokenizer(QWEN3_LIKE)
    full = encode_rows([{"messages": THINKING}], dcfg(max_length=2048), "causal", tok)
    limit = len(full[0]["input_ids"]) + 10  # the first turn fits; the later ones must shed exchanges
    cut = encode_rows([{"messages": THINKING}], dcfg(max_length=limit), "causal", tok)
    assert len(cut) == 3 and all(len(ex["input_ids"]) <= limit for ex in cut)
    last = tok.decode(cut[2]["input_ids"])
    assert last.startswith("<|im_start|>system\nBe brief.") and "2+2?" not in last
    assert label_text(tok, cut[2]["input_ids"], cut[2]["labels"]) == [
        "<think>\n\n</think>\n\nwelcome<|im_end|>"
    ]


def test_generation_marks_label_the_whole_conversation_in_one_example(capsys):
    tok = tokenizer(MARKED)
    assert tok.apply_chat_template(THINKING, tokenize=False) == tokenizer(QWEN3_LIKE).apply_chat_template(
        THINKING, tokenize=False
    )  # the marks change no character
    examples = encode_rows([{"messages": THINKING}], dcfg(max_length=2048), "causal", tok)
    assert len(examples) == 1
    ref = tok.apply_chat_template(
        THINKING, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, labels = examples[0]["input_ids"], examples[0]["labels"]
    assert ids == list(ref["input_ids"])
    assert [lab != -100 for lab in labels] == [bool(m) for m in ref["assistant_masks"]]
    assert label_text(tok, ids, labels) == [
        "4<|im_end|>",
        "6<|im_end|>",
        "<think>\n\n</think>\n\nwelcome<|im_end|>",
    ]
    assert "chat template has generation marks" in capsys.readouterr().err


def test_marks_on_a_prefix_stable_template_give_the_same_example_as_without():
    marked = encode_rows([{"messages": CHAT}], dcfg(), "causal", tokenizer(TAGGED))
    assert len(marked) == 1
    assert (marked[0]["input_ids"], marked[0]["labels"]) == encode_conversation(tokenizer(CHATML), CHAT)


def test_a_template_broken_even_per_turn_names_the_file_and_row(tmp_path, capsys):
    path = write(tmp_path / "c.jsonl", [{"messages": THINKING[1:5]}, {"messages": THINKING[1:3]}])
    d = dcfg(data_files={"train": str(path), "validation": str(path)})
    tok = tokenizer(BROKEN)
    with pytest.raises(UserError, match=r"row 1: .*not even one assistant turn") as err:
        encode_rows(load_rows(d, "train"), d, "causal", tok)
    assert str(path) in str(err.value)
    # through the CLI: exit 2 with the same message, no traceback
    template = tmp_path / "broken.jinja"
    template.write_text(BROKEN)
    code = main([
        "train", "model=tiny_llama", "dataset=chat", f"dataset.data_files.train={path}",
        f"dataset.data_files.validation={path}", f"dataset.chat_template={template}",
        f"dataset.cache_dir={tmp_path / 'c'}", f"output_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and f"{path}, row 1" in err and "not even one assistant turn" in err
    assert "Traceback" not in err


def test_lrft_train_with_a_qwen3_like_template_file_reports_the_expansion(tmp_path, capsys):
    template = tmp_path / "qwen3.jinja"
    template.write_text(QWEN3_LIKE)
    rows = [
        {"messages": [
            {"role": "user", "content": f"Shout {w}"},
            {"role": "assistant", "content": f"<think>\nloud {w}\n</think>\n\n{w.upper()}"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": f"<think>\nstill {w}\n</think>\n\n{w.upper()}!"},
        ]}
        for w in ["cat", "dog", "sun", "map"] * 3
    ]  # fmt: skip
    data = write(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "run"
    torch.set_num_threads(1)
    code = main([
        "train", "model=tiny_llama", "dataset=chat", f"dataset.data_files.train={data}",
        f"dataset.chat_template={template}", "dataset.eval_holdout=2", f"dataset.cache_dir={tmp_path / 'c'}",
        "trainer.max_steps=2", "trainer.batch_size=4", "trainer.progress=false", f"output_dir={out}",
    ])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0, err
    assert "not prefix-stable: one example per assistant turn (10 conversations -> 20 examples)" in err
    assert "(2 conversations -> 4 examples)" in err  # the held-out rows too
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["n"] == 4 and torch.isfinite(torch.tensor(summary["eval"]["loss"]))
    assert summary["steps"] == 2 and (out / "final" / "chat_template.jinja").read_text() == QWEN3_LIKE
