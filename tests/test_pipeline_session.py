"""session and postprocess: real ONNX Runtime sessions on a contract model; provider choice; top-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CONTRACT_TASKS, cuda_really_works, make_contract_onnx

from tagger.contract import TaskSpec
from tagger.errors import TaggerError
from tagger.pipeline.postprocess import postprocess
from tagger.model.registry import default_model_path
from tagger.pipeline.session import CPU, CUDA, open_session


def test_cpu_session_predicts_probabilities_per_task(contract_onnx: Path) -> None:
    session = open_session(contract_onnx, "cpu", threads=1)
    assert session.provider == CPU
    assert [t.name for t in session.tasks] == list(CONTRACT_TASKS)
    assert session.spec.size == 32 and len(session.info.sha256) == 64
    assert session.metadata["tagger.format"] == "1"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    probs = session.predict(images)
    for name, labels in CONTRACT_TASKS.items():
        assert probs[name].shape == (5, len(labels)) and probs[name].dtype == np.float32
        np.testing.assert_allclose(probs[name].sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(probs["class"][0], probs["class"][1])  # the output depends on the image
    single = session.predict(images[2:3])  # batch size does not change a row's result
    np.testing.assert_allclose(single["color"][0], probs["color"][2], rtol=1e-5)
    bound = session._run_bound(images)  # the IO-binding path CUDA sessions take, exercised on CPU
    np.testing.assert_allclose(bound[1], probs["color"], rtol=1e-6)
    empty = session.predict(np.zeros((0, 32, 32, 3), np.uint8))
    assert empty["class"].shape == (0, len(CONTRACT_TASKS["class"]))
    with pytest.raises(ValueError, match="uint8"):
        session.predict(images.astype(np.float32))


def test_auto_reports_the_provider_that_really_runs(contract_onnx: Path) -> None:
    session = open_session(contract_onnx, "auto", threads=1)
    assert session.provider == (CUDA if cuda_really_works(contract_onnx) else CPU)


def test_strict_cuda_fails_clearly_without_a_working_gpu(contract_onnx: Path) -> None:
    if cuda_really_works(contract_onnx):
        pytest.skip("CUDA works on this machine")
    with pytest.raises(TaggerError, match="--device cuda"):
        open_session(contract_onnx, "cuda")


def test_bad_models_are_tagger_errors(tmp_path: Path, contract_onnx: Path) -> None:
    with pytest.raises(TaggerError, match="not a file"):
        open_session(tmp_path / "missing.onnx", "cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf" * 10)
    with pytest.raises(TaggerError):
        open_session(junk, "cpu")
    import onnx

    bare = onnx.load(str(contract_onnx))
    del bare.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(bare, str(plain))
    with pytest.raises(TaggerError, match="not a tagger model"):
        open_session(plain, "cpu")
    with pytest.raises(TaggerError, match="unknown device"):
        open_session(contract_onnx, "tpu")


def test_other_sizes_and_tasks_come_from_the_model(tmp_path: Path) -> None:
    model = make_contract_onnx(tmp_path / "m.onnx", size=16, tasks={"pattern": ("plain", "striped")})
    session = open_session(model, "cpu", threads=1)
    assert session.spec.size == 16 and [t.name for t in session.tasks] == ["pattern"]
    assert session.predict(np.zeros((3, 16, 16, 3), np.uint8))["pattern"].shape == (3, 2)


def test_default_model_path_points_to_the_shipped_model_or_says_to_pass_one() -> None:
    try:
        path = default_model_path()
    except TaggerError as e:
        assert "--model" in str(e)
    else:
        assert path.name == "tagger-default.onnx" and path.is_file()


def test_postprocess_top1_and_topk() -> None:
    tasks = (TaskSpec("class", ("a", "b", "c")),)
    probs = {"class": np.array([[0.1, 0.7, 0.2], [0.4, 0.2, 0.4], [0.0, 0.0, 1.0]], np.float32)}
    plain = postprocess(probs, tasks)["class"]
    assert plain.index.tolist() == [1, 0, 2] and plain.topk_index is None
    np.testing.assert_allclose(plain.score, [0.7, 0.4, 1.0])
    top = postprocess(probs, tasks, top_k=2)["class"]
    assert top.topk_index is not None and top.topk_score is not None
    assert top.topk_index.tolist() == [[1, 2], [0, 2], [2, 0]]  # ties go to the lower index
    np.testing.assert_allclose(top.topk_score, [[0.7, 0.2], [0.4, 0.4], [1.0, 0.0]])
    assert top.index.tolist() == plain.index.tolist()
    assert postprocess(probs, tasks, top_k=10)["class"].topk_index.shape == (3, 3)  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        postprocess({"class": np.zeros((2, 4), np.float32)}, tasks)


def test_predict_each_in_flight_keeps_order_and_results(contract_onnx: Path) -> None:
    session = open_session(contract_onnx, "cpu", 1)
    s = session.spec.size
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) for n in (5, 3, 7, 1, 4)]
    one = list(session.predict_each(batches, lambda b: b, 1))
    three = list(session.predict_each(batches, lambda b: b, 3))
    assert [item is b for (item, _), b in zip(three, batches)] == [True] * len(batches)
    for (_, a), (_, b), batch in zip(one, three, batches):
        assert set(a) == set(b) == {t.name for t in session.tasks}
        for name in a:
            assert a[name].shape[0] == len(batch)
            np.testing.assert_array_equal(a[name], b[name])


def test_cuda_pads_a_short_batch_to_the_shape_it_runs(contract_onnx: Path) -> None:
    if not cuda_really_works(contract_onnx):
        pytest.skip("needs a working CUDA provider")
    cuda, cpu = open_session(contract_onnx, "cuda", 1), open_session(contract_onnx, "cpu", 1)
    s = cuda.spec.size
    rng = np.random.default_rng(1)
    full, short = (rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) for n in (6, 2))
    cuda.predict(full)
    got, want = cuda.predict(short), cpu.predict(short)
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], atol=1e-4)
