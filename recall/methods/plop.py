"""PLOP (Douillard, Chen, Dapogny, Cord, CVPR 2021): Local POD distillation + entropy-based pseudo-labels of the
background, with its losses as pure functions.

Everything follows the authors' code (arthurdouillard/CVPR2021_PLOP, `--method PLOP` in `argparser.py`), not the
paper's text where they differ:

- **Local POD** (`train.py` `features_distillation`, `_local_pod`): for each distilled map, old and new, squared
  (`pod_prepro="pow"`), then at every scale s of `spp_scales` (1, 2, 4) cut into s x s windows of side W // s (W:
  the map's *width*, for both sides), each window pooled along its width and along its height (means); the
  embeddings of all windows concatenated, unnormalised (`normalize=False` is forced), compared by their L2 distance
  per image, averaged over the batch, times the map's factor and sqrt(classes seen / new classes)
  (`use_pod_schedule`); the sum over the maps divided by their number. The maps: the encoder's stages (their
  `attentions`: ResNet's mod2-mod5, not the stem), the head's output (`pre_logits`) and, with `pod_logits`, the
  logits before upsampling (`sem_logits_small`). The last map (the logits, with `pod_logits`) has the factor of
  `pod_options["switch"]["after"]` (`pod_factor_last`, 0.0005), the others `pod_factor` (0.01). The new model's
  logits of the new classes are summed into its background (`extra_channels="sum"`).
- **Pseudo-labels** (`train.py`, `pseudo == "entropy"`): a background pixel (label < number of old classes,
  background included) takes the old model's argmax when the old model's normalised entropy is below that class's
  threshold, else it is ignored (255). The thresholds (`find_median`, mode "entropy") are computed once per step,
  before training, with the old model over the step's training loader: per class (the old argmax), the median of
  the normalised entropy of the background pixels (label 0), approximated on a 100-bin histogram by the authors'
  loop, then raised to at least `threshold` (0.001).
- **The entropy** (`train.py` `entropy`) is the authors': -mean_c p_c log(p_c + 1e-8) / log(C) (a *mean* over the
  old model's C channels), then divided by log(classes seen, new ones included) (`max_entropy`).
- **classif_adaptive_factor**: each image's per-pixel cross-entropy is weighted by (confident background pixels) /
  (background pixels + 1e-6), and the loss is the mean over *all* pixels (ignored ones count as zeros:
  `reduction="none"` then `.mean()`).
- **init_balanced** (`segmentation_module.py` `init_new_classifier`): the new classifier copies the background's
  weights, its bias is the background's minus log(N + 1) and the background's bias becomes the same: MiB's
  initialisation, `classifier_init=background` here.

Step 0 is the cross-entropy every method trains its step 0 with (a step-0 model is shared between methods).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from recall import distributed
from recall.data.classes import IGNORE_INDEX
from recall.methods.base import RunServices, StepContext
from recall.methods.distillation import _Distillation


# ---------------------------------------------------------------------------------------------------- Local POD
def local_pod_embedding(x: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """The authors' `_local_pod` (normalize=False, normalize_per_scale=False): [B, C, H, W] -> [B, D]. At each scale
    s, the s x s windows of side k = W // s (the width sets both sides, as theirs), each pooled by a mean over its
    width (C x k values) and over its height (C x k values), concatenated in their order."""
    b, width = x.shape[0], x.shape[-1]
    embedding = []
    for scale in scales:
        k = width // scale
        for i in range(scale):
            for j in range(scale):
                window = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                embedding.append(window.mean(dim=3).reshape(b, -1))
                embedding.append(window.mean(dim=2).reshape(b, -1))
    return torch.cat(embedding, dim=1)


def sum_extra_channels(new: torch.Tensor, n_old: int) -> torch.Tensor:
    """`extra_channels="sum"`: the new model's map with the old model's channels, its new channels (n_old..) summed
    into channel 0 (the background's logit)."""
    return torch.cat([new[:, :1] + new[:, n_old:].sum(dim=1, keepdim=True), new[:, 1:n_old]], dim=1)


def local_pod(old_maps: list[torch.Tensor], new_maps: list[torch.Tensor], factors: list[float], scales: list[int],
              schedule: float = 1.0) -> torch.Tensor:
    """The authors' `features_distillation` with collapse "local": per map, the L2 distance between the Local POD
    embeddings of the squared old and new maps, per image, averaged over the batch, times the map's factor and
    `schedule` (sqrt(classes seen / new classes)); summed over maps, divided by their number. A new map with more
    channels than the old one (the logits) has its extra channels summed into channel 0 first."""
    loss = old_maps[0].new_zeros(())
    for old, new, factor in zip(old_maps, new_maps, factors, strict=True):
        if new.shape[1] != old.shape[1]:
            new = sum_extra_channels(new, old.shape[1])
        a, b = local_pod_embedding(old.pow(2), scales), local_pod_embedding(new.pow(2), scales)
        if factor <= 0:
            continue
        loss = loss + factor * torch.linalg.vector_norm(a - b, dim=-1).mean() * schedule
    return loss / len(old_maps)


def distilled_maps(outputs: dict, first_stage: int, logits: bool) -> list[torch.Tensor]:
    """The maps Local POD distils from a model's outputs: the encoder's levels from `first_stage` (1: after the stem,
    as PLOP's ResNet mod2-mod5), the head's output (not again when the head is the identity: DeepLab-v2), and the
    logits before upsampling if `logits`."""
    maps = list(outputs["stages"][first_stage:])
    if outputs["features"] is not outputs["encoder"]:
        maps.append(outputs["features"])
    if logits:
        maps.append(outputs["logits"])
    return maps


# ------------------------------------------------------------------------------------------------ pseudo-labels
def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """The authors' per-pixel entropy of [B, C, H, W] probabilities: -mean_c p log(p + 1e-8) / log(C + 1e-8)."""
    factor = 1 / math.log(probabilities.shape[1] + 1e-8)
    return -factor * torch.mean(probabilities * torch.log(probabilities + 1e-8), dim=1)


def entropy_histogram(old_logits: torch.Tensor, targets: torch.Tensor, num_classes: int, max_entropy: float,
                      bins: int = 100) -> torch.Tensor:
    """One batch of `find_median` (mode "entropy"): per old argmax class (rows, `num_classes` of them: every class
    seen), the counts of the background pixels (label 0) in `bins` bins of entropy / max_entropy (clamped to the
    last bin)."""
    probs = torch.softmax(old_logits.float(), dim=1)
    pseudo = probs.argmax(dim=1)
    background = targets == 0
    values = entropy(probs)[background] / max_entropy
    rows, columns = pseudo[background], torch.clamp((values * bins).long(), max=bins - 1)
    histogram = torch.zeros(num_classes, bins, dtype=torch.long, device=old_logits.device)
    histogram.index_put_((rows, columns), torch.ones_like(rows), accumulate=True)
    return histogram


def authors_median(counts: list[int]) -> float:
    """The authors' median of a histogram over [0, 1] (`find_median`), reproduced as written: the running sum adds
    the bin's *index* (`lower_border * nb_bins`), not its count, so past the first bin this is not the histogram's
    median; and the bin index is int(k / n * n) in floating point (k = 29 of 100 gives bin 28)."""
    n, half, running = len(counts), sum(counts) / 2, 0.0
    for k in range(n):
        lower = k / n
        index = int(lower * n)
        if running <= half <= running + counts[index]:
            break
        running += lower * n
    numerator = half - running
    if counts[index] == 0:  # as torch divides: 0/0 is nan, x/0 is ±inf
        return math.nan if numerator == 0 else math.copysign(math.inf, numerator)
    return lower + numerator / counts[index] * (1 / n)


def entropy_thresholds(histograms: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per class: the authors' median of its histogram (0 for a class the old model never predicted on background),
    then max(median, threshold) in Python's order (a nan median stays nan: that class is never a pseudo-label)."""
    medians = [authors_median(row) if sum(row) > 0 else 0.0 for row in histograms.tolist()]
    return torch.tensor([max(m, threshold) for m in medians], dtype=torch.float32, device=histograms.device)


def pseudo_label(targets: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor, max_entropy: float,
                 n_old: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, confident, background): background pixels (label < n_old) take the old model's argmax where its
    normalised entropy is below the threshold of that class, the others become 255; labels of new classes and 255
    stay."""
    probs = torch.softmax(old_logits.float(), dim=1)
    pseudo = probs.argmax(dim=1)
    confident = entropy(probs) / max_entropy < thresholds[pseudo]
    background = targets < n_old
    labels = torch.where(background, torch.where(confident, pseudo, torch.full_like(pseudo, IGNORE_INDEX)), targets)
    return labels, confident, background


def adaptive_factor(confident: torch.Tensor, background: torch.Tensor, min_factor: float = 0.0) -> torch.Tensor:
    """`classif_adaptive_factor`, per image: confident background pixels / (background pixels + 1e-6), clamped from
    below by `min_factor` when it is set."""
    num = (confident & background).float().sum(dim=(1, 2))
    den = background.float().sum(dim=(1, 2))
    factor = num / (den + 1e-6)
    return factor.clamp(min=min_factor) if min_factor else factor


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The authors' CE: per pixel (255 gives 0), times the image's factor, averaged over *all* pixels."""
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (factor[:, None, None] * per_pixel).mean()


# ------------------------------------------------------------------------------------------------------- method
class PLOP(_Distillation):
    """PLOP: cross-entropy on pseudo-labelled targets weighted per image, plus Local POD between the old and the new
    model's intermediate maps; new classifiers initialised from the background's."""

    name = "plop"

    def __init__(self, pod_factor: float = 0.01, pod_logits: bool = True, pod_factor_last: float = 0.0005,
                 pod_scales: list[int] = [1, 2, 4], pod_first_stage: int = 1, pod_schedule: bool = True,
                 threshold: float = 0.001, entropy_bins: int = 100, classif_adaptive_factor: bool = True,
                 classif_adaptive_min_factor: float = 0.0, freeze_encoder: bool = False,
                 classifier_init: str = "background"):
        super().__init__(freeze_encoder=freeze_encoder, classifier_init=classifier_init)
        self.pod_factor = pod_factor
        self.pod_logits = pod_logits
        self.pod_factor_last = pod_factor_last
        self.pod_scales = [int(s) for s in pod_scales]  # a copy: the default list is never mutated
        self.pod_first_stage = pod_first_stage
        self.pod_schedule = pod_schedule
        self.threshold = threshold
        self.entropy_bins = entropy_bins
        self.classif_adaptive_factor = classif_adaptive_factor
        self.classif_adaptive_min_factor = classif_adaptive_min_factor
        self._thresholds: dict[int, torch.Tensor] = {}

    @staticmethod
    def seen_classes(ctx: StepContext) -> int:
        """Classes seen at this step, background and the new ones included (the authors' `nb_current_classes`)."""
        return 1 + len(ctx.old_classes) + len(ctx.new_classes)

    def max_entropy(self, ctx: StepContext) -> float:
        """The authors' `max_value` of mode "entropy": log(classes seen), computed in float32 as theirs."""
        return float(torch.log(torch.tensor(float(self.seen_classes(ctx)))))

    # ------------------------------------------------------------------ the run: thresholds before training
    def before_step(self, run: RunServices, step: int, ctx: StepContext, generator: torch.Generator) -> None:
        """The per-class entropy thresholds of `step` (the authors' `Trainer.before`): one pass of the previous model
        over the step's training loader, augmentations included, as theirs. It draws from a copy of the step's
        generator and of the global RNG, so the step then trains on the batches any other method would see. Under
        torchrun the processes' histograms are summed (one set of thresholds)."""
        if ctx.prev_model is None:
            return
        copy = torch.Generator()
        copy.set_state(generator.get_state())
        self._thresholds[step] = self.compute_thresholds(ctx.prev_model, run.train_loader(step, copy), ctx,
                                                         run.device())

    def compute_thresholds(self, prev_model: torch.nn.Module, loader, ctx: StepContext,
                           device: torch.device) -> torch.Tensor:
        """Per-class thresholds from the previous model's predictions on `loader`'s background pixels."""
        model = prev_model.to(device).eval()
        histograms = torch.zeros(self.seen_classes(ctx), self.entropy_bins, dtype=torch.long, device=device)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for images, targets in loader:
                logits = model(images.to(device))["out"]
                histograms += entropy_histogram(logits, targets.to(device), self.seen_classes(ctx),
                                                self.max_entropy(ctx), self.entropy_bins)
        return entropy_thresholds(distributed.sum_(histograms), self.threshold)

    def thresholds(self, ctx: StepContext, device: torch.device) -> torch.Tensor:
        """The step's thresholds; outside a protocol run (no `before_step`), `threshold` for every class."""
        if ctx.step not in self._thresholds:
            warnings.warn(f"plop: no thresholds computed for step {ctx.step} (before_step was not called): every "
                          f"class uses threshold={self.threshold}", stacklevel=3)
            self._thresholds[ctx.step] = torch.full((self.seen_classes(ctx),), float(self.threshold))
        return self._thresholds[ctx.step].to(device)

    # ------------------------------------------------------------------ the loop
    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, images: torch.Tensor,
             ctx: StepContext) -> torch.Tensor:
        if ctx.prev_model is None:
            return self.cross_entropy(outputs, targets)
        old = self.previous_outputs(images, ctx)
        n_old = 1 + len(ctx.old_classes)
        labels, confident, background = pseudo_label(targets, old["out"], self.thresholds(ctx, targets.device),
                                                     self.max_entropy(ctx), n_old)
        factor = adaptive_factor(confident, background, self.classif_adaptive_min_factor) \
            if self.classif_adaptive_factor else torch.ones(len(targets), device=targets.device)
        loss = weighted_cross_entropy(outputs["out"], labels, factor)
        old_maps = distilled_maps(old, self.pod_first_stage, self.pod_logits)
        new_maps = distilled_maps(outputs, self.pod_first_stage, self.pod_logits)
        factors = [self.pod_factor] * (len(old_maps) - 1) + [self.pod_factor_last]  # "switch after": the last map
        schedule = math.sqrt(self.seen_classes(ctx) / len(ctx.new_classes)) if self.pod_schedule else 1.0
        return loss + local_pod(old_maps, new_maps, factors, self.pod_scales, schedule)


__all__ = ["PLOP", "adaptive_factor", "authors_median", "distilled_maps", "entropy", "entropy_histogram",
           "entropy_thresholds", "local_pod", "local_pod_embedding", "pseudo_label", "sum_extra_channels",
           "weighted_cross_entropy"]
