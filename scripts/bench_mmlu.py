"""MMLU throughput of ``lrft eval`` on the tiny LLaMA (CPU by default): questions per second for
0-shot and k-shot prompts, with and without reusing each subject's shared few-shot prefix through
its key/value cache (``reuse_prefix``). Figures go to docs/eval.md.

    python scripts/bench_mmlu.py                      # 4 subjects x 40 questions, shots 0 and 5
    python scripts/bench_mmlu.py --shots 0 1 5 --batch-sizes 1 8 --threads 2

The questions are synthetic but MMLU-sized: with the byte-level tokenizer (one token per byte)
a question is ~130 tokens and a 5-shot prompt ~900, close to real MMLU prompts in a BPE
tokenizer. The tiny model gets 4096 positions so no shot is dropped. Each setting runs
``--repeats`` times, the two prefix settings interleaved, and the best run is reported: wall-clock
questions/s and CPU ms/question (this process's CPU time, which a machine shared with other jobs
disturbs far less than wall time; with one thread the two agree on a quiet machine).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from lrft.config.compose import compose
from lrft.evaluate.mmlu import evaluate_mmlu, plan
from lrft.evaluate.mmlu_data import SUBJECTS, Question
from lrft.model.load import load_model, load_tokenizer
from lrft.schema import DatasetConfig

WORDS = ("the", "of", "a", "to", "in", "is", "that", "for", "it", "as", "was", "with", "on", "by", "be")


def sentence(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(WORDS))
    return " ".join(out).capitalize()


Data = dict[str, tuple[list[Question], list[Question]]]


def synthetic(subjects: int, questions: int, seed: int = 0) -> Data:
    rng = random.Random(seed)

    def one() -> Question:
        choices = tuple(sentence(rng, rng.randint(6, 20)) for _ in range(4))
        return Question(sentence(rng, rng.randint(40, 100)) + "?", choices, rng.randrange(4))

    return {s: ([one() for _ in range(5)], [one() for _ in range(questions)]) for s in SUBJECTS[:subjects]}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--questions", type=int, default=40, help="per subject")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = compose(["model=tiny_llama", "model.from_config.max_position_embeddings=4096"])
    torch.manual_seed(0)
    model = load_model(cfg.model).to(args.device).eval()
    tokenizer = load_tokenizer(cfg.model)
    full = synthetic(args.subjects, args.questions)
    n = args.subjects * args.questions
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"tiny_llama ({size:.2f}M parameters) on {args.device}, {torch.get_num_threads()} threads, ")
    print(f"{args.subjects} subjects x {args.questions} questions = {n}\n")
    print(
        "| shots | batch | prompt tokens (mean) | prefix reuse | questions/s (wall) | CPU ms/question "
        "| CPU time vs. no reuse |"
    )
    print("|---:|---:|---:|:---:|---:|---:|---:|")
    for shots in args.shots:
        data = {s: (dev[:shots], qs) for s, (dev, qs) in full.items()}
        dcfg = DatasetConfig(name="mmlu", kind="mmlu", shots=shots, max_length=4096)
        items, stats = plan(data, tokenizer, 4096, 1)
        assert stats["questions_with_fewer"] == 0
        mean_tokens = statistics.mean(len(i.ids) for i in items)
        for batch in args.batch_sizes:
            wall: dict[bool, list[float]] = {False: [], True: []}
            cpu: dict[bool, list[float]] = {False: [], True: []}
            answers = {}
            for _ in range(args.repeats):
                for reuse in (False, True):
                    tick, cpu_tick = time.perf_counter(), time.process_time()
                    report = evaluate_mmlu(model, tokenizer, dcfg, "test", batch, None, reuse, data=data)
                    wall[reuse].append(time.perf_counter() - tick)
                    cpu[reuse].append(time.process_time() - cpu_tick)
                    answers[reuse] = {s: r["correct"] for s, r in report["subjects"].items()}
            assert answers[True] == answers[False], "prefix reuse changed an answer"
            for reuse in (False, True):
                best_wall, best_cpu = min(wall[reuse]), min(cpu[reuse])
                print(
                    f"| {shots} | {batch} | {mean_tokens:.0f} | {'yes' if reuse else 'no'} | "
                    f"{n / best_wall:.1f} | {1000 * best_cpu / n:.1f} | {min(cpu[False]) / best_cpu:.2f}x |"
                )


if __name__ == "__main__":
    main()
