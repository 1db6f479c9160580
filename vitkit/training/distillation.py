"""Knowledge distillation: a trained teacher's predictions as a second training signal.

DeiT (Touvron et al. 2021) trains a ViT on ImageNet alone by adding, to the cross-entropy with
the labels, a term that pulls the student towards a teacher (a convnet in the paper):

    loss = (1 - α) · CE(student, labels) + α · KD(student', teacher)

* ``hard``: KD = CE(student', argmax teacher), the teacher's decision as a label (DeiT's best);
* ``soft``: KD = τ² · KL(softmax(teacher / τ) ‖ softmax(student' / τ)) (Hinton et al. 2015).

``student'`` is the distillation head of a distilled model (``distilled=True``: a distillation
token with its own head, read only by this term), else the same logits as the label term.
The teacher runs without gradients, in eval mode, on the same augmented images, renormalised
from the data's mean and std to its own.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

DistillationType = Literal["hard", "soft"]


def load_teacher(source: str | Path, num_classes: int) -> nn.Module:
    """The teacher model, in eval mode with frozen weights.

    ``source``: anything ``vitkit.create_model(pretrained=...)`` reads (a vitkit run's
    ``.ckpt`` or weights, a timm / Hugging Face ViT file or hub name), or a model vitkit does not
    build: a checkpoint of timm's ``train.py`` for any timm architecture (its ``arch`` entry names
    it: a ResNet, a RegNet...) or ``timm:NAME[.TAG]`` for timm's hub weights of any architecture.
    """
    from vitkit.models import create_model
    from vitkit.weights import UnsupportedCheckpointError

    try:
        teacher = create_model(pretrained=source)
    except UnsupportedCheckpointError:  # not a ViT vitkit builds: timm builds it
        teacher = _timm_teacher(str(source))
    classes = getattr(teacher, "num_classes", None)
    if classes != num_classes:
        raise ValueError(
            f"The teacher {source} predicts {classes} classes, the student {num_classes}: a teacher must "
            "be trained on the same classes (fine-tune it on this data first)."
        )
    teacher.eval().requires_grad_(False)
    return teacher


def _timm_teacher(source: str) -> nn.Module:
    import timm

    if source.startswith("timm:"):
        return timm.create_model(source.removeprefix("timm:"), pretrained=True)
    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py keeps its command line
        checkpoint = torch.load(Path(source).expanduser(), map_location="cpu", weights_only=True)
    arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    if not arch:
        raise ValueError(
            f"{source}: neither a ViT vitkit builds nor a timm train.py checkpoint naming its architecture "
            "('arch'). Pass a timm:NAME, or a checkpoint that says which model it holds."
        )
    args = checkpoint.get("args") or {}
    num_classes = args.get("num_classes") if isinstance(args, dict) else getattr(args, "num_classes", None)
    model = timm.create_model(arch, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    state = checkpoint.get("state_dict_ema") or checkpoint.get("state_dict") or checkpoint
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model


def renormalise(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    to_mean: Sequence[float],
    to_std: Sequence[float],
) -> torch.Tensor:
    """Images normalised by (mean, std) -> the same images normalised by (to_mean, to_std)."""
    if tuple(mean) == tuple(to_mean) and tuple(std) == tuple(to_std):
        return images

    def channels(values: Sequence[float]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

    return (images * channels(std) + channels(mean) - channels(to_mean)) / channels(to_std)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: DistillationType, tau: float = 1.0
) -> torch.Tensor:
    """The KD term between (B, classes) logits: see the module doc."""
    student = student.float()
    teacher = teacher.float()
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=-1))
    if kind == "soft":
        # the KL of each image, averaged over the batch, times τ² (DeiT also divides by the classes)
        log_p = F.log_softmax(teacher / tau, dim=-1)
        log_q = F.log_softmax(student / tau, dim=-1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * tau * tau
    raise ValueError(f"distillation_type={kind!r}: use 'hard' or 'soft'.")
