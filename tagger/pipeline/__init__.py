"""Serving pipeline: discover -> decode -> batch -> session -> postprocess -> write. Never imports torch."""
