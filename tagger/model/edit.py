"""Edits of a tagger ONNX model in one place: metadata, temperatures, pooled features, the `embedding` output, new heads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tagger.contract import EMBEDDING_OUTPUT, META_MODEL, META_TASKS, TaskSpec, output_name, tasks_to_json
from tagger.errors import TaggerError

TEMPERATURE_PREFIX = "tagger_temperature_"  # initializer holding a task's temperature, so a refit updates it in place
FEATURES_OUTPUT = "tagger_features"  # the raw pooled features, exposed only in the model heads-only training embeds with
_HEAD_OPS = ("Gemm", "MatMul")
# Ops between a head's Gemm and its Softmax in the models tagger writes: temperature, int8 QDQ pairs.
_PASS_THROUGH = ("Div", "QuantizeLinear", "DequantizeLinear")
_BATCH_DIM = "N"


def onnx_module() -> Any:
    """The onnx package, or a one-line error naming the extra that provides it."""
    try:
        import onnx
    except ImportError as e:
        raise TaggerError(f"editing a model needs the onnx package ({e}): pip install 'tagger[onnx]'") from None
    return onnx


def model_metadata(proto: Any) -> dict[str, Any]:
    """The model's META_MODEL object (backbone, metrics, temperature, provenance ...), as a new dict."""
    props = {p.key: p.value for p in proto.metadata_props}
    return dict(json.loads(props.get(META_MODEL, "{}")))


def set_metadata(proto: Any, values: Mapping[str, str]) -> None:
    """Set metadata keys (JSON text values), keeping every other key the model has."""
    props = {p.key: p.value for p in proto.metadata_props}
    onnx_module().helper.set_model_props(proto, {**props, **values})


def set_model_metadata(proto: Any, model: Mapping[str, Any]) -> None:
    """Replace the META_MODEL object."""
    set_metadata(proto, {META_MODEL: json.dumps(model)})


def set_description(proto: Any, backbone: str, tasks: Sequence[TaskSpec]) -> None:
    """The model's doc string: what `tagger info` and graph viewers show as its one-line description."""
    proto.doc_string = f"tagger model: {backbone} -> {', '.join(t.name for t in tasks)}"


def set_temperatures(graph: Any, temperatures: Mapping[str, float], where: str) -> None:
    """Make each task's softmax divide its input by the given temperature, in an onnx GraphProto.

    The temperature lives in an initializer named TEMPERATURE_PREFIX + task: set in place when the graph has one
    (from the exporter or an earlier fit), else added with a Div in front of the softmax.
    """
    onnx = onnx_module()
    from onnx import numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}
    for task, temperature in temperatures.items():
        softmax = producers.get(output_name(task))
        if softmax is None or softmax.op_type != "Softmax":
            raise TaggerError(f"{where}: output {output_name(task)} does not come from a Softmax; cannot rescale it")
        name = TEMPERATURE_PREFIX + task
        value = numpy_helper.from_array(np.array(temperature, np.float32), name)
        if name in inits:
            inits[name].CopyFrom(value)
            continue
        graph.initializer.append(value)
        scaled = f"{softmax.input[0]}_over_temperature"
        div = onnx.helper.make_node("Div", [softmax.input[0], name], [scaled], name=f"{name}_div")
        graph.node.insert(list(graph.node).index(softmax), div)  # keep the topological order
        softmax.input[0] = scaled


def strip_trace_metadata(proto: Any) -> None:
    """Drop per-node stack traces and FX names: they bloat the file and leak the build machine's paths."""
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        del g.metadata_props[:]
        for value in (*g.input, *g.output, *g.value_info):
            del value.metadata_props[:]
        for node in g.node:
            del node.metadata_props[:]
            for a in node.attribute:
                if a.type == onnx_module().AttributeProto.GRAPH:
                    graphs.append(a.g)
                elif a.type == onnx_module().AttributeProto.GRAPHS:
                    graphs.extend(a.graphs)
    for fn in proto.functions:
        for node in fn.node:
            del node.metadata_props[:]


@dataclass(frozen=True)
class Head:
    """A fitted head on the pooled features [N, D]: layers of (weight [out, in], bias [out]), ReLU between them, then
    the division by `temperature` and a softmax over the labels."""

    task: TaskSpec
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    temperature: float = 1.0

    def probs(self, features: np.ndarray) -> np.ndarray:
        """What the graph computes, in numpy: float32 [N, D] -> [N, C]."""
        x = features.astype(np.float32)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        z = x.astype(np.float64) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def features_tensor(proto: Any) -> str:
    """Name of the pooled-features tensor [N, D] that every head reads.

    A model with an `embedding` output: the input of the node that normalises it. Otherwise (a model from
    `tagger export`, or its int8 copy) the input of the Gemm/MatMul nearest to each task's Softmax; all heads must
    share it.
    """
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    if EMBEDDING_OUTPUT in producers:
        return str(producers[EMBEDDING_OUTPUT].input[0])
    found: set[str] = set()
    tasks = [o.name for o in graph.output if o.name.endswith("_probs")]
    for output in tasks:
        node = producers.get(output)
        while node is not None and node.op_type not in _HEAD_OPS:
            if node.op_type not in (*_PASS_THROUGH, "Softmax"):
                node = None
                break
            node = producers.get(node.input[0])
        if node is None:
            raise TaggerError(f"cannot find the linear head behind output {output}; is this a model `tagger export` made?")
        found.add(str(node.input[0]))
    if len(found) != 1:
        raise TaggerError(f"the heads of this model read {len(found)} different tensors; expected one pooled-features tensor")
    return found.pop()


def linear_head(proto: Any, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The weight [C, D] and bias [C] of a task's linear head on the pooled features, when it is one float Gemm
    (the exporter's heads; not int8 ones, nor MLPs); else None."""
    from onnx import numpy_helper

    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {i.name: i for i in graph.initializer}
    node = producers.get(output_name(task))
    while node is not None and node.op_type in ("Softmax", "Div"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Gemm" or node.input[0] != features_tensor(proto):
        return None
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    attrs = {a.name: a for a in node.attribute}
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if "transB" not in attrs or attrs["transB"].i != 1:
        w = w.T
    if any(a in attrs and attrs[a].f != 1.0 for a in ("alpha", "beta")) or attrs.get("transA") and attrs["transA"].i:
        return None
    return w, numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)


def with_features_output(proto: Any) -> Any:
    """A copy of the model that also outputs its raw pooled features as FEATURES_OUTPUT (float32 [N, D])."""
    onnx = onnx_module()
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    name = features_tensor(out)
    out.graph.node.append(onnx.helper.make_node("Identity", [name], [FEATURES_OUTPUT], name="tagger_features_identity"))
    out.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, [_BATCH_DIM, None]))
    return out


def with_heads(
    proto: Any,
    heads: Sequence[Head],
    keep: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """A new model: the base graph up to the pooled features, the kept tasks' heads as they were, the new heads
    (each Gemm [+ ReLU + Gemm], divided by its temperature, softmax -> `<task>_probs`), and the `embedding` output
    (the features, L2-normalised). Tasks keep the base's order (kept and refit ones alike), then the new ones. `metadata` replaces
    META_MODEL; the tasks' labels are written from the base (kept) and the heads (new)."""
    onnx = onnx_module()
    from onnx import numpy_helper

    base_tasks = _tasks(proto)
    unknown = [t for t in keep if t not in base_tasks]
    if unknown:
        raise TaggerError(f"cannot keep task(s) {', '.join(unknown)}: the base model has {', '.join(base_tasks)}")
    clash = [h.task.name for h in heads if h.task.name in keep]
    if clash:
        raise TaggerError(f"task(s) {', '.join(clash)} both kept and refit")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    features = features_tensor(out)
    dtype = _elem_type(out, features)
    if dtype != onnx.TensorProto.FLOAT:
        raise TaggerError("heads-only training needs a model whose pooled features are float32 (fp16 models are not)")

    wanted = [output_name(t) for t in keep]
    outputs = {o.name: o for o in graph.output}
    del graph.output[:]
    graph.output.extend(outputs[name] for name in wanted)
    if EMBEDDING_OUTPUT in outputs:
        graph.output.append(outputs[EMBEDDING_OUTPUT])
    _prune(graph, features)  # the refit and dropped heads' old layers, so their names are free again
    embedding = [o for o in graph.output if o.name == EMBEDDING_OUTPUT]
    if embedding:
        graph.output.remove(embedding[0])
    for head in heads:
        prefix = f"tagger_head_{head.task.name}"
        x = features
        for i, (w, b) in enumerate(head.layers):
            w_name, b_name, y = f"{prefix}_{i}_weight", f"{prefix}_{i}_bias", f"{prefix}_{i}_out"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), w_name))
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b, np.float32), b_name))
            graph.node.append(onnx.helper.make_node("Gemm", [x, w_name, b_name], [y], name=f"{prefix}_{i}_gemm", transB=1))
            x = y
            if i < len(head.layers) - 1:
                graph.node.append(onnx.helper.make_node("Relu", [y], [f"{y}_relu"], name=f"{prefix}_{i}_relu"))
                x = f"{y}_relu"
        graph.node.append(onnx.helper.make_node("Softmax", [x], [head.task.output], name=f"{prefix}_softmax", axis=1))
        graph.output.append(
            onnx.helper.make_tensor_value_info(head.task.output, onnx.TensorProto.FLOAT, [_BATCH_DIM, len(head.task.labels)])
        )
    set_temperatures(graph, {h.task.name: h.temperature for h in heads}, "heads-only model")
    if embedding:
        graph.output.append(embedding[0])
    else:
        graph.node.append(
            onnx.helper.make_node("LpNormalization", [features], [EMBEDDING_OUTPUT], name="tagger_embedding", axis=1, p=2)
        )
        dim = _feature_dim(out, features, heads)
        graph.output.append(onnx.helper.make_tensor_value_info(EMBEDDING_OUTPUT, onnx.TensorProto.FLOAT, [_BATCH_DIM, dim]))

    # A refit task keeps its place (the first task is the primary one); new tasks follow the base's.
    specs = {t: TaskSpec(t, tuple(base_tasks[t])) for t in keep} | {h.task.name: h.task for h in heads}
    tasks = tuple(specs[t] for t in base_tasks if t in specs) + tuple(h.task for h in heads if h.task.name not in base_tasks)
    by_name = {o.name: o for o in graph.output}
    ordered = [by_name[t.output] for t in tasks] + [by_name[EMBEDDING_OUTPUT]]
    del graph.output[:]
    graph.output.extend(ordered)
    values = {META_TASKS: tasks_to_json(tasks)}
    if metadata is not None:
        values[META_MODEL] = json.dumps(metadata)
    set_metadata(out, values)
    set_description(out, str(model_metadata(out).get("backbone", "?")), tasks)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:
        raise TaggerError(f"the edited model fails onnx.checker: {str(e).strip().splitlines()[0]}") from None
    return out


def _tasks(proto: Any) -> dict[str, list[str]]:
    props = {p.key: p.value for p in proto.metadata_props}
    return dict(json.loads(props.get(META_TASKS, "{}")))


def _feature_dim(proto: Any, features: str, heads: Sequence[Head]) -> int:
    """D of the features [N, D]: from a head's first weight [out, D], else from shape inference (the contract wants a
    fixed D for `embedding`)."""
    if heads:
        return int(heads[0].layers[0][0].shape[1])
    inferred = onnx_module().shape_inference.infer_shapes(proto)
    for v in inferred.graph.value_info:
        if v.name == features:
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 2 and dims[1].HasField("dim_value"):
                return int(dims[1].dim_value)
    raise TaggerError(f"cannot tell the width of the pooled features {features!r}")


def _elem_type(proto: Any, name: str) -> int:
    """The element type of a tensor, from shape inference (float32 for every model `tagger export` writes in fp32)."""
    onnx = onnx_module()
    inferred = onnx.shape_inference.infer_shapes(proto)
    for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        if v.name == name:
            return int(v.type.tensor_type.elem_type)
    return int(onnx.TensorProto.FLOAT)


def _prune(graph: Any, features: str) -> None:
    """Drop nodes and initializers that neither an output nor the features depend on (the old heads' layers)."""
    needed = {o.name for o in graph.output} | {features}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


__all__ = [
    "FEATURES_OUTPUT",
    "TEMPERATURE_PREFIX",
    "Head",
    "features_tensor",
    "linear_head",
    "model_metadata",
    "onnx_module",
    "set_metadata",
    "set_description",
    "set_model_metadata",
    "set_temperatures",
    "strip_trace_metadata",
    "with_features_output",
    "with_heads",
]
