"""Segmentation model: a timm encoder (features_only) + a head + a classifier that grows per step.

The head (`ModelConfig.head`) is DeepLab-v2's (the authors'; conf/model/toy.yaml's default): the classifier of each
step is a set of dilated 3×3 convolutions on the encoder's features, summed, and the head itself is the identity; or
DeepLab-v3's ASPP (the dataclass's default, the tests' small model and the study's runs) followed by one 1×1
convolution per step. Either way the classifier is a list, one per step (MiB's layout): step 0 predicts background
and the base classes, every later step appends the logits of its new classes. Old weights are kept untouched.

timm (which imports torchvision, its model zoo and torch._dynamo) is imported where the encoder is built, not with
this module: a process that imports it without building a model (`recall run --dry-run`) never pays it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    backbone: str = "test_resnet"
    output_stride: int = 8
    head_channels: int = 64
    aspp_rates: list[int] = field(default_factory=lambda: [2, 4, 6])
    frozen_bn: bool = False
    pretrained_file: str | None = None  # local weights for the backbone; never downloaded
    channels_last: bool = False  # NHWC memory layout: ~10% faster on CPU here, the usual choice on GPUs
    # aspp: DeepLab-v3's ASPP (1x1 + dilated 3x3 branches + image pooling, fused) then a 1x1 classifier per step;
    # deeplabv2: DeepLab-v2's classifier, four dilated 3x3 convolutions on the encoder's features whose outputs are
    # summed (the authors' model_resnet.py: ASPP(input, n_classes, [6, 12, 18, 24]) with add_n), one per step
    head: str = "aspp"

    def __post_init__(self) -> None:
        from recall.errors import UserError

        if self.head not in HEADS:
            raise UserError(f"model.head={self.head!r}: expected one of {', '.join(HEADS)}")
        if self.output_stride not in (8, 16, 32):
            raise UserError(f"model.output_stride={self.output_stride}: 8, 16 or 32")
        if self.head_channels < 1 or not self.aspp_rates or min(self.aspp_rates) < 1:
            raise UserError(f"model.head_channels={self.head_channels}, model.aspp_rates={list(self.aspp_rates)}: "
                            "positive integers")


HEADS = ("aspp", "deeplabv2")
REQUIRED = "REQUIRED"  # model.pretrained_file of a paper profile: weights must be given (or null, on purpose)


def backbone_weights_needed(backbone: str) -> str:
    """The message of a paper profile run without `model.pretrained_file` (the profile marks it mandatory)."""
    return (f"model.pretrained_file: this profile starts from ImageNet weights, as the papers do; save timm's "
            f"{backbone} once on a machine with internet (python -c \"import timm, torch; torch.save(timm.create_model("
            f"'{backbone}', pretrained=True).state_dict(), '{backbone}.pth')\") and pass "
            f"model.pretrained_file={backbone}.pth, or model.pretrained_file=null to start from random weights on "
            "purpose")


class DeepLabV2Classifier(nn.Module):
    """DeepLab-v2's classifier for `n` classes: dilated 3x3 convolutions at `rates`, summed."""

    def __init__(self, in_channels: int, n: int, rates: list[int]):
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(in_channels, n, 3, padding=r, dilation=r) for r in rates])

    @property
    def out_channels(self) -> int:
        return self.branches[0].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab): 1×1 + dilated 3×3 branches + image pooling, fused by 1×1."""

    def __init__(self, in_channels: int, channels: int, rates: list[int]):
        super().__init__()

        def conv_bn(kernel: int, dilation: int = 1) -> nn.Sequential:
            pad = 0 if kernel == 1 else dilation
            return nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel, padding=pad, dilation=dilation, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([conv_bn(1)] + [conv_bn(3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(channels * (len(rates) + 2), channels, 1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class SegmentationModel(nn.Module):
    """Encoder + head (ASPP, or the identity for DeepLab-v2's) + per-step classifiers. `forward` returns logits and
    the features the methods need: "out" (logits at the input's size), "features" (the head's output), "encoder" (the
    encoder's last level), "stages" (its every level, stem first) and "logits" (at the head's resolution, before
    upsampling)."""

    def __init__(self, cfg: ModelConfig, classes_per_step: list[int]):
        super().__init__()
        self.cfg = cfg
        self.encoder = _make_encoder(cfg)
        self.encoder_channels = self.encoder.feature_info.channels()[-1]
        # DeepLab-v2 has no head before its classifiers: the classifiers read the encoder's features
        self.head = ASPP(self.encoder_channels, cfg.head_channels, list(cfg.aspp_rates)) if cfg.head == "aspp" \
            else nn.Identity()
        self.classifiers = nn.ModuleList()
        for i, n in enumerate(classes_per_step):
            self.add_classes(n + (1 if i == 0 else 0), init="random")
        if cfg.frozen_bn:
            self.encoder = _freeze_bn(self.encoder)
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def num_outputs(self) -> int:
        return sum(c.out_channels for c in self.classifiers)

    def add_classes(self, n: int, init: str = "random") -> nn.Module:
        """Append a classifier for `n` new classes. init: "random" or "background" (MiB's init)."""
        if self.cfg.head == "aspp":
            conv = nn.Conv2d(self.cfg.head_channels, n, 1)
            convs = [conv]
        else:
            conv = DeepLabV2Classifier(self.encoder_channels, n, list(self.cfg.aspp_rates))
            convs = list(conv.branches)
        for c in convs:
            nn.init.normal_(c.weight, std=0.01)
            nn.init.zeros_(c.bias)
        if init == "background" and len(self.classifiers) > 0:
            _background_aware_init(self.classifiers[0], conv)
        elif init not in ("random", "background"):
            raise ValueError(f"unknown classifier init {init!r}; expected 'random' or 'background'")
        if self.cfg.channels_last:
            conv.to(memory_format=torch.channels_last)
        self.classifiers.append(conv)
        return conv

    def decoder_parameters(self):
        yield from self.head.parameters()
        yield from self.classifiers.parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        stages = self.encoder(x)
        encoded = stages[-1]
        features = self.head(encoded)
        small = torch.cat([c(features) for c in self.classifiers], dim=1)
        logits = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # "stages" (every feature level of the encoder, stem first) and "logits" (before upsampling) are what
        # PLOP's Local POD distils; returning them computes nothing more
        return {"out": logits, "features": features, "encoder": encoded, "stages": list(stages), "logits": small}


def _background_aware_init(background: nn.Module, new: nn.Module) -> None:
    """MiB: new classes start as copies of background, and the background probability is split among them (for
    DeepLab-v2's summed branches: every branch copied, the bias shift applied once, to the first)."""
    pairs = list(zip(background.branches, new.branches)) if isinstance(new, DeepLabV2Classifier) else [(background, new)]
    with torch.no_grad():
        shift = math.log(new.out_channels + 1)
        for k, (old, fresh) in enumerate(pairs):
            fresh.weight.copy_(old.weight[0:1].expand_as(fresh.weight))
            fresh.bias.copy_(old.bias[0:1].expand_as(fresh.bias) - (shift if k == 0 else 0.0))
        pairs[0][0].bias[0] -= shift


def _make_encoder(cfg: ModelConfig) -> nn.Module:
    # every feature level (timm's default out_indices): the same modules and weights as the last level alone, so
    # the same numbers; the earlier levels are PLOP's distilled stages
    import timm

    encoder = timm.create_model(cfg.backbone, pretrained=False, features_only=True, output_stride=cfg.output_stride)
    if cfg.pretrained_file:
        load_backbone(encoder, cfg.backbone, Path(cfg.pretrained_file))
    return encoder


def load_backbone(encoder: nn.Module, backbone: str, path: Path) -> None:
    """Load a pretrained backbone's weights into a features-only `encoder`, strictly: every tensor of the encoder
    must be in the file with its shape, and the file may hold nothing else but the backbone's classifier layer
    (a timm checkpoint saved with its classifier, e.g. `timm.create_model('resnet101', pretrained=True)`)."""
    import timm

    from recall.replay.weights import load_strictly, read_state_dict

    hint = (f"pretrain one (`recall pretrain models/pretrain`, the toy world's), or save a timm ImageNet model's "
            f"state dict there: `torch.save(timm.create_model({backbone!r}, pretrained=True).state_dict(), ...)`; "
            "or set model.pretrained_file=null to train from scratch")
    state = read_state_dict(path, f"model.pretrained_file: {hint}")
    head = timm.models.get_pretrained_cfg(backbone).classifier if timm.models.get_pretrained_cfg(backbone) else "fc"
    load_strictly(encoder, {k: v for k, v in state.items() if k != head and not k.startswith(f"{head}.")}, path)


def _freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by torchvision's FrozenBatchNorm2d (statistics and affine fixed)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _freeze_bn(child))
    return module


def save_checkpoint(model: SegmentationModel, path: Path, meta: dict) -> None:
    """Write {state_dict, meta} atomically (temp file + rename), so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    tmp.replace(path)


def head_of(state_dict: dict) -> str | None:
    """The head a state dict was saved from: DeepLab-v2's classifiers have branches, the ASPP head has its own."""
    if any(k.startswith("head.") for k in state_dict):
        return "aspp"
    return "deeplabv2" if any(k.startswith("classifiers.0.branches.") for k in state_dict) else None


def load_checkpoint(path: Path, cfg: ModelConfig) -> tuple[SegmentationModel, dict]:
    """Rebuild the model a checkpoint was saved from (its meta holds the classes per step) and load it. Weights of
    another model (another head, width or backbone) are a UserError naming the file and the options to pass."""
    from recall.errors import UserError

    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    model = SegmentationModel(cfg, meta["classes_per_step"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError:
        saved = head_of(blob["state_dict"])
        hint = f"it was saved with model.head={saved}: pass model.head={saved}" if saved and saved != cfg.head \
            else "pass the model options it was trained with"
        raise UserError(f"{path}: its weights do not fit this run's model (model.head={cfg.head}, "
                        f"model.backbone={cfg.backbone}, model.head_channels={cfg.head_channels}, "
                        f"model.aspp_rates={list(cfg.aspp_rates)}); {hint}, or train it again with this "
                        "run's") from None
    return model, meta
