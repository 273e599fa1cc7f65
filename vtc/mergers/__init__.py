"""Merging methods (one file each: ToMe, GTP-ViT, VisionZip, pooling, the video mergers); importing this package
registers them."""

from . import aim, dycoke, fastvid, gtp, holitom, pool, tome, visionzip  # noqa: F401
