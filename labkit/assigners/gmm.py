"""Two-component 1-D Gaussian mixtures fitted by EM for many small samples at once (PAA's GMMs).

PAA fits one mixture per ground truth to the losses of its candidate priors. scikit-learn's
``GaussianMixture`` does that one object at a time; :func:`fit_gmm_1d` runs the same EM for
``K`` samples together on a padded ``[K, M]`` tensor with a validity mask, in float64, on the
input's device. It follows scikit-learn step by step so both give the same answer:

- initial state given by the caller (PAA: means at the smallest and largest loss, weights
  0.5, precisions 1), no k-means;
- each iteration: E-step (log responsibilities and the mean log-likelihood, the "lower
  bound"), M-step (``nk = sum(resp) + 10 * eps``, means, variances ``+ reg_covar``,
  weights ``nk / sum(nk)``), stop when ``|lower_bound - previous| < tol`` (the first
  iteration never stops: the previous bound is ``-inf``) or after ``max_iter`` iterations;
  the parameters kept are those after the last M-step;
- each sample's mixture stops on its own iteration, as a separate scikit-learn fit would;
- each component's log-likelihood is a quadratic in ``x`` (``c0 + c1 x + c2 x^2``, expanded as
  scikit-learn does for ``diag``/``spherical``) and the M-step's sums are one batched product
  ``resp @ (1, x, x^2)``. Results match scikit-learn to rounding (parameters to ~1e-9
  relative or better; the same iteration counts and predictions in the tests).

What makes it fast: PAA's tensors are tiny (~50 x 40), so each torch op costs its fixed
overhead (~2 us on a CPU), not its arithmetic, and the EM loop is written to issue as few
ops as possible (~30 per iteration for all mixtures together):

- all state lives in buffers allocated once per batch (:class:`_Batch`), with the views an
  iteration needs made once too; every op writes with ``out=`` or in place, so an iteration
  is arithmetic only (no allocation, slicing or packing);
- the E-step's two log-likelihoods and their log-sum share one ``[k, 3, M]`` buffer, so one
  ``bmm`` with the design ``(1, x, x^2)`` gives the M-step's sums and the lower bound;
- nothing is frozen per row: every mixture keeps iterating, and a ``where`` keeps the sums
  of each row's last running iteration; while the batch is large and at most half of it is
  still running, it shrinks to the running rows; one sync per iteration (the count still
  running);
- the loop runs under ``torch.inference_mode()`` (no autograd bookkeeping per op).

In one dimension the four covariance types reduce to: ``full``, ``diag`` and ``spherical``
-- one variance per component (scikit-learn computes them in slightly different orders, labkit
identically);
``tied`` -- one variance shared by both components.

:func:`fit_gmm_1d_sklearn` is the reference: one scikit-learn fit per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from labkit._validation import check_choice, check_tensor

__all__ = [
    "COVARIANCE_TYPES",
    "GMM1D",
    "fit_gmm_1d",
    "fit_gmm_1d_sklearn",
    "gmm_log_prob",
    "gmm_predict",
    "gmm_score_samples",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_LOG_2PI = math.log(2 * math.pi)
_EPS64 = float(np.finfo(np.float64).eps)
# The batch shrinks to its running rows only while it is large: below this many work
# elements an op costs its fixed overhead whatever the row count, and shrinking (~30 ops)
# would cost more than it saves.
_SHRINK_MIN = 2048


@dataclass
class GMM1D:
    """``K`` fitted two-component 1-D mixtures (row ``k`` = the mixture of sample ``k``).

    Attributes:
        covariance_type: one of ``"full"``, ``"tied"``, ``"diag"``, ``"spherical"``.
        weights: ``Tensor[K, 2]`` mixing weights (rows sum to 1).
        means: ``Tensor[K, 2]``.
        variances: ``Tensor[K, 2]`` (``tied``: both columns hold the shared variance).
        precisions_chol: ``Tensor[K, 2]``, ``1 / sqrt(variances)`` (scikit-learn's
            ``precisions_cholesky_``), what the likelihood uses.
        n_iter: ``LongTensor[K]`` EM iterations run per mixture.
        converged: ``BoolTensor[K]``.
        lower_bound: ``Tensor[K]`` mean log-likelihood of the last E-step.
    """

    covariance_type: str
    weights: Tensor
    means: Tensor
    variances: Tensor
    precisions_chol: Tensor
    n_iter: Tensor
    converged: Tensor
    lower_bound: Tensor


def _design(x: Tensor, mask: Tensor) -> Tensor:
    """``[K, M, 3]`` rows ``(1, x, x^2)``, zero on padding: the M-step's operand."""
    xd = torch.where(mask, x.to(torch.float64), 0.0)
    return torch.stack([mask.to(torch.float64), xd, xd * xd], dim=2)


def _coefficients(
    weights: Tensor, means: Tensor, variances: Tensor, out: tuple[Tensor, ...] | None = None
) -> tuple[Tensor, ...]:
    """``(c0, c1, c2)``, each shaped like ``means``: ``c0 + c1 x + c2 x^2 = log w + log N(x | mean, var)``.

    ``(log(w^2 prec) - log(2 pi) - mean^2 prec) / 2 + mean prec x - prec x^2 / 2`` -- the
    quadratic expanded in powers of ``x``, as scikit-learn does for ``diag``/``spherical``.
    ``out``: three buffers to write ``(c0, c1, c2)`` into (the EM loop's); default new tensors.
    """
    c0, c1, c2 = out if out is not None else (None, None, None)
    # In-place steps after the first op of each (the same arithmetic, fewer allocations).
    prec = torch.reciprocal(variances, out=c2)
    mean_prec = torch.mul(means, prec, out=c1)
    const = torch.mul(weights, weights, out=c0).mul_(prec).log_()
    const.addcmul_(means, mean_prec, value=-1).sub_(_LOG_2PI).mul_(0.5)
    return const, mean_prec, prec.mul_(-0.5)


def _component_log_probs(x: Tensor, x_sq: Tensor, coef: tuple[Tensor, ...]) -> list[Tensor]:
    """``[log w_c + log N(x | c)]`` for c = 0, 1, each ``[K, M]``.

    Two ``[K, M]`` tensors rather than one ``[K, M, 2]``: reductions over a last dimension of
    size 2 (softmax, logsumexp) are an order of magnitude slower on the CPU than these.
    """
    c0, c1, c2 = coef
    return [
        torch.addcmul(torch.addcmul(c0[:, c : c + 1], x, c1[:, c : c + 1]), x_sq, c2[:, c : c + 1])
        for c in (0, 1)
    ]


def _m_step(
    s0: Tensor,
    s1: Tensor,
    s2: Tensor,
    sum_x2: Tensor,
    cov_type: str,
    reg_covar: float,
    out: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Weights, means, variances (each ``[k, 2, 1]``) from the sums ``s_j[k, c, 0] = sum_i resp_ic x_i^j``.

    ``s0, s1, s2: Tensor[k, 2, 1]``; ``sum_x2: Tensor[k, 1, 1]`` (``tied`` only). ``out``: four
    ``[k, 2, 1]`` buffers ``(nk, means, variances, weights)`` to write into (the EM loop's).
    """
    nk_out, means_out, variances_out, weights_out = out if out is not None else (None,) * 4
    nk = torch.add(s0, 10 * _EPS64, out=nk_out)
    means = torch.div(s1, nk, out=means_out)
    if cov_type == "tied":
        shared = (sum_x2 - (nk * means * means).sum(1, keepdim=True)) / nk.sum(
            1, keepdim=True
        ) + reg_covar
        variances = shared.expand_as(means)
        if variances_out is not None:
            variances = variances_out.copy_(variances)
    else:
        # full, diag and spherical coincide in one dimension.
        variances = torch.div(s2, nk, out=variances_out).addcmul_(means, means, value=-1)
        variances.add_(reg_covar)
    return torch.div(nk, nk.sum(1, keepdim=True), out=weights_out), means, variances


def fit_gmm_1d(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    covariance_type: str = "diag",
    means_init: Tensor | None = None,
    weights_init: Tensor | None = None,
    precisions_init: Tensor | float = 1.0,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
) -> GMM1D:
    """Fit ``K`` two-component 1-D Gaussian mixtures by EM, batched (scikit-learn's algorithm).

    Args:
        x: ``Tensor[K, M]`` samples, one mixture per row; padded entries are ignored.
        mask: ``BoolTensor[K, M]``, True where ``x`` holds a sample (default: all). Each row
            needs at least one sample (scikit-learn needs two).
        covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
        means_init: ``Tensor[K, 2]``; default: each row's smallest and largest sample (PAA).
        weights_init: ``Tensor[K, 2]``; default 0.5 / 0.5.
        precisions_init: initial precision (``1 / variance``), a float or ``Tensor[K, 2]``.
        tol, reg_covar, max_iter: scikit-learn's stopping tolerance on the change of the mean
            log-likelihood, variance floor and iteration cap.

    Returns:
        A :class:`GMM1D` in float64 on ``x``'s device.

    Raises:
        ValueError: a variance became non-positive (scikit-learn raises there too).
    """
    x = check_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [K, M], got {tuple(x.shape)}")
    check_choice(covariance_type, "covariance_type", COVARIANCE_TYPES)
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    elif mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(x.shape)}")
    # inference_mode: no autograd bookkeeping on the ~40 small ops per EM iteration; the
    # results are cloned out of it so that callers get ordinary tensors.
    with torch.inference_mode():
        gmm = _fit(
            x, mask, covariance_type, means_init, weights_init, precisions_init, tol, reg_covar,
            max_iter,
        )  # fmt: skip
    return GMM1D(
        gmm.covariance_type,
        *(t.clone() for t in (gmm.weights, gmm.means, gmm.variances, gmm.precisions_chol)),
        *(t.clone() for t in (gmm.n_iter, gmm.converged, gmm.lower_bound)),
    )


class _Batch:
    """The EM loop's state for the ``k`` mixtures still running: inputs and work buffers.

    Every iteration writes into these buffers with ``out=`` and in-place ops, through views
    made once here, so an iteration issues only arithmetic (no allocation, slicing or
    packing). ``work`` holds both components' ``log w_c + log N(x | c)`` (rows 0-1, turned
    into responsibilities in place) and their log-sum (row 2); one ``bmm`` with the design
    ``[k, M, 3]`` gives ``stats[k, c, j] = sum_i resp_ic x_i^j`` for c = 0, 1 and, in row 2,
    the sum of the log-likelihoods (the lower bound times the sample count).
    """

    def __init__(self, ids, design, count, sum_x2, coef, bound, active, saved, n_iter):
        k, m = design.shape[0], design.shape[1]
        self.ids, self.design, self.count, self.sum_x2 = ids, design, count, sum_x2
        _, self.xs, self.x2s = design.transpose(1, 2).contiguous().split(1, dim=1)  # [k, 1, M]
        self.c0, self.c1, self.c2 = (c.contiguous() for c in coef)  # [k, 2, 1] each
        self.bound, self.new_bound, self.delta = (
            bound,
            torch.empty_like(bound),
            torch.empty_like(bound),
        )
        self.active, self.still = active, torch.empty_like(active)
        self.saved, self.n_iter = saved, n_iter  # stats at each row's last iteration, count
        self.work = design.new_empty((k, 3, m))
        self.log_prob, self.log_norm = self.work[:, :2], self.work[:, 2:]
        self.lp0, self.lp1 = self.work[:, 0:1], self.work[:, 1:2]
        self.stats = design.new_empty((k, 3, 3))
        self.s0, self.s1, self.s2 = (self.stats[:, :2, j : j + 1] for j in range(3))
        self.bound_sum = self.stats[:, 2, 0]
        self.nk, self.means, self.variances, self.weights = (
            design.new_empty((k, 2, 1)) for _ in range(4)
        )
        self.active3 = active.view(k, 1, 1)

    def select(self, keep: Tensor) -> _Batch:
        """The same state restricted to rows ``keep`` (new buffers)."""
        return _Batch(
            self.ids[keep], self.design[keep], self.count[keep], self.sum_x2[keep],
            (self.c0[keep], self.c1[keep], self.c2[keep]), self.bound[keep], self.active[keep],
            self.saved[keep], self.n_iter[keep],
        )  # fmt: skip


def _em_iteration(b: _Batch, cov_type: str, reg_covar: float, tol: float) -> None:
    """One EM iteration of every row of ``b``; rows still active record their stats."""
    # E-step: log(w_c) + log N(x | c) = c0 + c1 x + c2 x^2, both components at once.
    torch.addcmul(b.c0, b.c1, b.xs, out=b.log_prob).addcmul_(b.c2, b.x2s)
    torch.logaddexp(b.lp0, b.lp1, out=b.log_norm)
    b.log_prob.sub_(b.log_norm).exp_()  # responsibilities
    torch.bmm(b.work, b.design, out=b.stats)  # padding rows of the design are zero
    # M-step, then the next E-step's coefficients, into the buffers.
    buffers = (b.nk, b.means, b.variances, b.weights)
    _m_step(b.s0, b.s1, b.s2, b.sum_x2, cov_type, reg_covar, out=buffers)
    _coefficients(b.weights, b.means, b.variances, out=(b.c0, b.c1, b.c2))
    # Rows running this iteration keep its stats; then scikit-learn's stopping rule (a NaN
    # bound also stops; its variances then fail the final check, where scikit-learn raises).
    torch.where(b.active3, b.stats, b.saved, out=b.saved)
    b.n_iter.add_(b.active)
    torch.div(b.bound_sum, b.count, out=b.new_bound)
    torch.sub(b.new_bound, b.bound, out=b.delta).abs_()
    b.active.logical_and_(torch.ge(b.delta, tol, out=b.still))
    b.bound, b.new_bound = b.new_bound, b.bound


def _fit(x, mask, cov_type, means_init, weights_init, precisions_init, tol, reg_covar, max_iter):
    num, device, f64 = x.shape[0], x.device, torch.float64
    # Per-sample rows (1, x, x^2), zero on padding: [K, M, 3], the M-step's operand.
    # Parameters are [K, 2, 1] so that they broadcast against [K, 1, M] without views.
    design = _design(x, mask)
    count = design[:, :, 0].sum(1)
    sum_x2 = design[:, :, 2].sum(1)[:, None, None]
    if means_init is None:
        lo = torch.where(mask, x, math.inf).amin(1)
        hi = torch.where(mask, x, -math.inf).amax(1)
        means_init = torch.stack([lo, hi], 1)
    weights = (
        torch.full((num, 2), 0.5, dtype=f64, device=device)
        if weights_init is None
        else weights_init.to(device, f64).reshape(num, 2)
    )
    variances = 1.0 / torch.as_tensor(precisions_init, dtype=f64, device=device).expand(num, 2)
    coef = _coefficients(
        weights.view(num, 2, 1),
        means_init.to(device, f64).reshape(num, 2, 1),
        variances.reshape(num, 2, 1),
    )  # (c0, c1, c2), each [K, 2, 1]
    batch = _Batch(
        torch.arange(num, device=device), design, count, sum_x2, coef,
        torch.full((num,), -math.inf, dtype=f64, device=device),
        torch.ones(num, dtype=torch.bool, device=device),
        torch.zeros((num, 3, 3), dtype=f64, device=device),
        torch.zeros(num, dtype=torch.long, device=device),
    )  # fmt: skip
    # Every row keeps iterating (a stopped row's buffers change, its saved stats do not):
    # no per-row freezing. When at most half of a large batch is still running, the stopped
    # rows' results are written out and the batch shrinks to the running ones, so that the
    # long tail of iterations runs on a few rows. One sync per iteration (the count still
    # running).
    out_saved = torch.empty((num, 3, 3), dtype=f64, device=device)
    out_iter = torch.empty(num, dtype=torch.long, device=device)
    out_active = torch.empty(num, dtype=torch.bool, device=device)
    for _ in range(max_iter):
        _em_iteration(batch, cov_type, reg_covar, tol)
        left = int(batch.active.count_nonzero())
        shrink = 2 * left <= batch.active.shape[0] and batch.work.numel() > _SHRINK_MIN
        if left == 0 or shrink:
            out_saved[batch.ids], out_iter[batch.ids] = batch.saved, batch.n_iter
            out_active[batch.ids] = batch.active
            if left == 0:
                break
            batch = batch.select(batch.active.nonzero().squeeze(1))
    else:  # max_iter reached with rows still running
        out_saved[batch.ids], out_iter[batch.ids] = batch.saved, batch.n_iter
        out_active[batch.ids] = batch.active
    weights, means, variances = (
        t.reshape(num, 2)
        for t in _m_step(*out_saved[:, :2].split(1, dim=2), sum_x2, cov_type, reg_covar)
    )
    if not bool((variances > 0).all()):
        raise ValueError(
            "x: a mixture has a non-positive variance (collapsed samples); "
            "increase reg_covar or rescale the data"
        )
    return GMM1D(
        cov_type,
        weights,
        means,
        variances,
        1.0 / torch.sqrt(variances),
        out_iter,
        ~out_active,
        out_saved[:, 2, 0] / count,
    )


def gmm_log_prob(gmm: GMM1D, x: Tensor) -> Tensor:
    """``log(weight_c) + log N(x | component c)`` for ``x: Tensor[K, M]`` -> ``Tensor[K, M, 2]``."""
    xd = x.to(torch.float64)
    coef = _coefficients(gmm.weights, gmm.means, gmm.variances)
    return torch.stack(_component_log_probs(xd, xd * xd, coef), dim=2)


def gmm_predict(gmm: GMM1D, x: Tensor) -> Tensor:
    """Most likely component (0 or 1; 0 wins ties) of each ``x: Tensor[K, M]`` -> ``LongTensor[K, M]``."""
    lp0, lp1 = _component_log_probs(
        *_powers(x), _coefficients(gmm.weights, gmm.means, gmm.variances)
    )
    return (lp1 > lp0).long()


def gmm_score_samples(gmm: GMM1D, x: Tensor) -> Tensor:
    """Log-likelihood of each ``x: Tensor[K, M]`` under its row's mixture -> ``Tensor[K, M]``."""
    lp0, lp1 = _component_log_probs(
        *_powers(x), _coefficients(gmm.weights, gmm.means, gmm.variances)
    )
    return torch.logaddexp(lp0, lp1)


def _powers(x: Tensor) -> tuple[Tensor, Tensor]:
    xd = x.to(torch.float64)
    return xd, xd * xd


def sklearn_precisions_init(covariance_type: str) -> np.ndarray:
    """PAA's initial precisions (all 1) in the shape scikit-learn expects for ``covariance_type``."""
    check_choice(covariance_type, "covariance_type", COVARIANCE_TYPES)
    return {
        "full": np.ones((2, 1, 1)),
        "diag": np.ones((2, 1)),
        "spherical": np.ones(2),
        "tied": np.ones((1, 1)),
    }[covariance_type]


def fit_gmm_1d_sklearn(samples: np.ndarray, covariance_type: str = "diag"):
    """Reference: one ``sklearn.mixture.GaussianMixture`` with PAA's initialisation.

    Args:
        samples: ``ndarray[M]`` (``M >= 2``) of one mixture's values, in their own dtype.
        covariance_type: as :func:`fit_gmm_1d`.

    Returns:
        The fitted ``GaussianMixture`` (``weights_``, ``means_``, ``covariances_``, ...).
    """
    from sklearn.mixture import GaussianMixture

    samples = np.asarray(samples).reshape(-1, 1)
    means_init = np.array([samples.min(), samples.max()]).reshape(2, 1)
    gmm = GaussianMixture(
        2,
        covariance_type=covariance_type,
        weights_init=np.array([0.5, 0.5]),
        means_init=means_init,
        precisions_init=sklearn_precisions_init(covariance_type),
    )
    return gmm.fit(samples)
