"""Serving pipeline stages: discover -> decode -> batch -> session -> postprocess, composed in compose. No torch."""
