"""What leaves lrft: a run's adapter in PEFT's format (:mod:`.peft`), merged plain transformers
weights (:mod:`.merge`), and generation from a run (:mod:`.generate`). Library code; the commands
live in :mod:`lrft.cli`.
"""
