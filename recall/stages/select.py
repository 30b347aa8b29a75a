"""`recall select`: RECALL+'s selection of a replay pool's images (recall.selection), a new pool; the source pool
is read, never changed, and nothing is crawled or generated again.

    recall select replay=web step0=RUN_DIR [protocol=15-1x5] [select.pool=DIR] [select.*=...]
        -> select.pool (a pool of the kept images, copied byte for byte; each record adds `selected_from` (its id in
                    the source pool), `select_domain`, `select_content` and `select_reason`)
           <select.pool>/selection.jsonl (every candidate: scores, thresholds, kept or the reason it was dropped)
           select.metrics (counts per class and reason; with a simulated source, the drops against its truth)

`step0` is the finished step-0 run of the protocol whose replay this pool serves: its model scores the images and
its training images (step 0's, as `recall run` selects them) are the data they are compared with. Replay the
selection with `recall run ... replay=web replay.pool=<select.pool>`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from recall.atomic import write_bytes, write_json
from recall.commands import compose, script, with_overrides
from recall.config import section
from recall.data.datasets import dataset_class_names
from recall.data.protocol import select_train_images, steps
from recall.data.transforms import eval_transform
from recall.data.voc import VOCSegmentation, image_classes, read_split
from recall.errors import UserError
from recall.labeling import same_size_batches
from recall.model import ModelConfig, load_checkpoint
from recall.ownership import Marker, claim, staged
from recall.registry import resolve
from recall.replay.pool import FORMAT_VERSION, PoolDataset, ReplayPool, pool_owner
from recall.selection import SelectConfig, class_share, decide, domain_scores, pooled, quantile, selection_score

SELECTION_NAME = "selection.jsonl"
BATCH = 64


def _options(cfg) -> tuple[SelectConfig, Path, Path]:
    opts = OmegaConf.to_container(cfg.select, resolve=True)
    target = Path(opts.pop("pool") or f"{cfg.replay.pool}_selected")
    metrics = Path(opts.pop("metrics") or f"{target}.json")
    opts["seed"] = int(cfg.seed) if opts.get("seed") is None else opts["seed"]
    try:
        return SelectConfig(**opts), target, metrics
    except (TypeError, ValueError) as error:
        raise UserError(f"select: {error}") from None


SUMMARY_KEYS = frozenset({"images", "kept", "reasons", "domain_threshold", "content_thresholds", "per_class", "params"})


def _check_metrics_path(path: Path, target: Path, source: Path) -> None:
    """`select.metrics` is written after the selection: refuse, before any work, a path that would clobber what is
    not ours (a file that is not an earlier selection's summary, a directory, a path inside the pool it replaces or
    the pool it reads). SUMMARY_KEYS are keys `_summary` writes (a test holds them to it)."""
    resolved = path.resolve()
    for option, pool in (("select.pool", target), ("replay.pool", source)):
        if resolved == pool.resolve() or pool.resolve() in resolved.parents:
            raise UserError(f"select.metrics={path} lies in {option} ({pool}): pass a path outside both pools "
                            f"(default: {target}.json)")
    if path.is_dir():
        raise UserError(f"select.metrics={path} is a directory: pass the path of a JSON file (default: {target}.json)")
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            old = None
        if not (isinstance(old, dict) and SUMMARY_KEYS <= set(old)):
            raise UserError(f"select.metrics={path} exists and is not an earlier selection's summary: it is left as "
                            "it is; pass another path, or remove the file if you no longer need it")


def _batches(sizes: list[tuple[int, int]], batch: int = BATCH) -> list[list[int]]:
    """Indices in batches of one image size each (real images come in many sizes; the model sees whole images)."""
    return same_size_batches([{"height": h, "width": w} for h, w in sizes], batch)


@torch.no_grad()
def _score(model, load, sizes: list[tuple[int, int]], classes: list[list[int]], channel_classes: list[int],
           desc: str) -> tuple[torch.Tensor, list[list[float | None]]]:
    """For image i (`load(i)`: its model input; `sizes[i]`: (H, W)): its pooled encoder features, and for each class
    of `classes[i]` the share of its pixels the model labels with that class (None: a class the model does not
    know). One forward per image, in batches of one size, loaded batch by batch."""
    features: list[torch.Tensor | None] = [None] * len(sizes)
    shares: list[list[float | None]] = [[] for _ in sizes]
    known = set(channel_classes[1:])
    for idx in tqdm(_batches(sizes), desc=desc, leave=False):
        out = model(torch.stack([load(i) for i in idx]))
        pooled_features = pooled(out["encoder"])
        for k, i in enumerate(idx):
            features[i] = pooled_features[k]
            wanted = classes[i]
            share = class_share(out["out"][k:k + 1].expand(len(wanted), -1, -1, -1), channel_classes, wanted) \
                if wanted else torch.empty(0)
            shares[i] = [float(v) if c in known else None for v, c in zip(share.tolist(), wanted)]
    return torch.stack(features), shares


def _where(path: Path) -> str:
    """A path as the marker records it: relative to the working directory when inside it (a DVC stage's output then
    holds no path of this clone), else absolute."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd().resolve())) if path.is_relative_to(Path.cwd().resolve()) else str(path)


def _target(cfg, opts: SelectConfig, target: Path, source: ReplayPool) -> Marker:
    """The selected pool's marker, and the claim on `target` (before any work: a refusal comes first)."""
    params = {"from": _where(source.root), "step0": _where(Path(cfg.step0)),
              "protocol": str(cfg.protocol.name), "setting": str(cfg.setting.name), "seed": int(cfg.seed),
              "select": dataclasses.asdict(opts)}
    owner = pool_owner(source.root) or {}
    source_params = owner.get("params") or {"source": None}
    marker = Marker("pool", "recall select", {"source": source_params.get("source"),
                                              "source_params": source_params.get("source_params"),
                                              "selection": params})
    claim(target, marker, "select.pool", accepts=lambda found: None if found.get("params") == marker.params else
          "it holds another selection (other source pool, step-0 run or select.* options): pass select.pool= a "
          "new directory")
    return marker


def select_pool(cfg) -> dict:
    """Score every image of `replay.pool` against step 0's model and training images, keep or drop it, and write
    the kept ones as a new pool with the scores; returns the summary (also written to `select.metrics`)."""
    opts, target, metrics_path = _options(cfg)
    _check_metrics_path(metrics_path, target, Path(cfg.replay.pool))
    source = ReplayPool(cfg.replay.pool)
    if source.summary() is None:
        raise UserError(f"replay pool {source.root} is not built (no {source.summary_path.name}): build it first with "
                        f"`recall pool replay={cfg.replay.name}`")
    if Path(target).resolve() == source.root.resolve():
        raise UserError(f"select.pool is the pool it selects from ({target}): pass select.pool= a new directory")
    if not cfg.step0:
        raise UserError("recall select needs step0=RUN_DIR: the finished step-0 run whose model scores the pool")
    checkpoint = Path(cfg.step0) / "steps" / "0" / "model.pt"
    if not checkpoint.is_file():
        raise UserError(f"step0={cfg.step0} has no finished step 0 ({checkpoint} is missing): train it first "
                        "(`recall run ... last_step=0`)")
    d, num_classes = cfg.dataset, int(cfg.dataset.num_classes)
    task = steps(str(cfg.protocol.name), num_classes)
    model, meta = load_checkpoint(checkpoint, section(cfg.model, ModelConfig))
    if list(meta["classes_per_step"])[:1] != [len(task[0])]:
        raise UserError(f"step0={cfg.step0} learnt {meta['classes_per_step'][0]} classes at step 0, protocol "
                        f"{cfg.protocol.name} {len(task[0])}: pass the step-0 run of this protocol")
    marker = _target(cfg, opts, target, source)
    data = PoolDataset(source.root, transform=eval_transform())
    if data.problems:
        raise UserError(f"replay pool {source.root}: {len(data.problems)} unusable image(s), e.g. "
                        f"{data.problems[0][0]}: {data.problems[0][1]}; rebuild it with `recall pool "
                        f"replay={cfg.replay.name}`")
    if not len(data):
        raise UserError(f"replay pool {source.root} holds no image: nothing to select")
    model.eval()
    torch.set_num_threads(max(1, int(cfg.train.get("threads") or 1)))
    channel_classes = [0, *task[0]]
    names = dataset_class_names(d)

    # the step-0 training images (a sample), each scored once: features, and the share of each step-0 class it holds
    present = image_classes(d.root, read_split(d.root, d.train_split), num_classes=num_classes, mask_dir=d.mask_dir,
                            image_dir=d.image_dir, progress=False)
    ids = select_train_images(present, task, 0, str(cfg.setting.name), seed=int(cfg.seed))
    if not ids:
        raise UserError(f"step 0 of {cfg.protocol.name} has no training image in {d.root}: check dataset.root")
    rng = np.random.default_rng(opts.seed)
    ids = sorted(rng.choice(ids, size=min(len(ids), opts.max_train_images), replace=False).tolist())
    train = VOCSegmentation(d.root, d.train_split, ids=ids, num_classes=num_classes, mask_dir=d.mask_dir,
                            image_dir=d.image_dir, transform=eval_transform())
    train_classes = [sorted(c for c in present[i] if c in task[0]) for i in ids]
    train_features, train_shares = _score(model, lambda i: train[i][0], [_size(train.image_path(i)) for i in
                                                                         range(len(ids))],
                                          train_classes, channel_classes, "step-0 training images")
    classes = [int(r["target_class"]) for r in data.records]
    pool_features, pool_shares = _score(model, lambda i: data[i][0],
                                        [(int(r["height"]), int(r["width"])) for r in data.records],
                                        [[c] for c in classes], channel_classes, "pool images")
    content = [s[0] for s in pool_shares]

    scores_train, scores_pool = domain_scores(train_features, pool_features, opts)
    domain_threshold = quantile(scores_train, opts.domain_quantile) if opts.domain_test else 0.0  # 0: none dropped
    by_class: dict[int, list[float]] = {c: [] for c in task[0]}
    for image_classes_, shares in zip(train_classes, train_shares):
        for c, share in zip(image_classes_, shares):
            by_class[c].append(share)
    # a step-0 class no sampled training image holds has no statistics: threshold 0 (its images pass the content test)
    content_threshold = {c: quantile(v, opts.content_quantile) if opts.content_test else 0.0
                         for c, v in sorted(by_class.items())}
    decisions = decide(classes, scores_pool.tolist(), content, domain_threshold, content_threshold, opts.min_keep)

    truth_ref = (cfg.replay.get("truth") or {}).get("shows_class")
    shows = resolve(str(truth_ref))(cfg.replay, data.records) if truth_ref else [None] * len(data)

    rows = [{"id": r["id"], "target_class": c, "domain": round(float(s), 6),
             "content": None if t is None else round(float(t), 6),
             "content_threshold": content_threshold.get(c) if t is not None else None,
             "kept": dec.keep, "reason": dec.reason, "failed": dec.failed,
             **({} if show is None else {"truth_shows_class": show})}
            for r, c, s, t, dec, show in zip(data.records, classes, scores_pool, content, decisions, shows)]
    with staged(target, marker, "select.pool", fresh=True, what="a `recall select` build") as partial:
        pool = ReplayPool(partial)
        for record, row in tqdm(list(zip(data.records, rows)), desc="selected pool", leave=False):
            if row["kept"]:
                pool.add_copy(source, record, {"selected_from": record["id"], "select_domain": row["domain"],
                                               "select_content": row["content"], "select_reason": row["reason"]})
        lines = "".join(f"{json.dumps(row, sort_keys=True)}\n" for row in rows)
        write_bytes(partial / SELECTION_NAME, lines.encode())
        summary = _summary(rows, names, domain_threshold, content_threshold, marker.params["selection"])
        counts = Counter(c for c, row in zip(classes, rows) if row["kept"])
        write_json(pool.summary_path, {"format_version": FORMAT_VERSION, "total": summary["kept"],
                                       "counts": {names[c]: n for c, n in sorted(counts.items())},
                                       "params": marker.params, "selection": summary})
    write_json(metrics_path, summary)
    _print(summary, target)
    return summary


def _size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header."""
    with Image.open(path) as image:
        return image.height, image.width


def _summary(rows: list[dict], names: list[str], domain_threshold: float, content_threshold: dict[int, float],
             params: dict) -> dict:
    reasons = Counter(row["reason"] for row in rows)
    out = {"images": len(rows), "kept": sum(row["kept"] for row in rows), "reasons": dict(sorted(reasons.items())),
           "domain_threshold": domain_threshold,
           "content_thresholds": {names[c]: t for c, t in content_threshold.items()},
           "per_class": {names[c]: {"images": sum(r["target_class"] == c for r in rows),
                                    "kept": sum(r["kept"] for r in rows if r["target_class"] == c)}
                         for c in sorted({r["target_class"] for r in rows})},
           "params": params}
    scored = [row for row in rows if "truth_shows_class" in row]
    if scored:  # simulation only: the drops against which photos show their class
        noise = [not row["truth_shows_class"] for row in scored]
        out["truth"] = {"all": selection_score([not row["kept"] for row in scored], noise),
                        **{f"by_{part}": selection_score([part in row["failed"].split("+") for row in scored], noise)
                           for part in ("domain", "content")}}
    return out


def _print(summary: dict, target: Path) -> None:
    print(f"recall select: kept {summary['kept']} of {summary['images']} images in {target} "
          f"(dropped: {', '.join(f'{k} {v}' for k, v in summary['reasons'].items() if k not in ('kept', 'floor'))}"
          f"; kept by the class floor: {summary['reasons'].get('floor', 0)})", file=sys.stderr)
    truth = summary.get("truth", {}).get("all")
    if truth:
        print(f"  against the truth: {truth['noise']} tag-noise photos, {truth['dropped_noise']} of them dropped "
              f"(recall {truth['recall']:.2f}); precision of the drops {truth['precision']:.2f}; "
              f"good photos dropped {truth['good_dropped']:.2f}", file=sys.stderr)


def add_arguments(parser) -> None:
    with_overrides(parser)


def main(args) -> int:
    select_pool(compose(args))
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
