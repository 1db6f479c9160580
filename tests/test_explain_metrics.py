"""Metrics on toy models and maps where the right answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitkit.explain.metrics import (
    baseline_image,
    deletion,
    evaluate_saliency,
    insertion,
    mass_in_mask,
    model_randomization_test,
    pointing_game,
    random_saliency,
    spearman_correlation,
)
from vitkit.models import PatchEmbedding, VisionTransformer


class OnePatchModel(nn.Module):
    """Two classes; the logit of class 1 is 8 · (mean of patch (1, 2)): nothing else matters."""

    num_prefix_tokens = 0
    has_class_token = False
    global_pool = "avg"

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbedding(img_size=32, patch_size=8)  # a 4 x 4 grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x[:, :, 8:16, 16:24].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(value), 8 * value], dim=1)


def _images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32) * 0.5 + 0.5  # in [0.5, 1]: class 1 at ~0.99


def _perfect(batch: int = 4) -> torch.Tensor:
    saliency = torch.zeros(batch, 4, 4)
    saliency[:, 1, 2] = 1.0
    return saliency


def test_deletion_and_insertion_of_a_perfect_map_on_a_one_patch_model():
    model, images = OnePatchModel(), _images()
    p0 = torch.sigmoid(8 * images[:, :, 8:16, 16:24].mean(dim=(1, 2, 3)))
    curve = deletion(model, images, _perfect(), target=1, baseline="zero", steps=16)
    assert curve.fractions.tolist() == [i / 16 for i in range(17)]
    torch.testing.assert_close(curve.scores[:, 0], p0)
    torch.testing.assert_close(curve.scores[:, 1:], torch.full((4, 16), 0.5))  # the patch is gone at step 1
    torch.testing.assert_close(curve.auc, (p0 + 0.5) / 2 / 16 + 0.5 * 15 / 16)

    inserted = insertion(model, images, _perfect(), target=1, baseline="zero", steps=16)
    torch.testing.assert_close(inserted.scores[:, 0], torch.full((4,), 0.5))
    torch.testing.assert_close(inserted.scores[:, 1:], p0[:, None].expand(4, 16))

    # the random baseline does worse on both curves
    random_del = torch.stack(
        [
            deletion(model, images, random_saliency(model, images, seed=s), 1, baseline="zero").auc
            for s in range(5)
        ]
    )
    random_ins = torch.stack(
        [
            insertion(model, images, random_saliency(model, images, seed=s), 1, baseline="zero").auc
            for s in range(5)
        ]
    )
    assert (curve.auc < random_del.mean(0)).all()
    assert (inserted.auc > random_ins.mean(0)).all()
    # the worst map (the patch last) is worse than random
    worst = deletion(model, images, 1 - _perfect(), 1, baseline="zero").auc
    assert (worst > random_del.mean(0)).all()


def test_curves_are_batched_and_default_to_the_predicted_class():
    model, images = OnePatchModel(), _images(3)
    saliency = random_saliency(model, images, seed=3)
    batched = deletion(model, images, saliency, steps=8, baseline="mean")
    single = torch.cat(
        [
            deletion(model, images[i : i + 1], saliency[i : i + 1], steps=8, baseline="mean").scores
            for i in range(3)
        ]
    )
    torch.testing.assert_close(batched.scores, single)
    assert batched.scores.shape == (3, 9)
    assert (batched.scores[:, 0] > 0.9).all()  # class 1, the prediction
    chunked = insertion(model, images, saliency, steps=8, batch_size=2)
    torch.testing.assert_close(chunked.scores, insertion(model, images, saliency, steps=8).scores)


def test_baseline_images():
    images = torch.rand(2, 3, 32, 32)
    mean = baseline_image(images, "mean")
    torch.testing.assert_close(mean[:, :, 5, 7], images.mean(dim=(2, 3)))
    blurred = baseline_image(images, "blur")
    assert blurred.shape == images.shape
    assert blurred.std() < 0.5 * images.std()  # a strong blur removes the detail
    assert torch.equal(baseline_image(images, "zero"), torch.zeros_like(images))
    with pytest.raises(ValueError, match="baseline"):
        baseline_image(images, "noise")


def test_pointing_game_with_known_masks():
    saliency = _perfect(3)
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 8:16, 16:24] = True  # exactly the top patch: hit
    masks[1, 0:8, 0:8] = True  # elsewhere: miss
    masks[2, 8:16, 24:28] = True  # next to it: miss, unless the mask is dilated
    assert pointing_game(saliency, masks).tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(saliency, masks, tolerance=1).tolist() == [1.0, 0.0, 1.0]
    # pixel-resolution maps work too
    pixel = torch.zeros(3, 32, 32)
    pixel[:, 2, 3] = 1.0
    assert pointing_game(pixel, masks).tolist() == [0.0, 1.0, 0.0]


def test_mass_in_mask():
    masks = torch.zeros(2, 32, 32)
    masks[:, :16, :16] = 1  # a quarter of the image
    uniform = torch.full((2, 4, 4), 1 / 16)
    torch.testing.assert_close(mass_in_mask(uniform, masks), torch.full((2,), 0.25))
    inside = torch.zeros(2, 4, 4)
    inside[:, 0, 1] = 3.0
    inside[:, 1, 0] = 1.0
    torch.testing.assert_close(mass_in_mask(inside, masks), torch.ones(2))
    half = inside.clone()
    half[:, 3, 3] = 4.0
    torch.testing.assert_close(mass_in_mask(half, masks), torch.full((2,), 0.5))
    torch.testing.assert_close(mass_in_mask(masks, masks), torch.ones(2))  # pixel resolution


def test_spearman_correlation():
    a = torch.rand(3, 5, 5)
    torch.testing.assert_close(spearman_correlation(a, a), torch.ones(3))
    torch.testing.assert_close(spearman_correlation(a, -a), -torch.ones(3))
    torch.testing.assert_close(spearman_correlation(a, a.exp()), torch.ones(3))  # monotone: rank only
    ties = spearman_correlation(torch.tensor([[1.0, 2, 2, 3]]), torch.tensor([[1.0, 2, 3, 4]]))
    torch.testing.assert_close(ties, torch.tensor([0.9486833]))  # scipy.stats.spearmanr


def _sharp_model() -> VisionTransformer:
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20)
    return model.eval()


def test_model_randomisation_decorrelates_maps_and_leaves_the_model_alone():
    model = _sharp_model()
    images = torch.randn(4, 3, 32, 32)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    cascade = model_randomization_test(model, images, "raw_attention", mode="cascading")
    assert list(cascade) == ["head", "blocks.1", "blocks.0", "embedding"]
    torch.testing.assert_close(cascade["head"], torch.ones(4))  # attention does not read the head
    assert cascade["blocks.1"].abs().mean() < 0.5
    assert cascade["embedding"].abs().mean() < 0.5
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())

    independent = model_randomization_test(model, images, "gradient", mode="independent")
    assert (independent["head"] < 0.99).all()  # a class-specific map must change with the head
    rollout = model_randomization_test(model, images, "rollout", mode="independent")
    torch.testing.assert_close(rollout["head"], torch.ones(4))
    assert rollout["blocks.0"].abs().mean() < 0.5


def test_evaluate_saliency_reports_every_metric():
    model, images = OnePatchModel(), _images(2)
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:16, 16:24] = 1
    result = evaluate_saliency(model, images, _perfect(2), masks, baseline="zero")
    assert set(result) == {"deletion_auc", "insertion_auc", "pointing_game", "mass_in_object"}
    assert result["pointing_game"].tolist() == [1.0, 1.0]
    torch.testing.assert_close(result["mass_in_object"], torch.ones(2))
    assert (result["insertion_auc"] > result["deletion_auc"]).all()
