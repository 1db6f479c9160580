"""Hub names (``timm:``, ``hf:``, ``torchvision:``) resolve through the libraries' own caches, offline.

Each test points the Hugging Face and torch.hub caches at temporary folders, switches the hub
client to offline mode, makes any socket connection fail, and writes the files a download
would have left in the cache. Nothing touches the network.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer as TvViT

import vitkit
from vitkit.weights import (
    UnsupportedCheckpointError,
    load_pretrained,
    model_from_checkpoint,
    read_checkpoint,
    save,
)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """Empty HF and torch caches under tmp_path, offline mode, and no sockets. Returns the HF hub cache."""
    import huggingface_hub.constants as constants

    hf_home = tmp_path / "hf_home"
    hub = hf_home / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # huggingface_hub reads the environment at import: patch the module constants too
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return hub


def put_in_hf_cache(hub: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<file>."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


# ---------------------------------------------------------------------------- timm:
@pytest.mark.slow  # a BEiT-B/16: 86 M parameters written, read and run at 224
def test_a_timm_beit_name_loads_from_the_hf_cache_offline(offline, tmp_path):
    name = "beit_base_patch16_224.in22k_ft_in22k_in1k"
    reference = randomise(timm.create_model(name.split(".")[0], pretrained=False)).eval()
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    put_in_hf_cache(offline, f"timm/{name}", {"model.safetensors": tmp_path / "model.safetensors"})
    model = vitkit.create_model(name, pretrained=True).eval()
    assert model.config["rel_pos_bias"] and model.config["pos_embed"] == "none"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # BEiT's, from timm's config for the tag


@pytest.mark.parametrize("name", ["test_vit.r160_in1k", "test_vit2.r160_in1k", "test_vit3.r160_in1k"])
def test_timm_name_loads_from_the_hf_cache_offline(name, offline, tmp_path):
    # test_vit: class token; test_vit2: register token, LayerScale, average pooling, fc_norm;
    # test_vit3: attention pooling (global_pool='map') over the register token and the patches
    reference = randomise(timm.create_model(name.split(".")[0], pretrained=False))
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    put_in_hf_cache(offline, f"timm/{name}", {"model.safetensors": tmp_path / "model.safetensors"})

    model, report = model_from_checkpoint(f"timm:{name}", return_report=True)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert relative_error(model.eval()(x), reference(x)) < 1e-5
    assert report.format == "timm"
    assert model.config["num_heads"] == reference.blocks[0].attn.num_heads
    # timm's pretrained cfg for this tag travels with the weights
    assert model.pretrained_cfg["crop_pct"] == 0.95
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)

    # the same weights into a model built by name at another size and class count
    other = vitkit.create_model(
        "vit_tiny_patch16_224",
        **{k: model.config[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "class_token")},
        **{k: model.config[k] for k in ("reg_tokens", "global_pool", "init_values", "fc_norm")},
        img_size=96,
        num_classes=3,
    )
    report = load_pretrained(other, f"timm:{name}")
    assert report.head_reset and report.pos_embed_resampled == ((10, 10), (6, 6))
    assert other.pretrained_cfg["input_size"] == (3, 96, 96)


def test_pretrained_true_takes_timm_hub_weights_for_the_name_as_timm_does(offline, tmp_path):
    # timm.create_model(name, pretrained=True): the default tag, or the tag in the name
    reference = randomise(timm.create_model("test_vit", pretrained=False))
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    put_in_hf_cache(offline, "timm/test_vit.r160_in1k", {"model.safetensors": tmp_path / "model.safetensors"})
    x = torch.randn(1, 3, 160, 160)
    for name in ("test_vit", "test_vit.r160_in1k"):
        model = vitkit.create_model(name, pretrained=True).eval()
        with torch.no_grad():
            assert relative_error(model(x), reference(x)) < 1e-5, name
        assert model.pretrained_cfg["crop_pct"] == 0.95

    # pretrained=False (timm's spelling of "no weights") builds without reading anything
    fresh = vitkit.create_model("test_vit", pretrained=False).eval()
    with torch.no_grad():
        assert relative_error(fresh(x), reference(x)) > 0.1

    # the training module takes the same spelling
    from vitkit.training import ImageClassifier

    module = ImageClassifier("test_vit", pretrained=True, num_classes=3)
    assert module.model.num_classes == 3  # head re-initialised for 3 classes, the rest loaded
    assert torch.equal(module.model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)


def test_pretrained_true_without_hosted_weights_says_what_to_pass(offline):
    with pytest.raises(ValueError, match=r"timm has none for 'vit_nano_patch4_32'.*timm:NAME"):
        vitkit.create_model("vit_nano_patch4_32", pretrained=True)
    with pytest.raises(TypeError, match="needs a model name"):
        vitkit.create_model(pretrained=True)


def test_timm_dinov3_ports_load_by_name_with_their_rotations(offline, tmp_path):
    # timm's DINOv3 weights live in its Eva class: LayerScale as gamma_1/2, q and v biases apart
    name = "vit_small_patch16_dinov3_qkvb.lvd1689m"
    reference = randomise(timm.create_model(name.split(".")[0], pretrained=False))
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    put_in_hf_cache(offline, f"timm/{name}", {"model.safetensors": tmp_path / "model.safetensors"})
    model = vitkit.create_model(name, pretrained=True).eval()
    assert (model.config["rope"], model.config["reg_tokens"], model.config["qkv_bias"]) == (True, 4, True)
    for size in ((64, 64), (48, 80)):  # any input size, as timm runs it
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert relative_error(model(x), reference(x)) < 1e-5, size
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_timm_variants_vitkit_cannot_represent_are_refused_before_downloading(offline):
    with pytest.raises(UnsupportedCheckpointError, match="ResPostBlock blocks"):
        read_checkpoint("timm:vit_base_patch16_rpn_224.sw_in1k")  # post-norm blocks; nothing in the cache


def test_timm_weights_missing_from_the_cache_say_so(offline):
    with pytest.raises(RuntimeError, match="Offline"):
        read_checkpoint("timm:test_vit.r160_in1k")


# ---------------------------------------------------------------------------- hf:
def test_hf_repo_loads_from_the_cache_offline(offline, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=4,
    )
    reference = randomise(transformers.ViTForImageClassification(config))
    reference.save_pretrained(tmp_path / "saved")
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.2, 0.3, 0.4], image_std=[0.5, 0.5, 0.5]
    ).save_pretrained(tmp_path / "saved")
    files = {p.name: p for p in (tmp_path / "saved").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(files)
    put_in_hf_cache(offline, "someone/tiny-vit", files)

    model, report = model_from_checkpoint("hf:someone/tiny-vit", return_report=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model.eval()(x), reference(pixel_values=x).logits) < 1e-5
    assert report.format == "hf" and report.source == "hf:someone/tiny-vit"
    assert model.pretrained_cfg["mean"] == (0.2, 0.3, 0.4)


def test_hf_repo_in_timm_layout(offline, tmp_path):
    # a repo as timm's push_to_hf_hub writes it (here written by vitkit.weights.save)
    model = randomise(vitkit.create_model("vit_nano_patch4_32", depth=2, embed_dim=32, num_heads=4))
    folder = save(model, tmp_path / "export", format="timm")
    put_in_hf_cache(offline, "someone/tiny-timm", {p.name: p for p in folder.iterdir()})
    loaded = model_from_checkpoint("hf:someone/tiny-timm").eval()
    assert loaded.config["num_heads"] == 4 and loaded.config["mlp_ratio"] == 2.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(loaded(x), model(x)) < 1e-5
    # timm's names of a repo and of a folder: its architecture, and with pretrained=True its weights
    for name in ("hf-hub:someone/tiny-timm", f"local-dir:{folder}"):
        same = vitkit.create_model(name, pretrained=True).eval()
        fresh = vitkit.create_model(name, pretrained=False).eval()
        assert fresh.config["num_heads"] == 4 and fresh.config["depth"] == 2
        with torch.no_grad():
            assert relative_error(same(x), model(x)) < 1e-5
            assert relative_error(fresh(x), model(x)) > 0.1
    with pytest.raises(ValueError, match="takes its weights from there"):
        vitkit.create_model("hf-hub:someone/tiny-timm", pretrained="other.safetensors")
    # timm's way to name another repo for a model's weights
    overlaid = vitkit.create_model(
        "vit_nano_patch4_32",
        pretrained=True,
        pretrained_cfg_overlay={"hf_hub_id": "someone/tiny-timm"},
        depth=2,
        embed_dim=32,
        num_heads=4,
    ).eval()
    with torch.no_grad():
        assert relative_error(overlaid(x), model(x)) < 1e-5


def test_hf_repo_missing_from_the_cache_says_so(offline):
    with pytest.raises(FileNotFoundError, match="offline, in the cache"):
        read_checkpoint("hf:someone/not-downloaded")


# ---------------------------------------------------------------------------- torchvision:
def test_torchvision_weights_load_from_torch_hub_cache_offline(offline, tmp_path):
    reference = randomise(
        TvViT(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=128,
            num_classes=1000,
        )
    )
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(
        reference.state_dict(), checkpoints / "vit_b_16-c867db91.pth"
    )  # ViT_B_16_Weights.IMAGENET1K_V1

    model = vitkit.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    report = load_pretrained(model, "torchvision:vit_b_16")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model.eval()(x), reference(x)) < 1e-5
    assert report.format == "torchvision"
    # the weights enum's transforms: resize 256, crop 224, bilinear, ImageNet statistics
    assert report.pretrained_cfg["crop_pct"] == 0.875
    assert report.pretrained_cfg["interpolation"] == "bilinear"
    assert report.pretrained_cfg["std"] == (0.229, 0.224, 0.225)
    assert report.label_names[:2] == ["tench", "goldfish"]
