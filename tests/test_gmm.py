"""Batched torch EM against scikit-learn's GaussianMixture, for all four covariance types."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from labkit.assigners.gmm import (
    COVARIANCE_TYPES,
    fit_gmm_1d,
    fit_gmm_1d_sklearn,
    gmm_log_prob,
    gmm_predict,
    gmm_score_samples,
)

CASES = [
    np.array([0.1, 0.12, 0.15, 0.2, 0.9, 1.0, 1.3]),
    np.array([0.5, 0.52]),  # two samples: the smallest PAA fit
    np.array([0.3, 0.3, 0.3, 0.8]),  # repeated values
    np.random.default_rng(0).gamma(2.0, 0.3, size=40),
]


def sklearn_variances(gmm) -> np.ndarray:
    return np.broadcast_to(np.asarray(gmm.covariances_, dtype=np.float64).reshape(-1), (2,))


@pytest.mark.parametrize("cov", COVARIANCE_TYPES)
def test_matches_sklearn_on_fixed_cases(cov):
    for x in CASES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = fit_gmm_1d_sklearn(x, cov)
        xt = torch.tensor(x)[None]
        got = fit_gmm_1d(xt, covariance_type=cov)
        np.testing.assert_allclose(got.weights[0].numpy(), ref.weights_, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(got.means[0].numpy(), ref.means_[:, 0], rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(
            got.variances[0].numpy(), sklearn_variances(ref), rtol=1e-6, atol=1e-12
        )
        assert int(got.n_iter[0]) == ref.n_iter_
        assert bool(got.converged[0]) == ref.converged_
        assert float(got.lower_bound[0]) == pytest.approx(ref.lower_bound_, rel=1e-9)
        # responsibilities, predictions and log-likelihoods
        resp = torch.softmax(gmm_log_prob(got, xt)[0], dim=-1).numpy()
        np.testing.assert_allclose(resp, ref.predict_proba(x[:, None]), atol=1e-7)
        assert (gmm_predict(got, xt)[0].numpy() == ref.predict(x[:, None])).all()
        np.testing.assert_allclose(
            gmm_score_samples(got, xt)[0].numpy(), ref.score_samples(x[:, None]), rtol=1e-8
        )


def test_tied_shares_one_variance_and_components_start_at_min_max():
    x = torch.tensor([[0.1, 0.2, 0.25, 1.0, 1.2]], dtype=torch.float64)
    got = fit_gmm_1d(x, covariance_type="tied")
    assert got.variances[0, 0] == got.variances[0, 1]
    got = fit_gmm_1d(x, covariance_type="diag", max_iter=1)
    # one EM step from means (0.1, 1.2): component 0 stays the low-loss one
    assert got.means[0, 0] < got.means[0, 1]
    assert not bool(got.converged[0]) and int(got.n_iter[0]) == 1


def test_batched_rows_with_padding_equal_separate_fits():
    rows = [CASES[0], CASES[1], CASES[3]]
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        x[i, len(r) :] = 123.0  # padding values must not matter
        mask[i, : len(r)] = True
    for cov in COVARIANCE_TYPES:
        batched = fit_gmm_1d(x, mask, covariance_type=cov)
        for i, r in enumerate(rows):
            single = fit_gmm_1d(torch.tensor(r)[None], covariance_type=cov)
            torch.testing.assert_close(batched.means[i], single.means[0])
            torch.testing.assert_close(batched.variances[i], single.variances[0])
            assert batched.n_iter[i] == single.n_iter[0]


def test_float32_input_and_bad_arguments():
    x = torch.tensor([[0.1, 0.2, 0.9, 1.0]])
    got = fit_gmm_1d(x)
    assert got.means.dtype == torch.float64
    with pytest.raises(ValueError, match="covariance_type"):
        fit_gmm_1d(x, covariance_type="banded")
    with pytest.raises(ValueError, match="x"):
        fit_gmm_1d(torch.zeros(4))
    with pytest.raises(ValueError, match="mask"):
        fit_gmm_1d(x, torch.ones(1, 3, dtype=torch.bool))
