"""`recall select`: RECALL+'s selection of a replay pool's images (recall.replay.select), a new pool; the source pool
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
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from recall.atomic import write_bytes, write_json
from recall.commands import compose, script, with_overrides
from recall.config import section
from recall.data.classes import dataset_class_names
from recall.data.protocol import select_train_images, steps
from recall.data.transforms import eval_transform
from recall.data.voc import VOCSegmentation, image_classes, read_split
from recall.errors import UserError
from recall.labeling import same_size_batches
from recall.model import ModelConfig, load_checkpoint
from recall.ownership import Marker, claim, staged
from recall.registry import resolve
from recall.replay.pool import PoolDataset, ReplayPool, pool_owner
from recall.replay.select import SelectConfig, class_share, decide, domain_scores, pooled, quantile, selection_score

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


@torch.no_grad()
def _score(model, batches, channel_classes: list[int], desc: str) -> tuple[torch.Tensor, list[float]]:
    """Pooled encoder features and, per image, the share of it the model labels with `classes[i]` (None: a class
    the model does not know) over `batches` of (images [B, 3, H, W], classes)."""
    features, shares = [], []
    known = set(channel_classes[1:])
    for images, classes in tqdm(batches, desc=desc, leave=False):
        out = model(images)
        features.append(pooled(out["encoder"]))
        share = class_share(out["out"], channel_classes, classes).tolist()
        shares += [s if c in known else None for s, c in zip(share, classes)]
    return torch.cat(features), shares


def select_pool(cfg) -> dict:
    """Score every image of `replay.pool` against step 0's model and training images, keep or drop it, and write
    the kept ones as a new pool with the scores; returns the summary (also written to `select.metrics`)."""
    opts, target, metrics_path = _options(cfg)
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
    model.eval()
    torch.set_num_threads(max(1, int(cfg.train.get("threads") or 1)))
    channel_classes = [0, *task[0]]
    names = dataset_class_names(d)

    # the step-0 training images (a sample), and each one's classes
    present = image_classes(d.root, read_split(d.root, d.train_split), num_classes=num_classes, mask_dir=d.mask_dir,
                            image_dir=d.image_dir, progress=False)
    ids = select_train_images(present, task, 0, str(cfg.setting.name), seed=int(cfg.seed))
    rng = np.random.default_rng(opts.seed)
    ids = sorted(rng.choice(ids, size=min(len(ids), opts.max_train_images), replace=False).tolist())
    train = VOCSegmentation(d.root, d.train_split, ids=ids, num_classes=num_classes, mask_dir=d.mask_dir,
                            image_dir=d.image_dir, transform=eval_transform())
    # each training image once per step-0 class it holds (the content statistics); the features once per image
    pairs = [(i, c) for i, image_id in enumerate(ids) for c in sorted(present[image_id]) if c in task[0]]
    images = [train[i][0] for i in range(len(train))]
    train_batches = [(torch.stack([images[i] for i, _ in pairs[k:k + BATCH]]), [c for _, c in pairs[k:k + BATCH]])
                     for k in range(0, len(pairs), BATCH)]
    train_features, train_shares = _score(model, train_batches, channel_classes, "step-0 training images")
    first = [k for k, (i, _) in enumerate(pairs) if k == 0 or pairs[k - 1][0] != i]
    train_features = train_features[first]

    data = PoolDataset(source.root, transform=eval_transform())
    if data.problems:
        raise UserError(f"replay pool {source.root}: {len(data.problems)} unusable image(s), e.g. "
                        f"{data.problems[0][0]}: {data.problems[0][1]}; rebuild it with `recall pool "
                        f"replay={cfg.replay.name}`")
    order = same_size_batches(data.records, BATCH)
    pool_batches = [(torch.stack([data[i][0] for i in idx]), [int(data.records[i]["target_class"]) for i in idx])
                    for idx in order]
    features, shares = _score(model, pool_batches, channel_classes, "pool images")
    position = [i for idx in order for i in idx]  # batch order -> record index
    pool_features = torch.empty_like(features)
    pool_features[torch.as_tensor(position)] = features
    content = [None] * len(data)
    for k, i in enumerate(position):
        content[i] = shares[k]

    scores_train, scores_pool = domain_scores(train_features, pool_features, opts)
    domain_threshold = quantile(scores_train, opts.domain_quantile) if opts.domain_test else 0.0  # 0: none dropped
    by_class: dict[int, list[float]] = {}
    for (_, c), s in zip(pairs, train_shares):
        by_class.setdefault(c, []).append(s)
    content_threshold = {c: quantile(v, opts.content_quantile) if opts.content_test else 0.0
                         for c, v in sorted(by_class.items())}
    classes = [int(r["target_class"]) for r in data.records]
    decisions = decide(classes, scores_pool.tolist(), content, domain_threshold, content_threshold, opts.min_keep)

    truth_ref = (cfg.replay.get("truth") or {}).get("shows_class")
    shows = resolve(str(truth_ref))(cfg.replay, data.records) if truth_ref else [None] * len(data)

    rows = [{"id": r["id"], "target_class": c, "domain": round(float(s), 6),
             "content": None if t is None else round(float(t), 6),
             "content_threshold": content_threshold.get(c) if t is not None else None,
             "kept": dec.keep, "reason": dec.reason, **({} if show is None else {"truth_shows_class": show})}
            for r, c, s, t, dec, show in zip(data.records, classes, scores_pool, content, decisions, shows)]
    params = {"from": str(source.root), "step0": str(cfg.step0), "protocol": str(cfg.protocol.name),
              "setting": str(cfg.setting.name), "select": dataclasses.asdict(opts)}
    owner = pool_owner(source.root) or {}
    marker = Marker("pool", "recall select", {**(owner.get("params") or {"source": None}), "selection": params})
    claim(target, marker, "select.pool", accepts=lambda found: None if found.get("params") == marker.params else
          "it holds another selection (other source pool, step-0 model or select.* options): pass select.pool= a "
          "new directory")
    with staged(target, marker, "select.pool", fresh=True, what="a `recall select` build") as partial:
        pool = ReplayPool(partial)
        for record, row in tqdm(list(zip(data.records, rows)), desc="selected pool", leave=False):
            if row["kept"]:
                pool.add_copy(source, record, {"selected_from": record["id"], "select_domain": row["domain"],
                                               "select_content": row["content"], "select_reason": row["reason"]})
        write_bytes(partial / SELECTION_NAME, "".join(f"{_json(row)}\n" for row in rows).encode())
        summary = _summary(rows, names, domain_threshold, content_threshold, params)
        write_json(pool.summary_path, {**(source.summary() or {}), "total": summary["kept"],
                                       "counts": {names[c]: n for c, n in sorted(Counter(
                                           c for c, row in zip(classes, rows) if row["kept"]).items())},
                                       "selection": summary})
    write_json(metrics_path, summary)
    _print(summary, target)
    return summary


def _json(row: dict) -> str:
    import json

    return json.dumps(row, sort_keys=True)


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
                        **{f"by_{part}": selection_score([part in row["reason"].split("+") for row in scored], noise)
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
