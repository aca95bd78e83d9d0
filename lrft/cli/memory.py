"""``lrft memory``: print a run's planned memory (see :mod:`lrft.memory.plan`) as a table.

Takes ``lrft train``'s groups and keys (configs/memory.yaml composes them) plus a ``memory:``
section. Any override may list values (``method=lora,lora_fa,full``): each combination becomes a
column. ``method.*`` keys then apply to the methods that have them, and the output says which not.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from itertools import islice, product
from typing import Any

from omegaconf import MISSING, DictConfig
from rich.console import Console
from rich.table import Table

from lrft.errors import UserError
from lrft.schema import (
    BudgetConfig,
    DatasetConfig,
    ModelConfig,
    OptimizerConfig,
    QuantizationConfig,
    TrainerConfig,
)

MAX_COLUMNS = 8
GIB = 1 << 30

USAGE = """\
lrft memory [group=option ...] [group.key=value ...]     plan memory without loading weights

  lrft memory model=llama7b method=lora_fa quantization=nf4 trainer.batch_size=8 dataset.max_length=512
  lrft memory method=lora,lora_fa,dora,galore,full        side by side
  lrft memory method=lora,lora_fa memory.budget_gb=24      the fastest plan in 24 GiB per method
  lrft memory recipes=lora_fa/llama7b_alpaca               a recipe's memory

  lrft memory memory.sharding=fsdp memory.nodes=2 memory.processes_per_node=8   per GPU of a job

Groups and keys are lrft train's (`lrft train --help`), plus memory.budget_gb, memory.target_length,
memory.sharding (none | ddp | fsdp), memory.nodes and memory.processes_per_node.
Sizes are GiB (2^30 bytes). Activations are counted from a forward pass on PyTorch's meta device."""


@dataclass
class MemorySection(BudgetConfig):
    # budget_gb: GiB per device: print the fastest plan that fits, for each method
    # the job the figures are per device of: sharding none|ddp (replicated) | fsdp (lrft's
    # trainer.sharding=fsdp2: weights, gradients and optimizer state sharded, one block gathered)
    sharding: str = "none"
    nodes: int = 1
    processes_per_node: int = 1


@dataclass
class MemoryConfig:
    model: ModelConfig = MISSING
    method: Any = MISSING
    objective: Any = MISSING  # added by compose_memory (sft unless named): configs/memory.yaml lacks it
    quantization: QuantizationConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    dataset: DatasetConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    memory: MemorySection = field(default_factory=MemorySection)


def compose_memory(overrides: list[str]) -> DictConfig:
    """configs/memory.yaml composed with ``overrides`` (one option per group)."""
    from hydra.core.config_store import ConfigStore

    from lrft.config.compose import compose

    ConfigStore.instance().store(name="memory_schema", node=MemoryConfig)
    return compose(with_objective(overrides), "memory")


def with_objective(overrides: list[str]) -> list[str]:
    """The ``objective`` group appended to memory.yaml's defaults (``+objective=``; sft unless named),
    and, for a pair objective with no dataset named, ``dataset=preference``: its max_length is what
    the pairs are planned at, and any other dataset kind would be refused as training refuses it."""
    from lrft.objectives.schemas import OBJECTIVES

    out, name = [], None
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "objective":
            name, o = value, f"+objective={value}"
        out.append(o)
    spec = OBJECTIVES.get(name or "sft")
    named = {o.partition("=")[0].lstrip("+") for o in overrides}
    if spec is not None and spec.paired and not named & {"dataset", "recipes"}:
        out.append("dataset=preference")
    return out if name is not None else [*out, "+objective=sft"]


def expand(overrides: list[str]) -> list[list[str]]:
    """Every combination of the listed values (``key=a,b``), in order, at most MAX_COLUMNS."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # the override grammar's own message
        raise UserError(f"Cannot parse the overrides {overrides}: {err}") from None
    choices = []
    for ov, text in zip(parsed, overrides, strict=True):
        key = text.split("=", 1)[0]
        choices.append(
            [f"{key}={v}" for v in ov.sweep_string_iterator()] if ov.is_sweep_override() else [text]
        )
    combos = [list(c) for c in islice(product(*choices), MAX_COLUMNS + 1)]
    if len(combos) > MAX_COLUMNS:
        raise UserError(f"At most {MAX_COLUMNS} columns side by side: list fewer values.")
    return combos


def compose_column(combo: list[str], several_methods: bool) -> tuple[DictConfig, list[str]]:
    """Compose one column; beside other methods, ``method.*`` keys it lacks are left out (and said)."""
    from lrft.methods.registry import METHODS, get_method

    notes: list[str] = []
    if several_methods:
        method_keys = [o for o in combo if o.lstrip("+").startswith("method.")]
        name = compose_memory([o for o in combo if o not in method_keys]).method.name
        get_method(name)
        valid = {f.name for f in fields(METHODS[name].config)}
        dropped = [o for o in method_keys if o.lstrip("+").split("=", 1)[0].split(".")[1] not in valid]
        if dropped:
            notes.append(f"{name}: {', '.join(o.split('=')[0] for o in dropped)} do not apply")
        combo = [o for o in combo if o not in dropped]
    cfg = compose_memory(combo)
    from lrft.config.validate import check_objective
    from lrft.methods.registry import get_method as method_of
    from lrft.objectives import objective_name
    from lrft.objectives.schemas import OBJECTIVES

    method_of(cfg.method.name).validate(cfg)  # e.g. full fine-tuning of a quantized base is refused
    if OBJECTIVES[objective_name(cfg)].paired:  # as lrft train: pairs need preference data, ...
        check_objective(cfg)  # (sft on a preference dataset's max_length is a fair comparison)
    return cfg, notes


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render(columns: list[tuple[str, Any]], cfg: DictConfig, source: str, budget: float | None) -> Table:
    """One row per quantity, one column per planned configuration."""
    first = columns[0][1]
    gc_on = bool(cfg.trainer.gradient_checkpointing)
    plans = [p for _, p in columns]
    paired = any(p.rows_per_example > 1 for p in plans)
    with_kl = any(p.kl_rows for p in plans)
    shapes = [" (pairs: 2×B rows, chosen+rejected)"] if paired else []
    shapes += [" (kto: B examples + B KL rows)"] if with_kl else []
    rows = "".join(shapes)
    title = (
        f"{cfg.model.name}: batch {first.batch_size}{rows} x {first.seq_len} tokens, "
        f"model.dtype={cfg.model.dtype}, quantization={cfg.quantization.name}"
    )
    table = Table(title=title, caption=f"config: {source}", title_justify="left", caption_justify="left")
    table.add_column("")
    for label, _ in columns:
        table.add_column(label, justify="right")

    def row(name: str, cells: list[str], style: str | None = None) -> None:
        table.add_row(name, *cells, style=style)

    row(
        "trainable params",
        [f"{count(p.params_trainable)} ({p.params_trainable / p.params_total:.2%})" for p in plans],
    )
    order = {"base": 0, "adapter": 1, "buffers": 2, "gathered": 3}
    weight_rows = sorted({k for p in plans for k in p.weights}, key=lambda k: (order[k.split()[0]], k))
    for key in weight_rows:
        row(f"weights: {key}", [size(p.weights[key]) if key in p.weights else "-" for p in plans])
    row("gradients", [size(p.gradients) for p in plans])
    row("optimizer state", [f"{size(p.optimizer)} {p.optimizer_name}" for p in plans])
    layer_cells = []
    for p in plans:
        lay = p.activations.layers
        lo, hi = (min(lay), max(lay)) if lay else (0, 0)
        layer_cells.append(size(hi) if lo == hi else f"{size(lo)}-{size(hi)}")
    if paired or with_kl:
        row("objective", [_rows(p) for p in plans])
    row("saved per block", layer_cells)
    row("kept per block, checkpointed", [size(p.activations.layer_inputs / max(1, p.blocks)) for p in plans])
    row("saved outside blocks", [size(p.activations.outside) for p in plans])
    for gc in (False, True):
        on = gc == gc_on
        suffix = ", checkpointed" if gc else ""
        kept = [size(p.activations.checkpointed if gc else p.activations.total) for p in plans]
        what = " (2×B rows: chosen+rejected)" if paired else ""
        row(f"activations{what}{suffix}", kept, "bold" if on else None)
        if any(p.reference is not None for p in plans):
            _reference_rows(row, plans, gc, suffix, with_kl)
        row(f"step peak{suffix}", [size(p.peak[gc]) for p in plans], "bold" if on else None)
        row(f"total{suffix}", [size(p.total(gc)) for p in plans], "bold green" if on else None)
    if any(p.offload_peak is not None for p in plans):
        cells = ["-" if p.offload_peak is None else size(p.offload_peak) for p in plans]
        row("step peak, checkpointed + offloaded", cells)
    if any(p.plain_peak is not None for p in plans):
        cells = ["-" if p.plain_peak is None else size(p.plain_peak) for p in plans]
        row("step peak, full logits (loss_chunk=0)", cells)
    if paired or with_kl:
        row("logits f32 at once (sequence_logps: positions x V)", [_logits(p) for p in plans])
    if any(p.reference_refused for p in plans):
        cells = [size(p.reference_copy) if p.reference_refused else "-" for p in plans]
        row("reference copy (refused: weights outside adapters train; not in totals)", cells, "bold red")
    if budget is not None:
        _budget_rows(row, plans, budget)
    return table


def _rows(plan: Any) -> str:
    ref = ", + reference" if plan.reference is not None and plan.reference[False].transient else ""
    b = plan.batch_size
    if plan.kl_rows:
        return f"{plan.objective}: {b} examples + {plan.kl_rows * b} KL rows{ref}"
    if plan.rows_per_example == 1:
        return f"{plan.objective}: {b} rows"
    return f"{plan.objective}: {b} pairs = {plan.rows_per_example * b} rows{ref}"


def _logits(plan: Any) -> str:
    """The float32 logits ``sequence_logps`` holds at once: one chunk, or every position."""
    if not plan.logits_f32:
        return "-"
    rows = plan.batch_size * plan.rows_per_example
    whole = plan.logits_positions >= rows * plan.seq_len
    return f"{size(plan.logits_f32)} ({'every' if whole else 'a chunk of'} {plan.logits_positions} positions)"


def _reference_rows(row: Any, plans: list[Any], gc: bool, suffix: str, with_kl: bool) -> None:
    """The step's phases: KTO's KL pass before the training forward (no grad), the training
    forward + backward, the no-grad reference forward's transient and what it sits on; the step
    peak is the largest (``ReferenceParts.peak``)."""

    def cells(fn: Any) -> list[str]:
        return ["-" if p.reference is None else fn(p.reference[gc]) for p in plans]

    if with_kl:
        kl = ["-" if p.reference is None or not p.kl_rows else size(p.reference[gc].prepare) for p in plans]
        row(f"KL rows pass before forward (no grad){suffix}", kl)
    row(f"training forward + backward peak{suffix}", cells(lambda r: size(r.train)))
    row(
        f"reference forward (no grad): transient + held{suffix}",
        cells(lambda r: f"{size(r.transient)} + {size(r.held)}"),
    )


def _budget_rows(row: Any, plans: list[Any], budget: float) -> None:
    """The fastest plan in ``budget`` GiB, for each column (lrft.memory.choose)."""
    chosen = [p.choice for p in plans]

    def cells(fn: Any) -> list[str]:
        return ["does not fit" if c is None else fn(c) for c in chosen]

    head = f"plan in {budget:g} GiB: "
    row(head + "micro-batch x accum", cells(lambda c: f"{c.batch_size} x {c.grad_accum}"), "bold cyan")
    row(head + "checkpointed blocks", cells(lambda c: f"{c.checkpointed}/{c.blocks}"), "bold cyan")
    row(head + "offload", cells(lambda c: "yes" if c.offload else "no"), "bold cyan")
    row(head + "est. step time", cells(lambda c: f"x{c.step_time:.2f}"), "bold cyan")
    row(head + "total", cells(lambda c: size(c.total)), "bold cyan")


FOOTER = (
    "activations: what autograd keeps for backward (checkpointed: every block's inputs plus one "
    "block recomputed), split into saved per block and outside them. step peak: the most a forward "
    "+ backward hold at once beyond weights and optimizer state (activations, gradients as backward "
    "writes them, transients), simulated on the meta device. total = weights + optimizer state + "
    "max(step peak, gradients); the CUDA context (~0.5 GiB), allocator rounding and fragmentation and "
    "the optimizer step's temporaries come on top. GiB = 2^30 bytes. Bold: "
    "trainer.gradient_checkpointing={gc}. A causal LM's loss runs in chunks of trainer.loss_chunk "
    "positions (the full-logits row: loss_chunk=0). plan in B GiB: the fastest plan that fits "
    "(the global batch kept; step time by FLOPs, 1 = no recomputation; lrft.memory.choose); "
    "trainer.memory_plan=auto memory.budget_gb=B applies it to a run."
)


PAIRS_FOOTER = (
    "Preference objectives: trainer.batch_size counts pairs, each 2 rows (chosen, rejected), or for "
    "KTO labelled examples, each 1 row plus 1 mismatched KL row, every row up to dataset.max_length "
    "tokens. Their log-probs (lrft.objectives.preference.sequence_logps) are counted as the code "
    "allocates them: the head projects trainer.loss_chunk positions at a time, each chunk "
    "checkpointed, so forward keeps per-position log-probs and backward recomputes one chunk's "
    "logits (their float32 copy and log-softmax) at a time; the logits row is the float32 logits "
    "held at once (every position with loss_chunk=0, also the full-logits step row). DPO, IPO and "
    "KTO run a reference forward of the training rows without gradients (the adapters switched "
    "off): it keeps nothing, but its transient (one block's working set, one chunk of logits) comes "
    "on top of what the training forward still holds. KTO first scores every micro-batch's KL rows "
    "without gradients (policy, then reference), before the training forward: nothing is held "
    "beneath it. step peak = max(KL pass, training forward + backward peak, held + transient)."
)


def memory_main(argv: list[str]) -> int:
    """Entry point of ``lrft memory`` (key=value overrides, Hydra syntax)."""
    out = Console(width=None if Console().is_terminal else 200)
    if any(a in ("-h", "--help", "help") for a in argv):
        out.print(USAGE, markup=False, highlight=False)
        return 0
    from lrft.memory.choose import choose, shard_plan  # torch: after --help, which must stay fast
    from lrft.memory.plan import Planner

    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise UserError(f"lrft memory takes key=value overrides only, not {flags[0]}.")
    combos = expand(argv)
    method_lists = [o for o in argv if o.split("=", 1)[0] == "method" and "," in o]
    columns: list[tuple[str, Any]] = []
    skipped: list[str] = []
    notes: list[str] = []
    cfg = source = None
    labels = _labels(combos)
    for combo, label in zip(combos, labels, strict=True):
        try:
            ccfg, cnotes = compose_column(combo, bool(method_lists))
        except UserError as err:
            if len(combos) == 1:
                raise
            skipped.append(f"{label}: {err}")
            continue
        planner = Planner(ccfg)
        plan = shard_plan(planner.plan(), planner, ccfg.memory)
        budget = ccfg.memory.budget_gb
        try:
            refuse_reference(plan, ccfg, budget)
        except UserError as err:
            if len(combos) == 1:
                raise
            skipped.append(f"{label}: {err}")
            continue
        if budget is not None:
            g = int(ccfg.trainer.batch_size) * int(ccfg.trainer.grad_accum)
            plan.choice = choose(planner, plan.resident, plan.gradients, int(budget * GIB), g)
        label = label or str(ccfg.method.name)
        notes += cnotes + [f"{label}: {n}" for n in plan.notes]
        columns.append((label, plan))
        cfg, source = cfg or ccfg, source or planner.config_source
    if not columns:
        raise UserError("No column could be planned:\n  " + "\n  ".join(skipped))
    out.print(render(columns, cfg, source, cfg.memory.budget_gb))
    out.print(FOOTER.format(gc=str(cfg.trainer.gradient_checkpointing).lower()), highlight=False)
    if any(p.rows_per_example > 1 for _, p in columns):
        out.print(PAIRS_FOOTER, highlight=False)
    for line in [*notes, *(f"not planned: {s}" for s in skipped)]:
        out.print(f"- {line}", highlight=False, markup=False)
    return 0


def refuse_reference(plan: Any, cfg: DictConfig, budget: float | None) -> None:
    """A reference objective where parameters outside the adapters train: lrft train refuses it
    (``check_reference``): no plan fits a budget, so a budget refuses it too; without one, the
    table shows the copy a reference would need and a note says what works."""
    from lrft.memory.preference import WHAT_WORKS

    if not plan.reference_refused:
        return
    what = (
        f"objective={plan.objective} with method={cfg.method.name}: {plan.reference_refused} "
        f"({size(plan.reference_copy)}), which lrft train refuses"
    )
    if budget is not None:
        raise UserError(f"{what}, so nothing fits memory.budget_gb={budget:g}. What works: {WHAT_WORKS}.")
    plan.notes.append(f"{what}: the totals are of a run that does not start. What works: {WHAT_WORKS}.")


def _labels(combos: list[list[str]]) -> list[str]:
    """Column names: the values that differ between combinations ("": the method's name)."""
    if len(combos) == 1:
        return [""]
    varying = [i for i in range(len(combos[0])) if len({c[i] for c in combos}) > 1]
    return [" ".join(c[i].split("=", 1)[1] for i in varying) for c in combos]
