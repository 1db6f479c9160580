"""Convert ViT weights between vitkit's parameter names (= timm's) and other libraries' layouts.

Every layout stores the same computation under different names and shapes:

=====================  ==========================================  =====================================
vitkit / timm          Hugging Face ``ViTModel``                    torchvision ``VisionTransformer``
=====================  ==========================================  =====================================
``cls_token``          ``embeddings.cls_token``                     ``class_token``
``pos_embed``          ``embeddings.position_embeddings``           ``encoder.pos_embedding``
``patch_embed.proj``   ``embeddings.patch_embeddings.projection``   ``conv_proj``
``blocks.N.norm1``     ``encoder.layer.N.layernorm_before``         ``encoder.layers.encoder_layer_N.ln_1``
``blocks.N.attn.qkv``  ``...attention.attention.{query,key,value}`` ``...self_attention.in_proj_*``
``blocks.N.attn.proj`` ``...attention.output.dense``                ``...self_attention.out_proj``
``blocks.N.norm2``     ``...layernorm_after``                       ``...ln_2``
``blocks.N.mlp.fc1``   ``...intermediate.dense``                    ``...mlp.0``
``blocks.N.mlp.fc2``   ``...output.dense``                          ``...mlp.3``
``norm``               ``layernorm``                                ``encoder.ln``
``head``               ``classifier`` (outside the ``vit.`` prefix)  ``heads.head``
=====================  ==========================================  =====================================

Hugging Face's ViT relatives reuse these names with a few of their own: DeiT's
``embeddings.distillation_token`` and ``distillation_classifier``, DINOv2's ``encoder.layer.N.{norm1,
mlp.fc1, layer_scale1.lambda1}``. CLIP's image tower has a layout of its own (:func:`clip_to_vitkit`).

Google's JAX checkpoints (``.npz``, the original ViT release and big_vision) store kernels
transposed (``(in, out)``, convolutions ``(H, W, C_in, C_out)``) and q/k/v per head
(``(D, heads, head_dim)``); :func:`npz_to_vitkit` reshapes them.

All functions are pure: they take and return dicts of tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

StateDict = dict[str, torch.Tensor]

FORMATS = ("timm", "hf", "clip", "open_clip", "dinov3", "aimv2", "torchvision")
"""Layouts :func:`detect_format` tells apart from the keys (``.npz`` files are read separately).
:func:`to_vitkit` reports CLIP's layout without a class embedding as ``'siglip'``."""

# The model inside a Hugging Face classifier (ViTFor..., DeiTFor...): its keys start with this, the
# classifier's own head sits beside it.
_HF_MODEL_PREFIXES = ("vit.", "deit.", "ijepa.")

# A key that only one layout has, as it appears after any wrapper prefix ("module.", "model.", ...).
_ANCHORS = {
    "timm": "patch_embed.proj.weight",
    "hf": "embeddings.patch_embeddings.projection.weight",
    "clip": "embeddings.patch_embedding.weight",  # Hugging Face CLIP's (and SigLIP's) image tower
    "open_clip": "class_embedding",  # OpenAI's CLIP and open_clip: the image tower, under visual.
    "dinov3": "embeddings.patch_embeddings.weight",  # Hugging Face DINOv3 (a bare Conv2d)
    "aimv2": "embeddings.patch_embed.weight",  # Hugging Face AIMv2's image tower
    "torchvision": "conv_proj.weight",
}


class UnsupportedCheckpointError(ValueError):
    """The checkpoint holds a ViT variant that vitkit's VisionTransformer cannot represent."""


# ---------------------------------------------------------------------------- detection
def detect_format(state: Mapping[str, Any]) -> tuple[str, str]:
    """Guess the layout of a state dict from its keys.

    Returns:
        ``(format, prefix)``: one of :data:`FORMATS`, and the wrapper prefix in front of the
        model's own keys (``""``, ``"module."``, ``"model."`` for a Lightning checkpoint, ...).
        For Hugging Face the prefix excludes ``vit.`` / ``deit.``, which are part of the layout.

    Raises:
        UnsupportedCheckpointError: no known ViT layout matches.
    """
    found: list[tuple[int, str, str]] = []
    for fmt, anchor in _ANCHORS.items():
        for key in state:
            if key == anchor or key.endswith("." + anchor):
                prefix = key[: len(key) - len(anchor)]
                if fmt == "hf":  # vit. / deit. are part of the layout: the classifier heads sit beside them
                    model = next((m for m in _HF_MODEL_PREFIXES if prefix.endswith(m)), "")
                    prefix = prefix.removesuffix(model)
                found.append((len(prefix), fmt, prefix))
    if not found:
        sample = ", ".join(sorted(state)[:8])
        raise UnsupportedCheckpointError(
            "Not a Vision Transformer checkpoint vitkit can read: no patch embedding found "
            f"(looked for {', '.join(repr(a) for a in _ANCHORS.values())}). First keys: {sample}."
        )
    _, fmt, prefix = min(found)  # the outermost model wins (e.g. "model." over "_forward_model.")
    return fmt, prefix


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Keep the entries under ``prefix``, without it (other entries belong to other modules)."""
    if not prefix:
        return dict(state)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def to_vitkit(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, str, list[str]]:
    """Detect the layout of ``state`` and convert it to vitkit's names.

    Returns:
        ``(state dict in vitkit layout, format, notes)``; notes say what was dropped and why.
    """
    fmt, prefix = detect_format(state)
    inner = strip_prefix(state, prefix)
    notes = []
    if prefix:
        notes.append(f"weights found under the prefix {prefix!r}.")
    used_beside: set[str] = set()  # what beside the ViT the conversion reads too
    if fmt == "hf":
        converted, more = hf_to_vitkit(inner)
    elif fmt == "clip":
        converted, more = clip_to_vitkit(inner)
        if "cls_token" not in converted:  # SigLIP: CLIP's names, no class token, an attention pool
            fmt = "siglip"
        outer = prefix.removesuffix("vision_model.")
        if prefix.endswith("vision_model.") and f"{outer}classifier.weight" in state:
            converted, more = _mean_classifier(converted, state, outer, more)
            used_beside = {f"{outer}classifier.weight", f"{outer}classifier.bias"}
    elif fmt == "open_clip":
        converted, more = open_clip_to_vitkit(inner)
    elif fmt == "dinov3":
        converted, more = dinov3_to_vitkit(inner)
    elif fmt == "aimv2":
        converted, more = aimv2_to_vitkit(inner)
    elif fmt == "torchvision":
        converted, more = torchvision_to_vitkit(inner)
    else:
        converted, more = _drop_timm_extras(inner)
    beside = sorted({k.split(".")[0] for k in state if not k.startswith(prefix) and k not in used_beside})
    if fmt == "clip" and beside:
        notes.append(_CLIP_BESIDE_NOTE)
    elif beside:
        notes.append(f"not loaded: what the checkpoint holds beside the ViT ({', '.join(beside)}).")
    return converted, fmt, notes + more


def _drop_timm_extras(state: StateDict) -> tuple[StateDict, list[str]]:
    """timm-layout checkpoints sometimes carry tensors that are not part of the classifier."""
    notes = []
    extras = [k for k in state if k == "mask_token" or k.startswith(("decoder", "mask_token"))]
    if extras:
        notes.append(f"dropped {len(extras)} pre-training tensors (mask token / MAE decoder).")
    return {k: v for k, v in state.items() if k not in extras}, notes


# ---------------------------------------------------------------------------- Hugging Face
_HF_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),  # DeiT
    (r"embeddings\.register_tokens", "reg_token"),  # DINOv2 with registers
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    # transformers < 5 names (also what ``save_pretrained`` writes)
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    # transformers >= 5 module names (a ``torch.save(model.state_dict())`` of a v5 model)
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),  # (DINOv2's)
    (r"layers\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    # DINOv2 (Dinov2Model): timm-like block names, LayerScale as layer_scaleN.lambda1
    (r"encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    # DINOv2's giant model: a SwiGLU MLP, its gate and value packed in weights_in (gate first)
    (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.fc1."),
    (r"(?:encoder\.layer\.|layers\.)(\d+)\.mlp\.(?:weights_out|down_proj)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"layernorm\.", "norm."),
    (r"cls_classifier\.", "head."),  # DeiTForImageClassificationWithTeacher
    (r"distillation_classifier\.", "head_dist."),
    (r"classifier\.", "head."),
]
_HF_QKV = [
    re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)"),
    re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)"),
]
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def _rename(
    state: Mapping[str, torch.Tensor],
    renames: list[tuple[str, str]],
    qkv_patterns: list[re.Pattern[str]],
    layout: str,
) -> StateDict:
    """Rename each key by the first of ``renames`` that matches its start, and concatenate the
    separate query, key and value projections (``qkv_patterns``: groups block, q/k/v, weight/bias)
    into ``blocks.N.attn.qkv``. Keys nothing matches are kept as they are, for the loader to report."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    for key, value in state.items():
        match = next((m for p in qkv_patterns if (m := p.fullmatch(key))), None)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((int(block), kind), [None, None, None])[_QKV_ORDER[part]] = value
            continue
        for pattern, replacement in renames:
            new, n = re.subn(f"^{pattern}", replacement, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value
    for (block, kind), parts in sorted(qkv.items()):
        if any(p is None for p in parts):
            raise UnsupportedCheckpointError(
                f"{layout} checkpoint: block {block} lacks one of query/key/value {kind}."
            )
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


def _pack_swiglu(state: StateDict) -> StateDict:
    """transformers 5's SwiGLU MLP keeps gate_proj and up_proj apart; pack them as its checkpoints
    do (``weights_in``: the gate's rows, then the value's)."""
    pattern = re.compile(r"(.*\.mlp\.)(gate|up)_proj\.(weight|bias)")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out: StateDict = {}
    for key, value in state.items():
        if match := pattern.fullmatch(key):
            parts.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        else:
            out[key] = value
    for (prefix, kind), pair in parts.items():
        if set(pair) != {"gate", "up"}:
            raise UnsupportedCheckpointError(
                f"{prefix}: a SwiGLU MLP without both gate_proj and up_proj {kind}."
            )
        out[f"{prefix}weights_in.{kind}"] = torch.cat([pair["gate"], pair["up"]])
    return out


def hf_to_vitkit(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Hugging Face ``ViTModel`` / ``ViTForImageClassification`` (and ``ViTMSN*``, ``Dinov2Model``,
    ``DeiTModel`` / ``DeiTForImageClassificationWithTeacher``) weights -> vitkit names.

    Accepts the ``vit.``-prefixed keys of the classifier and the bare keys of ``ViTModel``, in
    the layout ``save_pretrained`` writes and in transformers 5's module names. Query, key and
    value projections are concatenated into ``attn.qkv``. The ``ViTModel`` pooler (dense + tanh
    on the class token, unused by the classifier) and the masked-image-modelling ``mask_token``
    have no vitkit counterpart and are dropped with a note.

    Keys it does not recognise are kept as they are, so the loader reports them.
    """
    notes = []
    dropped = []
    kept: dict[str, torch.Tensor] = {}
    # DeiTForImageClassification: a distillation token, but one head, on the class token only
    cls_only_head = "classifier.weight" in state and any(
        k.endswith("embeddings.distillation_token") for k in state
    )
    for key, value in state.items():
        model = next((m for m in _HF_MODEL_PREFIXES if key.startswith(m)), "")
        name = key.removeprefix(model)
        not_weights = name.startswith(("pooler.", "decoder.")) or name == "embeddings.mask_token"
        if not_weights or (cls_only_head and name.startswith("classifier.")):
            dropped.append(name)
        else:
            kept[name] = value
    out = _rename(_pack_swiglu(kept), _HF_RENAMES, _HF_QKV, "Hugging Face")
    if "reg_token" in out and "cls_token" in out and "pos_embed" in out:
        # DINOv2 with registers: the class token has a position, the registers none. vitkit's
        # registers follow timm's no_embed_class layout (positions for the patches only), so the
        # class token's position is added into the token itself: the same sum, at every grid.
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
        notes.append("registers: the class token's position embedding is folded into the class token.")
    if any(d.startswith("pooler.") for d in dropped):
        notes.append(
            "dropped the pooler of transformers' ViTModel / DeiTModel (dense + tanh on the class "
            "token, its pooler_output): the classifier does "
            "not use it; vitkit's features are the normalised tokens (forward_features)."
        )
    if "embeddings.mask_token" in dropped:
        notes.append("dropped the masked-image-modelling mask_token.")
    if any(d.startswith("decoder.") for d in dropped):
        notes.append(
            "dropped the pre-training decoder (MAE's or ViTForMaskedImageModeling's): the encoder is the ViT."
        )
    if cls_only_head:
        notes.append(
            "dropped DeiTForImageClassification's head: it reads the class token alone, while a "
            "distilled ViT averages a head on the class token and one on the distillation token: the "
            "backbone loads without a head (num_classes=0; pass num_classes=... for fresh heads). "
            "DeiTForImageClassificationWithTeacher's two heads load."
        )
    return out, notes


# Hugging Face CLIP's image tower (``CLIPVisionModel``, the ``vision_model`` of ``CLIPModel``)
_CLIP_RENAMES = [
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"pre_layrnorm\.", "norm_pre."),  # sic: transformers' name
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"post_layernorm\.", "norm."),
    (r"head\.probe$", "attn_pool.latent"),  # SigLIP's attention-pooling head
    (r"head\.attention\.out_proj\.", "attn_pool.proj."),
    (r"head\.layernorm\.", "attn_pool.norm."),
    (r"head\.mlp\.fc([12])\.", r"attn_pool.mlp.fc\1."),
]
_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


_CLIP_BESIDE_NOTE = (
    "CLIP's projection into the joint image-text space (visual_projection) and its text tower "
    "are not part of an image classifier: not loaded. The pooled features are the image "
    "tower's own, before that projection."
)


def clip_to_vitkit(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Hugging Face CLIP or SigLIP image-tower weights (``vision_model.`` stripped) -> vitkit names.

    CLIP's tower is timm's ``pre_norm`` ViT: a class embedding (a vector), a patch convolution
    without bias, a position table as an ``nn.Embedding``, a LayerNorm before the blocks and one
    after. transformers applies that last norm to the pooled class token only, vitkit (as timm)
    to every token: the pooled features are the same. The ``position_ids`` buffer is not a weight.

    SigLIP's tower has the same names, no class token and no norm before the blocks, a patch
    bias, and an attention-pooling ``head`` (a probe and an ``nn.MultiheadAttention`` whose packed
    q, k, v projection splits into the pool's ``q`` and ``kv``): ``global_pool='map'``.
    """
    special: StateDict = {}
    rest: StateDict = {}
    for key, value in state.items():
        if key == "embeddings.class_embedding":  # a vector
            special["cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":  # an nn.Embedding's table
            special["pos_embed"] = value.unsqueeze(0)
        elif key.startswith("head.attention.in_proj_"):  # SigLIP's pool: [q; k; v] in one tensor
            kind = key.rsplit("_", 1)[-1]
            dim = value.shape[0] // 3
            special[f"attn_pool.q.{kind}"], special[f"attn_pool.kv.{kind}"] = value[:dim], value[dim:]
        elif key != "embeddings.position_ids":  # a buffer, not a weight
            rest[key] = value
    out = {**special, **_rename(rest, _CLIP_RENAMES, [_CLIP_QKV], "CLIP")}
    return out, []


# OpenAI's CLIP and open_clip (``visual.`` stripped): the same ViT as CLIP's in transformers, other names
_OPEN_CLIP_RENAMES = [
    (r"conv1\.", "patch_embed.proj."),
    (r"ln_pre\.", "norm_pre."),
    (r"ln_post\.", "norm."),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])\.", r"blocks.\1.norm\2."),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"transformer\.resblocks\.(\d+)\.ls_([12])\.gamma$", r"blocks.\1.ls\2.gamma"),
]


def open_clip_to_vitkit(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """OpenAI CLIP / open_clip image-tower weights (``visual.`` stripped) -> vitkit names.

    A pre-norm ViT (``ln_pre``) whose attention packs q, k, v in ``in_proj`` as timm's ``qkv``. Its
    projection into the joint image-text space (``proj``, D x E) becomes the head, E outputs without
    bias, as timm loads these weights: the model's output is the CLIP image embedding, which text
    embeddings classify zero-shot (``num_classes=N`` puts a fresh classifier there instead).
    """
    special: StateDict = {}
    rest: StateDict = {}
    for key, value in state.items():
        if key == "class_embedding":  # a vector
            special["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            special["pos_embed"] = value.unsqueeze(0)
        elif key == "proj":
            special["head.weight"] = value.t().contiguous()
            special["head.bias"] = torch.zeros(value.shape[1], dtype=value.dtype)
        else:
            rest[key] = value
    notes = []
    if "head.weight" in special:
        notes.append(
            "the projection into CLIP's joint image-text space (visual.proj) is the head, as in timm: "
            "the outputs are image embeddings (pass num_classes=... for a classifier)."
        )
    return {**special, **_rename(rest, _OPEN_CLIP_RENAMES, [], "open_clip")}, notes


# Hugging Face DINOv3 (``DINOv3ViTModel``): ViT blocks with rotary positions, registers, LayerScale
_DINOV3_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"(?:model\.)?layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"(?:model\.)?layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"(?:model\.)?layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"(?:model\.)?layer\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.fc1_g."),  # the gated MLP (7B)
    (r"(?:model\.)?layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
    (r"norm\.", "norm."),
]
_DINOV3_QKV = [re.compile(r"(?:model\.)?layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")]


def dinov3_to_vitkit(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Hugging Face DINOv3 ViT weights -> vitkit names (``rope=True``, ``pos_embed='none'``).

    Its key projection has no bias: the fused ``qkv`` bias gets zeros there. ``up_proj`` is the
    MLP's first layer, or the value half of the gated MLP when a ``gate_proj`` is there. The
    masked-image-modelling ``mask_token`` is dropped.
    """
    gated = any(".mlp.gate_proj." in key for key in state)
    up = r"blocks.\1.mlp.fc1_x." if gated else r"blocks.\1.mlp.fc1."  # the gated MLP's value, or fc1
    renames = [*_DINOV3_RENAMES, (r"(?:model\.)?layer\.(\d+)\.mlp\.up_proj\.", up)]
    notes = []
    kept = dict(state)
    if kept.pop("embeddings.mask_token", None) is not None:
        notes.append("dropped the masked-image-modelling mask_token.")
    for key in [k for k in kept if re.fullmatch(r"(?:model\.)?layer\.\d+\.attention\.q_proj\.bias", k)]:
        k_bias = key.replace("q_proj", "k_proj")
        kept.setdefault(k_bias, torch.zeros_like(kept[key]))  # DINOv3 trains no key bias
    return _rename(kept, renames, _DINOV3_QKV, "DINOv3"), notes


# Hugging Face AIMv2 (``Aimv2VisionModel``, the ``vision_model`` of ``Aimv2Model``)
_AIMV2_RENAMES = [
    (r"embeddings\.patch_embed\.", "patch_embed.proj."),
    (r"embeddings\.rms_norm\.", "patch_embed.norm."),
    (r"encoder\.layers\.(\d+)\.rms_norm([12])\.", r"blocks.\1.norm\2."),
    (r"encoder\.layers\.(\d+)\.attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.(\d+)\.ffn\.gate_proj\.", r"blocks.\1.mlp.fc1_g."),
    (r"encoder\.layers\.(\d+)\.ffn\.up_proj\.", r"blocks.\1.mlp.fc1_x."),
    (r"encoder\.layers\.(\d+)\.ffn\.down_proj\.", r"blocks.\1.mlp.fc2."),
    (r"rms_norm\.", "norm."),
]
_AIMV2_QKV = [re.compile(r"encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")]


def aimv2_to_vitkit(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Hugging Face AIMv2 image-tower weights -> vitkit names: RMSNorm after the patch projection
    (``embed_norm``) and in the blocks, a split SwiGLU MLP, no class token, no biases but the patch's.

    Its attention-pooling head (a query without projection, no MLP) is not vitkit's
    :class:`~vitkit.models.AttentionPool`: it is dropped, and the tokens are averaged, as in timm's
    ``aimv2_*`` ports.
    """
    notes = []
    kept: StateDict = {}
    for key, value in state.items():
        if key == "embeddings.position_embedding.weight":  # an nn.Embedding's table
            kept["pos_embed"] = value.unsqueeze(0)
        elif key.startswith("head."):
            continue
        elif key != "embeddings.position_ids":
            kept[key] = value
    if any(key.startswith("head.") for key in state):
        notes.append(
            "AIMv2's attention-pooling head (a query without projection, no MLP) is not loaded: the "
            "features are the mean of the tokens (global_pool='avg'), as in timm's aimv2 models."
        )
    return _rename(kept, _AIMV2_RENAMES, _AIMV2_QKV, "AIMv2"), notes


def timm_eva_to_vitkit(state: Mapping[str, torch.Tensor]) -> StateDict:
    """timm's ``Eva`` weights (its DINOv3 ports) -> vitkit names: LayerScale ``gamma_1`` / ``gamma_2``
    become ``ls1.gamma`` / ``ls2.gamma``, and separate ``q_bias`` / ``v_bias`` the fused ``qkv`` bias
    (zeros for the keys, which have none)."""
    out: StateDict = {}
    for key, value in state.items():
        if match := re.fullmatch(r"(blocks\.\d+)\.gamma_([12])", key):
            out[f"{match.group(1)}.ls{match.group(2)}.gamma"] = value
        elif key.endswith(".attn.q_bias"):
            v_bias = state[key.replace(".q_bias", ".v_bias")]
            out[key.replace(".q_bias", ".qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
        elif not key.endswith(".attn.v_bias"):
            out[key] = value
    return out


def timm_beit_to_vitkit(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """timm's ``Beit`` weights (BEiT, BEiT v2) -> vitkit names: as :func:`timm_eva_to_vitkit`, and
    each block's ``relative_position_bias_table`` becomes ``attn.rel_pos_bias.table``.

    A table shared by all blocks (``rel_pos_bias.relative_position_bias_table``, BEiT's pre-training
    checkpoints) is copied into every block, as BEiT's own fine-tuning does; the saved index
    buffers are dropped (vitkit computes them)."""
    shared = state.get("rel_pos_bias.relative_position_bias_table")
    out: StateDict = {}
    for key, value in timm_eva_to_vitkit(state).items():
        if key.endswith("relative_position_index") or key == "rel_pos_bias.relative_position_bias_table":
            continue
        if match := re.fullmatch(r"(blocks\.\d+)\.attn\.relative_position_bias_table", key):
            key = f"{match.group(1)}.attn.rel_pos_bias.table"
            value = value if shared is None else value + shared  # both: their sum is the bias
        out[key] = value
    notes = []
    if shared is not None:
        blocks = sorted({int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))})
        for block in blocks:
            out.setdefault(f"blocks.{block}.attn.rel_pos_bias.table", shared)
        notes.append("the relative position bias all blocks share is copied into each block's own.")
    return out, notes


def _mean_classifier(
    tower: StateDict, state: Mapping[str, torch.Tensor], outer: str, notes: list[str]
) -> tuple[StateDict, list[str]]:
    """``SiglipForImageClassification`` and ``CLIPForImageClassification``: the ``classifier`` reads
    the mean of the tower's patch tokens, so it becomes the head (``global_pool='avg'``), and what
    the classifier leaves unused is dropped: SigLIP's attention pool, and CLIP's final norm (CLIP's
    classifier reads the tokens before it)."""
    clip = "cls_token" in tower
    unused = ("norm.",) if clip else ("attn_pool.",)
    out = {k: v for k, v in tower.items() if not k.startswith(unused)}
    out["head.weight"], out["head.bias"] = (
        state[f"{outer}classifier.weight"],
        state[f"{outer}classifier.bias"],
    )
    if clip:
        note = (
            "CLIPForImageClassification: its classifier reads the mean of the patch tokens before the "
            "tower's final norm (global_pool='avg', final_norm=False); that norm (post_layernorm) is "
            "not loaded"
        )
    else:
        note = "SiglipForImageClassification: its classifier reads the mean of the tokens (global_pool='avg')"
        if any(k.startswith("attn_pool.") for k in tower):
            note += "; the tower's attention-pooling head, which it leaves unused, is not loaded"
    return out, [*notes, note + "."]


def vitkit_to_hf(
    state: Mapping[str, torch.Tensor], with_head: bool = True, distilled: bool = False
) -> StateDict:
    """vitkit weights -> the layout ``ViTForImageClassification.save_pretrained`` writes (with
    ``distilled``: ``DeiTForImageClassificationWithTeacher``'s).

    Only the original ViT's parameters have a Hugging Face counterpart (class token, learned
    positions including the class token's, no registers, no LayerScale, no q/k norm, final norm
    before class-token pooling), and DeiT's distillation token and second head;
    :func:`vitkit.weights.save` checks the model options first.
    """
    model = "deit" if distilled else "vit"
    renames = [
        (r"cls_token", f"{model}.embeddings.cls_token"),
        (r"dist_token", f"{model}.embeddings.distillation_token"),
        (r"pos_embed", f"{model}.embeddings.position_embeddings"),
        (r"patch_embed\.proj\.", f"{model}.embeddings.patch_embeddings.projection."),
        (r"blocks\.(\d+)\.norm1\.", rf"{model}.encoder.layer.\1.layernorm_before."),
        (r"blocks\.(\d+)\.norm2\.", rf"{model}.encoder.layer.\1.layernorm_after."),
        (r"blocks\.(\d+)\.attn\.proj\.", rf"{model}.encoder.layer.\1.attention.output.dense."),
        (r"blocks\.(\d+)\.mlp\.fc1\.", rf"{model}.encoder.layer.\1.intermediate.dense."),
        (r"blocks\.(\d+)\.mlp\.fc2\.", rf"{model}.encoder.layer.\1.output.dense."),
        (r"norm\.", f"{model}.layernorm."),
        (r"head_dist\.", "distillation_classifier."),
        (r"head\.", "cls_classifier." if distilled else "classifier."),
    ]
    out: StateDict = {}
    for key, value in state.items():
        match = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if match:
            block, kind = match.groups()
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{model}.encoder.layer.{block}.attention.attention.{part}.{kind}"] = chunk.contiguous()
            continue
        if key.startswith(("head.", "head_dist.")) and not with_head:
            continue
        for pattern, replacement in renames:
            new, n = re.subn(f"^{pattern}", replacement, key)
            if n:
                out[new] = value.contiguous()
                break
        else:
            raise UnsupportedCheckpointError(f"{key} has no Hugging Face ViT counterpart.")
    return out


# ---------------------------------------------------------------------------- torchvision
_TV_RENAMES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.", "patch_embed.proj."),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_weight", r"blocks.\1.attn.qkv.weight"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_bias", r"blocks.\1.attn.qkv.bias"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.ln\.", "norm."),
    (r"heads\.head\.", "head."),
]


def torchvision_to_vitkit(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """torchvision ``vit_b_16``-style weights -> vitkit names.

    ``nn.MultiheadAttention`` already stores q, k, v stacked in that order, like timm's ``qkv``.
    A representation layer (``heads.pre_logits``, torchvision's ``representation_size``) has no
    vitkit counterpart: it is dropped together with the head it feeds, so the model keeps a fresh
    head (fine-tuning); a conv stem (``conv_proj.conv_*``) is unsupported.
    """
    notes = []
    if any(k.startswith("conv_proj.conv_") for k in state):
        raise UnsupportedCheckpointError(
            "torchvision ViT with a convolutional stem (conv_stem_configs) is not supported by vitkit."
        )
    has_pre_logits = any(k.startswith("heads.pre_logits.") for k in state)
    kept = {k: v for k, v in state.items() if not (has_pre_logits and k.startswith("heads."))}
    out = _rename(kept, _TV_RENAMES, [], "torchvision")  # its q, k, v are one tensor already
    if has_pre_logits:
        notes.append(
            "dropped the representation layer (heads.pre_logits) and the head it feeds: vitkit has no "
            "pre-logits layer; the model keeps a freshly initialised head."
        )
    return out, notes


# ---------------------------------------------------------------------------- Google / big_vision npz
_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def npz_to_vitkit(arrays: Mapping[str, np.ndarray]) -> tuple[StateDict, dict[str, Any], list[str]]:
    """Google ViT ``.npz`` weights (original release or big_vision) -> vitkit names.

    Handles the original ``vision_transformer`` layout (``Transformer/posembed_input``,
    ``MultiHeadDotProductAttention_1``, ``MlpBlock_3``, position entries for the class token
    too) and big_vision's (``params/`` prefix, top-level ``pos_embedding`` for the patches only,
    ``MultiHeadDotProductAttention_0``, ``MlpBlock_0``, per-block or scanned ``encoderblock``,
    and its attention-pooling head ``MAPHead_0``, as in SigLIP).

    Returns:
        ``(state dict, options, notes)``; options are what the file reveals beyond shapes:
        ``num_heads``, ``no_embed_class``, ``global_pool``, ``fc_norm`` and ``norm_eps`` (with a
        MAP head also ``act_layer``).

    Raises:
        UnsupportedCheckpointError: hybrid (ResNet) stems, bfloat16 arrays, or no ViT found.
    """
    prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise UnsupportedCheckpointError(
            "Not a Google/big_vision ViT .npz: no 'embedding/kernel' (also looked under "
            f"{', '.join(repr(p) for p in _NPZ_PREFIXES[1:])}). First keys: {', '.join(sorted(arrays)[:8])}."
        )
    w = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    if any(k.startswith(("conv_root", "block1/")) for k in w):
        raise UnsupportedCheckpointError("Hybrid ResNet-ViT .npz checkpoints are not supported by vitkit.")
    for k, v in w.items():
        if v.dtype.kind not in "fiu":
            raise UnsupportedCheckpointError(
                f"{k} has dtype {v.dtype} (bfloat16 saved by JAX?): convert the .npz to float32 first."
            )
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w

    def t(name: str, idx: int | None = None, transpose: bool = True) -> torch.Tensor:
        x = np.asarray(w[name])
        if idx is not None:
            x = x[idx]
        if x.ndim == 4 and x.shape[0] == x.shape[1] == x.shape[2] == 1:
            x = x.reshape(-1)
        if transpose:
            x = {
                4: lambda a: a.transpose(3, 2, 0, 1),
                3: lambda a: a.transpose(2, 0, 1),
                2: lambda a: a.T,
            }.get(x.ndim, lambda a: a)(x)
        return torch.from_numpy(np.ascontiguousarray(x)).float()

    out: StateDict = {}
    notes: list[str] = []
    kernel = t("embedding/kernel")
    if kernel.ndim != 4:
        raise UnsupportedCheckpointError(f"embedding/kernel has {kernel.ndim} dims; expected a 4-d conv.")
    out["patch_embed.proj.weight"] = kernel
    out["patch_embed.proj.bias"] = t("embedding/bias")
    has_cls = "cls" in w
    if has_cls:
        out["cls_token"] = t("cls", transpose=False)
    pos_key = "pos_embedding" if "pos_embedding" in w else "Transformer/posembed_input/pos_embedding"
    if pos_key in w:
        pos = t(pos_key, transpose=False)
        out["pos_embed"] = pos.reshape(1, -1, pos.shape[-1])

    if scanned:
        depth = int(w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
    else:
        depth = len({m.group(1) for k in w if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    first = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    if f"{first}MultiHeadDotProductAttention_1/query/kernel" in w:  # the original release
        mha, mlp, ln2 = ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    else:  # big_vision
        mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
    # query kernels are (D, heads, head_dim), stacked over blocks in front when scanned
    num_heads = int(w[f"{first}{mha}/query/kernel"].shape[-2]) if depth else None
    for i in range(depth):
        bp, idx = ("Transformer/encoderblock/", i) if scanned else (f"Transformer/encoderblock_{i}/", None)
        out[f"blocks.{i}.norm1.weight"] = t(f"{bp}LayerNorm_0/scale", idx)
        out[f"blocks.{i}.norm1.bias"] = t(f"{bp}LayerNorm_0/bias", idx)
        attn = _npz_attention(t, f"{bp}{mha}", idx, with_bias=f"{bp}{mha}/query/bias" in w)
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [attn[f"{n}.weight"] for n in ("query", "key", "value")]
        )
        if "query.bias" in attn:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                [attn[f"{n}.bias"] for n in ("query", "key", "value")]
            )
        out[f"blocks.{i}.attn.proj.weight"] = attn["out.weight"]
        out[f"blocks.{i}.attn.proj.bias"] = attn["out.bias"]
        out[f"blocks.{i}.norm2.weight"] = t(f"{bp}{ln2}/scale", idx)
        out[f"blocks.{i}.norm2.bias"] = t(f"{bp}{ln2}/bias", idx)
        out.update(_npz_mlp(t, f"{bp}{mlp}", idx, f"blocks.{i}.mlp"))
    if "Transformer/encoder_norm/scale" in w:
        out["norm.weight"] = t("Transformer/encoder_norm/scale")
        out["norm.bias"] = t("Transformer/encoder_norm/bias")
    has_map = "MAPHead_0/probe" in w
    if has_map:  # attention pooling: the probe is the query; key and value become one kv layer
        out.update(_npz_map_head(t))
    if "pre_logits/kernel" in w:
        notes.append(
            "dropped the representation layer (pre_logits) and the head it feeds: vitkit has no "
            "pre-logits layer; the model keeps a freshly initialised head."
        )
    elif "head/kernel" in w:
        out["head.weight"] = t("head/kernel")
        out["head.bias"] = t("head/bias")

    options: dict[str, Any] = {
        "num_heads": num_heads,
        # big_vision adds positions to the patches before prepending the class token
        "no_embed_class": bool("pos_embedding" in w and has_cls),
        "global_pool": "map" if has_map else "token" if has_cls else "avg",
        "fc_norm": False,  # the encoder norm comes before pooling in both code bases
        "norm_eps": 1e-6,
    }
    if has_map:
        # Only big_vision has MAP heads, and its flax nn.gelu is the tanh approximation by default
        # (timm builds its SigLIP ViTs with act_layer='gelu_tanh' too).
        options["act_layer"] = "gelu_tanh"
        notes.append(
            "an attention-pooling (MAP) head: read as global_pool='map' with big_vision's tanh GELU "
            "(act_layer='gelu_tanh', flax's default); pass act_layer='gelu' if the model used the exact one."
        )
    return out, options, notes


def _npz_attention(t: Callable[..., torch.Tensor], mha: str, idx: int | None, with_bias: bool) -> StateDict:
    """A flax ``MultiHeadDotProductAttention`` -> torch Linear weights, by projection:
    ``{query,key,value}.weight`` (kernels (D, heads, d) -> (heads·d, D)), their biases ((heads,
    d) flattened) with ``with_bias``, and ``out.weight`` / ``out.bias`` (kernel (heads, d, D) ->
    (D, heads·d)). ``idx``: the block of a scanned (stacked) array."""
    out: StateDict = {}
    for n in ("query", "key", "value"):
        out[f"{n}.weight"] = t(f"{mha}/{n}/kernel", idx, transpose=False).flatten(1).T
        if with_bias:
            out[f"{n}.bias"] = t(f"{mha}/{n}/bias", idx, transpose=False).reshape(-1)
    out["out.weight"] = t(f"{mha}/out/kernel", idx).flatten(1)
    out["out.bias"] = t(f"{mha}/out/bias", idx)
    return out


def _npz_mlp(t: Callable[..., torch.Tensor], mlp: str, idx: int | None, dest: str) -> StateDict:
    """A flax ``MlpBlock`` (``Dense_0``, ``Dense_1``) -> ``{dest}.fc1`` and ``{dest}.fc2``."""
    return {
        f"{dest}.fc{r + 1}.{kind}": t(f"{mlp}/Dense_{r}/{name}", idx)
        for r in range(2)
        for kind, name in (("weight", "kernel"), ("bias", "bias"))
    }


def _npz_map_head(t: Callable[..., torch.Tensor]) -> StateDict:
    """big_vision's ``MAPHead_0`` -> ``attn_pool.*`` (:class:`~vitkit.models.AttentionPool`)."""
    attn = _npz_attention(t, "MAPHead_0/MultiHeadDotProductAttention_0", None, with_bias=True)
    out: StateDict = {"attn_pool.latent": t("MAPHead_0/probe", transpose=False)}
    out["attn_pool.q.weight"], out["attn_pool.q.bias"] = attn["query.weight"], attn["query.bias"]
    out["attn_pool.kv.weight"] = torch.cat([attn["key.weight"], attn["value.weight"]])
    out["attn_pool.kv.bias"] = torch.cat([attn["key.bias"], attn["value.bias"]])
    out["attn_pool.proj.weight"], out["attn_pool.proj.bias"] = attn["out.weight"], attn["out.bias"]
    out["attn_pool.norm.weight"] = t("MAPHead_0/LayerNorm_0/scale")
    out["attn_pool.norm.bias"] = t("MAPHead_0/LayerNorm_0/bias")
    out.update(_npz_mlp(t, "MAPHead_0/MlpBlock_0", None, "attn_pool.mlp"))
    return out
