"""The model: load it and its tokenizer (:mod:`.load`), quantize its base weights
(:mod:`.quantization`), build it on the meta device from its config (:mod:`.meta`), and fail
fast on unreachable hub ids (:mod:`.hub`).
"""
