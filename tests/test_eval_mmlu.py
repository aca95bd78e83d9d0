"""MMLU: Hendrycks' prompt to the character, subjects and categories, CSV loading and its errors,
scoring against a brute-force reference, dropped shots, and prefix-cache reuse."""

import csv
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lrft.errors import UserError
from lrft.evaluate import mmlu, mmlu_data
from lrft.evaluate.mmlu import Letters, evaluate_mmlu, plan
from lrft.evaluate.mmlu_data import CATEGORY, SUBJECTS, Question, build_prompt
from lrft.evaluate.scoring import make_prefix
from lrft.model.load import byte_tokenizer
from lrft.schema import DatasetConfig

SHOTS = [
    Question("Which year came first?", ("1776", "1812", "1865", "1945"), 0),
    Question('Who said "no", then yes?', ("Adams, John", "Jefferson", "Madison", "Monroe"), 3),
]
QUESTION = Question("What is 2+2?\nThink.", ("3", "4", "5", "22"), 1)

EXPECTED_2_SHOT = (
    "The following are multiple choice questions (with answers) about high school us history.\n\n"
    "Which year came first?\nA. 1776\nB. 1812\nC. 1865\nD. 1945\nAnswer: A\n\n"
    'Who said "no", then yes?\nA. Adams, John\nB. Jefferson\nC. Madison\nD. Monroe\nAnswer: D\n\n'
    "What is 2+2?\nThink.\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_csv(path: Path, questions: list[Question]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        for q in questions:
            w.writerow([q.question, *q.choices, "ABCD"[q.answer]])
    return path


def questions(n: int, tag: str) -> list[Question]:
    return [
        Question(f"{tag} {i} plus {i % 3}?", tuple(str(i + j) for j in range(4)), i % 4) for i in range(n)
    ]


def write_mmlu(root: Path, subjects=("abstract_algebra", "sociology"), n: int = 6) -> Path:
    for s in subjects:
        write_csv(root / "dev" / f"{s}_dev.csv", questions(5, f"dev {s}"))
        write_csv(root / "test" / f"{s}_test.csv", questions(n, s))
        write_csv(root / "val" / f"{s}_val.csv", questions(2, f"val {s}"))
    return root


def mmlu_cfg(root: Path | None = None, **kw) -> DatasetConfig:
    return DatasetConfig(name="mmlu", kind="mmlu", data_dir=str(root) if root else None, **kw)


def tiny_llama(positions: int = 1024):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=261,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


# --- prompt, subjects -----------------------------------------------------------------------------


def test_two_shot_prompt_character_by_character():
    got = build_prompt("high_school_us_history", SHOTS, QUESTION)
    for i, (a, b) in enumerate(zip(got, EXPECTED_2_SHOT, strict=False)):
        assert a == b, f"first difference at character {i}: {got[max(0, i - 20) : i + 5]!r}"
    assert got == EXPECTED_2_SHOT


def test_prompt_from_csv_files_is_the_same(tmp_path):
    write_csv(tmp_path / "dev" / "high_school_us_history_dev.csv", [*SHOTS, *questions(3, "spare")])
    write_csv(tmp_path / "test" / "high_school_us_history_test.csv", [QUESTION])
    data = mmlu_data.load(mmlu_cfg(tmp_path, shots=2), "test", None)
    shots, qs = data["high_school_us_history"]
    assert build_prompt("high_school_us_history", shots, qs[0]) == EXPECTED_2_SHOT


def test_57_subjects_in_hendrycks_categories():
    assert len(SUBJECTS) == 57 and set(CATEGORY) == set(SUBJECTS)
    sizes = {c: sum(1 for s in SUBJECTS if CATEGORY[s] == c) for c in set(CATEGORY.values())}
    assert sizes == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    assert CATEGORY["anatomy"] == "other" and CATEGORY["college_physics"] == "STEM"
    assert CATEGORY["sociology"] == "social sciences" and CATEGORY["professional_law"] == "humanities"


# --- loading and its errors -----------------------------------------------------------------------


def test_csv_with_quotes_commas_newlines_and_blank_lines(tmp_path):
    path = write_csv(tmp_path / "t.csv", [QUESTION, SHOTS[1]])
    path.write_text(path.read_text() + "\n\n")
    assert mmlu_data.read_csv(path) == [QUESTION, SHOTS[1]]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("q,a,b,c,d", "expected 6 columns"),
        ("q,a,b,c,d,E", "the answer must be A, B, C or D"),
        (",a,b,c,d,A", "the question is empty"),
    ],
)
def test_malformed_csv_row_names_file_and_row(tmp_path, line, problem):
    path = tmp_path / "test" / "anatomy_test.csv"
    path.parent.mkdir()
    path.write_text(f'"multi\nline",a,b,c,d,A\nok,a,b,c,d,b\n{line}\n')
    with pytest.raises(UserError, match=rf"anatomy_test.csv, row 3 \(line 4\): {problem}"):
        mmlu_data.load(mmlu_cfg(tmp_path, shots=0), "test", None)


def test_loading_errors(tmp_path):
    root = write_mmlu(tmp_path)
    with pytest.raises(UserError, match="no 'test/' folder"):
        mmlu_data.load(mmlu_cfg(tmp_path / "nowhere"), "test", None)
    with pytest.raises(UserError, match=r"no file for subject 'sociolgy'\. Did you mean: sociology"):
        mmlu_data.load(mmlu_cfg(root, subjects=["sociolgy"]), "test", None)
    with pytest.raises(UserError, match=r"5 dev questions, fewer than dataset\.shots=6"):
        mmlu_data.load(mmlu_cfg(root, shots=6), "test", None)
    with pytest.raises(UserError, match=r"MMLU has no split 'tset'\. Did you mean: test"):
        mmlu_data.load(mmlu_cfg(root), "tset", None)
    with pytest.raises(UserError, match="Unknown MMLU subject 'anatomyy'"):
        mmlu_data.load(mmlu_cfg(None, subjects=["anatomyy"]), "test", None)
    data = mmlu_data.load(mmlu_cfg(root, subjects=["sociology"], shots=3), "val", 1)
    assert list(data) == ["sociology"] and len(data["sociology"][0]) == 3 and len(data["sociology"][1]) == 1


def test_hub_rows_are_grouped_by_subject(monkeypatch):
    """The cais/mmlu code path, with datasets.load_dataset answering from memory."""

    def rows(split: str) -> list[dict]:
        subjects = ("anatomy", "virology")
        return [
            {"question": f"{split} {s} {i}", "subject": s, "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for s in subjects
            for i in range(3 if split == "test" else 5)
        ]

    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows(split))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = mmlu_data.load(mmlu_cfg(None, path="cais/mmlu", shots=2), "test", None)
    assert calls == [("cais/mmlu", "all", "test"), ("cais/mmlu", "all", "dev")]
    assert list(data) == ["anatomy", "virology"]
    shots, qs = data["virology"]
    assert [q.question for q in shots] == ["dev virology 0", "dev virology 1"]
    assert [q.answer for q in qs] == [0, 1, 2] and qs[0].choices == ("w", "x", "y", "z")


# --- scoring --------------------------------------------------------------------------------------


def brute_force(model, tok, data, limit: int) -> tuple[dict[str, int], int]:
    """Hendrycks' loop, one question at a time: drop shots until the prompt fits, then compare
    the next-token log-likelihoods of " A".." D" (here: a space, then the letter byte)."""
    correct, dropped = {}, 0
    letters = [tok(letter, add_special_tokens=False)["input_ids"][0] for letter in "ABCD"]
    space = tok(" ", add_special_tokens=False)["input_ids"]
    for subject, (shots, qs) in data.items():
        correct[subject] = 0
        for q in qs:
            k = len(shots)
            while len(tok(build_prompt(subject, shots[:k], q))["input_ids"]) + 1 > limit and k > 0:
                k -= 1
            dropped += len(shots) - k
            ids = tok(build_prompt(subject, shots[:k], q))["input_ids"] + space
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            correct[subject] += int(int(np.argmax(logits[letters].numpy())) == q.answer)
    return correct, dropped


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_scores_match_brute_force(tmp_path, reuse_prefix):
    model, tok = tiny_llama(), byte_tokenizer("llama")
    dcfg = mmlu_cfg(write_mmlu(tmp_path), shots=2, max_length=2048)
    data = mmlu_data.load(dcfg, "test", None)
    report = evaluate_mmlu(model, tok, dcfg, "test", 4, reuse_prefix=reuse_prefix, data=data)
    correct, _ = brute_force(model, tok, data, 1024)
    assert {s: r["correct"] for s, r in report["subjects"].items()} == correct
    assert report["n"] == 12 and report["scoring"] == "next_token"
    assert report["accuracy"] == pytest.approx(sum(correct.values()) / 12)
    assert report["shots"] == {"requested": 2, "questions_with_fewer": 0, "dropped": 0, "truncated": 0}
    assert set(report["categories"]) == {"STEM", "social sciences"}


def test_prefix_reuse_batch_size_and_padding_side_do_not_change_results(tmp_path, monkeypatch):
    model = tiny_llama()
    dcfg = mmlu_cfg(write_mmlu(tmp_path, n=7), shots=3, max_length=2048)
    data = mmlu_data.load(dcfg, "test", None)
    prefixes = []
    monkeypatch.setattr(mmlu, "make_prefix", lambda m, ids: prefixes.append(ids) or make_prefix(m, ids))
    reports = []
    settings = ((True, 3, "right"), (False, 1, "right"), (True, 8, "left"), (False, 5, "left"))
    for reuse, batch, side in settings:
        tok = byte_tokenizer("llama")
        tok.padding_side = side
        reports.append(evaluate_mmlu(model, tok, dcfg, "test", batch, reuse_prefix=reuse, data=data))
    assert all(r["subjects"] == reports[0]["subjects"] for r in reports)
    assert len(prefixes) == 4  # one cache per subject, in each of the two runs that reuse
    assert tok.decode(prefixes[0][1:]).startswith("The following are") and len(prefixes[0]) > 200
    prefixes.clear()  # 0-shot: the header alone is shorter than the questions, not worth a cache
    long_questions = [Question(f"{i} " + "why so? " * 20, ("a", "b", "c", "d"), i % 4) for i in range(4)]
    evaluate_mmlu(model, tok, mmlu_cfg(shots=0), "test", 4, data={"sociology": ([], long_questions)})
    assert prefixes == []


def test_long_prompts_drop_shots_like_the_reference(tmp_path):
    model, tok = tiny_llama(positions=330), byte_tokenizer("llama")
    dcfg = mmlu_cfg(write_mmlu(tmp_path), shots=5, max_length=2048)
    data = mmlu_data.load(dcfg, "test", None)
    report = evaluate_mmlu(model, tok, dcfg, "test", 4, data=data)
    correct, dropped = brute_force(model, tok, data, 330)  # the model's 330 positions are the limit
    assert dropped > 0 and report["shots"]["dropped"] == dropped
    assert report["shots"]["questions_with_fewer"] == 12 and report["shots"]["truncated"] == 0
    assert {s: r["correct"] for s, r in report["subjects"].items()} == correct
    # a context too small even for 0 shots keeps each question's end
    items, stats = plan(data, tok, limit=40, extra=1)
    assert stats["truncated"] == 12 and all(len(i.ids) == 39 and i.shots == 0 for i in items)
    assert tok.decode(items[0].ids[1:]).endswith("\nAnswer:")


def test_letters_as_the_tokenizer_writes_them():
    """Byte-level: " A" is a space then "A"; the shared space is fed, the letters are compared."""
    tok = byte_tokenizer("llama")
    letters = Letters.of(tok)
    assert letters.next_token and letters.extra == 1
    assert letters.common == tok(" ", add_special_tokens=False)["input_ids"]
    assert [t[-1] for t in letters.tails] == [
        tok(c, add_special_tokens=False)["input_ids"][0] for c in "ABCD"
    ]
