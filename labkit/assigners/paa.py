"""PAA re-assignment: split each ground truth's candidate priors by a GMM fitted to their losses.

Probabilistic Anchor Assignment (Kim & Lee, 2020) keeps the first-stage positives (PAAHead
uses MaxIoU with a low threshold) only where the model already does well on them:

1. per GT and per pyramid level, the ``topk`` positives with the smallest loss (cls + box)
   are the GT's candidates;
2. a two-component 1-D Gaussian mixture is fitted to the candidates' losses, component 0
   started at the smallest loss and component 1 at the largest (weights 0.5, precision 1);
3. separation (mmdetection's ``gmm_separation_scheme``, fig. 3(c) of the paper): among the
   candidates predicted to come from component 0, sorted by loss, keep those up to and
   including the one with the highest mixture log-likelihood (``score_samples``); the rest
   of the GT's positives become negatives. Nothing is ignored in this scheme;
4. a GT with fewer than two candidates gets no GMM and loses its positives (mmdetection's
   ``continue``): all its first-stage positives become background.

Entry point::

    labels, label_weights, bbox_weights, num_pos = paa_reassign(
        pos_losses,      # Tensor[P]      loss of each first-stage positive
        labels,          # LongTensor[N]  per prior, 0..C-1 fg, C = background
        label_weights,   # Tensor[N]
        bbox_weights,    # Tensor[N, 4]
        pos_inds,        # LongTensor[P]  prior index of each positive (ascending)
        pos_gt_inds,     # LongTensor[P]  0-based GT index of each positive
        num_level_anchors,  # list[int]   priors per level (sum = N)
        num_classes=C, topk=9, covariance_type="diag", backend="torch")

It returns new ``labels`` and ``bbox_weights`` (the inputs are not modified; with no positive
they are returned as they are): re-assigned priors get label ``C`` and bbox weight 0;
``label_weights`` comes back as the same tensor (this scheme ignores nothing); ``num_pos``
(int) counts the positives kept. :func:`paa_select` exposes the intermediate steps (candidates, fitted GMMs,
which candidates stay) for plots.

Backends: ``"torch"`` (default) fits every GT's mixture at once with
:func:`labkit.assigners.gmm.fit_gmm_1d` (float64, on the losses' device, no Python loop
over GTs); ``"sklearn"`` runs mmdetection's loop with one ``sklearn.mixture.GaussianMixture``
per GT and is the reference the tests compare against. They agree up to floating-point ties.

Why the torch backend is fast (31-55x the reference on one CPU core for 50 GTs, ~46k
positives; ``benchmarks/bench_paa.py``): the candidates need no Python loop and no pass
over the positives beyond building one int64 key (GT, level, loss bits); an exact
prefilter (per-group minima of topk+ buckets, one ``scatter_reduce``) leaves ~5% of the
positives to sort; group bounds come from a binary search of the sorted keys and the
candidates are laid out ``[K, L * topk]`` directly; 1-D gathers use ``index_select``
(several times faster than advanced indexing on CPU); the batched EM is written for the
fewest ops per iteration (see :mod:`labkit.assigners.gmm`); the re-assignment is two
``index_fill`` over the positives plus small copies, with no mask over all priors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from labkit._validation import check_choice, check_tensor
from labkit.assigners.gmm import (
    COVARIANCE_TYPES,
    GMM1D,
    fit_gmm_1d,
    gmm_log_prob,
    sklearn_precisions_init,
)

__all__ = ["PAASelection", "paa_reassign", "paa_select"]

BACKENDS = ("torch", "sklearn")
_KEY_MAX = torch.iinfo(torch.int64).max


@dataclass
class PAASelection:
    """What PAA decided for one image, GT by GT (rows = GTs ``0..K-1``).

    Attributes:
        cand_inds: ``LongTensor[K, M]`` prior index of each candidate, sorted by loss per row
            (padding: -1).
        cand_losses: ``Tensor[K, M]`` their losses (float64; padding 0).
        cand_mask: ``BoolTensor[K, M]`` True where a candidate exists.
        fitted: ``BoolTensor[K]`` GTs with at least two candidates (a GMM was fitted).
        gmm: the fitted :class:`GMM1D`, one row per fitted GT (``fitted.nonzero()`` order).
        components: ``LongTensor[K, M]`` predicted component (0 = low loss), -1 on padding.
        scores: ``Tensor[K, M]`` log-likelihood under the mixture (``-inf`` on padding).
        keep: ``BoolTensor[K, M]`` candidates that stay positive.
    """

    cand_inds: Tensor
    cand_losses: Tensor
    cand_mask: Tensor
    fitted: Tensor
    gmm: GMM1D
    components: Tensor
    scores: Tensor
    keep: Tensor

    @property
    def pos_inds(self) -> Tensor:
        """``LongTensor[P']`` prior indices kept positive (GT by GT, by increasing loss)."""
        return self.cand_inds[self.keep]

    @property
    def separation_loss(self) -> Tensor:
        """``Tensor[K]`` loss of the last kept candidate per GT (``nan`` where none kept)."""
        masked = torch.where(self.keep, self.cand_losses, -torch.inf).amax(1)
        return torch.where(self.keep.any(1), masked, torch.nan)


def _level_of(pos_inds: Tensor, num_level_anchors: Sequence[int]) -> Tensor:
    ends = torch.as_tensor(np.cumsum(num_level_anchors), device=pos_inds.device)
    return torch.searchsorted(ends, pos_inds, right=True)


def _sort_key(group: Tensor, losses: Tensor) -> Tensor:
    """int64 keys ordering by ``group``, then by loss (float32 bits made monotone).

    One integer sort replaces a float sort plus a stable group sort (and is several times
    faster on CPU than sorting floats). Group ``g``'s keys lie in
    ``[g * 2^32 - 2^31, g * 2^32 + 2^31)``.
    """
    bits = losses.float().view(torch.int32)
    # IEEE floats sort like signed integers once the 31 low bits of negative values are
    # flipped.
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return monotone.add_(group, alpha=1 << 32)


def _select_candidates(
    pos_losses: Tensor,
    pos_inds: Tensor,
    pos_gt_inds: Tensor,
    levels: Tensor,
    num_gt: int,
    num_levels: int,
    topk: int,
) -> tuple[Tensor, Tensor]:
    """Each GT's candidates, as positions into the positives, in a ``[K, L * topk]`` layout.

    Returns ``(cand, valid)``: ``cand[k, l * topk + r]`` is the position of the ``r``-th
    smallest loss of GT ``k`` on level ``l`` (0 where ``valid`` is False).
    """
    # One sort by (GT, level, loss): each (GT, level) group is contiguous and ordered by
    # loss, and its bounds are found by a binary search of the group ids in the sorted keys
    # (no bincount / rank pass over the positives).
    num_groups = num_gt * num_levels
    group = torch.add(levels, pos_gt_inds, alpha=num_levels)
    keys = _sort_key(group, pos_losses)
    # Prefilter (exact): deal each group's positives into B >= topk buckets; the topk-th
    # smallest of the bucket minima (topk distinct members) bounds the group's topk-th
    # smallest key from above, so the keys at or below it hold every candidate, ties
    # included. Only they are sorted (~10% of the positives). Gathers use index_select,
    # several times faster than advanced indexing on CPU.
    num_buckets = 1 << (topk - 1).bit_length()
    bucket = pos_inds & (num_buckets - 1)  # any dealing is exact; prior indices spread well
    minima = torch.full((num_groups * num_buckets,), _KEY_MAX, dtype=torch.long, device=keys.device)
    minima.scatter_reduce_(0, bucket.add_(group, alpha=num_buckets), keys, "amin")
    bound = minima.view(num_groups, num_buckets).sort(1).values[:, topk - 1]
    kept = (keys <= bound.index_select(0, group)).nonzero().squeeze(1)
    keys, order = torch.sort(keys.index_select(0, kept), stable=True)
    order = kept.index_select(0, order)
    ids = (torch.arange(num_groups + 1, device=keys.device) << 32) - (1 << 31)
    bounds = torch.searchsorted(keys, ids)
    starts, counts = bounds[:-1, None], (bounds[1:] - bounds[:-1])[:, None]
    rank = torch.arange(topk, device=keys.device)
    valid = rank < counts  # [G * L, topk]
    pick = torch.where(valid, starts + rank, 0).clamp_(max=max(order.numel() - 1, 0))
    cand = order.index_select(0, pick.view(-1))
    return cand.view(num_gt, num_levels * topk), valid.view(num_gt, num_levels * topk)


def _check_positives(
    pos_losses: Tensor, pos_inds: Tensor, pos_gt_inds: Tensor, num_priors: int
) -> tuple[Tensor, Tensor]:
    """Check the positives' tensors, naming the bad one; returns ``(pos_inds, pos_gt_inds)``
    as int64. Duplicate ``pos_inds`` are refused (a prior is one GT's positive at most, and
    ``num_pos`` counts priors): deduplicating would have to pick a GT for the prior."""
    if not (pos_losses.shape == pos_inds.shape == pos_gt_inds.shape) or pos_inds.dim() != 1:
        raise ValueError(
            "pos_losses, pos_inds, pos_gt_inds: expected three [P] tensors, got shapes "
            f"{tuple(pos_losses.shape)}, {tuple(pos_inds.shape)}, {tuple(pos_gt_inds.shape)}"
        )
    if not pos_losses.is_floating_point():
        raise ValueError(
            f"pos_losses: expected a floating point tensor, got dtype {pos_losses.dtype}"
        )
    for tensor, name in ((pos_inds, "pos_inds"), (pos_gt_inds, "pos_gt_inds")):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(
                f"{name}: expected an integer (int64) tensor, got dtype {tensor.dtype}"
            )
    pos_inds, pos_gt_inds = pos_inds.long(), pos_gt_inds.long()
    if pos_inds.numel() == 0:
        return pos_inds, pos_gt_inds
    finite = torch.isfinite(pos_losses)
    if not bool(finite.all()):
        bad = (~finite).nonzero().squeeze(1)
        raise ValueError(
            f"pos_losses: expected finite losses, got {pos_losses[bad[0]].item()} at "
            f"{bad.numel()} position(s) {_listing(bad)} (prior indices {_listing(pos_inds[bad])}); "
            "the first-stage loss diverged"
        )
    low, high = int(pos_inds.min()), int(pos_inds.max())
    if low < 0 or high >= num_priors:
        raise ValueError(
            f"pos_inds: expected prior indices in [0, {num_priors - 1}] "
            f"(sum(num_level_anchors) = {num_priors} priors), got values in [{low}, {high}]"
        )
    if int(pos_gt_inds.min()) < 0:
        raise ValueError(
            f"pos_gt_inds: expected 0-based GT indices >= 0, got {int(pos_gt_inds.min())}"
        )
    # Ascending (the usual case, from nonzero()) is checked in one pass; else sort.
    if not bool((pos_inds[1:] > pos_inds[:-1]).all()):
        uniq, counts = torch.unique(pos_inds, return_counts=True)
        if uniq.numel() != pos_inds.numel():
            raise ValueError(
                f"pos_inds: expected each prior at most once, got duplicates "
                f"{_listing(uniq[counts > 1])}"
            )
    return pos_inds, pos_gt_inds


def _listing(values: Tensor, limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...' if values.numel() > limit else ''}]"


def paa_select(
    pos_losses: Tensor,
    pos_inds: Tensor,
    pos_gt_inds: Tensor,
    num_level_anchors: Sequence[int],
    topk: int = 9,
    covariance_type: str = "diag",
) -> PAASelection:
    """Candidates, GMM fits and kept positives for all GTs of one image (torch backend).

    Args:
        pos_losses: ``Tensor[P]`` loss of each first-stage positive.
        pos_inds: ``LongTensor[P]`` prior index of each positive.
        pos_gt_inds: ``LongTensor[P]`` 0-based GT index of each positive.
        num_level_anchors: priors per level.
        topk: candidates per level per GT.
        covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
    """
    check_tensor(pos_losses, "pos_losses")
    check_tensor(pos_inds, "pos_inds")
    check_tensor(pos_gt_inds, "pos_gt_inds")
    pos_inds, pos_gt_inds = _check_positives(
        pos_losses, pos_inds, pos_gt_inds, sum(num_level_anchors)
    )
    with torch.no_grad():
        sel, _ = _select(
            pos_losses, pos_inds, pos_gt_inds, num_level_anchors, topk, covariance_type
        )
    return sel


def _select(pos_losses, pos_inds, pos_gt_inds, num_level_anchors, topk, covariance_type):
    """:func:`paa_select`, plus the positions (into the positives) of the kept candidates."""
    pos_losses = pos_losses.detach()
    num_gt = int(pos_gt_inds.max()) + 1 if pos_gt_inds.numel() else 0
    num_levels = len(num_level_anchors)
    levels = _level_of(pos_inds, num_level_anchors)
    cand, valid = _select_candidates(
        pos_losses, pos_inds, pos_gt_inds, levels, num_gt, num_levels, topk
    )
    # The GMM sees each GT's candidates from all levels together, sorted by loss (a stable
    # row sort: padding, at +inf, goes last), trimmed to the widest GT.
    losses = torch.where(valid, pos_losses.index_select(0, cand.view(-1)).view_as(cand), torch.inf)
    losses = losses.double()
    losses, col = torch.sort(losses, dim=1, stable=True)
    num_cand = valid.sum(1)
    width = int(num_cand.max()) if num_gt else 0
    losses, col = losses[:, :width], col[:, :width]
    cand = cand.gather(1, col)
    mask = torch.arange(width, device=cand.device) < num_cand[:, None]
    losses = torch.where(mask, losses, 0.0)
    cand_inds = torch.where(mask, pos_inds.index_select(0, cand.view(-1)).view_as(cand), -1)
    fitted = num_cand >= 2
    rows = fitted.nonzero().squeeze(1)
    x, m = losses.index_select(0, rows), mask.index_select(0, rows)
    gmm = fit_gmm_1d(x, m, covariance_type=covariance_type)
    # predict and score_samples from one evaluation of both components' log-likelihoods
    lp = gmm_log_prob(gmm, x)
    lp0, lp1 = lp[..., 0], lp[..., 1]
    components = torch.full_like(cand_inds, -1)
    scores = torch.full_like(losses, -torch.inf)
    components[rows] = torch.where(m, (lp1 > lp0).long(), -1)
    scores[rows] = torch.where(m, torch.logaddexp(lp0, lp1), -torch.inf)
    keep = _separate(components, scores, mask & fitted[:, None])
    sel = PAASelection(cand_inds, losses, mask, fitted, gmm, components, scores, keep)
    return sel, cand[keep]


def _separate(components: Tensor, scores: Tensor, valid: Tensor) -> Tensor:
    """``gmm_separation_scheme`` for every row: keep component-0 candidates up to the best score."""
    fg = (components == 0) & valid
    fg_scores = torch.where(fg, scores, -torch.inf)
    best = fg_scores.argmax(1, keepdim=True)  # column of the most likely fg candidate
    cols = torch.arange(fg.shape[1], device=fg.device)[None, :]
    return fg & (cols <= best)


def _paa_pos_inds_sklearn(
    pos_losses: Tensor,
    pos_inds: Tensor,
    pos_gt_inds: Tensor,
    num_level_anchors: Sequence[int],
    topk: int,
    covariance_type: str,
) -> Tensor:
    """Reference: mmdetection's loop, one scikit-learn ``GaussianMixture`` per GT."""
    from sklearn.mixture import GaussianMixture

    bounds = np.cumsum([0, *num_level_anchors])
    level_masks = [
        (pos_inds >= bounds[i]) & (pos_inds < bounds[i + 1]) for i in range(len(num_level_anchors))
    ]
    kept = [pos_inds.new_zeros((0,))]
    for gt in range(int(pos_gt_inds.max()) + 1):
        gt_mask = pos_gt_inds == gt
        inds_gmm, loss_gmm = [], []
        for level_mask in level_masks:
            both = level_mask & gt_mask
            values, idx = pos_losses[both].topk(min(int(both.sum()), topk), largest=False)
            inds_gmm.append(pos_inds[both][idx])
            loss_gmm.append(values)
        inds_gmm, loss_gmm = torch.cat(inds_gmm), torch.cat(loss_gmm)
        if len(inds_gmm) < 2:
            continue
        loss_gmm, order = loss_gmm.sort()
        inds_gmm = inds_gmm[order]
        samples = loss_gmm.view(-1, 1).cpu().numpy()
        gmm = GaussianMixture(
            2,
            weights_init=np.array([0.5, 0.5]),
            means_init=np.array([samples.min(), samples.max()]).reshape(2, 1),
            precisions_init=sklearn_precisions_init(covariance_type),
            covariance_type=covariance_type,
        )
        gmm.fit(samples)
        components = torch.from_numpy(gmm.predict(samples)).to(pos_inds.device)
        scores = torch.from_numpy(gmm.score_samples(samples)).to(pos_inds.device)
        fg = components == 0
        if fg.any():
            best = scores[fg].topk(1).indices
            kept.append(inds_gmm[fg][: best + 1])
    return torch.cat(kept)


def paa_reassign(
    pos_losses: Tensor,
    labels: Tensor,
    label_weights: Tensor,
    bbox_weights: Tensor,
    pos_inds: Tensor,
    pos_gt_inds: Tensor,
    num_level_anchors: Sequence[int],
    *,
    num_classes: int,
    topk: int = 9,
    covariance_type: str = "diag",
    backend: str = "torch",
) -> tuple[Tensor, Tensor, Tensor, int]:
    """PAA's second-stage assignment of one image (mmdetection ``PAAHead.paa_reassign``).

    Args:
        pos_losses: ``Tensor[P]`` per-positive loss (cls + box) from the first stage.
        labels: ``LongTensor[N]`` first-stage labels (``num_classes`` = background).
        label_weights: ``Tensor[N]``.
        bbox_weights: ``Tensor[N, 4]``.
        pos_inds: ``LongTensor[P]`` prior indices of the first-stage positives, each in
            ``[0, N)`` and each at most once (duplicates raise ``ValueError``: a prior is
            the positive of one GT, and ``num_pos`` counts priors).
        pos_gt_inds: ``LongTensor[P]`` their 0-based GT indices.
        num_level_anchors: ``list[int]`` priors per level, summing to ``N``.
        num_classes: ``C``; re-assigned priors get label ``C``.
        topk: candidates per level per GT.
        covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
        backend: ``"torch"`` (batched EM) or ``"sklearn"`` (reference).

    Returns:
        ``(labels, label_weights, bbox_weights, num_pos)`` after re-assignment.

    Raises ``ValueError`` naming the argument for NaN/inf ``pos_losses``, float, negative,
    out-of-range or duplicate indices.
    """
    check_choice(backend, "backend", BACKENDS)
    check_choice(covariance_type, "covariance_type", COVARIANCE_TYPES)
    for value, name in (
        (pos_losses, "pos_losses"),
        (labels, "labels"),
        (label_weights, "label_weights"),
        (bbox_weights, "bbox_weights"),
        (pos_inds, "pos_inds"),
        (pos_gt_inds, "pos_gt_inds"),
    ):
        check_tensor(value, name)
    if not (pos_losses.shape == pos_inds.shape == pos_gt_inds.shape) or pos_inds.dim() != 1:
        raise ValueError(
            "pos_losses, pos_inds, pos_gt_inds: expected three [P] tensors, got shapes "
            f"{tuple(pos_losses.shape)}, {tuple(pos_inds.shape)}, {tuple(pos_gt_inds.shape)}"
        )
    if sum(num_level_anchors) != labels.shape[0]:
        raise ValueError(
            f"num_level_anchors: expected counts summing to {labels.shape[0]} (len(labels)), "
            f"got {list(num_level_anchors)}"
        )
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive integer, got {topk!r}")
    pos_inds, pos_gt_inds = _check_positives(pos_losses, pos_inds, pos_gt_inds, labels.shape[0])
    if len(pos_inds) == 0:
        return labels, label_weights, bbox_weights, 0
    labels_in, bbox_weights_in = labels, bbox_weights

    if backend == "torch":
        # inference_mode: only ``kept`` (read) leaves the block
        with torch.inference_mode():
            _, kept = _select(
                pos_losses, pos_inds, pos_gt_inds, num_level_anchors, topk, covariance_type
            )
        kept = pos_inds[kept]
    else:
        kept = _paa_pos_inds_sklearn(
            pos_losses.detach(), pos_inds, pos_gt_inds, num_level_anchors, topk, covariance_type
        )
    # Every first-stage positive becomes background, then the kept ones get their values
    # back: two index_fill over the positives and small copies, no mask over all priors.
    labels = labels.index_fill(0, pos_inds, num_classes)
    labels.index_copy_(0, kept, labels_in.index_select(0, kept))
    bbox_weights = bbox_weights.index_fill(0, pos_inds, 0)
    bbox_weights.index_copy_(0, kept, bbox_weights_in.index_select(0, kept))
    # gmm_separation_scheme ignores nothing: label_weights is returned as it is (not a copy).
    return labels, label_weights, bbox_weights, int(kept.numel())
