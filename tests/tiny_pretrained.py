"""Tiny VLM checkpoints on disk (model + tokenizer + processor) that ``from_pretrained`` loads offline.

The models are :mod:`vtc.testing`'s; the tokenizer is a word-level ``tokenizers`` model whose vocabulary
puts the image placeholder (and Qwen's vision markers) at the ids the tiny configs use, so the processor's
expanded placeholders are exactly the tokens the model replaces with image features.
"""

from __future__ import annotations

from pathlib import Path

from vtc import testing

#: renders string contents (simple wrappers) and lists of {"type": "image"|"text"} parts (chat wrappers)
_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
_WORDS = (
    "what color shape is the of a in this image answer with single word red green blue yellow square circle triangle"
)


def tokenizer(specials: dict[str, int], named: dict[str, str] | None = None):
    """A ``PreTrainedTokenizerFast`` over ``testing.VOCAB`` ids with ``specials`` (token -> id) pinned;
    ``named`` gives some of them the attribute names a processor reads (``{"boi_token": "<start_of_image>"}``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": testing.PAD_TOKEN, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in _WORDS.split():
        vocab[word] = len(vocab)
    taken = set(specials.values())
    filler = (i for i in range(testing.VOCAB) if i not in taken and i not in vocab.values())
    for i in filler:
        vocab[f"w{i}"] = i
    vocab.update(specials)
    assert sorted(vocab.values()) == list(range(testing.VOCAB))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.decoder = decoders.WordPiece()  # joins words with spaces
    # named tokens become attributes (tok.boi_token); they replace additional_special_tokens, so name all or none
    assert named is None or set(named.values()) == set(specials)
    extra = {"extra_special_tokens": named} if named else {"additional_special_tokens": list(specials)}
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    )


def save_llava(path: Path) -> Path:
    """``testing.tiny_llava`` (32 px images, 16 visual tokens) with a LLaVA processor, saved to ``path``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    model = testing.tiny_llava()
    tok = tokenizer({"<image>": testing.IMAGE_TOKEN})
    size = model.config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok,
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped again by the "default" strategy
        chat_template=_TEMPLATE.replace("IMAGE ", "<image> "),
    )
    tok.chat_template = processor.chat_template
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


#: Qwen pixel bounds: images end up 32 x 32 px, 8 x 8 patches of 4 px, 16 visual tokens after the 2 x 2 merge
QWEN_PIXELS = {"min_pixels": 28 * 28, "max_pixels": 32 * 32}
#: Qwen3-VL (16 px patches): images end up 128 x 128 px, 8 x 8 patches, again 16 visual tokens
QWEN3_PIXELS = {"min_pixels": 128 * 128, "max_pixels": 128 * 128}


def save_qwen(path: Path, family: str = "qwen2_vl") -> Path:
    """A tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (``vtc.testing``) with its processor, saved to ``path``."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    builders = {
        "qwen2_vl": testing.tiny_qwen2_vl,
        "qwen2_5_vl": testing.tiny_qwen2_5_vl,
        "qwen3_vl": lambda: testing.tiny_qwen3_vl(patch=16),  # upstream's wrapper sizes images for 16 px patches
    }
    model = builders[family]()
    processor_class = {
        "qwen2_vl": transformers.Qwen2VLProcessor,
        "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
        "qwen3_vl": transformers.Qwen3VLProcessor,
    }[family]
    vcfg = model.config.vision_config
    tok = tokenizer(
        {
            "<|image_pad|>": testing.IMAGE_TOKEN,
            "<|video_pad|>": testing.VIDEO_TOKEN,
            "<|vision_start|>": testing.QWEN_VISION_START,
            "<|vision_end|>": testing.QWEN_VISION_END,
        }
    )
    kw = {
        "patch_size": vcfg.patch_size,
        "temporal_patch_size": vcfg.temporal_patch_size,
        "merge_size": vcfg.spatial_merge_size,
        **(QWEN3_PIXELS if family == "qwen3_vl" else QWEN_PIXELS),
    }
    video_processor = transformers.Qwen3VLVideoProcessor if family == "qwen3_vl" else Qwen2VLVideoProcessor
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**kw),
        video_processor=video_processor(**kw),
        tokenizer=tok,
        chat_template=_TEMPLATE.replace("IMAGE ", "<|vision_start|><|image_pad|><|vision_end|>"),
    )
    tok.chat_template = processor.chat_template
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tok.save_pretrained(path)  # upstream qwen2_vl also loads AutoTokenizer from the folder
    return path


def save_gemma3(path: Path) -> Path:
    """``testing.tiny_gemma3`` (32 px images, 16 visual tokens, no pan-and-scan) with a Gemma 3 processor."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    model = testing.tiny_gemma3()
    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tok = tokenizer(
        {
            named["image_token"]: testing.IMAGE_TOKEN,
            named["boi_token"]: testing.GEMMA_BOI,
            named["eoi_token"]: testing.GEMMA_EOI,
        },
        named,
    )
    size = model.config.vision_config.image_size
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": size, "width": size}, do_pan_and_scan=False),
        tokenizer=tok,
        image_seq_length=int(model.config.mm_tokens_per_image),
        chat_template=_TEMPLATE.replace("IMAGE ", named["boi_token"] + " "),
    )
    tok.chat_template = processor.chat_template
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tok.save_pretrained(path)  # upstream gemma3 also loads AutoTokenizer from the folder
    return path


def save_internvl(path: Path) -> Path:
    """``testing.tiny_internvl`` (32 px tiles, 16 visual tokens per tile) with an InternVL processor."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    model = testing.tiny_internvl()
    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = tokenizer(
        {
            named["context_image_token"]: testing.IMAGE_TOKEN,
            named["video_token"]: testing.VIDEO_TOKEN,
            named["start_image_token"]: testing.INTERNVL_START,
            named["end_image_token"]: testing.INTERNVL_END,
        },
        named,
    )
    size = model.config.vision_config.image_size[0]
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": size, "width": size}, crop_to_patches=True),
        video_processor=InternVLVideoProcessor(size={"height": size, "width": size}),
        tokenizer=tok,
        image_seq_length=int(model.config.image_seq_length),
        chat_template=_TEMPLATE.replace("IMAGE ", named["context_image_token"] + " "),
    )
    tok.chat_template = processor.chat_template
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
