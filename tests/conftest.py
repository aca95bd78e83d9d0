import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2` on 2 cores: each worker (and every process it launches) computes on one thread; two
    # workers with torch's default of one thread per core would oversubscribe and spin
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_logging():
    """Hydra's job logging adds handlers on the captured stdout/stderr of the test that ran it; a
    later test in the same process would log into those closed streams ("--- Logging error ---")."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    saved = {lg.name: (list(lg.handlers), lg.level, lg.propagate) for lg in loggers}
    yield
    for lg in [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]:
        handlers, level, propagate = saved.get(lg.name, ([], logging.NOTSET, True))
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


# Modules that launch processes or train many runs, longest first: with `-n 2 --dist loadfile`
# the workers start on these and fill in with the short modules, instead of ending on a long one.
LONGEST_FIRST = [
    "test_merge.py", "test_resume.py", "test_loop_invariants.py", "test_fsdp2.py", "test_multinode.py",
    "test_preference.py", "test_preference_fsdp2.py", "test_kto.py", "test_precompute_ref.py",
    "test_runs.py", "test_train.py", "test_methods.py", "test_memory.py", "test_resume_packing.py",
    "test_preference_methods.py", "test_start_from.py", "test_cuda_path_fixes.py", "test_memory_objective.py",
    "test_memory_plan.py", "test_gpu_check.py", "test_loss.py", "test_readme_tree.py",
    "test_modern_families.py", "test_recipes.py", "test_eval_cli.py",
]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
