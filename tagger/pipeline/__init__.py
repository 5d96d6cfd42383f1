"""Serving pipeline stages: discover -> decode -> batch -> session -> postprocess (composed in tagger.compose). No torch."""
