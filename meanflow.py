"""
MeanFlow in one readable file: the loss, guidance in the target, the improved training, iMF, the samplers, and
the networks (DiT, the iMF network, a toy MLP), in the order a reader meets them.

Papers implemented here
- MeanFlow:          Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447.
- Improved training: Kim et al., "Understanding, Accelerating, and Improving MeanFlow Training",
                     CVPR 2026, arXiv 2511.19065 (DTD or MinSNR for v, progressive weight beta for u).
- iMF:               Geng et al., "Improved Mean Flows: On the Challenges of Fastforward Generative
                     Models", arXiv 2512.02012 (guidance as a network condition, v-loss reformulation).
- DTD:               Kim et al., "Denoising Task Difficulty-based Curriculum", ICLR 2025, arXiv 2403.10348.
- MinSNR:            Hang et al., "Efficient Diffusion Training via Min-SNR Weighting", ICCV 2023.

Conventions (fixed once; every function below uses them)
- data x, noise e ~ N(0, I), time t in [0, 1]: t = 1 is noise, t = 0 is data.
- path z_t = (1 - t) x + t e, conditional velocity v = e - x (constant along the path).
- average velocity u(z_t, t, r) = 1/(t - r) * integral_r^t v(z_tau, tau) dtau for r <= t (MeanFlow Eq. 3), so
  z_r = z_t - (t - r) u and u(z, t, t) = v(z, t). Arguments in the code's call order net(z, t, r) everywhere
  here (the papers write u(z_t, r, t): same function, r and t swapped in the argument list).
- MeanFlow identity (Eq. 6): u = v - (t - r) du/dt, with du/dt = v . d_z u + d_t u (r held fixed; Eq. 8),
  i.e. the JVP of u along the tangent (dz, dt, dr) = (v, 1, 0).
- every network is called as net(z, t, r, y=None) -> u, with t, r of shape (B,) and t >= r. Inside it
  embeds (t, t - r) (MeanFlow Table 1c), t raw in [0, 1]; the iMF network embeds t - r only (official).
  y = num_classes means "no label".

Map: helpers and jvp() -> recipes -> MeanFlow: (t, r) sampling -> the loss (JVP target, adaptive weight) ->
guidance in the target -> improved training (beta, MinSNR, DTD) -> iMF -> samplers -> networks: DiT (+ in-context
variant), the iMF network, the toy MLP, size and guidance tables -> APPENDIX (speed: tangent rules for jvp(); last,
torch's own rules loaded quietly. Delete it and everything computes the same, slower).

Run: python train.py (2-D toy, CPU, about a minute) · jupyter notebook notebooks/01_mean_velocity.ipynb ·
     torchrun --nproc_per_node=8 train.py --data imagenet-latents --model XL/2 --recipe improved-dtd
"""
import math
from functools import partial

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _module(net):  # the network itself, also inside DistributedDataParallel (which does not forward attributes)
    return getattr(net, "module", net)


def _rows(y, a, b):  # rows a:b of the labels, or None without labels
    return None if y is None else y[a:b]


def bcast(a, x):  # (B,) -> (B, 1, ..., 1): a per-sample scalar that broadcasts against x
    return a.view(-1, *([1] * (x.dim() - 1)))


def _at_least_fp32(x):
    return torch.promote_types(x.dtype, torch.float32)


def null_labels(x, num_classes):  # (B,) labels all num_classes: the "no label" class of classifier-free guidance
    return torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)


def guidance_scalars(t, omega=None, t_min=None, t_max=None):
    """iMF's guidance conditions as (B,) scalars: 1 - 1/omega (omega in [1, inf) -> [0, 1)), t_min, t_max.
    Missing ones default to no guidance: omega = 1 on [0, 1]."""
    ones = torch.ones_like(t)
    return [1 - 1 / (ones if omega is None else omega), 0 * t if t_min is None else t_min,
            ones if t_max is None else t_max]


def sq_err(a, b):  # per-sample squared error summed (not averaged) over the data dimensions: (B, ...) -> (B,)
    return ((a.to(_at_least_fp32(a)) - b.to(_at_least_fp32(a))) ** 2).flatten(1).sum(1)


@torch.compiler.disable  # Dynamo does not trace dual tensors under a TorchFunctionMode: this part runs eagerly
def jvp(f, primals, tangents):
    """(f(*primals), the derivative of f at primals along tangents) in one forward-mode pass.

    Like torch.func.jvp, with plain dual tensors. f is written in plain PyTorch and runs under JVP_RULES: below,
    PyTorch's own forward-mode AD; with the APPENDIX, cheaper tangent rules for the costly ops, which compute the
    tangent under no_grad (PyTorch's own rules also record the tangent ops for backward, which holds memory; the loss
    never differentiates the tangent either way: it detaches the target). f may return a tensor or a tuple."""
    with fwAD.dual_level(), JVP_RULES():
        out = f(*[fwAD.make_dual(p, d) for p, d in zip(primals, tangents)])
        pairs = [fwAD.unpack_dual(o) for o in (out if isinstance(out, tuple) else (out,))]
        primal_out, tangent_out = tuple(p.primal for p in pairs), tuple(p.tangent for p in pairs)
    return (primal_out, tangent_out) if isinstance(out, tuple) else (primal_out[0], tangent_out[0])


# F.scaled_dot_product_attention has no forward-mode rule (NotImplementedError): under jvp() it runs as math
# attention, S = q k^T / sqrt(d), P = softmax(S), o = P v, which forward-mode AD differentiates.
def _flat(x):  # (B, H, N, d) -> (B*H, N, d): bmm on 3-D operands is ~2x faster than matmul on 4-D views (CPU)
    return x.reshape(-1, *x.shape[-2:])


def _softmax_scores(q3, k3):
    """P = softmax(q k^T / sqrt(d)) of (B*H, N, d) inputs as (B*H, N, N), in fp32 even under bf16 autocast
    (the tangent subtracts two nearly equal terms), and the scaled queries q / sqrt(d)."""
    qs = q3 * q3.shape[-1] ** -0.5  # scale the N x d operand, not the N x N product
    S = torch.bmm(qs, k3.transpose(1, 2))
    return torch.softmax(S.to(_at_least_fp32(S)), dim=-1), qs


def math_attention(q, k, v):  # plain ops: differentiable by every mode of autograd, but slow and memory-hungry
    P, _ = _softmax_scores(_flat(q), _flat(k))
    return torch.bmm(P.to(v.dtype), _flat(v)).view(v.shape)


class StockRules(TorchFunctionMode):
    """PyTorch's own forward-mode AD inside jvp(), except attention: SDPA has no forward-mode rule, so its
    math form stands in. (The reference the tangent rules are measured against: benchmark.py RECIPE@stock.)"""

    rules = {F.scaled_dot_product_attention: lambda func, q, k, v: math_attention(q, k, v)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule, kwargs = self.rules.get(func), kwargs or {}
        out = rule(func, *args, **kwargs) if rule is not None else NotImplemented  # NotImplemented: not this case
        return func(*args, **kwargs) if out is NotImplemented else out


JVP_RULES = StockRules  # what jvp() runs under; the APPENDIX sets its TangentRules (benchmark.py swaps to compare)


# ==============================================================================================
# The method. Recipes: every knob at its paper's value (or ours, marked [ours]); MeanFlow(recipe=..., **overrides).
# ==============================================================================================
_meanflow = dict(
    time_sampler="logit_normal",  # or "uniform"
    P_mean=-0.4, P_std=1.0,  # logit-normal for t and r (ImageNet; the CIFAR code uses -2.0, 2.0)
    ratio_r_neq_t=0.25,  # share of the batch with r != t (MeanFlow Table 1a: 25% best). The JAX code's
    #                      data_proportion=0.75 is the r = t share; py-meanflow's ratio=0.75 is r != t.
    p=1.0, c=0.01,  # adaptive weight l / sg((l + c)^p)  (ImageNet; CIFAR code: p=0.75, c=1e-3)
    omega=1.0, kappa=0.0, t_lo=0.0, t_hi=1.0,  # guidance in the target; per size see paper_guidance
    class_dropout=0.1,  # labels replaced by the null class, target v instead of v_g
    beta_k=None,  # improved training: progressive u-weight beta(delta_t, s), s = 1 - progress^k (None: off)
    minsnr_gamma=None,  # improved training: MinSNR-gamma weight alpha(t) on the r = t rows (None: off)
    # improved training: the DTD paper's curriculum on the r = t rows, as Kim et al.'s is not public (0 stages: off);
    # its pacing and dtd_share [ours]: dtd_step.
    dtd_stages=0, dtd_patience=200, dtd_share=0.25, dtd_window=25,
    imf=False, omega_max=8.0, omega_beta=1.0,  # iMF: omega ~ p(omega) ~ omega^-beta on [1, omega_max]
)
RECIPES = {
    "meanflow": _meanflow,
    "improved-dtd": {**_meanflow, "beta_k": 1.0, "dtd_stages": 20},  # Kim et al.: best on L/2, XL/2
    "improved-minsnr": {**_meanflow, "beta_k": 1.0, "minsnr_gamma": 5.0},  # Kim et al.: best on B/4
    "imf": {**_meanflow, "ratio_r_neq_t": 0.5, "imf": True},  # Geng et al. (iMF)
}

# What each numeric knob may be: MeanFlow() refuses anything else, naming the knob (train.py's --set checks the same).
_pos, _unit, _count = (lambda v: v > 0, "> 0"), (lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: v >= 1, "1 or more")
_steps = lambda lo: (lambda v: lo <= v < 2**31, f"{lo} or more, below 2^31")  # counts (larger overflow in torch)
KNOB_RANGES = dict(P_mean=(lambda v: True, ""), P_std=_pos, ratio_r_neq_t=_unit, p=(lambda v: v >= 0, "0 or more"),
                   c=_pos, omega=_pos, kappa=(lambda v: 0 <= v < 1, "in [0, 1)"), t_lo=_unit, t_hi=_unit,
                   class_dropout=_unit, beta_k=_pos, minsnr_gamma=_pos, dtd_stages=_steps(0), dtd_patience=_steps(1),
                   dtd_share=_unit, dtd_window=_steps(1), omega_max=_count, omega_beta=(lambda v: True, ""))
COUNT_KNOBS, OPTIONAL_KNOBS = ("dtd_stages", "dtd_patience", "dtd_window"), ("beta_k", "minsnr_gamma")  # None: off


def _checked_options(recipe, overrides):
    """RECIPES[recipe] with the overrides, every knob checked: a bad one is one ValueError that names it."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if set(overrides) - set(RECIPES[recipe]):
        raise ValueError(f"unknown MeanFlow option(s) {sorted(set(overrides) - set(RECIPES[recipe]))}; "
                         f"the knobs are {sorted(RECIPES[recipe])}")
    o = {**RECIPES[recipe], **overrides}
    for k, (ok, must) in KNOB_RANGES.items():
        v, whole = o[k], k in COUNT_KNOBS
        if v is None and k in OPTIONAL_KNOBS:
            continue
        number = isinstance(v, int if whole else (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not (number and ok(v)):
            raise ValueError(f"MeanFlow option {k}={v!r}: pass a finite {'integer' if whole else 'number'} {must}"
                             .rstrip())
    if o["t_lo"] > o["t_hi"]:
        raise ValueError(f"the guidance interval [t_lo, t_hi] = [{o['t_lo']}, {o['t_hi']}] needs t_lo <= t_hi")
    if o["time_sampler"] not in ("logit_normal", "uniform") or not isinstance(o["imf"], bool):
        raise ValueError(f"time_sampler={o['time_sampler']!r}, imf={o['imf']!r}: pass 'logit_normal' or 'uniform', and "
                         "True or False")
    if o["imf"] and (o["beta_k"] or o["minsnr_gamma"] or o["dtd_stages"]):
        raise ValueError("iMF has its own loss; beta, MinSNR and DTD weight the MeanFlow loss only")
    if o["dtd_stages"] and o["minsnr_gamma"]:  # alpha's mean-1 normalisation assumes every t of the r = t rows
        raise ValueError("DTD and MinSNR are two ways to weight the v-loss (Kim et al.): choose one")
    wrong = overrides.keys() & ({"omega", "kappa", "t_lo", "t_hi"} if o["imf"] else {"omega_max", "omega_beta"})
    if wrong:  # accepted, then never read: refused
        raise ValueError(f"{sorted(wrong)} are not options of recipe {recipe!r}: " + (
            "iMF takes guidance at sampling (sample(omega=..., t_min=..., t_max=...))" if o["imf"] else
            "omega_max and omega_beta are iMF's (recipe 'imf')"))
    power = max(1.0, 1 - o["omega_beta"])  # sample_imf_conditions raises omega_max to this power (at most) in fp32
    if o["imf"] and power * math.log(o["omega_max"]) >= math.log(torch.finfo(torch.float32).max):
        raise ValueError(f"omega_max={o['omega_max']!r} with omega_beta={o['omega_beta']!r}: omega_max ** {power:g} "
                         "overflows float32 in omega's sampler; pass a smaller omega_max or an omega_beta nearer 1")
    return o


# Low-dimensional data (the 2-D toys): p = 0.5 instead of 1 [ours, 3 seeds against toy_data's exact fields and on the
# checkerboard; README "The 2-D regime" has the numbers]. With 2 dimensions the per-sample error is dominated by the
# spread of e - x, and l / (l + c)^p discounts large errors: p = 1 all but ignores them (v is never learned), p = 0
# learns v best, p = 0.5 learns the large-interval u that one step uses best. The cost: with 2 dimensions the weight
# also moves the minimiser (towards a median of the targets), so long runs plateau; in high dimensions the per-sample
# error concentrates, the weight depends on (t, r) alone and the minimiser stays E[. | z_t] [our reading]. The rest
# stays the paper's (other r != t shares, P_std, uniform t and P_mean 0 were no better; P_mean -1.2 is faster on the
# checkerboard, slower on the mixture's 1-NFE map). train.py, the notebooks and the tests apply it to 2-D data.
TOY_OVERRIDES = dict(p=0.5)


class MeanFlow:
    """The method: (t, r) sampling, the MeanFlow loss with its weights, and the samplers.

        method = MeanFlow(recipe="improved-dtd", P_mean=-0.4)     # any knob of RECIPES by keyword
        loss, logs = method.loss(net, x, y, progress=step / total_steps)  # also advances DTD
        x0 = method.sample(net, e, y, steps=1)
    """

    def __init__(self, recipe="meanflow", **overrides):
        self.recipe = recipe
        self.__dict__.update(_checked_options(recipe, overrides))
        self.lam = 1.0 / (1.0 - self._expect(lambda t: t, lambda U: 4 * U - 2))  # 1 / E[1 - (t - r)]: mean-1 beta
        self.alpha_mean = self._expect(self._alpha_raw, lambda U: 2 * U) if self.minsnr_gamma else 1.0  # t: max of two
        self.dtd_stage = 0
        self._dtd_reset()

    @property
    def net_kwargs(self):
        """Network options this recipe needs: iMF conditions on omega and its interval, in context."""
        return dict(in_context=True, guidance_cond=True, v_head=True) if self.imf else {}

    # ---- (t, r) sampling: logit-normal times, a share of r != t rows (MeanFlow Table 1a) --------
    def quantile(self, U):
        """Inverse CDF of one time draw at U in (0, 1): logit-normal sigmoid(P_mean + P_std * N(0,1)), or uniform."""
        if self.time_sampler == "uniform":
            return U
        return torch.sigmoid(self.P_mean + self.P_std * torch.special.ndtri(U))

    def _expect(self, g, weight, n=200_000):
        """Integral of g(quantile(U)) weight(U) over U in (0, 1) (midpoint rule, deterministic): an expectation
        when weight is a density (max of two draws: 2U), or E[max] - E[min] with 4U - 2 = 2U - 2(1 - U)."""
        U = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return (g(self.quantile(U)) * weight(U)).mean().item()

    def sample_t_r(self, B, device=None):
        """t, r: (B,). Two draws sorted (t = max, r = min); the first round(ratio_r_neq_t * B) rows keep
        r != t, the rest get r = t. The loss relies on this order: the forward-mode pass takes rows [:n]
        without a host sync, and class dropout (drop_labels) takes the last rows, so only r = t rows lose
        their label (as the official JAX code, which puts both at the front)."""
        U = torch.rand(2, B, device=device, dtype=torch.float64)
        U_hi, U_lo = U.max(0).values, U.min(0).values  # quantile is monotone: same as sorting t, r
        fm = torch.arange(B, device=device) >= round(self.ratio_r_neq_t * B)  # r = t rows
        if self.dtd_stages:
            # DTD: the r = t rows draw t only from the unlocked, highest-noise clusters. Clusters have
            # equal mass under the max-of-two law (CDF U^2), so stage j keeps the top (j + 1)/N of that
            # mass: q ~ Uniform[1 - (j + 1)/N, 1], U = sqrt(q) [ours].
            q = 1 - torch.rand(B, device=device, dtype=torch.float64) * (self.dtd_stage + 1) / self.dtd_stages
            U_hi = torch.where(fm, q.sqrt(), U_hi)
        t, r = self.quantile(U_hi).float(), self.quantile(U_lo).float()
        return t, torch.where(fm, t, r)

    # ---- the MeanFlow loss (MeanFlow Eqs. 9-11): u_tgt = v - (t - r) (v . d_z u + d_t u), error
    # |u - sg(u_tgt)|^2 with the adaptive weight 1 / sg((l + c)^p) (Sec. 4.3); tangent (v, 1, 0): Table 1b ----
    def adaptive(self, l):
        """l / sg((l + c)^p) per sample. Its gradient in u is 2 (u - u_tgt) / (l + c)^p: p = 0.5 gives every sample
        about the same gradient size (a norm, like the Pseudo-Huber loss), p = 1 a weighted loss of about 1 each
        (a gradient ~ 1 / |u - u_tgt|, like log l), p = 0 the plain squared error."""
        return l / (l.detach() + self.c) ** self.p

    def loss(self, net, x, y=None, progress=0.0, t=None, r=None, e=None):
        """(scalar loss, dict of detached logs) for data x (B, ...), labels y (B,) or None, progress = step / steps.
        t, r, e are sampled unless given; net may be wrapped in DistributedDataParallel. logs: loss, v_loss / u_loss
        (mean squared error per element on the r = t / r != t rows), beta, dtd_stage. A call with gradients is a
        training step: it advances DTD. du/dt enters only as (t - r) du/dt, so the forward-mode pass runs on the
        r != t rows [:n] only (the same loss and gradients as one pass over the batch, tested)."""
        B = x.shape[0]
        if B == 0:  # (the samplers take an empty batch: a train.py process may have no samples to draw)
            raise ValueError("x has no rows: the loss is a mean over a batch of 1 or more")
        self._check_inputs(net, x, y, progress, t, r, e)
        if t is None:
            t, r = self.sample_t_r(B, x.device)
            n = round(self.ratio_r_neq_t * B)  # sample_t_r puts the r != t rows first: no host sync
        else:
            n, (x, y, e, t, r) = self._r_neq_t_first(x, y, e, t, r)
        e = torch.randn_like(x) if e is None else e
        t_, r_ = bcast(t, x), bcast(r, x)
        z_t = (1 - t_) * x + t_ * e
        v = e - x
        y_in, drop = (None, None) if y is None else self.drop_labels(y, n, _module(net).num_classes)
        if self.imf:
            return self.imf_loss(net, x, y, y_in, drop, z_t, v, t, r, n)
        # The r = t rows: a plain forward; the target is v_g, their loss flow matching.
        u_fm = net(z_t[n:], t[n:], t[n:], _rows(y_in, n, B)) if n < B else None
        v_g = self.guided_velocity(net, z_t, t, v, y, drop, n, u_fm)
        parts = [(u_fm, v_g[n:])] if n < B else []
        if n > 0:
            # The r != t rows: one forward-mode pass gives u and du/dt = v_g . d_z u + d_t u, tangent (v_g, 1, 0)
            # in (z, t, r) order (dz/dt = v_g, dt/dt = 1, dr/dt = 0); wrong tangents cost 2-5x in FID (Table 1b).
            # Under bf16 autocast it runs in bf16: du/dt has about u's error, u_tgt far less (README, Notes on the JVP).
            u, dudt = jvp(lambda z, t, r: net(z, t, r, _rows(y_in, 0, n)), (z_t[:n], t[:n], r[:n]),
                          (v_g[:n], torch.ones_like(t[:n]), torch.zeros_like(r[:n])))
            # Stop-gradient on the target: it depends on the network itself; differentiating through it
            # would chase a moving target (and costs a second-order pass). t - r clipped to [0, 1] as the official code.
            parts.insert(0, (u, (v_g[:n] - (t_ - r_)[:n].clamp(0, 1) * dudt).detach()))
        # Sum (not mean) over data dimensions, as the official code: the papers' c and p are set for this sum.
        l = torch.cat([sq_err(u, u_tgt) for u, u_tgt in parts])  # (B,), rows in the order of t, r
        w = self.weights(t, r, progress)
        loss = (w * self.adaptive(l)).mean()
        logs = self._logs(loss, l, t, r, progress, x)
        self.dtd_step(logs["v_loss"], progress)  # the curriculum advances here: no call a training loop can forget
        return loss, logs

    @staticmethod
    def _r_neq_t_first(x, y, e, t, r):
        """Given t, r: the rows reordered so that the r != t ones come first (the loss is a mean, the order is
        free; one host sync), and their count n."""
        order = torch.argsort((t == r).int(), stable=True)
        return int((t != r).sum()), tuple(None if a is None else a[order] for a in (x, y, e, t, r))

    def _logs(self, loss, l, t, r, progress, x):
        # masked means without boolean indexing: no host-device sync (0/0 = nan)
        fm = (t == r).float()
        per_elem = l.detach() / x[0].numel()
        logs = dict(loss=loss.detach(), v_loss=(per_elem * fm).sum() / fm.sum(),
                    u_loss=(per_elem * (1 - fm)).sum() / (1 - fm).sum(), dtd_stage=self.dtd_stage)
        if self.beta_k is not None:
            logs["beta"] = (self.beta(t - r, progress) * (1 - fm)).sum() / (1 - fm).sum()
        return logs

    # ---- classifier-free guidance inside the target: v replaced by v_g (MeanFlow Eqs. 13-19; kappa: Sec. B.1) --
    def drop_labels(self, y, n, num_classes):
        """Class dropout as the official code: k ~ Binomial(B, class_dropout) rows get the null label, and they
        are r = t rows. Ours are the last k rows (rows [:n] have r != t; k is capped at B - n, so with no r = t
        rows no label is dropped). Rates: ~13% of the r = t rows in MeanFlow (0.1 / 0.75), 20% in iMF (0.1 / 0.5),
        none of the r != t rows. Returns the labels to use and the (B,) dropped mask; no host sync."""
        B = y.shape[0]
        k = (torch.rand(B, device=y.device) < self.class_dropout).sum()  # Binomial(B, p), a 0-d tensor
        drop = torch.arange(B, device=y.device) >= (B - k).clamp(min=n)
        return torch.where(drop, num_classes, y), drop

    def guided_velocity(self, net, z_t, t, v, y, drop, n, u_fm=None):
        """v_g = omega v + (1 - omega - kappa) u(z_t, t, t | null) + kappa u(z_t, t, t | y) on the rows inside
        [t_lo, t_hi] whose label was kept, v on the others. Rows [:n] have r != t, rows [n:] r = t; drop from
        drop_labels. The network terms are no-grad forwards at r = t on the rows that use them (one host sync to
        find them); u_fm (B - n rows), the r = t rows' own u(z_t, t, t | y), gives their kappa term without
        another pass (a dropped row's u_fm is unconditional, but dropped rows take v)."""
        if y is None or (self.omega == 1.0 and self.kappa == 0.0):
            return v
        null = null_labels(y, _module(net).num_classes)
        used = ((t >= self.t_lo) & (t <= self.t_hi) & ~drop).nonzero().squeeze(1)  # (m,)
        if used.numel() == 0:
            return v
        cond = used[:0]  # rows whose kappa term needs a forward of its own: with u_fm, the r != t ones only
        if self.kappa:  # (used[used < n] is a second host sync, right after the first)
            cond = used if u_fm is None else used[used < n]
        rows = torch.cat([used, cond])
        with torch.no_grad():  # both guidance terms in one batched forward, at r = t, no gradient
            out = net(z_t[rows], t[rows], t[rows], torch.cat([null[used], y[cond]])).to(v.dtype)
        u_null, u_cond = out[:used.numel()], torch.zeros_like(v)
        if self.kappa:
            if u_fm is not None:
                u_cond[n:] = u_fm.detach()
            u_cond[cond] = out[used.numel():]
        v_g = v.clone()
        v_g[used] = self.omega * v[used] + (1 - self.omega - self.kappa) * u_null + self.kappa * u_cond[used]
        return v_g

    # ---- improved training (Kim et al.): beta(t - r, s) on u, MinSNR alpha(t) or the DTD curriculum on v;
    # weights applied after the adaptive normalisation -------------------------------------------
    def beta(self, delta_t, progress):
        """beta(delta_t, s) = (1 - s) + s * lam * (1 - delta_t), delta_t = t - r, s = 1 - progress^k: favours small
        intervals early (they build v, observation O2), mean 1 at progress 0 and exactly 1 at progress 1."""
        s = 1 - progress**self.beta_k
        return (1 - s) + s * self.lam * (1 - delta_t)

    def _alpha_raw(self, t):
        # MinSNR-gamma moved to the velocity loss [ours]: SNR = ((1 - t)/t)^2 and |x_hat - x|^2 =
        # t^2 |v_hat - v|^2, so alpha(t) = t^2 min(SNR, gamma) = min((1 - t)^2, gamma t^2).
        return torch.minimum((1 - t) ** 2, self.minsnr_gamma * t**2)

    def weights(self, t, r, progress):
        """w_i: beta(t - r, s) on r != t rows, alpha(t) on r = t rows (1 where a component is off)."""
        fm, w = t == r, torch.ones_like(t)
        if self.beta_k is not None:
            w = torch.where(fm, w, self.beta(t - r, progress))
        if self.minsnr_gamma:
            w = torch.where(fm, self._alpha_raw(t) / self.alpha_mean, w)
        return w

    # ---- DTD: the curriculum advances inside loss(), from the v-loss it computes ------------------
    # Pacing [ours, our reading of the DTD paper]: a stage ends when its v-loss has converged (the mean of the last
    # dtd_window steps not below the window before by 2 standard errors), at the latest after dtd_patience = tau
    # steps (the paper's "maximum patience"; read as "steps without a new best" it never ends while the loss
    # improves) or at progress (j + 1) * dtd_share / (N - 1) for stage j. dtd_share = 0.25 [ours]: the curriculum
    # takes at most a quarter of a run at any run length and leaves each of the 19 unlocks up to 1.3% of it (tau
    # alone: 19 x 200 = 3800 steps, more than a whole toy run; 0: no deadline). One host sync and one all-reduce of
    # 3 numbers a window: every process decides on the same global values at the same step.
    @torch.compiler.disable  # Python state and a host sync: never traced
    def dtd_step(self, v_loss, progress=0.0):
        """One training step of the curriculum; loss() calls it (calls under torch.no_grad() do not count).
        v_loss: this process's 0-d mean squared error on its r = t rows (nan if it had none)."""
        N = self.dtd_stages
        if not N or self.dtd_stage >= N - 1 or not torch.is_grad_enabled():
            return
        v = v_loss.detach().float().reshape(())
        ok = torch.isfinite(v)
        acc = self._dtd_acc.to(v.device)  # window sums: v, v^2, count (on the device: no sync per step)
        self._dtd_acc = acc + torch.stack([torch.where(ok, v, 0.0), torch.where(ok, v * v, 0.0), ok.float()])
        self._dtd_steps += 1
        done = self._dtd_steps >= self.dtd_patience
        if self.dtd_share and progress * (N - 1) >= (self.dtd_stage + 1) * self.dtd_share:
            done = True
        if not done and self._dtd_steps % self.dtd_window == 0:
            sums = self._dtd_acc.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(sums)  # sums over processes and steps of the window
            S, Q, n = sums.tolist()
            self._dtd_acc = torch.zeros_like(sums)
            if n > 0:
                mean, var = S / n, max(Q / n - (S / n) ** 2, 0.0)
                se2 = var / n  # squared standard error of the window mean
                if self._dtd_prev is not None:
                    prev_mean, prev_se2 = self._dtd_prev
                    done = mean > prev_mean - 2 * math.sqrt(se2 + prev_se2)  # no significant improvement
                self._dtd_prev = (mean, se2)
        if done:
            stage = self.dtd_stage + 1
            if self.dtd_share:  # a deadline missed by more than a stage (e.g. a resumed run): catch up at once
                stage = max(stage, min(N - 1, math.floor(progress * (N - 1) / self.dtd_share)))
            self.dtd_stage = min(N - 1, stage)
            self._dtd_reset()

    def _dtd_reset(self):
        self._dtd_steps, self._dtd_prev, self._dtd_acc = 0, None, torch.zeros(3)

    # ---- iMF (Geng et al.): V = u + (t - r) sg(du/dt) along the network's own v, regressed on the guided v
    # (iMF Sec. 4.1, Eqs. 9-12, Alg. 1); guidance (omega, [t_min, t_max]) as a network condition ---------
    def sample_imf_conditions(self, t, r):
        """omega ~ p(omega) ~ omega^-beta on [1, omega_max] (inverse CDF); interval t_min ~ U[0, 0.5],
        t_max ~ U[0.5, 1], except [0, 1] on the r = t rows (as the official code)."""
        B, dev, fm = t.shape[0], t.device, t == r
        U = torch.rand(B, device=dev)
        if self.omega_beta == 1.0:
            omega = self.omega_max**U
        else:
            a = 1 - self.omega_beta
            omega = (1 + U * (self.omega_max**a - 1)) ** (1 / a)
        t_min = torch.where(fm, 0.0, 0.5 * torch.rand(B, device=dev))
        t_max = torch.where(fm, 1.0, 0.5 + 0.5 * torch.rand(B, device=dev))
        return omega, t_min, t_max

    def imf_loss(self, net, x, y, y_in, drop, z_t, v, t, r, n):
        """Rows [:n] have r != t and take the forward-mode pass; rows [n:] have r = t and a plain forward."""
        B = x.shape[0]
        omega, t_min, t_max = self.sample_imf_conditions(t, r)
        ones, zeros = torch.ones_like(t), torch.zeros_like(t)
        inside = (t >= t_min) & (t <= t_max)  # always on r = t rows: their interval is [0, 1]
        omega_m = torch.where(inside, omega, 1.0)  # outside [t_min, t_max] guidance is off
        conds = lambda a, b: dict(y=_rows(y_in, a, b), omega=omega[a:b], t_min=t_min[a:b], t_max=t_max[a:b])
        # The r = t rows: a plain forward. Their conditions are (omega, [0, 1]), so their v-head is also the
        # conditional v of their guided target (rows with a kept label).
        u_fm, v_fm = net(z_t[n:], t[n:], t[n:], **conds(n, B), return_v=True) if n < B else (None, None)
        v_c, v_g = self.imf_guided_velocity(net, z_t, t, v, y, drop, n, inside, omega_m, v_fm)
        V, v_head = ([u_fm], [v_fm]) if n < B else ([], [])
        if n > 0:
            # The tangent is the network's own (guided-condition) velocity v_c, not e - x: then
            # V = u + (t - r) sg(du/dt) depends on z_t alone and the loss is a regression on v.
            (u, v_mf), (dudt, _) = jvp(lambda z, t, r: net(z, t, r, **conds(0, n), return_v=True),
                                       (z_t[:n], t[:n], r[:n]), (v_c.to(z_t.dtype), ones[:n], zeros[:n]))
            V.insert(0, u + bcast(t[:n] - r[:n], u) * dudt.detach())  # compound prediction of v
            v_head.insert(0, v_mf)
        V, v_head = torch.cat(V), torch.cat(v_head)
        l_u, l_v = sq_err(V, v_g), sq_err(v_head, v_g)  # compound u-prediction and the auxiliary v-head
        loss = (self.adaptive(l_u) + self.adaptive(l_v)).mean()
        return loss, self._logs(loss, l_u, t, r, 0.0, x)

    @torch.no_grad()
    def imf_guided_velocity(self, net, z_t, t, v, y, drop, n, inside, omega_m, v_fm):
        """The network's own v at r = t from its v-head, no gradient: v_c, conditional at each row's omega_m on the
        interval [0, 1], for the r != t rows [:n] (their tangent); and the guided target v_g = v + (1 - 1/omega_m)
        (v_c - v_u) on the rows inside their interval whose label was kept (v_u: null label, omega 1), v on the
        others. The r = t rows' v_c is their own v-head output v_fm (their conditions are (omega, [0, 1]))."""
        ones, zeros = torch.ones_like(t), torch.zeros_like(t)
        if y is None:  # unconditional: no guidance; v_c for the tangent only
            return (net(z_t[:n], t[:n], t[:n], None, ones[:n], zeros[:n], ones[:n], return_v="only") if n > 0
                    else None), v
        null = null_labels(y, _module(net).num_classes)
        used = (inside & ~drop).nonzero().squeeze(1)  # rows with guidance (one host sync)
        rows = torch.cat([torch.arange(n, device=t.device), used])  # v_c of the r != t rows, v_u of the used rows
        labels, omegas = torch.cat([y[:n], null[used]]), torch.cat([omega_m[:n], ones[used]])
        out = v[:0] if rows.numel() == 0 else net(z_t[rows], t[rows], t[rows], labels, omegas, zeros[rows],
                                                  ones[rows], return_v="only").to(v.dtype)
        v_c, v_u = out[:n], out[n:]  # (n, ...), (len(used), ...)
        v_c_all = v_c if v_fm is None else torch.cat([v_c, v_fm.detach().to(v.dtype)])
        v_g = v.clone()
        v_g[used] = v[used] + bcast(1 - 1 / omega_m[used], v_u) * (v_c_all[used] - v_u)
        return v_c, v_g

    # ---- samplers: z_r = z_t - (t - r) u(z_t, t, r) (MeanFlow Eq. 12, Alg. 2), one step or a few ----------
    @torch.no_grad()
    def sample(self, net, e, y=None, steps=1, omega=1.0, t_min=0.0, t_max=1.0):
        """k-NFE MeanFlow sampling on a uniform grid 1 -> 0: z_r = z_t - (t - r) u(z_t, t, r).
        Guidance needs no extra pass: MeanFlow bakes it into u, iMF takes omega as a condition."""
        cond = self._conditions(net, e, y, omega, t_min, t_max)
        return self._walk(e, steps, lambda z, t, r: net(z, t, r, y, **cond))

    @torch.no_grad()
    def sample_euler(self, net, e, y=None, steps=32, omega=1.0, t_min=0.0, t_max=1.0):
        """Many-step Euler with the instantaneous velocity read out of the network: u(z, t, t)
        (iMF: its v-head). The improved-training paper's probe of how well v is learned."""
        cond = self._conditions(net, e, y, omega, t_min, t_max)
        head = dict(return_v="only") if self.imf else {}
        return self._walk(e, steps, lambda z, t, r: net(z, t, t, y, **cond, **head))

    @staticmethod
    def _walk(e, steps, velocity):
        """z_r = z_t - (t - r) * velocity(z_t, t, r) over a uniform grid from t = 1 (noise) to 0 (data)."""
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps={steps!r}: pass an integer number of network evaluations, 1 or more")
        z, grid = e, torch.linspace(1.0, 0.0, steps + 1, device=e.device)
        for t, r in zip(grid[:-1], grid[1:]):
            z = z - (t - r) * velocity(z, t.expand(e.shape[0]), r.expand(e.shape[0])).to(z.dtype)
        return z

    # ---- input checks (one clear line, not a shape error deep inside the network) and checkpointing ----------
    def _check_inputs(self, net, x, y, progress=0.0, t=None, r=None, e=None):
        m, B = _module(net), x.shape[0]  # a network that does not say (a user's own) is taken at its word
        if self.imf and not (getattr(m, "guidance_cond", True) and getattr(m, "v_head", True)):
            raise ValueError("recipe 'imf' needs a network with guidance conditions and a v-head: one of iMF_models, "
                             "or a DiT or MLP built with **MeanFlow('imf').net_kwargs")
        K = getattr(m, "num_classes", 0)  # labels need it: num_classes is also the null label
        if y is not None and (K == 0 or y.shape != (B,) or y.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"labels y {tuple(y.shape)} of {y.dtype} for x {tuple(x.shape)}: integers, one per row, "
                             "and a network with classes" + " (this one: num_classes=0 or none)" * (K == 0))
        if not x.is_floating_point():
            raise ValueError(f"x (or e) of {x.dtype}: pass floating-point data (e.g. x.float())")
        if not 0 <= progress <= 1:
            raise ValueError(f"progress={progress}: pass step / total_steps, in [0, 1]")
        if (t is None) != (r is None) or (e is not None and e.shape != x.shape):
            raise ValueError("give t and r together (or neither), and e of x's shape")
        if t is not None and not (t.shape == r.shape == (B,) and bool(((0 <= r) & (r <= t) & (t <= 1)).all())):
            raise ValueError(f"given t, r must be ({B},) each with 0 <= r <= t <= 1 (x has {B} rows)")

    def _conditions(self, net, e, y, omega, t_min, t_max):  # the samplers' checks and iMF's guidance conditions
        self._check_inputs(net, e, y)
        if not (omega >= 1 and 0 <= t_min <= t_max <= 1):
            raise ValueError(f"omega={omega}, [t_min, t_max]=[{t_min}, {t_max}]: pass omega >= 1 (1: no guidance) and "
                             "0 <= t_min <= t_max <= 1")
        if not self.imf:
            if (omega, t_min, t_max) != (1.0, 0.0, 1.0):
                raise ValueError("omega and the guidance interval are sampling conditions of iMF only; MeanFlow "
                                 "bakes guidance in at training (MeanFlow(omega=..., kappa=...))")
            return {}
        full = lambda a: torch.full((e.shape[0],), float(a), device=e.device)
        return dict(omega=full(omega), t_min=full(t_min), t_max=full(t_max))

    def state_dict(self):
        """The curriculum's state (train.py checkpoints it) as plain numbers: resuming continues bitwise."""
        return dict(dtd_stage=self.dtd_stage, dtd_steps=self._dtd_steps, dtd_acc=self._dtd_acc.tolist(),
                    dtd_prev=None if self._dtd_prev is None else list(self._dtd_prev))

    def load_state_dict(self, d):
        if not (isinstance(d, dict) and {"dtd_stage", "dtd_steps", "dtd_acc", "dtd_prev"} <= d.keys()
                and 0 <= d["dtd_stage"] < max(self.dtd_stages, 1)):
            raise ValueError(f"not a curriculum state of this method (dtd_stages={self.dtd_stages}): "
                             f"{d if not isinstance(d, dict) else {k: d.get(k) for k in ('dtd_stage', 'dtd_steps')}}")
        self.dtd_stage, self._dtd_steps = int(d["dtd_stage"]), int(d["dtd_steps"])
        self._dtd_acc = torch.tensor(d["dtd_acc"], dtype=torch.float32)  # float32 -> float -> float32: exact
        self._dtd_prev = None if d["dtd_prev"] is None else tuple(d["dtd_prev"])


# ==============================================================================================
# The networks, in plain PyTorch: DiT (+ in-context variant), the iMF network, the toy MLP, the size tables.
# ==============================================================================================
ATTENTION_BACKENDS = {
    "sdpa": F.scaled_dot_product_attention,  # default: the fused kernel; inside jvp() JVP_RULES takes over
    "math": math_attention,  # reference: plain ops
}


def layer_norm(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x, shift, scale):  # adaLN: x (B, N, D), shift, scale (B, D)
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x, gate, a):  # x + gate * a, gate (B, D) from adaLN or (D,) a learned vector
    return torch.addcmul(x, gate.unsqueeze(1) if gate.dim() == 2 else gate, a)


def set_attention(net, backend):
    """Every attention layer of net (DiT or iMFDiT) to one of ATTENTION_BACKENDS; returns net."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    for m in net.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return net


class Attention(nn.Module):
    def __init__(self, dim, num_heads, backend="sdpa"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = ATTENTION_BACKENDS[self.backend](q, k, v)  # (B, H, N, D/H)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


# ---- DiT (Peebles & Xie) as MeanFlow uses it: adaLN-Zero blocks, 2-D sin-cos positions, embedders for t and t - r,
# a null label, zero-initialised output (a fresh network predicts u = 0). The in-context variant prepends condition
# tokens instead of adaLN (a light iMF stand-in; iMFDiT below is the official iMF network). ----------------------
def timestep_embedding(t, dim=256, max_period=10000.0):
    """Sinusoidal features of t (B,) -> (B, dim). MeanFlow feeds t raw in [0, 1] (official code)."""
    half = dim // 2
    dtype = _at_least_fp32(t)  # fp64 stays fp64 (finite-difference tests), bf16 goes up to fp32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _check_sizes(input_size, patch_size, hidden_size, num_heads, width_multiple, attention):
    if input_size % patch_size or hidden_size % num_heads or hidden_size % width_multiple:
        raise ValueError(f"input_size {input_size} must be a multiple of patch_size {patch_size}, and hidden_size "
                         f"{hidden_size} of num_heads {num_heads} and of {width_multiple}")
    set_attention(nn.Module(), attention)  # an unknown backend: refused here, not at the first forward


class TimestepEmbedder(nn.Module):
    """A scalar condition (t, t - r, 1 - 1/omega, t_min, t_max) -> a hidden-size vector."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def sincos_pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos positions, (grid*grid, dim): half the channels encode rows, half columns."""
    pos = torch.arange(grid, dtype=torch.float64)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb_1d(p):  # (M,) -> (M, dim/2)
        out = p[:, None] * freqs[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gy, gx = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([emb_1d(gx.reshape(-1)), emb_1d(gy.reshape(-1))], dim=1).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block. adaLN-Zero: the condition c (B, D) sets shift, scale and gate (gates
    start at 0, so the block starts as the identity). In-context (c is None): learned gate vectors, also
    starting at 0 (iMF). LayerNorms carry no affine parameters in either case [ours for in-context]."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, adaln=True, attention="sdpa", dropout=0.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, attention)
        hidden = int(hidden_size * mlp_ratio)
        # dropout on the MLP branch's output (CIFAR-10: py-meanflow's U-Net drops 20% inside its residual blocks;
        # where it goes in a DiT is our choice [ours]). The JVP's tangent sees the same mask as its primal.
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"),  # tanh GELU, as DiT
                                 nn.Linear(hidden, hidden_size), *([nn.Dropout(dropout)] if dropout else []))
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        else:
            self.gate_attn = nn.Parameter(torch.zeros(hidden_size))
            self.gate_mlp = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x, c):  # x: (B, N, D)
        if c is None:
            x = gated_residual(x, self.gate_attn, self.attn(layer_norm(x)))
            return gated_residual(x, self.gate_mlp, self.mlp(layer_norm(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        x = gated_residual(x, gate1, self.attn(modulate(layer_norm(x), shift1, scale1)))
        return gated_residual(x, gate2, self.mlp(modulate(layer_norm(x), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, out_dim, adaln=True):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)) if adaln else None

    def forward(self, x, c):
        x = layer_norm(x)
        if c is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """net(z, t, r, y=None, omega=None, t_min=None, t_max=None, return_v=False) -> u (B, C, H, W).

    in_context:    condition tokens prepended to the patch tokens (iMF) instead of adaLN-Zero.
    guidance_cond: also condition on the guidance scale (as 1 - 1/omega) and interval [t_min, t_max] (iMF).
    dropout:       on each block's MLP branch while training (0: none; CIFAR-10 recipe 0.2).
    v_head:        a second output layer predicting the instantaneous velocity v (iMF's auxiliary head;
                   the official iMF, iMFDiT below, branches its last 8 blocks; this one at the output layer [ours]).
                   return_v=True returns (u, v), return_v="only" v alone.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, in_context=False, guidance_cond=False, v_head=False,
                 attention="sdpa", cond_tokens=4, dropout=0.0):
        super().__init__()
        _check_sizes(input_size, patch_size, hidden_size, num_heads, 4, attention)  # sin-cos positions: 4 parts of D
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.input_size, self.in_context = input_size, in_context
        self.guidance_cond, self.v_head = guidance_cond, v_head
        # Patch embedding: a p x p, stride-p convolution is a linear map of each flattened patch.
        self.x_embedder = nn.Linear(in_channels * patch_size * patch_size, hidden_size)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid)[None], persistent=False)
        # Separate embedders for t and for the interval length t - r (MeanFlow Table 1c).
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.h_embedder = TimestepEmbedder(hidden_size)
        # num_classes + 1 rows: the last one is the null label used by classifier-free guidance.
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        if guidance_cond:
            self.omega_embedder, self.tmin_embedder, self.tmax_embedder = map(TimestepEmbedder, [hidden_size] * 3)
        n_conds = 2 + (num_classes > 0) + 3 * guidance_cond
        # In-context: each condition becomes `cond_tokens` tokens = learned tokens + its embedding [ours:
        # official iMF uses 8 class, 4 time, 4 guidance-scale and 2+2 interval tokens].
        self.cond_tokens = (nn.Parameter(torch.randn(n_conds, cond_tokens, hidden_size) / hidden_size**0.5)
                            if in_context else None)
        adaln = not in_context
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, adaln, attention, dropout)
                                    for _ in range(depth))
        out_dim = patch_size * patch_size * in_channels
        self.final_layer = FinalLayer(hidden_size, out_dim, adaln)
        self.v_final_layer = FinalLayer(hidden_size, out_dim, adaln) if v_head else None
        self.initialize_weights()

    def initialize_weights(self):  # as DiT: xavier everywhere, N(0, 0.02) embeddings, zeros for adaLN and output
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, TimestepEmbedder):
                nn.init.normal_(m.mlp[0].weight, std=0.02)
                nn.init.normal_(m.mlp[2].weight, std=0.02)
            if getattr(m, "adaLN_modulation", None) is not None:
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
            if isinstance(m, FinalLayer):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)

    set_attention = set_attention  # net.set_attention(backend): the function above

    def patchify(self, z):  # (B, C, H, W) -> (B, N, C*p*p), N = (H/p)*(W/p)
        if z.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"z of shape {tuple(z.shape)}: this network takes (B, {self.in_channels}, "
                             f"{self.input_size}, {self.input_size})")
        B, C, H, W = z.shape
        p = self.patch_size
        z = z.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(B, (H // p) * (W // p), C * p * p)

    # Inside a patch, patchify orders (C, p, p) and unpatchify (p, p, C), as DiT's output layer: not inverses of each
    # other, and they need not be (a learned Linear reads and writes each patch). Patches keep their place.
    def unpatchify(self, x):  # (B, N, p*p*C) -> (B, C, H, W)
        B, N, _ = x.shape
        p, c, g = self.patch_size, self.in_channels, int(N**0.5)
        x = x.view(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, c, g * p, g * p)

    def conditions(self, t, r, y, omega, t_min, t_max):
        """The list of (B, D) condition embeddings, in a fixed order."""
        conds = [self.t_embedder(t), self.h_embedder(t - r)]
        if self.y_embedder is not None:
            conds.append(self.y_embedder(null_labels(t, self.num_classes) if y is None else y))
        if self.guidance_cond:
            embedders = (self.omega_embedder, self.tmin_embedder, self.tmax_embedder)
            conds += [emb(s) for emb, s in zip(embedders, guidance_scalars(t, omega, t_min, t_max))]
        return conds

    def forward(self, z, t, r, y=None, omega=None, t_min=None, t_max=None, return_v=False):
        if return_v and not self.v_head:
            raise ValueError("return_v asks for the v-head: build the network with v_head=True")
        x = self.x_embedder(self.patchify(z)) + self.pos_embed  # (B, N, D)
        conds = self.conditions(t, r, y, omega, t_min, t_max)
        if self.in_context:
            tokens = self.cond_tokens[None] + torch.stack(conds, 1)[:, :, None]  # (B, n_conds, k, D)
            prefix = tokens.shape[1] * tokens.shape[2]
            x = torch.cat([tokens.flatten(1, 2).to(x.dtype), x], dim=1)  # (B, prefix + N, D)
            c = None
        else:
            prefix, c = 0, sum(conds)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        x = x[:, prefix:]  # drop the condition tokens: (B, N, D)
        if return_v == "only":
            return self.unpatchify(self.v_final_layer(x, c))
        u = self.unpatchify(self.final_layer(x, c))
        return (u, self.unpatchify(self.v_final_layer(x, c))) if return_v else u


# ---- The iMF network (Geng et al., iMF; official models/imfDiT.py): a pre-norm transformer conditioned in context.
# Unlike the DiT it sees h = t - r only (no t), has no adaLN and no absolute positions: RMSNorm, QK-norm, RoPE over
# the whole sequence (condition tokens included), a bias-free SwiGLU MLP, zero-initialised residual gates, and a
# v-head that branches off before the last `head_depth` blocks (run only when return_v asks for v). -------------
def rope_cos_sin(dim, n, theta=10000.0):
    """Rotary tables for positions 0..n-1: cos, sin of shape (n, dim/2), angle pos * theta^(-2i/dim)."""
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]  # (n, dim/2)
    return angles.cos().float(), angles.sin().float()


# wrap_torch_function makes apply_rope one call as a TorchFunctionMode sees it, so that the APPENDIX can give the
# rotation one tangent rule; with no mode active it runs as the plain ops below.
@torch.overrides.wrap_torch_function(lambda x, cos, sin: (x, cos, sin))
def apply_rope(x, cos, sin):
    """Rotate each pair of channels (2i, 2i+1) of x: (B, H, N, d) by its position's angle (as the official
    code's complex view). In fp32 at least, as the official code; the caller casts back."""
    x = x.to(_at_least_fp32(x))
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, N, d/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, normalised in fp32 at least (under bf16 autocast
    torch's fused rms_norm refuses bf16 input with an fp32 weight and warns: so F.rms_norm gets the fp32 input
    and no weight, and the weight multiplies after the cast back; one call, which the APPENDIX gives a rule)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.to(_at_least_fp32(x))
        return F.rms_norm(x32, x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight


class iMFAttention(nn.Module):
    """Bias-free q, k, v (one fused matrix, as many parameters as three) and output projections; RMSNorm
    on each head's queries and keys (QK-norm), then RoPE."""

    def __init__(self, dim, num_heads, backend="sdpa"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(dim // num_heads), RMSNorm(dim // num_heads)

    def forward(self, x, cos, sin):  # x: (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        q, k = (apply_rope(norm(a), cos, sin).to(v.dtype) for norm, a in ((self.q_norm, q), (self.k_norm, k)))
        o = ATTENTION_BACKENDS[self.backend](q, k, v)  # (B, H, N, d); the one attention call of this network
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class iMFBlock(nn.Module):
    """x + g_a * attn(norm(x)), then x + g_m * mlp(norm(x)); the gate vectors start at 0 (identity block)."""

    def __init__(self, dim, num_heads, mlp_ratio=8 / 3, attention="sdpa"):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = iMFAttention(dim, num_heads, attention)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))  # truncated as the official code: 768 -> 2048, 1024 -> 2730
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x, cos, sin):
        x = x + self.attn_scale * self.attn(self.norm1(x), cos, sin)
        return x + self.mlp_scale * self.mlp(self.norm2(x))


class iMFFinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm, self.linear = RMSNorm(dim), nn.Linear(dim, out_dim)

    def forward(self, x):
        return self.linear(self.norm(x))


class iMFDiT(nn.Module):
    """net(z, t, r, y=None, omega=None, t_min=None, t_max=None, return_v=False) -> u (B, C, H, W), (u, v) with
    return_v=True, v alone with return_v="only" (then the u-head's blocks are skipped).

    The sequence is [8 class | 4 omega | 2 t_min | 2 t_max | 4 time | N patch] tokens: each condition adds its
    embedding (class; 1 - 1/omega; t_min; t_max; h = t - r, the "time" tokens) to its own learned tokens. depth
    blocks make u (the first depth - head_depth shared with the v-head); the v-head adds head_depth blocks of its
    own."""

    num_tokens = dict(cls=8, omega=4, t_min=2, t_max=2, time=4)  # official iMF
    patchify, unpatchify, set_attention = DiT.patchify, DiT.unpatchify, DiT.set_attention  # as the DiT

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=768, depth=12, num_heads=12,
                 head_depth=8, mlp_ratio=8 / 3, num_classes=1000, attention="sdpa", in_context=True, guidance_cond=True,
                 v_head=True):  # the last three: accepted from MeanFlow("imf").net_kwargs; always so in this network
        super().__init__()
        if not (0 < head_depth <= depth and in_context and guidance_cond and v_head):
            raise ValueError("the iMF network has its v-head inside (0 < head_depth <= depth) and always conditions in "
                             "context on guidance")
        _check_sizes(input_size, patch_size, hidden_size, num_heads, 2 * num_heads, attention)  # RoPE: pairs per head
        D, p = hidden_size, patch_size
        self.in_channels, self.patch_size, self.num_classes, self.input_size = in_channels, p, num_classes, input_size
        self.guidance_cond = self.v_head = True  # iMF's conditions and its v-head are part of this network
        self.x_embedder = nn.Linear(in_channels * p * p, D)  # a p x p, stride-p convolution
        # h, 1 - 1/omega, t_min, t_max: sinusoids of the raw scalar and a 2-layer MLP each (as the DiT's)
        self.embedders = nn.ModuleDict({k: nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
                                        for k in ("omega", "t_min", "t_max", "time")})
        self.y_embedder = nn.Embedding(num_classes + 1, D)  # last row: the null label (also if unconditional)
        self.tokens = nn.ParameterDict({k: nn.Parameter(torch.randn(n, D) / D**0.5)
                                        for k, n in self.num_tokens.items()})
        self.prefix = sum(self.num_tokens.values())
        cos, sin = rope_cos_sin(D // num_heads, self.prefix + (input_size // p) ** 2)  # RoPE over the whole sequence
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        block = lambda: iMFBlock(D, num_heads, mlp_ratio, attention)
        self.blocks = nn.ModuleList(block() for _ in range(depth - head_depth))  # shared
        self.u_blocks = nn.ModuleList(block() for _ in range(head_depth))
        self.v_blocks = nn.ModuleList(block() for _ in range(head_depth))
        self.u_final_layer, self.v_final_layer = (iMFFinalLayer(D, p * p * in_channels) for _ in "uv")
        self.initialize_weights()

    def initialize_weights(self):
        # As the official code: N(0, (c / sqrt(fan_in))^2) for linear maps, c = 0.32 in the blocks and 1 in the
        # embedders; N(0, 1/D) for label rows and tokens (above); xavier for the patch embedding; zero biases
        # and zero output layers, so that a fresh network predicts u = v = 0.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=(0.32 if "blocks" in name else 1.0) / m.in_features**0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.normal_(self.y_embedder.weight, std=self.y_embedder.embedding_dim**-0.5)
        for m in (self.u_final_layer, self.v_final_layer):
            nn.init.zeros_(m.linear.weight)

    def forward(self, z, t, r, y=None, omega=None, t_min=None, t_max=None, return_v=False):
        x = self.x_embedder(self.patchify(z))  # (B, N, D): no absolute positions, RoPE does it
        w, lo, hi = guidance_scalars(t, omega, t_min, t_max)  # 1 - 1/omega, t_min, t_max: (B,) each
        y = null_labels(t, self.num_classes) if y is None else y
        dtype = self.x_embedder.weight.dtype
        emb = lambda k, s: self.embedders[k](timestep_embedding(s, 256).to(dtype))  # (B, D)
        conds = dict(cls=self.y_embedder(y), omega=emb("omega", w), t_min=emb("t_min", lo), t_max=emb("t_max", hi),
                     time=emb("time", t - r))  # h = t - r only: no t
        prefix = [self.tokens[k] + c[:, None] for k, c in conds.items()]  # (B, n_k, D) each
        x = torch.cat([*[a.to(x.dtype) for a in prefix], x], dim=1)  # (B, prefix + N, D)
        cos, sin = self.rope_cos, self.rope_sin
        for block in self.blocks:
            x = block(x, cos, sin)
        if return_v != "only":  # the u-head: its own head_depth blocks
            h_u = x
            for block in self.u_blocks:
                h_u = block(h_u, cos, sin)
            u = self.unpatchify(self.u_final_layer(h_u[:, self.prefix:]))
            if not return_v:
                return u
        for block in self.v_blocks:  # the v-head
            x = block(x, cos, sin)
        v = self.unpatchify(self.v_final_layer(x[:, self.prefix:]))
        return v if return_v == "only" else (u, v)


# ---- The toy network for 2-D data (same signature as the DiT) ----------------------------------------------------
class MLP(nn.Module):
    """net(z, t, r, y=None, ...) -> u for vector data z: (B, dim): depth x (Linear, SiLU), then a Linear output.

    Inputs: z, t and t - r as they are (dim + 2 numbers, all of unit scale on standardised data), plus the
    guidance conditions 1 - 1/omega, t_min, t_max for iMF. A label shifts the first hidden layer. The output
    layer starts at zero (u = 0), as the DiT's. No sinusoidal time features: next to z's 2 coordinates they delayed
    learning by ~250 steps [ours, 3 seeds on the 2-D mixture with exact u; README "The 2-D regime"].
    Inside jvp() the APPENDIX gives F.linear and F.silu cheaper tangent rules: the same values."""

    def __init__(self, dim=2, hidden=256, depth=4, num_classes=0, guidance_cond=False, v_head=False,
                 in_context=False):
        super().__init__()  # in_context: accepted so that the recipes' net_kwargs fit; an MLP has no tokens
        self.num_classes, self.guidance_cond, self.v_head = num_classes, guidance_cond, v_head
        width = dim + 2 + 3 * guidance_cond  # z, t, t - r (+ 1 - 1/omega, t_min, t_max)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)
        self.v_out = nn.Linear(hidden, dim) if v_head else None  # iMF's auxiliary v-head
        for m in (self.out, self.v_out):
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, z, t, r, y=None, omega=None, t_min=None, t_max=None, return_v=False):
        if z.shape[1:] != (self.out.out_features,) or (return_v and self.v_out is None):
            raise ValueError(f"z of shape {tuple(z.shape)}, return_v={return_v}: this network takes (B, "
                             f"{self.out.out_features}), and return_v needs v_head=True")
        scalars = [t, t - r] + (guidance_scalars(t, omega, t_min, t_max) if self.guidance_cond else [])
        h = self.body[0](torch.cat([z, torch.stack(scalars, 1).to(z.dtype)], dim=1))  # (B, hidden)
        if self.y_embedder is not None:
            h = h + self.y_embedder(null_labels(t, self.num_classes) if y is None else y)
        h = self.body[1:](h)
        if return_v == "only":
            return self.v_out(h)
        u = self.out(h)
        return (u, self.v_out(h)) if return_v else u


# ---- Size tables, keyed as in the papers. Parameter counts for ImageNet latents (32x32x4, 1000 classes), MeanFlow
# paper: B 131M, M 308M, L 459M, XL 676M. "Ti" is our own tiny size for tests and CPU notebooks. -----------------
DiT_sizes = {"Ti": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "M": (16, 1024, 16),
             "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, hidden size, heads
DiT_models = {f"{name}/{p}": partial(DiT, depth=d, hidden_size=h, num_heads=n, patch_size=p)
              for name, (d, h, n) in DiT_sizes.items() for p in (2, 4)}

# iMF's own sizes (official models/imfDiT.py): depth, hidden size, heads, v-head blocks. Parameter counts of
# the sampling network (the v-head's blocks excluded), ImageNet latents: B 89M (paper), M 174M, L 409M, XL 610M.
# "Ti" is our own tiny size for tests and CPU runs.
iMF_sizes = {"Ti": (4, 192, 3, 2), "B": (12, 768, 12, 8), "M": (24, 768, 12, 8), "L": (32, 1024, 16, 8),
             "XL": (48, 1024, 16, 8)}
iMF_models = {f"{name}/{p}": partial(iMFDiT, depth=d, hidden_size=h, num_heads=n, head_depth=k, patch_size=p)
              for name, (d, h, n, k) in iMF_sizes.items() for p in (2, 4)}

# Classifier-free guidance inside the target, per model size (MeanFlow paper, ImageNet 256).
paper_guidance = {
    # B/4: the official config and Kim et al.'s B/4 baseline (240 ep: 11.35 official README, 11.58 Kim et al.);
    # the paper's omega = 3, kappa = 0 row (15.53) is its 80-epoch ablation.
    "B/4": dict(omega=1.0, kappa=0.5, t_lo=0.0, t_hi=1.0),
    "B/2": dict(omega=1.0, kappa=0.5, t_lo=0.0, t_hi=1.0),  # 6.17
    "M/2": dict(omega=1.0, kappa=0.5, t_lo=0.0, t_hi=1.0),  # 5.01
    "L/2": dict(omega=0.2, kappa=0.92, t_lo=0.0, t_hi=0.8),  # 3.84
    "XL/2": dict(omega=0.2, kappa=0.92, t_lo=0.0, t_hi=0.75),  # 3.43 (2-NFE 2.93)
}

# iMF takes guidance at sampling: omega and the interval [t_min, t_max] per size (official configs/eval_config.yml,
# 1-NFE, ImageNet 256). The official training config draws its sample pictures at omega 7.5 on [0.4, 0.65].
imf_guidance = {
    "B/2": dict(omega=8.0, t_min=0.4, t_max=0.65),  # 1-NFE FID 3.39
    "M/2": dict(omega=10.5, t_min=0.4, t_max=0.6),  # 2.27
    "L/2": dict(omega=10.5, t_min=0.4, t_max=0.6),  # 1.86
    "XL/2": dict(omega=8.0, t_min=0.42, t_max=0.62),  # 1.72
}
imf_guidance_2nfe = {"XL/2": dict(omega=4.0, t_min=0.36, t_max=0.64)}  # 2-NFE FID 1.54 (the config's only 2-NFE one)


# ==== APPENDIX: speed only ======================================================================================
# Everything from this banner to the end makes jvp() cheaper (and, last, quieter) and changes no result (tested: a
# copy of this file cut at the banner gives the same losses and gradients, in fp64, to 1e-8).
# Forward-mode AD differentiates any PyTorch code, but (1) every tangent op that multiplies by a
# parameter-dependent value is recorded for backward and keeps its inputs alive, although the tangent is
# stop-gradiented and backward never visits it, (2) the built-in rule of a linear layer also multiplies by
# the weight's zero tangent (twice the matmuls), (3) an add or mul with a tangent on one side only takes a
# slow path (a zero tangent for the other side: a 64x256 add ~100 us against ~2-3 us without tangent), and (4)
# F.scaled_dot_product_attention has no forward-mode rule at all (NotImplementedError). So inside jvp() the
# ops below compute their value as usual on the primal inputs (autograd records it and runs its own backward)
# and their tangent from the same primal values under no_grad (recorded nowhere). The tests check every
# rule against finite differences. The MeanFlow loss runs jvp() on the r != t rows only.
# ----------------------------------------------------------------------------------------------
def _tangent_rule(tangent):
    """An op with a tangent: op(*primals) as usual, and tangent(out, primals, tangents, **kwargs) under no_grad
    (None for an input without tangent), paired again as a dual tensor."""

    def rule(func, *args, **kwargs):
        pairs = [fwAD.unpack_dual(a) if isinstance(a, torch.Tensor) else None for a in args]
        ds = [None if p is None else p.tangent for p in pairs]
        if all(d is None for d in ds):
            return NotImplemented  # no tangent here: the op as usual
        xs = [a if p is None else p.primal for a, p in zip(args, pairs)]
        out = func(*xs, **kwargs)
        with torch.no_grad():
            d = tangent(out, xs, ds, **kwargs)
        if d is NotImplemented:
            return NotImplemented
        d = d if d.shape == out.shape else d.expand(out.shape).contiguous()  # a broadcast input's tangent
        return fwAD.make_dual(out, d.to(out.dtype))

    return rule


def _sum(terms):
    """Sum of the tangent terms that exist (None: an input without tangent)."""
    terms = [a for a in terms if a is not None]
    return sum(terms[1:], terms[0])


def _linear_tangent(y, xs, ds):  # y = x W^T + b: dx W^T (the weight's tangent is zero in the loss)
    (x, W, *_), (dx, dW, *db) = xs, ds
    return _sum([None if dx is None else F.linear(dx, W.to(dx.dtype)), None if dW is None else F.linear(x, dW),
                 db[0] if db else None])


def _gelu_tangent(y, xs, ds, approximate="none"):
    return torch.ops.aten.gelu_backward(ds[0], xs[0], approximate=approximate)


def _silu_tangent(y, xs, ds, inplace=False):
    return torch.ops.aten.silu_backward(ds[0], xs[0])


def _layer_norm_tangent(y, xs, ds, weight=None, bias=None, eps=1e-5):
    """The tangent of the normalisation is its Jacobian times dx, the same map as its backward (the Jacobian is
    symmetric): PyTorch's fused LayerNorm-backward kernel, from the mean and 1/std in fp32."""
    (x, shape), dx = xs, ds[0]
    if any(a is not None and fwAD.unpack_dual(a).tangent is not None for a in (weight, bias)):
        return NotImplemented  # affine parameters with a tangent (not in the loss): PyTorch's own rule
    x32 = x.to(_at_least_fp32(x))
    _, mean, rstd = torch.native_layer_norm(x32, shape, None, None, eps)
    Jdx = torch.ops.aten.native_layer_norm_backward(dx.to(x32.dtype), x32, shape, mean, rstd, None, None,
                                                    [True, False, False])[0]
    return Jdx if weight is None else Jdx * weight  # y = w * norm(x) + b: the weight acts after the Jacobian


def _rms_norm_tangent(y, xs, ds, weight=None, eps=None):
    """n = x r, r = 1/sqrt(mean(x^2) + eps): dn = r (dx - n mean(n dx)) over the normalised dims, in fp32."""
    (x, shape), dx = xs, ds[0]
    if weight is not None and fwAD.unpack_dual(weight).tangent is not None:
        return NotImplemented  # a weight with a tangent (not in the loss): PyTorch's own rule
    x32, dims = x.to(_at_least_fp32(x)), tuple(range(-len(shape), 0))
    eps = torch.finfo(x32.dtype).eps if eps is None else eps  # F.rms_norm's default
    r = torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + eps)
    n, dx = x32 * r, dx.to(x32.dtype)
    Jdx = r * (dx - n * (n * dx).mean(dims, keepdim=True))
    return Jdx if weight is None else Jdx * weight


def _rope_tangent(y, xs, ds):  # the rotation is linear in x and cos, sin carry no tangent: the same rotation of dx
    if ds[1] is not None or ds[2] is not None:
        return NotImplemented
    return apply_rope(ds[0], xs[1], xs[2])


def _addcmul_tangent(y, xs, ds, value=1):  # y = a + value * b * c
    (_, b, c), (da, db, dc) = xs, ds
    bc = [None if db is None else db * c, None if dc is None else b * dc]
    return _sum([da] + [None if t is None else value * t for t in bc])


def _add_tangent(y, xs, ds, alpha=1):
    return _sum([ds[0], None if len(ds) < 2 or ds[1] is None else alpha * ds[1]])


def _mul_tangent(y, xs, ds):
    (a, b), (da, db) = xs, ds
    return _sum([None if da is None else da * b, None if db is None else a * db])


# Attention tangent: do = (P * dS) v - rowsum(P * dS) * o + P dv,   dS = (dq k^T + q dk^T) / sqrt(d)
# The value is SDPA's (the fused kernel, and its own backward); P, which the kernel does not return, is
# computed here for the tangent rows and freed at once.
def _attention_tangent(o, xs, ds, **kwargs):
    if kwargs:  # masks, dropout, causal, scale: not covered here
        return NotImplemented
    (q, k, v), (dq, dk, dv) = xs, ds
    q3, k3, v3 = map(_flat, (q, k, v))  # (B*H, N, d) each
    P, qs = _softmax_scores(q3, k3)  # (B*H, N, N) fp32, (B*H, N, d)
    # dS = (dq k^T + q dk^T) / sqrt(d); matmuls in the inputs' dtype, products with P in fp32
    if dq is None and dk is None:
        dS = torch.zeros(P.shape, dtype=q.dtype, device=q.device)
    elif dq is None:
        dS = torch.bmm(qs, _flat(dk).transpose(1, 2))
    else:
        dS = torch.bmm(_flat(dq) * q3.shape[-1] ** -0.5, k3.transpose(1, 2))
        if dk is not None:
            dS.baddbmm_(qs, _flat(dk).transpose(1, 2))
    PdS = dS.to(P.dtype).mul_(P)
    do = torch.bmm(PdS.to(v3.dtype), v3)  # (B*H, N, d)
    if dv is not None:
        do.baddbmm_(P.to(v3.dtype), _flat(dv))
    do = do.view(o.shape).to(o.dtype)  # (B, H, N, d)
    return do.sub_(PdS.sum(-1, keepdim=True).to(o.dtype).view(*o.shape[:-1], 1) * o)


_T = torch.Tensor


class TangentRules(StockRules):
    """Inside jvp(): linear layers, GELU, SiLU, LayerNorm, RMSNorm, RoPE, addcmul, add, mul and SDPA with the
    rules above."""

    rules = {
        F.linear: _tangent_rule(_linear_tangent),
        F.gelu: _tangent_rule(_gelu_tangent),
        F.silu: _tangent_rule(_silu_tangent),
        F.layer_norm: _tangent_rule(_layer_norm_tangent),
        F.rms_norm: _tangent_rule(_rms_norm_tangent),
        apply_rope: _tangent_rule(_rope_tangent),
        F.scaled_dot_product_attention: _tangent_rule(_attention_tangent),
        **{f: _tangent_rule(_addcmul_tangent) for f in (torch.addcmul, torch.Tensor.addcmul)},
        **{f: _tangent_rule(_add_tangent) for f in (torch.add, _T.add, _T.__add__, _T.__radd__)},
        **{f: _tangent_rule(_mul_tangent) for f in (torch.mul, _T.mul, _T.__mul__, _T.__rmul__)},
    }


JVP_RULES = TangentRules  # replaces the StockRules set above

# The first dual tensor of a process loads torch's own JVP decompositions, which call torch.jit.script, and torch
# 2.15 warns about that (a FutureWarning; 2.13's DeprecationWarning is hidden) at the first step of `python train.py`:
# torch's notice to itself. Loaded here, once (0.3 s), without it; the filters are restored, other warnings show.
import warnings  # noqa: E402  (here: only this block uses it, and the file cut at the banner does not)

with warnings.catch_warnings(), fwAD.dual_level():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script")
    fwAD.make_dual(torch.zeros(()), torch.zeros(()))
