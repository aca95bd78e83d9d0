"""Per-architecture tables: which linear layers LoRA targets by default, which model types are
encoders, and which layers are output heads (never adapted, never quantized, trained in full when
asked). Torch-free.
"""

from __future__ import annotations

# default adapter targets by transformers ``model_type``; anything else: every linear layer but heads
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


TARGET_GROUPS: list[tuple[tuple[str, ...], list[str]]] = [
    (
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
            "cohere",
        ),
        LLAMA_LIKE,
    ),
    (("phi3",), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    (("phi",), ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]),
    (("bert", "roberta", "xlm-roberta", "electra", "camembert", "deberta", "deberta-v2"), ["query", "value"]),
    (("t5", "mt5", "umt5"), ["q", "v"]),
    (("bart", "mbart"), ["q_proj", "v_proj"]),
]


TARGETS_BY_TYPE = {kind: names for kinds, names in TARGET_GROUPS for kind in kinds}


ENCODER_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "camembert",
    "deberta",
    "deberta-v2",
    "distilbert",
    "albert",
    "mpnet",
    "modernbert",
)


CLASSIFICATION_HEADS = ["classifier", "score"]  # trained in full with a fresh head


# Layers adapted by "all-linear": every nn.Linear except the output heads, as PEFT does.
OUTPUT_HEADS = ("lm_head", "classifier", "score", "out_proj", "qa_outputs")
