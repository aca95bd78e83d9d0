"""GLUE on a causal LM (evaluation only): each label word is scored by its log-likelihood after a
prompt, and the most likely one is the prediction.

The prompts follow lm-evaluation-harness's GLUE prompts ("...\\nQuestion: ...\\nAnswer:" and a
short answer word), so numbers are comparable in spirit with what people report for base LLMs.
A word's score is the sum of its tokens' log-probabilities (the harness's ``acc``). STS-B, a
regression task, scores the answers 0..5 and predicts their expectation under the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from lrft.data.glue import TaskSpec
from lrft.evaluate.metrics import GlueMeter
from lrft.evaluate.scoring import (
    OnBatch,
    continuation_requests,
    score_groups,
    special_prefix,
    tokens_after,
)

ANSWER = "\nAnswer:"

# task -> (prompt template over the row's columns, the answer word of each label in order)
PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cola": ("{sentence}\nQuestion: Does this sentence make sense?", ("no", "yes")),
    "sst2": ("{sentence}\nQuestion: Is this sentence positive or negative?", ("negative", "positive")),
    "mrpc": (
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?",
        ("no", "yes"),
    ),
    "qqp": (
        "Question 1: {question1}\nQuestion 2: {question2}\nQuestion: Do both questions ask the same thing?",
        ("no", "yes"),
    ),
    "stsb": (
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
        "Question: How similar are the two sentences, on a scale from 0 to 5?",
        ("0", "1", "2", "3", "4", "5"),
    ),
    "mnli": ("{premise}\nQuestion: {hypothesis} True, False or Neither?", ("True", "Neither", "False")),
    "qnli": ("{question}\n{sentence}\nQuestion: Does this response answer the question?", ("yes", "no")),
    "rte": ("{sentence1}\nQuestion: {sentence2} True or False?", ("True", "False")),
}


def prompt_text(row: dict[str, Any], spec: TaskSpec) -> str:
    """The text before the answer word, ending in "Answer:"."""
    template, _ = PROMPTS[spec.name]
    return template.format(**{f: row[f] for f in spec.text_fields}) + ANSWER


def answer_words(spec: TaskSpec) -> tuple[str, ...]:
    return PROMPTS[spec.name][1]


def encode(
    rows: list[dict[str, Any]], spec: TaskSpec, tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """Examples with the prompt's ``input_ids``, each answer's continuation ids (``choices``), the
    reference label (``ref``) and whether the prompt lost its start to fit ``max_length``."""
    head = special_prefix(tokenizer)
    # an answer word is tokenized as it follows "Answer:" in running text (usually " yes" is one token)
    choices = [tokens_after(tokenizer, ANSWER, " " + w) for w in answer_words(spec)]
    budget = max_length - max(len(c) for c in choices) + 1 - len(head)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a prompt")
    texts = [prompt_text(r, spec) for r in rows]
    examples = []
    for ids, row in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], rows, strict=True):
        ids = list(ids)
        truncated = len(ids) > budget
        if truncated:  # keep the end: the question and "Answer:" cue the answer
            ids = ids[len(ids) - budget :]
        ex = {"input_ids": head + ids, "choices": choices, "ref": row["label"], "truncated": truncated}
        examples.append(ex)
    return examples


def score_choices(
    model: nn.Module,
    examples: list[dict[str, Any]],
    spec: TaskSpec,
    batch_size: int,
    pad_id: int,
    on_batch: OnBatch = None,
    merge: Any = None,
) -> dict[str, Any]:
    """Official metrics of the most likely answer word, ``truncated`` (prompts cut to fit) and the
    mean log-likelihood of the reference answer (``ref_logprob``)."""
    groups = [continuation_requests(ex["input_ids"], ex["choices"]) for ex in examples]
    meter = GlueMeter(spec.name)
    ref_logprob = 0.0
    for index, values in score_groups(model, groups, batch_size, pad_id, on_group=on_batch):
        scores = np.array([sum(v) for v in values])
        ref = examples[index]["ref"]
        if spec.is_regression:
            probs = np.exp(scores - scores.max())
            pred: float | int = float((probs / probs.sum()) @ np.arange(len(scores)))
            ref_logprob += float(scores[min(len(scores) - 1, round(ref))])
        else:
            pred = int(np.argmax(scores))
            ref_logprob += float(scores[int(ref)])
        meter.update([pred], [ref])
    truncated = sum(1 for ex in examples if ex["truncated"])
    merged, sums = meter, {"ref_logprob": ref_logprob, "truncated": truncated}
    if merge is not None:
        merged, sums = merge(meter, sums)
    result: dict[str, Any] = merged.compute()
    result["ref_logprob"] = sums["ref_logprob"] / merged.n if merged.n else float("nan")
    result["truncated"] = int(sums["truncated"])
    return result
