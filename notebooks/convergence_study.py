"""Convergence study: quality against training steps, per recipe and seed, on the 2-D toy and on Fashion-MNIST.

    python notebooks/convergence_study.py --out notebooks/results/study-toy.jsonl --workers 1   # ~13 min, resumable
    python notebooks/convergence_study.py --part images --out notebooks/results/study-images.jsonl --workers 2
    python notebooks/convergence_study.py --out /tmp/smoke.jsonl --steps 20 --eval-every 10 --seeds 0 --recipes meanflow improved-dtd

toy: each (recipe, seed) run trains the toy MLP on fresh samples of toy_data's Gaussian mixture, as train.py trains a
2-D toy (AdamW, betas (0.9, 0.95), meanflow.TOY_OVERRIDES, progress = step / steps; the EMA with a warm-up that
train.py does not have), and evaluates the EMA weights every --eval-every steps on one fixed evaluation set against
the exact fields (v in closed form, u by RK4).
images: each run trains a small class-conditional DiT (patch 8, depth 4, hidden 128: 16 tokens, ~1.3M parameters) on
Fashion-MNIST's training split (60,000 images padded to 32 x 32), batch 64, and scores 1-NFE and 2-NFE samples of the
EMA weights (100 per class, one fixed set of noises) with a small CNN classifier trained once on the same training
split: class accuracy and Frechet distance on its 64-d features to the test split; 1000 real test images scored the
same way are the floor. The classifier is kept beside the results (<out>.classifier.pt): a resumed study scores with
the same one on any machine. The test split (t10k-*) comes from Debian's copy or data/fashion-mnist, downloaded there
(md5-checked) when neither holds it; with --data-path, that folder must hold all four official files.
One line of JSON per finished run is appended to --out; runs already there are skipped, so a killed study resumes
(the same command). Ctrl-C ends every worker, with one line.
Every process uses one thread (small nets: threads cost more than they give).
"""
import argparse
import copy
import json
import logging
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # meanflow.py, toy_data/
import meanflow as mf  # noqa: E402
import toy_data as td  # noqa: E402
import train  # noqa: E402  (Fashion-MNIST files, EMA update, Frechet distance: the ones train.py uses)

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
    # the DTD deadline [ours]: the full range of t unlocked by 10% or by 50% of the run instead of 25%
    "improved-dtd, share 0.1": ("improved-dtd", dict(dtd_share=0.1)),
    "improved-dtd, share 0.5": ("improved-dtd", dict(dtd_share=0.5)),
}
TOY_RECIPES = [name for name in RECIPES if "share" not in name]  # the share variants: on request (--recipes)
IMAGE_RECIPES = ["meanflow", "improved-dtd", "improved-minsnr", "beta only", "dtd only", "minsnr only"]
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


def fit(method, net, args, seed, batch, evaluate, log_losses=False):
    """Train net from its initialisation as train.py trains (AdamW, betas (0.9, 0.95), lr with args.warmup steps of
    warm-up), except the EMA, which here has a warm-up (decay min(ema, (1 + step) / (10 + step)): the init is not
    averaged in; train.py's is constant), on batch(generator) -> (x,) or (x, y); evaluate(ema)
    every args.eval_every steps. Returns the curve (log_losses: with the mean v- and u-loss since the last point)
    and the seconds it took."""
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve, t0, logs = [dict(step=0, **evaluate(ema))], time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = train.get_lr(step, args)
        loss, log = method.loss(net, *batch(gen), progress=step / args.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train.update_ema(ema, net, min(args.ema, (1 + step) / (10 + step)))
        logs.append(torch.stack([log["v_loss"], log["u_loss"]]).detach())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            point = dict(step=step + 1, dtd_stage=method.dtd_stage)
            if log_losses:
                point["v_loss"], point["u_loss"] = torch.stack(logs).double().mean(0).tolist()
            curve.append({**point, **evaluate(ema)})
            logs = []
    return curve, time.time() - t0


def run(name, seed, args, sets, data):
    recipe, overrides = RECIPES[name]
    method = mf.MeanFlow(recipe, **{**mf.TOY_OVERRIDES, **overrides})
    torch.manual_seed(seed)
    net = mf.MLP(dim=2, **method.net_kwargs)
    gm = td.GaussianMixture.default()
    curve, seconds = fit(method, net, args, seed, lambda g: (gm.sample(args.batch_size, g),),
                         lambda ema: evaluate(method, ema, sets, data))
    return dict(recipe=name, seed=seed, steps=args.steps, lr=args.lr, batch_size=args.batch_size, ema=args.ema,
                eval_every=args.eval_every, seconds=seconds, curve=curve)


# --- images: Fashion-MNIST, a small DiT, scored by a classifier trained on the real training split ---
NET = dict(patch_size=8, depth=4, hidden_size=128, num_heads=4)
N_PER_CLASS, K = 100, 10


def fashion_mnist(path=None):
    """(train x, train y), (test x, test y): uint8 (N, 1, 32, 32) and int labels, from path (the four official files),
    or by default Debian's copy, else data/fashion-mnist (the official files are downloaded there once, as train.py
    does for the training split, md5-checked)."""
    default = train.DATA_PATHS["fashion-mnist"]
    folders = [path] if path else [train.FASHION_DEBIAN, default]
    test_files = lambda folder: [os.path.join(folder, name) for name in train.FASHION_TEST_MD5]  # images, labels
    try:  # a failed download or a bad file: one line, as train.py
        x, y = train.load_fashion_mnist(path or default)
        folder = next((f for f in folders if all(map(os.path.exists, test_files(f)))), None)
        if folder is None and not path:
            print(f"downloading Fashion-MNIST's test split ({train.FASHION_URLS[0]}) into {default}", flush=True)
            train.download_fashion_mnist(default, train.FASHION_TEST_MD5)
            folder = default
        if folder is not None:
            tx, ty = map(train.read_idx, test_files(folder))
            return (x, y), (np.pad(tx, ((0, 0), (2, 2), (2, 2)))[:, None], ty)
    except train.Fail as err:
        raise SystemExit(f"convergence_study.py: error: {err}")
    raise SystemExit("no Fashion-MNIST test split (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in "
                     f"{path}: apt-get install dataset-fashion-mnist, or put the official files there")


def cnn():  # the scoring classifier's layers; its penultimate 64-d layer are the features
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 64), torch.nn.ReLU(), torch.nn.Linear(64, K))


def classifier(data, steps=1500):
    """A small CNN trained once (seed 0, one thread) on the training split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        clf = cnn()
        opt, g = torch.optim.Adam(clf.parameters(), lr=2e-3), torch.Generator().manual_seed(0)
        for _ in range(steps):
            x, y = data.get(torch.randint(len(data), (128,), generator=g), g)
            loss = torch.nn.functional.cross_entropy(clf(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return clf.eval().requires_grad_(False)


class ImageScores:
    """Scores of a (K * N_PER_CLASS, 1, 32, 32) sample set in class blocks: class accuracy, Frechet distance of the
    classifier's features to the test split's. The real images, 100 test images per class, are scored as a sample
    set: the floor a perfect generator reaches with this many samples. The reference is the other 9000 test images."""

    def __init__(self, clf, test):
        self.features, self.head = clf[:-1], clf[-1]
        idx = [torch.nonzero(test.labels == k)[:, 0] for k in range(K)]
        real = torch.cat([i[:N_PER_CLASS] for i in idx])
        ref = torch.cat([i[N_PER_CLASS:] for i in idx])
        with torch.no_grad():
            self.ref = self.features(test.get(ref, None)[0]).double().numpy()
            x, y = test.get(torch.arange(len(test)), None)
            self.test_accuracy = (self.head(self.features(x)).argmax(1) == y).float().mean().item()
        self.floor = self(test.get(real, None)[0])

    @torch.no_grad()
    def __call__(self, x):
        f = self.features(x.clamp(-1, 1))
        y = torch.arange(K).repeat_interleave(len(x) // K)
        return dict(acc=(self.head(f).argmax(1) == y).float().mean().item(),
                    fd=train.frechet_distance(f.double().numpy(), self.ref))


def image_eval_set(path=None):
    """The training split and the fixed noises (with their class labels) every run samples from."""
    (x, y), _ = fashion_mnist(path)
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(K * N_PER_CLASS, 1, 32, 32, generator=g), torch.arange(K).repeat_interleave(N_PER_CLASS)
    return train.Pixels(x, y, flip=False), noise


def scoring_classifier(p, args, runs):
    """The image study's scorer, trained once per study and kept beside its results (<out>.classifier.pt): a resumed
    study scores with the same classifier on any machine. The same code trains other weights on a machine whose
    floating-point kernels differ (README, "Rerunning the study on another machine": final FDs 5-8% apart), and
    scores from two classifiers do not compare: runs already in --out must have been scored by this one (their floor
    and test accuracy, to rounding), else one line and nothing written. Returns its ImageScores, which the workers
    share."""
    path = args.out + ".classifier.pt"
    (x, y), (tx, ty) = fashion_mnist(args.data_path)
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
            clf = cnn()
            clf.load_state_dict(saved["state"])
            steps = saved["classifier_steps"]
        except Exception as err:  # any unreadable or foreign file: the same one line
            p.error(f"{path} is not this study's scoring classifier ({type(err).__name__}); pass another --out")
        if steps != args.classifier_steps:
            p.error(f"{path} was trained for {steps} steps, not --classifier-steps {args.classifier_steps}; "
                    f"pass --classifier-steps {steps} to resume that study, or another --out")
        clf.eval().requires_grad_(False)
    else:
        clf = classifier(train.Pixels(x, y, flip=False), args.classifier_steps)
    scores = ImageScores(clf, train.Pixels(tx, ty, flip=False))
    for d in runs:
        theirs = (d.get("classifier_test_accuracy"), (d.get("floor") or {}).get("fd"))
        same = all(isinstance(a, float) and math.isclose(a, b, rel_tol=1e-6)
                   for a, b in zip(theirs, (scores.test_accuracy, scores.floor["fd"])))
        if not same:
            show = lambda a, f: ", ".join(f"{v:.4f}" if isinstance(v, float) else "none" for v in (a, f))
            p.error(f"--out {args.out}: its runs were scored by another classifier (test accuracy, floor FD: "
                    f"{show(*theirs)}; here {show(scores.test_accuracy, scores.floor['fd'])}: the same code trains "
                    f"other weights where the floating-point kernels differ); resume where the study began, with its "
                    f"{os.path.basename(path)}, or pass another --out")
    if not os.path.exists(path):
        try:
            train.save_atomic(path, lambda f: torch.save(dict(state=clf.state_dict(),
                                                              classifier_steps=args.classifier_steps), f), new=True)
        except (train.Fail, FileExistsError) as err:
            p.error(f"{path}: {err}")
    return scores


@torch.no_grad()
def evaluate_images(method, net, scores, noise):
    e, y = noise
    return {f"{k} {n}-NFE": v for n in (1, 2) for k, v in scores(method.sample(net, e, y, steps=n)).items()}


def run_images(name, seed, args, data, scores, noise):
    recipe, overrides = RECIPES[name]
    method = mf.MeanFlow(recipe, **overrides)
    torch.manual_seed(seed)
    net = mf.DiT(input_size=32, in_channels=1, num_classes=K, **NET, **method.net_kwargs)
    batch = lambda g: data.get(torch.randint(len(data), (args.batch_size,), generator=g), g)
    curve, seconds = fit(method, net, args, seed, batch, lambda ema: evaluate_images(method, ema, scores, noise),
                         log_losses=True)
    return dict(recipe=name, seed=seed, steps=args.steps, lr=args.lr, batch_size=args.batch_size, ema=args.ema,
                eval_every=args.eval_every, classifier_steps=args.classifier_steps, net=NET, seconds=seconds,
                floor=scores.floor, classifier_test_accuracy=scores.test_accuracy, curve=curve)


def worker(rank, args, jobs):
    """Runs jobs rank, rank + workers, ...; out of memory ends it in one line."""
    try:
        do_jobs(rank, args, jobs)
    except (RuntimeError, MemoryError) as err:
        if not train.out_of_memory(err):
            raise
        print(f"convergence_study.py: error: out of memory ({type(err).__name__}); pass a smaller --batch-size or "
              "fewer --workers", file=sys.stderr)
        sys.exit(2)


def do_jobs(rank, args, jobs):
    torch.set_num_threads(1)
    if args.part == "toy":
        sets, data = eval_set()
        run_one = lambda name, seed: run(name, seed, args, sets, data)
    else:
        data, noise = image_eval_set(args.data_path)
        run_one = lambda name, seed: run_images(name, seed, args, data, args.scores, noise)
    for name, seed in jobs[rank :: args.workers]:
        result = run_one(name, seed)
        # One line per run (~12 KB toy, ~5 KB images) in one unbuffered write to a file opened for appending
        # (O_APPEND): the workers' lines do not interleave. A short write (a file-size limit, a full disk) is
        # continued, or fails with the OS's error; a kill inside it leaves a cut-off last line, which the next
        # start drops (finished_runs), running that one run again.
        line = (json.dumps(result) + "\n").encode()
        with open(args.out, "ab", buffering=0) as f:
            while line:
                line = line[f.write(line):]
        last = result["curve"][-1]
        score = last.get("energy distance 1-NFE", last.get("fd 1-NFE"))
        print(f"{name} seed {seed}: {result['seconds']:.0f} s, final 1-NFE score {score:.4f}", flush=True)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as train.py (argparse prints its whole usage first)
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def check_numbers(p, args):  # one error line (exit 2) for a number no run can use
    if not all(0 <= s < 2**32 for s in args.seeds):  # train.py's range too: numpy takes seeds below 2**32
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: each must be in [0, 2**32)")
    for flag, ok in [("steps", args.steps >= 1), ("eval_every", args.eval_every >= 1), ("workers", args.workers >= 1),
                     ("batch_size", args.batch_size >= 1), ("classifier_steps", args.classifier_steps >= 1),
                     ("lr", 0 < args.lr < float("inf")), ("ema", 0 <= args.ema < 1)]:
        if not ok:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be "
                    + ("in [0, 1)" if flag == "ema" else "a positive number" if flag == "lr" else "at least 1"))


def finished_runs(p, args):
    """The runs already in args.out by (recipe, seed), which must all be this study's at these settings: a run made at
    another lr, length, evaluation grid or scoring classifier would otherwise count as done, and the notebooks would
    mix them. A last line without its newline is a run killed while it was written: dropped here (it runs again)."""
    done = {}  # (recipe, seed) -> the run
    if os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder; pass a file (e.g. {os.path.join(args.out, 'study.jsonl')})")
    parent = os.path.dirname(args.out)
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        p.error(f"--out {args.out}: {parent} is a file, not a folder; pass another --out")
    if not os.path.exists(args.out):
        return done
    settings = dict(part=args.part, steps=args.steps, lr=args.lr, batch_size=args.batch_size, ema=args.ema,
                    eval_every=args.eval_every)
    if args.part == "images":
        settings["classifier_steps"] = args.classifier_steps
    with open(args.out, "rb") as f:
        raw = f.read()
    whole = raw.rfind(b"\n") + 1  # bytes up to the last newline; the rest is a cut-off line, if any
    for i, line in enumerate(raw[:whole].decode(errors="replace").splitlines(), 1):
        try:
            d = json.loads(line)
            theirs = dict(part="images" if "floor" in d else "toy", **{k: d.get(k) for k in list(settings)[1:]})
            run = (d["recipe"], d["seed"])
        except (ValueError, KeyError, TypeError):
            p.error(f"--out {args.out}: line {i} is not a run of this study at these settings; pass another --out")
        if theirs != settings:
            p.error(f"--out {args.out} holds runs with other settings ({theirs}, here {settings}); "
                    "pass another --out, or the settings it was made with to resume it")
        done[run] = d
    if whole < len(raw):  # every whole line is this study's: the cut-off one goes
        print(f"{args.out}: dropping its cut-off last line (a run stopped while writing it; it runs again)", flush=True)
        with open(args.out, "r+b") as f:
            f.truncate(whole)
    return done


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["toy", "images"], default="toy")
    p.add_argument("--out", help="default runs/study-<part>.jsonl")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES),
                   help=f"default: {TOY_RECIPES} (toy), {IMAGE_RECIPES} (images)")
    p.add_argument("--seeds", nargs="+", type=int, help="default 0-4 (toy), 0-2 (images)")
    p.add_argument("--steps", type=int, help="default 3000 (toy), 2000 (images)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, help="default 256 (toy), 64 (images)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, help="default 0.995 (toy), 0.99 (images)")
    p.add_argument("--classifier-steps", type=int, default=1500, help="images: training steps of the scoring CNN")
    p.add_argument("--data-path", help="images: a folder with the four official Fashion-MNIST files (default: Debian's "
                   "copy, else data/fashion-mnist)")
    p.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    args = p.parse_args(argv)
    toy = args.part == "toy"
    if args.out == "":
        p.error("--out is empty; pass a file, or leave --out out for runs/study-<part>.jsonl")
    if toy and args.data_path is not None:
        p.error("--data-path is read by --part images only (the toy draws its data); leave it out")
    args.out = args.out or f"runs/study-{args.part}.jsonl"
    args.recipes = list(dict.fromkeys(args.recipes or (TOY_RECIPES if toy else IMAGE_RECIPES)))  # each once
    args.seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else [0, 1, 2, 3, 4] if toy else [0, 1, 2]))
    args.steps = args.steps if args.steps is not None else 3000 if toy else 2000
    args.batch_size = args.batch_size if args.batch_size is not None else 256 if toy else 64
    args.ema = args.ema if args.ema is not None else 0.995 if toy else 0.99
    args.warmup = 0 if toy else 50  # lr warm-up steps (train.get_lr): the toy as train.py's, none
    check_numbers(p, args)
    done = finished_runs(p, args)
    try:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    except OSError as err:  # e.g. a file on the way to it
        p.error(f"--out {args.out}: cannot make its folder ({err.strerror}); pass another --out")
    jobs = [(r, s) for s in args.seeds for r in args.recipes if (r, s) not in done]
    jobs.sort(key=lambda j: (args.recipes.index(j[0]) >= 3, j[1]))  # the first three recipes' seeds first
    print(f"{len(jobs)} runs to do, {len(done)} already in {args.out}", flush=True)
    if not jobs:
        return 0
    args.workers = max(1, min(args.workers, len(jobs)))
    workers = None
    try:
        if not toy:  # the scorer, once (missing or bad data: one line here, not a traceback per worker)
            args.scores = scoring_classifier(p, args, list(done.values()))
        if args.workers == 1:
            worker(0, args, jobs)
        else:
            # A terminal's Ctrl-C reaches every process: the workers start with SIGINT ignored (inherited from here,
            # and kept by Python), and this process ends them.
            logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                workers = mp.spawn(worker, args=(args, jobs), nprocs=args.workers, join=False)
            finally:
                signal.signal(signal.SIGINT, handler)
            while not workers.join():
                pass
    except KeyboardInterrupt:
        for proc in workers.processes if workers else []:
            proc.terminate()  # a run cut off while writing its line: the next start drops the line and runs it again
        print(f"convergence_study.py: stopped; the finished runs are in {args.out}; the same command runs the rest",
              file=sys.stderr)
        return 130
    except mp.ProcessExitedException as err:  # a worker said why (out of memory) and exited, or was killed; join()
        #                                         has ended the others (its notice of that is muted above)
        if err.exit_code and err.exit_code > 0:
            return err.exit_code
        print(f"convergence_study.py: error: {err}; the finished runs are in {args.out}", file=sys.stderr)  # a signal
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
