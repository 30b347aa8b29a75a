"""`recall classmap`: which generator class replays each target class (RECALL's mapping procedure).

    recall classmap --params params.yaml replay=toy_gan     -> replay.mapping (JSON, reviewable by hand)

The paper classifies the training images that contain a class with an ImageNet classifier, averages the softmax
over them and takes the best class (`recall.replay.classmap.map_classes`).
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from recall.commands import compose, script, with_overrides
from recall.data.classes import class_names
from recall.replay.classmap import imagenet_classifier, map_classes, save_mapping
from recall.replay.pool import ReplayError


def _options(section) -> dict:
    return OmegaConf.to_container(section, resolve=True) if section is not None else {}


def _pretrained(cfg: DictConfig, options: dict):
    """A timm classifier with weights from a local file: ImageNet's (EfficientNet-B2 in the paper), or the toy
    world's, pretrained on the toy ImageNet by `recall pretrain` (its class names in `names`)."""
    unknown = set(options) - {"model", "weights", "input_size", "names"}
    if unknown:
        raise ReplayError(f"replay.classifier: unknown option(s) {sorted(unknown)}; expected model, weights, "
                          "input_size, names")
    classifier = imagenet_classifier(options["model"], weights=options["weights"],
                                     input_size=options.get("input_size"), names=options.get("names"))
    return classifier, classifier.input_size


# classifier.kind -> how the mapping's classifier is made; a new kind is one more entry
CLASSIFIERS = {"pretrained": _pretrained}


def class_mapping(cfg: DictConfig) -> dict:
    """The paper's mapping procedure (mean softmax over the training images of each class); written to `replay.mapping`."""
    options = _options(cfg.replay.get("classifier"))
    kind = options.pop("kind", "pretrained")
    if kind not in CLASSIFIERS:
        raise ReplayError(f"replay.classifier.kind={kind!r} is unknown; choose one of {sorted(CLASSIFIERS)}")
    classifier, input_size = CLASSIFIERS[kind](cfg, options)
    d = cfg.dataset
    mapping = map_classes(classifier, d.root, split=d.train_split, num_classes=int(d.num_classes),
                          source_names=classifier.source_names, image_dir=d.image_dir, mask_dir=d.mask_dir,
                          class_names=class_names(str(d.name), int(d.num_classes)), input_size=input_size,
                          progress=True)
    save_mapping(mapping, cfg.replay.mapping)
    return mapping


def add_arguments(parser) -> None:
    with_overrides(parser)


def main(args) -> int:
    cfg = compose(args)
    mapping = class_mapping(cfg)
    for c, m in mapping.items():
        print(f"{m['name']:>12} -> {m['source_name']}  (top: {', '.join(f'{n} {s:.3g}' for _, n, s in m['top_k'])})")
    print(f"mapping written to {cfg.replay.mapping}")
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
