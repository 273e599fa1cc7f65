"""Merging methods (HoliTom, temporal mergers, ToMe); importing this package registers them."""

from . import dycoke, fastvid, holitom, tome  # noqa: F401
