"""How good must replay be to beat distillation? RECALL replaying the toy GAN at several domain shifts, against MiB
and against RECALL without replay, over seeds, each seed owning its whole chain.

    python benchmarks/dose_response.py [--seeds 0 1 2] [--shifts 0 0.5 1 1.5 2] [--protocols 15-1x5 10-1x10]
                                       [--jobs 2] [--out dose.json] [--figure dose.png]
                                       [--work DIR] [--data DIR] [--pretrain-threads N]

What changes from level to level is what the generator *renders*, nothing else: `replay.source.render_shift` scales
the domain shift the toy GAN draws for a class made from a toy-world class (0: that class's own style, as the
toy world draws it; 1: the toy ImageNet's look-alike, the GAN of the study and the demo; 2: twice as far). The toy
ImageNet, hence the pretrained encoder and classifier, and the class map (made once per seed by that classifier, as
the study makes it) are the same at every level; so are the step-0 model and the schedule (the study's toy budget).
Each level is scored against the simulation's truth by the run's own statistics: the replay labels' IoU against the
generator's true masks (the step-0 model's labels of the step-0 classes, the helpers' of the later ones).

Per seed (in `work/s<seed>`, laid out as benchmarks/regime.py's: a shared --work shares the pretraining and step-0
models; `--pretrain-threads 1` pretrains as the study's float_order chain, so two seeds share two cores): the toy-GAN
class map, one pool per level, RECALL per protocol and level, and the two reference lines, MiB and RECALL with
`method.replay_ratio=0` (inpainting alone). The JSON holds every seed's numbers, the mean ± sample std per cell and
paired verdicts (the study's rule: every seed agrees in sign and |mean difference| > the differences' sample std)
of RECALL at each level against each reference (recall.dose_response). docs/results.md quotes the study's run of the
same design (study/spec.yaml's dose_response section, its stage writes docs/dose_response.json): this benchmark is for
other levels, seeds or protocols; write its report elsewhere (docs/dose_response.json is the study stage's output).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import regime
from regime import add_chain_options, pretrained, recall_run, step0_model, use_chain_options
from tqdm import tqdm

import recall.dose_response
# METRICS and scored are re-exported to the other benchmarks
from recall.dose_response import METRICS, POINTS, figure, level_line, levels_figure, scored, summary  # noqa: F401

ROOT = regime.ROOT
SHIFTS = (0.0, 0.5, 1.0, 1.5, 2.0)
PROTOCOLS = ("15-1x5", "10-1x10")
REFERENCES = {"mib": ["method=mib"], "no_replay": ["method=recall", "method.replay_ratio=0"]}
assert tuple(REFERENCES) == recall.dose_response.REFERENCES  # the lines summary() compares against
# RECALL runs placed on the same axes as the levels (recall.dose_response.POINTS, by their own label quality): web
# replay (the Flickr stand-in through its local server, as the study's recall_web) and the study's oracle labels at
# the look-alike's level


def toy_gan(seed: int, work: Path, shift: float | None = None) -> list[str]:
    """The overrides pointing replay=toy_gan at the seed's chain (its classifier, class map, generator seed) and, for
    a level, at that level's pool."""
    chain, pretrain = work / f"s{seed}", pretrained(seed, work)
    overrides = ["replay=toy_gan", f"replay.classifier.weights={pretrain / 'classifier.pth'}",
                 f"replay.classifier.names={pretrain / 'classes.json'}",
                 f"replay.mapping={chain / 'toy_gan_mapping.json'}", f"replay.source.seed={seed}"]
    if shift is not None:
        overrides += [f"replay.source.render_shift={shift}", f"replay.pool={chain / 'pools' / f'toy_gan_shift{shift}'}"]
    return overrides


def stage(module: str, *overrides: str) -> None:
    subprocess.run([sys.executable, "-m", module, "--params", "params.yaml", *overrides,
                    f"dataset.root={regime.DATA}", "tracking.uri="], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def class_map(seed: int, work: Path) -> dict:
    """The seed's toy-GAN class map (one for every level), made once; returns its score against the truth."""
    mapping = work / f"s{seed}" / "toy_gan_mapping.json"
    check = mapping.with_name(f"{mapping.stem}_check.json")
    if not check.is_file():
        stage("recall.stages.classmap", *toy_gan(seed, work))
    truth = json.loads(check.read_text())["truth"]
    return {"correct": truth["correct"], "classes": truth["classes"]}


def web(seed: int, work: Path) -> list[str]:
    """The overrides of the seed's web replay: the Flickr stand-in's photos of that seed, its own pool."""
    return ["replay=web", f"replay.source.standin.seed={seed}", f"replay.pool={work / f's{seed}' / 'pools' / 'web'}"]


def point(name: str, seed: int, work: Path) -> list[str]:
    return ["method=recall", *(web(seed, work) if name == "web" else [*toy_gan(seed, work, 1.0),
                                                                       "method.labels=oracle"])]


def pool(seed: int, shift: float | None, work: Path) -> None:
    """A level's toy-GAN pool (shift None: the seed's web pool)."""
    name = "web" if shift is None else f"toy_gan_shift{shift}"
    if not (work / f"s{seed}" / "pools" / name).is_dir():
        stage("recall.stages.pool", *(web(seed, work) if shift is None else toy_gan(seed, work, shift)))


def prepare(threads, seeds: list[int], protocols: list[str], work: Path, levels, extra=None) -> list[tuple]:
    """What a benchmark on these chains makes before its runs, `threads` at a time: each seed's pretraining, its pools
    of `levels` (a render shift; None: the web pool), `extra(seed)` if given (a pool of the benchmark's own), then the
    step-0 models (before the runs that start from them: two runs of one seed must not both make one). Returns the
    (seed, protocol) pairs, protocol by protocol."""
    list(threads.map(lambda seed: pretrained(seed, work), seeds))
    list(threads.map(lambda job: pool(*job, work), [(s, x) for s in seeds for x in levels]))
    if extra is not None:
        list(threads.map(extra, seeds))
    pairs = [(s, p) for p in protocols for s in seeds]
    list(threads.map(lambda job: step0_model(job[1], job[0], work), pairs))
    return pairs


def run(seed: int, protocol: str, name: str, overrides: list[str], work: Path) -> dict:
    run_dir = work / f"s{seed}" / f"{name}_{protocol}_toy_budget"  # regime.py's name for its toy-budget runs
    if not (run_dir / "metrics.json").is_file():
        recall_run(f"protocol={protocol}", f"step0={step0_model(protocol, seed, work)}", f"run_dir={run_dir}",
                   f"seed={seed}", f"model.pretrained_file={pretrained(seed, work) / 'encoder.pth'}", *overrides)
    return scored(run_dir)


def jobs(seeds: list[int], shifts: list[float], protocols: list[str], work: Path) -> list[tuple]:
    """Every run, as (seed, protocol, name, overrides, shift), the longest first (10-1x10 before 15-1x5)."""
    out = []
    for protocol in regime.longest_first(protocols):
        for seed in seeds:
            out += [(seed, protocol, name, overrides, None) for name, overrides in REFERENCES.items()]
            out += [(seed, protocol, level_line(s), ["method=recall", *toy_gan(seed, work, s)], s)
                    for s in shifts]
            out += [(seed, protocol, name, point(name, seed, work), None) for name in POINTS]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chain_options(parser, PROTOCOLS)
    parser.add_argument("--shifts", type=float, nargs="+", default=list(SHIFTS))
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args(argv)
    if not all(0 <= s <= 3 for s in args.shifts):
        parser.error("--shifts: the toy GAN's render_shift must be in [0, 3]")
    use_chain_options(parser, args)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as threads:
        work = (args.work or Path(tmp)).resolve()
        list(threads.map(lambda seed: pretrained(seed, work), args.seeds))  # the chains first, two at a time
        maps = dict(zip(args.seeds, threads.map(lambda seed: class_map(seed, work), args.seeds)))
        list(threads.map(lambda job: pool(job[0], job[1], work),
                         [(s, x) for s in args.seeds for x in [*args.shifts, None]]))
        # the step-0 models before the runs that start from them (two runs of one seed must not both make it)
        list(threads.map(lambda job: step0_model(job[1], job[0], work),
                         [(s, p) for p in args.protocols for s in args.seeds]))
        todo = jobs(args.seeds, args.shifts, args.protocols, work)
        results = list(tqdm(threads.map(lambda job: run(job[0], job[1], job[2], job[3], work), todo),
                            total=len(todo), desc="dose-response runs", unit="run"))
    records = regime.by_seed([(seed, protocol, name) for seed, protocol, name, *_ in todo], results)
    report = {"seeds": args.seeds, "shifts": args.shifts, "protocols": args.protocols, "chain": regime.PRETRAIN,
              "class_map": {str(s): m for s, m in maps.items()},
              "class_map_correct": {"fewest": min(m["correct"] for m in maps.values()),
                                    "classes": max(m["classes"] for m in maps.values())}, "records": records,
              **summary(records, args.seeds, args.shifts, args.protocols)}
    if args.figure:
        figure(report, args.figure)
        if args.work:  # the pools are kept: what each level looks like, beside the figure
            pools = args.work.resolve() / f"s{args.seeds[0]}" / "pools"
            levels_figure({s: pools / f"toy_gan_shift{s}" for s in args.shifts},
                          args.figure.with_name(f"{args.figure.stem}_levels.png"))
    regime.publish(report, [report["table"]], args.out)  # last: the figures it describes are written
    return 0


if __name__ == "__main__":
    sys.exit(main())
