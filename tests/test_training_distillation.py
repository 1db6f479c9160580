"""Knowledge distillation (DeiT): the loss terms, the teacher's inputs, and training with a teacher."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from test_training_module import TINY, QuadrantData, _trainer

import vitkit
from vitkit.training import ImageClassifier
from vitkit.training.distillation import distillation_loss, load_teacher, renormalise
from vitkit.weights import save


def test_hard_and_soft_terms_follow_their_formulas():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5) * 3
    hard = distillation_loss(student, teacher, "hard")
    torch.testing.assert_close(hard, F.cross_entropy(student, teacher.argmax(-1)))
    tau = 2.0
    p = torch.softmax(teacher / tau, -1)
    kl = (p * (p.log() - torch.log_softmax(student / tau, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, "soft", tau), kl * tau**2)
    assert distillation_loss(teacher, teacher, "soft").abs() < 1e-6  # nothing left to learn
    with pytest.raises(ValueError, match="'hard' or 'soft'"):
        distillation_loss(student, teacher, "mse")


def test_renormalise_gives_the_teacher_the_same_pixels_under_its_statistics():
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    to_mean, to_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    student_view = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = (pixels - torch.tensor(to_mean).view(1, 3, 1, 1)) / torch.tensor(to_std).view(1, 3, 1, 1)
    torch.testing.assert_close(renormalise(student_view, mean, std, to_mean, to_std), expected)
    assert renormalise(student_view, mean, std, mean, std) is student_view


def _teacher_file(tmp_path, num_classes: int = 4) -> str:
    teacher = vitkit.create_model("vit_tiny_patch4_32", **TINY, num_classes=num_classes)
    teacher.pretrained_cfg = {"mean": (0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7)}
    return str(save(teacher, tmp_path / "teacher.safetensors"))


def test_a_distilled_student_learns_labels_and_teacher_with_separate_heads(tmp_path):
    module = ImageClassifier(
        "vit_tiny_patch4_32",
        model_options={**TINY, "drop_path_rate": 0.0, "distilled": True},
        classes=QuadrantData.classes,
        teacher=_teacher_file(tmp_path),
        distillation_alpha=0.3,
    ).train()
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    cls_logits, dist_logits = module(images)  # in training: each head on its own
    torch.testing.assert_close((cls_logits + dist_logits) / 2, module.eval()(images))  # evaluation: averaged
    module.train()
    teacher = module.teacher
    expected = 0.7 * F.cross_entropy(cls_logits, labels) + 0.3 * F.cross_entropy(
        dist_logits, teacher(images).argmax(-1)
    )
    torch.testing.assert_close(module.training_step((images, labels), 0), expected)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_training_with_a_teacher_keeps_it_out_of_checkpoints_and_renormalises_its_inputs(tmp_path):
    module = ImageClassifier(
        "vit_tiny_patch4_32",
        model_options=TINY,
        classes=QuadrantData.classes,
        lr=3e-3,
        teacher=_teacher_file(tmp_path),
        distillation_type="soft",
        distillation_tau=2.0,
    )
    teacher = module.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen, shown = [], []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    module.model.register_forward_pre_hook(lambda m, args: shown.append(args[0]) if m.training else None)
    module.model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}  # the data's
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, QuadrantData(n=64))
    assert len(seen) == len(shown) == 3
    norm = ((0.5,) * 3, (0.25,) * 3, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7))
    assert module._teacher_normalisation == norm
    for student_view, teacher_view in zip(shown, seen, strict=True):
        torch.testing.assert_close(teacher_view, renormalise(student_view, *norm))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # never trained
    assert torch.isfinite(trainer.callback_metrics["train/loss_teacher"])
    saved = torch.load(trainer.checkpoint_callback.best_model_path or _last(tmp_path), weights_only=False)
    assert not any("teacher" in k for k in saved["state_dict"])
    assert len(saved["state_dict"]) == len(module.state_dict())


def _last(tmp_path):
    return next(iter(sorted(tmp_path.rglob("*.ckpt"))))


def test_a_timm_convnet_from_its_train_py_checkpoint_teaches(tmp_path):
    # DeiT's teacher is a convnet: timm's train.py saves it with its architecture's name and arguments
    convnet = timm.create_model("resnet10t", num_classes=4).eval()
    path = tmp_path / "model_best.pth.tar"
    torch.save(
        {"arch": "resnet10t", "args": argparse.Namespace(num_classes=4), "state_dict": convnet.state_dict()},
        path,
    )
    teacher = load_teacher(str(path), num_classes=4)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(teacher(x), convnet(x))
    with pytest.raises(ValueError, match="predicts 4 classes, the student 10"):
        load_teacher(str(path), num_classes=10)


def test_options_are_checked():
    with pytest.raises(ValueError, match="distillation_type='mse'"):
        ImageClassifier("vit_tiny_patch4_32", model_options=TINY, num_classes=4, distillation_type="mse")
    with pytest.raises(ValueError, match="needs a distilled model"):
        vitkit.create_model("vit_tiny_patch4_32", **TINY).set_distilled_training(True)


def test_the_teacher_is_read_to_train_only(tmp_path):
    # validating, testing or predicting with a distillation run's config needs no teacher
    module = ImageClassifier(
        "vit_tiny_patch4_32",
        model_options=TINY,
        classes=QuadrantData.classes,
        teacher=str(tmp_path / "gone.pth"),
    )
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.validate(module, QuadrantData(n=64), verbose=False)
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        trainer.fit(module, QuadrantData(n=64))
