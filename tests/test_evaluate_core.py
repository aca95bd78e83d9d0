import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import numpy as np
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

from lrft.data import Collator, encode_rows
from lrft.data.glue import GLUE_TASKS
from lrft.evaluate import encode_for_eval, evaluate_model
from lrft.evaluate.causal_glue import PROMPTS, prompt_text
from lrft.evaluate.glue import wrong
from lrft.evaluate.metrics import glue_metrics
from lrft.evaluate.scoring import Request, continuation_requests, score, special_prefix, tokens_after
from lrft.model.load import byte_tokenizer
from lrft.schema import DataFiles, DatasetConfig


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls gain nothing from threads; on a busy machine their spin-waits made this file 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "car", "road", "book", "lamp"]


def glue_cfg(subset: str, max_length: int = 64) -> DatasetConfig:
    return DatasetConfig(
        name=subset, kind="glue", subset=subset, data_files=DataFiles(), max_length=max_length
    )


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


def test_wrong_prediction_is_alwayswrong():
    for task in ("mnli", "rte", "cola"):
        spec = GLUE_TASKS[task]
        assert all(wrong(ref, spec) != ref for ref in range(spec.num_labels))
    stsb = GLUE_TASKS["stsb"]
    assert wrong(4.0, stsb) == 0.0 and wrong(1.0, stsb) == 5.0 and wrong(2.5, stsb) == 0.0


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


# --- causal LMs on GLUE (evaluation only) ---------------------------------------------------------


def sst2_rows(n: int = 10) -> list[dict]:
    return [
        {"sentence": f"the {WORDS[i % 12]} was {'good' if i % 2 else 'bad'}", "label": i % 2}
        for i in range(n)
    ]


def brute_loglik(model, context: list[int], continuation: list[int]) -> float:
    """One unpadded sequence, full logits: what the batched scorer must reproduce."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + continuation])).logits[0].float()
    logp = logits.log_softmax(-1)
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))


def test_prompts_cover_every_task_and_keep_the_label_order():
    assert set(PROMPTS) == set(GLUE_TASKS)
    for name, (template, words) in PROMPTS.items():
        spec = GLUE_TASKS[name]
        assert len(words) == (6 if spec.is_regression else spec.num_labels)
        assert all("{" + f + "}" in template for f in spec.text_fields)
    row = {"premise": "A {cat} sits.", "hypothesis": "An animal sits.", "label": 0}
    assert prompt_text(row, GLUE_TASKS["mnli"]) == (
        "A {cat} sits.\nQuestion: An animal sits. True, False or Neither?\nAnswer:"
    )


def test_tokens_after_and_special_prefix():
    tok = byte_tokenizer("llama")
    assert special_prefix(tok) == [tok.bos_token_id]
    assert special_prefix(byte_tokenizer("t5")) == []  # T5 appends EOS; nothing goes before
    assert tokens_after(tok, "Answer:", " yes") == tok(" yes", add_special_tokens=False)["input_ids"]


def test_batched_scores_match_one_sequence_at_a_time():
    tok, model = byte_tokenizer("llama"), tiny_llama().eval()
    contexts = [tok(t)["input_ids"] for t in ("a short one", "a much longer context here", "mid size")]
    conts = [
        tok(" yes", add_special_tokens=False)["input_ids"],
        tok(" no", add_special_tokens=False)["input_ids"],
    ]
    requests = [r for c in contexts for r in continuation_requests(c, conts)]
    for batch_size in (1, 4):
        got = dict(score(model, requests, batch_size, pad_id=0))
        for i, (c, cont) in enumerate((c, cont) for c in contexts for cont in conts):
            assert sum(got[i]) == pytest.approx(brute_loglik(model, c, cont), abs=1e-4)
    # several targets read at one position: next-token log-probs of each
    one = Request(contexts[0], [len(contexts[0]) - 1], [[65, 66, 67]])
    [(_, values)] = list(score(model, [one], 2, pad_id=0))
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([contexts[0]])).logits[0, -1].float().log_softmax(-1)
    assert values == pytest.approx(logp[[65, 66, 67]].tolist(), abs=1e-5)


@pytest.mark.parametrize("task", ["sst2", "mnli", "stsb"])
def test_causal_glue_predictions_match_brute_force(task):
    tok, model = byte_tokenizer("llama"), tiny_llama()
    cfg = glue_cfg(task, max_length=128)  # every prompt fits the tiny model's 128 positions
    if task == "sst2":
        rows = sst2_rows()
    elif task == "mnli":
        rows = [
            {"premise": f"a {w} sits", "hypothesis": "it sits", "label": i % 3} for i, w in enumerate(WORDS)
        ]
    else:
        rows = [{"sentence1": w, "sentence2": w[::-1], "label": i * 0.4} for i, w in enumerate(WORDS)]
    examples = encode_for_eval(rows, cfg, "causal", tok)
    model.train()
    result = run(model, tok, examples, cfg, "causal", batch_size=3)
    assert model.training  # restored
    model.eval()
    preds = []
    for ex in examples:
        scores = np.array([brute_loglik(model, ex["input_ids"], c) for c in ex["choices"]])
        if task == "stsb":
            probs = np.exp(scores - scores.max())
            preds.append(float(probs / probs.sum() @ np.arange(6)))
        else:
            preds.append(int(np.argmax(scores)))
    expected = glue_metrics(task, preds, [r["label"] for r in rows])
    assert {k: result[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert result["n"] == len(rows) and result["truncated"] == 0
    assert run(model, tok, examples, cfg, "causal", batch_size=7) == pytest.approx(result, abs=1e-6)


def test_causal_glue_long_prompts_keep_their_end_and_are_counted():
    tok, model = byte_tokenizer("llama"), tiny_llama()
    cfg = glue_cfg("sst2", max_length=100)
    rows = sst2_rows(4)
    rows[0]["sentence"] = "very long " * 20
    examples = encode_for_eval(rows, cfg, "causal", tok)
    longest = max(len(c) for c in examples[0]["choices"])
    assert len(examples[0]["input_ids"]) + longest - 1 == 100
    assert examples[0]["input_ids"][0] == tok.bos_token_id
    assert tok.decode(examples[0]["input_ids"][1:]).endswith("positive or negative?\nAnswer:")
    assert run(model, tok, examples, cfg, "causal")["truncated"] == 1


@pytest.mark.parametrize(
    ("task", "kind"),
    [("causal", "glue"), ("causal", "instruction"), ("classification", "glue"), ("seq2seq", "glue")],
)
def test_left_and_right_padding_tokenizers_give_the_same_numbers(task, kind):
    """Batches are always padded on the right by lrft, whatever the tokenizer's padding_side."""
    style = {"classification": "roberta", "seq2seq": "t5"}.get(task, "llama")
    make = {"classification": tiny_roberta, "seq2seq": tiny_t5}.get(task, tiny_llama)
    cfg = glue_cfg("sst2", max_length=128) if kind == "glue" else instr_cfg()
    rows = sst2_rows(7) if kind == "glue" else instr_rows(7)
    results = []
    for side in ("right", "left"):
        tok = byte_tokenizer(style)
        tok.padding_side = side
        examples = encode_for_eval(rows, cfg, task, tok)
        results.append(run(make(), tok, examples, cfg, task, batch_size=3))
    assert results[0] == pytest.approx(results[1], abs=1e-6)


def test_progress_callback_counts_every_example():
    seen = []
    tok, model = byte_tokenizer("llama"), tiny_llama()
    cfg = glue_cfg("sst2")
    examples = encode_for_eval(sst2_rows(5), cfg, "causal", tok)
    evaluate_model(model, tok, examples, cfg, "causal", 2, "cpu", on_batch=seen.append)
    assert sum(seen) == pytest.approx(5)
    seen.clear()
    tok = byte_tokenizer("roberta")
    cfg = glue_cfg("mrpc")
    examples = encode_rows(mrpc_rows(5), cfg, "classification", tok)
    evaluate_model(tiny_roberta(), tok, examples, cfg, "classification", 2, "cpu", on_batch=seen.append)
    assert seen == [2, 2, 1]


@pytest.mark.parametrize("task", ["causal", "seq2seq"])
def test_lockstep_split_runs_equal_forwards_and_scores_the_whole_set(task):
    """Sharded (FSDP2) evaluation: 5 batches over 2 ranks are 3 forwards each (rank 1 adds one
    whose labels are all ignored); the two ranks' sums are the whole set's."""
    from types import SimpleNamespace

    from lrft.evaluate.core import _batches
    from lrft.evaluate.losses import token_loss
    from lrft.evaluate.shard import Shard

    tok = byte_tokenizer("llama" if task == "causal" else "t5")
    model = tiny_llama() if task == "causal" else tiny_t5()
    examples = encode_rows(instr_rows(), instr_cfg(), task, tok)  # 9 examples
    collate = Collator(tok, task, with_refs=True)
    model.eval()
    parts = []
    for rank in (0, 1):
        shard = Shard(SimpleNamespace(process_index=rank, num_processes=2), lockstep=True)
        batches = list(_batches(examples, collate, 2, "cpu", None, shard))
        assert len(batches) == 3, rank  # ceil(5 / 2) forwards on every rank
        if rank == 1:
            assert (batches[-1][0]["labels"] == -100).all()  # the filler scores nothing
        with torch.no_grad():
            token_loss(model, batches, task, lambda meter, sums: (None, parts.append(sums) or sums))
    whole = run(model, tok, examples, instr_cfg(), task, batch_size=2)
    loss = sum(p["loss"] for p in parts) / sum(p["tokens"] for p in parts)
    assert loss == pytest.approx(whole["loss"], rel=1e-9)
    # without lockstep rank 1 would run 2 forwards: the filler is only there to even the count
    plain = Shard(SimpleNamespace(process_index=1, num_processes=2))
    assert len(list(_batches(examples, collate, 2, "cpu", None, plain))) == 2
