"""Datasets for fine-tuning: load and validate rows, encode them per model task, batch them.

``load_rows`` -> ``encode_rows`` -> ``Collator`` is the whole pipeline; ``num_labels`` sizes a
classification head and :class:`TaskSpec` describes a GLUE task.
"""

from lrft.data.collate import IGNORE_INDEX, Collator
from lrft.data.encode import encode_rows
from lrft.data.glue import GLUE_TASKS, TaskSpec, get_task
from lrft.data.instruction import TEMPLATES, build_prompt
from lrft.data.load import load_rows, num_labels

__all__ = [
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "TEMPLATES",
    "Collator",
    "TaskSpec",
    "build_prompt",
    "encode_rows",
    "get_task",
    "load_rows",
    "num_labels",
]
