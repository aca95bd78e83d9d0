"""A run's config: composed from the Hydra groups in ``configs/`` with did-you-mean for every
wrong key (:mod:`.compose`), then validated once. The schemas it types them with live in
:mod:`lrft.schema`. Torch-free.
"""
