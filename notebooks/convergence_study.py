"""Convergence study, toy part: exact u error per interval bin and 1-NFE distance against steps, per recipe and seed.

    python notebooks/convergence_study.py --out notebooks/results/study-toy.jsonl --workers 1   # ~13 min, resumable
    python notebooks/convergence_study.py --out /tmp/smoke.jsonl --steps 20 --eval-every 10 --seeds 0 --recipes meanflow improved-dtd

Each (recipe, seed) run trains the toy MLP on fresh samples of toy_data's Gaussian mixture, as train.py trains a
2-D toy (AdamW, betas (0.9, 0.95), EMA, meanflow.TOY_OVERRIDES, progress = step / steps), and evaluates the EMA
weights every --eval-every steps on one fixed evaluation set against the exact fields (v in closed form, u by RK4).
One line of JSON per finished run is appended to --out; runs already there are skipped, so a killed study resumes.
Every process uses one thread (small nets: threads cost more than they give).
"""
import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # meanflow.py, toy_data/
import meanflow as mf  # noqa: E402
import toy_data as td  # noqa: E402

# The ablation rows of the improved-training paper, as overrides of the plain recipe, next to the full recipes.
RECIPES = {
    "meanflow": ("meanflow", {}),
    "improved-dtd": ("improved-dtd", {}),
    "improved-minsnr": ("improved-minsnr", {}),
    "beta only": ("meanflow", dict(beta_k=1.0)),
    "dtd only": ("meanflow", dict(dtd_stages=20)),
    "minsnr only": ("meanflow", dict(minsnr_gamma=5.0)),
    "imf": ("imf", {}),
    "flow matching": ("meanflow", dict(ratio_r_neq_t=0.0)),
}
BINS = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9)]


def eval_set(n=1000, seed=1234):
    """Fixed points with exact targets: v on z_t, t ~ U[0, 1]; u per Delta-t bin; the 1-NFE jump t = 1 -> r = 0."""
    gm, g = td.GaussianMixture.default(), torch.Generator().manual_seed(seed)

    def z_at(t):
        return (1 - t[:, None]) * gm.sample(len(t), g) + t[:, None] * torch.randn(len(t), 2, generator=g)

    t = torch.rand(n, generator=g)
    z = z_at(t)
    sets = {"v": (z, t, t, gm.v(z, t))}
    for lo, hi in BINS:
        dt = lo + (hi - lo) * torch.rand(n, generator=g)
        r = (1 - dt) * torch.rand(n, generator=g)
        z = z_at(r + dt)
        sets[f"u [{lo}, {hi})"] = (z, r + dt, r, gm.u(z, r + dt, r))
    e, ones = torch.randn(n, 2, generator=g), torch.ones(n)
    sets["u 1-NFE jump"] = (e, ones, 0 * ones, gm.u(e, ones, 0 * ones))
    return sets, gm.sample(n, g)


@torch.no_grad()
def evaluate(method, net, sets, data):
    out = {k: mf.sq_err(net(z, t, r), u).mean().item() for k, (z, t, r, u) in sets.items()}
    e = sets["u 1-NFE jump"][0]
    out["energy distance 1-NFE"] = td.energy_distance(method.sample(net, e, steps=1), data)
    out["energy distance 2-NFE"] = td.energy_distance(method.sample(net, e, steps=2), data)
    return out


def run(name, seed, args, sets, data):
    recipe, overrides = RECIPES[name]
    method = mf.MeanFlow(recipe, **{**mf.TOY_OVERRIDES, **overrides})
    torch.manual_seed(seed)
    net = mf.MLP(dim=2, **method.net_kwargs)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gm, gen = td.GaussianMixture.default(), torch.Generator().manual_seed(10_000 + seed)
    curve, t0 = [dict(step=0, **evaluate(method, ema, sets, data))], time.time()
    for step in range(args.steps):
        loss, logs = method.loss(net, gm.sample(args.batch_size, gen), progress=step / args.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # EMA warm-up: early steps are not averaged with the init
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append(dict(step=step + 1, dtd_stage=method.dtd_stage, **evaluate(method, ema, sets, data)))
    return dict(recipe=name, seed=seed, steps=args.steps, lr=args.lr, batch_size=args.batch_size, ema=args.ema,
                seconds=time.time() - t0, curve=curve)


def worker(rank, args, jobs):
    torch.set_num_threads(1)
    sets, data = eval_set()
    for name, seed in jobs[rank :: args.workers]:
        result = run(name, seed, args, sets, data)
        with open(args.out, "a") as f:  # one short line per run: appends from several processes do not interleave
            f.write(json.dumps(result) + "\n")
        print(f"{name} seed {seed}: {result['seconds']:.0f} s, 1-NFE distance "
              f"{result['curve'][-1]['energy distance 1-NFE']:.4f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/study-toy.jsonl")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    args = p.parse_args(argv)
    done = set()
    if os.path.exists(args.out):
        done = {(d["recipe"], d["seed"]) for d in map(json.loads, open(args.out)) if d["steps"] == args.steps}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    jobs = [(r, s) for s in args.seeds for r in args.recipes if (r, s) not in done]
    print(f"{len(jobs)} runs to do, {len(done)} already in {args.out}", flush=True)
    args.workers = max(1, min(args.workers, len(jobs)))
    if args.workers == 1:
        worker(0, args, jobs)
    else:
        mp.spawn(worker, args=(args, jobs), nprocs=args.workers, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
