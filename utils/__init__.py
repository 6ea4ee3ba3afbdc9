"""Shared helpers for the entry-point scripts: devices, seeds, atomic files, CLI errors, train/eval loops."""
