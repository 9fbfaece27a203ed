"""Temperature scaling (Guo et al., 2017); the ECE it is judged by lives in `fsclip.calibration`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fsclip.calibration import expected_calibration_error
from fsclip.errors import AdapterError

__all__ = ["expected_calibration_error", "fit_temperature"]

_LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, prior_std: float = 1.0) -> float:
    """The T minimising validation NLL of softmax(logits / T), with a N(0, prior_std) prior on log T.

    Few-shot validation splits are tiny (often one image per class, all classified right), where plain
    NLL drives T to 0 and probabilities to 1; the prior keeps T near 1 until the data say otherwise.
    """
    logits, targets = logits.detach().float().cpu().clone(), targets.detach().cpu()
    if not bool(torch.isfinite(logits).all()):
        raise AdapterError("the adapter gives NaN or infinite logits on the validation images (the fit "
                           "diverged); try a lower learning rate")
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets, reduction="sum") + 0.5 * (log_t / prior_std).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    log_t = float(log_t.detach())
    # finite logits keep the optimum finite; a NaN step would still reach here, and T = 1 is the safe answer
    return math.exp(min(max(log_t, _LOG_T_RANGE[0]), _LOG_T_RANGE[1])) if math.isfinite(log_t) else 1.0
