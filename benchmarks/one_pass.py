"""One evaluation pass for many settings against one pass per setting, side by side in one process.

The settings are those of ``jobs/configs/methods_toy.yaml`` (every method of the toy world), ``--counts`` of them
spread evenly over its list; for each count the same questions are answered twice into fresh folders:

- before: one Ray Data pass per setting (``answer_settings`` called with one setting at a time: the questions read
  and preprocessed, and the model loaded by each actor, once per setting, as every evaluation did before);
- after: one pass for all of them (``answer_settings`` with every setting).

Both must give the same answers, setting by setting (checked; a difference fails the script). Where the time goes
is estimated from pieces timed alone in this process: one question's preprocessing, one actor's model load, and the
generate calls' own wall time (the answers' ``e2e_ms``, summed over the actors); the rest is Ray Data's start-up
and scheduling. Results: ``benchmarks/RESULTS.md``, "One evaluation pass for every setting".

    python benchmarks/one_pass.py --counts 1 4 13 51 --questions 160
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lvpruning import PruningConfig, attach, from_pretrained, save_decision_modules  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.eval.evaluation import Benchmark, answer_settings, make_settings  # noqa: E402
from pipelines.eval.inference import InferenceOptions, Preprocessor, question_text, read_questions  # noqa: E402
from pipelines.eval.models import ModelSpec, Setting, load_settings  # noqa: E402
from pipelines.toy.base import SHIPPED_BASE_MODELS  # noqa: E402
from pipelines.toy.writer import ToyWorldPaths, write_toy_world  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "methods_toy.yaml"


def spread(settings: Sequence[Setting], n: int) -> list[Setting]:
    """``n`` settings spread evenly over the list (the first always in)."""
    n = min(n, len(settings))
    return [settings[round(i * len(settings) / n)] for i in range(n)]


def texts(folder: Path, setting: Setting) -> dict[str, str]:
    path = folder / setting.name / "toy.jsonl"
    return {str(a["question_id"]): a["text"] for a in map(json.loads, path.read_text().splitlines())}


def generation_seconds(folder: Path, settings: Sequence[Setting]) -> float:
    """The generate calls' wall time, summed over the actors (each answer carries its batch's share)."""
    total = 0.0
    for s in settings:
        for line in (folder / s.name / "toy.jsonl").read_text().splitlines():
            total += json.loads(line)["metadata"]["e2e_ms"] / 1e3
    return total


def piece_seconds(spec: ModelSpec, settings: Sequence[Setting], world: ToyWorldPaths, n: int) -> tuple[float, float]:
    """One question's preprocessing and one actor's model load (with every setting's policy), timed here."""
    records = read_questions(str(world.test_questions))[:n]
    pre = Preprocessor(spec.processor(), str(world.image_folder))
    t0 = time.perf_counter()
    for r in records:
        pre.request(question_text("toy", r), str(r["image"]))
    per_question = (time.perf_counter() - t0) / len(records)
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        load_settings(spec, settings)
        loads.append(time.perf_counter() - t0)
    return per_question, statistics.median(loads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toy/world", help="a written toy world (else one is written there)")
    parser.add_argument("--model", default=str(SHIPPED_BASE_MODELS["default"]))
    parser.add_argument("--modules", help="LVPruning's decision modules (default: fresh ones at layers 0, 1, 2)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 13, 51])
    parser.add_argument("--questions", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args(argv)

    ev = load_config(str(CONFIG), []).eval
    settings = make_settings(ev.methods, ev.schedules, ev.seed, ev.at_own_layers)
    world = ToyWorldPaths.under(Path(args.world))
    if not world.manifest.exists():  # its test split alone matters here: few training questions
        world = write_toy_world(args.world, n_train=200)
    scratch = Path(tempfile.mkdtemp(prefix="one-pass-"))
    modules = args.modules
    if modules is None:
        stages = PruningConfig(layers=(0, 1, 2), train_ratios=(0.5, 0.3, 0.1), infer_ratios=(0.5, 0.3, 0.1))
        modules = str(scratch / "modules")
        save_decision_modules(attach(from_pretrained(args.model), stages), modules)
    spec = ModelSpec(args.model, modules=modules)
    bench = [Benchmark("toy", str(world.test_questions), str(world.image_folder), str(world.test_answers))]
    options = InferenceOptions(batch_size=args.batch_size, num_actors=args.actors, max_questions=args.questions)
    per_question, load = piece_seconds(spec, settings, world, args.questions)
    print(
        f"{len(settings)} settings in {CONFIG.name}; {args.questions} questions, batch {args.batch_size}, "
        f"{args.actors} actors; preprocessing {1e3 * per_question:.1f} ms a question, model load {load:.2f} s"
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n in args.counts:
            chosen = spread(settings, n)
            walls, gens = {}, {}
            for mode in ("before", "after"):
                folder = scratch / f"{mode}-{n}"
                t0 = time.perf_counter()
                if mode == "before":
                    for s in chosen:
                        answer_settings(spec, [s], bench, folder, options)
                else:
                    answer_settings(spec, chosen, bench, folder, options)
                walls[mode], gens[mode] = time.perf_counter() - t0, generation_seconds(folder, chosen)
            differ = [s.name for s in chosen if texts(scratch / f"before-{n}", s) != texts(scratch / f"after-{n}", s)]
            if differ:
                print(f"error: answers differ between the two paths for {differ}", file=sys.stderr)
                return 1
            passes = {"before": len(chosen), "after": 1}
            for mode in ("before", "after"):
                pre = passes[mode] * args.questions * per_question
                loading = passes[mode] * args.actors * load
                rows.append((n, mode, walls[mode], pre, loading, gens[mode]))
            print(
                f"{len(chosen)} settings: before {walls['before']:.1f} s, after {walls['after']:.1f} s "
                f"({walls['before'] / walls['after']:.2f}x), same answers",
                flush=True,
            )
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    one = {mode: wall for n, mode, wall, *_ in rows if n == args.counts[0]}
    print("\n| settings | path | wall s | x one setting | preprocessing s | model loads s | generation s (actors) |")
    print("|---|---|---|---|---|---|---|")
    for n, mode, wall, pre, loading, gen in rows:
        print(f"| {n} | {mode} | {wall:.1f} | {wall / one[mode]:.2f} | {pre:.1f} | {loading:.1f} | {gen:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
