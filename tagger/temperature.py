"""Temperature scaling in numpy: fit one temperature to labelled probabilities, rescale, and set it in an ONNX graph."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tagger.contract import output_name
from tagger.errors import TaggerError

TEMPERATURE_PREFIX = "tagger_temperature_"  # initializer holding a task's temperature, so a refit updates it in place
UNDERFLOW = 1e-30  # float32 probabilities below this are taken as 1e-30: their logarithm is unreliable
_BETA_RANGE = (0.05, 20.0)  # 1 / temperature searched; the negative log-likelihood is convex in it


def rescale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature): what the rescaled graph outputs, from the original's probabilities."""
    logits = np.log(np.clip(probs.astype(np.float64), UNDERFLOW, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the mean negative log-likelihood of `labels` (int [N]) under rescaled `probs`."""
    log_p = np.log(np.clip(probs.astype(np.float64), UNDERFLOW, None))  # [N, C]
    true = log_p[np.arange(len(labels)), labels]  # [N]

    def nll(beta: float) -> float:
        z = beta * log_p
        top = z.max(axis=1)
        return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - beta * true))

    lo, hi = np.log(_BETA_RANGE[0]), np.log(_BETA_RANGE[1])  # golden-section search on log(beta)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(np.exp(a)), nll(np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(np.exp(b))
    return float(1.0 / np.exp((lo + hi) / 2))


def mean_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of `labels` (int [N]) under `probs` (float [N, C])."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], UNDERFLOW, None)).mean())


def set_temperatures(graph: Any, temperatures: Mapping[str, float], where: str) -> None:
    """Make each task's softmax divide its input by the given temperature, in an onnx GraphProto.

    The temperature lives in an initializer named TEMPERATURE_PREFIX + task: set in place when the graph has one
    (from the exporter or an earlier fit), else added with a Div in front of the softmax.
    """
    import onnx
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


__all__ = ["TEMPERATURE_PREFIX", "UNDERFLOW", "fit_temperature", "mean_nll", "rescale", "set_temperatures"]
