import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from lrft.config import DataFiles, DatasetConfig
from lrft.data import Collator, encode_rows
from lrft.data.glue import GLUE_TASKS
from lrft.evaluate import evaluate_model
from lrft.evaluate.core import _wrong
from lrft.models import byte_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls gain nothing from threads; on a busy machine their spin-waits made this file 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "car", "road", "book", "lamp"]


def glue_cfg(subset: str) -> DatasetConfig:
    return DatasetConfig(name=subset, kind="glue", subset=subset, data_files=DataFiles(), max_length=64)


def instr_cfg() -> DatasetConfig:
    return DatasetConfig(
        name="i", kind="instruction", data_files=DataFiles(), max_length=64, prompt_template="plain"
    )


def mrpc_rows(n: int = 10) -> list[dict]:
    return [
        {"sentence1": f"the {WORDS[i % 12]} is here", "sentence2": f"a {WORDS[(i * 5) % 12]}", "label": i % 2}
        for i in range(n)
    ]


def instr_rows(n: int = 9) -> list[dict]:
    return [
        {"instruction": "Reverse the word.", "input": WORDS[i], "output": WORDS[i][::-1]} for i in range(n)
    ]


def tiny_roberta(num_labels: int = 2):
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=261,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return AutoModelForSequenceClassification.from_config(config)


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=261,
        d_model=32,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        d_kv=16,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=261,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def run(model, tok, examples, cfg, task, batch_size=4):
    return evaluate_model(model, tok, examples, cfg, task, batch_size=batch_size, device="cpu")


def test_classification_keys_determinism_and_train_mode_restored():
    tok, model = byte_tokenizer("roberta"), tiny_roberta()
    cfg = glue_cfg("mrpc")
    examples = encode_rows(mrpc_rows(), cfg, "classification", tok)
    model.train()
    first = run(model, tok, examples, cfg, "classification")
    assert model.training
    assert set(first) == {"accuracy", "f1", "loss", "n"} and first["n"] == 10
    assert 0.0 <= first["accuracy"] <= 1.0 and first["loss"] > 0
    assert run(model, tok, examples, cfg, "classification", batch_size=3) == pytest.approx(first)
    model.eval()
    run(model, tok, examples, cfg, "classification")
    assert not model.training


def test_forced_logits_give_perfect_scores(monkeypatch):
    tok, model = byte_tokenizer("roberta"), tiny_roberta()
    cfg = glue_cfg("mrpc")
    rows = mrpc_rows()
    for row in rows:  # the label is readable from the first byte: "y..." -> 1, "n..." -> 0
        row["sentence1"] = ("yes " if row["label"] else "no ") + row["sentence1"]
    examples = encode_rows(rows, cfg, "classification", tok)
    yes = tok("y", add_special_tokens=False)["input_ids"][0]

    def forward(input_ids=None, attention_mask=None, **kw):
        positive = (input_ids[:, 1] == yes).float()
        return SequenceClassifierOutput(logits=torch.stack([1 - positive, positive], dim=-1) * 10)

    monkeypatch.setattr(model, "forward", forward)
    result = run(model, tok, examples, cfg, "classification")
    assert result["accuracy"] == 1.0 and result["f1"] == 1.0 and result["n"] == 10
    assert result["loss"] < 1e-3


def test_regression_head_stsb():
    tok, model = byte_tokenizer("roberta"), tiny_roberta(num_labels=1)
    cfg = glue_cfg("stsb")
    rows = [{"sentence1": w, "sentence2": w[::-1], "label": i * 0.4} for i, w in enumerate(WORDS)]
    result = run(model, tok, encode_rows(rows, cfg, "classification", tok), cfg, "classification")
    assert set(result) == {"pearson", "spearmanr", "loss", "n"} and result["n"] == 12
    assert all(math.isfinite(v) for v in result.values())


def test_seq2seq_glue_generation_and_invalid_count():
    tok, model = byte_tokenizer("t5"), tiny_t5()
    cfg = glue_cfg("mrpc")
    examples = encode_rows(mrpc_rows(), cfg, "seq2seq", tok)
    model.train()
    first = run(model, tok, examples, cfg, "seq2seq")
    assert model.training
    assert set(first) == {"accuracy", "f1", "invalid", "loss", "n"} and first["n"] == 10
    # an untrained model generates byte soup: every answer is invalid, and invalid counts as wrong
    assert first["invalid"] == 10 and first["accuracy"] == 0.0
    assert run(model, tok, examples, cfg, "seq2seq", batch_size=3) == pytest.approx(first)


def test_seq2seq_glue_valid_generations_are_scored(monkeypatch):
    tok, model = byte_tokenizer("t5"), tiny_t5()
    cfg = glue_cfg("mrpc")
    examples = encode_rows(mrpc_rows(4), cfg, "seq2seq", tok)  # refs: 0, 1, 0, 1
    answers = ["equivalent", " not_equivalent ", "maybe", "Equivalent"]
    seen = {}

    def generate(input_ids=None, attention_mask=None, **kw):
        seen.update(kw)
        return torch.zeros(len(input_ids), 1, dtype=torch.long)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(tok, "batch_decode", lambda out, **kw: answers[: len(out)])
    result = run(model, tok, examples, cfg, "seq2seq", batch_size=4)
    # preds: 1 (wrong), 0 (wrong), invalid (wrong), 1 (right; case does not matter)
    assert result["invalid"] == 1 and result["accuracy"] == 0.25
    assert seen["max_new_tokens"] >= len("not_equivalent") + 1 and seen["do_sample"] is False


def test_wrong_prediction_is_always_wrong():
    for task in ("mnli", "rte", "cola"):
        spec = GLUE_TASKS[task]
        assert all(_wrong(ref, spec) != ref for ref in range(spec.num_labels))
    stsb = GLUE_TASKS["stsb"]
    assert _wrong(4.0, stsb) == 0.0 and _wrong(1.0, stsb) == 5.0 and _wrong(2.5, stsb) == 0.0


def test_seq2seq_instruction_loss():
    tok, model = byte_tokenizer("t5"), tiny_t5()
    cfg = instr_cfg()
    examples = encode_rows(instr_rows(), cfg, "seq2seq", tok)
    result = run(model, tok, examples, cfg, "seq2seq")
    assert set(result) == {"loss", "perplexity", "n"} and result["n"] == 9
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    one_batch = Collator(tok, "seq2seq")(examples)  # one batch: HF's mean over tokens is the same number
    model.eval()
    with torch.no_grad():
        assert result["loss"] == pytest.approx(model(**one_batch).loss.item(), rel=1e-5)
    assert run(model, tok, examples, cfg, "seq2seq", batch_size=2) == pytest.approx(result)


def test_causal_loss_is_token_weighted_and_matches_hf():
    tok, model = byte_tokenizer("llama"), tiny_llama()
    cfg = instr_cfg()
    examples = encode_rows(instr_rows(), cfg, "causal", tok)
    model.train()
    result = run(model, tok, examples, cfg, "causal", batch_size=2)
    assert model.training
    assert set(result) == {"loss", "perplexity", "n"} and result["n"] == 9
    model.eval()
    with torch.no_grad():
        hf = model(**Collator(tok, "causal")(examples)).loss.item()
    assert result["loss"] == pytest.approx(hf, rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(261), rel=0.1)  # untrained: near uniform
    assert run(model, tok, examples, cfg, "causal", batch_size=5) == pytest.approx(result)


def test_empty_examples():
    tok, model = byte_tokenizer("llama"), tiny_llama()
    assert run(model, tok, [], instr_cfg(), "causal") == {"n": 0}
