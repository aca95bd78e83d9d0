"""Choose the fastest memory plan that fits a budget, and apply it to a run.

A plan is (micro-batch m, accumulation G/m so the global batch G stays, n of the L blocks
checkpointed, offload or not). Its memory is the planner's (:mod:`lrft.memory.plan`):
resident weights and optimizer state plus the step's peak simulated on meta. Its time is a FLOP
count relative to the same step without recomputation: a forward costs 1, backward 2 when the base
weights train (gradients of inputs and of weights) or 1 when they are frozen (inputs only: the
adapters' own terms are small), and each checkpointed block runs its forward once more, so

    relative step time = 1 + (n / L) / (1 + backward)

(the head and embeddings are left out of the blocks' share). Offloading is assumed to overlap with
compute (it runs on a side stream) but is chosen only where no plan without it fits: its copies
cost host bandwidth that this count cannot see. Among equally fast plans the larger micro-batch
wins: fewer, larger matmuls. A method that keeps less per block (LoRA-FA) fits with fewer
checkpointed blocks or a larger micro-batch at the same budget: that is where its speed shows.

Search: the step's peak is simulated at m = 1 and 2 with none and every block checkpointed; peaks
are close to linear in m and in n, so every divisor of G gets an estimate of its fewest blocks;
the best estimate is then simulated and corrected one block at a time until it fits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lrft.errors import UserError

GIB = 1 << 30
MAX_VERIFIED = 3  # candidate micro-batches simulated exactly, fastest estimates first


@dataclass
class Choice:
    """One plan: what a run sets (trainer.*) and what the planner says it costs."""

    batch_size: int
    grad_accum: int
    checkpointed: int  # blocks recomputed in backward, of ``blocks``
    blocks: int
    offload: bool
    total: int  # bytes per device, simulated
    step_time: float  # relative to the same step without recomputation

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_gib": round(self.total / GIB, 3)}

    def describe(self) -> str:
        off = ", offloaded" if self.offload else ""
        return (
            f"micro-batch {self.batch_size} x accumulation {self.grad_accum}, "
            f"{self.checkpointed}/{self.blocks} blocks checkpointed{off}: "
            f"{self.total / GIB:.2f} GiB, step time x{self.step_time:.2f}"
        )


def relative_time(n: int, blocks: int, frozen_base: bool) -> float:
    backward = 1.0 if frozen_base else 2.0
    return 1.0 + (n / blocks) / (1.0 + backward) if blocks else 1.0 + float(n > 0) / (1.0 + backward)


def divisors(g: int) -> list[int]:
    return [m for m in range(g, 0, -1) if g % m == 0]


class Chooser:
    """Plans for one planner (one composed config) at one budget; simulated peaks are cached."""

    def __init__(self, planner: Any, resident: int, gradients: int, budget: int) -> None:
        self.planner, self.resident, self.gradients, self.budget = planner, resident, gradients, budget
        self.blocks = planner.n_blocks
        self.frozen_base = not any(
            p.requires_grad for p in planner.model.parameters() if id(p) in planner.base_params
        )
        self._peaks: dict[tuple[int, int, bool], int] = {}

    def total(self, m: int, n: int, offload: bool = False) -> int:
        key = (m, n, offload)
        if key not in self._peaks:
            self._peaks[key] = self.planner.step_peak(m, n, offload=offload)
        return self.resident + max(self._peaks[key], self.gradients)

    def fits(self, m: int, n: int, offload: bool = False) -> bool:
        return self.total(m, n, offload) <= self.budget

    def estimate(self, m: int, n: int) -> float:
        """Total at (m, n), linear in m and n from the simulations at m = 1, 2 and n = 0, L."""
        top = self.blocks or 1

        def at(mb: int, k: int) -> float:
            return self.total(mb, k) + 0.0

        per_m = [(at(2, k) - at(1, k), at(1, k)) for k in (0, top)]
        lo, hi = ((slope * (m - 1) + one) for slope, one in per_m)
        return lo + (hi - lo) * n / top

    def fewest(self, m: int, offload: bool = False) -> int | None:
        """The fewest checkpointed blocks with which micro-batch ``m`` fits (None: none does)."""
        top = self.blocks or 1
        if not offload and self.fits(m, 0):
            return 0
        if not self.fits(m, top, offload):
            return None
        if offload:
            return top
        lo, hi = self.estimate(m, 0), self.estimate(m, top)
        n = top if lo <= hi else min(top, max(1, math.ceil(top * (lo - self.budget) / (lo - hi))))
        while n < top and not self.fits(m, n):
            n += 1
        while n > 1 and self.fits(m, n - 1):
            n -= 1
        return n

    def best(self, sizes: list[int]) -> Choice | None:
        """The fastest plan over the micro-batch ``sizes`` (divisors of the global batch)."""
        g = max(sizes)
        candidates = []
        for m in sizes:  # estimates first, so few sizes are simulated exactly
            est = [n for n in range(self.blocks + 1) if self.estimate(m, n) <= self.budget]
            if est:
                candidates.append((relative_time(est[0], self.blocks, self.frozen_base), -m, m))
        best: Choice | None = None
        for time, _, m in sorted(candidates)[:MAX_VERIFIED]:
            if best is not None and time > best.step_time:
                break  # estimates only grow when corrected: nothing later can be faster
            n = self.fewest(m)
            if n is not None:
                found = self._choice(m, g // m, n, False)
                if best is None or (found.step_time, -found.batch_size) < (best.step_time, -best.batch_size):
                    best = found
        if best is not None:
            return best
        for m in sorted(sizes):  # nothing fits without offloading: the smallest micro-batches first
            n = self.fewest(m, offload=True)
            if n is not None:
                return self._choice(m, g // m, n, True)
        return None

    def _choice(self, m: int, accum: int, n: int, offload: bool) -> Choice:
        time = relative_time(n, self.blocks, self.frozen_base)
        return Choice(m, accum, n, self.blocks, offload, self.total(m, n, offload), time)


def choose(
    planner: Any,
    resident: int,
    gradients: int,
    budget: int,
    global_batch: int,
    batch_size: int | None = None,
) -> Choice | None:
    """The fastest plan within ``budget`` bytes for ``global_batch`` examples per process and step.

    ``batch_size`` fixes the micro-batch (``trainer.gradient_checkpointing=auto`` alone): then only
    the checkpointed blocks are chosen."""
    c = Chooser(planner, resident, gradients, budget)
    if batch_size is not None:
        n = c.fewest(batch_size)
        return None if n is None else c._choice(batch_size, global_batch // batch_size, n, False)
    return c.best(divisors(global_batch))


def shard_plan(plan: Any, planner: Any, msec: Any) -> Any:
    """Per-device figures of a job over ``nodes x processes_per_node`` devices. FSDP (lrft's
    ``trainer.sharding=fsdp2``) divides weights, gradients and optimizer state, plus one gathered
    block (the largest decoder layer) at a time; DDP changes nothing. Activations stay per device."""
    from lrft.errors import one_of

    if msec.sharding in ("zero2", "zero3"):  # the DeepSpeed stages lrft refuses to train under
        raise UserError(
            f"memory.sharding={msec.sharding}: DeepSpeed is not supported by lrft train, so there is no "
            "such job to plan. memory.sharding=fsdp is lrft's trainer.sharding=fsdp2 (weights, gradients "
            "and optimizer state sharded, like ZeRO-3); ddp replicates."
        )
    one_of("memory.sharding", msec.sharding, SHARDINGS)
    n = int(msec.nodes) * int(msec.processes_per_node)
    if n < 1:
        raise UserError(f"memory.nodes x memory.processes_per_node must be >= 1, got {n}.")
    if msec.sharding in ("none", "ddp") or n == 1:
        return plan
    plan.gradients = -(-plan.gradients // n)
    plan.optimizer = -(-plan.optimizer // n)
    block = planner.largest_block()
    plan.weights = {k: -(-v // n) for k, v in plan.weights.items()}
    plan.weights["gathered block"] = block
    plan.notes.append(
        f"fsdp over {n} devices ({msec.nodes} node(s)): weights, gradients and optimizer state "
        f"divided by {n}, plus one gathered block ({block / GIB:.2f} GiB)."
    )
    return plan


SHARDINGS = ("none", "ddp", "fsdp")


def apply_plan(cfg: Any, engine: Any) -> tuple[Any, dict[str, Any] | None]:
    """``trainer.memory_plan=auto`` (micro-batch, accumulation, checkpointed blocks, offload) or
    ``trainer.gradient_checkpointing=auto`` (the blocks only) at ``memory.budget_gb``, or 90% of
    the CUDA device's memory: the config the run trains with, and the plan for run_info.json.
    Every process plans alike (the planner is deterministic), so all of them agree.

    A preference objective's micro-batch counts pairs (2 rows each) or KTO's labelled examples (1
    row + 1 KL row, :mod:`lrft.memory.preference`), so the accumulation keeps the global batch of
    them."""
    from types import SimpleNamespace

    from lrft.memory.plan import Planner, optimizer_state_bytes

    t = cfg.trainer
    whole = t.get("memory_plan", "none") == "auto"
    if not whole and t.gradient_checkpointing != "auto":
        return cfg, None
    budget_gb = cfg.memory.get("budget_gb")
    device = engine.accelerator.device
    what = "trainer.memory_plan=auto" if whole else "trainer.gradient_checkpointing=auto"
    if budget_gb is None:
        if device.type != "cuda":
            raise UserError(
                f"{what} needs memory.budget_gb=GiB (per device) on {device.type}: there is no device "
                "memory to plan for. Set memory.budget_gb, or choose trainer.gradient_checkpointing "
                "(false | true | N) and trainer.batch_size yourself."
            )
        import torch

        budget_gb = 0.9 * torch.cuda.get_device_properties(device).total_memory / GIB
    planner = Planner(cfg)
    if planner.pairs is not None and planner.pairs.refused:
        from lrft.memory.preference import WHAT_WORKS

        raise UserError(
            f"{what}: objective={planner.pairs.name} with method={cfg.method.name}: "
            f"{planner.pairs.refused}, which lrft does not make, so nothing fits. What works: {WHAT_WORKS}."
        )
    view = SimpleNamespace(
        weights=planner.weights(),
        gradients=planner.gradients(),
        optimizer=optimizer_state_bytes(planner.optimizer),
        notes=[],
    )
    world = engine.accelerator.num_processes
    sharding = "fsdp" if engine.sharded else "ddp"
    shard_plan(view, planner, SimpleNamespace(sharding=sharding, nodes=1, processes_per_node=world))
    resident = sum(view.weights.values()) + view.optimizer
    g = int(t.batch_size) * int(t.grad_accum)
    fixed = None if whole else int(t.batch_size)
    choice = choose(planner, resident, view.gradients, int(budget_gb * GIB), g, batch_size=fixed)
    if choice is None:
        unit = f" {planner.pairs.unit[:-1]}(s)" if planner.pairs else ""  # pair(s), example(s)
        smallest = Chooser(planner, resident, view.gradients, 0).total(1, planner.n_blocks, whole)
        raise UserError(
            f"{what}: nothing fits in memory.budget_gb={budget_gb:.2f} GiB. The smallest plan "
            f"(micro-batch {1 if whole else fixed}{unit}, every block "
            "checkpointed"
            f"{', offloaded' if whole else ''}) needs {smallest / GIB:.2f} GiB. Raise the budget, or "
            "save memory elsewhere: quantization=nf4, method=lora_fa, a shorter dataset.max_length."
        )
    out = cfg.copy()
    out.trainer.batch_size, out.trainer.grad_accum = choice.batch_size, choice.grad_accum
    out.trainer.gradient_checkpointing = choice.checkpointed
    out.trainer.offload_activations = bool(t.get("offload_activations")) or choice.offload
    info = {"setting": what, "budget_gb": round(budget_gb, 3), **choice.as_dict()}
    return out, {**info, "summary": choice.describe()}
