"""storage's pure functions on URIs: how a location is shown (redact, error texts) and compared (same_file, relative_key)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from tagger.errors import TaggerError
from tagger.guards import check_not_input
from tagger.storage import exists, redact, relative_key, same_file


def test_a_rejected_uri_leaves_no_credentials_in_the_message() -> None:
    with pytest.raises(TaggerError) as info:
        exists("bogus://AKIAXYZ:SECRETVAL@h/x?secret_key=SSSQ")
    text = str(info.value)
    assert text.startswith("cannot open bogus://h/x: ")
    for secret in ("AKIAXYZ", "SECRETVAL", "SSSQ", "secret_key"):
        assert secret not in text


def test_redact_keeps_the_port_and_a_hostless_path() -> None:
    assert redact("file:///tmp/x") == "file:///tmp/x"
    assert redact("s3://k:s@h:9000/a/b?secret_key=s") == "s3://h:9000/a/b"
    assert redact("s3://AKIA:secret@bucket/key?region=us-east-1") == "s3://bucket/key"
    assert redact("s3://bucket") == "s3://bucket"


def test_one_object_whatever_the_credentials_and_never_across_schemes() -> None:
    assert same_file("s3://k:s@b/x", "s3://b/x?region=us-east-1")
    assert not same_file("s3://b/x", "gs://b/x")
    assert not same_file("s3://h:9000/b/x", "s3://h:9001/b/x")
    with pytest.raises(TaggerError, match="is the catalog itself"):
        check_not_input("s3://k:s@b/x", "s3://b/x", "catalog")
    assert relative_key("s3://b/x", "gs://b/x/y") is None
    assert relative_key("s3://k:s@b/x", "s3://b/x/y") == "y"


def test_a_writer_that_cannot_start_leaves_no_temp_file(tmp_path: Path) -> None:
    from tagger.output.writer import ResultWriter

    schema = pa.schema([pa.field("span", pa.month_day_nano_interval())])  # Parquet has no such type
    with pytest.raises(TaggerError, match=f"^cannot write output {tmp_path / 'tags.parquet'}: .*month_day_nano"):
        ResultWriter(tmp_path / "tags.parquet", schema)
    assert list(tmp_path.iterdir()) == []


def test_only_the_storage_package_tells_a_uri_from_a_path() -> None:
    """Storage is decided once (open_location); every other module asks the resolved store, never the string."""
    import tagger
    from tagger.storage import LOCAL, OBJECTS, open_location

    package = Path(tagger.__file__).parent
    storage = package / "storage"
    test = "is_" + "uri"  # spelled apart, so that this file does not ask either
    asking = [p for p in package.rglob("*.py") if storage not in p.parents and test in p.read_text()]
    assert asking == []
    assert open_location("s3://b/k?region=x") == (OBJECTS, "s3://b/k?region=x") and OBJECTS.remote
    assert open_location("C:\\photos") == (LOCAL, Path("C:\\photos")) and not LOCAL.remote
