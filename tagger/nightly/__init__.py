"""Nightly runs: incremental assembly, the work folder (parts, lock, resume), shards and merge."""
