"""Classification metrics in numpy (top-1, macro-F1, balanced accuracy, calibration), for training and evaluation."""

from __future__ import annotations

import numpy as np

IGNORE = -100  # label index meaning "not scored for this task" (a rare or missing label)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] counts, rows = true, columns = predicted; IGNORE labels are left out."""
    keep = y_true != IGNORE
    idx = y_true[keep].astype(np.int64) * n_classes + y_pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support; classes never predicted get precision 0."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def summarize(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """top1, macro_f1 (over classes seen in truth or predictions, as scikit-learn does), balanced_acc, n."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    n = int(cm.sum())
    if n == 0:
        return {"top1": float("nan"), "macro_f1": float("nan"), "balanced_acc": float("nan"), "n": 0}
    pc = per_class(cm)
    seen = (pc["support"] > 0) | (pc["predicted"] > 0)
    return {
        "top1": float(np.trace(cm) / n),
        "macro_f1": float(pc["f1"][seen].mean()),
        "balanced_acc": float(pc["recall"][pc["support"] > 0].mean()),
        "n": n,
    }


CALIBRATION_BINS = 15


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: |accuracy - mean confidence| per equal-width confidence bin, weighted by size.

    confidence: float [N], the top-1 score; correct: bool [N]. 0 means a score of 0.8 is right 80% of the time.
    """
    if len(confidence) == 0:
        return float("nan")
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)  # bin i holds [i/bins, (i+1)/bins)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, hit, minlength=bins) - np.bincount(which, conf, minlength=bins))
    return float(gap.sum() / n.sum())
