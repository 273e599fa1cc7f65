"""Synthetic videos (written with PyAV) and a tiny Qwen2-VL checkpoint with an offline processor, for video tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BITS = 8  # frame index encoded in 8 stripes of the top half: bit b white <=> (index >> b) & 1


def write_video(path: Path, num_frames: int, fps: int = 16, size: int = 64) -> Path:
    """An H.264 mp4 of a square moving left to right, with each frame's index encoded in the top half."""
    import av

    stripe = size // BITS
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            img = np.zeros((size, size, 3), np.uint8)
            for b in range(BITS):
                if (i >> b) & 1:
                    img[: size // 2, b * stripe : (b + 1) * stripe] = 255
            x = (i * 3) % (size - 16)
            img[size // 2 + 4 : size // 2 + 20, x : x + 16] = (255, 64, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_empty_video(path: Path) -> Path:
    """A valid mp4 header with a video stream and no frames."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return path


def decode_index(frame: np.ndarray) -> int:
    """The frame index :func:`write_video` drew into ``frame`` ``[H, W, 3]`` (any size: stripes are relative)."""
    h, w = frame.shape[:2]
    index = 0
    for b in range(BITS):
        lo, hi = b * w // BITS, (b + 1) * w // BITS
        cell = frame[: h // 2 - 2, lo + (hi - lo) // 4 : hi - (hi - lo) // 4]
        index |= int(cell.mean() > 128) << b
    return index


SPECIAL = {
    "<pad>": 0,
    "<s>": 1,
    "</s>": 2,
    "<unk>": 3,
    "<|image_pad|>": 300,
    "<|video_pad|>": 301,
    "<|vision_start|>": 302,
    "<|vision_end|>": 303,
    "<|im_start|>": 304,
    "<|im_end|>": 305,
}
WORDS = (
    "A B C D E . , ? : ( ) answer with the option's letter from given choices directly which way does square move "
    "left right up down what color is it red blue green user assistant"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A word-level tokenizer over ids 0..305: Qwen's vision specials at 300..303, filler words elsewhere."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL)
    free = (i for i in range(4, 300))
    for word in WORDS:
        vocab.setdefault(word, next(free))
    for i in free:
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[t for t in SPECIAL if t.startswith("<|")],
    )


def save_tiny_qwen2_vl(folder: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """Save :func:`vtc.testing.tiny_qwen2_vl` and a matching offline ``Qwen2VLProcessor`` to ``folder``.

    64 x 64 frames are resized to 32 x 32 (max_pixels), i.e. an 8 x 8 patch grid and 16 LLM tokens per pair of
    frames (temporal patch 2, 2 x 2 merge).
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from vtc.testing import tiny_qwen2_vl

    geometry = {"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 8 * 8, "max_pixels": 32 * 32}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**geometry),
        video_processor=Qwen2VLVideoProcessor(**geometry, cap_pixels_per_frame=False),
        tokenizer=tiny_tokenizer(),
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )
    model = tiny_qwen2_vl(seed=seed)
    model.generation_config.eos_token_id = 2
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
