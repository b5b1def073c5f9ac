"""Scaling-law fits of a ladder (numpy + scipy only): sums of power laws over positive covariates,

    L_i = E_g + Σ_j A_gj · X_ij^(−α_gj)        (point i of group g, covariates j)

- L(C) = E + A·C^(−α): one covariate, the training compute C in FLOPs; groups are activations, E shared
  by default (the irreducible loss is a property of the data), A and α per activation;
- L(N, D) = E + A/N^a + B/D^b: two covariates, non-embedding parameters and training tokens.

As in OLMo's ladder and the Chinchilla replication (Besiroglu et al. 2024): the Huber loss (δ = 1e-3) of
log L̂ − log L, minimised by L-BFGS-B with an analytic gradient, bounds E ∈ [0, min L] and exponents in
[0.01, 2], from a grid of starting points (the best end point wins). Each covariate is divided by its
geometric mean inside the fit (conditioning); `PowerLawFit` reports A in the covariates' own units.

A fit with too few points is refused with one line (`FitRefused`): each group needs at least 2·J + 1
distinct covariate values (3 compute budgets for L(C), 5 (N, D) pairs for L(N, D)), 2 distinct values of
each covariate, and at least 5 points in all (OLMo-core's floor).

Compute multipliers follow from L(C): C_g(L*) = (A_g / (L* − E))^(1/α_g) is the compute group g needs to
reach loss L*, and M_g(L*) = C_baseline(L*) / C_g(L*). M > 1: g reaches L* with less compute than the
baseline (it is better); M < 1: it needs more.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize

from polycom_lm.errors import PolycomError

HUBER_DELTA = 1e-3
EXPONENT_BOUNDS = (0.01, 2.0)
MIN_POINTS = 5
START_E = (0.0, 0.5, 0.8, 0.95)  # fractions of the lowest loss in the group
START_EXPONENTS = (0.05, 0.15, 0.4, 1.0)


class FitRefused(PolycomError):
    """A fit that the data cannot determine (too few points or distinct covariate values)."""


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted law. Arrays are indexed [group] or [group, covariate]; `E` has one entry per group (equal
    entries when shared)."""

    name: str  # "L(C)" or "L(N, D)"
    groups: tuple[str, ...]
    covariates: tuple[str, ...]  # "C" or ("N", "D")
    E: np.ndarray  # [groups]
    A: np.ndarray  # [groups, covariates], in the covariates' own units
    alpha: np.ndarray  # [groups, covariates]
    shared_E: bool
    objective: float  # the minimised Huber sum (divided by δ)
    residuals: np.ndarray  # [points] log L̂ − log L of the fitted points
    converged: bool
    message: str = ""  # L-BFGS-B's own word on how it stopped (the best start's)

    def index(self, group: str) -> int:
        return self.groups.index(group)

    def predict(self, group: str, covariates: np.ndarray) -> np.ndarray:
        """L̂ at `covariates` [points, J] (or [points] when J = 1) for `group`."""
        g = self.index(group)
        x = np.asarray(covariates, dtype=float).reshape(-1, len(self.covariates))
        return self.E[g] + (self.A[g] * x ** (-self.alpha[g])).sum(axis=1)

    def compute_at_loss(self, group: str, loss: np.ndarray) -> np.ndarray:
        """L(C) only: the compute C at which `group`'s law reaches `loss` (inf at or below E)."""
        assert len(self.covariates) == 1, "compute_at_loss needs the one-covariate law L(C)"
        g = self.index(group)
        excess = np.asarray(loss, dtype=float) - self.E[g]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(excess > 0, (self.A[g, 0] / excess) ** (1.0 / self.alpha[g, 0]), np.inf)

    def multiplier(self, group: str, baseline: str, loss: np.ndarray) -> np.ndarray:
        """M(L*) = C_baseline(L*) / C_group(L*): > 1 when `group` needs less compute than `baseline`."""
        return self.compute_at_loss(baseline, loss) / self.compute_at_loss(group, loss)


def huber(residual: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """(Huber loss / δ, its derivative) of each residual: r²/(2δ) inside ±δ, |r| − δ/2 outside."""
    inside = np.abs(residual) <= delta
    value = np.where(inside, 0.5 * residual**2 / delta, np.abs(residual) - 0.5 * delta)
    return value, np.clip(residual / delta, -1.0, 1.0)


def check_points(groups: Sequence[str], covariates: np.ndarray, law: str, what: Sequence[str],
                 where: Optional[dict[str, str]] = None) -> None:
    """FitRefused (one line) unless every group has enough distinct covariate values (module docstring).
    `what` names the covariates in the message ("compute budgets"); `where[group]` says which runs it has."""
    covariates = np.asarray(covariates, dtype=float).reshape(len(groups), -1)
    if len(groups) < MIN_POINTS:
        raise FitRefused(f"cannot fit {law}: {len(groups)} points; a fit needs at least {MIN_POINTS}")
    need = 2 * covariates.shape[1] + 1
    for group in dict.fromkeys(groups):
        rows = covariates[[g == group for g in groups]]
        distinct = len({tuple(np.round(np.log(row), 9)) for row in rows})
        shown = f" ({where[group]})" if where and group in where else ""
        if distinct < need:
            raise FitRefused(f"cannot fit {law} for {group}: it has {distinct} distinct {what[0]}{shown} and the "
                             f"fit needs at least {need}; add sizes or budgets (or finish more runs)")
        for j, name in enumerate(what[1:] if len(what) > 1 else ()):
            if len(np.unique(np.round(np.log(rows[:, j]), 9))) < 2:
                raise FitRefused(f"cannot fit {law} for {group}: all its points have the same {name}; vary it")


def fit_power_law(groups: Sequence[str], covariates: np.ndarray, losses: np.ndarray, *, name: str,
                  covariate_names: Sequence[str], shared_E: bool = True, start: Optional[PowerLawFit] = None,
                  what: Sequence[str] = ("covariate values",), where: Optional[dict[str, str]] = None,
                  delta: float = HUBER_DELTA) -> PowerLawFit:
    """Fit `L = E_g + Σ_j A_gj X_j^(−α_gj)` to points (groups[i], covariates[i], losses[i]).

    covariates: [points, J] (or [points] for J = 1), positive; losses: [points], positive. `start`: a
    previous fit of the same groups to start from (the bootstrap's refits) in place of the grid. `delta`:
    the Huber threshold on log residuals (a large one makes the fit least squares).
    """
    losses = np.asarray(losses, dtype=float)
    x_raw = np.asarray(covariates, dtype=float).reshape(len(losses), -1)
    if not (np.all(np.isfinite(losses)) and np.all(losses > 0) and np.all(x_raw > 0)):
        raise FitRefused(f"cannot fit {name}: losses and covariates must be finite and positive")
    check_points(groups, x_raw, name, what, where)
    names = tuple(dict.fromkeys(groups))
    group_index = np.array([names.index(g) for g in groups])
    G, J = len(names), x_raw.shape[1]
    scale = np.exp(np.log(x_raw).mean(axis=0))  # geometric means
    x = np.log(x_raw / scale)  # [points, J]
    log_losses = np.log(losses)
    n_E = 1 if shared_E else G
    E_index = np.zeros(len(losses), dtype=int) if shared_E else group_index
    lowest = np.array([losses.min()] if shared_E else [losses[group_index == g].min() for g in range(G)])

    def unpack(theta: np.ndarray):
        return theta[:n_E], theta[n_E:n_E + G * J].reshape(G, J), theta[n_E + G * J:].reshape(G, J)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        E, log_A, alpha = unpack(theta)
        terms = np.exp(log_A[group_index] - alpha[group_index] * x)  # [points, J]
        predicted = E[E_index] + terms.sum(axis=1)
        value, slope = huber(np.log(predicted) - log_losses, delta)
        weight = slope / predicted
        grad_E = np.bincount(E_index, weight, minlength=n_E)
        grad_log_A = np.stack([np.bincount(group_index, weight * terms[:, j], minlength=G) for j in range(J)], axis=1)
        grad_alpha = np.stack([np.bincount(group_index, -weight * x[:, j] * terms[:, j], minlength=G) for j in range(J)],
                              axis=1)
        return float(value.sum()), np.concatenate([grad_E, grad_log_A.ravel(), grad_alpha.ravel()])

    # log A at the covariates' geometric mean, where a term is below the largest loss: bounded so that no
    # line search step overflows.
    log_A_bounds = (-50.0, float(np.log(losses.max())) + 2.0)
    bounds = ([(0.0, float(low)) for low in lowest] + [log_A_bounds] * (G * J) + [EXPONENT_BOUNDS] * (G * J))
    best = None
    for theta in _starts(start, scale, x, losses, group_index, E_index, lowest, G, J, shared_E):
        result = minimize(objective, theta, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-10})
        if best is None or result.fun < best.fun:
            best = result
    E, log_A, alpha = unpack(best.x)
    residuals = np.log(E[E_index] + np.exp(log_A[group_index] - alpha[group_index] * x).sum(axis=1)) - log_losses
    # Back to the covariates' own units: A·(X/s)^(−α) = A·s^α·X^(−α).
    return PowerLawFit(name, names, tuple(covariate_names), np.repeat(E, G) if shared_E else E.copy(),
                       np.exp(log_A) * scale[None, :] ** alpha, alpha.copy(), shared_E, float(best.fun), residuals,
                       bool(best.success), str(best.message))


def _starts(start: Optional[PowerLawFit], scale, x, losses, group_index, E_index, lowest, G, J, shared_E):
    """Starting parameter vectors: from a previous fit, or the grid of E fractions × exponents, with each
    log A set so that the law passes through the group's mean excess loss (split evenly over the terms)."""
    if start is not None:
        E = start.E[:1] if shared_E else start.E
        log_A = np.log(start.A) - start.alpha * np.log(scale)[None, :]
        log_A = np.clip(log_A, -50.0, np.log(losses.max()) + 2.0)
        yield np.concatenate([np.minimum(E, lowest), log_A.ravel(), start.alpha.ravel()])
        return
    for fraction, *exponents in itertools.product(START_E, *([START_EXPONENTS] * J)):
        E = lowest * fraction * (1 - 1e-9)
        alpha = np.tile(np.array(exponents), (G, 1))
        log_A = np.empty((G, J))
        excess = np.log(np.maximum(losses - E[E_index], 1e-12) / J)
        for g in range(G):
            rows = group_index == g
            log_A[g] = (excess[rows, None] + alpha[g] * x[rows]).mean(axis=0)
        yield np.concatenate([E, np.clip(log_A, -50.0, np.log(losses.max()) + 2.0).ravel(), alpha.ravel()])
