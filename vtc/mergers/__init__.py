"""Merging methods (ToMe, HoliTom, temporal mergers); importing this package registers them."""
