"""What training/export and serving agree on: ONNX names, metadata keys, and the preprocessing spec. No torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

# Bumped whenever the ONNX input/output layout or metadata meaning changes; the runtime refuses other versions.
FORMAT_VERSION = 1

INPUT_NAME = "images"
OUTPUT_SUFFIX = "_probs"
# Optional output: the backbone's pooled features (the heads' input), L2-normalised in the graph, float32 [N, D].
# `tagger run --embeddings` writes it as the output column of the same name.
EMBEDDING_OUTPUT = "embedding"

META_TASKS = "tagger.tasks"
META_PREPROCESS = "tagger.preprocess"
META_MODEL = "tagger.model"
META_VERSION = "tagger.version"
META_FORMAT = "tagger.format"

# Output columns of `tagger run` besides each task's own (tagger.output.schema), and those `tagger dupes` and
# `tagger similar` put beside each task's tag (tagger.similar): a task may not take these names.
RESERVED_COLUMNS: frozenset[str] = frozenset(
    {"path", "status", "error", "width", "height", "bytes", "mtime", "sha256", EMBEDDING_OUTPUT}
    | {"group", "kind", "disagree", "similarity"}
)
TASK_COLUMN_SUFFIXES = ("", "_score", "_topk")  # the output columns of task t: t, t_score, t_topk (with --top-k)

# Default tasks: task name -> styles.csv column.
DEFAULT_TASKS: Mapping[str, str] = {"class": "articleType", "color": "baseColour"}


def output_name(task: str) -> str:
    """ONNX output name holding the softmax probabilities of one task."""
    return f"{task}{OUTPUT_SUFFIX}"


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded RGB image becomes the model's input; carried by checkpoints and ONNX metadata.

    Outside the graph: fit the image inside a size x size square keeping its aspect ratio, then pad with
    `pad_color` (product photos sit on white). Inside the graph: uint8 -> float, /255, (x - mean) / std, NHWC -> NCHW.
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "fit_pad"
    pad_color: tuple[int, int, int] = (255, 255, 255)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"input size must be at least 8 pixels, got {self.size}")
        if self.resize != "fit_pad":
            raise ValueError(f"unsupported resize policy {self.resize!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
        return cls(
            size=int(d["size"]),
            mean=tuple(float(x) for x in d.get("mean", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d.get("std", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            resize=str(d.get("resize", "fit_pad")),
            pad_color=tuple(int(x) for x in d.get("pad_color", (255, 255, 255))),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
        )


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: its name and its ordered labels (index i of `<name>_probs` is labels[i])."""

    name: str
    labels: tuple[str, ...] = field(default_factory=tuple)

    @property
    def output(self) -> str:
        return output_name(self.name)


def check_task_names(names: Iterable[str]) -> None:
    """ValueError unless every task gets output columns of its own: a non-empty name, none of RESERVED_COLUMNS,
    and no column of one task named like a column of another (task `a_score` next to task `a`)."""
    owner: dict[str, str] = {}
    for name in names:
        if not name:
            raise ValueError("a task has an empty name")
        if name in RESERVED_COLUMNS:
            raise ValueError(f"task {name!r} has the name of an output column ({', '.join(sorted(RESERVED_COLUMNS))})")
        for column in (name + suffix for suffix in TASK_COLUMN_SUFFIXES):
            if column in owner:
                raise ValueError(f"tasks {owner[column]!r} and {name!r} both need an output column {column!r}")
            owner[column] = name


def tasks_to_json(tasks: tuple[TaskSpec, ...]) -> str:
    """Serialise tasks in order as a JSON object task -> labels (JSON objects keep insertion order)."""
    return json.dumps({t.name: list(t.labels) for t in tasks})


def tasks_from_json(text: str) -> tuple[TaskSpec, ...]:
    return tuple(TaskSpec(name, tuple(labels)) for name, labels in json.loads(text).items())
