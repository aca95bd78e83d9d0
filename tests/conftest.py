import os

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
