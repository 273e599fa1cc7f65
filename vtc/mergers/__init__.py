"""Merging methods (one file each: ToMe, VisionZip, pooling, the video mergers); importing this package registers
them."""

from . import aim, dycoke, fastvid, holitom, pool, tome, visionzip  # noqa: F401
