"""Label evaluation and background inpainting on hand-made tensors."""

from __future__ import annotations

import torch

from recall.labeling import inpaint_background, label_replay


def _logits(*channels: list[list[float]]) -> torch.Tensor:
    """[1, C, H, W] logits from per-channel 2-D lists."""
    return torch.tensor(channels, dtype=torch.float32)[None]


def test_label_replay_restricts_to_background_and_the_image_class():
    # 3 channels (bg, class 1, class 2) over a 1x3 image; channel 2 dominates pixel 0 but the image is class 1
    logits = _logits([[0.0, 0.0, 5.0]], [[1.0, -1.0, 0.0]], [[9.0, 9.0, 9.0]])
    labels = label_replay(logits, class_channel=1, class_index=7)
    assert labels.tolist() == [[[7, 0, 0]]]  # written in the full label space (7), class 2 never appears


def test_label_replay_threshold_marks_unsure_pixels_ignored():
    logits = _logits([[0.0, 0.0, 0.0]], [[0.1, 3.0, -3.0]])
    assert label_replay(logits, 1, 1, threshold=0.9).tolist() == [[[255, 1, 0]]]
    assert label_replay(logits, 1, 1, threshold=0.0).tolist() == [[[1, 1, 0]]]


def test_label_replay_per_image_channels():
    logits = torch.stack([_logits([[0.0]], [[2.0]], [[-2.0]])[0], _logits([[0.0]], [[-2.0]], [[2.0]])[0]])
    labels = label_replay(logits, torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert labels.flatten().tolist() == [3, 4]


def test_inpainting_tau_zero_is_the_original():
    targets = torch.tensor([[[0, 0, 5, 255]]])
    prev = _logits([[2.0, 0.0, 0.0, 0.0]], [[0.0, 0.1, 0.0, 3.0]], [[0.0, 3.0, 0.0, 0.0]])  # bg, class 1, class 2
    out = inpaint_background(targets, prev, threshold=0.0, include_ignore=True)
    assert out.tolist() == [[[0, 2, 5, 1]]]  # bg stays bg where the old model says bg; current class 5 kept
    assert targets.tolist() == [[[0, 0, 5, 255]]], "inputs are not modified"
    assert inpaint_background(targets, prev, 0.0, include_ignore=False).tolist() == [[[0, 2, 5, 255]]]


def test_inpainting_threshold_keeps_unsure_background():
    targets = torch.zeros(1, 1, 2, dtype=torch.long)
    prev = _logits([[0.0, 0.0]], [[0.5, 4.0]])  # pixel 0: p(class 1)=0.62, pixel 1: 0.98
    assert inpaint_background(targets, prev, threshold=0.9).tolist() == [[[0, 1]]]
    assert inpaint_background(targets, prev, threshold=0.5).tolist() == [[[1, 1]]]
    assert inpaint_background(targets, prev, threshold=1.01).tolist() == [[[0, 0]]]


def test_labelled_share_counts_only_the_image_class(tmp_path):
    import numpy as np
    from PIL import Image

    from recall.labeling import labelled_share
    Image.fromarray(np.array([[3, 3, 0, 255]], dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 5, 0, 0]], dtype=np.uint8)).save(tmp_path / "b.png")
    shares = labelled_share(tmp_path, [{"id": "a", "target_class": 3}, {"id": "b", "target_class": 3}])
    assert shares == [0.5, 0.0]  # b's pixel of class 5 is not its class


def test_min_labelled_is_checked():
    import pytest

    from recall.methods import build_method
    assert build_method("recall", min_labelled=0.05).min_labelled == 0.05
    with pytest.raises(ValueError, match="min_labelled"):
        build_method("recall", min_labelled=1.5)


def test_pool_images_of_different_sizes_are_labelled_in_same_size_batches():
    from recall.labeling import same_size_batches

    records = [{"height": h, "width": w} for h, w in [(64, 64), (51, 51), (64, 64), (64, 48), (51, 51), (64, 64)]]
    batches = same_size_batches(records, batch_size=2)
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    assert all(len({(records[i]["height"], records[i]["width"]) for i in batch}) == 1 for batch in batches)
    assert [0, 2] in batches and [5] in batches and [1, 4] in batches


# --- "at least tau": a pixel whose confidence equals the threshold passes it -----------------------------------
# Two equal logits give a softmax of exactly 0.5 (and a logit of -1000 exactly 0 next to them), so tau = 0.5 sits
# exactly on the confidence.

def test_label_replay_keeps_a_pixel_exactly_at_the_threshold():
    logits = _logits([[0.0, 0.0]], [[0.0, 1.0]])  # pixel 0: background and the class tie at 0.5
    assert label_replay(logits, 1, 4, threshold=0.5).tolist() == [[[0, 4]]]


def test_label_replay_all_keeps_a_pixel_exactly_at_the_threshold():
    from recall.labeling import label_replay_all

    logits = _logits([[-1000.0, 0.0]], [[0.0, 0.0]], [[0.0, -1000.0]])  # pixel 0: class 3 vs 7 at 0.5 each
    assert logits.softmax(1).max(1).values.tolist() == [[[0.5, 0.5]]]
    assert label_replay_all(logits, torch.tensor([0, 3, 7]), threshold=0.5).tolist() == [[[3, 0]]]
    assert label_replay_all(logits, torch.tensor([0, 3, 7]), threshold=0.51).tolist() == [[[255, 255]]]


def test_inpainting_replaces_a_pixel_exactly_at_the_threshold():
    targets = torch.zeros(1, 1, 2, dtype=torch.long)
    prev = _logits([[-1000.0, 0.0]], [[0.0, 0.0]], [[0.0, -1000.0]])  # pixel 0: class 1 at exactly 0.5
    assert inpaint_background(targets, prev, threshold=0.5).tolist() == [[[1, 0]]]  # pixel 1: background wins
    assert inpaint_background(targets, prev, threshold=0.5 + 1e-6).tolist() == [[[0, 0]]]


def test_same_size_batches_group_by_height_and_width():
    from recall.labeling import same_size_batches

    records = [{"height": 48, "width": 64}, {"height": 64, "width": 64}, {"height": 64, "width": 48}]
    assert same_size_batches(records, batch_size=4) == [[0], [1], [2]]


def test_label_pngs_are_written_whole_and_read_back(tmp_path):
    import numpy as np
    from PIL import Image

    from recall.labeling import save_label_png
    labels = np.array([[0, 3], [255, 20]], dtype=np.uint8)
    save_label_png(tmp_path / "a.png", labels)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "L" and image.format == "PNG"
        assert np.array_equal(np.asarray(image), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left behind


def test_the_image_own_void_pixels_are_kept_unless_asked():
    targets = torch.tensor([[[0, 255]]])
    prev = torch.tensor([[[[0.0, 0.0]], [[5.0, 5.0]]]])  # the previous model says class 1 everywhere
    assert inpaint_background(targets, prev).tolist() == [[[1, 255]]]  # the default: 255 stays
    assert inpaint_background(targets, prev, include_ignore=True).tolist() == [[[1, 1]]]


def test_labels_are_made_on_the_logits_device():
    # 'meta' stands in for an accelerator: a label tensor left on the CPU cannot meet the logits' device
    from recall.labeling import label_replay_all

    logits = torch.randn(2, 3, 4, 4, device="meta")
    assert label_replay(logits, 1, 5).device.type == "meta"
    assert label_replay(logits, 1, 5).shape == (2, 4, 4)
    assert label_replay_all(logits, torch.tensor([0, 5, 6])).device.type == "meta"
