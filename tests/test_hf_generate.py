"""model=hf on saved checkpoints, the checkpoint's own tokenizer, and lrft generate / chat on a run."""

import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from lrft.cli.generate import run_chat
from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.data.chat import CHATML
from lrft.export.generate import GenerateConfig, GenModel, StopStreamer, run_generate
from lrft.export.merge import merge_run
from lrft.model.load import byte_tokenizer, load_tokenizer
from lrft.model.targets import LLAMA_LIKE
from lrft.train import train

TINY = {
    "llama": dict(
        vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "bert": dict(
        vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    ),
    "t5": dict(
        vocab_size=261, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0
    ),
}  # fmt: skip
AUTO = {"llama": AutoModelForCausalLM, "bert": AutoModelForMaskedLM, "t5": AutoModelForSeq2SeqLM}


def checkpoint(folder: Path, arch: str, template: str | None = None) -> Path:
    """A saved random checkpoint with the byte tokenizer (and a chat template when given)."""
    torch.manual_seed(0)
    AUTO[arch].from_config(AutoConfig.for_model(arch, **TINY[arch])).save_pretrained(folder)
    tok = byte_tokenizer("roberta" if arch == "bert" else arch)
    if template:
        tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


def chats(path: Path, n: int = 24) -> Path:
    words = ["cat", "dog", "sun", "map"]
    rows = [
        {"messages": [{"role": "user", "content": f"Shout {w}"}, {"role": "assistant", "content": w.upper()}]}
        for w in words * (n // 4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hf_infers_task_targets_and_run_name(tmp_path, capsys):
    llama = checkpoint(tmp_path / "My-Llama", "llama", CHATML)
    cfg = compose(
        ["model=hf", f"model.name_or_path={llama}", "dataset=chat", "dataset.data_files.train=x.jsonl"]
    )
    assert (cfg.model.task, list(cfg.model.target_modules), cfg.model.name) == (
        "causal",
        LLAMA_LIKE,
        "My-Llama",
    )
    assert cfg.model.dtype == "auto" and cfg.output_dir.endswith("_My-Llama")
    assert "task causal (llama); target modules q_proj" in capsys.readouterr().err
    bert = checkpoint(tmp_path / "bert", "bert")
    cfg = compose(["model=hf", f"model.name_or_path={bert}", "dataset=glue/sst2"])
    assert (cfg.model.task, list(cfg.model.target_modules)) == ("classification", ["query", "value"])
    t5 = checkpoint(tmp_path / "t5", "t5")
    assert compose(["model=hf", f"model.name_or_path={t5}", "dataset=glue/sst2"]).model.task == "seq2seq"
    # an override wins, and an encoder cannot train on chat data
    cfg = compose(
        ["model=hf", f"model.name_or_path={llama}", "model.target_modules=[q_proj]", "dataset=chat"]
    )
    assert list(cfg.model.target_modules) == ["q_proj"]
    with pytest.raises(Exception, match="encoder-only"):
        compose(["model=hf", f"model.name_or_path={bert}", "dataset=chat"])


def test_missing_folder_is_named_not_a_hub_error(tmp_path, capsys):
    code = main(["train", "model=hf", f"model.name_or_path={tmp_path}/nope", "dataset=chat"])
    assert code == 2 and "folder not found" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_checkpoint_tokenizer_wins_and_a_too_big_one_is_refused(tmp_path):
    llama = checkpoint(tmp_path / "llama", "llama", CHATML)
    cfg = compose(["model=tiny_llama", f"model.name_or_path={llama}"])
    assert load_tokenizer(cfg.model).chat_template == CHATML  # the folder's, not the built-in byte one
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    with pytest.raises(Exception, match=r"261 tokens .* 200 embedding rows"):
        load_tokenizer(cfg.model)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chat")
    run_dir = tmp / "run"
    data = chats(tmp / "chats.jsonl")
    # model=hf on a saved checkpoint whose tokenizer carries the chat template
    model = checkpoint(tmp / "tiny-chat", "llama", CHATML)
    overrides = [
        "model=hf", f"model.name_or_path={model}", "dataset=chat", f"dataset.data_files.train={data}",
        "trainer.max_steps=4", "trainer.batch_size=4", "trainer.progress=false", "method=lora",
        f"output_dir={run_dir}",
    ]  # fmt: skip
    torch.set_num_threads(1)
    train(compose(overrides), run_dir)
    return run_dir


def test_generate_batch_keeps_rows_and_matches_single_prompts(chat_run, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Shout cat", "id": 1},
        {"messages": [{"role": "user", "content": "Shout dog"}]},
        {"instruction": "Shout", "input": "sun"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cfg = GenerateConfig(
        checkpoint=str(chat_run), input_file=str(prompts), output_file=str(out), max_new_tokens=8
    )
    got = [json.loads(x) for x in out.read_text().splitlines()] if run_generate(cfg) else []
    assert [{k: v for k, v in r.items() if k != "response"} for r in got] == rows
    assert all(isinstance(r["response"], str) and "<|im_end|>" not in r["response"] for r in got)
    # left padding changes nothing: each answer equals its own unbatched, streamed generation
    capsys.readouterr()
    single = run_generate(GenerateConfig(checkpoint=str(chat_run), prompt="Shout cat", max_new_tokens=8))
    assert single[0]["response"] == got[0]["response"]
    assert capsys.readouterr().out.strip() == got[0]["response"]


def test_merged_folder_answers_the_same_with_plain_transformers(chat_run, tmp_path):
    merged = tmp_path / "merged"
    merge_run(chat_run, merged)
    assert json.loads((merged / "lrft_merge.json").read_text())["prompt_format"] == "chat"
    lrft = run_generate(
        GenerateConfig(model=GenModel(name_or_path=str(merged)), prompt="Shout map", max_new_tokens=8)
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template == CHATML
    model = AutoModelForCausalLM.from_pretrained(merged)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Shout map"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    plain = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert plain.split("<|im_end|>")[0].strip() == lrft[0]["response"]


def test_chat_reads_turns_from_stdin(chat_run, capsys):
    cfg = GenerateConfig(checkpoint=str(chat_run), max_new_tokens=4, stream=False)
    messages = run_chat(cfg, io.StringIO("Shout cat\n\n/reset\nShout dog\nShout sun\n"))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Shout dog", "Shout sun"]
    assert capsys.readouterr().out.count("\n") == 3  # one printed answer per user line


def test_bad_generate_input_exits_2_and_writes_nothing(chat_run, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out.jsonl"
    assert main(["generate", f"checkpoint={chat_run}", f"input_file={empty}", f"output_file={out}"]) == 2
    assert "empty" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["generate", f"checkpoint={chat_run}", f"input_file={bad}", f"output_file={out}"]) == 2
    assert "bad.jsonl, row 2" in capsys.readouterr().err and not out.exists()
    assert main(["generate", f"checkpoint={tmp_path}/missing", "prompt=hi"]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_streamer_never_prints_the_end_of_turn_marker(capsys):
    s = StopStreamer(byte_tokenizer(), ["<|im_end|>"])
    for piece in ["HEL", "LO<|im", "_end|>", "junk"]:
        s._text(piece)
    assert capsys.readouterr().out == "HELLO\n"


def test_eval_scores_the_rows_training_held_out(chat_run, tmp_path):
    summary = json.loads((chat_run / "summary.json").read_text())
    assert summary["eval"]["n"] == 1  # 5 % of 24 rows
    assert main(["eval", f"checkpoint={chat_run}", f"output_dir={tmp_path}", "progress=false"]) == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["results"]["validation"]["metrics"]["loss"] == pytest.approx(
        summary["eval"]["loss"], rel=1e-4
    )


@pytest.mark.parametrize("text", ["Hello, world", "it's [a] {b} \\n ok?", "ends with \\", "k=v: x"])
def test_prompt_text_arrives_verbatim(text):
    from lrft.cli.generate import compose_generate

    assert compose_generate(["checkpoint=RUN", f"prompt={text}"]).prompt == text
