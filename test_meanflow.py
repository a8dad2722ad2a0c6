"""Tests: the math of meanflow.py against ground truth, toy_data's exact fields, and train.py end to end.

Run: python -m pytest -q test_meanflow.py      (CPU; a few minutes on 2 cores)
"""
import argparse
import contextlib
import copy
import errno
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import meanflow as mf
import toy_data as td
import train
from toy_data import DATASETS, GaussianMixture, energy_distance, sample, sliced_wasserstein

torch.set_num_threads(1)  # small nets: threads cost more than they give, and CI has 2 cores


def tiny_dit(num_classes=0, **kw):
    return mf.DiT_models["Ti/2"](input_size=8, in_channels=2, num_classes=num_classes, depth=2, hidden_size=32,
                                 num_heads=2, **kw)


def tiny_imf(num_classes=0, **kw):
    return mf.iMF_models["Ti/2"](input_size=8, in_channels=2, num_classes=num_classes, depth=3, hidden_size=32,
                                 num_heads=2, head_depth=2, **kw)


def randomize(net, std=0.1, seed=0):
    """Zero-initialised layers make every derivative trivially zero; give all parameters random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def functorch_jvp(f, primals, tangents):  # torch.func.jvp with PyTorch's own rules, math attention for SDPA
    with mf.StockRules():
        return torch.func.jvp(f, primals, tangents)


JVPS = {"dual": mf.jvp, "functorch": functorch_jvp}  # the loss uses mf.jvp


def jvp_and_fd(net, z, t, r, y=None, h=1e-6, jvp=mf.jvp, v=None, **cond):
    """du/dt along (dz, dt, dr) = (v, 1, 0) by forward-mode AD, and by central finite differences (v random unless
    given)."""
    v = torch.randn_like(z) if v is None else v
    f = lambda z, t, r: net(z, t, r, y, **cond)
    _, dudt = jvp(f, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    fd = (f(z + h * v, t + h, r) - f(z - h * v, t - h, r)) / (2 * h)
    return dudt, fd


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# The JVP: every network, every attention path, against finite differences
# ---------------------------------------------------------------------------------------------
NETS = {
    "mlp": lambda: mf.MLP(dim=2, hidden=32, depth=3, num_classes=3),
    "dit-math": lambda: tiny_dit(num_classes=3, attention="math"),
    "dit-sdpa": lambda: tiny_dit(num_classes=3, attention="sdpa"),
    "dit-in-context": lambda: tiny_dit(num_classes=3, in_context=True, guidance_cond=True, v_head=True),
    "mlp-guidance-cond": lambda: mf.MLP(dim=2, hidden=32, depth=3, num_classes=3, guidance_cond=True),
    "imf-dit": lambda: tiny_imf(num_classes=3),  # the official iMF network (plain PyTorch layers, RoPE, SwiGLU)
}


def inputs_for(net, B=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 2) if isinstance(net, mf.MLP) else (B, 2, 8, 8)
    z = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype) * 0.8 + 0.1
    r = t * torch.rand(B, generator=g, dtype=dtype)
    y = torch.tensor([0, 2, 3])[:B]  # 3 = the null label
    return z, t, r, y


@pytest.mark.parametrize("jvp", JVPS)
@pytest.mark.parametrize("name", NETS)
def test_jvp_matches_finite_differences_fp64(name, jvp):
    net = randomize(NETS[name]()).double()
    z, t, r, y = inputs_for(net)
    cond = {}
    if getattr(net, "guidance_cond", False):
        cond = dict(omega=torch.tensor([1.0, 2.5, 7.0], dtype=torch.float64),
                    t_min=torch.zeros(3, dtype=torch.float64), t_max=torch.ones(3, dtype=torch.float64))
    v = torch.randn_like(z)
    dudt, fd = jvp_and_fd(net, z, t, r, y, jvp=JVPS[jvp], v=v, **cond)
    assert rel(dudt, fd) < 1e-7
    # Each slot of the tangent reaches its own input: along z, t and r alone, against finite differences (a
    # tangent given as (v, 0, 1), a classic bug, or one that drops a slot fails here on every network).
    f, h = (lambda z, t, r: net(z, t, r, y, **cond)), 1e-6
    parts = {}
    for name, (dz, dt, dr) in {"z": (v, 0.0, 0.0), "t": (0 * v, 1.0, 0.0), "r": (0 * v, 0.0, 1.0)}.items():
        part = JVPS[jvp](f, (z, t, r), (dz, torch.full_like(t, dt), torch.full_like(r, dr)))[1]
        fd_part = (f(z + h * dz, t + h * dt, r + h * dr) - f(z - h * dz, t - h * dt, r - h * dr)) / (2 * h)
        assert rel(part, fd_part) < 1e-6, name
        parts[name] = part
    assert rel(parts["t"], parts["r"]) > 0.05 and rel(parts["z"] + parts["t"], dudt) < 1e-12


def test_jvp_fp32_and_bf16_autocast_close_to_fp64():
    net64 = randomize(tiny_dit(num_classes=3)).double()
    net32 = copy.deepcopy(net64).float()
    z, t, r, y = inputs_for(net64)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def dudt(net, dtype):
        z_, t_, r_, v_ = (a.to(dtype) for a in (z, t, r, v))
        return mf.jvp(lambda z, t, r: net(z, t, r, y), (z_, t_, r_), (v_, torch.ones_like(t_), torch.zeros_like(r_)))[1]

    d64 = dudt(net64, torch.float64)
    assert rel(dudt(net32, torch.float32).double(), d64) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dbf = dudt(net32, torch.float32)
    assert dbf.dtype == torch.bfloat16
    assert rel(dbf.double(), d64) < 0.05  # bf16 keeps 8 bits of mantissa


def test_sdpa_has_no_forward_mode_rule_and_sdpa_jvp_matches_math():
    net = randomize(tiny_dit(num_classes=3, attention="sdpa"))
    z, t, r, y = inputs_for(net, dtype=torch.float32)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(lambda z: net(z, t, r, y), (z,), (torch.ones_like(z),))
    _, d_sdpa = mf.jvp(lambda z: net(z, t, r, y), (z,), (torch.ones_like(z),))  # the rules stand in for SDPA
    _, d_math = mf.jvp(lambda z: net.set_attention("math")(z, t, r, y), (z,), (torch.ones_like(z),))
    assert torch.allclose(d_sdpa, d_math, atol=1e-5)
    outs = [net.set_attention(b)(z, t, r, y) for b in ("sdpa", "math")]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Each layer with an explicit derivative: backward and JVP against numerical differentiation
# ---------------------------------------------------------------------------------------------
def _rule_cases():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    F = torch.nn.functional
    return {
        "linear": (F.linear, (rnd(2, 3, 5), rnd(4, 5), rnd(4))),
        "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), (rnd(2, 3, 5),)),
        "gelu": (F.gelu, (rnd(2, 3, 5),)),
        "silu": (F.silu, (rnd(2, 3, 5),)),
        "layer_norm": (lambda x: F.layer_norm(x, (5,), eps=1e-6), (rnd(2, 3, 5),)),
        "layer_norm_affine": (lambda x, w, b: F.layer_norm(x, (5,), w, b), (rnd(2, 3, 5), rnd(5), rnd(5))),
        "modulate": (mf.modulate, (rnd(2, 3, 5), rnd(2, 5), rnd(2, 5))),
        "gated_residual_adaln": (mf.gated_residual, (rnd(2, 3, 5), rnd(2, 5), rnd(2, 3, 5))),
        "gated_residual_vector": (mf.gated_residual, (rnd(2, 3, 5), rnd(5), rnd(2, 3, 5))),
        "add_broadcast": (lambda a, b: a + b, (rnd(2, 3, 5), rnd(3, 5))),
        "add_alpha": (lambda a, b: torch.add(a, b, alpha=0.3), (rnd(2, 3, 5), rnd(2, 3, 5))),
        "mul_broadcast": (lambda a, b: b * a, (rnd(2, 3, 5), rnd(3, 1))),
        "attention": (F.scaled_dot_product_attention, (rnd(2, 2, 4, 3), rnd(2, 2, 4, 3), rnd(2, 2, 4, 3))),
    }


@pytest.mark.parametrize("name", list(_rule_cases()))
def test_tangent_rules_match_numerical_derivatives(name):
    """Each rule of mf.JVP_RULES against numerical differentiation, with a tangent on every input and on one
    input at a time (as in the loss, where parameters carry none)."""
    check_rule(*_rule_cases()[name])


def check_rule(fn, args):
    """fn under mf.JVP_RULES against numerical derivatives: a tangent on every input, then on one at a time."""

    def under_rules(*a):
        with mf.JVP_RULES():
            return fn(*a)

    assert torch.autograd.gradcheck(under_rules, args, check_forward_ad=True, check_backward_ad=True)
    for i in range(len(args)):  # only input i has a tangent
        other = [a.detach() if j != i else a for j, a in enumerate(args)]
        assert torch.autograd.gradcheck(under_rules, other, check_forward_ad=True, check_backward_ad=False)


def test_tangent_pass_records_nothing_for_backward():
    """The tangent is stop-gradiented: our layers must not keep it in the autograd graph (memory)."""
    for net in (randomize(tiny_dit(num_classes=3)), randomize(mf.MLP(dim=2))):
        z, t, r, y = inputs_for(net, dtype=torch.float32)
        u, dudt = mf.jvp(lambda z, t, r: net(z, t, r, y), (z, t, r), (z, torch.ones_like(t), torch.zeros_like(r)))
        assert u.requires_grad and not dudt.requires_grad


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [f for f, _ in node.next_functions]
    return seen


def jvp_saving(net, **kw):
    """mf.jvp through net on random inputs; also, for each tensor autograd saves for backward, whether it is free of
    a tangent. Returns (out, tangent, flags)."""
    z, t, r, y = inputs_for(net, dtype=torch.float32)
    saved = []

    def pack(a):
        saved.append(torch.autograd.forward_ad.unpack_dual(a).tangent is None)
        return a

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda a: a):
        out, tangent = mf.jvp(lambda z, t, r: net(z, t, r, y, **kw), (z, t, r),
                              (z, torch.ones_like(t), torch.zeros_like(r)))
    return out, tangent, saved


def test_saved_values_carry_no_tangent():
    """Inside the forward-mode pass, what autograd saves for backward must not hold a tangent: else every tangent
    stays alive to the end of the pass (one more copy of every activation at the peak)."""
    saved = jvp_saving(randomize(tiny_dit(num_classes=3)))[2]
    assert len(saved) > 50 and all(saved), (len(saved), saved.count(False))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # from torch.utils.mkldnn (inductor)
def test_compiled_loss_matches_eager():
    """torch.compile of the loss (train.py --compile): jvp() runs eagerly inside it (Dynamo does not trace dual
    tensors under a TorchFunctionMode), the guidance forward and the rest compile: graphs are counted, so a loss
    that silently stopped compiling fails here."""
    torch.manual_seed(0)
    method = mf.MeanFlow("meanflow", omega=2.0, kappa=0.3, class_dropout=0.0, p=0.0)  # no random label drops
    net = randomize(tiny_dit(num_classes=3))
    x, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 3])
    t, r = method.sample_t_r(4)
    e = torch.randn_like(x)
    loss = lambda: method.loss(net, x, y, t=t, r=r, e=e)[0]
    graphs, inductor = [], torch._dynamo.lookup_backend("inductor")
    backend = lambda gm, example_inputs: graphs.append(gm) or inductor(gm, example_inputs)
    eager, compiled = loss(), torch.compile(loss, backend=backend)()
    assert sum(n.op == "call_function" for g in graphs for n in g.graph.nodes) > 50  # ~270 ops in ~7 graphs
    g_eager = torch.autograd.grad(eager, list(net.parameters()))
    g_compiled = torch.autograd.grad(compiled, list(net.parameters()))
    assert torch.allclose(eager, compiled, rtol=1e-5)
    # Each gradient to 1e-5 of its own largest entry: the loss (~1e3) sums large terms that cancel, and the fp32
    # rounding of inductor's kernels differs by CPU (on one AMD EPYC, AVX2: one entry 0.036341 vs 0.036346, 1.3e-7
    # of its tensor's largest, failed an elementwise rtol 1e-4, atol 1e-6).
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max())) for a, b in zip(g_eager, g_compiled))


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------
def test_r_equals_t_reduces_to_adaptively_weighted_flow_matching():
    net = randomize(mf.MLP(dim=2, hidden=32))
    method = mf.MeanFlow("meanflow", p=0.75, c=1e-3)
    g = torch.Generator().manual_seed(0)
    x, e, t = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g), torch.rand(64, generator=g)
    loss, logs = method.loss(net, x, t=t, r=t, e=e)
    z = (1 - t[:, None]) * x + t[:, None] * e
    l = ((net(z, t, t) - (e - x)) ** 2).sum(1)  # summed over dims
    ref = (l / (l.detach() + 1e-3) ** 0.75).mean()
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert math.isnan(float(logs["u_loss"])) and abs(float(logs["v_loss"]) - l.mean().item() / 2) < 1e-5
    g1 = torch.autograd.grad(loss, list(net.parameters()))
    g2 = torch.autograd.grad(ref, list(net.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g1, g2))


class PlainMLP(torch.nn.Module):
    """Built from stock PyTorch layers, whose JVP stays in the autograd graph: here a missing
    stop-gradient on the target would change the gradient."""

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        self.num_classes = 0

    def forward(self, z, t, r, y=None):
        return self.f(torch.cat([z, t[:, None], (t - r)[:, None]], 1))


@pytest.mark.parametrize("rules", ["appendix", "stock"])
def test_loss_matches_reference_with_stop_gradient(rules, monkeypatch):
    """Under PyTorch's own forward-mode rules the tangent du/dt is differentiable: only the loss's stop-gradient keeps
    it out of the gradient (the APPENDIX's rules compute it under no_grad, so there both would hide a missing one)."""
    if rules == "stock":
        monkeypatch.setattr(mf, "JVP_RULES", mf.StockRules)
    torch.manual_seed(0)
    net, method = PlainMLP(), mf.MeanFlow("meanflow", p=1.0, c=0.01)
    x, e = torch.randn(32, 2), torch.randn(32, 2)
    t, r = method.sample_t_r(32)
    loss, _ = method.loss(net, x, t=t, r=r, e=e)
    z, v = (1 - t[:, None]) * x + t[:, None] * e, e - x
    u, dudt = torch.func.jvp(lambda z, t, r: net(z, t, r), (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    assert dudt.requires_grad  # stock layers: the tangent is differentiable, so stop-gradient matters

    def ref_loss(stop_gradient):
        u_tgt = v - (t - r)[:, None] * dudt
        u_tgt = u_tgt.detach() if stop_gradient else u_tgt
        l = ((u - u_tgt) ** 2).sum(1)
        return (l / (l.detach() + 0.01)).mean()

    grad = lambda L: torch.cat([g.flatten() for g in torch.autograd.grad(L, list(net.parameters()), retain_graph=True)])
    g_loss, g_sg, g_no_sg = grad(loss), grad(ref_loss(True)), grad(ref_loss(False))
    assert torch.allclose(g_loss, g_sg, rtol=1e-5, atol=1e-7)
    assert (g_loss - g_no_sg).norm() > 1e-3 * g_loss.norm()


@pytest.mark.parametrize("omega,kappa,t_lo,t_hi", [(0.2, 0.92, 0.0, 0.75),  # XL/2's setting
                                                  (1.0, 0.5, 0.0, 1.0),  # B/2, M/2: omega = 1, guidance from kappa
                                                  (3.0, 0.0, 0.3, 0.8)])  # plain CFG on an interval
def test_guidance_target_is_v_without_guidance_and_cfg_formula_otherwise(omega, kappa, t_lo, t_hi):
    net = randomize(mf.MLP(dim=2, hidden=32, num_classes=3))
    with torch.no_grad():
        net.y_embedder.weight.mul_(30)  # labels that matter: u_cond - u_null of order 0.1, not 1e-4
    g = torch.Generator().manual_seed(0)
    z, v, t = torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g), torch.rand(200, generator=g)
    t[60:64] = torch.tensor([t_lo, t_hi, t_lo, t_hi])  # the interval is closed at both ends (official JAX code)
    y, n = torch.randint(0, 3, (200,), generator=g), 50  # rows [:50] play the r != t rows
    method = mf.MeanFlow("meanflow", omega=1.0, kappa=0.0)
    assert torch.equal(method.guided_velocity(net, z, t, v, y, method.drop_labels(y, n, 3)[1], n), v)
    method = mf.MeanFlow("meanflow", omega=omega, kappa=kappa, t_lo=t_lo, t_hi=t_hi, class_dropout=0.1)
    torch.manual_seed(3)
    y_in, dropped = method.drop_labels(y, n, 3)
    dropped[60:64] = False
    assert 0 < dropped.sum() < 60 and torch.equal(y_in[~dropped], y[~dropped]) and (y_in[dropped] == 3).all()
    v_g = method.guided_velocity(net, z, t, v, y, dropped, n)
    # the r = t rows' own forward u(z, t, t | y_in) stands in for their kappa term: the same target
    v_g_reuse = method.guided_velocity(net, z, t, v, y, dropped, n, u_fm=net(z[n:], t[n:], t[n:], y_in[n:]))
    inside = (t >= t_lo) & (t <= t_hi)
    u_null, u_cond = net(z, t, t, torch.full_like(y, 3)), net(z, t, t, y)
    expect = omega * v + (1 - omega - kappa) * u_null + kappa * u_cond
    keep = inside & ~dropped
    assert keep[60:64].all() and (expect - v)[keep].abs().min() > 1e-3  # the ends, and every kept row, are guided
    assert torch.allclose(v_g[keep], expect[keep], atol=1e-6) and torch.allclose(v_g_reuse, v_g, atol=1e-6)
    assert torch.equal(v_g[~keep], v[~keep]) and torch.equal(v_g_reuse[~keep], v[~keep])  # outside or dropped: v


# ---------------------------------------------------------------------------------------------
# Samplers of (t, r), the weights beta and alpha, the DTD curriculum
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_time_sampler_invariants(ratio):
    method = mf.MeanFlow("meanflow", ratio_r_neq_t=ratio)
    torch.manual_seed(0)
    t, r = method.sample_t_r(4000)
    assert (t >= r).all() and (t >= 0).all() and (t <= 1).all()
    assert ((t != r).float().mean() - ratio).abs() < 1e-3  # exactly round(ratio * B) rows
    if ratio > 0:
        # logit-normal(-0.4, 1): median of one draw is sigmoid(-0.4) = 0.401; of the max of two, higher
        draws = torch.cat([t[t != r], r[t != r]])
        assert abs(draws.median().item() - 1 / (1 + math.exp(0.4))) < 0.02
    t_u, r_u = mf.MeanFlow("meanflow", time_sampler="uniform", ratio_r_neq_t=1.0).sample_t_r(4000)
    assert abs((t_u - r_u).mean().item() - 1 / 3) < 0.02  # E|U1 - U2| = 1/3


def test_lambda_and_beta():
    method = mf.MeanFlow("improved-dtd")
    # an independent Monte-Carlo estimate (10^8 draws of logit-normal(-0.4, 1)): 1.30454
    assert abs(method.lam - 1.3045) < 5e-4
    assert abs(mf.MeanFlow("meanflow", time_sampler="uniform").lam - 1.5) < 1e-6
    torch.manual_seed(0)
    t, r = mf.MeanFlow("meanflow", ratio_r_neq_t=1.0).sample_t_r(200_000)
    assert abs(method.beta(t - r, 0.0).mean().item() - 1.0) < 5e-3  # E[beta] = 1 at the start
    assert torch.allclose(method.beta(t - r, 1.0), torch.ones_like(t))  # and beta = 1 at the end
    b = method.beta(torch.tensor([0.0, 0.5, 1.0]), 0.0)
    assert b[0] > b[1] > b[2]  # small intervals first
    assert abs(method.lam - 1 / (1 - (t - r).mean().item())) < 5e-3  # lambda for whatever sampler


def test_minsnr_weight_normalised_and_only_on_r_equals_t_rows():
    method = mf.MeanFlow("improved-minsnr")
    torch.manual_seed(0)
    t, r = method.sample_t_r(100_000)
    w = method.weights(t, r, progress=1.0)  # beta = 1 at progress 1
    fm = t == r
    assert abs(w[fm].mean().item() - 1.0) < 0.01
    assert torch.allclose(w[~fm], torch.ones_like(w[~fm]))
    w0 = method.weights(t, r, progress=0.0)  # improved-minsnr keeps beta on the r != t rows (Kim et al.: both)
    assert torch.allclose(w0[~fm], method.beta((t - r)[~fm], 0.0)) and torch.equal(w0[fm], w[fm])
    assert w0[~fm].std() > 0.1  # beta at the start is far from 1
    tt = torch.tensor([0.05, 0.3, 0.9])
    expect = torch.minimum((1 - tt) ** 2, 5 * tt**2) / method.alpha_mean
    assert torch.allclose(method.weights(tt, tt, 1.0), expect)


def test_dtd_starts_at_high_noise_and_reaches_the_full_range():
    method = mf.MeanFlow("improved-dtd", dtd_patience=3)
    torch.manual_seed(0)
    t, r = method.sample_t_r(20_000)
    t_fm = t[t == r]
    # stage 0: only the highest-noise 1/20 of the mass of the max-of-two law, whose CDF is u^2 in u-space
    edge = method.quantile(torch.tensor(0.95, dtype=torch.float64).sqrt()).item()  # = 0.826
    assert edge - 1e-6 <= t_fm.min() < edge + 0.01
    # the r != t rows keep the base law of (t, r): the curriculum is on v only
    t_mf, r_mf = t[t != r], r[t != r]
    t_base, r_base = mf.MeanFlow("meanflow", ratio_r_neq_t=1.0).sample_t_r(20_000)
    assert (t_mf > r_mf).all() and t_mf.min() < 0.2
    assert abs(t_mf.median() - t_base.median()) < 0.02 and abs(r_mf.median() - r_base.median()) < 0.02
    stages = [method.dtd_stage]
    for step in range(100):  # a stage lasts at most dtd_patience steps
        method.dtd_step(torch.tensor(1.0 / (step + 1)))
        stages.append(method.dtd_stage)
    assert stages[0] == 0 and stages[-1] == method.dtd_stages - 1
    assert all(b - a in (0, 1) for a, b in zip(stages, stages[1:]))  # one cluster at a time
    t, r = method.sample_t_r(20_000)
    t_all = mf.MeanFlow("meanflow").sample_t_r(20_000)[0][:15_000]
    assert abs(t[t == r].median() - t_all.median()) < 0.02  # last stage: the full base law


# ---------------------------------------------------------------------------------------------
# Networks: zero init, the paper's parameter counts, recipes end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, dict(in_context=True, guidance_cond=True, v_head=True)])
def test_zero_initialised_dit_outputs_zero(kw):
    net = tiny_dit(num_classes=3, **kw)
    z, t, r, y = inputs_for(net, dtype=torch.float32)
    out = net(z, t, r, y, return_v=True) if kw else (net(z, t, r, y),)
    assert all(o.abs().max() == 0 for o in out) and out[0].shape == z.shape


@pytest.mark.parametrize("name,paper",
                         [("B/2", 131e6), ("B/4", 131e6), ("M/2", 308e6), ("L/2", 459e6), ("XL/2", 676e6)])
def test_parameter_counts_match_the_meanflow_paper(name, paper):
    with torch.device("meta"):
        net = mf.DiT_models[name](input_size=32, in_channels=4, num_classes=1000)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - paper) < 0.5e6, n  # the paper's counts are rounded to 1M (ours: within 0.2M)


@pytest.mark.parametrize("recipe", list(mf.RECIPES))
@pytest.mark.parametrize("net_kind", ["mlp", "dit"])
@pytest.mark.parametrize("labels", [False, True])
def test_every_recipe_runs_loss_backward_sample(recipe, net_kind, labels):
    torch.manual_seed(0)
    guidance = dict(omega=1.0, kappa=0.5) if labels and recipe != "imf" else {}
    method = mf.MeanFlow(recipe, **guidance)
    nc = 3 if labels else 0
    if net_kind == "mlp":
        net, x = mf.MLP(dim=2, hidden=32, num_classes=nc, **method.net_kwargs), torch.randn(16, 2)
    else:
        net, x = tiny_dit(num_classes=nc, **method.net_kwargs), torch.randn(8, 2, 8, 8)
    y = torch.randint(0, 3, (x.shape[0],)) if labels else None
    loss, logs = method.loss(net, x, y, progress=0.5)
    loss.backward()
    assert torch.isfinite(loss) and set(logs) >= {"loss", "v_loss", "u_loss", "dtd_stage"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    e = torch.randn_like(x)
    for x0 in (method.sample(net, e, y, steps=1), method.sample(net, e, y, steps=2),
               method.sample_euler(net, e, y, steps=4)):
        assert x0.shape == x.shape and torch.isfinite(x0).all()


def test_unknown_recipe_or_knob_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown recipe"):
        mf.MeanFlow("meanflw")
    for knob in (dict(dtd_stages=20), dict(beta_k=1.0), dict(minsnr_gamma=5.0)):  # iMF's loss has its own weights
        with pytest.raises(ValueError, match="iMF has its own loss"):
            mf.MeanFlow("imf", **knob)
    for knob in (dict(dtd_share=1.5), dict(dtd_share=-0.1), dict(dtd_patience=0), dict(dtd_window=0)):
        with pytest.raises(ValueError, match="MeanFlow option dtd_"):
            mf.MeanFlow("improved-dtd", **knob)
    with pytest.raises(ValueError, match="data_proportion"):
        mf.MeanFlow("meanflow", data_proportion=0.75)
    for recipe, knob in (("improved-dtd", dict(minsnr_gamma=5.0)), ("improved-minsnr", dict(dtd_stages=20))):
        with pytest.raises(ValueError, match="DTD and MinSNR"):  # alpha's mean 1 assumes the t of every stage at once
            mf.MeanFlow(recipe, **knob)


@pytest.mark.parametrize("labels", [False, True])
def test_samplers_one_step_is_one_u_step_and_euler_uses_u_at_r_equals_t(labels):
    net = randomize(mf.MLP(dim=2, hidden=32, num_classes=3 if labels else 0), std=0.3)
    method, e = mf.MeanFlow("meanflow"), torch.randn(10, 2)
    y = torch.arange(10) % 3 if labels else None

    def u(z, t, r):  # the samplers must pass the labels on
        return net(z, t, r, y)

    ones = torch.ones(10)
    assert torch.allclose(method.sample(net, e, y, steps=1), e - u(e, ones, 0 * ones), atol=1e-6)
    half = 0.5 * ones
    z_half = e - 0.5 * u(e, ones, half)
    assert torch.allclose(method.sample(net, e, y, steps=2), z_half - 0.5 * u(z_half, half, 0 * ones), atol=1e-6)
    z_half = e - 0.5 * u(e, ones, ones)
    assert torch.allclose(method.sample_euler(net, e, y, steps=2), z_half - 0.5 * u(z_half, half, half), atol=1e-6)
    if labels:  # the labels change the samples: the check above cannot pass by ignoring them
        assert (method.sample(net, e, y) - method.sample(net, e)).abs().max() > 1e-3


def test_mlp_label_shifts_the_first_hidden_layer_and_none_is_the_null_class():
    net = randomize(mf.MLP(dim=2, hidden=16, depth=2, num_classes=3), std=0.3)
    z, t, r = torch.randn(6, 2), torch.rand(6), torch.zeros(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    lin1, act, lin2 = net.body[0], net.body[1], net.body[2]
    h = act(lin1(torch.cat([z, torch.stack([t, t - r], 1)], 1)) + net.y_embedder(y))
    assert torch.allclose(net(z, t, r, y), net.out(act(lin2(h))), atol=1e-6)
    assert torch.equal(net(z, t, r), net(z, t, r, torch.full_like(y, 3)))  # y = None: the null class
    assert (net(z, t, r, y) - net(z, t, r)).abs().max() > 1e-3


def test_imf_swiglu_final_layer_and_time_features_are_the_official_formulas():
    F = torch.nn.functional
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    mlp = randomize(mf.SwiGLU(8, 12), std=0.3)
    assert torch.allclose(mlp(x), mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x)), atol=1e-6)  # SiLU-gated, no biases
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
    final = randomize(mf.iMFFinalLayer(8, 4), std=0.3)
    rms = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * final.norm.weight
    assert torch.allclose(final(x), final.linear(rms), atol=1e-5)  # RMSNorm, then the linear map
    t = torch.tensor([0.0, 0.3, 1.0])
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    expect = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)  # DiT's order: cos, sin
    assert torch.allclose(mf.timestep_embedding(t, dim=8), expect, atol=1e-6)


def test_imf_condition_tokens_and_dit_positions_are_the_official_layouts():
    # official models/imfDiT.py: 8 class, 4 time, 4 cfg (omega) tokens, 2 for each end of the interval
    net = tiny_imf(num_classes=3)
    assert {k: p.shape[0] for k, p in net.tokens.items()} == dict(cls=8, omega=4, t_min=2, t_max=2, time=4)
    # MAE / DiT's 2-D sin-cos table: the first half of the channels encodes the column, the second the row, each
    # [sin(p w), cos(p w)] with w = 1 / 10000^(i / (dim / 4))
    grid, dim = 4, 8
    w = 1 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def f(p):
        return torch.cat([torch.sin(p * w), torch.cos(p * w)])

    expect = torch.stack([torch.cat([f(n % grid), f(n // grid)]) for n in range(grid * grid)]).float()
    assert torch.allclose(mf.sincos_pos_embed_2d(dim, grid), expect, atol=1e-6)


def test_attention_tangent_never_ignores_a_mask_or_scale():
    """The networks call SDPA plainly; with is_causal or scale the tangent rule steps aside: jvp() then raises
    (PyTorch has no forward-mode SDPA) or matches central differences, never a tangent of unmasked attention."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 4, 8, generator=g, dtype=torch.float64) for _ in range(6))
    for kw in (dict(is_causal=True), dict(scale=0.5)):
        def f(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, **kw)

        try:
            _, tangent = mf.jvp(f, (q, k, v), (dq, dk, dv))
        except (NotImplementedError, TypeError):
            continue
        eps = 1e-6
        fd = (f(q + eps * dq, k + eps * dk, v + eps * dv) - f(q - eps * dq, k - eps * dk, v - eps * dv)) / (2 * eps)
        assert torch.allclose(tangent, fd, atol=1e-7), kw


def test_rng_state_round_trips_every_generator_mid_stream():
    np.random.seed(0)
    np.random.rand(5)  # mid-stream: numpy's position in its key matters
    np.random.randn(1)  # an odd number of Gaussian draws: each generator caches the second of a pair
    random.random()
    random.gauss(0, 1)
    torch.rand(3)
    state = train.rng_state()
    torch.save(state, io.BytesIO())  # and a checkpoint holds it
    first = (np.random.randn(3), random.gauss(0, 1), torch.rand(3))
    np.random.randn(7)
    random.gauss(0, 1)
    train.set_rng_state(state)
    again = (np.random.randn(3), random.gauss(0, 1), torch.rand(3))
    assert np.array_equal(first[0], again[0]) and first[1] == again[1] and torch.equal(first[2], again[2])


def test_in_context_dit_reads_each_patch_back_at_its_place():
    """Without attention (gates 0) every token is processed alone: a change to one input patch changes that output
    patch only, the first and the last. Dropping the wrong tokens after the blocks (the condition prefix kept, the
    last patches lost) would move it."""
    net = randomize(tiny_dit(num_classes=3, in_context=True), std=0.2)
    with torch.no_grad():
        for block in net.blocks:
            block.gate_attn.zero_()
    z = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    t, r, y = torch.tensor([0.7]), torch.tensor([0.2]), torch.tensor([1])
    for rows, cols in ((slice(0, 2), slice(0, 2)), (slice(6, 8), slice(6, 8))):  # patches 0 and 15 of the 4 x 4 grid
        z2 = z.clone()
        z2[..., rows, cols] += 1.0
        diff = (net(z2, t, r, y) - net(z, t, r, y)).abs()
        assert diff[..., rows, cols].min() > 1e-4
        diff[..., rows, cols] = 0
        assert diff.max() < 1e-6


def test_dit_block_is_the_adaln_zero_block_of_dit():
    """A DiT block against DiT's equations written out from its parameters: c -> (shift, scale, gate) x 2,
    x + gate1 * attn(LN(x) (1 + scale1) + shift1), then the same with the MLP (LayerNorm without affine, eps 1e-6)."""
    torch.manual_seed(0)
    block = randomize(mf.DiTBlock(16, num_heads=2), std=0.2)
    x, c = torch.randn(3, 5, 16), torch.randn(3, 16)
    F = torch.nn.functional
    mod = block.adaLN_modulation[1](F.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)

    def attn(a):
        q, k, v = block.attn.qkv(a).view(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        o = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v  # (3, 2, 5, 8)
        return block.attn.proj(o.transpose(1, 2).reshape(3, 5, 16))

    def ln(a):
        return F.layer_norm(a, (16,), eps=1e-6)

    h = x + gate1[:, None] * attn(ln(x) * (1 + scale1[:, None]) + shift1[:, None])
    expect = h + gate2[:, None] * block.mlp(ln(h) * (1 + scale2[:, None]) + shift2[:, None])
    assert torch.allclose(block(x, c), expect, atol=1e-5)


def test_imf_guidance_conditions_and_sampling_at_any_omega():
    method = mf.MeanFlow("imf")
    torch.manual_seed(0)
    t, r = method.sample_t_r(10_000)
    omega, t_min, t_max = method.sample_imf_conditions(t, r)
    assert omega.min() >= 1 and omega.max() <= 8 and abs(omega.log().mean() - math.log(8) / 2) < 0.02  # 8^U
    fm = t == r
    assert (t_min[fm] == 0).all() and (t_max[fm] == 1).all()
    lo, hi = t_min[~fm], t_max[~fm]  # the r != t rows: t_min ~ U[0, 0.5], t_max ~ U[0.5, 1] (official)
    assert abs(lo.mean() - 0.25) < 0.01 and abs(hi.mean() - 0.75) < 0.01
    assert lo.min() >= 0 and lo.min() < 0.01 and 0.49 < lo.max() <= 0.5
    assert hi.min() >= 0.5 and hi.min() < 0.51 and 0.99 < hi.max() <= 1
    assert abs(torch.corrcoef(torch.stack([lo, hi]))[0, 1]) < 0.05  # drawn independently
    assert abs(fm.float().mean() - 0.5) < 1e-3
    net = randomize(tiny_dit(num_classes=3, **method.net_kwargs))
    e, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 0])
    a, b = method.sample(net, e, y, omega=1.0), method.sample(net, e, y, omega=4.0)
    assert not torch.allclose(a, b)  # omega is a network condition: no extra pass, different output


def test_imf_refuses_a_network_without_its_conditions_or_v_head_in_one_message():
    """recipe "imf" with a DiT or MLP built without MeanFlow("imf").net_kwargs: loss, sample and sample_euler say what
    the network lacks and how to build it (not a TypeError deep inside the network); with the kwargs, or the iMF
    network, all three run; the other recipes take either network."""
    method = mf.MeanFlow("imf")
    x, e, y = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 0])
    lacking = [tiny_dit(num_classes=3), tiny_dit(num_classes=3, guidance_cond=True),
               tiny_dit(num_classes=3, v_head=True), mf.MLP(num_classes=3)]
    for net in lacking:
        z = x if isinstance(net, mf.DiT) else torch.randn(4, 2)
        for call in (lambda: method.loss(net, z, y), lambda: method.sample(net, z, y),
                     lambda: method.sample_euler(net, z, y, steps=2)):
            with pytest.raises(ValueError, match=r"recipe 'imf' needs a network .*net_kwargs"):
                call()
    for net in (tiny_dit(num_classes=3, **method.net_kwargs), tiny_imf(num_classes=3)):
        method.loss(net, x, y)[0].backward()
        method.sample(net, e, y, omega=2.0), method.sample_euler(net, e, y, steps=2)
    for net in (tiny_dit(num_classes=3), tiny_imf(num_classes=3)):
        mf.MeanFlow("meanflow").loss(net, x, y)[0].backward()


# ---------------------------------------------------------------------------------------------
# A toy MeanFlow learns the exact field; a wrong tangent does not
# ---------------------------------------------------------------------------------------------
def train_toy(method, steps=1000, seed=0):
    torch.manual_seed(seed)
    gm = td.GaussianMixture.default()
    net = mf.MLP(dim=2, hidden=128, depth=3, **method.net_kwargs)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for i in range(steps):
        loss, logs = method.loss(net, gm.sample(256), progress=i / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 0.01 if i > steps // 4 else 1.0)
    return ema, gm


def one_step_distance(method, net, gm):
    g = torch.Generator().manual_seed(5)
    e, ref = torch.randn(3000, 2, generator=g), gm.sample(3000, g)
    return td.energy_distance(method.sample(net, e, steps=1), ref)


def test_toy_meanflow_learns_one_step_map_and_wrong_tangent_does_not(monkeypatch):
    method = mf.MeanFlow("meanflow", **mf.TOY_OVERRIDES)
    net, gm = train_toy(method)
    good = one_step_distance(method, net, gm)
    # the exact average velocity: the learned u over the full jump [0, 1] is close to it
    g = torch.Generator().manual_seed(6)
    e, ones = torch.randn(2000, 2, generator=g), torch.ones(2000)
    jump_err = lambda net: mf.sq_err(net(e, ones, 0 * ones), gm.u(e, ones, 0 * ones)).mean().item()  # 1-NFE jump
    with torch.no_grad():
        u_err = jump_err(net)
    noise = td.energy_distance(torch.randn(3000, 2), gm.sample(3000))

    real_jvp = mf.jvp

    def swapped_tangent(f, primals, tangents):  # (v, 0, 1) in (z, t, r) order
        return real_jvp(f, primals, (tangents[0], tangents[2], tangents[1]))

    monkeypatch.setattr(mf, "jvp", swapped_tangent)
    bad_net, _ = train_toy(mf.MeanFlow("meanflow", **mf.TOY_OVERRIDES))
    bad = one_step_distance(method, bad_net, gm)
    with torch.no_grad():
        bad_u_err = jump_err(bad_net)
    # Measured with the raw-input MLP, seeds 0, 1, 2: good 0.022, 0.026, 0.029 (noise 0.051); u_err 0.105, 0.113,
    # 0.132; wrong tangent: distance 0.064, 0.62, 0.40 and u error 0.23, 1.22, 0.81.
    assert good < 0.04 and good < noise / 1.5, (good, noise)
    assert u_err < 0.2, u_err
    assert bad > 2 * good and bad_u_err > 1.5 * u_err, (bad, good, bad_u_err, u_err)


# =============================================================================================
# toy_data: the datasets, the exact fields of GaussianMixture, and the sample distances
# =============================================================================================
def _z_t(gm, B, t, seed):
    # z_t = (1 - t) x + t e for x from the mixture: points where p_t has mass, float64.
    g = torch.Generator().manual_seed(seed)
    x = gm.sample(B, g).double()
    e = torch.randn(B, 2, generator=g, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).expand(B)
    return (1 - t[:, None]) * x + t[:, None] * e, t


# ---------------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", list(DATASETS))
def test_dataset_shape_dtype_scale_and_seed(name):
    p = sample(name, 20000, torch.Generator().manual_seed(0))
    assert p.shape == (20000, 2) and p.dtype == torch.float32 and torch.isfinite(p).all()
    # Unit scale: mean 0, per-coordinate variance 1 on average (moons is wider than tall on purpose).
    assert p.mean(0).abs().max() < 0.05
    assert abs(p.var(0).mean().item() - 1) < 0.05
    # The generator alone fixes the sample.
    assert torch.equal(p, sample(name, 20000, torch.Generator().manual_seed(0)))
    assert not torch.equal(p, sample(name, 20000, torch.Generator().manual_seed(1)))


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="unknown toy dataset 'swissroll'; choose one of: checkerboard"):
        sample("swissroll", 10)


# ---------------------------------------------------------------------------------------------------- v
FIELDS = dict(mixture=GaussianMixture.default, checkerboard=td.Checkerboard)  # the two exact fields of toy_data


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("t", [0.3, 0.6, 0.9])
def test_v_matches_monte_carlo(t, field):
    # E[e - x | z_t = z] by self-normalised importance sampling over data x_j: given x, e = (z - (1-t) x) / t,
    # with weight p(z | x) = N(z; (1 - t) x, t^2 I). Independent of the closed form's algebra.
    gm = FIELDS[field]()
    z, _ = _z_t(gm, 16, t, seed=1)
    x = gm.sample(400_000, torch.Generator().manual_seed(2)).double()  # (N, 2)
    logw = -((z[:, None] - (1 - t) * x) ** 2).sum(-1) / (2 * t**2)  # (16, N)
    w = torch.softmax(logw, dim=1)
    assert (1 / (w**2).sum(1)).min() > 2000  # effective sample size per point
    v_mc = torch.einsum("bn,bnd->bd", w, (z[:, None] - (1 - t) * x) / t - x)
    assert (gm.v(z, t) - v_mc).norm(dim=1).max() < 0.03


def test_v_matches_score_of_log_prob():
    # z_t = (1 - t) x + t e gives E[e | z] = -t grad log p_t(z), hence v = -(z + t grad log p_t(z)) / (1 - t).
    # The score comes from autograd through log_prob, v from the posterior means: two separate routes.
    gm = GaussianMixture.default()
    t = torch.rand(256, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.98 + 0.01
    z, _ = _z_t(gm, 256, t, seed=3)
    z = z.requires_grad_(True)
    score = torch.autograd.grad(gm.log_prob(z, t).sum(), z)[0]
    v_score = -(z + t[:, None] * score) / (1 - t[:, None])
    torch.testing.assert_close(gm.v(z.detach(), t), v_score.detach(), rtol=1e-9, atol=1e-9)


def test_v_at_the_ends():
    # t = 0: z = x says nothing about e, v = -z.  t = 1: z = e says nothing about x, v = z - E[x].
    gm = GaussianMixture([[3.0, 1.0], [-1.0, 2.0]], [0.05, 0.3], [0.2, 0.8])
    z = torch.randn(100, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    torch.testing.assert_close(gm.v(z, 0.0), -z)
    torch.testing.assert_close(gm.v(z, 1.0), z - gm.pi @ gm.mu)
    far = torch.full((4, 2), 1e3, dtype=torch.float32)  # far from every mode: logsumexp must not overflow
    assert torch.isfinite(gm.v(far, torch.tensor([0.0, 1e-3, 0.5, 1.0]))).all()
    assert gm.v(far, 0.5).dtype == torch.float32


def test_log_prob_is_a_density():
    gm = GaussianMixture.default()
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    cell = (grid[1] - grid[0]) ** 2
    assert abs((gm.log_prob(zz).exp().sum() * cell).item() - 1) < 1e-4  # data density, t = 0
    # t = 1 is pure noise: p_1 = N(0, I).
    torch.testing.assert_close(gm.log_prob(zz, 1.0), -0.5 * (zz**2).sum(1) - math.log(2 * math.pi))


# ---------------------------------------------------------------------------------------------------- u


@pytest.mark.parametrize("field", FIELDS)
def test_u_at_r_equals_t_is_exactly_v(field):
    gm = FIELDS[field]()
    t = torch.rand(64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z, _ = _z_t(gm, 64, t, seed=6)
    r = torch.where(torch.arange(64) % 2 == 0, t, 0.5 * t)  # half the rows have r = t
    for dtype in (torch.float64, torch.float32):
        u, v = gm.u(z.to(dtype), t, r, steps=16), gm.v(z.to(dtype), t)
        assert torch.equal(u[::2], v[::2])
        assert (u[1::2] - v[1::2]).norm(dim=1).mean() > 0.05  # r < t: u is a different field


def test_u_converges_with_steps():
    # RK4 is 4th order: doubling the steps shrinks the change ~16x; the default is within 1e-5.
    gm = GaussianMixture.default()
    e = torch.randn(256, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    S = td.DEFAULT_ODE_STEPS
    u_S, u_2S, u_4S = (gm.u(e, 1.0, 0.0, steps=s) for s in (S, 2 * S, 4 * S))  # the full 1-NFE jump
    assert (u_S - u_4S).norm(dim=1).max() < 1e-5
    assert (u_2S - u_4S).norm(dim=1).max() < (u_S - u_4S).norm(dim=1).max() / 8
    assert (gm.u(e, 1.0, 0.0, steps=16) - u_4S).norm(dim=1).max() > 1e-4  # coarse grids are visibly off


@pytest.mark.parametrize("field", FIELDS)
def test_meanflow_identity_on_exact_fields(field):
    # u = v - (t - r) du/dt, du/dt = v . d_z u + d_t u: the derivative of u along (dz, dt) = (v, 1) with
    # r fixed, here by central differences. Dropping d_t u (the tangent (v, 0)) must break it.
    gm = FIELDS[field]()
    B = 64
    g = torch.Generator().manual_seed(10)
    t = 0.2 + 0.7 * torch.rand(B, generator=g, dtype=torch.float64)
    r = t * torch.rand(B, generator=g, dtype=torch.float64)
    z, _ = _z_t(gm, B, t, seed=9)
    v, u = gm.v(z, t), gm.u(z, t, r)
    h = 1e-4
    dudt = (gm.u(z + h * v, t + h, r) - gm.u(z - h * v, t - h, r)) / (2 * h)
    rel = (u - (v - (t - r)[:, None] * dudt)).norm(dim=1) / u.norm(dim=1)
    assert rel.max() < 1e-3
    dudt_no_t = (gm.u(z + h * v, t, r) - gm.u(z - h * v, t, r)) / (2 * h)
    rel_wrong = (u - (v - (t - r)[:, None] * dudt_no_t)).norm(dim=1) / u.norm(dim=1)
    assert rel_wrong.max() > 0.1


def test_z_r_is_the_ode_endpoint_and_flows_back():
    gm = GaussianMixture.default()
    g = torch.Generator().manual_seed(11)
    t = torch.rand(128, generator=g, dtype=torch.float64)
    r = t * torch.rand(128, generator=g, dtype=torch.float64)
    z, _ = _z_t(gm, 128, t, seed=12)
    z_r = z - (t - r)[:, None] * gm.u(z, t, r)
    path = gm.ode_solve(z, t, r, steps=512, trajectory=True)  # finer, independent solve
    assert path.shape == (513, 128, 2) and torch.equal(path[0], z)
    assert (z_r - path[-1]).norm(dim=1).max() < 1e-5
    assert (gm.ode_solve(z_r, r, t) - z).norm(dim=1).max() < 1e-5  # the flow is invertible


@pytest.mark.parametrize("field", FIELDS)
def test_one_step_with_exact_u_samples_the_data(field):
    # x = e - u(e, 1, 0) is an exact 1-NFE sampler; one Euler step with v instead lands every e on E[x] = 0.
    gm = FIELDS[field]()
    e = torch.randn(2000, 2, generator=torch.Generator().manual_seed(13))
    data = gm.sample(2000, torch.Generator().manual_seed(14))
    x_u = e - gm.u(e, 1.0, 0.0, steps=64)
    x_v = e - gm.v(e, 1.0)
    baseline = energy_distance(gm.sample(2000, torch.Generator().manual_seed(15)), data)
    assert energy_distance(x_u, data) < 2 * baseline + 1e-3
    assert energy_distance(x_v, data) > 50 * baseline
    if field == "checkerboard":  # and every endpoint on a square
        assert td.on_squares(x_u) == 1.0


def test_checkerboard_posterior_mean_against_quadrature():
    # E[x | z_t] by Gauss-Legendre quadrature of x p(z | x) over each square (a smooth integrand for t >= 0.5, where
    # 60 nodes per side are exact to rounding): another route than the truncated normals' closed form, and through
    # the range near t = 1 where that form is scaled to E[x] = 0 instead.
    cb = td.Checkerboard()
    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(60))
    z = torch.randn(20, 2, generator=torch.Generator().manual_seed(19), dtype=torch.float64) * 1.5
    for t in (0.5, 0.9, 0.999, 1 - 1e-4, 1 - 1e-5, 1.0):
        num, den = torch.zeros(20, 2, dtype=torch.float64), torch.zeros(20, 1, dtype=torch.float64)
        for lo, hi in zip(cb.lo, cb.hi):
            xs = [(lo[i] + hi[i]) / 2 + (hi[i] - lo[i]) / 2 * nodes for i in (0, 1)]
            X = torch.stack(torch.meshgrid(*xs, indexing="ij"), -1).reshape(-1, 2)  # (3600, 2)
            w = (weights[:, None] * weights[None]).reshape(-1) * torch.exp(
                -((z[:, None] - (1 - t) * X) ** 2).sum(-1) / (2 * t * t))  # (20, 3600)
            num, den = num + w @ X, den + w.sum(1, keepdim=True)
        err = (cb.posterior_mean(z, torch.full((20, 1), t, dtype=torch.float64)) - num / den).abs().max()
        assert err < 1e-6, (t, err.item())
    torch.testing.assert_close(cb.v(z, 1.0), z, rtol=0, atol=1e-12)  # t = 1: z is the noise, E[x] = 0
    far = torch.tensor([[40.0, -30.0], [0.1, 0.2]], dtype=torch.float64)  # far off the board, and near t = 0
    assert torch.isfinite(cb.v(far, torch.tensor([1e-4, 1e-4], dtype=torch.float64))).all()


def test_checkerboard_posterior_mean_far_off_the_board_at_small_t():
    """Against the closed form in 60-digit arithmetic (mpmath, which torch installs), each interval's mass taken on
    the side of 0 away from it: points far off the board at t down to 1e-8, where phi / mass divides two numbers of
    size exp(-1e15) (it gave (39.1, 2618.9) for (1.73, -0.87) at t = 1e-7, NaN at 1e-8)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    cb, squares = td.Checkerboard(), td.checkerboard_squares()

    def exact(z, t):
        t = mp.mpf(t)
        m, sd = [mp.mpf(c) / (1 - t) for c in z], t / (1 - t)
        masses, means = [], []
        for x0, y0, side in squares:
            mass, mean = mp.mpf(1), []
            for c, l0 in enumerate((x0, y0)):
                a, b = (mp.mpf(l0) - m[c]) / sd, (mp.mpf(l0) + mp.mpf(side) - m[c]) / sd
                P = mp.ncdf(-a) - mp.ncdf(-b) if a > 0 else mp.ncdf(b) - mp.ncdf(a)
                mass *= P
                mean.append(m[c] + sd * (mp.npdf(a) - mp.npdf(b)) / P)
            masses.append(mass)
            means.append(mean)
        return [float(sum(w * mu[c] for w, mu in zip(masses, means)) / sum(masses)) for c in (0, 1)]

    points = [(40.0, -30.0), (4.0, -3.0), (2.5, 0.3), (-0.3, 0.05), (0.1, 0.2), (-1.2, -2.9)]
    for t in (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-2, 0.5):
        got = cb.posterior_mean(torch.tensor(points, dtype=torch.float64), torch.full((6, 1), t, dtype=torch.float64))
        want = torch.tensor([exact(z, t) for z in points], dtype=torch.float64)
        assert (got - want).abs().max() < 1e-9, (t, got, want)


def test_checkerboard_ode_converges(monkeypatch):
    # The 1-NFE endpoints (t = 1 -> 0) against 4x the default steps: 4th order (doubling the steps shrinks the error
    # ~16x), the default within 1e-5 for 99% of the points.
    cb = td.Checkerboard()
    e = torch.randn(1000, 2, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    S = td.CHECKERBOARD_ODE_STEPS
    ref = cb.ode_solve(e, 1.0, 0.0, steps=4 * S)
    err = [(cb.ode_solve(e, 1.0, 0.0, steps=s) - ref).norm(dim=1).quantile(0.99) for s in (S // 4, S // 2, S)]
    assert err[2] < 1e-5 and err[0] > 8 * err[1] > 64 * err[2]
    # a path ending at r = 0 jumps to E[x | z] at t = CHECKERBOARD_T_END: points off the board shortly before the
    # end (t = 0.05) still land inside a square, not 1e-4 / 0.05 of their distance short of it
    z = torch.tensor([[2.5, -1.0], [-0.1, 3.0], [-2.5, 0.2], [0.3, -2.4]], dtype=torch.float64)  # off the board
    assert td.on_squares(cb.ode_solve(z, 0.05, 0.0)) == 1.0
    # ... and that jump costs under 1e-4 in the 1-NFE u against a path run on to t = 1e-6
    monkeypatch.setattr(td, "CHECKERBOARD_T_END", 1e-6)
    finer = cb.u(e[:200], 1.0, 0.0, steps=2 * S)
    monkeypatch.undo()
    assert (cb.u(e[:200], 1.0, 0.0) - finer).norm(dim=1).max() < 1e-4
    # rows with r = t stay where they are, also below CHECKERBOARD_T_END; a path that starts there jumps at once
    tiny = torch.full((4,), 5e-5, dtype=torch.float64)
    assert torch.equal(cb.ode_solve(z, tiny, tiny), z)
    assert torch.equal(cb.ode_solve(z, tiny, 0 * tiny), cb.posterior_mean(z, tiny[:, None]))
    # ... and one that ends at 0 < r < CHECKERBOARD_T_END goes on straight towards E[x | z], not onto it: u = v
    # where t and r are both below it (it gave v t / (t - r): 2v at r = t / 2), and against a path run on to r
    torch.testing.assert_close(cb.u(z, tiny, tiny / 2), cb.v(z, tiny), rtol=1e-9, atol=0)
    data = td.checkerboard(200, torch.Generator().manual_seed(21)).double()
    for t, r in ((2e-4, 9e-5), (1e-3, 5e-5)):
        z_t = (1 - t) * data + t * e[:200]
        monkeypatch.setattr(td, "CHECKERBOARD_T_END", 1e-12)
        finer = cb.u(z_t, t, r, steps=1024)
        monkeypatch.undo()
        assert (cb.u(z_t, t, r) - finer).norm(dim=1).median() < 1e-3 * finer.norm(dim=1).median(), (t, r)


# ---------------------------------------------------------------------------------------------------- distances


def test_distances_zero_for_same_distribution_and_grow_with_shift():
    a = sample("moons", 2000, torch.Generator().manual_seed(16))
    b = sample("moons", 2000, torch.Generator().manual_seed(17))
    c = sample("moons", 1500, torch.Generator().manual_seed(18))  # unequal sizes: the quantile route
    shift = torch.tensor([0.5, 0.0])
    assert energy_distance(a, a) == 0.0 and sliced_wasserstein(a, a) == 0.0
    ed_same, ed_shift = energy_distance(a, b), energy_distance(a, b + shift)
    assert 0 < ed_same < 0.01 and ed_shift > 10 * ed_same
    for other in (b, c):
        sw_same, sw_shift = sliced_wasserstein(a, other), sliced_wasserstein(a, other + shift)
        assert sw_same < 0.08 and sw_shift > 5 * sw_same
    assert sliced_wasserstein(a, b) == sliced_wasserstein(a, b)  # fixed directions when generator is None


def test_distances_known_values():
    # N(0, I) vs N(delta, I) in 2-D: SW_2^2 = E_w (w . delta)^2 = |delta|^2 / 2.
    g = torch.Generator().manual_seed(19)
    a, b = torch.randn(10000, 2, generator=g), torch.randn(10000, 2, generator=g)
    delta = torch.tensor([1.0, 1.0])
    assert abs(sliced_wasserstein(a, b + delta, n_proj=512) - 1.0) < 0.05
    # The chunked mean distance equals the one-shot one, and energy_distance is the plug-in formula.
    a, b = a[:300].double(), b[:200].double()
    assert abs(td._mean_dist(a, b, chunk_elems=1000) - torch.cdist(a, b).mean().item()) < 1e-12
    plug_in = 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()
    assert abs(energy_distance(a, b) - plug_in.item()) < 1e-12


# =============================================================================================
# train.py: data formats, distributed training, checkpoints and resume, sampling, bad input
# =============================================================================================
HERE = os.path.dirname(os.path.abspath(__file__))
# The tensors here are tiny: intra-op threads buy nothing and, on a busy 2-core machine, cost up to 10x.
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def run_main(argv, capsys):
    """train.main in this process (fast: no second torch import); returns (exit code, stdout, stderr)."""
    code = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    """Exit code 2, exactly one error line (the last on stderr), no traceback, naming the problem."""
    lines = [s for s in err.replace("\r", "\n").splitlines() if s.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert sum("error" in s for s in lines) == 1 and lines[-1].startswith("train.py: error: "), err
    for w in words:
        assert w in lines[-1], (w, lines[-1])


def listing(folder):
    """Names and contents of the files in folder: what a refused run must leave as it was."""
    return {f: (folder / f).read_bytes() for f in os.listdir(folder)}


def leftovers(folder):
    """Temporary files that an interrupted write would leave behind."""
    return [f for f in os.listdir(folder) if ".tmp" in f or ".part" in f] if os.path.isdir(folder) else []


# ----------------------------------------------------------------------------------------------------------
# Small data in the real formats


def write_idx(path, arr):
    """IDX as (Fashion-)MNIST ships it: 0x00 0x00 0x08 ndim, big-endian int32 dims, uint8 data."""
    arr = np.asarray(arr, np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def make_fashion(folder, n=40, gz=True):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10
    ext = ".gz" if gz else ""
    write_idx(os.path.join(folder, "train-images-idx3-ubyte" + ext), x)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte" + ext), y)
    return x, y


def make_cifar_tarball(folder, per_batch=3, batches=5, members_reversed=False):
    """cifar-10-python.tar.gz as the official one: Python pickles {b'data': uint8 (N, 3072), b'labels': [..]}.
    Returns the training batches in name order (data_batch_1 first), whatever the order of the members."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    names = [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch", "batches.meta"]
    with tarfile.open(os.path.join(folder, "cifar-10-python.tar.gz"), "w:gz") as tar:
        for name in names[::-1] if members_reversed else names:
            d = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)], b"batch_label": name.encode()}
            if name.startswith("data_batch"):
                xs.append(d[b"data"])
                ys.append(d[b"labels"])
            add_pickle(tar, f"cifar-10-batches-py/{name}", d)
    if members_reversed:
        xs, ys = xs[::-1], ys[::-1]
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)


def add_pickle(tar, name, d):  # a member of the tarball holding d pickled, as CIFAR's official files
    raw = pickle.dumps(d, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def test_fashion_mnist_loader_reads_idx(tmp_path):
    for gz in (True, False):
        folder = str(tmp_path / f"fm{gz}")
        x, y = make_fashion(folder, gz=gz)
        data = train.load_data(train.get_args(["--data", "fashion-mnist", "--data-path", folder, "--model", "Ti/4"]), 0)
        assert data.x.shape == (40, 1, 32, 32) and data.x.dtype == torch.uint8
        assert torch.equal(data.x[:, 0, 2:30, 2:30], torch.from_numpy(x)) and data.x[:, :, :2].eq(0).all()
        assert torch.equal(data.labels, torch.from_numpy(y))
        xb, yb = data.get(torch.arange(5), torch.Generator().manual_seed(0))
        assert xb.min() >= -1 and xb.max() <= 1 and torch.equal(xb[:, :, 0], -torch.ones(5, 1, 32))


def test_read_idx_takes_uint8_idx_only(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / "ok"), x)
    assert np.array_equal(train.read_idx(str(tmp_path / "ok")), x)
    raw = (tmp_path / "ok").read_bytes()
    for name, bad in (("float", raw[:2] + b"\x0d" + raw[3:]), ("magic", b"\x01" + raw[1:]), ("short", raw[:-1])):
        (tmp_path / name).write_bytes(bad)
        with pytest.raises(train.Fail, match="not a valid IDX file"):
            train.read_idx(str(tmp_path / name))


def test_real_fashion_mnist_header():
    path = "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"
    if not os.path.exists(path):
        pytest.skip("the Debian package dataset-fashion-mnist is not installed")
    assert train.read_idx(path).shape == (60000,)


def test_cifar10_loader_reads_the_python_tarball(tmp_path):
    x, y = make_cifar_tarball(str(tmp_path))
    data = train.load_data(train.get_args(["--data", "cifar10", "--data-path", str(tmp_path), "--model", "Ti/4"]), 0)
    assert torch.equal(data.x, torch.from_numpy(x)) and torch.equal(data.labels, torch.from_numpy(y))
    xb, _ = data.get(torch.arange(len(x)), torch.Generator().manual_seed(0))
    ref = torch.from_numpy(x).float() / 127.5 - 1
    flipped = (xb == ref.flip(3)).flatten(1).all(1)
    assert ((xb == ref).flatten(1).all(1) | flipped).all() and 0 < flipped.sum() < len(x)  # random flips, both seen
    # the batches in name order (data_batch_1 .. 5) even where the tarball holds them in another order: every
    # image keeps its index, so a run's batches do not depend on how the tarball was packed
    x, y = make_cifar_tarball(str(tmp_path / "rev"), members_reversed=True)
    data = train.load_data(train.get_args(["--data", "cifar10", "--data-path", str(tmp_path / "rev"), "--model",
                                           "Ti/4"]), 0)
    assert torch.equal(data.x, torch.from_numpy(x)) and torch.equal(data.labels, torch.from_numpy(y))


def test_batches_are_a_function_of_the_step_and_split_over_processes(tmp_path):
    make_fashion(str(tmp_path))
    args = train.get_args(["--data", "fashion-mnist", "--data-path", str(tmp_path), "--model", "Ti/4",
                           "--batch-size", "16"])
    data = train.load_data(args, 0)
    for step in (0, 2, 7):  # step 2 spans two epochs of the 40 images
        x, y = train.get_batch(args, data, step, 0, 1)
        halves = [train.get_batch(args, data, step, r, 2) for r in range(2)]
        assert torch.equal(torch.cat([h[0] for h in halves]), x) and torch.equal(torch.cat([h[1] for h in halves]), y)
    seen, get = [], data.get  # the image numbers each batch reads
    data.get = lambda idx, g, mine: seen.append(idx.clone()) or get(idx, g, mine)
    for s in range(5):  # 80 positions: 2 epochs of the 40 images
        train.get_batch(args, data, s, 0, 1)
    order = torch.cat(seen)
    for epoch in (order[:40], order[40:]):  # each epoch visits every image once, in a new order
        assert sorted(epoch.tolist()) == list(range(40))
    assert not torch.equal(order[:40], order[40:])


def tiny_vae(folder, levels=4):
    """A randomly initialised AutoencoderKL with SD's layout (4 levels: 256 -> 32, 4 latent channels), tiny widths."""
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(4,) * levels,
                        layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=256)
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is optional (pip install diffusers); ImageNet latents use it")
def test_a_vae_that_cannot_be_fetched_is_one_line():
    """Offline, the default --vae printed the hub's 6 retry notices and a deprecation warning before its line."""
    code = f"""if 1:
        import logging, sys, warnings
        sys.path.insert(0, {HERE!r})
        import train
        from diffusers.models import AutoencoderKL
        def offline(name):  # what huggingface_hub does without a network
            logging.getLogger("huggingface_hub.utils._http").warning("'Name or service not known' thrown; retrying")
            warnings.warn("`local_dir_use_symlinks` is deprecated", UserWarning)
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        AutoencoderKL.from_pretrained = offline
        try:
            train.load_vae(type("Args", (), dict(vae="stabilityai/sd-vae-ft-mse")), "cpu")
        except train.Fail as err:
            print(err, file=sys.stderr)"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and len(p.stderr.splitlines()) == 1 and "could not load the VAE" in p.stderr, p.stderr


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is optional (pip install diffusers); ImageNet latents use it")
def test_imagenet_latents_prepare_load_train_sample(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(300, 260), (256, 256), (600, 520), (280, 400), (512, 700)]
    for i, size in enumerate(sizes):  # 2 class folders, JPEGs of several sizes (one needs the box-filter halving)
        os.makedirs(tmp_path / "train" / f"n0{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            tmp_path / "train" / f"n0{i % 2}" / f"img{i}.JPEG")
    vae = tiny_vae(str(tmp_path / "vae"))
    out = tmp_path / "latents"
    for shard in (0, 1):  # two shards, as two processes would encode them
        code, _, err = run_main(["--prepare-imagenet", tmp_path / "train", "--data-path", out, "--shard", shard,
                                 "--num-shards", 2, "--vae", tmp_path / "vae", "--workers", 0], capsys)
        assert code == 0, err
    assert sorted(os.listdir(out)) == ["labels-00000-of-00002.npy", "labels-00001-of-00002.npy",
                                       "shard-00000-of-00002.npy", "shard-00001-of-00002.npy", "tree-of-00002.json"]
    # a restarted job skips the shards that are complete (encoding ImageNet takes hours)
    stamp = os.stat(out / "shard-00000-of-00002.npy").st_mtime_ns
    code, text, err = run_main(["--prepare-imagenet", tmp_path / "train", "--data-path", out, "--shard", 0,
                                "--num-shards", 2, "--vae", tmp_path / "no-vae", "--workers", 0], capsys)
    assert code == 0 and "shard 0 of 2: already in" in text, err
    assert os.stat(out / "shard-00000-of-00002.npy").st_mtime_ns == stamp
    # another shard count into the same folder would mix two sets: refused, nothing written
    code, _, err = run_main(["--prepare-imagenet", tmp_path / "train", "--data-path", out, "--vae", tmp_path / "vae",
                             "--workers", 0], capsys)
    assert_one_line_error(code, err, "another preparation", "shard-00000-of-00002.npy")
    assert len(os.listdir(out)) == 5
    shutil.copytree(out, tmp_path / "mixed")  # two sets in one folder: the error names both and the fix
    np.save(tmp_path / "mixed" / "shard-00000-of-00001.npy", np.zeros((1, 2, 2, 4, 32, 32), np.float16))
    mixed = r"mixes the shards of several preparations \(shard-\*-of-00001 and -of-00002.npy\); delete"
    with pytest.raises(train.Fail, match=mixed):
        train.ImageNetLatents(str(tmp_path / "mixed"))
    # an unreadable image (not an image; a truncated JPEG): one line naming it, no partial shard left
    for bad, content in (("zz.JPEG", b"not an image"), ("zz.jpg", open(tmp_path / "train" / "n00" / "img0.JPEG",
                                                                       "rb").read()[:300])):
        shutil.copytree(tmp_path / "train", tmp_path / "bad")
        for i in range(32):  # the bad one (last in n01) in the loader's second batch: after the shard file exists
            shutil.copy(tmp_path / "train" / "n00" / "img2.JPEG", tmp_path / "bad" / "n00" / f"copy{i}.JPEG")
        (tmp_path / "bad" / "n01" / bad).write_bytes(content)
        code, _, err = run_main(["--prepare-imagenet", tmp_path / "bad", "--data-path", tmp_path / "badlat", "--vae",
                                 tmp_path / "vae", "--workers", 0], capsys)
        assert_one_line_error(code, err, bad, "is not a readable image", "replace it with a readable copy",
                              "delete the finished shards")
        assert not os.path.exists(tmp_path / "badlat")  # the folder it made goes too
        shutil.rmtree(tmp_path / "bad")
    code, _, err = run_main(["--prepare-imagenet", tmp_path / "nowhere", "--data-path", tmp_path / "nolat"], capsys)
    default = train.get_args(["--prepare-imagenet", str(tmp_path / "train"), "--data-path", str(out)]).workers
    assert default == min(4, len(os.sched_getaffinity(0)))  # no more loader processes than cores (a warning, no speed)
    assert_one_line_error(code, err, "nowhere is not a folder", "ImageNet's train folder")  # before loading a VAE
    assert not os.path.exists(tmp_path / "nolat")
    lat = np.load(out / "shard-00000-of-00002.npy", mmap_mode="r")
    assert isinstance(lat, np.memmap) and lat.shape == (3, 2, 2, 4, 32, 32)  # files 0, 2, 4 of the sorted list
    # shard 0 holds n00/img0, n00/img4 (class 0) and n01/img3 (class 1): order of the sorted file list, every 2nd
    assert np.load(out / "labels-00000-of-00002.npy").tolist() == [0, 0, 1]
    with Image.open(tmp_path / "train" / "n00" / "img4.JPEG") as img:
        crop = train.center_crop(img)
    x = torch.tensor(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        for flip, xi in enumerate((x, x.flip(3))):  # cached posterior of the image and of its mirror image
            post = vae.encode(xi).latent_dist
            assert torch.allclose(torch.from_numpy(lat[1, flip, 0].astype(np.float32)), post.mean[0], atol=2e-3)
            assert torch.allclose(torch.from_numpy(lat[1, flip, 1].astype(np.float32)), post.std[0], atol=2e-3)

    data = train.ImageNetLatents(str(out))
    assert len(data) == 5
    g = torch.Generator().manual_seed(0)
    xs = torch.stack([data.get(torch.tensor([1]), g)[0][0] for _ in range(40)]) / train.LATENT_SCALE
    mean = torch.from_numpy(lat[1, :, 0].astype(np.float32))  # (2 flips, 4, 32, 32)
    std = torch.from_numpy(lat[1, :, 1].astype(np.float32))
    z = (xs[:, None] - mean) / std  # standardised under each flip's posterior
    flip = z.pow(2).mean((2, 3, 4)).argmin(1)
    assert 0 < flip.sum() < 40  # both flips are drawn
    picked = z[torch.arange(40), flip]
    assert abs(picked.mean()) < 0.05 and abs(picked.std() - 1) < 0.05  # a fresh sample of the posterior each time

    run = tmp_path / "run"
    common = ["--data", "imagenet-latents", "--data-path", out, "--model", "Ti/4", "--batch-size", 4, "--out", run]
    code, _, err = run_main(common + ["--steps", 2, "--vae", tmp_path / "no-vae"], capsys)  # grids show latents
    assert code == 0 and "no VAE to decode latents" in err, err
    code, _, err = run_main(common + ["--sample", 3, "--vae", tmp_path / "no-vae"], capsys)  # sampling needs it
    assert_one_line_error(code, err, "could not load the VAE", "no-vae", "pass --vae with a local copy",
                          "HF_HUB_OFFLINE=1")
    assert not [f for f in os.listdir(run) if f.startswith("samples-")]
    code, out_text, err = run_main(common + ["--sample", 3, "--vae", tmp_path / "vae"], capsys)
    assert code == 0, err
    npz = np.load(run / "samples-3-nfe1.npz")
    assert npz["arr_0"].shape == (3, 256, 256, 3) and npz["arr_0"].dtype == np.uint8  # decoded by the VAE
    assert npz["arr_1"].tolist() == [0, 1, 2]
    os.remove(run / "samples-3-nfe1.npz")  # sampling reads no training latents: the same samples without them
    code, _, err = run_main([a if a != out else tmp_path / "gone" for a in common] + ["--sample", 3, "--vae",
                                                                                      tmp_path / "vae"], capsys)
    assert code == 0, err
    assert np.array_equal(np.load(run / "samples-3-nfe1.npz")["arr_0"], npz["arr_0"])
    assert "FID skipped" in out_text + err
    # a VAE of other latents decoded them into wrong images (8 channels: a traceback; 1/4 of the side: 128 x 128)
    tiny_vae(str(tmp_path / "vae3"), levels=3)
    os.remove(run / "samples-3-nfe1.npz")
    code, _, err = run_main(common + ["--sample", 3, "--vae", tmp_path / "vae3"], capsys)
    assert_one_line_error(code, err, "vae3 makes 4-channel latents at 1/4 of the image side, not the SD-VAE's 4 at 1/8",
                          "stabilityai/sd-vae-ft-mse")
    assert not [f for f in os.listdir(run) if f.startswith("samples-")]


# ----------------------------------------------------------------------------------------------------------
# Data parallel: the loss (plain forward, forward-mode pass, guidance forward) goes through a DDP wrapper


def _train_tiny(rank, world, sync, steps=4, B=16):
    """A few AdamW steps of the toy MLP on a fixed global batch stream; this process takes its slice of each
    batch. t, r and e are passed explicitly so that every split of the batch sees the same randomness. In
    float64, so that summation order (half batches, then the all-reduce) leaves no visible trace. sync: through
    DistributedDataParallel (as train.py), else the bare network (no gradient all-reduce)."""
    torch.manual_seed(0)
    method, net = mf.MeanFlow("meanflow"), mf.MLP(dim=2).double()
    model = torch.nn.parallel.DistributedDataParallel(net) if sync else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    mine = slice(rank * B // world, (rank + 1) * B // world)
    for step in range(steps):
        x = td.sample("checkerboard", B, generator=g).double()
        t = torch.rand(B, generator=g, dtype=torch.float64)
        r = torch.where(torch.arange(B) % 4 == 0, t * torch.rand(B, generator=g, dtype=torch.float64), t)  # r < t: 1/4
        e = torch.randn(B, 2, generator=g, dtype=torch.float64)
        loss, _ = method.loss(model, x[mine], None, progress=step / steps, t=t[mine], r=r[mine], e=e[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@contextlib.contextmanager
def gloo(rank, world, port):
    """This process as rank of a CPU process group (gloo, one thread) for the duration of the block."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        train.leave_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    with gloo(rank, world, port):
        torch.save({mode: _train_tiny(rank, world, sync=mode == "synced") for mode in ("synced", "naive")},
                   os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _train_tiny(0, 1, sync=False)
    assert torch.equal(ranks[0]["synced"], ranks[1]["synced"])  # replicas stay bitwise identical
    diff = (ranks[0]["synced"] - single).abs().max().item()
    assert diff < 1e-10, diff  # and equal to one process on the whole batch
    # Without the all-reduce (the bare network) the replicas drift apart.
    naive = (ranks[0]["naive"] - ranks[1]["naive"]).abs().max().item()
    assert naive > 1e-3 and (ranks[0]["naive"] - single).abs().max().item() > 1e-3, naive


def test_torchrun_two_cpu_processes(tmp_path, capsys):
    """The script itself under torchrun (gloo): trains, checkpoints (which checks that the replicas are identical),
    and splits --sample over the two processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
              os.path.join(HERE, "train.py"), "--steps", "3", "--batch-size", "32", "--out", str(tmp_path)]
    for extra in ([], ["--sample", "101"], ["--sample", "1"]):  # the last: process 1 has no share
        p = subprocess.run(common + extra, capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
    assert np.load(tmp_path / "samples-1-nfe1.npz")["arr_0"].shape == (1, 2)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # a random stream per process
    pts = np.load(tmp_path / "samples-101-nfe1.npz")["arr_0"]
    assert pts.shape == (101, 2) and leftovers(tmp_path) == []
    # the same 101 samples as one process draws from that checkpoint: each number once, none twice
    os.makedirs(tmp_path / "one")
    shutil.copy(tmp_path / "ckpt.pt", tmp_path / "one" / "ckpt.pt")
    code, _, err = run_main(["--steps", 3, "--batch-size", 32, "--out", tmp_path / "one", "--sample", 101], capsys)
    assert code == 0, err
    assert np.allclose(np.load(tmp_path / "one" / "samples-101-nfe1.npz")["arr_0"], pts, atol=1e-6)



def test_dtd_window_resumes_per_process_under_torchrun(tmp_path):
    """Each process adds its own v-losses to DTD's window sums between all-reduces: the checkpoint keeps every
    process's part (it kept process 0's for all, so a resumed window summed other numbers and could decide another
    stage), and a resumed two-process run ends with the curriculum and weights of the uninterrupted one."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = lambda out, *extra: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", os.path.join(HERE, "train.py"), "--recipe",
                               "improved-dtd", "--set", "dtd_share=0", "--set", "dtd_window=3", "--set",
                               "dtd_patience=1000", "--steps", "5", "--batch-size", "32", "--out", str(out), *extra]
    for argv in (cmd(tmp_path / "a"), cmd(tmp_path / "b", "--stop-at", "4"), cmd(tmp_path / "b", "--resume")):
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180)
        assert p.returncode == 0, p.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    # windows of 3 steps: the first ended at step 3, the second holds steps 4 (before the stop) and 5 (after it)
    assert len(a["dtd_acc"]) == 2 and a["dtd_acc"][0] != a["dtd_acc"][1] and a["dtd_acc"][1][2] == 2
    assert a["method"] == b["method"] and a["dtd_acc"] == b["dtd_acc"] and a["method"]["dtd_prev"] is not None
    fa, fb = flat_state(a), flat_state(b)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_a_failure_while_drawing_pictures_keeps_that_steps_checkpoint(tmp_path, capsys, monkeypatch):
    """The checkpoint is written before the pictures of the same step: a decoder out of memory at the first
    pictures (step 10,000 by default) leaves the checkpoint to resume from, not nothing."""
    def out_of_memory(args, job):
        raise RuntimeError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(train, "evaluate", out_of_memory)
    code, _, err = run_main(["--steps", 4, "--batch-size", 16, "--eval-every", 2, "--ckpt-every", 2, "--out",
                             tmp_path], capsys)
    assert_one_line_error(code, err, "out of memory")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2

@pytest.mark.parametrize("recipe", list(mf.RECIPES))
def test_every_recipe_trains_and_samples(tmp_path, capsys, recipe):
    """Two steps of each recipe with labels (Fashion-MNIST format, a tiny DiT; iMF with its conditions), --sample."""
    make_fashion(str(tmp_path / "fm"))
    common = ["--data", "fashion-mnist", "--data-path", tmp_path / "fm", "--model", "Ti/4", "--batch-size", 4,
              "--recipe", recipe, "--out", tmp_path / "run"]
    code, _, err = run_main(common + ["--steps", 2, "--log-every", 1], capsys)
    assert code == 0, err
    log = [json.loads(s) for s in open(tmp_path / "run" / "log.jsonl")]
    assert [h["step"] for h in log] == [1, 2] and all(np.isfinite(h["loss"]) for h in log)
    code, _, err = run_main(common + ["--sample", 2, "--sample-steps", 2], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: a run stopped at step k and resumed ends bitwise where an uninterrupted run ends


def flat_state(ckpt):
    out = {f"{k}.{n}": v for k in ("model", "ema") for n, v in ckpt[k].items()}
    for i, s in ckpt["opt"]["state"].items():
        out.update({f"opt.{i}.{n}": v for n, v in s.items()})
    return out


@pytest.mark.parametrize("setting", ["toy", "fashion-mnist"])
def test_resume_is_bitwise_identical(tmp_path, capsys, setting):
    if setting == "toy":
        common = ["--steps", 8, "--batch-size", 64, "--recipe", "improved-dtd", "--log-every", 2]
    else:  # labels, class dropout, guidance in the target, a DiT with attention under the JVP
        make_fashion(str(tmp_path / "fm"))
        common = ["--data", "fashion-mnist", "--data-path", tmp_path / "fm", "--model", "Ti/4", "--steps", 6,
                  "--batch-size", 8, "--recipe", "improved-minsnr", "--omega", 2.0, "--kappa", 0.3, "--log-every", 2]
    assert run_main(common + ["--out", tmp_path / "a"], capsys)[0] == 0
    code, _, err = run_main(common + ["--out", tmp_path / "b", "--stop-at", 4], capsys)  # preempted after step 4
    assert code == 0, err
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 4
    code, _, err = run_main(common + ["--out", tmp_path / "b", "--resume"], capsys)
    assert code == 0, err
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == common[common.index("--steps") + 1]
    fa, fb = flat_state(a), flat_state(b)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)  # bitwise
    assert a["method"] == b["method"] and a["rng"][0]["python"] == b["rng"][0]["python"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    logs = [[json.loads(s) for s in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert [h["step"] for h in logs[1]] == [h["step"] for h in logs[0]]
    assert [h["loss"] for h in logs[1]] == [h["loss"] for h in logs[0]]
    assert leftovers(tmp_path / "b") == []


# ----------------------------------------------------------------------------------------------------------
# Samples in the ADM evaluator's format, and the metrics


def test_sample_npz_format(tmp_path, capsys, monkeypatch):
    x, _ = make_fashion(str(tmp_path / "fm"))
    common = ["--data", "fashion-mnist", "--data-path", tmp_path / "fm", "--model", "Ti/4", "--batch-size", 4,
              "--out", tmp_path / "run"]
    assert run_main(common + ["--steps", 1], capsys)[0] == 0
    assert os.path.exists(tmp_path / "run" / "step-0000001.png") and os.path.exists(tmp_path / "run" / "loss.png")
    calls = []  # FID needs pytorch-fid's weights: a stand-in records what it is asked to compare
    monkeypatch.setattr(train, "fid", lambda images, ref, device: calls.append((images, ref)) or 1.0)
    code, out, err = run_main(common + ["--sample", 12, "--sample-steps", 2], capsys)
    assert code == 0, err
    npz = np.load(tmp_path / "run" / "samples-12-nfe2.npz")
    assert sorted(npz.files) == ["arr_0", "arr_1"]
    assert npz["arr_0"].shape == (12, 32, 32, 3) and npz["arr_0"].dtype == np.uint8  # gray repeated to RGB
    assert (npz["arr_0"][..., 0] == npz["arr_0"][..., 2]).all() and npz["arr_1"].tolist() == [i % 10 for i in range(12)]
    # the samples written, against the training images (28 x 28, padded to 32) by default
    assert len(calls) == 1 and np.array_equal(calls[0][0], npz["arr_0"])
    assert np.array_equal(calls[0][1][:, 2:30, 2:30, 0], x) and "FID 1.00 of 12 samples" in out
    assert leftovers(tmp_path / "run") == []


def test_toy_sample_reports_distances(tmp_path, capsys):
    common = ["--steps", 2, "--batch-size", 32, "--out", tmp_path]
    assert run_main(common, capsys)[0] == 0
    code, out, err = run_main(common + ["--sample", 500], capsys)
    assert code == 0, err
    pts = np.load(tmp_path / "samples-500-nfe1.npz")["arr_0"]
    assert pts.shape == (500, 2)
    # the distances of the samples written, to a fresh draw of the data (not to themselves, not to the data's own)
    ref = td.sample("checkerboard", 500, generator=torch.Generator().manual_seed(12345))
    printed = [float(v) for v in re.search(r"energy distance ([\d.]+), sliced Wasserstein ([\d.]+)", out).groups()]
    assert printed == pytest.approx([td.energy_distance(torch.from_numpy(pts), ref),
                                     td.sliced_wasserstein(torch.from_numpy(pts), ref)], abs=2e-5)
    assert printed[0] > 0.01  # two steps from a zero start: samples are still noise, far from the board


def test_fid_plumbing_with_a_stand_in_inception(monkeypatch):
    """fid() feeds uint8 NHWC images in [0, 1] NCHW to pytorch_fid's InceptionV3 and takes its pooled features.
    The real network downloads weights, so a stand-in with the same interface checks the plumbing here."""
    import types

    class FakeInception(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            super().__init__()
            assert blocks == [3]

        def forward(self, x):  # (N, 3, H, W) in [0, 1] -> [(N, 6, 1, 1)]: channel means and stds
            assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.shape[1] == 3
            seen.append(x)
            return [torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)[:, :, None, None]]

    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", types.SimpleNamespace(InceptionV3=FakeInception))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (500, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (450, 8, 8, 3), dtype=np.uint8)
    seen = []
    assert train.fid(a, b, "cpu") < 1e-3 < train.fid(a, b // 2, "cpu")  # same law ~ 0; darker images far
    # NHWC uint8 -> NCHW in [0, 1], every image once, in batches of 200
    assert torch.equal(torch.cat(seen[:3]), torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255)
    assert [len(x) for x in seen] == [200, 200, 100, 200, 200, 50] * 2


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (200_000, 2)) * [1, 2]  # N(0, diag(1, 4))
    b = rng.normal(0, 1, (200_000, 2)) * [3, 1] + [1, 0]  # N((1, 0), diag(9, 1))
    exact = 1 + (1 + 9 - 2 * 3) + (4 + 1 - 2 * 2)  # |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)) per axis
    assert abs(train.frechet_distance(a, b) - exact) < 0.1
    assert abs(train.frechet_distance(a, a)) < 1e-6


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the problem and the fix, exit code 2, nothing half-written


@pytest.mark.parametrize("argv, words", [
    (["--data", "mnist"], ["unknown --data", "fashion-mnist"]),
    (["--model", "XXL/2", "--data", "cifar10"], ["unknown --model", "XL/2"]),
    (["--model", "S/2"], ["does not fit --data checkerboard"]),
    (["--recipe", "shortcut"], ["unknown --recipe", "improved-dtd"]),
], ids=["data", "model", "model-for-data", "recipe"])
def test_unknown_names(tmp_path, capsys, argv, words):
    assert_one_line_error(*run_main(argv + ["--out", tmp_path / "run"], capsys)[::2], *words)
    assert not os.path.exists(tmp_path / "run")


def test_missing_and_malformed_data(tmp_path, capsys):
    run = ["--out", tmp_path / "run", "--model", "Ti/4", "--steps", 1]
    code, _, err = run_main(["--data", "fashion-mnist", "--data-path", tmp_path / "nowhere"] + run, capsys)
    assert_one_line_error(code, err, "nowhere")
    os.makedirs(tmp_path / "empty")
    code, _, err = run_main(["--data", "fashion-mnist", "--data-path", tmp_path / "empty"] + run, capsys)
    assert_one_line_error(code, err, "train-images-idx3-ubyte", "apt-get install dataset-fashion-mnist")
    make_fashion(str(tmp_path / "fm"))
    raw = gzip.open(tmp_path / "fm" / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "fm" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])  # truncated
    code, _, err = run_main(["--data", "fashion-mnist", "--data-path", tmp_path / "fm"] + run, capsys)
    assert_one_line_error(code, err, "not a valid IDX file")
    with open(tmp_path / "empty" / "cifar-10-python.tar.gz", "wb") as f:
        f.write(b"not a tarball")
    code, _, err = run_main(["--data", "cifar10", "--data-path", tmp_path / "empty"] + run, capsys)
    assert_one_line_error(code, err, "CIFAR-10")
    os.makedirs(tmp_path / "latents")
    code, _, err = run_main(["--data", "imagenet-latents", "--data-path", tmp_path / "latents"] + run, capsys)
    assert_one_line_error(code, err, "--prepare-imagenet")
    assert not os.path.exists(tmp_path / "run")


def test_cifar10_offline_download_fails_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens there: as good as offline
    code, _, err = run_main(["--data", "cifar10", "--data-path", tmp_path / "c", "--model", "Ti/4",
                             "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "could not download CIFAR-10", "cifar-10-python.tar.gz")
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "run")


def test_checkpoint_from_another_model(tmp_path, capsys):
    make_fashion(str(tmp_path / "fm"))
    common = ["--data", "fashion-mnist", "--data-path", tmp_path / "fm", "--batch-size", 4, "--steps", 1,
              "--out", tmp_path / "run"]
    assert run_main(common + ["--model", "Ti/4"], capsys)[0] == 0
    before = sorted(os.listdir(tmp_path / "run"))
    code, _, err = run_main(common + ["--model", "Ti/2", "--resume", "--steps", 2], capsys)
    assert_one_line_error(code, err, "--model Ti/4")
    code, _, err = run_main(common + ["--model", "Ti/2", "--sample", 4], capsys)
    assert_one_line_error(code, err, "--model Ti/4")
    with open(tmp_path / "run" / "ckpt.pt", "r+b") as f:
        f.truncate(100)  # corrupt
    code, _, err = run_main(common + ["--model", "Ti/4", "--resume", "--steps", 2], capsys)
    assert_one_line_error(code, err, "not a readable checkpoint")
    assert sorted(os.listdir(tmp_path / "run")) == before


def test_batch_not_divisible_by_the_world_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # without RANK, not a torchrun process: one process, any batch
    code, _, err = run_main(["--batch-size", 256, "--steps", 2, "--out", tmp_path / "one"], capsys)
    assert code == 0, err
    monkeypatch.setenv("RANK", "0")  # as torchrun --nproc_per_node=3 sets them; checked before any collective
    code, _, err = run_main(["--batch-size", 256, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "process 0 of 3: --batch-size 256", "3 processes")  # each process says which
    assert not os.path.exists(tmp_path / "run")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # lr = 1e30 blows the weights up after the first step; the loss of step 2 is not finite.
    code, _, err = run_main(["--steps", 5, "--batch-size", 32, "--lr", 1e30, "--ckpt-every", 1, "--log-every", 1,
                             "--out", tmp_path], capsys)
    assert_one_line_error(code, err, "at step 2", "ckpt.pt (step 1) is the last checkpoint", "--overwrite")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
    assert leftovers(tmp_path) == [] and not any(f.endswith(".png") for f in os.listdir(tmp_path))


def test_cli_exit_code_and_single_line(tmp_path):
    """The real command line: exit status 2 and one line on stderr (the tests above call main() in-process)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--model", "nope"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("train.py: error: unknown --model")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# bf16 autocast: the JVP and the loss stay close to fp32 (CPU autocast supports bf16; GPUs are checked below)


def _jvp_and_loss(device, bf16):
    torch.manual_seed(0)
    net = mf.DiT_models["Ti/4"](input_size=16, in_channels=3, num_classes=10).to(device)
    for p in net.parameters():  # leave the zero-initialised state, so that u and du/dt are not trivially 0
        torch.nn.init.normal_(p, std=0.05)
    method = mf.MeanFlow("meanflow", omega=2.0, kappa=0.3, p=0.0)  # p = 0: the plain squared error, no normalising
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(8, 3, 16, 16, generator=g).to(device), torch.randn(8, 3, 16, 16, generator=g).to(device)
    t = torch.rand(8, generator=g).to(device)
    r = t * torch.rand(8, generator=g).to(device)
    z, y = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * e, torch.arange(8, device=device)
    ctx = torch.autocast(device, torch.bfloat16) if bf16 else torch.autocast(device, enabled=False)
    with ctx:
        u, dudt = mf.jvp(lambda z, t, r: net(z, t, r, y), (z, t, r), (e - x, torch.ones_like(t), torch.zeros_like(r)))
        torch.manual_seed(2)  # the same label drops in both runs
        loss, _ = method.loss(net, x, y, t=t, r=r, e=e)
    return u.float(), dudt.float(), loss.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bf16_autocast_jvp_is_close_to_fp32_on_cpu():
    (u, dudt, loss), (u32, dudt32, loss32) = _jvp_and_loss("cpu", True), _jvp_and_loss("cpu", False)
    assert torch.isfinite(dudt).all() and torch.isfinite(loss)
    # measured: 0.4% on u, 0.5% on du/dt, 0.02% on the loss
    assert _rel(u, u32) < 0.02 and _rel(dudt, dudt32) < 0.02 and abs(loss - loss32) / loss32 < 0.01, (
        _rel(u, u32), _rel(dudt, dudt32), (loss, loss32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast and TF32 as train.py uses)")
def test_bf16_autocast_jvp_is_close_to_fp32_on_gpu():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    (u, dudt, loss), (u32, dudt32, loss32) = _jvp_and_loss("cuda", True), _jvp_and_loss("cuda", False)
    assert _rel(u, u32) < 0.02 and _rel(dudt, dudt32) < 0.02 and abs(loss - loss32) / loss32 < 0.01


# --- fidelity: the official iMF network, iMF sampling, each dataset's recipe, FID references ---
def imf_count(depth, D, heads, p=2, C=4, K=1000):
    """Parameters of the official iMF network at sampling (models/imfDiT.py, v-head blocks left out), counted
    from its layer list: per block q, k, v, out (D x D, no bias), QK-norm, SwiGLU (3 D F, F = int(D * 8/3)), two
    RMSNorms, two gates; four scalar embedders (256 -> D -> D), K + 1 label rows, 20 tokens, the patch embedding
    and two final layers (RMSNorm + linear)."""
    F = int(D * (8 / 3))
    block = 4 * D * D + 2 * (D // heads) + 3 * D * F + 4 * D
    rest = (4 * (256 * D + D + D * D + D) + (K + 1) * D + 20 * D + (p * p * C * D + D)
            + 2 * (D + D * p * p * C + p * p * C))
    return depth * block + rest


@pytest.mark.parametrize("name,paper", [("B/2", 89e6), ("M/2", None), ("L/2", None), ("XL/2", None)])
def test_imf_parameter_counts_match_the_official_config(name, paper):
    with torch.device("meta"):
        net = mf.iMF_models[name](input_size=32, in_channels=4, num_classes=1000)
    v_blocks = {id(p) for p in net.v_blocks.parameters()}
    n = sum(p.numel() for p in net.parameters() if id(p) not in v_blocks)
    depth, D, heads, _ = mf.iMF_sizes[name[:-2]]
    official = imf_count(depth, D, heads)
    assert n == official, (n, official)
    if paper:
        assert abs(n - paper) < 0.5e6, n  # the iMF paper: iMF-B/2 89M (rounded to 1M)
    assert len(net.blocks) + len(net.u_blocks) == depth and len(net.v_blocks) == 8
    assert net.u_blocks[0].mlp.w1.out_features == {768: 2048, 1024: 2730}[D]  # 8/3, truncated as the official code
    assert all(m.bias is None for m in net.u_blocks[0].modules() if isinstance(m, torch.nn.Linear))


def test_imf_network_zero_init_conditions_on_h_only_and_branches_the_v_head():
    net = tiny_imf(num_classes=3)
    z, t, r, y = inputs_for(net, dtype=torch.float32)
    u, v = net(z, t, r, y, return_v=True)
    assert u.abs().max() == 0 and v.abs().max() == 0 and u.shape == z.shape  # zero-initialised outputs
    net = randomize(net, std=0.3)  # at 0.1 the condition tokens move u by ~1e-5 only
    assert net.prefix == 20 and net.rope_cos.shape == (20 + 16, 8)  # 8 + 4 + 2 + 2 + 4 tokens, then 16 patches
    u, v = net(z, t, r, y, return_v=True)
    assert torch.equal(net(z, t, r, y), u)  # the u path does not depend on whether the v-head runs
    calls = []  # return_v="only" (iMF's own v at r = t in the loss, its Euler sampler): v alone, no u-head block runs
    hooks = [b.register_forward_hook(lambda *_: calls.append(1)) for b in net.u_blocks]
    assert torch.equal(net(z, t, r, y, return_v="only"), v) and not calls
    for h in hooks:
        h.remove()
    for other in (tiny_dit(in_context=True, guidance_cond=True, v_head=True), mf.MLP(dim=2, v_head=True)):
        other = randomize(other, std=0.3)
        a = inputs_for(other, dtype=torch.float32)
        assert torch.equal(other(*a, return_v="only"), other(*a, return_v=True)[1])
    shift = 0.05 * torch.ones_like(t)
    assert torch.allclose(net(z, t + shift, r + shift, y), u, atol=1e-6)  # same h = t - r: same u (no t input)
    assert not torch.allclose(net(z, t, r * 0.5, y), u, atol=1e-3)  # another h: another u
    with torch.no_grad():
        net.v_blocks[0].mlp.w2.weight.add_(1.0)  # the v-head's own blocks move v only
    u2, v2 = net(z, t, r, y, return_v=True)
    assert torch.equal(u2, u) and not torch.allclose(v2, v, atol=1e-3)
    with torch.no_grad():
        net.blocks[0].mlp.w2.weight.add_(1.0)  # the shared blocks move both
    u3, v3 = net(z, t, r, y, return_v=True)
    assert not torch.allclose(u3, u, atol=1e-3) and not torch.allclose(v3, v2, atol=1e-3)
    # omega and the interval are conditions; the null label is a class of its own
    assert not torch.allclose(net(z, t, r, y, omega=torch.full_like(t, 4.0)), u3, atol=1e-3)
    assert not torch.allclose(net(z, t, r, None), u3, atol=1e-3)


def test_imf_rope_is_the_complex_rotation_of_channel_pairs_and_relative():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64)  # (B, H, N, d)
    cos, sin = mf.rope_cos_sin(8, 10)
    rot = mf.apply_rope(x, cos, sin)
    # ground truth: pairs (2i, 2i+1) as complex numbers times exp(i * pos * 10000^(-2i/d))
    freqs = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = torch.arange(10, dtype=torch.float64)[:, None] * freqs
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 10, 4, 2).contiguous()) * torch.polar(
        torch.ones_like(angles), angles)).reshape(x.shape)
    assert torch.allclose(rot, ref, atol=1e-6)
    # scores depend on the distance of two positions only: q at i, k at j equals q at i + 3, k at j + 3
    q, k = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    rq = mf.apply_rope(q.expand(1, 1, 10, 8), cos, sin)[0, 0]
    rk = mf.apply_rope(k.expand(1, 1, 10, 8), cos, sin)[0, 0]
    assert abs(rq[2] @ rk[5] - rq[5] @ rk[8]) < 1e-5 and abs(rq[2] @ rk[5] - rq[2] @ rk[6]) > 1e-3


@pytest.mark.parametrize("jvp", JVPS)
def test_imf_network_jvp_of_u_and_v_matches_finite_differences_fp64(jvp):
    net = randomize(tiny_imf(num_classes=3)).double()
    z, t, r, y = inputs_for(net)
    cond = dict(omega=torch.tensor([1.0, 2.5, 7.0], dtype=torch.float64), t_min=torch.tensor([0.0, 0.2, 0.4],
                dtype=torch.float64), t_max=torch.tensor([1.0, 0.7, 0.6], dtype=torch.float64))
    dv = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f = lambda z, t, r: net(z, t, r, y, **cond, return_v=True)
    for backend in ("sdpa", "math"):
        net.set_attention(backend)
        _, (dudt, dvdt) = JVPS[jvp](f, (z, t, r), (dv, torch.ones_like(t), torch.zeros_like(r)))
        h = 1e-6
        (up, vp), (um, vm) = f(z + h * dv, t + h, r), f(z - h * dv, t - h, r)
        assert rel(dudt, (up - um) / (2 * h)) < 1e-7 and rel(dvdt, (vp - vm) / (2 * h)) < 1e-7


def test_imf_recipe_trains_the_imf_network_and_samples_guided(tmp_path, capsys, monkeypatch):
    seen = []
    sample = mf.MeanFlow.sample
    monkeypatch.setattr(mf.MeanFlow, "sample", lambda self, net, e, y=None, steps=1, **g: (
        seen.append((type(net).__name__, steps, g)), sample(self, net, e, y, steps, **g))[1])
    two_step = dict(omega=2.0, t_min=0.1, t_max=0.9)  # as if Ti/4 had an official 2-NFE setting (XL/2 alone has)
    monkeypatch.setitem(mf.imf_guidance_2nfe, "Ti/4", two_step)
    make_fashion(str(tmp_path / "fm"))
    common = ["--data", "fashion-mnist", "--data-path", tmp_path / "fm", "--model", "Ti/4", "--batch-size", 4,
              "--recipe", "imf", "--steps", 1]
    assert run_main(common + ["--out", tmp_path / "a"], capsys)[0] == 0
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert any(k.startswith("u_blocks.") for k in ckpt["model"]) and "tokens.cls" in ckpt["model"]
    # the training pictures are guided: the official training config's setting for a size without an eval entry
    # in 1 step, the size's 2-NFE setting in 2 steps
    assert {1, 2} == {k for _, k, _ in seen}, seen
    assert all(s == ("iMFDiT", k, train.IMF_PICTURE_GUIDANCE if k == 1 else two_step) for s in seen for k in [s[1]])
    seen.clear()
    assert run_main(common + ["--out", tmp_path / "a", "--sample", 2, "--sample-steps", 2], capsys)[0] == 0
    assert seen == [("iMFDiT", 2, two_step)]
    seen.clear()
    code, _, err = run_main(common + ["--out", tmp_path / "a", "--sample", 3, "--sample-omega", 3.0,
                                      "--sample-interval", 0.2, 0.7, "--sample-steps", 2], capsys)
    assert code == 0, err
    assert seen == [("iMFDiT", 2, dict(omega=3.0, t_min=0.2, t_max=0.7))]  # the options win at any NFE
    code, _, err = run_main(common + ["--out", tmp_path / "b", "--model", "S/4"], capsys)
    assert_one_line_error(code, err, "--recipe imf", "S/4")


@pytest.mark.parametrize("model,expect", [("B/2", (8.0, 0.4, 0.65)), ("M/2", (10.5, 0.4, 0.6)),
                                          ("L/2", (10.5, 0.4, 0.6)), ("XL/2", (8.0, 0.42, 0.62))])
def test_imf_sampling_defaults_per_size_as_the_official_eval_config(model, expect):
    args = train.get_args(["--data", "imagenet-latents", "--model", model, "--recipe", "imf"])
    g = train.sample_guidance(args, train.make_method(args))
    assert (g["omega"], g["t_min"], g["t_max"]) == expect
    assert (args.batch_size, args.epochs, args.lr) == (1024, 640, 1e-4)  # iMF's training budget (official config)
    g2 = train.sample_guidance(args, train.make_method(args), steps=2)  # the config's one 2-NFE setting: XL/2's
    assert (g2["omega"], g2["t_min"], g2["t_max"]) == ((4.0, 0.36, 0.64) if model == "XL/2" else expect)
    args = train.get_args(["--data", "imagenet-latents", "--model", model, "--recipe", "imf", "--sample-omega", "4",
                           "--sample-interval", "0.36", "0.64"])
    assert train.sample_guidance(args, train.make_method(args)) == dict(omega=4.0, t_min=0.36, t_max=0.64)


@pytest.mark.parametrize("argv,words", [
    (["--recipe", "meanflow", "--sample-interval", "0.4", "0.6"], ["--sample-interval", "--recipe imf"]),
    (["--recipe", "imf", "--sample-interval", "0.7", "0.6"], ["--sample-interval", "T_MIN <= T_MAX"]),
    (["--recipe", "imf", "--sample-omega", "0.5"], ["--sample-omega", "1 or more"]),
    (["--set", "P_mean"], ["--set", "KEY=VALUE", "P_mean"]),
    (["--set", "data_proportion=0.75"], ["data_proportion", "ratio_r_neq_t"]),
    (["--set", "imf=true"], ["imf=true", "KEY=VALUE"]),  # iMF is chosen with --recipe imf (its own network)
    (["--set", "p=high"], ["--set p", "a number"]),
    (["--set", "dtd_stages=2.5"], ["dtd_stages", "an integer"]),
    (["--set", "time_sampler=gaussian"], ["time_sampler", "logit_normal or uniform"]),
    (["--set", "beta_k=nan"], ["beta_k", "or none"]),
    (["--data", "cifar10", "--omega", "2"], ["--omega", "unconditional"]),
    (["--recipe", "imf", "--omega", "2"], ["--omega", "--sample-omega"]),
    (["--data", "cifar10", "--recipe", "imf", "--dropout", "0.2"], ["--dropout", "iMF"]),
    (["--recipe", "imf", "--set", "beta_k=1"], ["iMF has its own loss", "--set"]),
    (["--recipe", "improved-dtd", "--set", "minsnr_gamma=5"], ["DTD and MinSNR", "--set"]),
])
def test_sampling_and_recipe_flags_fail_in_one_line(tmp_path, capsys, argv, words):
    make_fashion(str(tmp_path / "fm"))
    data = [] if "--data" in argv else ["--data", "fashion-mnist", "--data-path", tmp_path / "fm"]
    code, _, err = run_main(data + ["--model", "Ti/4", "--steps", 1, "--batch-size", 4, "--out", tmp_path / "run"]
                            + argv, capsys)
    assert_one_line_error(code, err, *words)
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_cifar10_gets_its_own_recipe_and_never_imagenet_guidance():
    args = train.get_args(["--data", "cifar10", "--model", "B/2"])
    assert ((args.class_cond, args.dropout, args.lr, args.batch_size, args.recipe)
            == (False, 0.2, 6e-4, 1024, "meanflow"))
    m = train.make_method(args)
    assert (m.P_mean, m.P_std, m.p, m.c, m.ratio_r_neq_t) == (-2.0, 2.0, 0.75, 1e-3, 0.75)
    assert (m.omega, m.kappa, m.t_lo, m.t_hi) == (1.0, 0.0, 0.0, 1.0)  # not paper_guidance["B/2"]
    # class-conditional CIFAR-10 on request: still no ImageNet table; ImageNet latents do get it
    args = train.get_args(["--data", "cifar10", "--model", "B/2", "--class-cond", "--lr", "1e-4"])
    assert args.class_cond and args.lr == 1e-4 and train.make_method(args).omega == 1.0
    m = train.make_method(train.get_args(["--data", "fashion-mnist", "--model", "L/2"]))  # pixels: no table either
    assert (m.omega, m.kappa, m.t_hi, m.P_mean) == (1.0, 0.0, 1.0, -0.4)
    m = train.make_method(train.get_args(["--data", "imagenet-latents", "--model", "B/2"]))
    assert (m.omega, m.kappa, m.P_mean, m.ratio_r_neq_t) == (1.0, 0.5, -0.4, 0.25)
    m = train.make_method(train.get_args(["--data", "imagenet-latents", "--model", "L/2"]))
    assert (m.omega, m.kappa, m.t_hi) == (0.2, 0.92, 0.8)
    # --set comes last: over the dataset's knobs and the guidance table
    m = train.make_method(train.get_args(["--data", "cifar10", "--set", "P_mean=-1.5", "--set", "beta_k=none",
                                          "--set", "dtd_stages=4", "--set", "p=0.5"]))
    assert (m.P_mean, m.P_std, m.beta_k, m.dtd_stages, m.p) == (-1.5, 2.0, None, 4, 0.5)
    m = train.make_method(train.get_args(["--data", "imagenet-latents", "--model", "XL/2", "--set", "kappa=0.5"]))
    assert (m.omega, m.kappa) == (0.2, 0.5)


def test_b4_guidance_is_the_official_240_epoch_setting():
    assert mf.paper_guidance["B/4"] == dict(omega=1.0, kappa=0.5, t_lo=0.0, t_hi=1.0)
    m = train.make_method(train.get_args(["--data", "imagenet-latents", "--model", "B/4"]))
    assert (m.omega, m.kappa, m.recipe) == (1.0, 0.5, "improved-dtd")


def test_cifar10_run_is_unconditional_with_dropout(tmp_path, capsys):
    make_cifar_tarball(str(tmp_path / "c"))
    common = ["--data", "cifar10", "--data-path", tmp_path / "c", "--model", "Ti/4", "--batch-size", 4,
              "--out", tmp_path / "run"]
    args = train.get_args([str(a) for a in common])
    data = train.load_data(args, 0)
    assert train.get_batch(args, data, 0, 0, 1)[1] is None  # no labels reach the loss
    net = train.set_up(train.get_args([str(a) for a in common])).net  # the network the run trains
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.2] * len(net.blocks)
    code, _, err = run_main(common + ["--steps", 2], capsys)
    assert code == 0, err
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert not any(k.startswith("y_embedder") for k in ckpt["model"]) and ckpt["args"]["dropout"] == 0.2
    code, out, err = run_main(common + ["--sample", 3], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "run" / "samples-3-nfe1.npz").files == ["arr_0"]  # no labels: unconditional


def test_dit_dropout_is_training_only_and_the_jvp_sees_the_primal_mask():
    net = randomize(tiny_dit(num_classes=3, dropout=0.3)).double()
    assert net.state_dict().keys() == tiny_dit(num_classes=3).state_dict().keys()  # no new parameters
    z, t, r, y = inputs_for(net)
    assert not torch.equal(net(z, t, r, y), net(z, t, r, y))  # training: a fresh mask per call
    net.eval()
    assert torch.equal(net(z, t, r, y), net(z, t, r, y))
    net.train()
    v, h = torch.randn_like(z), 1e-6

    def f(z, t, r):  # the same mask in every call
        torch.manual_seed(7)
        return net(z, t, r, y)

    _, dudt = mf.jvp(f, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    assert rel(dudt, (f(z + h * v, t + h, r) - f(z - h * v, t - h, r)) / (2 * h)) < 1e-7


def _stand_in_features(images, device):  # 6 cheap, deterministic features: channel means and stds in [0, 1]
    x = torch.from_numpy(images).double() / 255
    return torch.cat([x.mean((1, 2)), x.std((1, 2))], 1).numpy()


def test_fid_uses_the_reference_mu_sigma_when_the_file_has_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "inception_features", _stand_in_features)
    monkeypatch.setattr(train, "FID_DIMS", 6)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (400, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (400, 8, 8, 3), dtype=np.uint8)
    fb = _stand_in_features(b // 2, "cpu")  # mu/sigma of other images than arr_0, as the ADM reference batch
    np.savez(tmp_path / "ref.npz", arr_0=b, mu=fb.mean(0), sigma=np.cov(fb, rowvar=False))
    ref, what = train.fid_reference(str(tmp_path / "ref.npz"))
    assert isinstance(ref, tuple) and "mu/sigma" in what
    with_stats = train.fid(a, ref, "cpu")
    assert abs(with_stats - train.frechet_distance(_stand_in_features(a, "cpu"), fb)) < 1e-9
    assert train.fid(a, b, "cpu") < 1e-3 < with_stats  # from arr_0 the same law scores ~0: not what ADM reports
    np.savez(tmp_path / "images.npz", arr_0=b)  # no mu/sigma: the images
    ref, what = train.fid_reference(str(tmp_path / "images.npz"))
    assert ref.shape == b.shape and "400 images arr_0" in what
    np.savez(tmp_path / "bad.npz", arr_0=b.astype(np.float32))
    with pytest.raises(train.Fail, match="uint8"):
        train.fid_reference(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "dims.npz", mu=np.zeros(5), sigma=np.eye(5))  # statistics of other features
    with pytest.raises(train.Fail, match="6-d pool features"):
        train.fid_reference(str(tmp_path / "dims.npz"))
    np.savez(tmp_path / "mu.npz", mu=np.zeros(5), sigma=np.eye(6))  # mu alone of another length
    with pytest.raises(train.Fail, match="6-d pool features"):
        train.fid_reference(str(tmp_path / "mu.npz"))
    np.savez(tmp_path / "grey.npz", arr_0=b[..., :1])  # one channel: not the evaluator's RGB images
    with pytest.raises(train.Fail, match="uint8 N x H x W x 3"):
        train.fid_reference(str(tmp_path / "grey.npz"))
    # end to end: --sample --fid-ref says what it compared against and which number to compare with papers
    make_fashion(str(tmp_path / "fm"))
    common = ["--data", "fashion-mnist", "--data-path", tmp_path / "fm", "--model", "Ti/4", "--batch-size", 4,
              "--out", tmp_path / "run"]
    assert run_main(common + ["--steps", 1], capsys)[0] == 0
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "images.npz").read_bytes()[:200])  # a truncated zip
    np.save(tmp_path / "array.npy", b)
    os.rename(tmp_path / "array.npy", tmp_path / "array.npz")  # an .npy under an .npz name
    before = sorted(os.listdir(tmp_path / "run"))
    for bad in ("garbage.npz", "cut.npz", "array.npz", "dims.npz", "none.npz"):  # refused before any sample is drawn
        code, _, err = run_main(common + ["--sample", 20, "--fid-ref", tmp_path / bad], capsys)
        assert_one_line_error(code, err, f"--fid-ref {tmp_path / bad}",
                              *(["does not exist", "pass a reference .npz"] if bad == "none.npz" else []))
    assert sorted(os.listdir(tmp_path / "run")) == before
    np.savez(tmp_path / "ref32.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8), mu=fb.mean(0),
             sigma=np.cov(fb, rowvar=False))
    code, out, err = run_main(common + ["--sample", 20, "--fid-ref", tmp_path / "ref32.npz"], capsys)
    assert code == 0, err
    assert "the mu/sigma stored in" in out and "pytorch-fid's Inception" in out and "ADM evaluator" in out
    assert "labels balanced over 10 classes" in out


def test_fid_needs_two_images_on_each_side(tmp_path, monkeypatch, capsys):
    """One image has no covariance: np.cov gives NaN, on which scipy's sqrtm of 2048 x 2048 never returned (and no
    signal could stop it). A reference of fewer than 2 images is refused before sampling; --sample 1 writes its
    sample and skips the FID."""
    f = _stand_in_features(np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), "cpu")
    for a, b in ((f[:1], f), (f, f[:1]), (f[:0], f)):
        with pytest.raises(ValueError, match="at least 2 rows"):
            train.frechet_distance(a, b)
    assert train.frechet_distance(f[:2], (f.mean(0), np.cov(f, rowvar=False))) > 0  # 2 rows, and mu/sigma: fine
    for n in (0, 1):  # an empty arr_0 used to pass and fail after sampling (torch.cat of no features)
        np.savez(tmp_path / f"ref{n}.npz", arr_0=np.zeros((n, 32, 32, 3), np.uint8))
        with pytest.raises(train.Fail, match="N >= 2"):
            train.fid_reference(str(tmp_path / f"ref{n}.npz"))
    make_fashion(str(tmp_path / "fm"))
    common = ["--data", "fashion-mnist", "--data-path", tmp_path / "fm", "--model", "Ti/4", "--batch-size", 4,
              "--out", tmp_path / "run"]
    assert run_main(common + ["--steps", 1], capsys)[0] == 0
    calls = []
    monkeypatch.setattr(train, "fid", lambda images, ref, device: calls.append(len(images)) or 1.0)
    code, _, err = run_main(common + ["--sample", 4, "--fid-ref", tmp_path / "ref1.npz"], capsys)
    assert_one_line_error(code, err, f"--fid-ref {tmp_path / 'ref1.npz'}", "N >= 2")
    code, out, err = run_main(common + ["--sample", 1], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "run" / "samples-1-nfe1.npz")["arr_0"].shape == (1, 32, 32, 3)
    assert calls == [] and "FID skipped: 1 samples against the 40 training images" in out
    assert run_main(common + ["--sample", 2], capsys)[0] == 0 and calls == [2]


def test_sample_never_replaces_an_npz_that_appears_while_it_samples(tmp_path, monkeypatch, capsys):
    """The check at the start is not enough: another --sample into the same folder (say of the same run at
    another --sample-omega: the same file name) may finish first. Its file stays; this run's samples take another
    name, and it says so."""
    common = ["--steps", 2, "--batch-size", 32, "--out", tmp_path]
    assert run_main(common, capsys)[0] == 0
    npz, generate = tmp_path / "samples-50-nfe1.npz", train.generate

    def and_another_run_finishes(*a, **k):
        npz.write_bytes(b"the other run's samples")
        return generate(*a, **k)

    monkeypatch.setattr(train, "generate", and_another_run_finishes)
    code, out, err = run_main(common + ["--sample", 50], capsys)
    assert code == 0 and f"{npz} appeared while sampling" in err, err
    ours = re.search(r"these samples go to (\S+\.npz)", err)[1]  # both kept: sampling 50k images takes hours
    assert os.path.dirname(ours) == str(tmp_path) and np.load(ours)["arr_0"].shape == (50, 2) and ours in out
    assert npz.read_bytes() == b"the other run's samples" and leftovers(tmp_path) == []
    # the same on a file system without hard links (a rename after one last look)
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    with pytest.raises(FileExistsError):
        train.save_atomic(str(npz), lambda f: f.write(b"ours"), new=True)
    train.save_atomic(str(tmp_path / "fresh.npz"), lambda f: f.write(b"ours"), new=True)
    assert npz.read_bytes() == b"the other run's samples" and (tmp_path / "fresh.npz").read_bytes() == b"ours"
    assert leftovers(tmp_path) == []


def test_torchrun_sample_parts_are_this_runs_own_and_a_bad_reference_writes_nothing(tmp_path, capsys):
    """Part files named by the run (fixed names were shared with any other --sample into the folder: one run read
    and deleted the other's parts). A --fid-ref that process 0 refuses stops process 1 before it writes its part."""
    make_fashion(str(tmp_path / "fm"))
    flags = ["--data", "fashion-mnist", "--data-path", str(tmp_path / "fm"), "--model", "Ti/4", "--batch-size", "4",
             "--out", str(tmp_path / "run")]
    assert run_main(flags + ["--steps", 1], capsys)[0] == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                os.path.join(HERE, "train.py")] + flags
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    p = subprocess.run(torchrun + ["--sample", "6", "--fid-ref", str(tmp_path / "bad.npz")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode != 0 and "process 0 of 2: --fid-ref" in p.stderr and "process 0 refused --fid-ref" in p.stderr
    assert leftovers(tmp_path / "run") == []  # process 1 wrote nothing
    foreign = tmp_path / "run" / "samples-6-nfe1.npz.part1"  # the name every run used to give process 1's part
    foreign.write_bytes(b"another run's part")
    p = subprocess.run(torchrun + ["--sample", "6"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert foreign.read_bytes() == b"another run's part" and sorted(leftovers(tmp_path / "run")) == [foreign.name]
    x = np.load(tmp_path / "run" / "samples-6-nfe1.npz")["arr_0"]
    os.rename(tmp_path / "run" / "samples-6-nfe1.npz", tmp_path / "two.npz")
    assert run_main(flags + ["--sample", 6], capsys)[0] == 0  # the same samples as one process draws
    assert np.array_equal(np.load(tmp_path / "run" / "samples-6-nfe1.npz")["arr_0"], x)


def test_center_crop_converts_to_rgb_before_resizing():
    from PIL import Image

    rng = np.random.default_rng(0)
    pal = Image.fromarray(rng.integers(0, 256, (300, 520), dtype=np.uint8), mode="L").convert("P")  # palette image
    crop = train.center_crop(pal)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    # as if it had been RGB from the start (PIL resizes a palette image by nearest neighbour: converting after
    # the resize gave another image)
    assert np.array_equal(crop, train.center_crop(pal.convert("RGB")))


def test_center_crop_follows_adm():
    # ADM's center_crop_arr (guided-diffusion image_datasets.py), step by step: box-filter halvings while the short
    # side is at least twice the size, a bicubic resize of the short side to the size (long side rounded), then the
    # central square, the odd pixel left of and above it. Shapes with no, one and two halvings, wide and tall.
    from PIL import Image

    rng = np.random.default_rng(1)
    for w, h in [(300, 260), (260, 300), (600, 520), (700, 1100), (1100, 1030)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref, halvings = img, 0
        while min(ref.size) >= 512:
            ref, halvings = ref.resize((ref.size[0] // 2, ref.size[1] // 2), resample=Image.BOX), halvings + 1
        assert halvings == (0 if max(w, h) <= 300 else 1 if min(w, h) < 1024 else 2)
        short = min(ref.size)
        ref = ref.resize((round(ref.size[0] * 256 / short), round(ref.size[1] * 256 / short)), resample=Image.BICUBIC)
        left, top = (ref.size[0] - 256) // 2, (ref.size[1] - 256) // 2
        assert np.array_equal(train.center_crop(img), np.asarray(ref.crop((left, top, left + 256, top + 256))))


def test_imf_network_under_bf16_autocast_is_close_to_fp32(recwarn):
    net = randomize(tiny_imf(num_classes=3), std=0.3)
    z, t, r, y = inputs_for(net, dtype=torch.float32)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    f = lambda z, t, r: net(z, t, r, y, return_v=True)
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    (u, _), (dudt, dvdt) = mf.jvp(f, (z, t, r), tangents)
    with torch.autocast("cpu", torch.bfloat16):
        (ub, _), (dudt_b, dvdt_b) = mf.jvp(f, (z, t, r), tangents)
    # measured: 0.4% on u, 0.6% on du/dt, 0.5% on dv/dt
    assert rel(ub.float(), u) < 0.02 and rel(dudt_b.float(), dudt) < 0.02 and rel(dvdt_b.float(), dvdt) < 0.02
    assert not [w for w in recwarn if "dtype" in str(w.message)]  # no fused-kernel dtype fallback warnings

# --- Fashion-MNIST download ---
# Without Debian's package the default path downloads the official files; offline, urllib is replaced by a
# stand-in that serves files the test writes.


def fake_urlopen(served, requested):
    """A urllib.request.urlopen that serves served[url] (bytes) and fails like a dead network otherwise."""
    import urllib.error

    def urlopen(url, timeout=None):
        requested.append(url)
        if url not in served:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return io.BytesIO(served[url])
    return urlopen


def fashion_default_path(tmp_path, monkeypatch):
    """Point the default data path into tmp_path and hide Debian's copy; returns the default folder."""
    folder = str(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setitem(train.DATA_PATHS, "fashion-mnist", folder)
    monkeypatch.setattr(train, "FASHION_DEBIAN", str(tmp_path / "no-debian"))
    return folder


def test_fashion_mnist_downloads_official_files_md5_checked(tmp_path, monkeypatch):
    folder = fashion_default_path(tmp_path, monkeypatch)
    x, y = make_fashion(str(tmp_path / "server"))  # what the server holds: gzipped IDX, as Zalando ships it
    files = {n: (tmp_path / "server" / n).read_bytes() for n in train.FASHION_MD5}
    monkeypatch.setattr(train, "FASHION_MD5", {n: hashlib.md5(raw).hexdigest() for n, raw in files.items()})
    main, mirror = train.FASHION_URLS
    # the first URL serves a corrupted image file: its md5 fails and the mirror's copy is taken
    served = {main + n: raw for n, raw in files.items()}
    bad = bytearray(files["train-images-idx3-ubyte.gz"])
    bad[len(bad) // 2] ^= 0xFF
    served[main + "train-images-idx3-ubyte.gz"] = bytes(bad)
    served[mirror + "train-images-idx3-ubyte.gz"] = files["train-images-idx3-ubyte.gz"]
    requested = []
    monkeypatch.setattr(train.urllib.request, "urlopen", fake_urlopen(served, requested))
    data = train.load_data(train.get_args(["--data", "fashion-mnist", "--model", "Ti/4"]), 0)
    assert torch.equal(data.x[:, 0, 2:30, 2:30], torch.from_numpy(x)) and torch.equal(data.labels, torch.from_numpy(y))
    assert sorted(requested) == sorted([main + "train-images-idx3-ubyte.gz", mirror + "train-images-idx3-ubyte.gz",
                                        main + "train-labels-idx1-ubyte.gz"])
    assert sorted(os.listdir(folder)) == sorted(files) and leftovers(folder) == []
    for n, raw in files.items():
        assert (tmp_path / "data" / "fashion-mnist" / n).read_bytes() == raw
    requested.clear()  # a second run reads the saved files and downloads nothing
    train.load_fashion_mnist(folder, 0)
    assert requested == []


def test_fashion_mnist_default_path_prefers_debian_copy(tmp_path, monkeypatch):
    folder = fashion_default_path(tmp_path, monkeypatch)
    x, _ = make_fashion(str(tmp_path / "no-debian"), n=20, gz=False)  # stands in for Debian's copy
    requested = []
    monkeypatch.setattr(train.urllib.request, "urlopen", fake_urlopen({}, requested))
    images, _ = train.load_fashion_mnist(folder, 0)
    assert images.shape == (20, 1, 32, 32) and requested == [] and not os.path.exists(folder)


@pytest.mark.parametrize("network", ["offline", "wrong md5"])
def test_fashion_mnist_failed_download_is_one_line(tmp_path, capsys, monkeypatch, network):
    folder = fashion_default_path(tmp_path, monkeypatch)
    served = {}
    if network == "wrong md5":  # every URL answers, with bytes that are not the official files
        served = {u + n: b"not the file" for u in train.FASHION_URLS for n in train.FASHION_MD5}
    monkeypatch.setattr(train.urllib.request, "urlopen", fake_urlopen(served, []))
    code, _, err = run_main(["--data", "fashion-mnist", "--model", "Ti/4", "--out", tmp_path / "run"], capsys)
    words = ["name resolution"] if network == "offline" else ["md5 mismatch"]
    assert_one_line_error(code, err, "could not download Fashion-MNIST", "train-images-idx3-ubyte.gz",
                          train.FASHION_URLS[0], "apt-get install dataset-fashion-mnist", *words)
    assert leftovers(folder) == [] and not os.path.exists(os.path.join(folder, "train-images-idx3-ubyte.gz"))
    assert not os.path.exists(tmp_path / "run")


# --- robustness: no run is ever lost (reruns, concurrent runs, signals, bad numbers, bad files, full disks) ---
TOY_RUN = ["--batch-size", 16, "--log-every", 1]  # a toy step takes milliseconds; a log line every step


def strict_json(line):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def ckpt_step(folder):
    return torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)["step"]


def test_every_numeric_argument_has_a_range(monkeypatch):
    """train.NUMBERS is the one place of the numeric checks: no int or float argument may be missing from it."""
    parsers = []
    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda p, *a, **k: parsers.append(p) or parse(p, *a, **k))
    train.get_args([])
    numeric = {a.dest for a in parsers[0]._actions if a.type in (int, float)}
    assert numeric and numeric <= set(train.NUMBERS), numeric - set(train.NUMBERS)


BAD_NUMBERS = [
    (["--steps", 0], ["--steps 0", "1 or more"]), (["--steps", -5], ["--steps -5"]),
    (["--batch-size", 0], ["--batch-size 0"]), (["--batch-size", -8], ["--batch-size -8"]),
    (["--lr", "nan"], ["--lr nan", "finite"]), (["--lr", -1], ["--lr -1.0", "> 0"]), (["--lr", "inf"], ["--lr inf"]),
    (["--weight-decay", "nan"], ["--weight-decay nan"]), (["--seed", -1], ["--seed -1"]),
    (["--log-every", 0], ["--log-every 0"]), (["--sample", -3], ["--sample -3"]), (["--sample", 0], ["--sample 0"]),
    (["--sample-steps", -2], ["--sample-steps -2"]), (["--sample-steps", 0], ["--sample-steps 0"]),
    (["--ema", "nan"], ["--ema nan"]), (["--ema", 2], ["--ema 2.0", "[0, 1)"]), (["--warmup", -1], ["--warmup -1"]),
    (["--stop-at", 0], ["--stop-at 0"]), (["--stop-at", 3001], ["--stop-at 3001", "--steps 3000"]),
    (["--stop-at", 5, "--steps", 4], ["--stop-at 5", "--steps 4"]), (["--kappa", 1], ["--kappa 1.0"]),
    (["--t-lo", 0.8, "--t-hi", 0.2], ["--t-lo 0.8"]), (["--resume", "--overwrite"], ["--overwrite"]),
    (["--data", "fashion-mnist", "--model", "Ti/4", "--steps", 0], ["--steps 0"]),
    # --set goes through the same ranges as the flags; argparse's own errors are one line too
    (["--set", "kappa=1"], ["--set kappa=1", "[0, 1)"]), (["--set", "c=-1"], ["--set c=-1", "> 0"]),
    (["--set", "ratio_r_neq_t=5"], ["ratio_r_neq_t=5", "[0, 1]"]), (["--set", "P_std=0"], ["P_std=0"]),
    (["--data", "fashion-mnist", "--model", "Ti/4", "--set", "t_lo=0.9", "--set", "t_hi=0.1"], ["[0.9, 0.1]"]),
    (["--set", "omega=2"], ["unconditional"]), (["--steps", "abc"], ["invalid int value", "--help"]),
    (["--lr", "-1e-3"], ["--lr=-1e-3"]), (["--bogus"], ["unrecognized arguments: --bogus"]),
    # options that would do nothing here
    (["--class-cond"], ["--class-cond", "no labels"]), (["--data-path", "data"], ["--data-path", "image data"]),
    (["--fid-ref", "ref.npz"], ["--fid-ref", "--sample"]), (["--sample", 2, "--resume"], ["--sample", "--resume"]),
    (["--sample-steps", 2], ["--sample-steps", "--sample"]), (["--workers", 2], ["--workers", "--prepare-imagenet"]),
    (["--model", ""], ["unknown --model ''"]),
    # an empty path read as a flag left out (--data-path '': Debian's copy; --fid-ref '': the training images)
    *[([flag, ""], [f"{flag} is empty"]) for flag in ("--data-path", "--prepare-imagenet", "--vae", "--fid-ref")],
]


@pytest.mark.parametrize("argv, words", BAD_NUMBERS, ids=[" ".join(map(str, a)) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_one_line_errors_before_any_work(tmp_path, capsys, argv, words):
    assert_one_line_error(*run_main(argv + ["--out", tmp_path / "run"], capsys)[::2], *words)
    assert not os.path.exists(tmp_path / "run")


def test_every_numeric_knob_has_a_range():
    knobs = {k for r in mf.RECIPES.values() for k, v in r.items() if isinstance(v, (int, float)) or v is None}
    assert knobs - {"imf"} <= set(train.KNOBS), knobs - {"imf"} - set(train.KNOBS)


def test_bad_environment_and_empty_out(tmp_path, capsys, monkeypatch):
    assert_one_line_error(*run_main(["--out", ""], capsys)[::2], "--out is empty")
    monkeypatch.setenv("WORLD_SIZE", "0")
    monkeypatch.setenv("RANK", "0")  # torchrun's variables (WORLD_SIZE alone is not read)
    assert_one_line_error(*run_main(["--out", tmp_path / "run"], capsys)[::2], "WORLD_SIZE='0'")
    assert os.listdir(tmp_path) == []
    # int() raised tracebacks ("²".isdigit() is True, yet int("²") raises)
    for k, v in (("WORLD_SIZE", "abc"), ("RANK", "x"), ("LOCAL_RANK", "-1"), ("RANK", "\u00b2")):
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv(k, v)
        assert_one_line_error(*run_main(["--out", tmp_path / "run"], capsys)[::2], f"{k}={v!r}", "unset it")
        assert os.listdir(tmp_path) == []
        assert_one_line_error(*run_main(["--lr", -1], capsys)[::2], "--lr -1.0 is out of range")  # its own error first
        with pytest.raises(SystemExit) as help:
            train.main(["--help"])
        assert help.value.code == 0 and "--data" in capsys.readouterr().out
    # RANK without torchrun's rendezvous: init_process_group raised a ValueError traceback
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert_one_line_error(*run_main(["--out", tmp_path / "run"], capsys)[::2], "RANK is set", "MASTER_ADDR not",
                          "torchrun, or unset RANK")
    assert os.listdir(tmp_path) == []


def test_stop_at_beyond_the_default_epochs_of_an_image_run(tmp_path, capsys):
    make_fashion(str(tmp_path / "fm"))  # 40 images, batch 8: 240 epochs are 1200 steps
    code, _, err = run_main(["--data", "fashion-mnist", "--data-path", tmp_path / "fm", "--model", "Ti/4",
                             "--batch-size", 8, "--stop-at", 1201, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "--stop-at 1201", "1200 steps")
    assert not os.path.exists(tmp_path / "run")


def test_a_rerun_refuses_a_folder_holding_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(TOY_RUN + ["--steps", 4, "--out", out], capsys)[0] == 0
    before = listing(out)
    for argv in (["--steps", 2], ["--steps", 2, "--recipe", "improved-dtd"]):
        code, _, err = run_main(TOY_RUN + argv + ["--out", out], capsys)
        assert_one_line_error(code, err, "already holds a run", "--resume", "--overwrite")
    code, _, err = run_main(TOY_RUN + ["--steps", 2, "--resume", "--out", out], capsys)  # behind the checkpoint
    assert_one_line_error(code, err, "step 4", "--steps 2")
    assert listing(out) == before  # nothing touched
    code, _, err = run_main(TOY_RUN + ["--steps", 2, "--overwrite", "--omega", 2, "--out", out], capsys)
    assert_one_line_error(code, err, "unconditional")  # a check after the folder's: the old run is still whole
    assert listing(out) == before
    code, _, err = run_main(TOY_RUN + ["--steps", 2, "--overwrite", "--out", out], capsys)  # on purpose
    assert code == 0, err
    assert ckpt_step(out) == 2 and [strict_json(s)["step"] for s in open(out / "log.jsonl")] == [1, 2]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "step-0000002.png"]  # the old picture went too


def wait_for_log(proc, folder, lines, timeout=120):
    """Wait until the run in `folder` has logged `lines` lines (or fail if it ended first)."""
    path, end = os.path.join(folder, "log.jsonl"), time.time() + timeout
    while not (os.path.exists(path) and open(path).read().count("\n") >= lines):
        ended = proc.poll() is not None
        assert not ended and time.time() < end, proc.communicate()[1][-3000:] if ended else "timeout"
        time.sleep(0.02)


def heed_stop_signals():
    """The stop signals at their default action, as a terminal's foreground job gets them: the suite run as a
    background job (which starts with SIGINT ignored) or under nohup (SIGHUP) would pass those on, and train.py keeps
    an ignored signal ignored."""
    for s in train.STOP_SIGNALS:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)


def start(argv):
    """python train.py argv in a process of its own."""
    return subprocess.Popen([str(a) for a in argv], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=heed_stop_signals)


def start_toy_run(folder, *extra, steps=100_000):
    return start([sys.executable, os.path.join(HERE, "train.py"), "--steps", steps, *TOY_RUN, "--out", folder, *extra])


def test_sigint_and_sigterm_checkpoint_and_resume_continues_bitwise(tmp_path, capsys):
    """A real Ctrl-C, then SIGHUP (a closed terminal), SIGUSR1 (SLURM's warning) and SIGTERM, each to the printed
    resume command: each ends after a whole step with a checkpoint of
    that step, one line with the exact resume command, exit 128 + signal; the log runs on without a gap, `time`
    without a jump back; resumed to the end, the weights equal an uninterrupted run's bit for bit."""
    out = str(tmp_path / "run")
    proc, steps = start_toy_run(out), []
    stops = ((signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGUSR1, 138), (signal.SIGTERM, 143))
    for sig, code in stops:
        wait_for_log(proc, out, (steps[-1] if steps else 0) + 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        last = err.replace("\r", "\n").strip().splitlines()[-1]
        assert proc.returncode == code and "Traceback" not in err, err[-3000:]
        assert last.startswith(f"train.py: stopped by {sig.name} after step "), last
        steps.append(int(last.split("after step ")[1].split()[0]))
        assert ckpt_step(out) == steps[-1] and leftovers(out) == [] and sorted(os.listdir(out)) == ["ckpt.pt",
                                                                                                     "log.jsonl"]
        command = shlex.split(last.split("resume with: ")[1])
        assert command[1:3] == [os.path.join(HERE, "train.py"), "--steps"] and command.count("--resume") == 1
        if sig != stops[-1][0]:
            proc = start(command)  # the printed command itself
    assert steps == sorted(set(steps))
    end = steps[-1] + 2  # the printed command once more (in this process), to a clean end two steps on
    assert run_main(command[2:] + ["--stop-at", end], capsys)[0] == 0
    code, _, err = run_main(["--steps", 100_000, *TOY_RUN, "--stop-at", end, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    a, b = (flat_state(torch.load(f, weights_only=True)) for f in (tmp_path / "whole" / "ckpt.pt", f"{out}/ckpt.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [strict_json(s) for s in open(f"{out}/log.jsonl")]
    assert [h["step"] for h in log] == list(range(1, end + 1))
    assert all(h0["time"] <= h1["time"] for h0, h1 in zip(log, log[1:]))  # no restart at 0 on resume


def worker_pids(parent):
    """Child processes of `parent` (from /proc): torchrun's workers."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(d))
        except OSError:
            pass
    return sorted(pids)


def test_leaving_the_process_group_first_gives_up_the_gil(monkeypatch):
    """On torch 2.4-2.7 two-process runs hung at exit (train.leave_process_group's docstring has the cause and the
    counts): the sleep comes first, then destroy_process_group; this keeps the order."""
    calls = []
    monkeypatch.setattr(train.time, "sleep", lambda s: calls.append(("sleep", s)))
    monkeypatch.setattr(train.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    train.leave_process_group()
    assert [c[0] for c in calls] == ["sleep", "destroy"] and calls[0][1] > 0


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers in /proc (Linux)")
def test_sigterm_to_one_torchrun_process_stops_all_after_the_same_step(tmp_path):
    out = str(tmp_path / "run")
    proc = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                  os.path.join(HERE, "train.py"), "--steps", 100_000, *TOY_RUN, "--out", out])
    wait_for_log(proc, out, 3)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one process only: the other must learn of it and stop with it
    _, err = proc.communicate(timeout=120)
    line = [s for s in err.splitlines() if s.startswith("train.py: ")]
    assert len(line) == 1 and line[0].startswith("train.py: stopped by SIGTERM after step "), err[-3000:]
    step = int(line[0].split("after step ")[1].split()[0])
    assert "resume with: torchrun --nproc_per_node=2 " in line[0] and line[0].endswith("--resume")
    ckpt = torch.load(f"{out}/ckpt.pt", weights_only=True)
    assert ckpt["step"] == step == strict_json(open(f"{out}/log.jsonl").readlines()[-1])["step"]
    assert len(ckpt["rng"]) == 2 and leftovers(out) == []
    # Both processes stop as SIGTERM asks, exit code 128 + 15; once one has exited, torchrun may end the other with its
    # own SIGTERM (-15: under torchrun train.py keeps the default action outside the training loop), but never with 0
    # for both. torchrun's summary lists each rank that failed (recent torch: both; torch 2.4: the first one only).
    codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: (-?\d+)", err))
    assert proc.returncode != 0 and codes and set(codes) <= {"0", "1"}, err[-3000:]
    assert set(codes.values()) <= {"143", "-15"}, err[-3000:]
    assert "143" in codes.values(), err[-3000:]


def test_kill_9_then_resume_leaves_no_temporary(tmp_path, capsys):
    """kill -9 cannot be caught: whatever it leaves (a stale lock file, a temporary of a checkpoint being written),
    the next run in the folder clears, and the log and checkpoint go on from the last whole checkpoint."""
    out = str(tmp_path / "run")
    proc = start_toy_run(out, "--ckpt-every", 1)  # a checkpoint every step: the kill may well land in one
    wait_for_log(proc, out, 3)
    proc.kill()
    proc.wait()
    open(f"{out}/ckpt.pt.tmp-{proc.pid}-0badf00d", "wb").write(b"half a checkpoint")  # as a kill mid-write leaves
    end = ckpt_step(out) + 2
    code, _, err = run_main(["--steps", 100_000, *TOY_RUN, "--out", out, "--stop-at", end, "--resume"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]
    assert [strict_json(s)["step"] for s in open(f"{out}/log.jsonl")] == list(range(1, end + 1))


def test_a_second_live_run_in_the_same_folder_fails_at_once(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    first = start_toy_run(out)
    wait_for_log(first, out, 2)
    for name in ("load_data", "set_up", "run", "load_checkpoint"):  # at once: no data, no model, no step
        monkeypatch.setattr(train, name, lambda *a, name=name: pytest.fail(f"{name} ran before the lock refused"))
    for extra in ([], ["--resume"], ["--overwrite"]):
        code, _, err = run_main(["--steps", 100_000, *TOY_RUN, "--out", out, *extra], capsys)
        assert_one_line_error(code, err, "another run", f"pid {first.pid}", "--out")
    first.send_signal(signal.SIGTERM)  # the first run is unharmed: it stops cleanly and its files are whole
    assert first.wait(timeout=60) == 143
    log = [strict_json(s)["step"] for s in open(f"{out}/log.jsonl")]
    assert log == list(range(1, ckpt_step(out) + 1)) and sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]


def test_two_runs_started_together_one_wins(tmp_path):
    out = str(tmp_path / "run")
    procs = [start_toy_run(out, steps=3) for _ in range(2)]
    results = sorted((p.communicate(timeout=120)[1], p.returncode)[::-1] for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    last = results[1][1].strip().splitlines()[-1]  # depending on timing, the lock or the finished run refuses it
    assert last.startswith("train.py: error: ") and ("another run" in last or "already holds a run" in last), last
    assert [strict_json(s)["step"] for s in open(f"{out}/log.jsonl")] == [1, 2, 3] and ckpt_step(out) == 3
    assert leftovers(out) == []


def test_a_cut_off_log_line_is_dropped_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--steps", 4, *TOY_RUN, "--out", out]
    assert run_main(common + ["--stop-at", 2], capsys)[0] == 0
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": 0.12')  # a kill (or a full disk) during the append of step 3
    code, _, err = run_main(common + ["--resume"], capsys)
    assert code == 0, err
    assert [strict_json(s)["step"] for s in open(out / "log.jsonl")] == [1, 2, 3, 4]
    # A broken line that is not the last one is not ours to drop: one line, nothing changed.
    raw = open(out / "log.jsonl", "rb").read().replace(b'{"step": 2,', b'{"step": 2', 1)
    (out / "log.jsonl").write_bytes(raw)
    code, _, err = run_main(common[:1] + [6] + common[2:] + ["--resume"], capsys)
    assert_one_line_error(code, err, "log.jsonl line 2")
    assert (out / "log.jsonl").read_bytes() == raw and ckpt_step(out) == 4


def test_log_is_standard_json_null_for_nan_and_time_runs_on(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    common = ["--steps", 4, "--batch-size", 1, "--log-every", 1, "--out", out]  # B = 1: no r != t row, u-loss NaN
    clock = [1e9]  # a clock that moves 1 ms each time it is read, and an hour between the two runs
    monkeypatch.setattr(train.time, "time", lambda: clock.__setitem__(0, clock[0] + 1e-3) or clock[0])
    assert run_main(common + ["--stop-at", 2], capsys)[0] == 0
    clock[0] += 3600  # a pause between the runs does not count; the time before it does
    assert run_main(common + ["--resume"], capsys)[0] == 0
    log = [strict_json(s) for s in open(out / "log.jsonl")]
    assert [h["u_loss"] for h in log] == [None] * 4 and all(math.isfinite(h["loss"]) for h in log)
    saved = torch.load(out / "ckpt.pt", weights_only=True)["time"]
    assert 0 < log[0]["time"] < log[1]["time"] < log[2]["time"] < log[3]["time"] <= saved < log[3]["time"] + 1
    assert log[2]["time"] - log[1]["time"] < 1  # no restart at 0, no gap for the pause
    assert strict_json(train.log_line({"step": 1, "a": math.inf, "b": -math.inf, "c": math.nan})) == dict(
        step=1, a=None, b=None, c=None)


def corrupt_gzip(path):
    raw = bytearray(gzip.compress(gzip.decompress(open(path, "rb").read())))  # a 10-byte header: no file name
    raw[10:30] = bytes([255]) * 20  # the start of the first deflate block: an invalid block type
    open(path, "wb").write(bytes(raw))


def cifar_tarball(folder, labels, batches=(1, 2, 3, 4, 5)):
    """cifar-10-python.tar.gz whose data batches (these numbers) each hold these labels."""
    os.makedirs(folder, exist_ok=True)
    d = {b"data": np.zeros((len(labels), 3072), np.uint8), b"labels": list(labels)}
    with tarfile.open(os.path.join(folder, "cifar-10-python.tar.gz"), "w:gz") as tar:
        for i in batches:
            add_pickle(tar, f"cifar-10-batches-py/data_batch_{i}", d)


def test_bad_data_files_are_one_line_errors(tmp_path, capsys):
    run = ["--model", "Ti/4", "--steps", 1, "--batch-size", 2, "--out", tmp_path / "run"]
    fm = ["--data", "fashion-mnist", "--data-path"]
    make_fashion(str(tmp_path / "gz"))
    corrupt_gzip(str(tmp_path / "gz" / "train-images-idx3-ubyte.gz"))
    with pytest.raises(zlib.error):  # what used to escape as a traceback
        gzip.open(tmp_path / "gz" / "train-images-idx3-ubyte.gz").read()
    assert_one_line_error(*run_main(fm + [tmp_path / "gz"] + run, capsys)[::2], "not a valid IDX file")
    os.makedirs(tmp_path / "empty")
    write_idx(str(tmp_path / "empty" / "train-images-idx3-ubyte.gz"), np.zeros((0, 28, 28)))
    write_idx(str(tmp_path / "empty" / "train-labels-idx1-ubyte.gz"), np.zeros(0))
    assert_one_line_error(*run_main(fm + [tmp_path / "empty"] + run, capsys)[::2], "holds no images")
    os.makedirs(tmp_path / "labels")
    write_idx(str(tmp_path / "labels" / "train-images-idx3-ubyte"), np.zeros((4, 28, 28)))
    write_idx(str(tmp_path / "labels" / "train-labels-idx1-ubyte"), [0, 3, 10, 9])
    assert_one_line_error(*run_main(fm + [tmp_path / "labels"] + run, capsys)[::2], "labels 0 to 10, not 0 to 9")
    cifar_tarball(str(tmp_path / "c1"), [0, 12, 3])
    code, _, err = run_main(["--data", "cifar10", "--data-path", tmp_path / "c1"] + run, capsys)
    assert_one_line_error(code, err, "labels 0 to 12, not 0 to 9")
    cifar_tarball(str(tmp_path / "c2"), [])
    code, _, err = run_main(["--data", "cifar10", "--data-path", tmp_path / "c2"] + run, capsys)
    assert_one_line_error(code, err, "holds no images")
    for name, batches, held in (("c5", (1, 2, 4, 5), "holds data_batch_1, data_batch_2, data_batch_4, data_batch_5,"),
                                ("c6", (1, 2, 3, 4, 5, 5), "data_batch_5, data_batch_5, not"), ("c7", (), "holds no")):
        cifar_tarball(str(tmp_path / name), [0, 1], batches)  # a batch missing (it used to train on the rest), twice
        code, _, err = run_main(["--data", "cifar10", "--data-path", tmp_path / name] + run, capsys)
        assert_one_line_error(code, err, held, "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5")
        assert not os.path.exists(tmp_path / "run")
    for name, member in (("c3", [1, 2, 3]), ("c4", None)):  # a batch that unpickles to a list; one that is a folder
        os.makedirs(tmp_path / name)
        with tarfile.open(tmp_path / name / "cifar-10-python.tar.gz", "w:gz") as tar:
            if member is None:
                info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                add_pickle(tar, "cifar-10-batches-py/data_batch_1", member)
        code, _, err = run_main(["--data", "cifar10", "--data-path", tmp_path / name] + run, capsys)
        assert_one_line_error(code, err, "not the CIFAR-10 python tarball")
    lat = np.zeros((2, 2, 2, 4, 32, 32), np.float16)
    for name, shard, shape, labels in (("l1", "shard-00000-of-x.npy", lat.shape, [0, 1]),  # a name, a shape, labels
                                       ("l2", "shard-00000-of-00001.npy", (2, 2, 2, 3, 16, 16), [0, 1]),
                                       ("l3", "shard-00000-of-00001.npy", lat.shape, [0.5, 1.5])):
        os.makedirs(tmp_path / name)
        np.save(tmp_path / name / shard, np.zeros(shape, np.float16))
        np.save(tmp_path / name / shard.replace("shard-", "labels-"), np.array(labels))
        code, _, err = run_main(["--data", "imagenet-latents", "--data-path", tmp_path / name] + run, capsys)
        assert_one_line_error(code, err, "--prepare-imagenet")
    assert not os.path.exists(tmp_path / "run")


def test_checkpoint_contents_are_checked_before_use(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--steps", 4, *TOY_RUN, "--out", out]
    os.makedirs(out)
    for content, words in ((torch.zeros(3), "(a Tensor)"), ({"model": {}, "step": 1}, "(no args, ema, opt")):
        torch.save(content, out / "ckpt.pt")
        assert_one_line_error(*run_main(common + ["--resume"], capsys)[::2], "not a train.py checkpoint", words)
        assert_one_line_error(*run_main(common + ["--sample", 5], capsys)[::2], "not a train.py checkpoint")
    os.remove(out / "ckpt.pt")
    assert run_main(common, capsys)[0] == 0
    saved = (out / "ckpt.pt").read_bytes()
    for flag, value in (("--recipe", "improved-dtd"), ("--data", "moons")):  # another run's checkpoint
        for mode in (["--resume", "--steps", 8], ["--sample", 5]):
            assert_one_line_error(*run_main(common + [flag, value] + mode, capsys)[::2], f"was trained with {flag}")
    assert (out / "ckpt.pt").read_bytes() == saved
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    # wrong kinds
    for key, value in (("ema", torch.zeros(3)), ("step", -1), ("time", "noon"), ("rng", 5), ("dtd_acc", {}),
                       ("step", True), ("time", math.nan), ("rng", []), ("args", {})):  # (these last four resumed)
        torch.save({**ckpt, key: value}, out / "ckpt.pt")
        for mode in (["--resume", "--steps", 8], ["--sample", 5]):
            assert_one_line_error(*run_main(common + mode, capsys)[::2], "not a train.py checkpoint", f"a wrong {key}")
    bad = copy.deepcopy(ckpt)
    bad["opt"]["state"][0]["exp_avg"] = torch.zeros(7)  # moments of another shape: load_state_dict takes them
    torch.save(bad, out / "ckpt.pt")
    assert_one_line_error(*run_main(common + ["--resume", "--steps", 8], capsys)[::2], "does not fit")
    for part in ("model", "ema"):
        name = next(iter(ckpt[part]))
        ckpt[part][name] = torch.zeros(3, 3)  # the same args, other shapes: a checkpoint of other code
    torch.save(ckpt, out / "ckpt.pt")
    before = listing(out)
    assert_one_line_error(*run_main(common + ["--sample", 5], capsys)[::2], "does not fit", "other shapes")
    assert_one_line_error(*run_main(common[:1] + [8] + common[2:] + ["--resume"], capsys)[::2], "does not fit")
    assert listing(out) == before


def test_a_folder_with_a_runs_pictures_is_a_used_folder(tmp_path, capsys):
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "step-0000002.png").write_bytes(b"a picture")
    (tmp_path / "run" / "notes.tmp").write_text("the user's")
    code, _, err = run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "already holds a run", "step-0000002.png")
    assert sorted(os.listdir(tmp_path / "run")) == ["notes.tmp", "step-0000002.png"]
    assert (tmp_path / "run" / "step-0000002.png").read_bytes() == b"a picture"
    os.makedirs(tmp_path / "images")  # an image run's loss curves alone
    (tmp_path / "images" / "loss.png").write_bytes(b"curves")
    code, _, err = run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path / "images"], capsys)
    assert_one_line_error(code, err, "already holds a run", "loss.png")
    assert os.listdir(tmp_path / "images") == ["loss.png"]
    os.makedirs(tmp_path / "mine")  # a user's file that only looks like a picture of a run: neither used nor deleted
    (tmp_path / "mine" / "step-by-step.png").write_bytes(b"the user's")
    for extra in ([], ["--overwrite"]):
        assert run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path / "mine", *extra], capsys)[0] == 0
    assert (tmp_path / "mine" / "step-by-step.png").read_bytes() == b"the user's"


def test_a_diverged_run_names_the_fix_that_works(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(["--steps", 3, *TOY_RUN, "--lr", 1e6, "--out", out], capsys)
    assert_one_line_error(code, err, "the loss is nan", "no checkpoint yet", "--overwrite")
    assert run_main(["--steps", 3, *TOY_RUN, "--overwrite", "--out", out], capsys)[0] == 0  # that fix works


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(mf.MeanFlow, "loss", oom)
    assert_one_line_error(*run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path / "run"], capsys)[::2],
                          "out of memory", "--batch-size", "smaller --model")
    monkeypatch.undo()  # --sample holds all its samples: a smaller --batch-size alone did not help
    assert run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path / "run"], capsys)[0] == 0
    monkeypatch.setattr(mf.MeanFlow, "sample", oom)
    assert_one_line_error(*run_main(["--out", tmp_path / "run", "--sample", 10], capsys)[::2],
                          "out of memory", "pass a smaller --sample")
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith("samples-")]


def test_output_folder_that_is_a_file_or_under_one(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out, words in ((tmp_path / "file", ["is a file"]), (tmp_path / "file" / "run", ["cannot write", "writable"])):
        assert_one_line_error(*run_main(["--steps", 2, *TOY_RUN, "--out", out], capsys)[::2], *words)
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "not a folder"


def test_output_folder_without_write_permission(tmp_path, capsys):
    """A folder this user cannot write to. Root writes whatever the mode says, so for root the folder is made
    immutable (chattr +i, which binds root too); skipped where the file system or the user cannot do that."""
    ro = tmp_path / "ro"
    os.makedirs(ro)
    if os.geteuid() != 0:
        os.chmod(ro, 0o500)
    elif subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("root ignores the folder's mode, and chattr +i is not available here")
    try:
        code, _, err = run_main(["--steps", 2, *TOY_RUN, "--out", ro], capsys)
        assert_one_line_error(code, err, "cannot write to --out", "writable")
        assert os.listdir(ro) == []
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        os.chmod(ro, 0o700)


@pytest.fixture
def file_size_limit():
    """Set RLIMIT_FSIZE of this process: a write past it fails with EFBIG, as a write to a full disk fails with
    ENOSPC (Python ignores SIGXFSZ); the limit is lifted afterwards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda n=soft: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_failed_writes_are_one_line_leave_no_temporary_and_keep_the_old_files(tmp_path, capsys, file_size_limit):
    out = tmp_path / "run"
    common = ["--steps", 4, *TOY_RUN, "--out", out]
    assert run_main(common + ["--stop-at", 2], capsys)[0] == 0
    two_lines = (out / "log.jsonl").read_bytes()
    file_size_limit(os.path.getsize(out / "ckpt.pt") // 2)  # the checkpoint of step 3 fails halfway, in torch.save
    code, _, err = run_main(common + ["--resume", "--stop-at", 3], capsys)
    file_size_limit()
    assert_one_line_error(code, err, "could not write", "ckpt.pt", "File too large", "previous file is unchanged")
    assert ckpt_step(out) == 2 and leftovers(out) == []
    file_size_limit(len(two_lines) + 100)  # the log line of step 3 fits in part only
    code, _, err = run_main(common + ["--resume"], capsys)
    file_size_limit()
    assert_one_line_error(code, err, "could not append", "log.jsonl", "File too large")
    assert (out / "log.jsonl").read_bytes() == two_lines and ckpt_step(out) == 2 and leftovers(out) == []
    assert run_main(common + ["--resume"], capsys)[0] == 0  # room again: the run goes on
    assert [strict_json(s)["step"] for s in open(out / "log.jsonl")] == [1, 2, 3, 4]


def test_disk_full_is_one_line(tmp_path, capsys, monkeypatch):
    """ENOSPC itself, as a full disk reports it, from the write inside torch.save and from fsync."""
    import errno

    out = tmp_path / "run"
    common = ["--steps", 4, *TOY_RUN, "--out", out]
    assert run_main(common + ["--stop-at", 2], capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    real_open = open

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullDisk(io.FileIO):
        def write(self, b):
            no_space()

    for patch in ("write", "fsync"):
        with monkeypatch.context() as m:
            if patch == "write":  # the checkpoint's temporary is on a full disk
                m.setattr(train, "open", lambda p, mode="r", *a, **k: FullDisk(p, "x") if "ckpt.pt" in str(p)
                          else real_open(p, mode, *a, **k), raising=False)
            else:  # everything is: the log's rewrite at resume fails first
                m.setattr(os, "fsync", no_space)
            code, _, err = run_main(common + ["--resume", "--stop-at", 3], capsys)
        assert_one_line_error(code, err, "could not", "No space left on device")
        assert (out / "ckpt.pt").read_bytes() == before and leftovers(out) == []


def test_sample_refuses_a_checkpoint_of_the_other_class_conditioning(tmp_path, capsys):
    """A class-conditional checkpoint sampled as unconditional (or the reverse) is one line, not a shape traceback."""
    ckpt = {"args": {"data": "cifar10", "model": "Ti/4", "recipe": "meanflow", "class_cond": True}, "ema": {}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    args = train.get_args(["--data", "cifar10", "--model", "Ti/4", "--out", str(tmp_path), "--sample", "4"])
    assert args.class_cond is False
    with pytest.raises(train.Fail, match="--class-cond"):
        train.load_checkpoint(str(tmp_path / "ckpt.pt"), args, train.make_method(args))

# ---------------------------------------------------------------------------------------------
# --- DTD pacing: the curriculum advances inside loss(), bounded, the same stage in every process ---
# ---------------------------------------------------------------------------------------------
def _dtd_stages(method, losses, total=None):
    """Feed a v-loss sequence to the curriculum (progress = step / total, or 0); the stage after each step."""
    out = []
    for k, v in enumerate(losses):
        method.dtd_step(torch.tensor(float(v)), k / total if total else 0.0)
        out.append(method.dtd_stage)
    return out


def _first_steps(stages):
    """Step at which each stage was first reached (1-based step counts)."""
    return [stages.index(s) + 1 for s in range(1, max(stages) + 1)]


def test_dtd_improving_loss_advances_at_the_bounds():
    """A loss that keeps improving never counts as converged: the stage then ends exactly at its bound, tau steps
    (no deadline) or its share of the run (progress), whichever comes first."""
    g = torch.Generator().manual_seed(0)
    losses = torch.exp(-torch.arange(5000) / 1000) * (1 + 0.01 * torch.randn(5000, generator=g))
    tau_only = _dtd_stages(mf.MeanFlow("improved-dtd", dtd_share=0), losses)
    assert _first_steps(tau_only) == [200 * (s + 1) for s in range(19)]  # every stage exactly tau = 200 steps
    T = 4000  # share 0.25 of 4000 steps over 19 unlocks: a stage every 52.6 steps, before tau
    paced = _dtd_stages(mf.MeanFlow("improved-dtd"), losses[:T], total=T)
    assert _first_steps(paced) == [math.ceil(s * 0.25 * T / 19) + 1 for s in range(1, 20)]
    assert paced.index(19) + 1 <= 0.25 * T + 1
    long_run = _dtd_stages(mf.MeanFlow("improved-dtd"), losses, total=10**6)  # tau binds on a long run
    assert _first_steps(long_run) == _first_steps(tau_only)


def test_dtd_flat_noisy_loss_advances_on_convergence():
    """A flat loss has converged: each stage ends after two windows (the first window comparison), one stage at a
    time, long before tau; no deadline involved."""
    g = torch.Generator().manual_seed(1)
    losses = 1 + 0.1 * torch.randn(3000, generator=g)
    stages = _dtd_stages(mf.MeanFlow("improved-dtd", dtd_share=0), losses)
    lengths = [b - a for a, b in zip([0] + _first_steps(stages), _first_steps(stages))]
    assert len(lengths) == 19 and all(n % 25 == 0 and n >= 50 for n in lengths), lengths
    assert sum(n == 50 for n in lengths) >= 15 and max(lengths) < 200, lengths
    assert all(b - a in (0, 1) for a, b in zip(stages, stages[1:]))
    # the same loss, improving by 1% a step (far beyond the noise of a 25-step window mean): no convergence
    down = _dtd_stages(mf.MeanFlow("improved-dtd", dtd_share=0), losses[:400] * torch.exp(-torch.arange(400) / 100))
    assert _first_steps(down) == [200, 400]


def test_dtd_plain_training_loop_gets_the_curriculum():
    """loss, backward, step and nothing else: the curriculum advances; calls under no_grad do not count."""
    torch.manual_seed(0)
    method = mf.MeanFlow("improved-dtd")
    net = mf.MLP(dim=2, hidden=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    T, stages, logged = 200, [], []
    for step in range(T):
        loss, logs = method.loss(net, td.sample("checkerboard", 64), progress=step / T)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stages.append(method.dtd_stage)
        logged.append(logs["dtd_stage"])
        with torch.no_grad():  # an evaluation: not a training step
            method.loss(net, td.sample("checkerboard", 64), progress=step / T)
    assert logged[0] == 0 and logged[1:] == stages[:-1]  # logs: the stage the batch was drawn at
    assert stages[int(0.25 * T)] == 19 and all(b - a >= 0 for a, b in zip(stages, stages[1:]))
    assert method.dtd_stage == 19 and not hasattr(method, "dtd_update")  # nothing to call by hand


def test_dtd_reads_the_v_loss_of_the_r_equals_t_rows(monkeypatch):
    """The curriculum is on v: loss() hands dtd_step the mean error of the rows it draws (r = t), not the u-loss."""
    method, seen = mf.MeanFlow("improved-dtd"), []
    monkeypatch.setattr(method, "dtd_step", lambda v_loss, progress: seen.append((v_loss, progress)))
    net = randomize(mf.MLP(dim=2, hidden=16))
    torch.manual_seed(0)  # the data and (t, r): a draw where the two losses differ clearly
    _, logs = method.loss(net, td.sample("checkerboard", 64), progress=0.3)
    assert len(seen) == 1 and seen[0][0] is logs["v_loss"] and seen[0][1] == 0.3
    assert abs(logs["v_loss"] - logs["u_loss"]) > 1e-3 * logs["v_loss"]  # the two differ: the check can fail


def test_dtd_state_resumes_bitwise(tmp_path):
    g = torch.Generator().manual_seed(2)
    losses = 1 + 0.1 * torch.randn(600, generator=g) + torch.linspace(1, 0, 600)
    kw = dict(dtd_share=0, dtd_window=7, dtd_patience=60)
    whole = _dtd_stages(mf.MeanFlow("improved-dtd", **kw), losses)
    first = mf.MeanFlow("improved-dtd", **kw)
    head = _dtd_stages(first, losses[:263])  # mid-window, mid-stage
    torch.save(first.state_dict(), tmp_path / "m.pt")
    second = mf.MeanFlow("improved-dtd", **kw)
    second.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert head + _dtd_stages(second, losses[263:]) == whole
    assert len(set(whole)) > 5


# DTD paced by convergence alone: no deadline, no patience bound, short windows
DTD_BY_CONVERGENCE = dict(dtd_share=0, dtd_patience=10**6, dtd_window=5)


def _dtd_worker(rank, world, port, out):
    with gloo(rank, world, port):
        # (a) local losses chosen so that each process alone would decide differently: flat on rank 0 (converged
        # after two windows), steeply falling on rank 1 (never converged before the fall flattens out)
        g = torch.Generator().manual_seed(rank)
        k = torch.arange(300)
        local = 1 + 0.05 * torch.randn(300, generator=g) + (3 * torch.exp(-k / 60) if rank == 1 else 0)
        synthetic = _dtd_stages(mf.MeanFlow("improved-dtd", **DTD_BY_CONVERGENCE), local)
        # (b) a plain data-parallel loop through loss(): each process its own data, gradients synced by hand
        torch.manual_seed(0)
        method, net = mf.MeanFlow("improved-dtd", **DTD_BY_CONVERGENCE), mf.MLP(dim=2, hidden=32)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        torch.manual_seed(100 + rank)
        v_losses, stages = [], []
        for step in range(80):
            loss, logs = method.loss(net, td.sample("checkerboard", 32), progress=step / 80)
            opt.zero_grad()
            loss.backward()
            for p in net.parameters():  # gradients averaged by hand (no DDP wrapper needed here)
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            v_losses.append(float(logs["v_loss"]))
            stages.append(method.dtd_stage)
        torch.save(dict(local=local, synthetic=synthetic, v_losses=v_losses, stages=stages),
                   os.path.join(out, f"dtd{rank}.pt"))


def test_dtd_two_processes_agree_on_the_stage(tmp_path):
    mp.spawn(_dtd_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"dtd{r}.pt", weights_only=True) for r in range(2))
    alone = [_dtd_stages(mf.MeanFlow("improved-dtd", **DTD_BY_CONVERGENCE), r["local"]) for r in (r0, r1)]
    assert alone[0] != alone[1]  # on its own loss, each process would be at another stage
    assert r0["synthetic"] == r1["synthetic"] and r0["synthetic"] not in alone
    assert r0["v_losses"] != r1["v_losses"] and r0["stages"] == r1["stages"] and r0["stages"][-1] > 0


# ---------------------------------------------------------------------------------------------
# --- The 2-D regime: the raw-input toy MLP, the checkerboard's on-board share ---
# ---------------------------------------------------------------------------------------------
def test_on_squares_scores_the_checkerboard():
    g = torch.Generator().manual_seed(0)
    board = td.checkerboard(20_000, g)
    assert td.on_squares(board) == 1.0
    uniform = (torch.rand(20_000, 2, generator=g) * 4 - 2) * td.BOARD_SCALE  # the whole 4 x 4 board
    assert abs(td.on_squares(uniform) - 0.5) < 0.02
    assert td.on_squares(board + torch.tensor([td.BOARD_SCALE, 0.0])) == 0.0  # shifted by a square: all off
    assert td.on_squares(3 * board) < 0.2  # mostly outside the board
    squares = td.checkerboard_squares()
    inside = [any(x0 <= p[0] < x0 + s and y0 <= p[1] < y0 + s for x0, y0, s in squares) for p in board[:500].tolist()]
    assert len(squares) == 8 and all(inside)


def test_adaptive_weight_moves_the_minimiser_in_two_dimensions():
    """README ("The 2-D regime"): on 2-D data the adaptive weight with p > 0 changes what the v rows converge to. The
    loss's stationary point at a point z_t is m = sum_i w_i v_i / sum_i w_i, w_i = 1 / (|m - v_i|^2 + c)^p over the
    targets v_i = (z - x_i) / t of x_i ~ p(x | z_t) (exact for the Gaussian mixture). p = 0 gives the exact v
    = E[v | z_t]; TOY_OVERRIDES' p = 0.5 a median-like point ~0.1-0.3 away (squared) where the posterior is spread."""
    gm, g = td.GaussianMixture.default(), torch.Generator().manual_seed(0)
    dist = {}
    for p in (0.0, mf.TOY_OVERRIDES["p"], 1.0):
        method, err = mf.MeanFlow("meanflow", p=p), []
        for _ in range(40):
            t = 0.3 + 0.4 * torch.rand((), generator=g, dtype=torch.float64).item()
            z = (1 - t) * gm.sample(1, g).double() + t * torch.randn(1, 2, generator=g, dtype=torch.float64)
            *_, logits = gm._components(z, gm._time(t, z))
            k = torch.multinomial(torch.softmax(logits[0], -1), 4000, replacement=True, generator=g)
            prec = 1 / gm.sigma[k] ** 2 + (1 - t) ** 2 / t ** 2  # x | z_t, k is Gaussian: its precision and mean
            mean = (gm.mu[k] / gm.sigma[k, None] ** 2 + (1 - t) * z / t ** 2) / prec[:, None]
            x = mean + prec[:, None].rsqrt() * torch.randn(4000, 2, generator=g, dtype=torch.float64)
            v = (z - x) / t
            m = v.mean(0)
            for _ in range(100):  # iteratively reweighted means, the weight read from method.adaptive itself:
                l = ((v - m) ** 2).sum(1).requires_grad_()  # d adaptive(l) / dl = 1 / sg((l + c)^p) = w
                w, = torch.autograd.grad(method.adaptive(l).sum(), l)
                m = (w[:, None] * v).sum(0) / w.sum()
            err.append(((m - gm.v(z, t)[0]) ** 2).sum().item())
        dist[p] = sum(err) / len(err)
    assert dist[0.0] < 0.003 and dist[mf.TOY_OVERRIDES["p"]] > 0.1 and dist[1.0] > 3 * dist[0.5], dist


def test_toy_mlp_takes_raw_inputs_and_starts_at_zero():
    net = mf.MLP(dim=2, hidden=16, depth=2, num_classes=3, guidance_cond=True, v_head=True, in_context=True)
    assert net.body[0].in_features == 2 + 2 + 3  # z, t, t - r, and iMF's three guidance conditions
    z, t = torch.randn(5, 2), torch.rand(5)
    u, v = net(z, t, t / 2, torch.tensor([0, 1, 2, 3, 0]), return_v=True)
    assert u.shape == v.shape == (5, 2) and u.abs().max() == 0 and v.abs().max() == 0


def test_toy_run_prints_and_draws_the_on_board_share(tmp_path, capsys):
    code, out, err = run_main(["--steps", 2, "--batch-size", 32, "--out", tmp_path], capsys)
    assert code == 0, err
    lines = [s for s in out.splitlines() if "on the squares" in s]
    assert len(lines) == 2 and "1-NFE" in lines[0] and "2-NFE" in lines[1]
    assert (tmp_path / "step-0000002.png").exists()
    # the share of the EMA network's own 1-NFE samples: --sample draws the same 2000 noise points from the checkpoint
    code, _, err = run_main(["--steps", 2, "--batch-size", 32, "--out", tmp_path, "--sample", 2000], capsys)
    assert code == 0, err
    pts = torch.from_numpy(np.load(tmp_path / "samples-2000-nfe1.npz")["arr_0"])
    assert f" {100 * td.on_squares(pts):.1f}% on the squares" in lines[0], lines[0]


def load_study():  # notebooks/convergence_study.py as a module
    spec = importlib.util.spec_from_file_location("study", os.path.join(HERE, "notebooks", "convergence_study.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_study_runner_appends_and_resumes(tmp_path, capsys):
    """notebooks/convergence_study.py (the study's toy runner): one JSON line per (recipe, seed), finished runs
    skipped."""
    study = load_study()

    out = tmp_path / "study.jsonl"
    argv = ["--out", str(out), "--steps", "4", "--eval-every", "2", "--recipes", "meanflow", "dtd only", "--seeds", "0"]
    assert study.main(argv) == 0
    runs = [json.loads(s) for s in open(out)]
    assert {(d["recipe"], d["seed"]) for d in runs} == {("meanflow", 0), ("dtd only", 0)}
    assert [c["step"] for c in runs[0]["curve"]] == [0, 2, 4] and "u 1-NFE jump" in runs[0]["curve"][-1]
    assert study.main(argv + ["1"]) == 0 and "2 runs to do, 2 already" in capsys.readouterr().out


@pytest.mark.parametrize("flags, named", [
    (["--lr", "1e-3"], "holds runs with other settings"), (["--steps", "6"], "holds runs with other settings"),
    (["--part", "images"], "holds runs with other settings"), (["--garbage"], "line 2 is not a run of this study"),
    (["--steps", "0"], "--steps 0: must be at least 1"), (["--eval-every", "0"], "--eval-every 0: must be at least 1"),
    (["--ema", "1"], "--ema 1.0: must be in [0, 1)"), (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--lr", "inf"], "--lr inf: must be a positive number"), (["--ema", "0.9"], "holds runs with other settings"),
    (["--image-run"], "holds runs with other settings"), (["--eval-every", "3"], "holds runs with other settings"),
    (["--seeds", "-1"], "--seeds -1: each must be in [0, 2**32)"), (["--seeds", "0", str(2**64)], "each must be in"),
    (["--out", ""], "--out is empty"), (["--data-path", "x"], "--data-path is read by --part images only"),
    (["--workers", "0"], "--workers 0: must be at least 1"), (["--recipes", "nope"], "invalid choice: 'nope'")])
def test_study_runner_refuses_bad_numbers_and_another_studys_file(tmp_path, capsys, flags, named):
    """A study file resumes only at the settings it was made with (a run there at another lr, length or part would
    count as done, and the notebooks would mix them); bad numbers and a file that is not a study's: one line, exit 2,
    the file unchanged."""
    study = load_study()
    out = tmp_path / "study.jsonl"
    run = dict(recipe="meanflow", seed=0, steps=4, lr=2e-3, batch_size=256, ema=0.995, eval_every=2)
    image_run = dict(run, floor={}, classifier_steps=1500)  # an image study's run (it has a floor) at the toy's numbers
    out.write_text(json.dumps(image_run if flags == ["--image-run"] else run) + "\n"
                   + ("{not json\n" if flags == ["--garbage"] else ""))
    before = out.read_text()
    argv = ["--out", str(out), "--steps", "4", "--recipes", "meanflow", "--seeds", "0", "1"]
    argv += [] if "--eval-every" in flags else ["--eval-every", "2"]
    with pytest.raises(SystemExit) as exit_:
        study.main(argv + ([] if flags in (["--garbage"], ["--image-run"]) else flags))
    errors = capsys.readouterr().err.splitlines()  # one line: argparse printed its usage block before its errors
    assert exit_.value.code == 2 and len(errors) == 1 and named in errors[0] and out.read_text() == before


def test_study_runner_checks_the_scoring_classifier_and_drops_a_cut_off_last_line(tmp_path, capsys):
    """Image runs scored by a classifier trained for other steps do not count as done (one line, the file unchanged);
    a run killed while its line was written leaves that line cut off: the next start drops it and runs it again."""
    study = load_study()
    out = tmp_path / "study.jsonl"
    run = dict(recipe="meanflow", seed=0, steps=4, lr=2e-3, batch_size=64, ema=0.99, eval_every=2,
               classifier_steps=1500, floor={})
    out.write_text(json.dumps(run) + "\n")
    argv = ["--part", "images", "--out", str(out), "--steps", "4", "--eval-every", "2", "--recipes", "meanflow",
            "--seeds", "0"]
    with pytest.raises(SystemExit) as exit_:
        study.main(argv + ["--classifier-steps", "10"])
    assert exit_.value.code == 2 and "holds runs with other settings" in capsys.readouterr().err
    assert out.read_text() == json.dumps(run) + "\n"
    out.write_text(json.dumps(run) + "\n" + json.dumps(dict(run, seed=1))[:40])  # seed 1's line, cut off
    assert study.main(argv) == 0
    assert "dropping its cut-off last line" in capsys.readouterr().out
    assert out.read_text() == json.dumps(run) + "\n"
    with pytest.raises(SystemExit) as exit_:  # an --out inside a file: one line, not a traceback from makedirs
        study.main(["--out", str(out / "s.jsonl")])
    assert exit_.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err


def tiny_image_study(tmp_path, monkeypatch):
    """The study module with a tiny DiT and Fashion-MNIST files of both splits in tmp_path/fm: 2 real test images per
    class for the floor, the other 4 the reference."""
    study = load_study()
    folder = str(tmp_path / "fm")
    make_fashion(folder)
    rng = np.random.default_rng(1)
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), rng.integers(0, 256, (60, 28, 28)))
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), np.arange(60) % 10)
    monkeypatch.setattr(study, "N_PER_CLASS", 2)
    monkeypatch.setattr(study, "NET", dict(patch_size=8, depth=1, hidden_size=32, num_heads=2))
    return study, folder


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # a few images: 64-d covariances are singular
def test_study_runner_images(tmp_path, monkeypatch):
    """The image half: Fashion-MNIST files (training and test split) in the official format, a DiT per run, 1- and
    2-NFE samples scored by the classifier against the test split, with the real-data floor."""
    study, folder = tiny_image_study(tmp_path, monkeypatch)
    out = tmp_path / "study.jsonl"
    argv = ["--part", "images", "--out", str(out), "--steps", "2", "--eval-every", "1", "--classifier-steps", "2",
            "--recipes", "meanflow", "improved-dtd", "--seeds", "0", "--data-path", folder]
    assert study.main(argv) == 0
    runs = [json.loads(s) for s in open(out)]
    assert [d["recipe"] for d in runs] == ["meanflow", "improved-dtd"] and runs[0]["batch_size"] == 64
    assert (runs[0]["eval_every"], runs[0]["classifier_steps"]) == (1, 2)  # the settings a resume checks
    last = runs[1]["curve"][-1]
    assert [c["step"] for c in runs[0]["curve"]] == [0, 1, 2]
    # the study passes progress: by the second of 2 steps (progress 0.5 > dtd_share) every stage is unlocked
    assert runs[0]["curve"][-1]["dtd_stage"] == 0 and last["dtd_stage"] == mf.RECIPES["improved-dtd"]["dtd_stages"] - 1
    assert all(0 <= last[f"acc {k}-NFE"] <= 1 and last[f"fd {k}-NFE"] >= 0 for k in (1, 2))
    assert 0 <= runs[0]["floor"]["acc"] <= 1 and runs[0]["floor"]["fd"] >= 0
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(SystemExit, match="no Fashion-MNIST test split"):
        study.main(argv[:-1] + [folder, "--seeds", "1"])


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # a few images: 64-d covariances are singular
def test_study_keeps_its_scoring_classifier_and_refuses_runs_scored_by_another(tmp_path, monkeypatch, capsys):
    """The image study trains its classifier once and keeps it beside the results: a resume scores with that one even
    where training would give other weights (another machine's kernels: stood in for by another initialisation);
    without it, runs scored by another classifier are refused (one line, nothing written), and the same classifier
    trained again (the same machine) is accepted and kept. Kills: retraining on resume; no check of the runs."""
    study, folder = tiny_image_study(tmp_path, monkeypatch)
    out, kept = tmp_path / "study.jsonl", tmp_path / "study.jsonl.classifier.pt"
    argv = ["--part", "images", "--out", str(out), "--steps", "1", "--eval-every", "1", "--classifier-steps", "2",
            "--recipes", "meanflow", "--data-path", folder, "--seeds", "0"]
    assert study.main(argv) == 0 and kept.exists()
    first = json.loads(out.read_text())
    trained = study.classifier

    def elsewhere(data, steps):  # what another machine's kernels would train: other weights
        torch.manual_seed(1)
        return study.cnn().eval().requires_grad_(False)
    monkeypatch.setattr(study, "classifier", elsewhere)
    assert study.main(argv + ["1"]) == 0  # resumed with the kept classifier: the same floor
    runs = [json.loads(s) for s in open(out)]
    assert [d["seed"] for d in runs] == [0, 1]
    scorer = lambda d: (d["floor"], d["classifier_test_accuracy"])
    assert scorer(runs[1]) == scorer(first)

    os.remove(kept)
    before = out.read_text()
    with pytest.raises(SystemExit) as exit_:
        study.main(argv + ["1", "2"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert exit_.value.code == 2 and len(errors) == 1 and "scored by another classifier" in errors[0]
    assert out.read_text() == before and not kept.exists()
    monkeypatch.setattr(study, "classifier", trained)  # this machine again: the same weights, accepted and kept
    assert study.main(argv + ["1", "2"]) == 0 and kept.exists() and len(out.read_text().splitlines()) == 3

    # a study killed before its first run kept only its classifier: resumed at other steps, or the file damaged
    other = tmp_path / "other.jsonl"
    for content, named in [(kept.read_bytes(), "trained for 2 steps, not --classifier-steps 3"),
                           (b"not a checkpoint", "is not this study's scoring classifier")]:
        (tmp_path / "other.jsonl.classifier.pt").write_bytes(content)
        with pytest.raises(SystemExit) as exit_:
            study.main(argv[:2] + ["--out", str(other), "--classifier-steps", "3"] + argv[4:8] + argv[10:])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert exit_.value.code == 2 and len(errors) == 1 and named in errors[0] and not other.exists()


@torch.no_grad()
def test_study_image_scores_are_the_classifiers_accuracy_and_frechet_distance(monkeypatch):
    """The image study's scores, recomputed directly with a stand-in classifier: the accuracy of the samples' class
    blocks, the Frechet distance of their features to the test images outside the floor set, and the floor: the first
    N_PER_CLASS test images of each class scored as a sample set."""
    study = load_study()
    monkeypatch.setattr(study, "N_PER_CLASS", 3)
    g = torch.Generator().manual_seed(0)
    tx, ty = np.random.default_rng(0).integers(0, 256, (100, 32, 32), dtype=np.uint8), torch.arange(100) % 10
    test = train.Pixels(tx, ty.numpy(), flip=False)
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10))
    scores = study.ImageScores(clf, test)
    x = 1.5 * torch.randn(30, 1, 32, 32, generator=g)  # samples, some beyond [-1, 1]: scored clamped
    feats, y = clf[:-1](x.clamp(-1, 1)), torch.arange(10).repeat_interleave(3)  # class blocks, 3 samples each
    images = test.get(torch.arange(100), None)[0]
    real = [i for k in range(10) for i in (ty == k).nonzero()[:3, 0].tolist()]
    ref = clf[:-1](images[[i for i in range(100) if i not in real]]).double().numpy()
    got = scores(x)
    assert got["acc"] == pytest.approx((clf[-1](feats).argmax(1) == y).float().mean().item())
    assert got["fd"] == pytest.approx(train.frechet_distance(feats.double().numpy(), ref))
    floor = dict(acc=(clf(images[real]).argmax(1) == ty[real]).float().mean().item(),
                 fd=train.frechet_distance(clf[:-1](images[real]).double().numpy(), ref))
    assert scores.floor == pytest.approx(floor) and floor["fd"] > 0


# --- tangent on r != t rows ---
# The loss runs the forward-mode pass on the r != t rows only and the guidance forwards only on the rows that use
# them. The reference below is the straightforward loss: one forward-mode pass over the whole batch through stock
# PyTorch layers (torch.func.jvp, math attention), every guidance term on every row.
def reference_loss(method, net, x, y, t, r, e, progress, seed, stop_gradient=True):
    sg = (lambda a: a.detach()) if stop_gradient else (lambda a: a)
    torch.manual_seed(seed)  # the same label drops (and iMF conditions) as method.loss after the same seed
    n = int((t != r).sum())
    t_, r_ = mf.bcast(t, x), mf.bcast(r, x)
    z, v = (1 - t_) * x + t_ * e, e - x
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    y_in, drop = method.drop_labels(y, n, net.num_classes) if y is not None else (None, None)
    null = None if y is None else torch.full_like(y, net.num_classes)
    if method.imf:
        omega, t_min, t_max = method.sample_imf_conditions(t, r)
        inside = (t >= t_min) & (t <= t_max)
        with torch.no_grad():
            if y is None:
                v_c, v_g = net(z, t, t, None, ones, zeros, ones, return_v=True)[1], v
            else:
                v_c_omega, v_c_one, v_u = (net(z, t, t, lab, om, zeros, ones, return_v=True)[1]
                                           for lab, om in ((y, omega), (y, ones), (null, ones)))
                v_c = torch.where(mf.bcast(inside, v), v_c_omega, v_c_one)
                omega_m = mf.bcast(torch.where(inside, omega, 1.0), v)
                v_g = torch.where(mf.bcast(drop, v), v, v + (1 - 1 / omega_m) * (v_c - v_u))
        (u, v_head), (dudt, _) = torch.func.jvp(lambda z, t, r: net(z, t, r, y_in, omega, t_min, t_max, return_v=True),
                                                (z, t, r), (v_c, ones, zeros))
        V = u + (t_ - r_) * sg(dudt)
        return (method.adaptive(mf.sq_err(V, v_g)) + method.adaptive(mf.sq_err(v_head, v_g))).mean()
    v_g = v
    if y is not None and (method.omega, method.kappa) != (1.0, 0.0):
        with torch.no_grad():
            u_null, u_cond = net(z, t, t, null), net(z, t, t, y)
        inside = mf.bcast((t >= method.t_lo) & (t <= method.t_hi), v).to(v.dtype)
        om, ka = 1 + inside * (method.omega - 1), inside * method.kappa  # in v's dtype (where() would give fp32)
        v_g = torch.where(mf.bcast(drop, v), v, om * v + (1 - om - ka) * u_null + ka * u_cond)
    u, dudt = torch.func.jvp(lambda z, t, r: net(z, t, r, y_in), (z, t, r), (v_g, ones, zeros))
    l = mf.sq_err(u, sg(v_g - (t_ - r_).clamp(0, 1) * dudt))
    return (method.weights(t, r, progress) * method.adaptive(l)).mean()


def _guided(recipe):
    return {} if recipe == "imf" else dict(omega=0.2, kappa=0.92, t_hi=0.75)  # some rows outside the interval


@pytest.mark.parametrize("recipe", list(mf.RECIPES))
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("rules", ["appendix", "stock"])
def test_loss_and_gradients_match_whole_batch_reference_fp64(recipe, labels, rules, monkeypatch):
    """Under the stock rules du/dt is differentiable, so only the loss's stop-gradient keeps it out of the gradient
    (the APPENDIX computes tangents under no_grad, which would hide a missing one): there the test checks it too."""
    if rules == "stock":
        monkeypatch.setattr(mf, "JVP_RULES", mf.StockRules)
    method = mf.MeanFlow(recipe, class_dropout=0.25, **(_guided(recipe) if labels else {}))
    B, K = 16, 3
    net = randomize(tiny_dit(num_classes=K if labels else 0, **method.net_kwargs)).double()
    g = torch.Generator().manual_seed(0)
    x, e = (torch.randn(B, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, K, (B,), generator=g) if labels else None
    torch.manual_seed(1)
    t, r = (a.double() for a in method.sample_t_r(B))
    n = round(method.ratio_r_neq_t * B)
    assert (t[:n] != r[:n]).all() and (t[n:] == r[n:]).all()  # the order the loss relies on
    torch.manual_seed(2)
    loss, _ = method.loss(net, x, y, progress=0.5, t=t, r=r, e=e)
    ref_net = copy.deepcopy(net).set_attention("math")
    ref = reference_loss(method, ref_net, x, y, t, r, e, 0.5, seed=2)
    g_loss = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ref, list(ref_net.parameters()), allow_unused=True)
    assert abs(loss.item() - ref.item()) < 1e-10 * ref.item(), (loss.item(), ref.item())
    assert all((a is None) == (b is None) and (a is None or rel(a, b) < 1e-9) for a, b in zip(g_loss, g_ref))
    differs = lambda g_other: sum((a - b).norm() for a, b in zip(g_other, g_ref) if a is not None) > 1e-3 * sum(
        b.norm() for b in g_ref if b is not None)
    if labels:  # the test has teeth: other label drops give other gradients
        g_other = torch.autograd.grad(reference_loss(method, ref_net, x, y, t, r, e, 0.5, seed=3),
                                      list(ref_net.parameters()))
        assert differs(g_other)
    if rules == "stock":  # and without the stop-gradient another gradient
        no_sg = reference_loss(method, ref_net, x, y, t, r, e, 0.5, seed=2, stop_gradient=False)
        assert differs(torch.autograd.grad(no_sg, list(ref_net.parameters()), allow_unused=True))


@pytest.mark.parametrize("recipe,B", [("meanflow", 6), ("meanflow", 10), ("meanflow", 14), ("imf", 5), ("imf", 7)])
def test_sampled_and_given_t_r_give_the_same_loss(recipe, B):
    """loss() takes the r != t rows as the first round(ratio * B) rows that sample_t_r put there; the same (t, r, e)
    given explicitly (rows counted from the data) must give the same loss, also where ratio * B is fractional."""
    # the plain squared error: with p = 1 every row's loss is ~1, whatever its target
    method = mf.MeanFlow(recipe, p=0.0)
    net = randomize(mf.MLP(dim=2, hidden=16, num_classes=3, **method.net_kwargs))
    x, y = torch.randn(B, 2), torch.randint(0, 3, (B,))
    torch.manual_seed(0)
    logs_a = method.loss(net, x, y, 0.3)[1]
    torch.manual_seed(0)
    t, r = method.sample_t_r(B)
    e = torch.randn_like(x)
    assert (t != r).sum() == round(method.ratio_r_neq_t * B)
    logs_b = method.loss(net, x, y, 0.3, t, r, e)[1]
    for key in ("loss", "v_loss", "u_loss"):
        assert torch.allclose(logs_a[key], logs_b[key], rtol=1e-6, atol=0), key


def test_rows_in_any_order_give_the_same_loss():
    method = mf.MeanFlow("improved-minsnr", omega=1.0, kappa=0.5, class_dropout=0.0)
    net = randomize(tiny_dit(num_classes=3)).double()
    g = torch.Generator().manual_seed(0)
    x, e = (torch.randn(12, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    y, t, r = torch.randint(0, 3, (12,), generator=g), *(a.double() for a in method.sample_t_r(12))
    perm = torch.randperm(12, generator=g)
    a = method.loss(net, x, y, 0.3, t, r, e)[0]
    b = method.loss(net, x[perm], y[perm], 0.3, t[perm], r[perm], e[perm])[0]
    assert abs(a.item() - b.item()) < 1e-12 * abs(a.item())


class RowCounter(torch.nn.Module):
    """Wraps a network; records (rows, labels, grad enabled, has a tangent) of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.num_classes, self.calls = net, net.num_classes, []

    def forward(self, z, t, r, y=None, *args, **kw):
        dual = torch.autograd.forward_ad.unpack_dual(z).tangent is not None
        self.calls.append((z.shape[0], y, torch.is_grad_enabled(), dual))
        return self.net(z, t, r, y, *args, **kw)


@pytest.mark.parametrize("recipe", ["meanflow", "imf"])
def test_class_dropout_only_on_r_equals_t_rows_at_the_official_rates(recipe):
    method, B, K = mf.MeanFlow(recipe), 1000, 10
    n = round(method.ratio_r_neq_t * B)
    y = torch.randint(0, K, (B,))
    torch.manual_seed(0)
    drops = torch.stack([method.drop_labels(y, n, K)[1] for _ in range(400)]).float()
    assert drops[:, :n].sum() == 0  # never an r != t row
    rate = drops[:, n:].mean().item()  # official: Binomial(B, 0.1) rows, all r = t: 0.1 / 0.75 or 0.1 / 0.5
    assert abs(rate - 0.1 * B / (B - n)) < 0.005, rate
    assert abs(drops.mean().item() - 0.1) < 0.004
    # in the loss: the forward-mode pass (r != t rows) never sees the null label, the plain forward does
    net = RowCounter(mf.MLP(dim=2, hidden=16, num_classes=K, **method.net_kwargs))
    torch.manual_seed(1)
    method.loss(net, torch.randn(B, 2), y)
    [(jvp_rows, jvp_y)], [(fm_rows, fm_y)] = ([c[:2] for c in net.calls if c[3]],
                                              [c[:2] for c in net.calls if c[2] and not c[3]])
    assert jvp_rows == n and fm_rows == B - n and (jvp_y != K).all() and 0 < (fm_y == K).sum() < 0.3 * (B - n)


def test_guidance_forwards_only_on_the_rows_that_use_them():
    B, K = 400, 10
    torch.manual_seed(0)
    y = torch.randint(0, K, (B,))
    # MeanFlow, L/2's setting: u(z,t,t|null) on rows inside [0, 0.8] with a kept label; u(z,t,t|y) also, but
    # the r = t rows take it from their own plain forward
    method = mf.MeanFlow("meanflow", omega=0.2, kappa=0.92, t_hi=0.8)
    net = RowCounter(mf.MLP(dim=2, hidden=16, num_classes=K))
    torch.manual_seed(1)
    t, r = method.sample_t_r(B)
    torch.manual_seed(2)
    method.loss(net, torch.randn(B, 2), y, t=t, r=r, e=torch.randn(B, 2))
    torch.manual_seed(2)
    torch.randn(B, 2), torch.randn(B, 2)
    drop = method.drop_labels(y, B // 4, K)[1]
    used = (t <= 0.8) & ~drop
    assert [c[0] for c in net.calls if not c[2]] == [used.sum().item() + used[:B // 4].sum().item()]
    # iMF: v_c at each row's omega_m on the r != t rows, v_u on the rows with guidance: at most 2 x B rows
    method = mf.MeanFlow("imf")
    net = RowCounter(mf.MLP(dim=2, hidden=16, num_classes=K, **method.net_kwargs))
    t, r = method.sample_t_r(B)
    torch.manual_seed(3)
    method.loss(net, torch.randn(B, 2), y, t=t, r=r, e=torch.randn(B, 2))
    torch.manual_seed(3)
    torch.randn(B, 2), torch.randn(B, 2)
    drop = method.drop_labels(y, B // 2, K)[1]
    _, t_min, t_max = method.sample_imf_conditions(t, r)
    used = (t >= t_min) & (t <= t_max) & ~drop
    assert [c[0] for c in net.calls if not c[2]] == [B // 2 + used.sum().item()]  # about 1.2 x B rows


def _ddp_grads(net, method, model, rows, data):
    x, y, t, r, e = (a[rows] for a in data)
    net.zero_grad(set_to_none=True)
    method.loss(model, x, y, t=t, r=r, e=e)[0].backward()
    return [p.grad.clone() for p in net.parameters()]


def _ddp_loss_worker(rank, world, port, out):
    with gloo(rank, world, port):
        results = {}
        for recipe in ("meanflow", "imf"):  # MeanFlow with guidance forwards (B/2's setting), iMF
            method = mf.MeanFlow(recipe, class_dropout=0.0, **({} if recipe == "imf" else dict(omega=1.0, kappa=0.5)))
            net = randomize(tiny_dit(num_classes=3, **method.net_kwargs)).double()
            g = torch.Generator().manual_seed(1)
            x, e = (torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
            t = torch.rand(8, generator=g, dtype=torch.float64)
            data = (x, torch.randint(0, 3, (8,), generator=g), t, torch.where(torch.arange(8) % 2 == 0, t / 2, t), e)
            model, fired = torch.nn.parallel.DistributedDataParallel(net), []
            model.register_comm_hook(None, lambda _, bucket: fired.append(1) or dist.all_reduce(
                bucket.buffer().div_(world), async_op=True).get_future().then(lambda f: f.value()[0]))
            torch.manual_seed(2)  # the same iMF conditions in every process
            results[recipe] = dict(ddp=_ddp_grads(net, method, model, slice(rank * 4, rank * 4 + 4), data),
                                   fired=len(fired))
            if rank == 0:  # one process, the two halves of the global batch: the mean of their gradients
                single = copy.deepcopy(net)
                halves = [torch.manual_seed(2) and _ddp_grads(single, method, single, slice(i, i + 4), data)
                          for i in (0, 4)]
                results[recipe]["global"] = [(a + b) / 2 for a, b in zip(*halves)]
                results[recipe]["own"] = halves[0]
            del model  # freed while its process group lives (freed after it, gloo hung at exit: 2 in ~38 runs)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_hooks_fire_through_plain_forward_jvp_and_guidance_forward(tmp_path):
    """The loss's three kinds of forward (plain, forward-mode on dual tensors, no-grad guidance) through one
    DistributedDataParallel wrapper and one backward: DDP's all-reduce hook fires and the gradients equal one
    process's on the global batch."""
    mp.spawn(_ddp_loss_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for recipe in ("meanflow", "imf"):
        r0, r1 = ranks[0][recipe], ranks[1][recipe]
        assert r0["fired"] >= 1 and r1["fired"] == r0["fired"]
        assert all(torch.equal(a, b) for a, b in zip(r0["ddp"], r1["ddp"]))
        assert max(rel(a, b) for a, b in zip(r0["ddp"], r0["global"])) < 1e-12
        assert max(rel(a, b) for a, b in zip(r0["own"], r0["global"])) > 1e-2  # the all-reduce did something


# --- reading order: the APPENDIX is speed only ---
def _meanflow_without_appendix(tmp_path, edit=lambda text: text, name="meanflow_cut"):
    """meanflow.py cut at its APPENDIX banner (then edit(text)), imported under another name."""
    lines = open(mf.__file__).read().split("\n")
    cut = next(i for i, line in enumerate(lines) if line.startswith("# ====") and "APPENDIX" in line)
    path = tmp_path / f"{name}.py"
    path.write_text(edit("\n".join(lines[:cut]) + "\n"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, cut


def _loss_and_grads(module, make_net, state, recipe, overrides, x, y):
    method = module.MeanFlow(recipe, **overrides)
    net = make_net(module, method).double()
    net.load_state_dict(state)
    torch.manual_seed(1)
    loss, _ = method.loss(net, x, y, progress=0.3)
    loss.backward()
    return loss.detach(), [p.grad for p in net.parameters()]


def test_the_first_jvp_passes_on_no_notice_from_torch_to_itself():
    """The first dual tensor of a process loads torch's JVP decompositions, which call torch.jit.script: torch 2.15
    warns about that (FutureWarning; 2.13: DeprecationWarning), at the first step of `python train.py`. meanflow
    loads them at import without it, and leaves the warning filters as they were. Warnings as errors, fresh process."""
    code = f"""if True:
        import sys, warnings
        sys.path.insert(0, {HERE!r})
        import torch, torch._dynamo  # torch._dynamo (which @torch.compiler.disable imports) adds sympy's own filter
        before = list(warnings.filters)
        import meanflow as mf
        assert warnings.filters == before
        loss, _ = mf.MeanFlow("meanflow").loss(mf.MLP(dim=2, hidden=8), torch.randn(8, 2))
        loss.backward()"""
    p = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", "-c", code],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_meanflow_without_appendix_computes_the_same(tmp_path):
    cut_mf, cut = _meanflow_without_appendix(tmp_path)
    assert not hasattr(cut_mf, "TangentRules") and cut_mf.JVP_RULES is cut_mf.StockRules
    assert mf.JVP_RULES is mf.TangentRules and cut > 100
    dit = lambda m, method: m.DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=5, **method.net_kwargs)
    imf_dit = lambda m, method: m.iMF_models["Ti/2"](input_size=8, in_channels=2, hidden_size=32, num_heads=2,
                                                     depth=3, head_depth=1, num_classes=5)
    mlp = lambda m, method: m.MLP(dim=2, hidden=32, depth=2, **method.net_kwargs)
    guided = dict(omega=2.0, kappa=0.3, t_hi=0.9)
    cases = [(mlp, "meanflow", dict(mf.TOY_OVERRIDES), (16, 2), None),
             (dit, "meanflow", guided, (8, 2, 8, 8), 5),
             (dit, "improved-dtd", dict(guided, dtd_patience=1), (8, 2, 8, 8), 5),
             (dit, "improved-minsnr", guided, (8, 2, 8, 8), 5),
             (dit, "imf", {}, (8, 2, 8, 8), 5),
             (imf_dit, "imf", {}, (8, 2, 8, 8), 5)]
    for make_net, recipe, overrides, shape, classes in cases:
        torch.manual_seed(0)
        state = make_net(mf, mf.MeanFlow(recipe, **overrides)).double().state_dict()
        for v in state.values():  # zero-initialised layers would hide differences: perturb every parameter
            v.add_(0.05 * torch.randn_like(v))
        x = torch.randn(*shape, dtype=torch.float64)
        y = None if classes is None else torch.randint(0, classes, (shape[0],))
        full = _loss_and_grads(mf, make_net, state, recipe, overrides, x, y)
        short = _loss_and_grads(cut_mf, make_net, state, recipe, overrides, x, y)
        assert torch.isfinite(full[0]) and full[0] > 0, recipe
        torch.testing.assert_close(short[0], full[0], rtol=1e-8, atol=1e-8, msg=recipe)
        for a, b in zip(short[1], full[1]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=recipe)



# README's lecture cut, exactly: whole definitions (with the comment lines right above them), a few statements, and
# four replacements. The README lists the same names; test_readme_lecture_cut_names_what_the_test_cuts checks that.
LECTURE_DELETE = ["drop_labels", "guided_velocity",  # guidance
                  "_expect", "beta", "_alpha_raw", "weights", "dtd_step", "_dtd_reset", "state_dict",
                  "load_state_dict",  # improved training
                  "sample_imf_conditions", "imf_guided_velocity", "imf_loss", "rope_cos_sin", "apply_rope", "RMSNorm",
                  "iMFAttention", "SwiGLU", "iMFBlock", "iMFFinalLayer", "iMFDiT", "iMF_sizes", "iMF_models",
                  "imf_guidance", "imf_guidance_2nfe"]  # iMF
LECTURE_REPLACE = [("y_in, drop = ", "y_in = y"), ("v_g = self.guided_velocity(", "v_g = v"),
                   ("w = self.weights(", "w = 1"), ("RECIPES = {", 'RECIPES = {"meanflow": _meanflow}')]


def lecture_cut(text):
    """README's cut for a lecture, applied to meanflow.py without its APPENDIX."""
    import ast
    lines, tree = text.split("\n"), ast.parse(text)
    drop = set()  # 0-based line numbers

    def cut(node, comments=True):
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while comments and lines[first - 1].lstrip().startswith("#"):
            first -= 1
        drop.update(range(first, node.end_lineno))

    def method(name):
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MeanFlow")
        return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)

    for node in ast.walk(tree):
        name = getattr(node, "name", None) or (isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None))
        if name in LECTURE_DELETE:
            cut(node)
    init = method("__init__").body  # every statement after self.__dict__.update(...)
    start = next(i for i, n in enumerate(init) if "__dict__.update" in ast.unparse(n))
    for n in init[start + 1:]:
        cut(n, comments=False)
    for fn, test in [("sample_t_r", "self.dtd_stages"), ("loss", "self.imf"), ("_logs", "self.beta_k is not None")]:
        for n in ast.walk(method(fn)):
            if isinstance(n, ast.If) and ast.unparse(n.test) == test:
                cut(n, comments=False)
    for n in ast.walk(method("loss")):
        if isinstance(n, ast.Expr) and ast.unparse(n).startswith("self.dtd_step("):
            cut(n, comments=False)
    for old, new in LECTURE_REPLACE:
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign) and ast.unparse(n).startswith(old))
        indent = lines[node.lineno - 1][:len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())]
        lines[node.lineno - 1] = indent + new
        drop.update(range(node.lineno, node.end_lineno))
    text = "\n".join(line for i, line in enumerate(lines) if i not in drop)
    assert text.count(", dtd_stage=self.dtd_stage)") == 1
    return text.replace(", dtd_stage=self.dtd_stage)", ")")


def test_readme_lecture_cut_trains_the_same(tmp_path):
    """The README's lecture cut leaves a file that computes plain MeanFlow's loss and gradients exactly (fp64): the toy
    MLP and a DiT with labels (no class dropout, no guidance: the cut removes both), and samples the same; the
    other recipes are refused rather than run as plain MeanFlow."""
    lec, _ = _meanflow_without_appendix(tmp_path, lecture_cut, "meanflow_lecture")
    for name in LECTURE_DELETE:
        assert not hasattr(lec, name) and not hasattr(lec.MeanFlow, name), name
    assert len(open(lec.__file__).read().split("\n")) < 700
    with pytest.raises(ValueError, match="unknown recipe"):
        lec.MeanFlow("improved-dtd")
    dit = lambda m, method: m.DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=5)
    mlp = lambda m, method: m.MLP(dim=2, hidden=32, depth=2)
    for make_net, overrides, shape, classes in [(mlp, dict(mf.TOY_OVERRIDES), (16, 2), None),
                                                (dit, dict(class_dropout=0.0), (8, 2, 8, 8), 5)]:
        torch.manual_seed(0)
        state = make_net(mf, None).double().state_dict()
        for v in state.values():
            v.add_(0.05 * torch.randn_like(v))
        x = torch.randn(*shape, dtype=torch.float64)
        y = None if classes is None else torch.randint(0, classes, (shape[0],))
        full = _loss_and_grads(mf, make_net, state, "meanflow", overrides, x, y)
        short = _loss_and_grads(lec, make_net, state, "meanflow", overrides, x, y)
        assert torch.isfinite(full[0]) and full[0] > 0
        torch.testing.assert_close(short[0], full[0], rtol=1e-8, atol=1e-8)
        for a, b in zip(short[1], full[1]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
        nets = [make_net(m, None).double() for m in (mf, lec)]
        for net in nets:
            net.load_state_dict(state)
        e = torch.randn(*shape, dtype=torch.float64)
        for sampler, steps in [("sample", 1), ("sample", 2), ("sample_euler", 4)]:
            a, b = (getattr(m.MeanFlow("meanflow", **overrides), sampler)(net, e, y, steps=steps)
                    for m, net in zip((mf, lec), nets))
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_readme_lecture_cut_names_what_the_test_cuts():
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    para = readme[readme.index("**For a lecture**"):]
    para = para[:para.index("\n\n")]
    named = {" ".join(n.split()) for n in re.findall(r"`([^`]+)`", para)}  # a span may wrap over two lines
    assert set(LECTURE_DELETE) <= named, set(LECTURE_DELETE) - named
    assert {new for _, new in LECTURE_REPLACE} <= named, {new for _, new in LECTURE_REPLACE} - named


# --- tangent rules of the iMF network (RMSNorm, RoPE) ---
def _imf_rule_cases():
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    F = torch.nn.functional
    cos, sin = (a.double() for a in mf.rope_cos_sin(6, 4))
    return {
        "rms_norm": (lambda x: F.rms_norm(x, (5,), eps=1e-6), (rnd(2, 3, 5),)),
        "rms_norm_default_eps": (lambda x: F.rms_norm(x, (5,)), (rnd(2, 3, 5),)),
        "rms_norm_two_dims": (lambda x: F.rms_norm(x, (3, 5), eps=1e-6), (rnd(2, 3, 5),)),
        "rms_norm_weight": (lambda x, w: F.rms_norm(x, (5,), w, eps=1e-6), (rnd(2, 3, 5), rnd(5))),
        "RMSNorm": (lambda x, w: torch.func.functional_call(mf.RMSNorm(5), {"weight": w}, (x,)),
                    (rnd(2, 3, 5), rnd(5))),
        "apply_rope": (lambda x: mf.apply_rope(x, cos, sin), (rnd(2, 2, 4, 6),)),
        "apply_rope_tables": (mf.apply_rope, (rnd(2, 2, 4, 6), cos.clone().requires_grad_(),
                                              sin.clone().requires_grad_())),
    }


@pytest.mark.parametrize("name", list(_imf_rule_cases()))
def test_imf_tangent_rules_match_numerical_derivatives(name):
    """As test_tangent_rules_match_numerical_derivatives, for the iMF network's RMSNorm and RoPE rules."""
    check_rule(*_imf_rule_cases()[name])


def test_imf_rules_are_used_and_record_no_tangent():
    """RMSNorm and RoPE reach the rules as one call each (F.rms_norm, apply_rope), and in the iMF network's
    forward-mode pass nothing autograd saves for backward holds a tangent (as test_saved_values_carry_no_tangent)."""
    seen, rules = [], mf.JVP_RULES
    mode = type("Spy", (rules,), {"__torch_function__": lambda self, f, ty, a=(), k=None: (
        seen.append(f), rules.__torch_function__(self, f, ty, a, k))[1]})
    ours, mf.JVP_RULES = mf.JVP_RULES, mode
    try:
        _, dudt, saved = jvp_saving(randomize(tiny_imf(num_classes=3)), return_v=True)
    finally:
        mf.JVP_RULES = ours
    assert torch.nn.functional.rms_norm in seen and mf.apply_rope in seen
    assert len(saved) > 50 and all(saved), (len(saved), saved.count(False))
    assert not any(d.requires_grad for d in dudt)


def test_rms_norm_keeps_fp32_under_bf16_autocast():
    """Under bf16 autocast RMSNorm normalises in fp32, casts back to bf16, then multiplies by the fp32 weight: the
    fp32 normalisation of the bf16 input, rounded once (a bf16 normalisation would differ by several ulps)."""
    norm, x = mf.RMSNorm(64), 100 * torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    norm.weight.data.uniform_(0.5, 1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    x32 = x.bfloat16().float()
    ref = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.weight
    assert out.dtype == ref.dtype and (out != ref).float().mean() < 1e-3


# --- bugs a mutation audit found the suite missing (each test fails with its bug, passes without) ---
# beta on r = t rows, a DTD field lost on resume, labels dropped on r != t rows, iMF's omega law for beta != 1,
# unpatchify's patch grid, DTD counting no-grad calls, the DiT's positions, iMF's Euler sampler reading the u-head,
# the DiT's t - r input, addcmul's value, train.py's EMA, warm-up and progress.

def test_beta_weights_only_the_r_neq_t_rows():  # 5c
    m = mf.MeanFlow("improved-dtd")
    t = torch.rand(8)
    assert torch.equal(m.weights(t, t, 0.0), torch.ones(8))
    assert torch.allclose(m.weights(t, 0.5 * t, 0.0), m.beta(0.5 * t, 0.0))


def test_dtd_state_dict_round_trips_and_resumes_every_field():  # 7d, 7e, 7i
    kw = dict(dtd_share=0, dtd_window=7, dtd_patience=60)
    a, g = mf.MeanFlow("improved-dtd", **kw), torch.Generator().manual_seed(0)
    losses = 1 + 0.1 * torch.randn(200, generator=g)
    for v in losses[:10]:  # mid-window, after the stage's first window: every field of the state in use
        a.dtd_step(v)
    sd = a.state_dict()
    assert sd["dtd_steps"] == 10 and sd["dtd_prev"] is not None and sd["dtd_acc"][2] == 3
    b = mf.MeanFlow("improved-dtd", **kw)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for v in losses[10:]:
        a.dtd_step(v), b.dtd_step(v)
        assert b.state_dict() == a.state_dict()


def test_no_label_dropped_on_r_neq_t_rows_even_when_k_exceeds_the_r_eq_t_rows():  # 8d
    m, y = mf.MeanFlow("meanflow", class_dropout=0.9), torch.zeros(8, dtype=torch.long)
    torch.manual_seed(0)
    for _ in range(200):
        assert not m.drop_labels(y, 6, 3)[1][:6].any()
        assert not m.drop_labels(y, 8, 3)[1].any()  # no r = t rows: nothing dropped


def test_imf_omega_law_for_beta_not_one():  # 12d: p(omega) ~ omega^-1/2 on [1, 8]: CDF (sqrt(w) - 1) / (sqrt(8) - 1)
    m = mf.MeanFlow("imf", omega_beta=0.5)
    torch.manual_seed(0)
    t = torch.rand(200_000)
    omega = m.sample_imf_conditions(t, t)[0]
    median = (1 + 0.5 * (8**0.5 - 1)) ** 2  # 3.664
    assert abs(omega.median().item() - median) < 0.03 and 7.9 < omega.max() <= 8 and omega.min() >= 1


def test_unpatchify_puts_each_token_back_at_its_patch():
    # 17a (the order inside a patch is free: the linear layers absorb it)
    net = tiny_dit()
    ids = torch.arange(16.0).view(1, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)  # (1, 1, 8, 8): patch ids
    z = ids.expand(2, 2, 8, 8)  # every pixel and channel of a patch holds the patch's id
    assert torch.equal(net.unpatchify(net.patchify(z)), z)
    assert net.patchify(z)[0, :, 0].tolist() == list(range(16))  # token n is patch (n // 4, n % 4), row-major


def test_dtd_ignores_no_grad_calls():  # 17e
    m = mf.MeanFlow("improved-dtd", dtd_patience=1)
    with torch.no_grad():
        for _ in range(3):
            m.dtd_step(torch.tensor(1.0))
    assert m.dtd_stage == 0
    m.dtd_step(torch.tensor(1.0))
    assert m.dtd_stage == 1


def test_dit_uses_its_positional_embedding():  # 17g
    net = randomize(tiny_dit(num_classes=3), std=0.3)
    z, t = torch.randn(2, 2, 8, 8), torch.rand(2)
    u = net(z, t, t / 2)
    net.pos_embed.zero_()
    assert not torch.allclose(net(z, t, t / 2), u, atol=1e-4)


def test_imf_euler_sampler_reads_the_v_head():  # 17k
    method = mf.MeanFlow("imf")
    net = randomize(mf.MLP(dim=2, hidden=32, **method.net_kwargs), std=0.3)
    e, ones = torch.randn(10, 2), torch.ones(10)
    v = net(e, ones, ones, None, ones, 0 * ones, ones, return_v="only")
    assert torch.allclose(method.sample_euler(net, e, steps=1), e - v, atol=1e-6)


def test_dit_sees_r_only_through_t_minus_r():  # 14a
    net = randomize(tiny_dit(), std=0.3)
    with torch.no_grad():  # silence the t-embedding: u then depends on (t, r) through h = t - r only
        net.t_embedder.mlp[2].weight.zero_(), net.t_embedder.mlp[2].bias.zero_()
    z, t = torch.randn(2, 2, 8, 8), 0.5 + 0.4 * torch.rand(2)
    r = t / 2
    assert torch.allclose(net(z, t + 0.05, r + 0.05), net(z, t, r), atol=1e-6)
    assert not torch.allclose(net(z, t, r / 2), net(z, t, r), atol=1e-4)


def test_addcmul_rule_honours_value():  # 11l
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    check_rule(lambda a, b, c: torch.addcmul(a, b, c, value=0.3), (rnd(2, 5), rnd(2, 5), rnd(2, 5)))


def test_update_ema_moves_by_one_minus_decay():  # 16a
    ema, net = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(ema.weight), torch.nn.init.ones_(net.weight)
    train.update_ema(ema, net, 0.9)
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.1))


def test_warmup_starts_at_lr_over_warmup():  # 16c
    args = SimpleNamespace(lr=1.0, warmup=10)
    assert [train.get_lr(s, args) for s in (0, 4, 9, 10)] == [0.1, 0.5, 1.0, 1.0]


def test_train_step_passes_progress_step_over_steps():  # 16b
    net = torch.nn.Linear(2, 2)
    seen = []

    def loss_fn(x, y, progress):
        seen.append(progress)
        return net(x).sum(), dict(loss=torch.tensor(1.0))

    job = SimpleNamespace(opt=torch.optim.SGD(net.parameters(), lr=0.0), step=3, device="cpu", world=1,
                                ema=torch.nn.Linear(2, 2), net=net, ckpt_path="none")
    train.train_step(SimpleNamespace(lr=0.0, warmup=0, steps=10, ema=0.5), job, loss_fn, torch.ones(1, 2), None)
    assert seen == [0.3] and job.step == 4


def test_readme_teaching_path_cites_the_lines_of_the_functions_it_names():
    """README's teaching path sends a reader to meanflow.py by line ranges ("`jvp` and `StockRules` (lines A-B)"):
    each range must hold the functions named before it, start at most a section banner above the first and end
    within 3 lines of where the last one ends. Line numbers drift whenever the file changes; this makes it fail."""
    import ast
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    para = readme[readme.index("**Teaching path.**"):]
    para = para[:para.index("\n\n")]
    spans = {}  # name -> (first line incl. decorators, last line)
    for node in ast.walk(ast.parse(open(os.path.join(HERE, "meanflow.py"), encoding="utf-8").read())):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans.setdefault(node.name, (first, node.end_lineno))
    pieces = re.split(r"\(lines (\d+)–(\d+)\)", para)  # text, A, B, text, A, B, ..., text
    assert len(pieces) == 1 + 3 * 3, "the teaching path cites three ranges"
    for k in range(0, len(pieces) - 1, 3):
        a, b = int(pieces[k + 1]), int(pieces[k + 2])
        named = [spans[n] for n in re.findall(r"`(\w+)`", pieces[k].split(")")[-1]) if n in spans]
        inside = [s for s in named if not (s[0] < a and s[1] > b)]  # drop an enclosing class (`MeanFlow`)
        assert inside, (a, b)
        assert all(a <= s0 and s1 <= b for s0, s1 in inside), (a, b, inside)
        assert min(s0 for s0, _ in inside) - a <= 15 and 0 <= b - max(s1 for _, s1 in inside) <= 3, (a, b, inside)


def load_benchmark():  # benchmark.py as a module
    spec = importlib.util.spec_from_file_location("bench", os.path.join(HERE, "benchmark.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_runs_and_reports_ratios_to_flow_matching(tmp_path):
    """benchmark.py end to end on the toy MLP (structure only: its numbers are timings, not for a test): flow
    matching and each asked recipe, one JSON line each, ratios to flow matching, the table."""
    out = tmp_path / "bench.jsonl"
    p = subprocess.run([sys.executable, os.path.join(HERE, "benchmark.py"), "--models", "mlp", "--recipes",
                        "meanflow,meanflow@stock", "--steps", "1", "--out", str(out)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {d["kind"]: d for d in map(json.loads, open(out))}
    assert set(rows) == {"fm", "meanflow", "meanflow@stock"} and all(d["model"] == "mlp" for d in rows.values())
    assert rows["fm"]["time_ratio"] == rows["fm"]["cpu_ratio"] == rows["fm"]["mem_ratio"] == 1.0
    assert rows["fm"]["step_mem_ratio"] == 1.0 and len({d["run"] for d in rows.values()}) == 1
    for d in rows.values():
        assert d["step_s"] > 0 and d["peak_mb"] > d["step_mb"] > 0  # on CPU the peak holds the process's start
        assert d["step_mem_ratio"] == pytest.approx(d["step_mb"] / rows["fm"]["step_mb"], abs=0.01)
        assert d["time_ratio"] == pytest.approx(d["step_s"] / rows["fm"]["step_s"], rel=0.05, abs=0.01)
    assert re.search(r"mlp\s+meanflow@stock\s", p.stdout)


@pytest.mark.parametrize("flags, named", [
    (["--models", "Q/9"], "unknown model 'Q/9'"), (["--recipes", "meanflow,foo"], "unknown kind 'foo'"),
    (["--recipes", "meanflow@bar"], "unknown kind 'meanflow@bar'"), (["--steps", "0"], "--steps must be at least 1"),
    (["--recipes", "meanflow@base"], "needs --baseline"), (["--baseline", "nope/meanflow.py"], "no such file"),
    (["--out", "nope/bench.jsonl"], "its folder does not exist"),
    (["--recipes", "fm-split@base", "--baseline", os.path.join(HERE, "meanflow.py")], "leave out @base"),
    (["--recipes", "meanflow@base", "--baseline", os.path.join(HERE, "toy_data", "__init__.py")],
     "defines no MLP or MeanFlow: not a meanflow.py"), (["--batch", "x"], "invalid int value: 'x'")])
def test_benchmark_refuses_bad_flags_in_one_line(tmp_path, flags, named, capsys, monkeypatch):
    """Bad flags: one error line naming the flag, exit 2, before any timing process starts (no output file).
    In this process (the command line itself: the next test)."""
    bench = load_benchmark()
    monkeypatch.setattr(bench, "child", lambda *a: pytest.fail("a timing process started"))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--models", "mlp", *flags])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        bench.main()
    out, err = capsys.readouterr()
    errors = err.splitlines()  # one line: argparse printed its usage block before its errors
    assert exc.value.code == 2 and len(errors) == 1 and named in errors[0], err[-2000:]
    assert not out and os.listdir(tmp_path) == []


def test_benchmark_ctrl_c_ends_in_one_line(tmp_path, capsys, monkeypatch):
    bench = load_benchmark()
    (tmp_path / "b.jsonl").write_text("")

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "child", interrupted)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--models", "mlp", "--out", str(tmp_path / "b.jsonl")])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 130 and capsys.readouterr().err.splitlines() == [
        f"benchmark.py: stopped; the rows measured so far are in {tmp_path / 'b.jsonl'}"]


def test_a_process_that_does_not_download_says_the_tarball_is_missing(tmp_path):
    """Process 0 of each machine downloads CIFAR-10; another that finds no tarball after the barrier (the download
    failed) says so, not "delete it to re-download"."""
    with pytest.raises(train.Fail, match="no cifar-10-python.tar.gz in .*its download failed"):
        train.load_cifar10(str(tmp_path), local_rank=1)
    assert os.listdir(tmp_path) == []


def test_latents_are_found_in_any_folder_name(tmp_path):
    """A folder whose name holds glob characters or "shard-" (lat[1], shard-run/lat) reads its shards and labels."""
    lat = np.zeros((3, 2, 2, 4, 32, 32), np.float16)
    lat[:, :, 1] = 1
    for folder in (tmp_path / "lat[1]", tmp_path / "shard-run" / "lat"):
        folder.mkdir(parents=True)
        np.save(folder / "shard-00000-of-00001.npy", lat)
        np.save(folder / "labels-00000-of-00001.npy", np.array([0, 1, 2]))
        data = train.ImageNetLatents(str(folder))
        assert len(data) == 3 and data.labels.tolist() == [0, 1, 2]
    assert train.labels_path(str(tmp_path / "shard-run" / "shard-00001-of-00002.npy")) == \
        str(tmp_path / "shard-run" / "labels-00001-of-00002.npy")


def test_latents_are_normalised_as_each_recipes_official_code(tmp_path):
    """MeanFlow trains on SD-VAE latents times 0.18215 (as DiT); iMF standardises each channel with its own ImageNet
    statistics (official utils/vae_util.py). The batches use the recipe's, and generate() inverts it for the VAE."""
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(3, 2, 2, 4, 32, 32)).astype(np.float32)  # (N, 2 flips, [mean, std], C, H, W)
    lat[:, :, 1] = np.abs(lat[:, :, 1]) * 0.1
    np.save(tmp_path / "shard-00000-of-00001.npy", lat)
    np.save(tmp_path / "labels-00000-of-00001.npy", np.array([0, 1, 2]))
    mean = torch.tensor([0.86488, -0.27787343, 0.21616915, 0.3738409]).view(1, 4, 1, 1)  # official constants
    std = torch.tensor([4.85503674, 5.31922414, 3.93725398, 3.9870003]).view(1, 4, 1, 1)
    idx = torch.tensor([0, 2])
    x_mf, y = train.ImageNetLatents(str(tmp_path)).get(idx, torch.Generator().manual_seed(0))
    x_imf, _ = train.ImageNetLatents(str(tmp_path), imf=True).get(idx, torch.Generator().manual_seed(0))  # same draw
    latent = x_mf / 0.18215
    assert torch.allclose(x_imf, (latent - mean) / std, atol=1e-5) and y.tolist() == [0, 2]
    args = train.get_args(["--data", "imagenet-latents", "--data-path", str(tmp_path), "--recipe", "imf",
                           "--model", "Ti/4"])
    assert isinstance(train.load_data(args, 0), train.ImageNetLatents) and torch.equal(
        train.load_data(args, 0).get(idx, torch.Generator().manual_seed(0))[0], x_imf)

    class ZeroNet(torch.nn.Module):  # u = 0: one step returns the noise, so the VAE must get noise * std + mean
        num_classes = 3

        def forward(self, z, t, r, y=None, **conditions):
            return torch.zeros_like(z)

    class StubVAE:
        def decode(self, z):
            seen.append(z)
            return SimpleNamespace(sample=torch.zeros(len(z), 3, 8, 8))

    run = SimpleNamespace(data="imagenet-latents", seed=0, sample_guidance={})
    e = torch.stack([torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    for recipe, expected in (("meanflow", e / 0.18215), ("imf", e * std + mean)):
        seen = []
        train.generate(run, mf.MeanFlow(recipe), ZeroNet(), range(2), 1, "cpu", vae=StubVAE())
        assert torch.allclose(seen[0], expected, atol=1e-5), recipe
    seen = []  # the decoder takes VAE_BATCH images at a time (its memory), whatever the network's batch
    x, y = train.generate(run, mf.MeanFlow("meanflow"), ZeroNet(), range(40), 1, "cpu", vae=StubVAE(), batch=30)
    assert [len(z) for z in seen] == [16, 14, 10] and x.shape == (40, 8, 8, 3) and y.tolist() == [i % 3 for i in
                                                                                                   range(40)]


def test_imf_warms_up_for_its_ten_official_epochs(tmp_path):
    """iMF's 10 warm-up epochs (official configs/train_config.yml) in steps of the data set and batch; --warmup
    overrides them; MeanFlow and the toys do not warm up unless asked."""
    make_fashion(str(tmp_path))  # 40 images
    common = ["--data", "fashion-mnist", "--data-path", str(tmp_path), "--model", "Ti/4", "--batch-size", "12"]
    # imf: 10 epochs x 40 images / batch 12 = 33.3 steps; a started step counts, as --epochs
    for argv, expected in ((common + ["--recipe", "imf"], 34),
                           (common + ["--recipe", "imf", "--warmup", "3"], 3), (common + ["--recipe", "meanflow"], 0),
                           (common, 0), (["--recipe", "imf"], 0)):  # the last: the 2-D toy
        args = train.get_args(argv)
        train.set_up(args)
        assert args.warmup == expected, argv
    assert train.get_args(["--data", "imagenet-latents", "--model", "B/2", "--recipe", "imf"]).warmup_epochs == 10


# ---------------------------------------------------------------------------------------------
# toy_data and the study runner: tests for bugs a mutation audit of both files found the suite missing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(td.DATASETS))
def test_dataset_scale_is_exact_not_just_close(name):
    # The standardising factors are exact moments; 2M points pin the mean per-coordinate variance to ~1e-3
    # (measured 0.9995-1.0008). Kills: moons' factor without the noise variance (1.005).
    p = td.sample(name, 2_000_000, torch.Generator().manual_seed(0)).double()
    assert abs(p.var(0).mean().item() - 1) < 0.003


def test_mixture_weights_are_normalised_and_log_prob_integrates_to_one():
    # Weights need not sum to 1 (the default mixture's happen to). Kills: self.pi = pi without / pi.sum().
    gm = td.GaussianMixture([[1.0, 0.0], [-1.0, 0.5]], [0.3, 0.5], weights=[1.0, 3.0])
    assert abs(gm.pi.sum().item() - 1) < 1e-12
    grid = torch.linspace(-4, 4, 321, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    for t in (0.0, 0.5):
        assert abs((gm.log_prob(zz, t).exp().sum() * (grid[1] - grid[0]) ** 2).item() - 1) < 1e-3


def test_sliced_wasserstein_of_a_shift_is_its_length_over_sqrt_d():
    # b = a + delta exactly: every 1-D projection is shifted by w . delta, so SW = sqrt(E_w (w . delta)^2)
    # = |delta| / sqrt(2) in 2-D. delta = (3, 0): 2.121. Kills: no sqrt (4.5); mean of per-direction W_2 (1.91).
    a = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    sw = td.sliced_wasserstein(a, a + torch.tensor([3.0, 0.0]), n_proj=4096)
    assert abs(sw - 3 / math.sqrt(2)) < 0.03, sw


def test_chunked_mean_distance_covers_every_row():
    # Any row count against any chunk size, a last chunk of one row included. Kills: range(0, n - 1, rows).
    g = torch.Generator().manual_seed(0)
    b = torch.randn(200, 2, generator=g, dtype=torch.float64)
    for n in (2, 7, 301):
        a = torch.randn(n, 2, generator=g, dtype=torch.float64)
        for chunk in (1, 1000, 2**22):  # 1, 5 and all rows at a time
            assert abs(td._mean_dist(a, b, chunk_elems=chunk) - torch.cdist(a, b).mean().item()) < 1e-12, (n, chunk)


def test_sliced_wasserstein_interpolates_quantiles_of_unequal_sizes():
    # Two midpoint grids of U[0, 1], 1000 and 1500 points: one distribution, so the interpolated quantiles agree
    # to ~1e-5 (measured 6e-6). Kills: hi = lo (the lower neighbour instead of interpolation: 5.6e-4).
    a = ((torch.arange(1000, dtype=torch.float64) + 0.5) / 1000)[:, None]
    b = ((torch.arange(1500, dtype=torch.float64) + 0.5) / 1500)[:, None]
    assert td.sliced_wasserstein(a, b) < 1e-4


def test_study_eval_set_holds_exact_targets_at_its_own_times_and_bins():
    # Kills: u target with t and r swapped; the jump set's (t, r) swapped; the v set with r = 0; a wrong bin edge.
    study = load_study()
    sets, data = study.eval_set(n=200)
    gm = td.GaussianMixture.default()
    for name, (z, t, r, u) in sets.items():
        assert ((0 <= r) & (r <= t) & (t <= 1)).all(), name
        torch.testing.assert_close(u, gm.u(z, t, r), msg=name)  # the target is the exact u at the stored (z, t, r)
    assert torch.equal(sets["v"][1], sets["v"][2])  # v: r = t
    _, t, r, _ = sets["u 1-NFE jump"]
    assert (t == 1).all() and (r == 0).all()
    for lo, hi in study.BINS:
        _, t, r, _ = sets[f"u [{lo}, {hi})"]
        assert ((t - r >= lo - 1e-6) & (t - r < hi + 1e-6)).all(), (lo, hi)


def test_study_eval_points_are_distributed_as_z_t():
    # z_t = (1 - t) x + t e: the mean log p_t(z) of the set's points matches that of fresh z_t at the same t.
    # Kills: the eval points built as t x + (1 - t) e (the targets stay consistent with them, so nothing else sees it).
    study = load_study()
    sets, _ = study.eval_set(n=1000)
    gm = td.GaussianMixture.default()
    g = torch.Generator().manual_seed(99)
    for name in ["v"] + [f"u [{lo}, {hi})" for lo, hi in study.BINS]:
        z, t = sets[name][0], sets[name][1]
        fresh = (1 - t[:, None]) * gm.sample(len(t), g) + t[:, None] * torch.randn(len(t), 2, generator=g)
        assert abs(gm.log_prob(z, t).double().mean().item() - gm.log_prob(fresh, t).double().mean().item()) < 0.2, name
        if name != "v":
            r = sets[name][2]
            assert abs((r / (1 - (t - r))).mean().item() - 0.5) < 0.03, name  # r ~ U[0, 1 - dt]: t reaches 1
            # drawn at t, not at r: mean log p_t(z) - log p_r(z) is KL(p_t || p_r) > 0 for z ~ p_t (< 0 for z ~ p_r)
            assert (t - r).min() < 0.3 or (gm.log_prob(z, t) - gm.log_prob(z, r)).double().mean() > 0.5, name


def test_study_evaluate_scores_1_and_2_nfe_samples():
    # Kills: the 2-NFE score computed from a 1-step sample (toy and image part).
    study = load_study()
    sets, data = study.eval_set(n=50)
    method = SimpleNamespace(sample=lambda net, e, *y, steps: e + steps)  # a stand-in sampler: e shifted by steps
    out = study.evaluate(method, lambda z, t, r: torch.zeros_like(z), sets, data)
    e = sets["u 1-NFE jump"][0]
    for n in (1, 2):
        assert out[f"energy distance {n}-NFE"] == td.energy_distance(e + n, data)
    scores = lambda x: dict(acc=x.mean().item())
    noise = torch.zeros(4, 1, 2, 2), torch.arange(4)
    assert study.evaluate_images(method, None, scores, noise) == {"acc 1-NFE": 1.0, "acc 2-NFE": 2.0}


def test_study_fit_scores_the_ema_with_its_warm_up_and_passes_progress():
    # EMA decay min(ema, (1 + step) / (10 + step)), evaluated on the EMA copy, never on the trained net; progress =
    # step / steps; logged v- and u-loss in that order. Kills: evaluate(net); ema = net; no EMA warm-up;
    # progress (step + 1) / steps; the two losses swapped.
    study = load_study()
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    params, seen_progress = [], []

    def loss(net, x, progress):
        params.append(net.weight.detach().clone())  # the net's weights before this step
        seen_progress.append(progress)
        return (net(x) ** 2).mean(), dict(v_loss=torch.tensor(1.0), u_loss=torch.tensor(2.0))

    method = SimpleNamespace(loss=loss, dtd_stage=0)
    seen = []
    evaluate = lambda m: seen.append((m is net, m.weight.detach().clone())) or {}
    args = SimpleNamespace(lr=0.1, warmup=0, steps=3, eval_every=1, ema=0.9)
    curve, _ = study.fit(method, net, args, 0, lambda g: (torch.randn(8, 2, generator=g),), evaluate, log_losses=True)
    params.append(net.weight.detach().clone())
    assert seen_progress == [0, 1 / 3, 2 / 3]
    assert [c["step"] for c in curve] == [0, 1, 2, 3] and all((c["v_loss"], c["u_loss"]) == (1, 2) for c in curve[1:])
    ema = params[0]
    assert not seen[0][0] and torch.equal(seen[0][1], ema)
    for step in range(3):
        d = min(0.9, (1 + step) / (10 + step))
        ema = d * ema + (1 - d) * params[step + 1]
        assert not seen[step + 1][0]
        torch.testing.assert_close(seen[step + 1][1], ema)


def test_study_fit_warms_up_the_lr_and_scores_at_its_grid_and_the_end():
    # train.get_lr's warm-up at each step (lr (step + 1) / warmup), evaluations every eval_every steps and at the last
    # step, and each point's logged loss the mean since the point before. With loss = sum(w), AdamW's first steps move
    # each weight by the lr itself (a constant gradient: m / sqrt(v) = 1), so the moves give the lr of each step.
    study = load_study()
    net = torch.nn.Linear(1, 1, bias=False)
    weights, step = [], iter(range(100))

    def loss(net, x, progress):
        weights.append(net.weight.item())
        return net.weight.sum(), dict(v_loss=torch.tensor(float(next(step))), u_loss=torch.tensor(0.0))

    args = SimpleNamespace(lr=0.1, warmup=4, steps=5, eval_every=2, ema=0.9)
    curve, _ = study.fit(SimpleNamespace(loss=loss, dtd_stage=0), net, args, 0, lambda g: (torch.zeros(1),),
                         lambda m: {}, log_losses=True)
    moves = -np.diff(weights + [net.weight.item()])
    np.testing.assert_allclose(moves, [0.025, 0.05, 0.075, 0.1, 0.1], rtol=1e-5)
    assert [c["step"] for c in curve] == [0, 2, 4, 5] and [c["v_loss"] for c in curve[1:]] == [0.5, 2.5, 4.0]


def test_study_runs_the_first_three_recipes_seeds_first(tmp_path, monkeypatch):
    # The job order: every seed of the three full recipes before the ablations, so that a study cut short has them.
    study = load_study()
    jobs = []
    monkeypatch.setattr(study, "worker", lambda rank, args, todo: jobs.extend(todo))
    study.main(["--out", str(tmp_path / "s.jsonl"), "--recipes", "meanflow", "improved-dtd", "improved-minsnr",
                "beta only", "--seeds", "0", "1"])
    assert jobs == [("meanflow", 0), ("improved-dtd", 0), ("improved-minsnr", 0), ("meanflow", 1), ("improved-dtd", 1),
                    ("improved-minsnr", 1), ("beta only", 0), ("beta only", 1)]


def test_study_fit_data_stream_is_a_function_of_the_seed():
    # Kills: the data generator seeded without the run's seed (all seeds see the same batches).
    study = load_study()
    method = SimpleNamespace(loss=lambda net, x, progress: ((net(x) ** 2).mean(), dict(v_loss=torch.tensor(0.0),
                                                                                        u_loss=torch.tensor(0.0))),
                             dtd_stage=0)
    args = SimpleNamespace(lr=0.1, warmup=0, steps=2, eval_every=2, ema=0.9)

    def batches(seed):
        got = []
        study.fit(method, torch.nn.Linear(2, 2), args, seed, lambda g: got.append(torch.randn(4, 2, generator=g)) or
                  (got[-1],), lambda m: {})
        return torch.stack(got)

    assert torch.equal(batches(0), batches(0)) and not torch.equal(batches(0), batches(1))


def test_study_run_seeds_the_init_and_draws_data_from_the_generator(monkeypatch):
    # Kills: torch.manual_seed(0) for every seed; gm.sample(batch) without the generator (not reproducible).
    study = load_study()
    got = []

    def fake_fit(method, net, args, seed, batch, evaluate, log_losses=False):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        got.append((torch.cat([p.flatten() for p in net.parameters()]), batch(g1)[0], batch(g2)[0]))
        return [], 0.0

    monkeypatch.setattr(study, "fit", fake_fit)
    args = SimpleNamespace(steps=1, lr=1e-3, batch_size=8, ema=0.99, eval_every=1)
    for seed in (0, 1, 0):
        study.run("meanflow", seed, args, None, None)
    (p0, b0, b0_again), (p1, _, _), (p0_again, _, _) = got
    assert torch.equal(p0, p0_again) and not torch.equal(p0, p1)
    assert torch.equal(b0, b0_again)


def test_study_resume_skips_only_runs_of_the_same_length(tmp_path, monkeypatch):
    # A finished 4-step run does not stand in for a 6-step one: resumed at 4 steps it is skipped, asked for 6 steps the
    # file is refused (test_study_runner_refuses_bad_numbers_and_another_studys_file). Kills: done without the check.
    study = load_study()
    out = tmp_path / "study.jsonl"
    out.write_text(json.dumps(dict(recipe="meanflow", seed=0, steps=4, lr=2e-3, batch_size=256, ema=0.995,
                                   eval_every=100)) + "\n")
    jobs = []
    monkeypatch.setattr(study, "worker", lambda rank, args, j: jobs.append(list(j)))
    base = ["--out", str(out), "--recipes", "meanflow", "--seeds", "0", "1"]
    study.main(base + ["--steps", "4"])
    with pytest.raises(SystemExit):
        study.main(base + ["--steps", "6"])
    assert jobs == [[("meanflow", 1)]]


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # a few images: 64-d covariances are singular
def test_study_toy_has_no_lr_warm_up_images_have_50_steps(tmp_path, monkeypatch):
    # Kills: the two warm-up defaults swapped.
    study = load_study()
    seen = []
    monkeypatch.setattr(study, "worker", lambda rank, args, j: seen.append(args.warmup))
    monkeypatch.setattr(study, "scoring_classifier", lambda p, args, runs: None)  # not the scorer's 1500 steps here
    study.main(["--out", str(tmp_path / "a.jsonl"), "--recipes", "meanflow", "--seeds", "0"])
    study.main(["--part", "images", "--out", str(tmp_path / "b.jsonl"), "--recipes", "meanflow", "--seeds", "0"])
    assert seen == [0, 50]


def test_study_workers_split_the_jobs(tmp_path, monkeypatch):
    # Each (recipe, seed) is run by exactly one of the workers, its line appended. Kills: jobs[rank:].
    study = load_study()
    monkeypatch.setattr(study, "eval_set", lambda: (None, None))
    monkeypatch.setattr(study, "run", lambda name, seed, args, sets, data: dict(
        recipe=name, seed=seed, seconds=0.0, curve=[{"energy distance 1-NFE": 0.0}]))
    jobs = [("meanflow", s) for s in range(5)]
    args = SimpleNamespace(part="toy", out=str(tmp_path / "s.jsonl"), workers=2)
    threads = torch.get_num_threads()
    try:
        for rank in (0, 1):
            study.worker(rank, args, jobs)
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(s) for s in open(args.out)]
    assert sorted((d["recipe"], d["seed"]) for d in lines) == jobs


def test_study_test_split_is_padded_as_the_training_split(tmp_path):
    # The same 28 x 28 images as training and test files come back as the same 32 x 32 images.
    # Kills: the test split padded (0, 4) instead of (2, 2).
    study = load_study()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10
    for split in ("train", "t10k"):
        write_idx(str(tmp_path / f"{split}-images-idx3-ubyte.gz"), x)
        write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte.gz"), y)
    (tr_x, tr_y), (te_x, te_y) = study.fashion_mnist(str(tmp_path))
    assert te_x.shape == (20, 1, 32, 32) and np.array_equal(tr_x, te_x) and np.array_equal(tr_y, te_y)


def test_study_downloads_the_test_split_md5_checked_and_a_failure_is_one_line(tmp_path, monkeypatch):
    """The image study's default data when neither Debian's copy nor data/fashion-mnist holds Fashion-MNIST: the four
    official files are downloaded (the training split as train.py does, then the test split), each md5-checked, and a
    second call downloads nothing. Offline, with the training split present, the missing test split is one line
    naming the file and the fix, and leaves no partial file."""
    study = load_study()
    folder = fashion_default_path(tmp_path, monkeypatch)
    server = tmp_path / "server"
    x, y = make_fashion(str(server))
    tx, ty = np.random.default_rng(1).integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10)
    write_idx(str(server / "t10k-images-idx3-ubyte.gz"), tx)
    write_idx(str(server / "t10k-labels-idx1-ubyte.gz"), ty)
    files = {n: (server / n).read_bytes() for n in os.listdir(server)}
    md5 = {n: hashlib.md5(raw).hexdigest() for n, raw in files.items()}
    monkeypatch.setattr(train, "FASHION_MD5", {n: md5[n] for n in train.FASHION_MD5})
    monkeypatch.setattr(train, "FASHION_TEST_MD5", {n: md5[n] for n in train.FASHION_TEST_MD5})
    main = train.FASHION_URLS[0]
    requested = []
    monkeypatch.setattr(train.urllib.request, "urlopen",
                        fake_urlopen({main + n: b for n, b in files.items()}, requested))
    (tr_x, tr_y), (te_x, te_y) = study.fashion_mnist()
    assert np.array_equal(tr_x[:, 0, 2:30, 2:30], x) and np.array_equal(tr_y, y)
    assert np.array_equal(te_x[:, 0, 2:30, 2:30], tx) and np.array_equal(te_y, ty)
    assert sorted(requested) == sorted(main + n for n in files) and sorted(os.listdir(folder)) == sorted(files)
    requested.clear()
    study.fashion_mnist()
    assert requested == []
    for n in train.FASHION_TEST_MD5:
        os.remove(os.path.join(folder, n))
    monkeypatch.setattr(train.urllib.request, "urlopen", fake_urlopen({}, []))
    with pytest.raises(SystemExit) as exc:
        study.fashion_mnist()
    msg = str(exc.value.code)
    assert "\n" not in msg and msg.startswith("convergence_study.py: error: could not download Fashion-MNIST")
    assert "t10k-images-idx3-ubyte.gz" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert leftovers(folder) == [] and sorted(os.listdir(folder)) == sorted(train.FASHION_MD5)


# ---------------------------------------------------------------------------------------------
# Preemption audit: a read-only folder at exit, a first checkpoint that cannot be written, a resume with another batch
# ---------------------------------------------------------------------------------------------
def test_release_survives_a_folder_that_became_read_only(tmp_path, monkeypatch):
    """The lock file cannot be removed (the folder became read-only mid-run): the error already printed stays the only
    line, and closing the file still releases the lock for the next run."""
    args = train.get_args(["--steps", "2", "--out", str(tmp_path / "run")])
    release, _ = train.claim_out(args)

    def refuse(path):
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(os, "remove", refuse)
    release()  # no traceback from the exit path
    monkeypatch.undo()
    assert os.path.exists(tmp_path / "run" / "train.lock")
    train.claim_out(args)[0]()  # the lock is free: the next run takes the folder


def test_a_first_checkpoint_that_cannot_be_written_advises_overwrite(tmp_path, capsys, file_size_limit):
    """No checkpoint yet, so --resume cannot work: the line names --overwrite, and that command then trains."""
    common = ["--steps", 4, "--stop-at", 2, *TOY_RUN, "--out", tmp_path / "run"]  # step 2: a checkpoint, no picture
    file_size_limit(20_000)  # log lines fit, the checkpoint does not
    code, _, err = run_main(common, capsys)
    file_size_limit()
    assert_one_line_error(code, err, "could not write", "ckpt.pt", "nothing was written", "--overwrite")
    assert run_main(common, capsys)[0] == 2  # a plain rerun is refused (the folder holds the log)
    assert run_main(common + ["--overwrite"], capsys)[0] == 0 and ckpt_step(tmp_path / "run") == 2


def test_resume_refuses_another_global_batch_or_seed(tmp_path, capsys):
    """The step places each batch in the data order and seeds its noise: another --batch-size or --seed would make
    another run. Refused in one line; the same global batch over another number of processes is fine (tested with
    torchrun), and --sample needs neither."""
    common = ["--steps", 4, "--out", tmp_path]
    assert run_main(common + ["--batch-size", 16, "--stop-at", 2], capsys)[0] == 0
    for extra, flag in ((["--batch-size", 32], "--batch-size 16"), (["--batch-size", 16, "--seed", 1], "--seed 0")):
        code, _, err = run_main(common + extra + ["--resume"], capsys)
        assert_one_line_error(code, err, "was trained with " + flag, "pass " + flag)
    assert run_main(common + ["--batch-size", 16, "--resume"], capsys)[0] == 0 and ckpt_step(tmp_path) == 4
    assert run_main(common + ["--sample", 10], capsys)[0] == 0  # default batch size: sampling does not care


def test_a_signal_during_a_periodic_checkpoint_stops_on_that_checkpoint(tmp_path, capsys, monkeypatch):
    """SIGTERM while a periodic checkpoint is written (large models take tens of seconds; torchrun kills its workers
    30 s after forwarding the signal): the run stops on that checkpoint, without one more step and a second write."""
    written, checkpoint = [], train.checkpoint

    def checkpoint_then_signal(args, job):
        checkpoint(args, job)
        written.append(job.step)
        if job.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives as the write ends

    monkeypatch.setattr(train, "checkpoint", checkpoint_then_signal)
    code, _, err = run_main(["--steps", 100, *TOY_RUN, "--ckpt-every", 2, "--out", tmp_path], capsys)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM after step 2" in err, err
    assert written == [2] and ckpt_step(tmp_path) == 2


@pytest.mark.parametrize("during", ["forward", "update"])
def test_a_signal_stops_after_its_step_or_the_next(tmp_path, capsys, monkeypatch, during):
    """The processes agree on a stop in the step's one all-reduce (after the forward): a signal during step 3's
    forward stops the run after step 3; one during its update (backward, optimizer, EMA) after step 4, as README
    says; never later. Near the end, the run finishes instead (exit 0)."""
    calls, loss, update_ema = [], mf.MeanFlow.loss, train.update_ema

    def signal_on_third(real):
        def f(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        return f

    if during == "forward":
        monkeypatch.setattr(mf.MeanFlow, "loss", signal_on_third(loss))
    else:
        monkeypatch.setattr(train, "update_ema", signal_on_third(update_ema))
    code, _, err = run_main(["--steps", 100, *TOY_RUN, "--out", tmp_path / "a"], capsys)
    step = 3 if during == "forward" else 4
    assert code == 128 + signal.SIGTERM and f"stopped by SIGTERM after step {step} of 100" in err, err[-500:]
    assert ckpt_step(tmp_path / "a") == step
    calls.clear()  # a stop due after the last step: the run ends as it would have, with its last checkpoint
    code, _, err = run_main(["--steps", step, *TOY_RUN, "--out", tmp_path / "b"], capsys)
    assert code == 0 and "stopped" not in err and ckpt_step(tmp_path / "b") == step and len(calls) >= 3


# ----------------------------------------------------------------------------------------------------------
# train.py: tests for bugs a second mutation audit (train.py: arguments, data, sampling, metrics, schedule, logs,
# resume, signals) found the suite missing; each comment names the mutant it kills.


# ---------------------------------------------------------------- argument checks


def test_seed_bound_is_exact(monkeypatch):  # A2: numpy seeds process k with seed * world + k, all below 2**32
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train.get_args(["--seed", str(2**32 - 1)])
    with pytest.raises(train.Fail, match="too large"):
        train.get_args(["--seed", str(2**32)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    train.get_args(["--seed", str(2**31 - 1), "--batch-size", "16"])  # processes 0, 1: seeds 2**32 - 2, 2**32 - 1
    with pytest.raises(train.Fail, match="too large"):
        train.get_args(["--seed", str(2**31), "--batch-size", "16"])  # process 1 would be seeded with 2**32 + 1


def test_stop_at_the_last_step_is_accepted():  # A3
    args = train.get_args(["--steps", "5", "--stop-at", "5"])
    assert args.stop_at == args.steps == 5


def test_sample_batch_need_not_split_over_the_processes(monkeypatch):  # A6: --sample draws ceil(batch / world) each
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")  # as torchrun sets them
    args = train.get_args(["--sample", "10"])  # the default global batch, 256, is not a multiple of 3
    assert args.batch_size == 256
    with pytest.raises(train.Fail, match="does not split"):  # training still needs an even split
        train.get_args([])


# ---------------------------------------------------------------- data


def test_flipped_images_and_latent_draws_split_over_processes(tmp_path):
    """CIFAR-10's flips and the latents' flips and posterior draws are drawn for the whole batch; each process reads
    its own rows only, and the halves of two processes are the one process's batch, bitwise."""
    lat = np.random.default_rng(0).normal(size=(24, 2, 2, 4, 32, 32)).astype(np.float16)
    np.save(tmp_path / "shard-00000-of-00001.npy", lat)
    np.save(tmp_path / "labels-00000-of-00001.npy", np.arange(24) % 5)
    rng = np.random.default_rng(1)
    cifar = train.Pixels(rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8), np.arange(24) % 10, flip=True)
    for data, argv in ((train.ImageNetLatents(str(tmp_path)), ["--data", "imagenet-latents", "--model", "Ti/4"]),
                       (cifar, ["--data", "cifar10", "--model", "Ti/4", "--class-cond"])):
        args = train.get_args(argv + ["--data-path", str(tmp_path), "--batch-size", "16"])
        for step in (0, 1):  # step 1 spans two epochs of the 24 rows
            x, y = train.get_batch(args, data, step, 0, 1)
            halves = [train.get_batch(args, data, step, r, 2) for r in range(2)]
            assert torch.equal(torch.cat([h[0] for h in halves]), x)
            assert torch.equal(torch.cat([h[1] for h in halves]), y)


def test_toy_batch_is_split_over_processes_not_repeated():  # B6: every process drew the same B / world points
    args = train.get_args(["--batch-size", "16"])
    full, _ = train.get_batch(args, None, 3, 0, 1)
    halves = [train.get_batch(args, None, 3, r, 2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), full) and not torch.equal(halves[0], halves[1])


def test_batch_streams_of_two_seeds_are_not_shifted_copies():  # B1: seed + step made seed 1 replay seed 0 a step later
    a0, a1 = (train.get_args(["--seed", s, "--batch-size", "16"]) for s in ("0", "1"))
    for step in range(3):
        assert not torch.equal(train.get_batch(a0, None, step + 1, 0, 1)[0], train.get_batch(a1, None, step, 0, 1)[0])


def test_an_incomplete_shard_set_is_refused(tmp_path):  # F5: one of two shards trained on half of ImageNet silently
    np.save(tmp_path / "shard-00000-of-00002.npy", np.zeros((2, 2, 2, 4, 32, 32), np.float16))
    np.save(tmp_path / "labels-00000-of-00002.npy", np.array([0, 1]))
    with pytest.raises(train.Fail, match="not a complete set"):
        train.ImageNetLatents(str(tmp_path))


# ---------------------------------------------------------------- samples and metrics


def test_to_uint8_clamps_instead_of_wrapping_around():  # H3: 1.5 became 63, -1.5 became 192
    x = torch.tensor([-3.0, -1.5, -1.0, 0.0, 1.0, 1.5, 3.0]).view(1, 1, 1, 7)
    assert train.to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 0, 128, 255, 255, 255]


def test_frechet_distance_retries_a_singular_product_with_an_offset(monkeypatch):
    """Where sqrtm of a numerically singular S1 S2 comes back non-finite (as it does for a matrix without a square
    root, e.g. [[0, 1], [0, 0]]), the ADM evaluator and pytorch-fid retry with 1e-6 added to both diagonals; so do
    we, instead of returning NaN. The failure is forced here: well-conditioned inputs never take this path."""
    import scipy.linalg

    sqrtm, calls = scipy.linalg.sqrtm, []

    def singular_once(a, *args, **kwargs):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else sqrtm(a, *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "sqrtm", singular_once)
    S1, S2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    got = train.frechet_distance((np.zeros(2), S1), (np.ones(2), S2))
    e = 1e-6
    exact = 2 + 1 + 9 - 2 * np.sqrt((1 + e) * (9 + e)) + 4 + 1 - 2 * np.sqrt((4 + e) * (1 + e))
    assert len(calls) == 2 and np.allclose(calls[1], (S1 + e * np.eye(2)) @ (S2 + e * np.eye(2)), rtol=0, atol=1e-15)
    assert got == pytest.approx(exact, abs=1e-9)


def test_frechet_distance_with_correlated_features():  # H13: sqrtm(s1 * s2) equals sqrtm(s1 @ s2) for diagonals only
    S = np.array([[2.0, 1.2], [1.2, 1.5]])
    assert train.frechet_distance((np.zeros(2), S), (np.ones(2), S)) == pytest.approx(2.0, abs=1e-9)
    S2 = np.array([[1.0, -0.5], [-0.5, 1.0]])
    from scipy.linalg import sqrtm
    exact = np.trace(S + S2 - 2 * sqrtm(S @ S2).real)
    assert train.frechet_distance((np.zeros(2), S), (np.zeros(2), S2)) == pytest.approx(exact, abs=1e-9)


def test_sampling_noise_depends_on_the_seed():  # H1: --seed was ignored by generate (every seed the same samples)
    net = mf.MLP(dim=2)
    torch.nn.init.normal_(net.out.weight)  # not the zero start, whose samples are the noise itself
    method = mf.MeanFlow("meanflow")
    def run(seed, net=net, n=8):
        return train.generate(SimpleNamespace(data="checkerboard", seed=seed, sample_guidance={}), method, net,
                              range(n), 1, "cpu")[0]

    assert np.array_equal(run(0), run(0)) and not np.array_equal(run(0), run(1))
    # and no seed reuses another's noise: with the zero-start network the samples are the noise itself
    rows = [set(map(tuple, run(seed, mf.MLP(dim=2), 100).tolist())) for seed in (0, 1, 2)]
    assert all(len(r) == 100 for r in rows) and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])


def test_the_ema_and_the_sampling_network_are_in_eval_mode(tmp_path, capsys, monkeypatch):  # H15, H16
    """CIFAR-10's DiT has dropout 0.2: a network left in train mode drops units while sampling."""
    make_cifar_tarball(str(tmp_path / "c"))
    common = ["--data", "cifar10", "--data-path", tmp_path / "c", "--model", "Ti/4", "--batch-size", 4, "--out",
              tmp_path / "run"]
    seen = []
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda args, job: seen.append(("pictures", job.ema.training))
                        or evaluate(args, job))
    assert run_main(common + ["--steps", 1], capsys)[0] == 0
    monkeypatch.setattr(train, "sample_to_npz", lambda args, method, net, *rest: seen.append(("sample", net.training)))
    assert run_main(common + ["--sample", 4], capsys)[0] == 0
    assert seen == [("pictures", False), ("sample", False)]


def _processes_in_turn(monkeypatch):  # sample_to_npz's collectives when the processes are played one after another
    monkeypatch.setattr(train.dist, "barrier", lambda: None)
    monkeypatch.setattr(train.dist, "broadcast", lambda tensor, src: tensor.fill_(7))  # the run's id for its parts


def test_unconditional_npz_of_two_processes_has_no_labels(tmp_path, monkeypatch):  # H10
    """sample_to_npz of a two-process run, the processes played in turn (process 1 first; no process group)."""
    make_fashion(str(tmp_path / "fm"))
    args = train.get_args(["--data", "fashion-mnist", "--data-path", str(tmp_path / "fm"), "--model", "Ti/4",
                           "--no-class-cond", "--sample", "5", "--out", str(tmp_path)])
    args.sample_guidance = {}
    _processes_in_turn(monkeypatch)
    net = mf.DiT_models["Ti/4"](input_size=32, in_channels=1, num_classes=0, depth=1, hidden_size=32, num_heads=2)
    net, method = net.eval(), mf.MeanFlow("meanflow")
    for rank in (1, 0):
        train.sample_to_npz(args, method, net, None, rank, 2, "cpu")
    npz = np.load(tmp_path / "samples-5-nfe1.npz")
    assert npz.files == ["arr_0"] and npz["arr_0"].shape == (5, 32, 32, 3)


# ---------------------------------------------------------------- method, schedule, optimizer


def test_unconditional_imagenet_gets_no_paper_guidance():  # I2: the labels' guidance made such a run fail to start
    args = train.get_args(["--data", "imagenet-latents", "--model", "B/4", "--no-class-cond"])
    method = train.make_method(args)
    assert (method.omega, method.kappa) == (1.0, 0.0)
    args = train.get_args(["--data", "imagenet-latents", "--model", "B/4"])
    assert train.make_method(args).kappa == 0.5  # conditional: the paper's B/4 setting


def _step_job(lr_seen):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)

    def loss_fn(x, y, progress):
        lr_seen.append(opt.param_groups[0]["lr"])
        return net(x).sum(), dict(loss=torch.tensor(1.0))

    job = SimpleNamespace(opt=opt, step=0, device="cpu", world=1, ema=torch.nn.Linear(2, 2), net=net, ckpt_path="none",
                          rank=1, history=[], t_start=0.0, log_path="none")
    return job, loss_fn


def test_train_step_uses_the_lr_of_its_own_step():  # J3: get_lr(step + 1) skipped the first warm-up value
    seen = []
    job, loss_fn = _step_job(seen)
    args = SimpleNamespace(lr=1.0, warmup=4, steps=10, ema=0.5)
    for _ in range(5):
        train.train_step(args, job, loss_fn, torch.ones(1, 2), None)
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_logged_lr_is_that_of_the_last_step_logged():  # J2: the log showed the next step's lr
    job, _ = _step_job([])
    args = SimpleNamespace(lr=1.0, warmup=4, batch_size=8)
    job.step = 2  # steps 0 and 1 done: the last one ran at lr 2/4
    job.acc = [[1.0, 1.0, 1.0, 1.0, 0.0]] * 2
    line = train.log_window(args, job, 1.0)
    assert line["lr"] == 0.5


def test_adamw_is_the_papers(tmp_path):  # K2
    args = train.get_args(["--out", str(tmp_path), "--weight-decay", "0.01"])
    job = train.set_up(args)
    group = job.opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.01 and group["lr"] == args.lr


def test_default_steps_cover_every_epoch(tmp_path):  # K1: a floor dropped the last partial batch of the 240 epochs
    make_fashion(str(tmp_path / "fm"))  # 40 images, batch 7: 240 epochs are 1371.4 batches
    args = train.get_args(["--data", "fashion-mnist", "--data-path", str(tmp_path / "fm"), "--model", "Ti/4",
                           "--batch-size", "7", "--out", str(tmp_path / "run")])
    train.set_up(args)
    assert args.steps == 1372


# ---------------------------------------------------------------- resume


def test_resume_on_fewer_processes_sums_their_dtd_window(tmp_path, capsys, monkeypatch):  # L3
    """A two-process checkpoint resumed by one process: process 0 carries the sum of both processes' window sums."""
    common = ["--recipe", "improved-dtd", "--set", "dtd_share=0", "--set", "dtd_window=3", "--set",
              "dtd_patience=1000", "--steps", 6, "--batch-size", 16, "--out", tmp_path]
    assert run_main(common + ["--stop-at", 4], capsys)[0] == 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["dtd_acc"], ckpt["rng"] = [[1.0, 2.0, 1.0], [3.0, 5.0, 1.0]], ckpt["rng"] * 2  # as two processes wrote it
    torch.save(ckpt, tmp_path / "ckpt.pt")
    seen = []
    monkeypatch.setattr(train, "train", lambda args, job: seen.append((list(job.method.state_dict()["dtd_acc"]),
                                                                       torch.initial_seed(), np.random.randint(2**31))))
    code, _, err = run_main(common + ["--resume"], capsys)
    assert code == 0 and "fresh random streams" in err, err
    np.random.seed(0)
    assert seen[0][0] == [4.0, 7.0, 2.0]
    # fresh streams, not process 0's first ones again (seed * world + rank = 0 here)
    assert seen[0][1] != 0 and seen[0][2] != np.random.randint(2**31)


def test_save_atomic_syncs_the_temporary_before_the_rename(tmp_path, monkeypatch):  # O1
    """A rename is atomic, but without fsync first a power cut can leave the new name on an empty file."""
    calls = []
    fsync, replace = train.os.fsync, train.os.replace
    monkeypatch.setattr(train.os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(train.os, "replace", lambda a, b: calls.append("replace") or replace(a, b))
    train.save_atomic(str(tmp_path / "f.bin"), lambda f: f.write(b"x" * 10))
    assert calls == ["fsync", "replace"] and (tmp_path / "f.bin").read_bytes() == b"x" * 10


def test_save_atomic_writes_past_a_temporary_left_by_a_killed_writer(tmp_path):
    """Every write has a temporary of its own (process id and a random part): neither a leftover of a kill -9 nor a
    second writer of the same file at the same time can make it fail or mix two files."""
    path = str(tmp_path / "ckpt.pt")
    for stale in (".tmp", f".tmp-{os.getpid()}", ".part"):
        (tmp_path / f"ckpt.pt{stale}").write_bytes(b"stale")
    names = []
    for data in (b"first", b"second"):
        train.save_atomic(path, lambda f: names.append(f.name) or f.write(data))
    assert open(path, "rb").read() == b"second" and len(set(names)) == 2
    assert all(n.startswith(path + ".tmp-") and not os.path.exists(n) for n in names)


def test_save_atomic_outside_a_run_folder_does_not_advise_overwrite(tmp_path):
    """A failed download or label file is not a training run's file: its line says to run the command again, not
    --overwrite (which, with --resume of a run whose data went missing, would have deleted the run's checkpoint)."""
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    (tmp_path / "full").mkdir()

    def fail(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for path, run_folder, words in [(tmp_path / "full" / "cifar.tar.gz", False, ["run the command again"]),
                                    (tmp_path / "ckpt.pt", True, ["--resume for a training run"])]:
        with pytest.raises(train.Fail) as err:
            train.save_atomic(str(path), fail, run_folder=run_folder)
        assert all(w in str(err.value) for w in words) and "--overwrite" not in str(err.value), str(err.value)


def test_claim_out_keeps_a_live_sample_temporary(tmp_path):  # P2
    """A run starting in a folder removes train temporaries left by a kill -9, not the .npz a --sample is writing."""
    ours, theirs = tmp_path / "ckpt.pt.tmp-123-0123abcd", tmp_path / "samples-5-nfe1.npz.tmp-456-89abcdef"
    ours.write_bytes(b"x")
    theirs.write_bytes(b"x")
    release, _ = train.claim_out(train.get_args(["--out", str(tmp_path)]))
    try:
        assert not ours.exists() and theirs.exists()
    finally:
        release()


def test_checkpoint_ema_is_the_ema_not_the_weights(tmp_path, capsys):  # R3: --sample drew from the raw weights
    assert run_main(["--steps", 3, "--batch-size", 16, "--ema", 0.9, "--out", tmp_path], capsys)[0] == 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])


def _agree_worker(rank, world, port, out):
    with gloo(rank, world, port):
        with train.StopSignals() as s:
            s.signum = [signal.SIGINT, signal.SIGINT, 0][rank]  # Ctrl-C reaches processes 0 and 1
            torch.save(s.agreed("cpu"), os.path.join(out, f"{rank}.pt"))


def test_grids_place_each_image_in_its_tile(tmp_path):
    # save_grids: each set 8 images wide, row by row, 32 x 32 images enlarged 2x (nearest), sets side by side with
    # an 8-pixel white gap. Image i of set k is filled with the value 10 k + i.
    from PIL import Image

    sets = [np.broadcast_to((10 * k + np.arange(16, dtype=np.uint8))[:, None, None, None], (16, 32, 32, 3)).copy()
            for k in (0, 1)]
    train.save_grids(str(tmp_path / "g.png"), sets)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 64, 2 * 8 * 64 + 8, 3)
    for k in (0, 1):
        for i in range(16):
            row, col = divmod(i, 8)
            x0 = k * (8 * 64 + 8) + col * 64
            assert (grid[row * 64: row * 64 + 64, x0: x0 + 64] == 10 * k + i).all(), (k, i)
    assert (grid[:, 8 * 64: 8 * 64 + 8] == 255).all()


def test_figure_draws_the_samples_over_the_squares_and_the_three_loss_curves(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)  # keep the figure to look at
    history = [dict(step=100, v_loss=1.0, u_loss=2.0, loss=3.0), dict(step=200, v_loss=0.5, u_loss=1.5, loss=2.5)]
    pts = np.array([[0.1, 0.2], [-1.0, 0.5]])
    train.save_figure(str(tmp_path / "f.png"), [("1-NFE", pts)], history, td.checkerboard_squares())
    samples, losses = closed[0].axes
    assert len(samples.patches) == 8 and np.array_equal(samples.collections[0].get_offsets(), pts)
    assert [(c.get_label(), list(c.get_xdata()), list(c.get_ydata())) for c in losses.get_lines()] == [
        ("v_loss", [100, 200], [1.0, 0.5]), ("u_loss", [100, 200], [2.0, 1.5]), ("loss", [100, 200], [3.0, 2.5])]
    assert (tmp_path / "f.png").stat().st_size > 0


def test_the_first_signal_is_the_one_reported():
    # Ctrl-C, then the SIGTERM of a scheduler: the run reports the SIGINT it got first (and exits with 130)
    with train.StopSignals() as s:
        assert s.agreed("cpu") == 0
        s.note(signal.SIGINT, None)
        s.note(signal.SIGTERM, None)
        assert s.agreed("cpu") == signal.SIGINT


def test_an_ignored_stop_signal_stays_ignored(tmp_path, capsys, monkeypatch):
    """nohup ignores SIGHUP so that a run outlives its terminal: neither main() nor the training loop may turn it
    back into a stop."""
    seen, real_train = [], train.train
    monkeypatch.setattr(train, "train", lambda args, job: seen.append(signal.getsignal(signal.SIGHUP)) or
                        real_train(args, job))  # under main()'s handlers
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with train.StopSignals():
            seen.append(signal.getsignal(signal.SIGHUP))
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)  # the others heeded
        assert run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path / "run"], capsys)[0] == 0
        assert seen == [signal.SIG_IGN] * 2 and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_signals_of_several_processes_agree_on_one_signal(tmp_path):  # Q1: a sum made SIGINT + SIGINT SIGILL
    mp.spawn(_agree_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    assert [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(3)] == [signal.SIGINT] * 3


def test_shard_must_be_below_the_number_of_shards():  # A5: --shard 2 --num-shards 2 wrote a third shard
    with pytest.raises(train.Fail, match="not among --num-shards"):
        train.get_args(["--prepare-imagenet", "x", "--shard", "2", "--num-shards", "2"])
    train.get_args(["--prepare-imagenet", "x", "--shard", "1", "--num-shards", "2"])


# ---------------------------------------------------------------- the training step and the log


def test_train_step_logs_the_mean_over_processes(monkeypatch):  # T1: the logged numbers were summed
    monkeypatch.setattr(train.dist, "all_reduce", lambda t, *a, **k: t.mul_(2))  # two processes, equal numbers
    job, loss_fn = _step_job([])
    job.world = 2
    stats, stop = train.train_step(SimpleNamespace(lr=1.0, warmup=0, steps=10, ema=0.5), job, loss_fn,
                                   torch.ones(1, 2), None)
    assert stats[0] == 1.0 and stop == 0


def _step_stop_worker(rank, world, port, out):
    with gloo(rank, world, port):
        job, loss_fn = _step_job([])
        job.world, reduced, all_reduce = world, [], train.dist.all_reduce
        train.dist.all_reduce = lambda t, *a, **k: reduced.append(t.numel()) or all_reduce(t, *a, **k)
        args = SimpleNamespace(lr=1.0, warmup=0, steps=10, ema=0.5)
        seen = []
        for noted in ([signal.SIGINT, signal.SIGINT, 0], [0, 0, 0], [signal.SIGINT, signal.SIGTERM, 0]):
            stats, stop = train.train_step(args, job, loss_fn, torch.ones(1, 2), None,
                                           SimpleNamespace(signum=noted[rank]))
            seen.append((stats, stop))
        torch.save((seen, reduced), os.path.join(out, f"{rank}.pt"))


def test_train_step_agrees_on_a_stop_in_its_one_all_reduce(tmp_path):
    """The processes' stop signals travel in the step's all-reduce of the logged numbers (a second collective each step
    waited for the GPU once more): every process gets the same signal, the largest noted (as most() decides), and
    the logged numbers are still the mean."""
    mp.spawn(_step_stop_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    for r in range(3):
        seen, reduced = torch.load(tmp_path / f"{r}.pt", weights_only=True)
        assert [stop for _, stop in seen] == [signal.SIGINT, 0, signal.SIGTERM] and reduced == [9, 9, 9]
        assert all(stats[0] == 1.0 for stats, _ in seen)


def test_ema_follows_the_weights_after_the_step():  # T3: the EMA was updated before opt.step, one step behind
    job, loss_fn = _step_job([])
    job.opt = torch.optim.SGD(job.net.parameters(), lr=0.1)
    train.train_step(SimpleNamespace(lr=0.1, warmup=0, steps=10, ema=0.0), job, loss_fn, torch.ones(1, 2), None)
    assert all(torch.equal(a, b) for a, b in zip(job.ema.parameters(), job.net.parameters()))  # decay 0: a copy


def test_log_window_skips_non_finite_steps():  # U1: one step without r != t rows (u_loss NaN) made the window NaN
    job, _ = _step_job([])
    job.step = 2
    job.acc = [[1.0, 1.0, float("nan"), 1.0, 0.0], [3.0, 1.0, 3.0, 1.0, 0.0]]
    line = train.log_window(SimpleNamespace(lr=1.0, warmup=0, batch_size=8), job, 1.0)
    assert line["u_loss"] == 3.0 and line["loss"] == 2.0


def test_the_last_steps_are_logged(tmp_path, capsys):  # S3: steps after the last full --log-every window were lost
    assert run_main(["--steps", 3, "--batch-size", 16, "--log-every", 2, "--out", tmp_path], capsys)[0] == 0
    assert [json.loads(s)["step"] for s in open(tmp_path / "log.jsonl")] == [2, 3]


def test_sample_with_a_batch_below_the_number_of_processes(tmp_path, monkeypatch):  # H8: batch 1 // 2 = 0
    args = train.get_args(["--sample", "3", "--batch-size", "1", "--out", str(tmp_path)])
    args.sample_guidance = {}
    _processes_in_turn(monkeypatch)
    net, method = mf.MLP(dim=2).eval(), mf.MeanFlow("meanflow")
    for rank in (1, 0):
        train.sample_to_npz(args, method, net, None, rank, 2, "cpu")
    assert np.load(tmp_path / "samples-3-nfe1.npz")["arr_0"].shape == (3, 2)


# ----------------------------------------------------------------------------------------------------------
# train.py: tests for what a robustness review (a user trying to break train.py) found


def test_counts_beyond_int64_indices_are_refused(capsys):
    """--batch-size or --sample of 2^63 passed the range check, then overflowed torch (a traceback)."""
    for flag in ("--batch-size", "--sample", "--steps"):
        code, _, err = run_main([flag, 2**63], capsys)
        assert_one_line_error(code, err, f"{flag} {2**63} is out of range", "below 2^31")
    assert train.get_args(["--batch-size", str(2**31 - 1)]).batch_size == 2**31 - 1


def test_a_first_step_that_diverges_keeps_the_run_it_would_overwrite(tmp_path, capsys):
    """--overwrite deleted the old run before the new one's first step, whose loss was inf (an in-range --set p=100:
    the adaptive weight overflows): the old run was lost to a refused one. The line blamed the lr (no update yet)."""
    common = ["--steps", 2, *TOY_RUN, "--out", tmp_path]
    assert run_main(common, capsys)[0] == 0
    before = listing(tmp_path)
    code, _, err = run_main(common + ["--overwrite", "--set", "p=100"], capsys)
    assert_one_line_error(code, err, "the loss is inf at step 1", "before any update, so not the lr", "--set value")
    assert listing(tmp_path) == before
    step = train.train_step  # Ctrl-C during the first step (minutes, with torch.compile): the old run stays too

    def interrupted(*a):
        os.kill(os.getpid(), signal.SIGINT)
        return step(*a)

    train.train_step, old = interrupted, {s: signal.getsignal(s) for s in train.STOP_SIGNALS}
    try:
        heed_stop_signals()
        code, _, err = run_main(common + ["--overwrite", "--seed", 1], capsys)
    finally:
        train.train_step = step
        for s, handler in old.items():
            signal.signal(s, handler)
    assert code == 130 and "stopped by SIGINT outside the training loop" in err and listing(tmp_path) == before
    assert run_main(common + ["--overwrite", "--seed", 1], capsys)[0] == 0 and listing(tmp_path) != before


def test_resume_refuses_a_log_window_or_log_line_of_other_numbers(tmp_path, capsys):
    """A checkpoint's log window of other numbers, or a log line without the loss curves' numbers, raised a
    traceback (the log line's only after training, when the pictures were drawn): now one line, and a gap."""
    common = ["--steps", 3, *TOY_RUN, "--out", tmp_path]
    assert run_main(common + ["--stop-at", 1], capsys)[0] == 0
    saved = (tmp_path / "ckpt.pt").read_bytes()
    for window in ({"acc": 5}, {"acc": [[1, 2]], "seconds": 0.0}, {"acc": [], "seconds": "x"}):
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        ckpt["log_window"] = window
        torch.save(ckpt, tmp_path / "ckpt.pt")
        code, _, err = run_main(common + ["--resume"], capsys)
        assert_one_line_error(code, err, "has a log window of other numbers", "the run's own checkpoint")
        (tmp_path / "ckpt.pt").write_bytes(saved)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": "high"}\n')
    code, _, err = run_main(common + ["--resume"], capsys)
    assert_one_line_error(code, err, "log.jsonl line 1 is not a log line")
    assert (tmp_path / "ckpt.pt").read_bytes() == saved
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')  # no numbers: a gap in the curves, not a KeyError
    assert run_main(common + ["--resume"], capsys)[0] == 0 and os.path.exists(tmp_path / "step-0000003.png")


def test_resume_refuses_changed_knobs_and_dropout(tmp_path, capsys):
    """--resume without the run's --set (or with another value, or another --dropout) would silently train another
    run (a DTD stage past the new dtd_stages even ended in a NaN blamed on --lr): one line naming the knob."""
    common = ["--steps", 4, *TOY_RUN, "--recipe", "improved-dtd", "--out", tmp_path]
    assert run_main(common + ["--set", "dtd_window=3", "--stop-at", 2], capsys)[0] == 0
    saved = (tmp_path / "ckpt.pt").read_bytes()
    for extra in ([], ["--set", "dtd_window=4"], ["--set", "dtd_window=3", "--set", "dtd_stages=2"]):
        code, _, err = run_main(common + extra + ["--resume"], capsys)
        assert_one_line_error(code, err, "was trained with dtd_", "pass the run's own --set")
    assert "dtd_stages=20, not dtd_stages=2" in err
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["args"]["dropout"] = 0.5  # a DiT's dropout: another network in training
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert_one_line_error(*run_main(common + ["--set", "dtd_window=3", "--resume"], capsys)[::2], "--dropout 0.5")
    (tmp_path / "ckpt.pt").write_bytes(saved)
    assert run_main(common + ["--set", "dtd_window=3", "--resume"], capsys)[0] == 0 and ckpt_step(tmp_path) == 4


def test_resume_checks_the_checkpoint_before_reading_data(tmp_path, capsys, monkeypatch):
    """Another run's checkpoint is refused before any data is read (CIFAR-10 would first be downloaded)."""
    assert run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path], capsys)[0] == 0
    monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("data read before the checkpoint was checked"))
    for mode in (["--resume"], ["--sample", 4]):
        code, _, err = run_main(["--data", "cifar10", "--model", "Ti/4", "--out", tmp_path] + mode, capsys)
        assert_one_line_error(code, err, "was trained with --data checkerboard")


@pytest.mark.parametrize("stop", [3, 5])
def test_log_lines_after_resume_equal_the_uninterrupted_run(tmp_path, capsys, stop):
    """A stop inside a --log-every window: the steps before it still count in that window's means."""
    common = ["--steps", 8, "--batch-size", 16, "--recipe", "improved-dtd", "--log-every", 4]
    assert run_main(common + ["--out", tmp_path / "a"], capsys)[0] == 0
    assert run_main(common + ["--out", tmp_path / "b", "--stop-at", stop], capsys)[0] == 0
    assert run_main(common + ["--out", tmp_path / "b", "--resume"], capsys)[0] == 0
    logs = [[strict_json(s) for s in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert [h["step"] for h in logs[1]] == [h["step"] for h in logs[0]] == [4, 8]
    for a, b in zip(*logs):
        assert {k: v for k, v in a.items() if k not in ("time", "img_per_s")} == \
               {k: v for k, v in b.items() if k not in ("time", "img_per_s")}
    assert all(0 < h["img_per_s"] < 1e9 for h in logs[1])


def test_resume_of_a_finished_run_draws_its_last_pictures(tmp_path, capsys):
    """The final pictures failed (a full disk): the error says --resume, and --resume draws them."""
    common = ["--steps", 2, "--batch-size", 16, "--out", tmp_path]
    assert run_main(common, capsys)[0] == 0
    os.remove(tmp_path / "step-0000002.png")
    code, out, err = run_main(common + ["--resume"], capsys)
    assert code == 0 and "1-NFE energy distance" in out and "on the squares" in out, err
    assert os.path.exists(tmp_path / "step-0000002.png") and ckpt_step(tmp_path) == 2


@pytest.mark.parametrize("argv, words", [
    (["--set", "dtd_stages=99999999999999999999999"], ["dtd_stages", "below 2^31"]),
    (["--set", "omega_max=5"], ["['omega_max'] are not options of recipe 'meanflow'", "iMF's"]),
    (["--set", "dtd_patience=5"], ["--set dtd_patience does nothing", "dtd_stages is 0"]),
    (["--set", "time_sampler=uniform", "--set", "P_mean=0"], ["--set P_mean does nothing", "time_sampler is uniform"]),
    (["--set", "class_dropout=1"], ["--set class_dropout does nothing", "this run is unconditional"]),  # the toy
    (["--prepare-imagenet", "imgs", "--steps", 3], ["--steps goes with training (and --sample"]),
    (["--prepare-imagenet", "imgs", "--batch-size", 64], ["--batch-size goes with training"]),  # encodes 32 at once
    (["--prepare-imagenet", "imgs", "--compile"], ["--compile goes with training"]),
    (["--prepare-imagenet", "imgs", "--out", "x"], ["--out goes with training or --sample"]),
])
def test_options_and_knobs_that_would_do_nothing_are_refused(tmp_path, capsys, argv, words):
    code, _, err = run_main(argv + (["--out", tmp_path / "run"] if "--out" not in argv else []), capsys)
    assert_one_line_error(code, err, *words)
    assert not os.path.exists(tmp_path / "run")


def test_knobs_a_recipe_reads_are_accepted():
    args = train.get_args(["--recipe", "improved-dtd", "--set", "dtd_patience=5", "--set", "dtd_stages=2147483647"])
    assert train.make_method(args).dtd_patience == 5
    args = train.get_args(["--recipe", "meanflow", "--set", "dtd_stages=4", "--set", "dtd_window=5"])
    assert train.make_method(args).dtd_window == 5  # DTD switched on by --set: its knobs count
    args = train.get_args(["--recipe", "imf", "--set", "omega_max=5"])
    assert train.make_method(args).omega_max == 5.0
    args = train.get_args(["--data", "fashion-mnist", "--set", "class_dropout=0.2", "--set", "P_std=1.5"])
    assert (train.make_method(args).class_dropout, train.make_method(args).P_std) == (0.2, 1.5)


def test_world_size_without_rank_is_one_process(tmp_path, capsys, monkeypatch):
    """WORLD_SIZE alone (no torchrun: no RANK) used to train, then fail at the checkpoint's all-gather."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    code, _, err = run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path], capsys)
    assert code == 0 and ckpt_step(tmp_path) == 2, err
    assert len(torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"]) == 1


def test_an_odd_log_does_not_crash_resume(tmp_path, capsys):
    common = ["--steps", 4, *TOY_RUN, "--out", tmp_path]
    assert run_main(common + ["--stop-at", 2], capsys)[0] == 0
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # lines without `time`: the checkpoint has it
    assert run_main(common + ["--resume", "--stop-at", 3], capsys)[0] == 0 and ckpt_step(tmp_path) == 3
    os.remove(tmp_path / "log.jsonl")
    os.mkdir(tmp_path / "log.jsonl")
    assert_one_line_error(*run_main(common + ["--resume"], capsys)[::2], "cannot read", "log.jsonl")
    assert ckpt_step(tmp_path) == 3


def test_the_nan_message_names_more_than_the_lr(tmp_path, capsys):
    code, _, err = run_main(["--steps", 3, *TOY_RUN, "--set", "p=1e300", "--out", tmp_path], capsys)
    assert_one_line_error(code, err, "the loss is", "not the lr", "a --set value", "or the data")


def test_sample_never_replaces_an_earlier_npz(tmp_path, capsys):
    common = ["--batch-size", 16, "--out", tmp_path]
    assert run_main(common + ["--steps", 2], capsys)[0] == 0
    assert run_main(common + ["--sample", 20], capsys)[0] == 0
    saved = (tmp_path / "samples-20-nfe1.npz").read_bytes()
    code, _, err = run_main(common + ["--sample", 20, "--seed", 3], capsys)
    assert_one_line_error(code, err, "samples-20-nfe1.npz exists", "move it away")
    assert (tmp_path / "samples-20-nfe1.npz").read_bytes() == saved
    assert run_main(common + ["--sample", 20, "--sample-steps", 2], capsys)[0] == 0  # another file


def test_cifar10_batches_are_checked(tmp_path, capsys):
    """Labels of another count, float or wide-integer images: one line (they were cut or wrapped silently)."""
    run = ["--data", "cifar10", "--model", "Ti/4", "--batch-size", 4, "--steps", 1, "--out", tmp_path / "run"]
    rng = np.random.default_rng(0)
    for name, data, labels in (("n", rng.integers(0, 256, (6, 3072), dtype=np.uint8), [0] * 5),
                               ("f", rng.random((6, 3072), dtype=np.float32), [0] * 6),
                               ("i", rng.integers(0, 70000, (6, 3072)), [0] * 6)):
        os.makedirs(tmp_path / name)
        with tarfile.open(tmp_path / name / "cifar-10-python.tar.gz", "w:gz") as tar:
            add_pickle(tar, "cifar-10-batches-py/data_batch_1", {b"data": data, b"labels": labels})
        code, _, err = run_main(run[:2] + ["--data-path", tmp_path / name] + run[2:], capsys)
        assert_one_line_error(code, err, "not the CIFAR-10 python tarball", "data_batch_1")
    (tmp_path / "afile").write_text("")
    code, _, err = run_main(run[:2] + ["--data-path", tmp_path / "afile"] + run[2:], capsys)
    assert_one_line_error(code, err, "is a file, not a folder")
    assert not os.path.exists(tmp_path / "run")


def test_imagenet_latents_labels_and_dtype_are_checked(tmp_path, capsys):
    run = ["--data", "imagenet-latents", "--model", "Ti/4", "--batch-size", 4, "--steps", 1, "--out", tmp_path / "run"]
    for name, dtype, labels in (("l1", np.float16, np.zeros((2, 1), np.int64)), ("l2", np.int8, np.zeros(2, np.int64))):
        os.makedirs(tmp_path / name)
        np.save(tmp_path / name / "shard-00000-of-00001.npy", np.zeros((2, 2, 2, 4, 32, 32), dtype))
        np.save(tmp_path / name / "labels-00000-of-00001.npy", labels)
        code, _, err = run_main(run[:2] + ["--data-path", tmp_path / name] + run[2:], capsys)
        assert_one_line_error(code, err, "integer labels (N) in each shard", "--prepare-imagenet")
    assert not os.path.exists(tmp_path / "run")


def make_image_tree(root, counts, hidden=False):  # a class-per-folder tree: counts[k] small JPEGs in class folder k
    from PIL import Image

    for k, n in enumerate(counts):
        os.makedirs(root / f"n{k:04d}", exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((256, 256, 3), 40 * k + i, np.uint8)).save(root / f"n{k:04d}" / f"{i}.JPEG")
    if hidden:
        os.makedirs(root / ".ipynb_checkpoints")


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is optional (pip install diffusers); ImageNet latents use it")
def test_prepare_imagenet_never_mixes_two_image_trees(tmp_path, capsys):
    """Two trees prepared with the same shard count into one folder trained as one set (label k a different class in
    each shard), and a finished shard of other images was encoded over without a word: both refused, files as they
    were. Hidden folders are no classes (one more folder shifted every label), hidden files no images; more than
    1000 classes are refused."""
    make_image_tree(tmp_path / "A", [3, 3], hidden=True)
    (tmp_path / "A" / "n0000" / "._0.JPEG").write_bytes(b"macOS metadata, not an image")
    make_image_tree(tmp_path / "B", [2, 3, 3])
    tiny_vae(str(tmp_path / "vae"))
    prep = ["--num-shards", 2, "--vae", tmp_path / "vae", "--workers", 0, "--data-path", tmp_path / "lat"]
    for shard in (0, 1):
        assert run_main(["--prepare-imagenet", tmp_path / "A", "--shard", shard] + prep, capsys)[0] == 0
    assert json.loads((tmp_path / "lat" / "tree-of-00002.json").read_text())["classes"] == 2  # not the hidden one
    assert np.load(tmp_path / "lat" / "labels-00000-of-00002.npy").tolist() == [0, 0, 1]
    before = listing(tmp_path / "lat")
    no_vae = prep[:3] + [tmp_path / "no-vae"] + prep[4:]
    code, _, err = run_main(["--prepare-imagenet", tmp_path / "B", "--shard", 0] + no_vae, capsys)  # before the VAE
    assert_one_line_error(code, err, "another image tree", "6 images of 2 classes, not 8 of 3", "delete its shard-*")
    # a folder of an older preparation (no record): the finished shard of other images is refused, not replaced
    os.remove(tmp_path / "lat" / "tree-of-00002.json")
    code, _, err = run_main(["--prepare-imagenet", tmp_path / "B", "--shard", 0] + prep, capsys)
    assert_one_line_error(code, err, "shard-00000-of-00002.npy holds latents", "of other images", "delete it")
    del before["tree-of-00002.json"]
    assert listing(tmp_path / "lat") == before
    make_image_tree(tmp_path / "C", [0] * 1001)
    code, _, err = run_main(["--prepare-imagenet", tmp_path / "C"] + no_vae, capsys)
    assert_one_line_error(code, err, "holds 1001 class folders, not ImageNet's 1000 or fewer")
    # a VAE of other latents (3 levels: 64 x 64) is named as it loads, not found by the training run
    tiny_vae(str(tmp_path / "vae3"), levels=3)
    code, _, err = run_main(["--prepare-imagenet", tmp_path / "B", "--vae", tmp_path / "vae3", "--workers", 0,
                             "--data-path", tmp_path / "lat3"], capsys)
    assert_one_line_error(code, err, "makes 4-channel latents at 1/4 of the image side, not the SD-VAE's 4 at 1/8",
                          "pass that VAE")
    assert not os.path.exists(tmp_path / "lat3")


def test_two_shards_finishing_together_both_keep_their_record(tmp_path, monkeypatch):
    """Another shard's process may record the tree between our look and our write: that record is ours too (the
    write's FileExistsError once escaped, and the finished shard was discarded as 'could not write')."""
    tree = [("n0000/0.JPEG", 0), ("n0001/0.JPEG", 1)]
    publish = train.publish_new

    def the_other_process_first(tmp, path):
        monkeypatch.setattr(train, "publish_new", publish)
        train.same_tree(str(tmp_path), 2, tree, write=True)  # the other shard's process, a moment earlier
        publish(tmp, path)

    monkeypatch.setattr(train, "publish_new", the_other_process_first)
    train.same_tree(str(tmp_path), 2, tree, write=True)
    assert json.loads((tmp_path / "tree-of-00002.json").read_text())["images"] == 2 and leftovers(tmp_path) == []
    with pytest.raises(train.Fail, match="another image tree"):  # and a record of another tree is still refused
        train.same_tree(str(tmp_path), 2, tree[:1], write=True)


def test_prepare_imagenet_shards_exist_and_have_one_writer(tmp_path, capsys, monkeypatch):
    """--shard 1 of the default single shard wrote a shard no training run could use (and the advice looped);
    the same --shard under torchrun had every process write it; two writers of a shard shared its temporary."""
    make_image_tree(tmp_path / "A", [3])
    prep = ["--prepare-imagenet", tmp_path / "A", "--vae", tmp_path / "no-vae", "--data-path", tmp_path / "lat"]
    assert_one_line_error(*run_main(prep + ["--shard", 1], capsys)[::2], "--shard 1 is not among --num-shards 1",
                          "its default: 1", "pass shards 0 to 0")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra in (["--shard", 0], ["--num-shards", 1], ["--num-shards", 4]):  # shards none or two processes encode
        assert_one_line_error(*run_main(prep + extra, capsys)[::2], "under torchrun", "leave --shard and --num-shards")
    monkeypatch.delenv("RANK")
    os.makedirs(tmp_path / "lat")
    lock, _ = train.lock_file(str(tmp_path / "lat" / "shard-00000-of-00001.lock"))  # a live writer of shard 0
    try:
        code, _, err = run_main(prep, capsys)
        assert_one_line_error(code, err, "shard 0 of 1 is being encoded by another process", f"pid {os.getpid()}")
    finally:
        train.unlock_file(str(tmp_path / "lat" / "shard-00000-of-00001.lock"), lock)
    assert os.listdir(tmp_path / "lat") == []
    # an image over PIL's decompression-bomb limit is named, as an unreadable one (it raised past the check)
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 1000)
    bad = train.load_images([str(tmp_path / "A" / "n0000" / "0.JPEG")])
    assert isinstance(bad, tuple) and "DecompressionBombError" in bad[1]


def test_imagenet_latents_are_checked_shard_by_shard(tmp_path, capsys):
    """Labels one short in one shard and one over in the other passed (only the totals were compared); a 0-d
    shard raised a TypeError; labels of any integer type passed and failed at step 1 (the embedding takes int64)."""
    run = ["--data", "imagenet-latents", "--model", "Ti/4", "--batch-size", 4, "--steps", 1, "--vae", tmp_path / "no"]
    lat = np.zeros((3, 2, 2, 4, 32, 32), np.float16)
    for name, shards in (("swapped", [(lat, [0, 1]), (lat[:2], [0, 1, 2])]), ("0-d", [(np.float16(0), [0])])):
        for i, (a, labels) in enumerate(shards):
            os.makedirs(tmp_path / name, exist_ok=True)
            np.save(tmp_path / name / f"shard-{i:05d}-of-{len(shards):05d}.npy", a)
            np.save(tmp_path / name / f"labels-{i:05d}-of-{len(shards):05d}.npy", np.array(labels))
        code, _, err = run_main(run + ["--data-path", tmp_path / name, "--out", tmp_path / "run"], capsys)
        assert_one_line_error(code, err, "integer labels (N) in each shard", "--prepare-imagenet")
    for dtype in (np.uint8, np.int16, np.uint32):
        os.makedirs(tmp_path / dtype.__name__)
        np.save(tmp_path / dtype.__name__ / "shard-00000-of-00001.npy", lat)
        np.save(tmp_path / dtype.__name__ / "labels-00000-of-00001.npy", np.array([0, 5, 200], dtype))
        code, _, err = run_main(run + ["--data-path", tmp_path / dtype.__name__, "--out", tmp_path / dtype.__name__ /
                                       "run"], capsys)
        assert code == 0, err
    # an empty shard (EOFError) and an .npz archive under the .npy name (no .shape) raised tracebacks
    for name, bad in (("empty", "shard"), ("npz", "labels")):
        os.makedirs(tmp_path / name)
        for kind, a in (("shard", lat), ("labels", np.array([0, 1, 2]))):
            path = tmp_path / name / f"{kind}-00000-of-00001.npy"
            np.save(path, a)
            if kind == bad:
                with open(path, "wb") as f:
                    np.savez(f, a) if name == "npz" else None
        code, _, err = run_main(run + ["--data-path", tmp_path / name, "--out", tmp_path / "run"], capsys)
        assert_one_line_error(code, err, f"latents in {tmp_path / name} are", "re-run --prepare-imagenet")
        assert not os.path.exists(tmp_path / "run")


def test_cifar10_pixels_of_another_layout_and_foreign_pickles_are_refused(tmp_path, capsys):
    """(N, 32, 32, 3) pixels or rows of 6144 were reshaped into scrambled images (and twice the images of the
    labels); a pickle naming another class was built (a pickle may run anything: here print) or crashed."""
    run = ["--data", "cifar10", "--model", "Ti/4", "--batch-size", 4, "--steps", 1, "--out", tmp_path / "run"]
    cases = {"hwc": {b"data": np.zeros((6, 32, 32, 3), np.uint8), b"labels": [0] * 6},
             "6144": {b"data": np.zeros((6, 6144), np.uint8), b"labels": [0] * 6}}
    for name, d in cases.items():
        os.makedirs(tmp_path / name)
        with tarfile.open(tmp_path / name / "cifar-10-python.tar.gz", "w:gz") as tar:
            add_pickle(tar, "cifar-10-batches-py/data_batch_1", d)
        code, _, err = run_main(run[:2] + ["--data-path", tmp_path / name] + run[2:], capsys)
        assert_one_line_error(code, err, "not the CIFAR-10 python tarball", "data_batch_1", str(d[b"data"].shape))
    for name, raw in (("print", b"cbuiltins\nprint\n(S'ran code from a pickle'\ntR."),
                      ("missing", b"cnomodule\nThing\n)R.")):
        os.makedirs(tmp_path / name)
        with tarfile.open(tmp_path / name / "cifar-10-python.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        code, out, err = run_main(run[:2] + ["--data-path", tmp_path / name] + run[2:], capsys)
        assert_one_line_error(code, err, "not the CIFAR-10 python tarball", "UnpicklingError")
        assert "ran code" not in out + err
    assert not os.path.exists(tmp_path / "run")


def test_fashion_mnist_path_given_is_read_and_a_cut_download_tries_the_mirror(tmp_path, monkeypatch):
    """--data-path data/fashion-mnist, written out, read Debian's copy instead; a transfer cut off (IncompleteRead,
    not an OSError) raised past the one-line error and never tried the mirror."""
    import http.client

    folder = fashion_default_path(tmp_path, monkeypatch)
    make_fashion(str(tmp_path / "no-debian"), n=20)  # stands in for Debian's copy
    make_fashion(folder, n=40)
    args = ["--data", "fashion-mnist", "--model", "Ti/4"]
    assert len(train.load_data(train.get_args(args), 0)) == 20  # the default: Debian's copy
    assert len(train.load_data(train.get_args(args + ["--data-path", folder]), 0)) == 40  # given: that folder
    x, _ = make_fashion(str(tmp_path / "server"))
    files = {n: (tmp_path / "server" / n).read_bytes() for n in train.FASHION_MD5}
    monkeypatch.setattr(train, "FASHION_MD5", {n: hashlib.md5(raw).hexdigest() for n, raw in files.items()})
    main, mirror = train.FASHION_URLS
    served, requested = {main + n: b for n, b in files.items()}, []
    served[mirror + "train-images-idx3-ubyte.gz"] = files["train-images-idx3-ubyte.gz"]
    urlopen = fake_urlopen(served, requested)

    class Cut(io.BytesIO):
        def read(self, *a):
            raise http.client.IncompleteRead(b"0123456789", 99990)

    monkeypatch.setattr(train.urllib.request, "urlopen", lambda url, timeout=None: Cut() if url == main +
                        "train-images-idx3-ubyte.gz" else urlopen(url, timeout))
    train.download_fashion_mnist(str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "train-images-idx3-ubyte.gz").read_bytes() == files["train-images-idx3-ubyte.gz"]
    assert mirror + "train-images-idx3-ubyte.gz" in requested


def test_notebook_03_calls_the_cifar10_loader_as_train_py_defines_it(tmp_path):
    """CI runs the notebooks on Fashion-MNIST only: its CIFAR-10 line (MEANFLOW_DATASET=cifar10) passed rank=0 to a
    loader whose argument is local_rank, a TypeError before any training."""
    x, y = make_cifar_tarball(str(tmp_path))
    with open(os.path.join(HERE, "notebooks", "03_images.ipynb")) as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    line = next(s for c in cells for s in c["source"] if "train.load_cifar10(" in s)
    got = eval(line.split("=", 1)[1].split("#")[0], {"train": train, "DATA_PATH": str(tmp_path)})
    assert np.array_equal(got[0], x) and np.array_equal(got[1], y)


def test_prepare_imagenet_checks_its_folder_first_and_reserves_the_shard(tmp_path, capsys, monkeypatch):
    """--data-path that is a file: one line before the VAE loads. A disk too small for the shard: one line and no
    partial shard (the shard is a sparse memory map: a write on a full disk ended the process with SIGBUS)."""
    from PIL import Image

    os.makedirs(tmp_path / "train" / "n00")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "train" / "n00" / "a.JPEG")
    (tmp_path / "afile").write_text("")
    prep = ["--prepare-imagenet", tmp_path / "train", "--workers", 0, "--vae", tmp_path / "no-vae"]
    code, _, err = run_main(prep + ["--data-path", tmp_path / "afile"], capsys)
    assert_one_line_error(code, err, "cannot write to --data-path", "pass a writable folder")
    if not HAVE_DIFFUSERS or not hasattr(os, "posix_fallocate"):
        pytest.skip("the full-disk half needs diffusers (its tiny VAE) and os.posix_fallocate")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    tiny_vae(str(tmp_path / "vae"))
    monkeypatch.setattr(os, "posix_fallocate", full)
    code, _, err = run_main(prep[:-1] + [tmp_path / "vae", "--data-path", tmp_path / "lat"], capsys)
    assert_one_line_error(code, err, "could not write", "No space left on device", "run --prepare-imagenet again")
    assert not os.path.exists(tmp_path / "lat")  # the folder it made goes too


def test_a_file_system_without_locks_warns_and_trains(tmp_path, capsys, monkeypatch):
    """flock failing with ENOLCK (NFS without lockd; Lustre without -o flock) left the lock file and the folders
    behind and refused the run as 'cannot write': a warning now, and the run goes on."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(train.fcntl, "flock", no_locks)
    code, _, err = run_main(["--steps", 1, *TOY_RUN, "--out", tmp_path / "new" / "run"], capsys)
    assert code == 0 and "warning: no file locks in" in err and "another process writing there is not detected" in err
    assert "train.lock" not in os.listdir(tmp_path / "new" / "run")


def test_a_failed_claim_of_out_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A full disk while the output folder is claimed: the folders it made and the empty lock file go again."""
    def full(fd, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "ftruncate", full)
    code, _, err = run_main(["--steps", 2, *TOY_RUN, "--out", tmp_path / "new" / "run"], capsys)
    assert_one_line_error(code, err, "cannot write to --out", "No space left on device", "writable")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The Python API, benchmark.py and the study runner: what a robustness review (a user trying to break them) found
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, words", [
    (dict(c=-1), "c=-1"), (dict(c=math.nan), "c=nan"), (dict(P_mean=math.nan), "P_mean=nan"),
    (dict(P_std=0), "P_std=0"), (dict(omega=math.nan), "omega=nan"), (dict(minsnr_gamma=-5), "minsnr_gamma=-5"),
    (dict(dtd_stages=-3), "dtd_stages=-3"), (dict(dtd_stages=2.5), "integer"), (dict(ratio_r_neq_t=1.5), "in [0, 1]"),
    (dict(ratio_r_neq_t=-0.1), "ratio_r_neq_t"), (dict(class_dropout=2.0), "class_dropout"), (dict(p=-1), "p=-1"),
    (dict(omega_max=0.5), "omega_max"), (dict(kappa=1.0), "in [0, 1)"), (dict(t_lo=0.9, t_hi=0.1), "t_lo <= t_hi"),
    (dict(time_sampler="Uniform"), "'logit_normal' or 'uniform'"), (dict(time_sampler="logit-normal"), "logit_normal"),
    (dict(omega_max=2.0), "iMF's"), (dict(dtd_share=1.5), "dtd_share"), (dict(dtd_patience=0), "dtd_patience"),
])
def test_meanflow_refuses_bad_knob_values(knobs, words):
    """Every knob is checked when the method is made (they used to give NaN, a negative loss, or a shape error
    steps later; a misspelt time sampler silently drew logit-normal times)."""
    with pytest.raises(ValueError, match=re.escape(words)):
        mf.MeanFlow("improved-dtd" if "dtd_share" in knobs or "dtd_patience" in knobs else "meanflow", **knobs)


def test_meanflow_knob_ranges_accept_the_recipes_and_their_edges():
    for recipe in mf.RECIPES:
        mf.MeanFlow(recipe)
    mf.MeanFlow("meanflow", beta_k=None, minsnr_gamma=None, ratio_r_neq_t=1.0, class_dropout=0.0, p=0.0, t_lo=0.5,
                t_hi=0.5, time_sampler="uniform")
    mf.MeanFlow("imf", omega_max=1.0, omega_beta=-2.0)
    with pytest.raises(ValueError, match=r"\['kappa', 'omega'\] are not options of recipe 'imf'.*at sampling"):
        mf.MeanFlow("imf", omega=3.0, kappa=0.5)  # iMF's loss never reads them: it takes guidance at sampling


def test_imf_omega_sampler_refuses_what_overflows_float32(tmp_path, capsys):
    """omega ~ omega^-beta on [1, omega_max] raises omega_max to the power 1 - beta: beyond float32 it gave inf,
    then an OverflowError traceback at the first step."""
    for knobs in (dict(omega_beta=-400.0), dict(omega_max=1e200, omega_beta=-1.0), dict(omega_max=1e39)):
        with pytest.raises(ValueError, match="overflows float32"):
            mf.MeanFlow("imf", **knobs)
    m = mf.MeanFlow("imf", omega_max=1e30, omega_beta=0.0)  # near the edge: still finite, within [1, omega_max]
    torch.manual_seed(0)
    omega = m.sample_imf_conditions(torch.full((4000,), 0.6), torch.full((4000,), 0.2))[0]
    assert torch.isfinite(omega).all() and omega.min() >= 1 and omega.max() <= 1e30 * (1 + 1e-5)
    code, _, err = run_main(["--recipe", "imf", "--set", "omega_beta=-400", "--steps", 2, *TOY_RUN,
                             "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "omega_beta=-400", "overflows float32")
    assert not os.path.exists(tmp_path / "run")


def test_a_checkpoint_that_cannot_be_read_is_not_called_corrupt(tmp_path, capsys, monkeypatch):
    """An unreadable ckpt.pt (permissions, an I/O error, memory) may be the run's only good copy: the message names
    the cause, never 'delete it'."""
    out = tmp_path / "run"
    common = ["--steps", 2, *TOY_RUN, "--out", out]
    assert run_main(common, capsys)[0] == 0
    saved = (out / "ckpt.pt").read_bytes()
    for error, words in ((PermissionError(errno.EACCES, "Permission denied"), ("cannot read", "Permission denied")),
                         (OSError(errno.EIO, "Input/output error"), ("cannot read", "Input/output error")),
                         (MemoryError(), ("not enough memory to load",))):
        def load(*args, **kwargs):
            raise error
        monkeypatch.setattr(torch, "load", load)
        for mode in (["--resume", "--steps", 4], ["--sample", 5]):
            code, _, err = run_main(common + mode, capsys)
            assert_one_line_error(code, err, *words)
            assert "delete" not in err
        monkeypatch.undo()
    assert (out / "ckpt.pt").read_bytes() == saved


def test_resume_takes_this_runs_weight_decay(tmp_path, capsys):
    """--weight-decay may change at --resume, as --lr: the optimizer's state dict used to bring back the old value
    while the checkpoint recorded the new one."""
    out, common = tmp_path / "run", ["--steps", 6, *TOY_RUN]
    assert run_main(common + ["--stop-at", 3, "--out", out], capsys)[0] == 0
    assert run_main(common + ["--resume", "--weight-decay", 0.5, "--out", out], capsys)[0] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert [g["weight_decay"] for g in ckpt["opt"]["param_groups"]] == [0.5] and ckpt["args"]["weight_decay"] == 0.5
    assert run_main(common + ["--out", tmp_path / "zero"], capsys)[0] == 0  # weight decay 0 throughout: other weights
    zero = torch.load(tmp_path / "zero" / "ckpt.pt", weights_only=True)["model"]
    assert any(not torch.equal(zero[k], ckpt["model"][k]) for k in zero)


def test_loss_and_samplers_check_their_inputs():
    torch.manual_seed(0)
    net, cnet, m = mf.MLP(dim=2), mf.MLP(dim=2, num_classes=3), mf.MeanFlow("meanflow")
    x, y, t, r = torch.randn(16, 2), torch.randint(0, 3, (16,)), torch.full((16,), 0.6), torch.full((16,), 0.2)
    bad = [(dict(net=net, y=y), "num_classes=0"),  # labels silently ignored by a network without classes
           (dict(net=cnet, y=y[:10]), "one per row"), (dict(net=cnet, y=torch.randint(0, 3, (20,))), "one per row"),
           (dict(r=r), "t and r together"), (dict(t=t), "t and r together"),
           (dict(e=torch.randn(8, 2), t=t, r=r), "e of x"),
           (dict(t=t[:8], r=r[:8]), "(16,) each"), (dict(t=r, r=t), "0 <= r <= t <= 1"), (dict(t=t + 1, r=r), "<= 1"),
           (dict(progress=1.5), "progress=1.5"), (dict(progress=math.nan), "progress=nan"),
           (dict(net=cnet, y=y.float()), "integers, one per row"),  # failed inside nn.Embedding
           (dict(x=x.long()), "x (or e) of torch.int64: pass floating-point data"),  # failed in torch.randn_like
           (dict(x=torch.randn(16, 3)), "3), return_v=False: this network takes (B, 2)"),  # failed in a matmul
           (dict(x=x[:0]), "x has no rows"), (dict(x=x[:0], t=t[:0], r=r[:0]), "x has no rows")]  # in torch.cat
    for kwargs, words in bad:
        kwargs = {"net": net, "x": x, **kwargs}
        with pytest.raises(ValueError, match=re.escape(words)):
            m.loss(kwargs.pop("net"), kwargs.pop("x"), **kwargs)
    assert torch.isfinite(m.loss(cnet, x, y, t=t, r=r)[0])  # given t, r that are fine
    e = torch.randn(16, 2)
    for steps in (0, -1, 2.5):
        for sampler in (m.sample, m.sample_euler):
            with pytest.raises(ValueError, match="1 or more"):
                sampler(net, e, steps=steps)
    with pytest.raises(ValueError, match="num_classes=0"):
        m.sample(net, e, y)
    imf, inet = mf.MeanFlow("imf"), mf.MLP(dim=2, **mf.MeanFlow("imf").net_kwargs)
    for cond in (dict(omega=0.0), dict(omega=math.nan), dict(omega=-1.0), dict(t_min=0.9, t_max=0.1)):
        with pytest.raises(ValueError, match="omega >= 1"):
            imf.sample(inet, e, **cond)
    assert torch.isfinite(imf.sample(inet, e, omega=2.0, t_min=0.2, t_max=0.8)).all()


def test_curriculum_state_of_another_method_is_refused():
    a = mf.MeanFlow("improved-dtd", dtd_stages=40)
    a.dtd_stage = 30
    for state in (a.state_dict(), {**mf.MeanFlow("improved-dtd").state_dict(), "dtd_stage": -5}, {}, [1]):
        with pytest.raises(ValueError, match="not a curriculum state of this method"):
            mf.MeanFlow("improved-dtd").load_state_dict(state)
    b = mf.MeanFlow("improved-dtd", dtd_stages=40)
    b.load_state_dict(a.state_dict())
    assert b.dtd_stage == 30


def test_networks_check_their_sizes_and_inputs():
    for make, words in ((lambda: mf.DiT(input_size=30, patch_size=4), "multiple of patch_size"),
                        (lambda: mf.DiT(input_size=8, patch_size=2, hidden_size=30, num_heads=4), "num_heads 4"),
                        (lambda: mf.DiT(input_size=8, patch_size=2, hidden_size=34, num_heads=2), "of 4"),
                        (lambda: mf.iMFDiT(input_size=8, patch_size=2, hidden_size=32, num_heads=3), "num_heads 3"),
                        (lambda: mf.iMFDiT(input_size=8, patch_size=2, hidden_size=12, num_heads=4, depth=2,
                                           head_depth=1), "of 8"),  # RoPE: an even width per head
                        (lambda: mf.iMFDiT(depth=2, head_depth=3), "head_depth")):
        with pytest.raises(ValueError, match=re.escape(words)):
            make()
    kw = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, num_heads=2, depth=2, num_classes=2)
    net = mf.iMF_models["Ti/2"](input_size=8, in_channels=1, num_classes=2, **mf.MeanFlow("imf").net_kwargs)
    dit, t = mf.DiT(**kw), torch.rand(2)
    for n in (net, dit):  # a z of the same number of tokens but another shape came back in the network's shape
        with pytest.raises(ValueError, match=re.escape("takes (B, 1, 8, 8)")):
            n(torch.randn(2, 1, 4, 16), t, t)
    with pytest.raises(ValueError, match="v_head=True"):
        dit(torch.randn(2, 1, 8, 8), t, t, return_v=True)
    with pytest.raises(ValueError, match="v_head=True"):  # the MLP called its missing v-head: a TypeError
        mf.MLP()(torch.randn(2, 2), t, t, return_v=True)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        mf.set_attention(dit, "flash")
    for make in (mf.DiT, functools.partial(mf.iMFDiT, head_depth=1)):  # refused when built, not at the first forward
        with pytest.raises(ValueError, match="unknown attention backend 'flash'"):  # (a KeyError)
            make(input_size=8, patch_size=2, hidden_size=32, num_heads=2, depth=2, attention="flash")
    with pytest.raises(ValueError, match="imf='no'.*True or False"):  # any truthy value switched iMF on
        mf.MeanFlow("meanflow", imf="no")


def test_on_squares_takes_n_by_2_points():
    pts = td.sample("checkerboard", 100, torch.Generator().manual_seed(0))
    assert td.on_squares(pts) == 1.0
    for bad in (pts.T, torch.zeros(4, 3), torch.zeros(0, 2), torch.zeros(2)):
        with pytest.raises(ValueError, match="pass \\(n, 2\\)"):
            td.on_squares(bad)


def test_exact_fields_check_their_arguments():
    z = torch.randn(4, 2, dtype=torch.float64)
    for field in (td.GaussianMixture.default(), td.Checkerboard()):
        for steps in (0, -3, 2.5):
            with pytest.raises(ValueError, match="1 or more"):
                field.u(z, 1.0, 0.0, steps=steps)
    with pytest.raises(ValueError, match="t > 0"):
        td.Checkerboard().v(z, 0.0)  # was NaN
    for stds, weights in ((math.nan, None), (0.1, [0.0, 0.0]), (0.1, [1.0, math.nan]), (0.1, [1.0, -1.0])):
        with pytest.raises(ValueError, match="stds must be|weights must be"):
            td.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], stds, weights)
    # shapes that fell over torch's own messages later (expand, the first v), and a ring with no room left
    for means, stds, weights, words in (([0.0, 1.0], 0.1, None, "pass (K, D)"), ([[0.0, 0.0]] * 2, [0.1] * 3, None,
                                        "pass one std, or 2"), ([[0.0, 0.0]] * 2, 0.1, [1.0] * 3, "pass 2, one per")):
        with pytest.raises(ValueError, match=re.escape(words)):
            td.GaussianMixture(means, stds, weights)
    with pytest.raises(ValueError, match="needs it below 1"):
        td.GaussianMixture.ring([1.0, 1.0], [2.0, 2.0])  # was "math domain error"

def test_toy_samples_and_distances_check_their_arguments():
    for name in td.DATASETS:  # n = 0 failed in three sets with torch's message and gave (0, 2) in the others
        with pytest.raises(ValueError, match="1 or more"):
            td.sample(name, 0)
    a = td.sample("moons", 50, torch.Generator().manual_seed(0))
    for b in (a[:0], a[:, :1], a[0]):
        for distance in (td.energy_distance, td.sliced_wasserstein):
            with pytest.raises(ValueError, match="two non-empty"):
                distance(a, b)
    with pytest.raises(ValueError, match="n_proj=0"):
        td.sliced_wasserstein(a, a, n_proj=0)  # was NaN
    with pytest.raises(ValueError, match="n_proj=2.5"):
        td.sliced_wasserstein(a, a, n_proj=2.5)  # was torch's TypeError
    assert td.sample("moons", np.int64(3)).shape == (3, 2)  # a numpy integer is a number of points
    for draw in (*td.DATASETS.values(), td.GaussianMixture.default().sample, td.Checkerboard().sample):
        with pytest.raises(ValueError, match=r"n=10000.0: pass a number of points"):
            draw(1e4)  # called directly: torch's TypeError before (rand() "invalid combination of arguments")
        with pytest.raises(TypeError, match=r"generator=Generator: pass a torch.Generator"):
            draw(3, np.random.default_rng(0))  # numpy's generator: torch's multi-line rand() TypeError before
    with pytest.raises(TypeError, match=r"generator=Generator: pass a torch.Generator"):
        td.sliced_wasserstein(a, a, generator=np.random.default_rng(0))


def test_labels_need_a_network_that_says_how_many_classes():
    class Own(torch.nn.Module):  # a user's own network without num_classes: guidance fell over an AttributeError
        def forward(self, z, t, r, y=None):
            return z

    with pytest.raises(ValueError, match="this one: num_classes=0 or none"):
        mf.MeanFlow("meanflow", omega=2.0).loss(Own(), torch.randn(4, 2), torch.zeros(4, dtype=torch.long))

def test_benchmark_refuses_an_out_folder_and_a_broken_baseline_before_measuring(tmp_path):  # the command line
    (tmp_path / "bad.py").write_text("not python(\n")
    (tmp_path / "notes.jsonl").write_text('{"model": "mlp", "kind": "fm"}\n{"old": "unrelated"}\n')
    for extra, words in ((["--out", tmp_path], "is a folder; pass a file"),
                         (["--out", tmp_path / "notes.jsonl"], "line 2 is not a row of benchmark.py"),
                         (["--recipes", "meanflow@base", "--baseline", tmp_path / "bad.py"], "is not Python")):
        out = subprocess.run([sys.executable, os.path.join(HERE, "benchmark.py"), "--models", "mlp", *map(str, extra)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and words in out.stderr.strip().splitlines()[-1], out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
    assert (tmp_path / "notes.jsonl").read_text() == '{"model": "mlp", "kind": "fm"}\n{"old": "unrelated"}\n'


def test_benchmark_reports_a_failed_measurement_in_one_line(tmp_path, monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: SimpleNamespace(
        returncode=1, stderr="Traceback (most recent call last):\n  ...\nAttributeError: no DiT_models\n", stdout=""))
    with pytest.raises(SystemExit, match="measuring Ti/4 .*failed: AttributeError: no DiT_models; the rows before it"):
        bench.child(SimpleNamespace(batch=2, steps=1, bf16=False, compile=False, baseline=None, out="x.jsonl"),
                    "--child", "Ti/4", "fm")


def test_study_runner_refuses_an_out_folder_and_runs_each_job_once(tmp_path, capsys):
    study = load_study()
    with pytest.raises(SystemExit) as exc:
        study.main(["--out", str(tmp_path)])
    assert exc.value.code == 2 and "is a folder" in capsys.readouterr().err
    out = str(tmp_path / "s.jsonl")
    argv = ["--out", out, "--steps", "2", "--eval-every", "2", "--seeds", "0", "0", "--recipes", "meanflow", "meanflow"]
    assert study.main(argv) == 0
    assert "1 runs to do" in capsys.readouterr().out and len(open(out).readlines()) == 1
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:  # a file two levels up: NotADirectoryError's traceback
        study.main(["--out", str(tmp_path / "afile" / "sub" / "s.jsonl")])
    assert exc.value.code == 2 and "cannot make its folder (Not a directory)" in capsys.readouterr().err


def test_study_out_of_memory_and_ctrl_c_end_in_one_line(tmp_path, monkeypatch, capsys):
    study = load_study()
    argv = ["--out", str(tmp_path / "s.jsonl"), "--steps", "2", "--eval-every", "2", "--recipes", "meanflow"]
    monkeypatch.setattr(study, "eval_set", lambda: (None, None))
    for raised, code, words in ((RuntimeError("[enforce fail at alloc_cpu.cpp:117] can't allocate memory"), 2,
                                 "out of memory (RuntimeError); pass a smaller --batch-size"),
                                (KeyboardInterrupt(), 130, "stopped; the finished runs are in")):
        def run(*a):
            raise raised
        monkeypatch.setattr(study, "run", run)
        try:
            assert study.main(argv) == code
        except SystemExit as exit_:
            assert exit_.code == code
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and words in err and not os.path.exists(tmp_path / "s.jsonl")


def test_study_ctrl_c_ends_every_worker_in_one_line(tmp_path):
    """A terminal's Ctrl-C reaches every process: the spawned workers printed a KeyboardInterrupt traceback each."""
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "notebooks", "convergence_study.py"), "--out",
                          str(tmp_path / "s.jsonl"), "--steps", "100000", "--recipes", "meanflow", "--seeds", "0", "1",
                          "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert "2 runs to do" in p.stdout.readline()
        time.sleep(2)  # the workers are starting (importing torch) or training
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:  # a failure leaves no training processes behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and err.splitlines() == [f"convergence_study.py: stopped; the finished runs are in "
                                                        f"{tmp_path / 's.jsonl'}; the same command runs the rest"]


# ---------------------------------------------------------------------------------------------------------------------
# toy_data: tests for bugs a mutation audit found (65 mutants of toy_data/__init__.py; these kill the 14 real-bug
# survivors: data sets whose moments are right but whose shape, noise, weights or widths are not, a square side that
# is not the scored one, a zero std accepted, the sliced-Wasserstein generator ignored).
def _robust_std(x):
    # median absolute deviation, scaled to the std of a normal: blind to the few points a window borrows from a
    # neighbour
    return 1.4826 * (x - x.median()).abs().median().item()


def _window(phi, centre, half=0.2):
    return (torch.remainder(phi - centre + math.pi, 2 * math.pi) - math.pi).abs() < half


def _noise_is_isotropic(resid, phi, sel, noise):
    # The residual across the curve at polar angles pi/4 and 3pi/4 (where the curve runs across the radius): for
    # N(0, noise^2 I) it has std `noise` at both; noise only along (1, 1) gives sqrt(2) noise and ~0.
    for centre in (math.pi / 4, 3 * math.pi / 4):
        s = _robust_std(resid[sel & _window(phi, centre)])
        assert abs(s / noise - 1) < 0.1, (centre, s, noise)


def test_moons_noise_is_isotropic_and_of_the_stated_size():
    # Kills: noise * _randn(n, generator, 1) (one noise value for both coordinates); a wrong default noise.
    noise = 0.05
    var = (0.75 + 0.5 - 4 / math.pi**2 + (2 / math.pi - 0.25) ** 2) / 2 + noise**2  # the documented moments
    p = td.moons(400_000, torch.Generator().manual_seed(0)).double() * math.sqrt(var) + torch.tensor([0.5, 0.25])
    rho, phi = p.norm(dim=1), torch.atan2(p[:, 1], p[:, 0])
    upper = p[:, 1] > 0.6  # only the upper half circle (centre 0, radius 1) reaches y > 0.6
    _noise_is_isotropic(rho - 1, phi, upper, noise)


def test_rings_radii_shares_and_isotropic_noise():
    # Circles of radius 1..4 picked in proportion to their length. Kills: noise drawn once for both coordinates;
    # DATASETS["rings"] pointing at another set.
    noise = 0.2
    p = td.sample("rings", 400_000, torch.Generator().manual_seed(0)).double() * math.sqrt(5 + noise**2)
    rho, phi = p.norm(dim=1), torch.atan2(p[:, 1], p[:, 0])
    ring = rho.round().clamp(1, 4)
    shares = torch.stack([(ring == k).double().mean() for k in (1, 2, 3, 4)])
    assert (shares - torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)).abs().max() < 0.01, shares
    _noise_is_isotropic(rho - ring, phi, ring == 4, noise)


def test_spirals_turn_the_right_way_with_isotropic_noise():
    # FFJORD's 2spirals: arm (-a cos a, a sin a) / (3 pi / 2) and its mirror through 0, so at polar angle phi the arms
    # pass at the radii a / (3 pi / 2) with a = -phi (mod pi), 2/3 apart. Kills: the arm mirrored (a cos a, a sin a);
    # noise drawn once for both coordinates.
    noise = 0.08
    p = td.sample("spirals", 400_000, torch.Generator().manual_seed(0)).double() * math.sqrt(1 + noise**2)
    rho, phi = p.norm(dim=1), torch.atan2(p[:, 1], p[:, 0])
    base = torch.remainder(-phi, math.pi) / (1.5 * math.pi)
    resid = torch.remainder(rho - base + 1 / 3, 2 / 3) - 1 / 3  # radial offset from the nearest pass of an arm
    passing = rho - resid  # that pass's radius: 1.17 at pi/4, 1.5 at 3pi/4 within [1, 1.7] (and whole, not cut)
    _noise_is_isotropic(resid, phi, (passing > 1.0) & (passing < 1.7), noise)


@pytest.mark.parametrize("name, weights, stds", [("eight_gaussians", [0.125] * 8, [0.14] * 8),
                                                 ("gaussian_mixture", [0.15, 0.10] * 4, [0.1, 0.2] * 4)])
def test_ring_mixtures_have_their_stated_weights_and_widths(name, weights, stds):
    # 8 modes at angles 2 pi k / 8; eight_gaussians equal with std 0.14; the default mixture alternates narrow (std 0.1,
    # weight 0.15) and wide (std 0.2, weight 0.10), starting narrow at angle 0. Kills: other stds or weights in
    # eight_gaussians, the default's weights swapped, DATASETS["gaussian_mixture"] pointing at eight_gaussians.
    p = td.sample(name, 400_000, torch.Generator().manual_seed(0)).double()
    k = torch.remainder(torch.round(torch.atan2(p[:, 1], p[:, 0]) / (math.pi / 4)), 8).long()
    angle = k.double() * math.pi / 4
    pi = torch.tensor(weights, dtype=torch.float64)
    R = math.sqrt(2 * (1 - (pi * torch.tensor(stds, dtype=torch.float64) ** 2).sum().item()))  # unit variance
    resid = p - R * torch.stack([angle.cos(), angle.sin()], 1)
    for j in range(8):
        assert abs((k == j).double().mean().item() - weights[j]) < 0.005, (j, weights[j])
        s = _robust_std(resid[k == j].flatten())
        assert abs(s / stds[j] - 1) < 0.05, (j, s, stds[j])


def test_ring_mixture_covariance_is_exactly_identity():
    # ring(): Cov[x] = R^2 / 2 + sum_k pi_k sigma_k^2 per coordinate = 1 exactly, also with unequal weights and widths
    # alternating on 8 modes (a sampled variance cannot see 0.3%). Kills: R from the unweighted mean of sigma_k^2.
    for gm in (td.GaussianMixture.default(), td.GaussianMixture.ring([0.2, 0.05] * 4, [0.05, 0.4] * 4)):
        mean = gm.pi @ gm.mu
        cov = (gm.pi[:, None, None] * (gm.mu[:, :, None] * gm.mu[:, None, :])).sum(0) - torch.outer(mean, mean)
        cov = cov + (gm.pi * gm.sigma**2).sum() * torch.eye(2, dtype=torch.float64)
        torch.testing.assert_close(cov, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_mixture_rejects_a_zero_std():
    # v is singular at t = 0 for a point mass. Kills: `sigma < 0` instead of `sigma <= 0`.
    with pytest.raises(ValueError, match="positive"):
        td.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [0.0, 0.5])


def test_checkerboard_squares_are_exactly_the_on_squares_region():
    # The drawn squares (train.py's figure) and on_squares agree point by point on the whole board, and cover half of
    # it. Kills: a square side of 1 instead of BOARD_SCALE (the squares overlap the empty ones).
    g = torch.Generator().manual_seed(0)
    pts = (torch.rand(20_000, 2, generator=g, dtype=torch.float64) * 6 - 3) * td.BOARD_SCALE  # and around the board
    squares = td.checkerboard_squares()
    drawn = torch.zeros(len(pts), dtype=torch.bool)
    for x0, y0, s in squares:
        drawn |= (pts[:, 0] >= x0) & (pts[:, 0] < x0 + s) & (pts[:, 1] >= y0) & (pts[:, 1] < y0 + s)
    scored = torch.tensor([td.on_squares(p[None]) == 1.0 for p in pts])
    assert torch.equal(drawn, scored) and (pts.abs() > 2 * td.BOARD_SCALE).any(1).sum() > 5000
    assert td.on_squares(torch.tensor([[2.2, 2.2], [-2.2, -2.2]]) * td.BOARD_SCALE) == 0.0  # where a square would be
    assert abs(sum(s * s for *_, s in squares) - 8 * td.BOARD_SCALE**2) < 1e-12


def test_sliced_wasserstein_draws_its_directions_from_the_generator():
    # Documented: directions from `generator`, seed 0 when None. Kills: the generator argument ignored.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) * torch.tensor([1.0, 2.0])
    sw = lambda seed: td.sliced_wasserstein(a, b, n_proj=8, generator=torch.Generator().manual_seed(seed))
    assert sw(0) == td.sliced_wasserstein(a, b, n_proj=8) and sw(1) == sw(1) and sw(1) != sw(0)


# ---------------------------------------------------------------------------------------------------------------------
# meanflow.py: tests for bugs a second mutation audit found (56 mutants of the current file, 14 real-bug survivors):
# DTD's window statistics and catch-up, class dropout's row count, the kappa forward's rows, the logged beta, iMF
# sampling's interval, guidance_scalars, iMFDiT's init scales, norms, RoPE tables and RMSNorm eps, DiT positions.
def test_dtd_compares_each_window_with_the_one_before_not_the_first():  # D6
    """A loss that drops, then plateaus, has converged once two plateau windows agree: stage 1 at step 75
    (windows 1-25: 2.0, 26-50 and 51-75: 1.0 +- noise). Against the stage's first window it would run to tau."""
    m = mf.MeanFlow("improved-dtd", dtd_share=0)  # window 25, patience 200, no deadline
    g = torch.Generator().manual_seed(0)
    losses = torch.cat([torch.full((25,), 2.0), 1 + 0.01 * torch.randn(200, generator=g)])
    stages = _dtd_stages(m, losses)
    assert stages.index(1) + 1 == 75


def test_dtd_window_counts_only_finite_steps():  # D9
    """A step whose process had no r = t rows (v_loss nan) adds nothing to the window, not even to its count."""
    m = mf.MeanFlow("improved-dtd", dtd_share=0)
    for v in (1.0, float("nan"), 3.0):
        m.dtd_step(torch.tensor(v))
    assert m.state_dict()["dtd_acc"] == [4.0, 10.0, 2.0] and m.state_dict()["dtd_steps"] == 3


def test_dtd_catches_up_at_once_with_a_missed_deadline():  # D12
    """A resumed run far past its stage's deadline jumps to the stage its progress allows, not one stage."""
    m = mf.MeanFlow("improved-dtd")  # 20 stages, share 0.25: stage k's deadline at progress (k + 1) * 0.25 / 19
    m.dtd_step(torch.tensor(1.0), progress=0.1)  # floor(0.1 * 19 / 0.25) = 7
    assert m.dtd_stage == 7
    m.dtd_step(torch.tensor(1.0), progress=0.5)  # beyond the whole curriculum's share
    assert m.dtd_stage == 19


def test_class_dropout_drops_exactly_k_rows():  # L1
    """class_dropout = 1: k = B, capped at the r = t rows: every one of the B - n last rows is dropped."""
    m, y = mf.MeanFlow("meanflow", class_dropout=1.0), torch.zeros(8, dtype=torch.long)
    y_in, drop = m.drop_labels(y, 2, 3)
    assert drop.tolist() == [False] * 2 + [True] * 6 and y_in.tolist() == [0, 0] + [3] * 6


def test_logged_beta_is_the_mean_over_the_r_neq_t_rows():  # O3
    m = mf.MeanFlow("improved-dtd")
    net = mf.MLP(dim=2, hidden=16)
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    t = torch.rand(64)
    r = torch.where(torch.arange(64) < 16, 0.3 * t, t)
    _, logs = m.loss(net, x, t=t, r=r, progress=0.0)
    mask = t != r
    assert torch.allclose(logs["beta"], m.beta((t - r)[mask], 0.0).mean())


def test_imf_sampler_passes_omega_and_the_whole_interval():  # S2
    method = mf.MeanFlow("imf")
    torch.manual_seed(0)
    net = randomize(mf.MLP(dim=2, hidden=16, **method.net_kwargs), std=0.3)
    e, full = torch.randn(6, 2), lambda a: torch.full((6,), a)
    u = net(e, full(1.0), full(0.0), None, full(2.0), full(0.2), full(0.6))
    assert torch.allclose(method.sample(net, e, omega=2.0, t_min=0.2, t_max=0.6), e - u, atol=1e-6)


def test_guidance_scalars_pass_the_given_interval_through():  # S3
    t = torch.rand(5)
    w, lo, hi = mf.guidance_scalars(t, torch.full_like(t, 4.0), torch.zeros(5), torch.full_like(t, 0.05))
    assert torch.equal(w, torch.full_like(t, 0.75)) and torch.equal(lo, torch.zeros(5))
    assert torch.equal(hi, torch.full_like(t, 0.05))


def test_imf_init_scales_as_the_official_code():  # N2, N8
    torch.manual_seed(0)
    D = 192
    net = mf.iMFDiT(input_size=8, patch_size=2, in_channels=2, hidden_size=D, depth=3, num_heads=3, head_depth=1,
                    num_classes=1000)
    for blocks in (net.blocks, net.u_blocks, net.v_blocks):  # 0.32 / sqrt(fan_in) in every block, shared ones too
        assert abs(blocks[0].attn.qkv.weight.std().item() * D**0.5 - 0.32) < 0.01
    assert abs(net.embedders["time"][0].weight.std().item() * 256**0.5 - 1.0) < 0.02  # embedders: 1 / sqrt(fan_in)
    assert abs(net.y_embedder.weight.std().item() * D**0.5 - 1.0) < 0.02  # label rows N(0, 1/D)


def test_imf_every_norm_weight_is_used():  # N3, N7
    """Each RMSNorm (block norms, QK-norms) shapes the output: scaling its weight moves u."""
    net = randomize(tiny_imf(num_classes=3), std=0.3)
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(2, 2, 8, 8, generator=g), torch.rand(2, generator=g)
    y = torch.tensor([0, 2])
    u = net(z, t, 0.5 * t, y)
    blk = net.blocks[0]
    for norm in (blk.norm1, blk.norm2, blk.attn.q_norm, blk.attn.k_norm):
        with torch.no_grad():
            norm.weight.mul_(2.0)
        assert not torch.allclose(net(z, t, 0.5 * t, y), u, atol=1e-4)
        with torch.no_grad():
            norm.weight.div_(2.0)


def test_imf_rope_tables_use_theta_10000():  # N5
    net = tiny_imf(num_classes=3)
    d, n = 16, 20 + 16  # head dim 32 / 2; 20 condition tokens + 16 patches
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs
    assert torch.allclose(net.rope_cos, angles.cos().float()) and torch.allclose(net.rope_sin, angles.sin().float())


def test_rms_norm_uses_its_eps():  # N6
    x = 1e-3 * torch.randn(3, 8, dtype=torch.float64)
    ref = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(mf.RMSNorm(8)(x), ref.to(torch.float64), rtol=1e-5)


def test_dit_positions_tell_rows_from_columns():  # K5
    pe = mf.sincos_pos_embed_2d(32, 4)  # (16, 32): token n at row n // 4, column n % 4
    assert len({tuple(row) for row in pe.tolist()}) == 16
    assert not torch.allclose(pe[1], pe[4])  # (0, 1) and (1, 0)


def test_kappa_forward_takes_only_the_r_neq_t_rows_from_the_network():  # G1 (efficiency: one extra row per step)
    """Guidance on every row, no dropout: u(z,t,t|null) on all B rows, u(z,t,t|y) on the n r != t rows only."""
    B, n = 16, 4
    method = mf.MeanFlow("meanflow", omega=0.2, kappa=0.92, class_dropout=0.0)
    net = RowCounter(mf.MLP(dim=2, hidden=16, num_classes=3))
    torch.manual_seed(0)
    method.loss(net, torch.randn(B, 2), torch.randint(0, 3, (B,)))
    assert [rows for rows, _, grad, _ in net.calls if not grad] == [B + n]  # the no-grad (guidance) forwards


# --- checks of the reviews' fixes (a mutation audit: each of these failed on a plausible bug that no test caught)
@pytest.mark.parametrize("knobs, words", [(dict(dtd_window=2.5), "dtd_window=2.5: pass a finite integer"),
                                          (dict(dtd_patience=200.0), "dtd_patience=200.0: pass a finite integer"),
                                          (dict(c=None), "c=None"), (dict(dtd_share=None), "dtd_share=None")])
def test_counts_are_integers_and_only_beta_minsnr_take_none(knobs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        mf.MeanFlow("improved-dtd", **knobs)


def test_labels_must_be_one_dimensional():
    net, m = mf.MLP(dim=2, num_classes=3), mf.MeanFlow("meanflow")
    x, y = torch.randn(16, 2), torch.randint(0, 3, (16, 1))
    with pytest.raises(ValueError, match="one per row"):
        m.loss(net, x, y)
    with pytest.raises(ValueError, match="one per row"):
        m.sample(net, x, y)


def test_kappa_forward_covers_only_the_r_neq_t_rows():
    B, K = 40, 5
    torch.manual_seed(0)
    method = mf.MeanFlow("meanflow", omega=0.2, kappa=0.9, class_dropout=0.0)  # [t_lo, t_hi] = [0, 1]: all rows
    net = RowCounter(mf.MLP(dim=2, hidden=16, num_classes=K))
    t, r = method.sample_t_r(B)
    method.loss(net, torch.randn(B, 2), torch.randint(0, K, (B,)), t=t, r=r)
    assert [c[0] for c in net.calls if not c[2]] == [B + B // 4]


def test_each_machine_downloads_with_its_local_process_0(tmp_path, capsys, monkeypatch):
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="localhost", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)  # as torchrun sets them
    assert train.processes() == (3, 4, 1)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: None)
    seen = []

    def load_data(args, local_rank):
        seen.append(local_rank)
        raise train.Fail("stopped here")

    monkeypatch.setattr(train, "load_data", load_data)
    code, _, err = run_main(["--data", "cifar10", "--model", "Ti/4", "--data-path", tmp_path,
                             "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "process 3 of 4: stopped here")
    assert seen == [1]


def test_a_failed_write_of_a_runs_log_or_picture_advises_resume(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    common = ["--steps", 4, *TOY_RUN, "--out", tmp_path / "run"]
    assert run_main(common + ["--stop-at", 2], capsys)[0] == 0
    with monkeypatch.context() as m:  # the log's rewrite at resume
        m.setattr(os, "fsync", full)
        code, _, err = run_main(common + ["--resume"], capsys)
    assert_one_line_error(code, err, "could not write", "log.jsonl", "with --resume for a training run")
    with monkeypatch.context() as m:  # the picture at the last step
        m.setattr(matplotlib.figure.Figure, "savefig", full)
        code, _, err = run_main(common + ["--resume"], capsys)
    assert_one_line_error(code, err, "could not write", ".png", "with --resume for a training run")


def test_negative_value_hint_fits_the_flag(tmp_path, capsys):
    code, _, err = run_main(["--steps", "-1e3", "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "(a negative value: --steps=-1)")
    code, _, err = run_main(["--lr", "--steps", "5", "--out", tmp_path / "run"], capsys)  # a missing value: no hint
    assert_one_line_error(code, err, "--lr: expected one argument")
    assert "negative value" not in err
    code, _, err = run_main(["--out", "-x"], capsys)
    assert_one_line_error(code, err, "--out: expected one argument")
    assert "negative value" not in err


def test_latent_batches_draw_flips_then_noise(tmp_path):
    lat = np.random.default_rng(0).normal(size=(6, 2, 2, 4, 32, 32)).astype(np.float16)
    np.save(tmp_path / "shard-00000-of-00001.npy", lat)
    np.save(tmp_path / "labels-00000-of-00001.npy", np.arange(6))
    idx = torch.tensor([5, 0, 3, 3])
    x, y = train.ImageNetLatents(str(tmp_path)).get(idx, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    flip = torch.randint(0, 2, (4,), generator=g)
    noise = torch.randn(4, 4, 32, 32, generator=g)
    a = torch.from_numpy(lat.astype(np.float32))[idx, flip]
    shift, scale = train.latent_normalisation(False)
    assert torch.equal(x, (a[:, 0] + a[:, 1] * noise - shift) * scale) and y.tolist() == [5, 0, 3, 3]


def test_prepare_imagenet_shard_is_the_global_rank(tmp_path, capsys, monkeypatch):
    make_image_tree(tmp_path / "train", [2, 2])  # sorted: n0000/0, n0000/1, n0001/0, n0001/1; shard 1 of 2: labels 0, 1
    out = tmp_path / "lat"
    out.mkdir()
    np.save(out / "shard-00001-of-00002.npy", np.zeros((2, 2, 2, 4, 32, 32), np.float16))
    np.save(out / "labels-00001-of-00002.npy", np.array([0, 1]))
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0").items():  # the second machine's first process
        monkeypatch.setenv(k, v)
    code, text, err = run_main(["--prepare-imagenet", tmp_path / "train", "--data-path", out,
                                "--vae", tmp_path / "no-vae", "--workers", 0], capsys)
    assert code == 0 and "shard 1 of 2: already in" in text, err


def test_prepare_imagenet_under_torchrun_leaves_no_partial_shard_on_sigterm(tmp_path):
    """torchrun ends its workers with SIGTERM. Training keeps the default action under torchrun (a handler cannot run
    inside a collective); --prepare-imagenet has none, so there it unwinds. Before, the default action ended the
    process at once and left the shard's .npy.tmp and its lock behind."""
    make_image_tree(tmp_path / "train", [2])
    code = f"""if True:
        import os, signal, sys
        sys.path.insert(0, {HERE!r})
        import train
        def encode(vae, loader, path, *args):  # the shard half written, then torchrun's SIGTERM
            open(path, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
        train.load_vae, train.encode_shard = (lambda args, device: None), encode
        sys.exit(train.main(["--prepare-imagenet", {str(tmp_path / "train")!r}, "--data-path",
                             {str(tmp_path / "lat")!r}, "--workers", "0"]))"""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # as torchrun starts each process
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, p.stderr[-2000:])
    assert "stopped by SIGTERM outside the training loop" in p.stderr
    assert not os.path.exists(tmp_path / "lat")  # no shard-*.npy.tmp, no lock, and the folder it made is gone


def test_prepare_imagenet_sees_another_preparation_in_any_folder_name(tmp_path, capsys):
    make_image_tree(tmp_path / "train", [1])
    out = tmp_path / "lat[1]"
    out.mkdir()
    np.save(out / "shard-00000-of-00002.npy", np.zeros((1, 2, 2, 4, 32, 32), np.float16))
    code, _, err = run_main(["--prepare-imagenet", tmp_path / "train", "--data-path", out,
                             "--vae", tmp_path / "no-vae", "--workers", 0], capsys)
    assert_one_line_error(code, err, "another preparation", "shard-00000-of-00002.npy")
