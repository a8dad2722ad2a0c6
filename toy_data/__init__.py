"""2-D toy data with exact velocity fields, for testing and teaching MeanFlow.

What this file holds, top to bottom:
  1. Toy distributions: `checkerboard`, `moons`, `spirals`, `eight_gaussians`, `rings`,
     `gaussian_mixture`, each `(n, generator=None) -> (n, 2) float32`, standardised to mean 0 and a mean
     per-coordinate variance of 1 (the noise e ~ N(0, I) has the same scale; each coordinate has variance 1
     except moons, 1.51 / 0.49, kept round, and spirals, 1.03 / 0.97). `DATASETS`, `sample`;
     `on_squares`: the share of points on the checkerboard's squares, a score for its samples.
  2. `GaussianMixture` and `Checkerboard`: data whose marginal velocity v(z, t) is known in closed form, and
     whose average velocity u(z, t, r) we get by accurate ODE integration. These are the exact fields that a
     MeanFlow network should learn; tests check the MeanFlow identity on them, notebooks draw their trajectories.
  3. Distances between two sample sets, to score 1-NFE samples: `energy_distance`, `sliced_wasserstein`.

Conventions (as in meanflow.py): data x, noise e ~ N(0, I), t = 1 is noise, t = 0 is data.
  z_t = (1 - t) x + t e,   conditional velocity e - x,   v(z, t) = E[e - x | z_t = z].
  u(z, t, r) = 1/(t - r) ∫_r^t v(z_τ, τ) dτ along dz/dτ = v(z, τ) from z_t = z, so z_r = z_t - (t - r) u,
  and u(z, t, t) = v(z, t). MeanFlow identity: u = v - (t - r) du/dt, du/dt = v · ∂_z u + ∂_t u.
The papers write u(z, r, t); here, as for the networks, u(z, t, r): the later time first.
"""

import math
import numbers

import torch

# ----------------------------------------------------------------------------------------------------
# 1. Toy distributions
# Each starts from the construction common in the flow-matching literature (FFJORD, torchcfm) and is
# divided by its exact std (one factor for both coordinates), so that all sets sit at the scale of the noise.
# Every point picks its component at random, so any slice of a sample is itself a fair sample.


def _is_count(n):  # a whole number (a Python or numpy integer, not a bool), 1 or more
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


def _count(n, generator):  # every sampler checks its arguments: one clear line each, not torch's TypeError
    if not _is_count(n):
        raise ValueError(f"n={n!r}: pass a number of points, 1 or more")
    _check_generator(generator)
    return int(n)


def _check_generator(generator):  # e.g. numpy's default_rng(): torch draws only from its own generators
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator={type(generator).__name__}: pass a torch.Generator "
                        "(torch.Generator().manual_seed(0)) or None")


def _rand(n, generator, *shape):
    return torch.rand(n, *shape, generator=generator, dtype=torch.float64)


def _randn(n, generator, *shape):
    return torch.randn(n, *shape, generator=generator, dtype=torch.float64)


def checkerboard(n, generator=None):
    # 4 x 4 board on [-2, 2]^2, points uniform on the 8 "black" squares. Each coordinate is marginally
    # uniform on [-2, 2] (variance 4/3), so multiplying by sqrt(3)/2 gives unit variance.
    n = _count(n, generator)
    x1 = 4 * _rand(n, generator) - 2
    x2 = _rand(n, generator) - 2 * (_rand(n, generator) < 0.5) + torch.floor(x1) % 2
    return (torch.stack([x1, x2], 1) * BOARD_SCALE).float()


BOARD_SCALE = math.sqrt(3) / 2  # board units -> standardised data coordinates


def checkerboard_squares():
    """The 8 squares of the checkerboard in data coordinates: (x0, y0, side) of each, lower-left corner first."""
    return [(i * BOARD_SCALE, j * BOARD_SCALE, BOARD_SCALE)
            for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]


def on_squares(points):
    """Share of points (n, 2) on the checkerboard's squares: 1.0 for its data, 0.5 for points spread uniformly
    over the board. Sharper than a distance for this set: a blurred sample leaks into the empty squares."""
    p = torch.as_tensor(points, dtype=torch.float64) / BOARD_SCALE  # board units, the board is [-2, 2]^2
    if p.dim() != 2 or p.shape[1] != 2 or len(p) == 0:
        raise ValueError(f"points of shape {tuple(p.shape)}: pass (n, 2) with n >= 1")
    inside = (p.abs() <= 2).all(1)
    black = (torch.floor(p[:, 0]) + torch.floor(p[:, 1])) % 2 == 0  # as the sampler: floor(x1) + floor(x2) even
    return (inside & black).double().mean().item()


def moons(n, generator=None, noise=0.05):
    # Two interleaving half circles (as sklearn.datasets.make_moons), theta ~ U[0, pi].
    n = _count(n, generator)
    theta = math.pi * _rand(n, generator)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    p = torch.where(_rand(n, generator, 1) < 0.5, upper, lower) + noise * _randn(n, generator, 2)
    # Exact moments: mean (1/2, 1/4); var_x = 1/2 + 1/4, var_y = 1/2 - 4/pi^2 + (2/pi - 1/4)^2.
    # One isotropic factor (the mean of the two variances) keeps the moons round.
    var = (0.75 + 0.5 - 4 / math.pi**2 + (2 / math.pi - 0.25) ** 2) / 2 + noise**2
    return ((p - torch.tensor([0.5, 0.25], dtype=torch.float64)) / math.sqrt(var)).float()


def spirals(n, generator=None, noise=0.08):
    # Two arms of an Archimedean spiral, 540 degrees each (FFJORD's "2spirals"). With the angle
    # a = sqrt(U) * 3 pi the points are nearly uniform along the arc (exactly so only far from the centre);
    # E|p|^2 = E[a^2] = (3 pi)^2 / 2, so the two coordinates' variances average to (3 pi / 2)^2 (1.03 / 0.97 of
    # it; the arms are point-symmetric, mean 0).
    n = _count(n, generator)
    a = torch.sqrt(_rand(n, generator)) * 3 * math.pi
    p = torch.stack([-a * torch.cos(a), a * torch.sin(a)], 1) / (3 * math.pi / 2)
    p = torch.where(_rand(n, generator, 1) < 0.5, p, -p) + noise * _randn(n, generator, 2)
    return (p / math.sqrt(1 + noise**2)).float()


def rings(n, generator=None, noise=0.2):
    # 4 concentric circles of radius 1, 2, 3, 4, each picked with probability proportional to its
    # length (uniform density along the circles). Per-coordinate variance E[R^2]/2 + noise^2 = 5 + noise^2.
    n = _count(n, generator)
    R = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    R = R[torch.multinomial(R / R.sum(), n, replacement=True, generator=generator)]
    angle = 2 * math.pi * _rand(n, generator)
    p = R[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1) + noise * _randn(n, generator, 2)
    return (p / math.sqrt(5 + noise**2)).float()


def eight_gaussians(n, generator=None):
    # The classic set: 8 equal components on a circle, std 1/10 of the radius.
    return GaussianMixture.ring(weights=[1.0] * 8, stds=[0.14] * 8).sample(n, generator)


def gaussian_mixture(n, generator=None):
    return GaussianMixture.default().sample(n, generator)


DATASETS = {
    "checkerboard": checkerboard,
    "moons": moons,
    "spirals": spirals,
    "eight_gaussians": eight_gaussians,
    "rings": rings,
    "gaussian_mixture": gaussian_mixture,
}


def sample(name, n, generator=None):
    if name not in DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name](n, generator)


# ----------------------------------------------------------------------------------------------------
# 2. A Gaussian mixture with its exact marginal velocity
# x ~ sum_k pi_k N(mu_k, sigma_k^2 I). Given component k, z_t = (1 - t) x + t e is Gaussian,
#   z_t | k ~ N((1 - t) mu_k, s_k^2 I),   s_k^2 = (1 - t)^2 sigma_k^2 + t^2,
# and the posterior means of x and e given (z, k) are linear in z (Gaussian conditioning):
#   E[x | z, k] = mu_k + (1 - t) sigma_k^2 / s_k^2 (z - (1 - t) mu_k),   E[e | z, k] = t / s_k^2 (z - (1 - t) mu_k).
# v(z, t) mixes E[e - x | z, k] with the responsibilities p(k | z_t = z). Everything is float64 inside:
# u = (z - z_r) / (t - r) loses digits for small t - r, and the tests take central differences of u.

# RK4 steps for u. On the default mixture the error against a 512-step solve falls 4th-order:
# max |u_S - u_512| over 20k noise points at t = 1, r = 0 (the hardest case, the full 1-NFE jump)
# is 1.5e-5 at S = 96, 4.7e-6 at S = 128, 9.1e-7 at S = 192, so 128 keeps it under 1e-5.
# Cost: 4 v-evaluations a step; 2000 points take about 0.7 s on one CPU core.
DEFAULT_ODE_STEPS = 128


class ExactFlow:
    """What both exact fields share: u from the ODE endpoint. A subclass gives v(z, t) and ode_solve(z, t, r, steps)."""

    def _time(self, t, z):
        # t: python float, 0-d or (B,) tensor -> (B, 1) float64 on z's device.
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device)
        return t.expand(z.shape[0]).reshape(-1, 1)

    @staticmethod
    def _check_steps(steps):
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps={steps!r}: pass an integer number of ODE steps, 1 or more")

    def u(self, z, t, r, steps=None):
        """Average velocity over [r, t] = (z - z_r) / (t - r); exactly v(z, t) where r == t.
        Same argument order as the networks, net(z, t, r)."""
        z64 = z.to(torch.float64)
        t, r = self._time(t, z64), self._time(r, z64)  # (B, 1)
        z_r = self.ode_solve(z64, t[:, 0], r[:, 0], **({} if steps is None else dict(steps=steps)))
        dt = t - r
        u = (z64 - z_r) / torch.where(dt == 0, 1.0, dt)  # in float64: (z - z_r) cancels badly in float32
        return torch.where(dt == 0, self.v(z64, t[:, 0]), u).to(z.dtype)


class GaussianMixture(ExactFlow):
    """x ~ sum_k pi_k N(mu_k, sigma_k^2 I) with means (K, D), stds shared (scalar) or (K,), weights (K,)."""

    def __init__(self, means, stds, weights=None):
        self.mu = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        if self.mu.ndim != 2 or not len(self.mu):
            raise ValueError(f"means of shape {tuple(self.mu.shape)}: pass (K, D), one row per component")
        K = self.mu.shape[0]
        sigma = torch.as_tensor(stds, dtype=torch.float64)
        if sigma.ndim > 1 or sigma.numel() not in (1, K):
            raise ValueError(f"stds of shape {tuple(sigma.shape)}: pass one std, or {K} (one per component)")
        self.sigma = sigma.reshape(-1).expand(K).clone()  # (K,) shared or per-component
        if not (torch.isfinite(self.sigma) & (self.sigma > 0)).all():
            raise ValueError("component stds must be finite and positive (v is singular at t = 0 otherwise)")
        pi = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if pi.shape != (K,):
            raise ValueError(f"weights of shape {tuple(pi.shape)}: pass {K}, one per component")
        if not (torch.isfinite(pi).all() and (pi >= 0).all() and pi.sum() > 0):
            raise ValueError(f"mixture weights must be finite, non-negative and not all 0: {pi.tolist()}")
        self.pi = pi / pi.sum()  # (K,)

    @classmethod
    def ring(cls, weights, stds):
        # K components on a circle whose radius makes every coordinate of x have variance 1:
        # for a symmetric ring Cov[x] = (R^2 / 2 + sum_k pi_k sigma_k^2) I.
        pi = torch.as_tensor(weights, dtype=torch.float64)
        pi = pi / pi.sum()
        sigma = torch.as_tensor(stds, dtype=torch.float64)
        spread = (pi * sigma**2).sum().item()
        if not spread < 1:  # the components alone would give each coordinate variance >= 1: no radius is left
            raise ValueError(f"sum of weight x std^2 is {spread:.3g}: a unit-variance ring needs it below 1; pass "
                             "smaller stds")
        R = math.sqrt(2 * (1 - spread))
        angle = 2 * math.pi * torch.arange(len(pi), dtype=torch.float64) / len(pi)
        return cls(R * torch.stack([torch.cos(angle), torch.sin(angle)], 1), sigma, pi)

    @classmethod
    def default(cls):
        # 8 components on a circle of radius 1.40, neighbours 1.07 apart, alternating narrow (std 0.1,
        # weight 0.15) and wide (std 0.2, weight 0.10). Mean 0, covariance I (the alternation keeps the
        # covariance isotropic). Unequal weights and widths make a test fail that mixes up pi_k or sigma_k;
        # narrow, well-separated modes make the trajectories visibly curved near t = 0.
        return cls.ring(weights=[0.15, 0.10] * 4, stds=[0.1, 0.2] * 4)

    def sample(self, n, generator=None):
        n = _count(n, generator)
        k = torch.multinomial(self.pi, n, replacement=True, generator=generator)
        x = self.mu[k] + self.sigma[k, None] * _randn(n, generator, self.mu.shape[1])
        return x.float()  # (n, D)

    def _components(self, z, t):
        # z (B, D) float64, t (B, 1) -> the per-component pieces at time t.
        mu, sigma, pi = (a.to(z.device) for a in (self.mu, self.sigma, self.pi))
        m = (1 - t)[:, :, None] * mu  # (B, K, D) mean of z_t given k
        s2 = (1 - t) ** 2 * sigma**2 + t**2  # (B, K) variance of z_t given k, >= min(sigma^2, 1) / 2 > 0
        d = z[:, None, :] - m  # (B, K, D)
        D = z.shape[1]
        log_pz_k = -0.5 * (d**2).sum(-1) / s2 - 0.5 * D * torch.log(2 * math.pi * s2)  # (B, K)
        return mu, sigma, s2, d, torch.log(pi) + log_pz_k  # last: log pi_k + log N(z; m_k, s_k^2 I)

    def v(self, z, t):
        """Exact marginal velocity E[e - x | z_t = z]; z (B, D), t scalar or (B,). Finite on [0, 1]."""
        z64 = z.to(torch.float64)
        t = self._time(t, z64)
        mu, sigma, s2, d, logits = self._components(z64, t)
        w = torch.softmax(logits, dim=-1)  # (B, K) responsibilities p(k | z), stable (logsumexp inside)
        # E[e - x | z, k] = (t - (1 - t) sigma_k^2) / s_k^2 (z - (1 - t) mu_k) - mu_k
        v_k = ((t - (1 - t) * sigma**2) / s2)[:, :, None] * d - mu  # (B, K, D)
        return (w[:, :, None] * v_k).sum(1).to(z.dtype)

    def log_prob(self, z, t=0.0):
        """log p_t(z) of the marginal at time t (t = 0: the data density). Returns (B,)."""
        z64 = z.to(torch.float64)
        logits = self._components(z64, self._time(t, z64))[-1]
        return torch.logsumexp(logits, dim=-1).to(z.dtype)

    def ode_solve(self, z, t, r, steps=DEFAULT_ODE_STEPS, trajectory=False):
        """Integrate dz/dtau = v(z, tau) from tau = t to tau = r with classic RK4.

        Each sample has its own grid tau_j = t + (r - t) j / steps, j = 0..steps, so a whole batch of
        different (t, r) is solved in one vectorised loop; rows with r = t do not move. Returns z_r in
        z's dtype, or with `trajectory=True` the whole path, shape (steps + 1, B, D).
        """
        self._check_steps(steps)
        z_j = z.to(torch.float64)
        t, r = self._time(t, z_j), self._time(r, z_j)  # (B, 1)
        h = (r - t) / steps  # (B, 1), negative when going towards the data
        path = [z_j]
        for j in range(steps):
            tau = t + (r - t) * (j / steps)  # not tau += h: no drift from accumulated rounding
            k1 = self.v(z_j, tau[:, 0])
            k2 = self.v(z_j + 0.5 * h * k1, (tau + 0.5 * h)[:, 0])
            k3 = self.v(z_j + 0.5 * h * k2, (tau + 0.5 * h)[:, 0])
            k4 = self.v(z_j + h * k3, (tau + h)[:, 0])
            z_j = z_j + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            path.append(z_j)
        return (torch.stack(path) if trajectory else z_j).to(z.dtype)


# ----------------------------------------------------------------------------------------------------
# 2b. The checkerboard with its exact marginal velocity
# x uniform on the 8 squares. Given x, z_t ~ N((1 - t) x, t^2 I); so, given z and a square, each coordinate of x is
# N(z / (1 - t), (t / (1 - t))^2) cut to the square's side: a truncated normal, whose mass and mean have closed
# forms (the normal CDF). E[x | z_t = z] mixes the squares' means by their masses, and v = (z - E[x | z_t]) / t.
# Off the squares v grows like 1/t as t -> 0 (such a point must reach a square in no time): the ODE steps evenly
# in s = sqrt(t), finer near the data, and a path to r = 0 stops at t = CHECKERBOARD_T_END and jumps to
# E[x | z_t] there, where the flow ends within O(t). In s, RK4 keeps its 4th order: 1-NFE endpoints from noise
# (t = 1 -> 0), 2000 points, against a 512-step solve: median distance 1.0e-5 / 6.0e-7 / 3.7e-8 and 99th percentile
# 2.2e-4 / 1.9e-5 / 1.1e-6 at 16 / 32 / 64 steps.
CHECKERBOARD_ODE_STEPS = 64
CHECKERBOARD_T_END = 1e-4


class Checkerboard(ExactFlow):
    """The data of `checkerboard` with its exact fields: v(z, t) in closed form for t in (0, 1], u by RK4."""

    def __init__(self):
        sq = torch.tensor(checkerboard_squares(), dtype=torch.float64)  # (8, 3): lower-left x, y and side
        self.lo, self.hi = sq[:, :2], sq[:, :2] + sq[:, 2:]  # (8, 2) corners

    def sample(self, n, generator=None):
        return checkerboard(n, generator)

    def posterior_mean(self, z, t):
        """E[x | z_t = z]: z (B, 2), t (B, 1) float64 in (0, 1]."""
        # Near t = 1 the closed form cancels (m = z / (1 - t) and s = t / (1 - t) grow without bound: 8e-8 off at
        # 1 - 1e-4, 0.14 at 1 - 1e-7): above 1 - 1e-4 it is scaled linearly in 1 - t to E[x] = 0 at t = 1 (the
        # board is symmetric about 0), which is E[x | z_t] to first order in 1 - t.
        tc = t.clamp(max=1 - 1e-4)
        return self._posterior_mean(z, tc) * ((1 - t) / (1 - tc))

    def _posterior_mean(self, z, t):
        t = t[:, :, None]  # (B, 1, 1)
        m, s = z[:, None, :] / (1 - t), t / (1 - t)  # x given z, before the cut: N(m, s^2) per coordinate
        a, b = (self.lo.to(z.device) - m) / s, (self.hi.to(z.device) - m) / s  # (B, 8, 2) standardised ends
        # Work on the side of 0 away from the mass, reflected (Phi(-x) = 1 - Phi(x)) so that [lo, hi] has
        # lo + hi <= 0: log(Phi(hi) - Phi(lo)) then never cancels.
        flip = a + b > 0
        lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
        log_hi = torch.special.log_ndtr(hi)
        log_mass = log_hi + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - log_hi))  # (B, 8, 2)
        # The truncated normal's mean is m + s d, d = (phi(lo) - phi(hi)) / (Phi(hi) - Phi(lo)) in that frame
        # (negated where reflected). Where hi <= 0 the whole side lies in the tail, and phi / mass there divides two
        # numbers of size exp(-hi^2 / 2) (z far off the board at small t: hi^2 / 2 up to ~1e15): in Mills ratios
        # M(x) = Phi(-x) / phi(x) = sqrt(pi / 2) erfcx(x / sqrt 2) the exponents cancel exactly:
        # d = -(1 - E) / (M(x) - M(y) E), x = -hi, y = -lo, E = phi(y) / phi(x) = exp(-(y - x)(y + x) / 2).
        log_phi = lambda q: -0.5 * q * q - 0.5 * math.log(2 * math.pi)
        direct = torch.exp(log_phi(lo) - log_mass) - torch.exp(log_phi(hi) - log_mass)  # hi > 0: no large exponent
        x, y = (-hi).clamp(min=0), -lo
        mills = lambda q: math.sqrt(math.pi / 2) * torch.special.erfcx(q / math.sqrt(2))
        log_E = -0.5 * (y - x) * (y + x)
        tail = torch.expm1(log_E) / (mills(x) - mills(y) * torch.exp(log_E))  # -(1 - E) / (M(x) - M(y) E)
        d = torch.where(hi > 0, direct, tail)
        mean = m + s * torch.where(flip, -d, d)
        mean = torch.minimum(torch.maximum(mean, self.lo.to(z.device)), self.hi.to(z.device))  # rounding only
        w = torch.softmax(log_mass.sum(2), dim=1)  # (B, 8) p(square | z): the squares have equal areas
        return (w[:, :, None] * mean).sum(1)

    def v(self, z, t):
        """Exact marginal velocity E[e - x | z_t = z] = (z - E[x | z_t = z]) / t; z (B, 2), t scalar or (B,) > 0."""
        z64 = z.to(torch.float64)
        t = self._time(t, z64)
        if not (t > 0).all():  # at t = 0, z is x: (z - E[x | z]) / t is 0 / 0 (and off the squares undefined)
            raise ValueError("the checkerboard's v needs t > 0 (at t = 0 it is 0 / 0); sample t in (0, 1]")
        return ((z64 - self.posterior_mean(z64, t)) / t).to(z.dtype)

    def ode_solve(self, z, t, r, steps=CHECKERBOARD_ODE_STEPS):
        """z_r from z_t along dz/dtau = v(z, tau): RK4 in s = sqrt(tau), dz/ds = 2 s v; rows with r = t stay."""
        self._check_steps(steps)
        z_j = z.to(torch.float64)
        t, r = self._time(t, z_j), self._time(r, z_j)  # (B, 1)
        jump = (r < CHECKERBOARD_T_END) & (r < t)  # these rows end straight from t = CHECKERBOARD_T_END (or t)
        t_end = torch.where(jump, t.clamp(max=CHECKERBOARD_T_END), r)
        s0, s1 = t.sqrt(), t_end.sqrt()
        h = (s1 - s0) / steps
        f = lambda z, s: 2 * s * self.v(z, (s * s)[:, 0])
        for j in range(steps):
            s = s0 + (s1 - s0) * (j / steps)
            k1 = f(z_j, s)
            k2 = f(z_j + 0.5 * h * k1, s + 0.5 * h)
            k3 = f(z_j + 0.5 * h * k2, s + 0.5 * h)
            k4 = f(z_j + h * k3, s + h)
            z_j = z_j + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        # below t_end the posterior has settled (E[x | z_tau] constant) and the path is straight on to it:
        # z_r = E + (r / t_end)(z - E); E itself at r = 0, and u = v where t and r are both below CHECKERBOARD_T_END
        end = self.posterior_mean(z_j, torch.where(jump, t_end, 1.0))
        end = end + torch.where(jump, r / t_end, 0.0) * (z_j - end)
        return torch.where(jump, end, z_j).to(z.dtype)


# ----------------------------------------------------------------------------------------------------
# 3. Distances between two sample sets a (n, D) and b (m, D)
# Both are cheap, work in any dimension, and need no density: they score samples from a 1-NFE sampler
# against data. Neither touches the global RNG, so calling them inside a training loop does not change
# the training run's random stream.


def _mean_dist(a, b, chunk_elems=2**22):
    # Mean of ||a_i - b_j|| over all pairs, in row chunks so that at most ~4M distances (32 MB) are
    # alive at a time: 10k x 10k points need 100M distances, 800 MB at once in float64.
    rows = max(1, chunk_elems // max(1, b.shape[0]))
    total = sum(torch.cdist(a[i : i + rows], b).sum() for i in range(0, a.shape[0], rows))
    return total.item() / (a.shape[0] * b.shape[0])


def energy_distance(a, b):
    """Energy distance 2 E||a - b|| - E||a - a'|| - E||b - b'|| (Szekely & Rizzo), plug-in estimate.

    The plug-in (V-statistic) form keeps the zero-distance pairs i = j in the within-set means: it is
    never negative, exactly 0 for identical inputs, and biased upwards by O(1/n) for two independent
    samples of one distribution (at n = 2000 on these unit-scale sets, 20 independent pairs each: median about
    0.001, 0.0004-0.0053 in all). It is zero only if the two distributions are equal, and grows like |shift|^2 for
    a small shift, |shift| for a large one.
    """
    a, b = _two_sets(a, b)
    return 2 * _mean_dist(a, b) - _mean_dist(a, a) - _mean_dist(b, b)


def _two_sets(a, b):  # both distances: two non-empty (n, D) sets of the same D, in float64
    if a.dim() != 2 or b.dim() != 2 or not len(a) or not len(b) or a.shape[1] != b.shape[1]:
        raise ValueError(f"sets of shapes {tuple(a.shape)}, {tuple(b.shape)}: pass two non-empty (n, D) sets")
    return a.to(torch.float64), b.to(torch.float64)


def _quantiles(s, n_q):
    # s (P, n) sorted along dim 1 -> (P, n_q) linear-interpolated quantiles at levels (i + 0.5) / n_q.
    pos = ((torch.arange(n_q, dtype=s.dtype, device=s.device) + 0.5) / n_q * s.shape[1] - 0.5).clamp(0, s.shape[1] - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=s.shape[1] - 1)
    frac = pos - lo
    return s[:, lo] * (1 - frac) + s[:, hi] * frac


def sliced_wasserstein(a, b, n_proj=256, generator=None):
    """Sliced 2-Wasserstein distance: sqrt of the mean over random directions w of W_2^2(w.a, w.b).

    In 1-D, W_2 compares sorted samples (quantile functions). Equal sizes compare the sorted values
    directly (exactly 0 for identical inputs); unequal sizes compare interpolated quantiles. The
    directions are drawn from `generator`, or from a fixed seed (0) when it is None, so that the same
    two sets always get the same score. Same units as the data: a shift by delta gives about
    |delta| / sqrt(D).
    """
    a, b = _two_sets(a, b)
    if not _is_count(n_proj):
        raise ValueError(f"n_proj={n_proj!r}: pass a whole number of directions, 1 or more")
    _check_generator(generator)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    w = torch.randn(n_proj, a.shape[1], generator=g, dtype=torch.float64)
    w = (w / w.norm(dim=1, keepdim=True)).to(a.device)  # (P, D) unit directions
    pa = torch.sort(w @ a.T, dim=1).values  # (P, n)
    pb = torch.sort(w @ b.T, dim=1).values  # (P, m)
    if pa.shape[1] != pb.shape[1]:
        n_q = max(pa.shape[1], pb.shape[1])
        pa, pb = _quantiles(pa, n_q), _quantiles(pb, n_q)
    return ((pa - pb) ** 2).mean().sqrt().item()
