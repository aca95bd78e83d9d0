"""MMLU (Hendrycks et al., "Measuring Massive Multitask Language Understanding"): the 57 subjects
and their categories, the prompt format, and loading from the hub (``cais/mmlu``) or a local
folder of the original CSVs (``dev/``, ``val/``, ``test/``; no header: question, A, B, C, D,
answer letter).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrft.errors import UserError, did_you_mean

LETTERS = ("A", "B", "C", "D")

# Hendrycks' categories.py: subject -> subcategory -> category
_SUBCATEGORIES = {
    "math": "abstract_algebra college_mathematics elementary_mathematics high_school_mathematics "
    "high_school_statistics",
    "health": "anatomy clinical_knowledge college_medicine human_aging medical_genetics nutrition "
    "professional_medicine virology",
    "physics": "astronomy college_physics conceptual_physics high_school_physics",
    "business": "business_ethics management marketing",
    "biology": "college_biology high_school_biology",
    "chemistry": "college_chemistry high_school_chemistry",
    "computer science": "college_computer_science computer_security high_school_computer_science "
    "machine_learning",
    "economics": "econometrics high_school_macroeconomics high_school_microeconomics",
    "engineering": "electrical_engineering",
    "philosophy": "formal_logic logical_fallacies moral_disputes moral_scenarios philosophy world_religions",
    "other": "global_facts miscellaneous professional_accounting",
    "history": "high_school_european_history high_school_us_history high_school_world_history prehistory",
    "geography": "high_school_geography",
    "politics": "high_school_government_and_politics public_relations security_studies us_foreign_policy",
    "psychology": "high_school_psychology professional_psychology",
    "culture": "human_sexuality sociology",
    "law": "international_law jurisprudence professional_law",
}
_CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other": ("other", "business", "health"),  # Hendrycks: "other (business, health, misc.)"
}
SUBCATEGORY = {s: sub for sub, names in _SUBCATEGORIES.items() for s in names.split()}
CATEGORY = {s: cat for s, sub in SUBCATEGORY.items() for cat, subs in _CATEGORIES.items() if sub in subs}
SUBJECTS = tuple(sorted(SUBCATEGORY))

# the split names lrft accepts -> (hub split, local folder, file suffix)
SPLITS = {
    "test": ("test", "test", "test"),
    "validation": ("validation", "val", "val"),
    "dev": ("dev", "dev", "dev"),
}
_SPLIT_ALIASES = {"val": "validation"}


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]  # four answers, A..D
    answer: int  # 0..3


def header(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, q.choices, strict=True))
    text += "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def few_shot_prefix(subject: str, shots: list[Question]) -> str:
    """The header and k solved dev questions: the part of the prompt every question shares."""
    return header(subject) + "".join(format_question(s, True) for s in shots)


def build_prompt(subject: str, shots: list[Question], question: Question) -> str:
    """Hendrycks' prompt: header, k solved examples, then the question ending in "Answer:"."""
    return few_shot_prefix(subject, shots) + format_question(question, False)


def split_name(split: str | None) -> str:
    name = _SPLIT_ALIASES.get(split or "test", split or "test")
    if name not in SPLITS:
        raise UserError(f"MMLU has no split '{split}'.{did_you_mean(str(split), [*SPLITS, 'val'])}")
    return name


def load(
    dcfg: Any, split: str | None, max_samples: int | None
) -> dict[str, tuple[list[Question], list[Question]]]:
    """``{subject: (dev questions for the shots, questions of split)}``, subjects sorted.

    ``max_samples`` keeps the first N questions of each subject. Any problem (missing folder or
    file, malformed row, unknown subject, too few dev questions for ``dataset.shots``) raises
    :class:`UserError` naming the file and row.
    """
    name = split_name(split)
    if dcfg.shots < 0:
        raise UserError(f"dataset.shots must be >= 0, got {dcfg.shots}.")
    wanted = list(dcfg.subjects) if dcfg.subjects else None
    data = (
        _local(Path(dcfg.data_dir).expanduser(), name, wanted) if dcfg.data_dir else _hub(dcfg, name, wanted)
    )
    out = {}
    for subject, (dev, questions) in sorted(data.items()):
        if len(dev) < dcfg.shots:
            raise UserError(
                f"MMLU subject '{subject}' has {len(dev)} dev questions, fewer than "
                f"dataset.shots={dcfg.shots}."
            )
        if max_samples is not None and max_samples >= 0:
            questions = questions[:max_samples]
        out[subject] = (dev[: dcfg.shots], questions)
    return out


def read_csv(path: Path) -> list[Question]:
    """A Hendrycks CSV (no header; question, A, B, C, D, answer letter). Blank lines are skipped."""
    if not path.is_file():
        raise UserError(f"{path}: MMLU file not found.")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    questions = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        row_number = 0
        try:
            for cells in reader:
                if not cells or all(not c.strip() for c in cells):
                    continue
                row_number += 1
                where = f"{path}, row {row_number} (line {reader.line_num})"
                if len(cells) != 6:
                    raise UserError(
                        f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(cells)}."
                    )
                letter = cells[5].strip().upper()
                if letter not in LETTERS:
                    raise UserError(f"{where}: the answer must be A, B, C or D, got {cells[5]!r}.")
                if not cells[0].strip():
                    raise UserError(f"{where}: the question is empty.")
                questions.append(Question(cells[0], tuple(cells[1:5]), LETTERS.index(letter)))
        except csv.Error as err:
            raise UserError(f"{path}, line {reader.line_num}: malformed CSV: {err}.") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if not questions:
        raise UserError(f"{path}: the file has no questions.")
    return questions


def _local(
    root: Path, split: str, wanted: list[str] | None
) -> dict[str, tuple[list[Question], list[Question]]]:
    _, folder, suffix = SPLITS[split]
    split_dir = root / folder
    if not split_dir.is_dir():
        raise UserError(
            f"{root}: no '{folder}/' folder of {{subject}}_{suffix}.csv files (MMLU split '{split}')."
        )
    found = sorted(p.name[: -len(f"_{suffix}.csv")] for p in split_dir.glob(f"*_{suffix}.csv"))
    if not found:
        raise UserError(f"{split_dir}: no {{subject}}_{suffix}.csv files.")
    for subject in wanted or []:
        if subject not in found:
            raise UserError(f"{split_dir}: no file for subject '{subject}'.{did_you_mean(subject, found)}")
    data = {}
    for subject in wanted or found:
        questions = read_csv(split_dir / f"{subject}_{suffix}.csv")
        dev = questions if split == "dev" else None
        data[subject] = (dev if dev is not None else _dev(root, subject), questions)
    return data


def _dev(root: Path, subject: str) -> list[Question]:
    path = root / "dev" / f"{subject}_dev.csv"
    return read_csv(path) if path.is_file() else []  # no dev file is fine for 0-shot (checked later)


def _hub(dcfg: Any, split: str, wanted: list[str] | None) -> dict[str, tuple[list[Question], list[Question]]]:
    for subject in wanted or []:
        if subject not in SUBJECTS:
            raise UserError(f"Unknown MMLU subject '{subject}'.{did_you_mean(subject, SUBJECTS)}")
    path = dcfg.path or "cais/mmlu"
    hub_split = SPLITS[split][0]
    import datasets

    def rows(which: str) -> list[dict[str, Any]]:
        try:
            return datasets.load_dataset(path, "all", split=which).to_list()
        except Exception as err:  # network, unknown id/split: all user-fixable, so no traceback
            raise UserError(
                f"Cannot load MMLU ({path}, split '{which}') from the hub: {err}\n"
                "Offline? Set dataset.data_dir to a folder of the Hendrycks CSVs (dev/, val/, test/)."
            ) from None

    test_rows = rows(hub_split)
    dev_rows = rows("dev") if dcfg.shots > 0 and hub_split != "dev" else []
    subjects = wanted or sorted({r["subject"] for r in test_rows})
    data: dict[str, tuple[list[Question], list[Question]]] = {s: ([], []) for s in subjects}
    for which, records, slot in ((hub_split, test_rows, 1), ("dev", dev_rows, 0)):
        for number, record in enumerate(records, start=1):
            if record.get("subject") in data:
                q = _hub_question(record, f"{path} split '{which}', row {number}")
                data[record["subject"]][slot].append(q)
    if hub_split == "dev":  # the shots come from the split under test itself
        data = {s: (qs, qs) for s, (_, qs) in data.items()}
    return data


def _hub_question(record: dict[str, Any], where: str) -> Question:
    choices, answer = record.get("choices"), record.get("answer")
    if not isinstance(choices, list) or len(choices) != 4:
        raise UserError(f"{where}: expected 4 choices, got {choices!r}.")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if not isinstance(answer, int) or not 0 <= answer < 4:
        raise UserError(f"{where}: the answer must be 0..3 or A..D, got {answer!r}.")
    return Question(str(record["question"]), tuple(str(c) for c in choices), answer)
