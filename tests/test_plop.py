"""PLOP against hand computations: Local POD (an independent loop over scales, windows and pixels), the authors'
entropy, per-class thresholds and pseudo-labels on a hand-made batch, the adaptive CE factor, the background
initialisation of the new classifier, the thresholds pass of a run, and `recall run method=plop` on the tiny world."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST

from recall.methods import StepContext, build_method
from recall.methods.plop import (
    PLOP,
    adaptive_factor,
    authors_median,
    distilled_maps,
    entropy,
    entropy_histogram,
    entropy_thresholds,
    local_pod,
    local_pod_embedding,
    pseudo_label,
    weighted_cross_entropy,
)
from recall.model import ModelConfig, SegmentationModel

CFG = ModelConfig(head_channels=16)


# --- Local POD --------------------------------------------------------------------------------------------------

def pod_embedding_by_hand(x: torch.Tensor, scales: list[int]) -> list[list[float]]:
    """Per image: at each scale s, windows of side k = W // s in row-major order; per window, for each channel, the
    mean of each of its k rows (over the window's columns), then for each channel the mean of each of its k columns."""
    values = x.double().tolist()
    width = x.shape[-1]
    out = []
    for image in values:
        embedding = []
        for s in scales:
            k = width // s
            for i in range(s):
                for j in range(s):
                    rows = range(i * k, (i + 1) * k)
                    cols = range(j * k, (j + 1) * k)
                    for channel in image:
                        embedding += [sum(channel[r][c] for c in cols) / k for r in rows]
                    for channel in image:
                        embedding += [sum(channel[r][c] for r in rows) / k for c in cols]
        out.append(embedding)
    return out


def test_local_pod_embedding_is_the_windows_row_and_column_means():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor(pod_embedding_by_hand(x, [1, 2, 4]), dtype=torch.float64)
    assert expected.shape == (2, 2 * 3 * 8 * (1 + 2 + 4))  # each scale: s^2 windows x 2 poolings x C x k = 2 C W s
    assert torch.allclose(local_pod_embedding(x, [1, 2, 4]), expected, rtol=0, atol=1e-12)


def test_local_pod_windows_follow_the_width_as_the_authors():
    """A 6 (high) x 4 (wide) map at scale 2: windows of side 4 // 2 = 2, rows 0..3 only (theirs: `w // scale`)."""
    x = torch.arange(24, dtype=torch.float64).view(1, 1, 6, 4)
    expected = torch.tensor(pod_embedding_by_hand(x, [2]), dtype=torch.float64)
    assert torch.allclose(local_pod_embedding(x, [2]), expected, atol=1e-12)


def pod_loss_by_hand(old: list[torch.Tensor], new: list[torch.Tensor], factors: list[float], scales: list[int],
                     schedule: float) -> float:
    """Per map: the new map's extra channels (beyond the old's) added to its channel 0; both maps squared; the L2
    distance of the embeddings per image, averaged over images, times factor and schedule; averaged over maps."""
    total = 0.0
    for a, b, factor in zip(old, new, factors):
        n = a.shape[1]
        b = b.double().clone()
        if b.shape[1] > n:
            b = torch.cat([b[:, :1] + sum(b[:, c:c + 1] for c in range(n, b.shape[1])), b[:, 1:n]], dim=1)
        ea, eb = pod_embedding_by_hand(a.double() ** 2, scales), pod_embedding_by_hand(b ** 2, scales)
        distances = [math.sqrt(sum((u - v) ** 2 for u, v in zip(ra, rb))) for ra, rb in zip(ea, eb)]
        total += factor * schedule * sum(distances) / len(distances)
    return total / len(old)


def test_local_pod_loss_by_hand():
    gen = torch.Generator().manual_seed(1)
    old = [torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64),
           torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)]  # a stage and the logits (bg + 2 old)
    new = [torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64),
           torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)]  # the new model's logits: 2 new classes
    schedule = math.sqrt(5 / 2)  # classes seen (background included) / new classes
    got = local_pod(old, new, [0.01, 0.0005], [1, 2, 4], schedule)
    assert got.item() == pytest.approx(pod_loss_by_hand(old, new, [0.01, 0.0005], [1, 2, 4], schedule), rel=1e-10)
    assert local_pod(old, [o.clone() for o in old], [0.01, 0.0005], [1, 2, 4]).item() == 0
    unscheduled = pod_loss_by_hand(old, new, [0.01, 0.0005], [1, 2, 4], 1.0)
    assert local_pod(old, new, [0.01, 0.0005], [1, 2, 4]).item() == pytest.approx(unscheduled, rel=1e-10)  # default


def test_local_pod_gradient_is_finite_when_the_models_agree():
    """At a step's first batch the new model's stages equal the old one's: the distance's gradient is 0, not nan."""
    a = torch.randn(2, 4, 4, 4)
    b = a.clone().requires_grad_(True)
    local_pod([a], [b], [0.01], [1, 2]).backward()
    assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("head", ["aspp", "deeplabv2"])
def test_distilled_maps_are_the_stages_after_the_stem_the_head_and_the_logits(head):
    model = SegmentationModel(ModelConfig(head_channels=16, head=head), [3]).eval()
    outputs = model(torch.randn(1, 3, 64, 64))
    maps = distilled_maps(outputs, first_stage=1, logits=True)
    expected = list(outputs["stages"][1:]) + ([outputs["features"]] if head == "aspp" else []) + [outputs["logits"]]
    assert len(maps) == len(expected) and all(m is e for m, e in zip(maps, expected))
    assert outputs["stages"][-1] is outputs["encoder"] and outputs["logits"].shape[1] == 4
    assert len(distilled_maps(outputs, first_stage=1, logits=False)) == len(expected) - 1


# --- the authors' entropy, thresholds and pseudo-labels -----------------------------------------------------------

def entropy_by_hand(logits: list[float]) -> float:
    """Theirs: -mean_c p log(p + 1e-8) / log(C), C the old model's channels."""
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    p = [e / sum(exps) for e in exps]
    return -sum(q * math.log(q + 1e-8) for q in p) / len(p) / math.log(len(p))


def test_entropy_is_a_mean_over_channels():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    got = entropy(torch.softmax(logits.view(2, 3, 1, 1), dim=1)).flatten().tolist()
    assert got == pytest.approx([entropy_by_hand([2.0, -1.0, 0.5]), 1 / 3], rel=1e-7)  # uniform: 1/C, not 1


def find_median_verbatim(histograms: torch.Tensor, nb_bins: int, threshold: float) -> torch.Tensor:
    """The authors' `find_median` after the histogram (train.py, mode "entropy"), transcribed line by line."""
    thresholds = torch.zeros(histograms.shape[0], dtype=torch.float32)
    for c in range(histograms.shape[0]):
        total = histograms[c].sum()
        if total <= 0.:
            continue
        half = total / 2
        running_sum = 0.
        for lower_border in range(nb_bins):
            lower_border = lower_border / nb_bins
            bin_index = int(lower_border * nb_bins)
            if half >= running_sum and half <= (running_sum + histograms[c, bin_index]):
                break
            running_sum += lower_border * nb_bins
        median = lower_border + ((half - running_sum) / histograms[c, bin_index].sum()) * (1 / nb_bins)
        thresholds[c] = median
    for c in range(len(thresholds)):
        thresholds[c] = max(thresholds[c], threshold)
    return thresholds


def test_authors_median_by_hand():
    assert authors_median([2] + [0] * 99) == pytest.approx(0.005)  # half = 1 inside bin 0: 0 + 1/2 x 0.01
    # bins 0, 1 empty, 4 in bin 2: their running sum adds the bin indices (0, then 1): 0.2 + (2 - 1)/4 x 0.1
    assert authors_median([0, 0, 4, 0, 0, 0, 0, 0, 0, 0]) == pytest.approx(0.225)  # the histogram's median: 0.25
    # the running sum passes half (0, 1, 3 > 2) before a bin holds it: the loop never breaks, bin 99 is empty:
    # (half - 4950) / 0, -inf (threshold 0.001) or, with more pixels and none of the bins holding half, +inf
    assert authors_median([0, 0, 0, 2, 2] + [0] * 95) == -math.inf
    assert authors_median([0] * 10 + [4000] * 3 + [0] * 87) == math.inf
    assert math.isnan(authors_median([0, 0, 0, 0, 3, 3] + [0] * 94))  # stops at empty bin 3 (1 + 2 = 3): 0 / 0
    assert int(29 / 100 * 100) == 28  # their bin index of k = 29


def test_authors_median_matches_their_code_line_by_line():
    gen = torch.Generator().manual_seed(0)
    rows = [torch.zeros(100, dtype=torch.long)]  # a class the old model never predicts
    for _ in range(40):
        row = torch.zeros(100, dtype=torch.long)
        bins = torch.randint(0, 100, (int(torch.randint(1, 4, (), generator=gen)),), generator=gen)
        row[bins] = torch.randint(1, 9000, (len(bins),), generator=gen)
        rows.append(row)
    histograms = torch.stack(rows)
    got = entropy_thresholds(histograms, 0.001)
    expected = find_median_verbatim(histograms, 100, 0.001)
    assert got[0] == pytest.approx(0.001)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0, equal_nan=True)


def hand_batch():
    """One 2 x 3 image; old model: background and old classes 1, 2; class 3 is new. Labels: background, except a
    new-class pixel (1, 0) and a void one (1, 1)."""
    logits = torch.tensor([
        [[0.0, 0.0, 9.0], [0.0, 0.0, 1.0]],   # background
        [[9.0, 0.0, 0.0], [0.0, 0.0, 0.0]],   # class 1
        [[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]],   # class 2
    ]).unsqueeze(0)
    targets = torch.tensor([[[0, 0, 0], [3, 255, 0]]])
    return logits, targets


def test_histogram_of_the_background_pixels_by_old_argmax():
    logits, targets = hand_batch()
    max_entropy = math.log(4)  # classes seen: background, 1, 2 and the new 3
    hist = entropy_histogram(logits, targets, num_classes=4, max_entropy=max_entropy, bins=100)
    expected = torch.zeros(4, 100, dtype=torch.long)
    for (r, c), label in zip([(0, 0), (0, 1), (0, 2), (1, 2)], [1, 0, 0, 2]):  # argmax (0, 1): a tie, channel 0
        pixel = logits[0, :, r, c].tolist()
        expected[label, min(int(entropy_by_hand(pixel) / max_entropy * 100), 99)] += 1
    assert torch.equal(hist, expected) and hist.sum() == 4  # the new-class and the void pixels are not counted


def test_pseudo_labels_by_hand():
    logits, targets = hand_batch()
    max_entropy = math.log(4)
    pixels = [(0, 0), (0, 1), (0, 2), (1, 2)]
    v = {rc: entropy_by_hand(logits[0, :, rc[0], rc[1]].tolist()) / max_entropy for rc in pixels}
    assert v[(0, 0)] < 0.001 and v[(0, 2)] < 0.001 and v[(0, 1)] > 0.2 and 0.1 < v[(1, 2)] < 0.2
    thresholds = torch.tensor([0.01, 0.01, 0.2, 0.5])  # class 2's threshold lets its pixel through
    labels, confident, background = pseudo_label(targets, logits, thresholds, max_entropy, n_old=3)
    assert labels.tolist() == [[[1, 255, 0], [3, 255, 2]]]  # confident: old argmax; uncertain: 255; new, void: kept
    thresholds[2] = 0.1  # below its entropy: ignored
    labels, _, _ = pseudo_label(targets, logits, thresholds, max_entropy, n_old=3)
    assert labels.tolist() == [[[1, 255, 0], [3, 255, 255]]]
    assert background.tolist() == [[[True, True, True], [False, False, True]]]
    assert confident[0, 0].tolist() == [True, False, True]
    # an old class' label (the sequential setting) is below n_old: relabelled too, as theirs (labels < old_classes)
    labels, _, _ = pseudo_label(torch.tensor([[[2, 0, 0], [3, 255, 0]]]), logits, thresholds, max_entropy, n_old=3)
    assert labels[0, 0, 0] == 1


def test_thresholds_of_a_loader_by_hand():
    """Two batches of the hand image through a stand-in old model. Class 0: two pixels in bin 0 and two uniform ones
    (1/3 / log 4: bin 24); half = 2 fits bin 0: 0 + 2/2 x 0.01. Class 1: two pixels in bin 0: 1/2 x 0.01. Class 2:
    two pixels in bin 11; their running sum of bin indices reaches half = 1 after bin 1 and bin 2 is empty: the loop
    stops there and (1 - 1) / 0 is nan, so class 2 is never a pseudo-label. Class 3 is never predicted: 0.001."""
    logits, targets = hand_batch()
    assert int(entropy_by_hand([1.0, 0.0, 3.0]) / math.log(4) * 100) == 11
    prev = lambda images: {"out": logits.expand(len(images), -1, -1, -1)}  # noqa: E731
    loader = [(torch.zeros(1, 3, 2, 3), targets), (torch.zeros(1, 3, 2, 3), targets)]
    ctx = StepContext(step=1, task=[[1, 2], [3]], new_classes=[3], old_classes=[1, 2])
    got = PLOP().compute_thresholds(SimpleNamespace(to=lambda device: SimpleNamespace(eval=lambda: prev)), loader,
                                    ctx, torch.device("cpu"))
    assert got.tolist() == pytest.approx([0.01, 0.005, math.nan, 0.001], nan_ok=True)


# --- the adaptive factor and the CE ------------------------------------------------------------------------------

def test_classif_adaptive_factor_by_hand():
    background = torch.tensor([[[True, True], [True, True]], [[False, False], [False, False]]])
    confident = torch.tensor([[[True, False], [True, True]], [[True, True], [True, True]]])
    factor = adaptive_factor(confident, background)
    assert factor.tolist() == pytest.approx([3 / (4 + 1e-6), 0.0])  # no background: 0 / 1e-6
    assert adaptive_factor(confident, background, min_factor=0.5).tolist() == pytest.approx([3 / (4 + 1e-6), 0.5])


def test_weighted_cross_entropy_averages_over_every_pixel():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 1.0]], [[0.0, 3.0]]]], dtype=torch.float64)
    labels = torch.tensor([[[0, 255]], [[1, 1]]])  # 4 pixels, one ignored
    factor = torch.tensor([0.5, 0.25], dtype=torch.float64)

    def ce(z, y):
        return -(z[y] - math.log(sum(math.exp(v) for v in z)))

    expected = (0.5 * ce([2.0, 0.0], 0) + 0 + 0.25 * ce([1.0, 0.0], 1) + 0.25 * ce([1.0, 3.0], 1)) / 4
    assert weighted_cross_entropy(logits, labels, factor).item() == pytest.approx(expected, rel=1e-12)


# --- the classifier initialisation (init_balanced) -----------------------------------------------------------------

def test_new_classifier_starts_from_the_background_as_their_init_new_classifier():
    """segmentation_module.py init_new_classifier: weight = background's, bias = background's - log(N + 1), and the
    background's bias becomes the same."""
    torch.manual_seed(0)
    model = SegmentationModel(CFG, [3])
    with torch.no_grad():
        model.classifiers[0].bias.copy_(torch.tensor([0.7, -0.2, 0.1, 0.3]))
    bg_weight, bg_bias = model.classifiers[0].weight[0].clone(), 0.7
    method = build_method("plop")
    new = model.add_classes(2, init=method.classifier_init)
    expected_bias = bg_bias - math.log(2 + 1)
    assert torch.equal(new.weight, bg_weight.expand_as(new.weight))
    assert new.bias.tolist() == pytest.approx([expected_bias] * 2)
    assert model.classifiers[0].bias.tolist() == pytest.approx([expected_bias, -0.2, 0.1, 0.3])


# --- the method --------------------------------------------------------------------------------------------------

def test_before_step_leaves_the_step_s_random_draws_alone():
    """The thresholds pass iterates the step's training loader with copies of its generator and of the global RNG:
    the step then trains on the batches any other method sees."""
    logits, targets = hand_batch()
    drawn = []

    class Loader:
        def __init__(self, generator):
            self.generator = generator

        def __iter__(self):
            drawn.append(torch.rand((), generator=self.generator).item())
            torch.rand(3)  # an augmentation's draw from the global RNG
            yield torch.zeros(1, 3, 2, 3), targets

    prev = SimpleNamespace(to=lambda device: SimpleNamespace(eval=lambda: lambda images: {"out": logits}))
    run = SimpleNamespace(train_loader=lambda step, generator: Loader(generator), device=lambda: torch.device("cpu"))
    ctx = StepContext(step=1, task=[[1, 2], [3]], new_classes=[3], old_classes=[1, 2], prev_model=prev)
    generator = torch.Generator().manual_seed(5)
    state, global_state = generator.get_state(), torch.get_rng_state()
    method = PLOP()
    method.before_step(run, 1, ctx, generator)
    assert torch.equal(generator.get_state(), state) and torch.equal(torch.get_rng_state(), global_state)
    assert drawn == [torch.rand((), generator=torch.Generator().manual_seed(5)).item()]  # the step's own shuffle
    assert method.thresholds(ctx, torch.device("cpu")).shape == (4,)
    method.before_step(run, 0, StepContext(step=0, task=[[1, 2]], new_classes=[1, 2], old_classes=[]), generator)
    assert 0 not in method._thresholds  # step 0: no old model, nothing to compute


def test_the_thresholds_histograms_are_summed_over_processes(monkeypatch):
    """Under torchrun each process sees its shard: the histograms are summed (recall.distributed.sum_), so every
    process uses one set of thresholds (theirs: each its own)."""
    from recall.methods import plop

    logits, targets = hand_batch()
    summed = []
    monkeypatch.setattr(plop.distributed, "sum_", lambda t: summed.append(t.clone()) or t * 2)
    prev = SimpleNamespace(to=lambda device: SimpleNamespace(eval=lambda: lambda images: {"out": logits}))
    ctx = StepContext(step=1, task=[[1, 2], [3]], new_classes=[3], old_classes=[1, 2])
    got = PLOP().compute_thresholds(prev, [(torch.zeros(1, 3, 2, 3), targets)], ctx, torch.device("cpu"))
    assert len(summed) == 1 and summed[0].sum() == 4  # the four background pixels of the one batch
    assert got[1].item() == pytest.approx(0.005)  # two pixels of class 1 in bin 0 (after the sum): 1 / 2 x 0.01


def test_plop_loss_is_the_weighted_ce_plus_local_pod():
    torch.manual_seed(0)
    prev = SegmentationModel(CFG, [3]).eval().requires_grad_(False)
    model = SegmentationModel(CFG, [3])
    model.load_state_dict(prev.state_dict())
    model.add_classes(1, init="background")
    ctx = StepContext(step=1, task=[[1, 2, 3], [4]], new_classes=[4], old_classes=[1, 2, 3], prev_model=prev)
    method = PLOP()
    method._thresholds[1] = torch.tensor([0.004, 0.003, 0.01, 0.002, 0.001])
    images = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([0, 4, 255])[torch.randint(0, 3, (2, 64, 64))]
    outputs = model(images)
    old = prev(images)
    labels, confident, background = pseudo_label(targets, old["out"], method._thresholds[1], math.log(5), n_old=4)
    maps_old, maps_new = distilled_maps(old, 1, True), distilled_maps(outputs, 1, True)
    assert len(maps_old) == 6  # test_resnet: 4 stages after the stem, the ASPP output, the logits
    factors = [0.01] * 5 + [0.0005]
    expected = weighted_cross_entropy(outputs["out"], labels, adaptive_factor(confident, background)) + \
        local_pod(maps_old, maps_new, factors, [1, 2, 4], math.sqrt(5 / 1))
    assert torch.allclose(method.loss(outputs, targets, images, ctx), expected)
    plain = PLOP(classif_adaptive_factor=False)  # every image's cross-entropy weighs 1
    plain._thresholds[1] = method._thresholds[1]
    expected = weighted_cross_entropy(outputs["out"], labels, torch.ones(2)) + \
        local_pod(maps_old, maps_new, factors, [1, 2, 4], math.sqrt(5 / 1))
    assert torch.allclose(plain.loss(outputs, targets, images, ctx), expected)


def test_recall_run_method_plop_on_the_tiny_world(tmp_path, tiny_world):
    from recall.cli import main

    run_dir = tmp_path / "run"
    assert main(["run", f"dataset.root={tiny_world}", "tracking.uri=", "protocol=18-1x2", "method=plop",
                 f"run_dir={run_dir}", *FAST]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "plop" and [s["step"] for s in metrics["steps"]] == [0, 1, 2]
    assert metrics["method_options"]["threshold"] == 0.001 and metrics["method_options"]["pod_factor_last"] == 0.0005
    assert all(math.isfinite(s["miou"]["all"]) for s in metrics["steps"])
