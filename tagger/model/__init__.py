"""Models as files: read and validate a tagger model's metadata (info), find shipped models by name (registry)."""
