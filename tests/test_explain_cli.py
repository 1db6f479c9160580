"""`vitkit explain` and the benchmark script, end to end on a tiny model and a temporary folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.explain import bench
from vitkit.explain._io import load_model, preprocess
from vitkit.explain.cli import explain_main
from vitkit.models import create_model

OPTIONS = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images" / "sub", tmp_path / "masks" / "sub"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        mask = np.zeros((40, 48), dtype=np.uint8)
        mask[8:24, 12:30] = 255
        Image.fromarray(mask).save(masks / f"img{i}.png")
    return tmp_path


@pytest.fixture
def checkpoint(tmp_path):
    model = create_model("vit_nano_patch4_32", num_classes=3, **OPTIONS)
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "hyper_parameters": {
                "model_name": "vit_nano_patch4_32",
                "model_options": OPTIONS,
                "num_classes": 3,
                "classes": ["circle", "square", "triangle"],
            },
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        },
        path,
    )
    return path, model


def test_explain_writes_overlays_predictions_and_metrics(folder, checkpoint, capsys):
    ckpt, original = checkpoint
    out = folder / "out"
    argv = [
        str(folder / "images"),
        "--checkpoint",
        str(ckpt),
        "--methods",
        "rollout,relevance",
        "--out",
        str(out),
    ]
    assert explain_main([*argv, "--evaluate", "--masks", str(folder / "masks"), "--steps", "4"]) == 0

    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == [f"sub_img{i}__{m}.png" for i in range(3) for m in ("relevance", "rollout")]
    assert Image.open(out / "overlays" / overlays[0]).size == (32, 32)
    assert (out / "summary.png").exists()

    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["classes"] == ["circle", "square", "triangle"]
    record = predictions["images"][0]
    assert record["image"].endswith("img0.png")
    assert set(record["explanations"]) == {"rollout", "relevance"}
    assert record["explanations"]["rollout"]["target"] is None  # class-agnostic
    assert record["explanations"]["relevance"]["target"] == record["prediction"]
    # the checkpoint's weights were loaded: same probability as the original model
    model, _ = load_model(None, checkpoint=str(ckpt))
    x, _ = preprocess(Image.open(record["image"]).convert("RGB"), model)
    with torch.no_grad():
        expected = original.eval()(x[None]).softmax(-1)[0]
    assert record["label"] == ["circle", "square", "triangle"][int(expected.argmax())]
    assert record["probability"] == pytest.approx(float(expected.max()), abs=1e-5)

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"rollout", "relevance", "random"}
    assert set(metrics["rollout"]) == {"deletion_auc", "insertion_auc", "pointing_game", "mass_in_object"}
    assert 0.0 <= metrics["random"]["mass_in_object"] <= 1.0
    printed = capsys.readouterr().out
    assert "| rollout |" in printed and "| random |" in printed


def test_explain_with_a_model_name_overrides_and_a_single_file(folder, capsys):
    out = folder / "out2"
    image = folder / "images" / "sub" / "img1.png"
    argv = ["--model", "vit_nano_patch4_32", "--set", "depth=1", "--set", "embed_dim=32", str(image)]
    assert (
        explain_main([*argv, "--methods", "gradient,raw_attention", "--out", str(out), "--target", "2"]) == 0
    )
    record = json.loads((out / "predictions.json").read_text())["images"][0]
    assert record["explanations"]["gradient"]["target"] == 2
    assert (out / "overlays" / "img1__raw_attention.png").exists()
    with pytest.raises(SystemExit):
        explain_main([*argv, "--methods", "gradcam"])


def test_explain_reads_the_architecture_and_class_names_off_the_weights(folder, tmp_path, capsys):
    from vitkit.weights import save

    model = create_model("vit_nano_patch4_32", num_classes=3, **OPTIONS)
    weights = save(model, tmp_path / "w.safetensors", label_names=["cat", "dog", "eel"])
    out = folder / "out3"
    image = folder / "images" / "sub" / "img0.png"
    argv = ["--pretrained", str(weights), str(image), "--methods", "rollout", "--out", str(out)]
    assert explain_main(argv) == 0
    record = json.loads((out / "predictions.json").read_text())["images"][0]
    assert record["label"] == ["cat", "dog", "eel"][record["prediction"]]
    # 'true': the weights timm hosts for --model; a vitkit-only name has none, and the error says so
    with pytest.raises(ValueError, match="timm has none for 'vit_nano_patch4_32'"):
        load_model("vit_nano_patch4_32", "true")


def test_benchmark_prints_metrics_time_and_memory(folder, checkpoint, capsys):
    ckpt, _ = checkpoint
    argv = ["--checkpoint", str(ckpt), "--data", str(folder / "images"), "--masks", str(folder / "masks")]
    out = folder / "bench.json"
    extra = ["--methods", "rollout,gradient", "--timing-batch", "4", "--repeats", "1", "--steps", "2"]
    assert bench.main([*argv, *extra, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seconds / 4 images" in printed and "| gradient |" in printed
    results = json.loads(out.read_text())["results"]
    assert results["rollout"]["seconds / 4 images"] > 0
    assert "peak memory (MiB)" in results["gradient"]
    assert "seconds / 4 images" not in results["random"]
