"""The Parquet output format in one place: schema and metadata keys, the writer, the reader."""
