"""Dataclass schemas of ``lrft train``'s config groups (model, quantization, optimizer, dataset,
trainer) and the names valid in them. Torch-free, like :mod:`lrft.config.compose`, which registers them in
Hydra's ConfigStore, composes and validates; their public names are re-exported there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

TASKS = ("causal", "classification", "seq2seq")
OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "galore_adamw", "galore_adamw8bit")
DATASET_KINDS = (
    "glue",
    "instruction",
    "chat",
    "mmlu",
    "preference",
)  # mmlu: evaluation only (not in COMPATIBLE)
# which (model task, dataset kind) pairs make sense, and how
COMPATIBLE = {
    ("classification", "glue"): "classification head on the GLUE label",
    ("seq2seq", "glue"): "text-to-text: the label is generated as a word",
    ("seq2seq", "instruction"): "text-to-text: the response is the target",
    ("causal", "instruction"): "causal LM, loss on the response tokens only",
    ("causal", "chat"): "causal LM on the model's chat template, loss on the assistant turns only",
    ("causal", "preference"): "causal LM on (prompt, chosen, rejected) pairs with a preference objective",
}


@dataclass
class ModelConfig:
    """Which network to load and how. ``name_or_path`` wins over ``from_config``."""

    name: str = MISSING
    # causal | classification | seq2seq; open (model=hf): inferred from the checkpoint + dataset kind
    task: str | None = MISSING
    name_or_path: str | None = None  # hub id or local folder (from_pretrained)
    from_config: dict[str, Any] | None = None  # random init from these config kwargs (offline)
    arch: str | None = None  # transformers model_type used with from_config (llama, roberta, t5)
    tokenizer: str | None = None  # hub id / folder; "byte" = built-in byte-level tokenizer
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    device_map: str | None = None  # e.g. "auto" for big models on one host
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    target_modules: list[str] = field(default_factory=list)  # default adapter targets
    modules_to_save: list[str] = field(default_factory=list)  # trained fully (task heads)


@dataclass
class QuantizationConfig:
    """Base weights stored by bitsandbytes (see lrft.model.quantization); the adapters stay float32."""

    name: str = "none"  # none | nf4 | fp4 | int8
    compute_dtype: str = "bfloat16"  # 4-bit matmuls dequantize to this: float32 | bfloat16 | float16
    double_quant: bool = True  # 4-bit: quantize the block scales too (QLoRA's double quantization)
    quant_storage: str = "uint8"  # 4-bit packing dtype (bfloat16 lets FSDP shard it with the rest)
    int8_threshold: float = 6.0  # int8: |activation| above this goes through the fp16 outlier path


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd | adamw8bit | galore_adamw | galore_adamw8bit (with method=galore)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only


@dataclass
class DataFiles:
    train: str | None = None
    validation: str | None = None
    validation_mismatched: str | None = None  # MNLI's second eval split, for `lrft eval`


@dataclass
class MixSource:
    """One source of ``dataset.mix``: a local train file or a hub set, drawn with ``weight``."""

    data_files: str | None = None  # a local train file (JSON/JSONL/CSV/TSV/Parquet)
    path: str | None = None  # or a hub id for datasets.load_dataset
    subset: str | None = None  # hub config name (default: dataset.subset)
    split: str = "train"  # hub split
    weight: float = 1.0  # relative: the weights are normalised to probabilities


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = MISSING  # glue | instruction | chat | mmlu
    path: str | None = None  # hub id for datasets.load_dataset
    subset: str | None = None  # hub config name (the GLUE task)
    data_files: DataFiles = field(default_factory=DataFiles)  # local files win over the hub
    train_split: str = "train"
    eval_split: str = "validation"
    max_length: int = 256
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    prompt_template: str = "alpaca"  # instruction data: alpaca | plain
    # chat data: null = the tokenizer's own template; "chatml" (named fallback) or a Jinja file path
    chat_template: str | None = None
    # only a local train file: hold out this fraction (< 1, at most 500 rows) or count (>= 1) for eval
    eval_holdout: float = 0.05
    shots: int = 5  # mmlu: k-shot examples from the dev split
    data_dir: str | None = None  # mmlu: local folder of Hendrycks CSVs (dev/, val/, test/)
    subjects: list[str] | None = None  # mmlu: null = every subject
    packing: bool = False  # causal only: examples concatenated into rows of max_length (lrft.data.packing)
    # the tokenized data is cached (Arrow, memory-mapped) under this folder, keyed by the content of
    # the data, these settings, the tokenizer and the lrft version; null: $LRFT_CACHE or ~/.cache/lrft
    cache_dir: str | None = None
    num_proc: int = 1  # processes that tokenize a cold cache (datasets' map); 1 = in this process
    streaming: bool = False  # train rows read lazily (hub sets too large to download); needs max_steps
    mix: list[MixSource] = field(default_factory=list)  # train on several sources, drawn by weight


@dataclass
class TrainerConfig:
    max_steps: int = -1  # > 0: train this many optimizer steps (wins over epochs); -1: use epochs
    epochs: float = 1.0  # passes over the training set (fractions allowed)
    batch_size: int = 8  # examples per micro-batch, per process
    eval_batch_size: int | None = None  # null: batch_size
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # steps between loss records in metrics.jsonl
    eval_every: int = 0  # 0: evaluate once at the end
    save_every: int = 0  # 0: only the final state
    seed: int = 42  # data order, dropout and adapter init
    # null: what the launcher set (accelerate launch --mixed_precision / its config file), else no
    mixed_precision: str | None = None  # null | no | fp16 | bf16
    # recompute blocks in backward instead of keeping their activations (lrft.model.activations):
    # false | true (every block) | N (N of the L blocks, evenly spread) | auto (the fewest that fit
    # memory.budget_gb, or the device's memory)
    gradient_checkpointing: Any = False
    offload_activations: bool = False  # saved activations to pinned host memory (CUDA; CPU: no-op)
    # auto: micro-batch, accumulation (the global batch kept), checkpointed blocks and offload chosen
    # by the planner (lrft memory) to fit memory.budget_gb; recorded in run_info.json
    memory_plan: str = "none"  # none | auto
    # causal LMs: the loss computes the logits this many positions at a time (their gradients too),
    # never the whole [tokens x vocab] (lrft.model.loss); 0: from the full logits
    loss_chunk: Any = "auto"  # positions per chunk of logits | 0 (full logits) | auto
    # processes that read and collate batches while the device computes: auto = 0 on CPU (the cores
    # train), min(4, cores/2) on a GPU; batches are pinned and copied without a sync on CUDA
    dataloader_workers: Any = "auto"  # auto | N
    # fp32 matmuls on CUDA may use TF32 tensor cores (torch "high" precision): RoBERTa/T5 recipes
    # train fp32; no effect on CPU or under bf16/fp16 autocast
    allow_tf32: bool = True
    max_grad_norm: float = 1.0  # 0 disables clipping
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0  # linear warmup steps (wins over warmup_ratio)
    warmup_ratio: float = 0.0  # warmup as a share of the total steps
    cpu: bool = False  # force CPU even when a GPU is there
    report_to: str | None = None  # tensorboard | wandb | mlflow (accelerate's trackers); null: none
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN/checkpoints
    progress: bool = True  # the progress bar and the summary table
    # auto: continue the run at output_dir from its newest intact checkpoint, with its own config
    resume: str | None = None
    on_nan: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    save_on_interrupt: bool = True  # Ctrl-C / SIGTERM save a checkpoint before exiting
    untrained_warn_steps: int = 20  # warn if zero-initialised adapters (B) are still zero by then
    overwrite: bool = False  # replace a finished run at output_dir (only the files lrft wrote)
    # several nodes: is output_dir one folder for all (true), each node's own disk (false), or
    # null: detected at start (see lrft.run.topology)
    shared_fs: bool | None = None
    group_by_length: bool = False  # batches of similar lengths (lrft.data.sampling); see dataset.packing
    compile: bool = False  # torch.compile the model (the low-rank layer has no graph breaks)
    # torch.compile backend: inductor (generates fused kernels); aot_eager traces the same graphs
    # without generating code (fast to start; for debugging a compile problem)
    compile_backend: str = "inductor"
    # the adapters' dropout mask (lrft.methods.dropout): fused compiles it once into one kernel
    # (seconds at start), eager runs ~15 torch ops, auto = fused on CUDA; the same bits either way
    dropout_kernel: str = "auto"
    # none: every process holds the whole model (data parallel); fsdp2: the model, its gradients and
    # optimizer state split over the processes (lrft.train.sharding)
    sharding: str = "none"


@dataclass
class BudgetConfig:
    budget_gb: float | None = None  # GiB per device the run must fit (trainer.memory_plan=auto)
    target_length: int | None = None  # seq2seq decoder length planned; null: max_length or 8


@dataclass
class StartFrom:
    """Set by ``lrft train checkpoint=RUN`` (lrft.run.start_from), never by hand: the finished
    run this run starts from, its final model merged into this run's ``base/``."""

    run: str | None = None  # the finished run folder the start was merged from
    step: int | None = None  # that run's final step
    fingerprint: str | None = None  # sha256 of its final state: a later change to it is caught


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    method: Any = MISSING  # the method's own schema (see lrft.methods.registry)
    objective: Any = MISSING  # sft, or a preference objective (lrft.objectives.schemas)
    quantization: QuantizationConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    dataset: DatasetConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    memory: BudgetConfig = field(default_factory=BudgetConfig)
    start_from: StartFrom = field(default_factory=StartFrom)  # lrft train checkpoint=RUN
    output_dir: str = MISSING


GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "quantization": QuantizationConfig,
    "optimizer": OptimizerConfig,
    "dataset": DatasetConfig,
}
GROUPS = ("model", "method", "quantization", "optimizer", "dataset", "objective")


# Every enumeration a config value is checked against, defined here once; the runtime modules
# import these names (torch-free, so validation and --help never import torch).
DTYPES = ("float32", "bfloat16", "float16")  # torch's map: lrft.model.dtypes.TORCH_DTYPES
MODEL_DTYPES = (*DTYPES, "auto")  # model.dtype: auto keeps the checkpoint's own
QUANT_TYPES = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = DTYPES
QUANT_STORAGE = ("uint8", *DTYPES)
TRUTHY = ("1", "true", "yes", "on")  # what an environment variable set to "on" may say
PRECISIONS = ("no", "fp16", "bf16")  # trainer.mixed_precision (null: bf16 where supported, else no)
LR_SCHEDULERS = ("linear", "cosine", "constant")
ON_NAN = ("stop", "skip")
SHARDINGS = ("none", "fsdp2")
COMPILE_BACKENDS = ("inductor", "aot_eager", "cudagraphs")
DROPOUT_KERNELS = ("auto", "eager", "fused")
MEMORY_PLANS = ("none", "auto")
# GaLore lives in the optimizer: under method=galore, AdamW runs as GaLore-AdamW (8-bit too)
GALORE_OPTIMIZER = {
    "adamw": "galore_adamw",
    "galore_adamw": "galore_adamw",
    "adamw8bit": "galore_adamw8bit",
    "galore_adamw8bit": "galore_adamw8bit",
}
