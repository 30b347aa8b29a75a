"""`recall classmap`: which generator class replays each target class (RECALL's mapping procedure).

    recall classmap --params params.yaml replay=toy_gan     -> replay.mapping (JSON, reviewable by hand)
                                                               and its check, <mapping>_check.json

The paper classifies the training images that contain a class with an ImageNet classifier, averages the softmax
over them and takes the best class (`recall.replay.classmap.map_classes`).

The check says which generator classes serve more than one target class (a warning: their images would be the
same, and the pool keeps them once) and, where the replay source is a simulation that knows which of its classes
imitates which target class (`replay.truth.class_map` names its scorer), how the map scores against that truth.
Both go to MLflow with the map itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from recall.commands import compose, script, with_overrides
from recall.config import CONF_DIR, group_options
from recall.data.datasets import dataset_class_names
from recall.atomic import write_json
from recall.registry import resolve
from recall.replay.classifier import imagenet_classifier
from recall.replay.classmap import SCORE_DECIMALS, map_classes, save_mapping, shared_sources
from recall.errors import ReplayError


def _options(section) -> dict:
    return OmegaConf.to_container(section, resolve=True) if section is not None else {}


def _pretrained(cfg: DictConfig, options: dict):
    """A timm classifier with weights from a local file: ImageNet's (EfficientNet-B2 in the paper), or the toy
    world's, pretrained on the toy ImageNet by `recall pretrain` (its class names in `names`)."""
    unknown = set(options) - {"model", "weights", "names"}
    if unknown:
        hint = (" (the input size is the classifier file's own, as its normalisation: see "
                "recall.replay.classifier.save_classifier)" if "input_size" in unknown else "")
        raise ReplayError(f"replay.classifier: unknown option(s) {sorted(unknown)}; expected model, weights, "
                          f"names{hint}")
    return imagenet_classifier(options["model"], weights=options["weights"], names=options.get("names"))


# classifier.kind -> how the mapping's classifier is made; a new kind is one more entry
CLASSIFIERS = {"pretrained": _pretrained}


def check_path(mapping_file: str | Path) -> Path:
    """Where the check of a class map is written: beside it, `<name>_check.json`."""
    mapping_file = Path(mapping_file)
    return mapping_file.with_name(f"{mapping_file.stem}_check.json")


def mapping_check(cfg: DictConfig, mapping: dict) -> dict:
    """The check of a class map: the generator classes serving several target classes, the mean top-1 score and,
    for a simulated source, the score against its truth (`replay.truth.class_map`, None for a real source)."""
    chosen = {c: m["source_class"] for c, m in mapping.items() if m["source_class"] is not None}
    scores = [m["top_k"][0][2] for m in mapping.values() if m["top_k"]]
    truth = (cfg.replay.get("truth") or {}).get("class_map")
    return {"classes": len(chosen), "shared": shared_sources(mapping),
            "top1_score_mean": round(sum(scores) / len(scores), SCORE_DECIMALS) if scores else None,
            "truth": resolve(str(truth))(cfg.replay, chosen) if truth else None}


def class_mapping(cfg: DictConfig) -> dict:
    """The paper's mapping procedure (mean softmax over the training images of each class); written to `replay.mapping`."""
    if cfg.replay.get("classifier") is None or not cfg.replay.get("mapping"):
        with_map = [name for name in group_options("replay") if "classifier:" in (CONF_DIR / "replay" /
                                                                                   f"{name}.yaml").read_text()]
        raise ReplayError(f"replay={cfg.replay.name} has no class map to make (it sets no replay.classifier and "
                          f"replay.mapping); `recall classmap` is for sources that replay generator classes: "
                          f"replay={' or replay='.join(with_map)}")
    options = _options(cfg.replay.get("classifier"))
    kind = options.pop("kind", "pretrained")
    if kind not in CLASSIFIERS:
        raise ReplayError(f"replay.classifier.kind={kind!r} is unknown; choose one of {sorted(CLASSIFIERS)}")
    classifier = CLASSIFIERS[kind](cfg, options)
    d = cfg.dataset
    mapping = map_classes(classifier, d.root, split=d.train_split, num_classes=int(d.num_classes),
                          source_names=classifier.source_names, image_dir=d.image_dir, mask_dir=d.mask_dir,
                          class_names=dataset_class_names(d), progress=True)
    save_mapping(mapping, cfg.replay.mapping)
    return mapping


def add_arguments(parser) -> None:
    with_overrides(parser)


def _track(cfg: DictConfig, mapping: dict, check: dict, files: list[Path]) -> None:
    from recall.tracking import StageTracker

    truth = check["truth"] or {}
    metrics = {"classmap/classes": check["classes"], "classmap/shared": len(check["shared"]),
               **({"classmap/top1_score_mean": check["top1_score_mean"]} if check["top1_score_mean"] else {}),
               **{f"classmap/truth_{k}": v for k, v in truth.items() if isinstance(v, int)}}
    params = {"replay": str(cfg.replay.name), "classifier": _options(cfg.replay.get("classifier")),
              "mapping": {m["name"]: m["source_name"] for m in mapping.values()}}
    StageTracker(cfg.tracking.uri, cfg.tracking.experiment or str(cfg.dataset.name)).log(
        f"classmap · {cfg.replay.name}", "classmap", "recall classmap", params, metrics, files)


def main(args) -> int:
    cfg = compose(args)
    mapping = class_mapping(cfg)
    check = mapping_check(cfg, mapping)
    truth = (check["truth"] or {}).get("per_class", {})
    for c, m in mapping.items():
        kind = f" [{truth[c]['kind']}]" if c in truth else ""
        print(f"{m['name']:>12} -> {m['source_name']}{kind}  "
              f"(top: {', '.join(f'{n} {s:.3g}' for _, n, s in m['top_k'])})")
    for source, targets in check["shared"].items():
        print(f"warning: generator class {source} serves {', '.join(targets)}: their replay images would be the "
              "same (the pool keeps each image once); edit the map by hand to choose another", file=sys.stderr)
    check_file = check_path(cfg.replay.mapping)
    write_json(check_file, check)
    if check["truth"] is not None:
        t = check["truth"]
        print(f"against the simulation's truth: {t['correct']} of {t['classes']} classes get their look-alike or a "
              f"variant of it ({t['lookalike']} look-alikes, {t['variant']} variants, {t['wrong_target']} another "
              f"class's, {t['distractor']} distractors, {t['other']} others)")
    if cfg.tracking.uri:
        _track(cfg, mapping, check, [Path(cfg.replay.mapping), check_file])
    print(f"mapping written to {cfg.replay.mapping}, its check to {check_file}")
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
