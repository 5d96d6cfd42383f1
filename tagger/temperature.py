"""Temperature scaling in numpy: fit one temperature to labelled probabilities and rescale (the graph edit: model.edit)."""

from __future__ import annotations

import numpy as np

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


__all__ = ["UNDERFLOW", "fit_temperature", "mean_nll", "rescale"]
