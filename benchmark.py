"""
Benchmark: the cost of a MeanFlow training step relative to a flow-matching step on the same network.

    python benchmark.py                       # CPU: toy MLP, DiT-S/2, DiT-B/4 (about 40 minutes on a busy 2-core CPU)
    python benchmark.py --models S/2 --recipes meanflow,meanflow@stock --steps 5
    git show 8bdd848:meanflow.py > /tmp/base/meanflow.py   # an older meanflow.py, timed in the same run:
    python benchmark.py --recipes meanflow,meanflow@base --baseline /tmp/base/meanflow.py
    python benchmark.py --models B/2 --batch 32 --bf16              # GPU
    python benchmark.py --models L/2,XL/2 --batch 32 --bf16 --pairwise   # GPU, large networks (see --pairwise)

For each network: flow matching (r = t everywhere, a plain forward with PyTorch's layers, SDPA kernel and autograd
backward; iMF's rows against flow matching on iMF's own network, "fm-imf"), then each recipe. RECIPE@stock runs
the forward-mode pass with PyTorch's own forward-mode rules (math attention) instead of meanflow.py's tangent
rules; RECIPE@base is the meanflow.py given by --baseline. Each kind's peak memory comes from a fresh process:
torch.cuda.max_memory_allocated on GPU, the resident-set high-water mark on CPU (parameters, gradients and
optimizer state included in both; big allocations forced to mmap, so that the high-water mark follows live
memory). On CPU that peak includes the process's start, the interpreter and libraries (~290 MB), which dilutes the
ratio of a small network: "step MB" is the peak above it (on GPU the same as the peak), with its own ratio; it
still holds the library state made on first use (~90 MB beside the toy MLP's few MB of tensors), so on CPU the
DiTs' memory ratios are the numbers. Times come from one process per network (with --pairwise: one per recipe,
beside its flow-matching step), with the default allocator, in which the kinds take turns step by step, so that a
busy machine slows them alike: the median wall-clock time of a step after warm-up, and the median CPU time of the
process (on a shared CPU the steadier measure), each with its ratio to flow matching. Rows appended to an --out
file carry the run's start time (`run`), which tells the runs in one file apart.
"""
import argparse
import ast
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

RECIPES = ["meanflow", "meanflow+cfg", "improved-dtd", "improved-minsnr", "imf"]
# Where a MeanFlow step's time goes (pass them in --recipes): flow matching with the batch in MeanFlow's two calls
# (rows [:n] and [n:], n = 25%), the same plus the forward-mode pass on rows [:n] (its tangent unused), and flow
# matching on both heads of iMF's network (u and the v-head: what training the v-head alone costs).
PARTS = ["fm-split", "fm-split+jvp", "fm-imf+v"]


def rss_mb(field="VmHWM"):  # VmHWM: the resident-set high-water mark; VmRSS: the resident set now
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


@contextlib.contextmanager
def jvp_rules(mf, rules):
    """Run jvp() under other rules (StockRules: PyTorch's own forward-mode AD, math attention in the tangent part)."""
    ours, mf.JVP_RULES = mf.JVP_RULES, rules
    try:
        yield
    finally:
        mf.JVP_RULES = ours


def reference(kind):  # the flow-matching step each kind is compared with: the same network
    return "fm-imf" if "imf" in kind else "fm"


def load_meanflow(variant, baseline):
    """meanflow.py of this folder, or (variant "base") the one at --baseline, e.g. an older commit's."""
    import importlib.util

    import meanflow as mf

    if variant != "base":
        return mf  # (main checks that a RECIPE@base comes with --baseline)
    spec = importlib.util.spec_from_file_location("meanflow_base", baseline)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(model, kind, batch, bf16, compile_, baseline=None):
    """The network, optimizer and one training step of this kind; returns step().

    kind: "fm" (flow matching), "fm-imf" (flow matching on iMF's network), or a recipe, optionally with a
    variant: "meanflow@stock" (PyTorch's own forward-mode AD in the tangent part), "meanflow@base" (the
    meanflow.py given by --baseline, e.g. the whole-batch JVP of an older commit)."""
    import torch

    import meanflow

    name, _, variant = kind.partition("@")
    mf = load_meanflow(variant, baseline)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if model == "mlp" and dev == "cpu":
        torch.set_num_threads(1)  # as train.py: the toy MLP is too small for threads to pay
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    recipe = {"fm": "meanflow", "fm-split": "meanflow", "fm-split+jvp": "meanflow", "meanflow+cfg": "meanflow",
              "fm-imf": "imf", "fm-imf+v": "imf"}.get(name, name)
    guidance = dict(omega=1.0, kappa=0.5) if name == "meanflow+cfg" else {}  # B/2's setting
    method = mf.MeanFlow(recipe, **guidance)
    if model == "mlp":
        net, x = mf.MLP(dim=2, num_classes=10, **method.net_kwargs), torch.randn(batch, 2)
    elif method.imf and model in getattr(mf, "iMF_models", {}):  # iMF trains its own network (train.py --recipe imf)
        net, x = mf.iMF_models[model](input_size=32, in_channels=4, num_classes=1000), torch.randn(batch, 4, 32, 32)
    else:  # the DiT: adaLN for MeanFlow; for iMF at a size iMF_models lacks (S/2), the in-context DiT stands in
        net = mf.DiT_models[model](input_size=32, in_channels=4, num_classes=1000, **method.net_kwargs)
        x = torch.randn(batch, 4, 32, 32)
    fm = name.startswith("fm")
    if fm and hasattr(net, "set_attention"):
        net.set_attention("sdpa")  # flow matching needs no JVP: the stock fused kernel and its backward
    net, x = net.to(dev), x.to(dev)
    y = torch.randint(0, 10 if model == "mlp" else 1000, (batch,), device=dev)  # class-conditional, like ImageNet
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=dev == "cuda")

    n = round(method.ratio_r_neq_t * batch)

    def fm_loss():  # r = t everywhere: no JVP, the target is v; the same adaptive weight as MeanFlow
        t = method.sample_t_r(batch, dev)[0]
        e = torch.randn_like(x)
        t_ = mf.bcast(t, x)
        z, v = (1 - t_) * x + t_ * e, e - x
        if name == "fm-imf+v":  # both heads, each with its own loss, as iMF trains them
            return sum(method.adaptive(mf.sq_err(u, v)) for u in net(z, t, t, y, return_v=True)).mean()
        if name == "fm-split":
            u = torch.cat([net(z[:n], t[:n], t[:n], y[:n]), net(z[n:], t[n:], t[n:], y[n:])])
        elif name == "fm-split+jvp":
            ones = torch.ones_like(t[:n])
            u0 = mf.jvp(lambda z, t, r: net(z, t, r, y[:n]), (z[:n], t[:n], t[:n]), (v[:n], ones, 0 * ones))[0]
            u = torch.cat([u0, net(z[n:], t[n:], t[n:], y[n:])])
        else:
            u = net(z, t, t, y)
        return method.adaptive(mf.sq_err(u, v)).mean()

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = fm_loss() if fm else method.loss(net, x, y, progress=0.5)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    run = torch.compile(step) if compile_ else step
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rules = (lambda: jvp_rules(meanflow, meanflow.StockRules)) if variant == "stock" else contextlib.nullcontext
    if variant == "base" and fm:
        raise ValueError("flow matching is measured with this folder's meanflow.py")

    def timed_step():  # (wall-clock seconds, CPU seconds of this process)
        t0, c0 = time.perf_counter(), time.process_time()
        with rules():
            run()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    return timed_step, dev


def measure(model, kinds, batch, steps, bf16, compile_, baseline):
    """Median step time of each kind, wall clock and CPU time of the process; the kinds take turns, so that a
    busy machine slows them alike."""
    steps_of = {k: build(model, k, batch, bf16, compile_, baseline)[0] for k in kinds}
    for k in kinds:  # warm-up: optimizer state, kernels
        steps_of[k](), steps_of[k]()
    times = {k: [] for k in kinds}
    for _ in range(steps):
        for k in kinds:
            times[k].append(steps_of[k]())
    return {k: [statistics.median(c) for c in zip(*v)] for k, v in times.items()}


def peak_memory(model, kind, batch, bf16, compile_, baseline):
    """Peak memory of a steady-state step in this (fresh) process, and what it held before the network was built,
    in MB. On CPU the process's resident set, whose start (the interpreter and libraries, ~290 MB) the step adds
    to; on GPU the tensors alone (the start is ~0)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    start = torch.cuda.memory_allocated() / 2**20 if dev == "cuda" else rss_mb("VmRSS")
    step, dev = build(model, kind, batch, bf16, compile_, baseline)
    step(), step()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset the resident-set high-water mark
    step()
    return (torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else rss_mb()), start


def child(args, *cmd):
    env = dict(os.environ)
    if "--child-memory" in cmd:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # big tensors via mmap: RSS tracks live memory (slow to time)
    flags = ["--batch", str(args.batch), "--steps", str(args.steps)]
    flags += ["--bf16"] * args.bf16 + ["--compile"] * args.compile
    flags += ["--baseline", args.baseline] if args.baseline else []
    out = subprocess.run([sys.executable, __file__, *cmd, *flags], env=env, capture_output=True, text=True)
    if out.returncode != 0:  # one line: the measuring process's last error line
        last = ([s for s in out.stderr.splitlines() if s.strip()] or ["no message"])[-1]
        raise SystemExit(f"benchmark.py: error: measuring {cmd[1]} ({cmd[2]}) failed: {last.strip()}"
                         + (f"; the rows before it are in {args.out}" if args.out else ""))
    return json.loads(out.stdout.strip().splitlines()[-1])


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as train.py (argparse prints its whole usage first)
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def check_args(ap, args):
    """Bad flags stop here with one line (exit 2), before any process starts."""
    import meanflow as mf

    models, kinds = args.models.split(","), args.recipes.split(",")
    for m in models:
        if m != "mlp" and m not in mf.DiT_models:
            ap.error(f"unknown model {m!r} in --models; choose mlp or one of {', '.join(mf.DiT_models)}")
    for k in kinds:
        name, _, variant = k.partition("@")
        if name not in RECIPES + PARTS or variant not in ("", "stock", "base"):
            ap.error(f"unknown kind {k!r} in --recipes; choose from {', '.join(RECIPES + PARTS)}, each optionally "
                     "with @stock or @base")
        if name.startswith("fm") and variant == "base":
            ap.error(f"--recipes {k}: flow matching and its parts are measured with this folder's meanflow.py only; "
                     "leave out @base")
    if any(k.endswith("@base") for k in kinds) and not args.baseline:
        ap.error("a kind RECIPE@base needs --baseline PATH/meanflow.py")
    if args.baseline and not os.path.isfile(args.baseline):
        ap.error(f"--baseline {args.baseline}: no such file; pass a meanflow.py "
                 "(e.g. from git show COMMIT:meanflow.py)")
    if args.baseline:
        try:
            with open(args.baseline) as f:
                tree = ast.parse(f.read(), args.baseline)
        except (SyntaxError, ValueError, UnicodeDecodeError) as err:
            ap.error(f"--baseline {args.baseline} is not Python ({type(err).__name__}); pass a meanflow.py")
        defined = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        defined |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        needed = {"MeanFlow"} | {"MLP" if m == "mlp" else "DiT_models" for m in models}  # what build() takes from it
        if needed - defined:
            ap.error(f"--baseline {args.baseline} defines no {' or '.join(sorted(needed - defined))}: not a "
                     "meanflow.py; pass one (e.g. from git show COMMIT:meanflow.py)")
    if args.batch < 1 or args.steps < 1:
        ap.error(f"--batch and --steps must be at least 1 (got {args.batch}, {args.steps})")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.error(f"--out {args.out}: its folder does not exist; create it or pass another path")
    if args.out and os.path.isdir(args.out):
        ap.error(f"--out {args.out} is a folder; pass a file to append the JSON lines to")
    if args.out and os.path.isfile(args.out):  # appending to earlier benchmark rows is fine, to anything else not
        with open(args.out, errors="replace") as f:
            for i, line in enumerate(f, 1):
                try:
                    ok = {"model", "kind"} <= json.loads(line).keys()
                except (ValueError, AttributeError):
                    ok = False
                if not ok:
                    ap.error(f"--out {args.out}: line {i} is not a row of benchmark.py; pass another file")


def main():
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,S/2,B/4", help="comma-separated: mlp and/or keys of DiT_models")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES)
                    + "; the parts of a step: " + ", ".join(PARTS)
                    + "; a suffix @stock times PyTorch's own forward-mode AD in the tangent part, @base the --baseline")
    ap.add_argument("--baseline", default=None, help="another meanflow.py, timed as RECIPE@base in the same run "
                    "(e.g. git show 8bdd848:meanflow.py > /tmp/base/meanflow.py: the whole-batch JVP)")
    ap.add_argument("--batch", type=int, default=16, help="batch per step for the DiTs (the MLP uses 256)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after 2 warm-up steps)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step")
    ap.add_argument("--pairwise", action="store_true", help="time each recipe in its own process, taking turns with "
                    "flow matching (two networks in memory instead of all seven kinds': for big models; XL/2's "
                    "weights, gradients and AdamW state alone are 10 GiB a kind, 72 GiB for all)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "KINDS"), help=argparse.SUPPRESS)  # internal
    ap.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:  # a fresh process: either the memory of one kind, or the times of all kinds of a model
        import torch

        model, kinds = args.child[0], args.child[1].split(",")
        batch = 256 if model == "mlp" else args.batch
        if args.child_memory:
            peak, start = peak_memory(model, kinds[0], batch, args.bf16, args.compile, args.baseline)
            result = dict(peak_mb=peak, start_mb=start)
        else:
            result = dict(times=measure(model, kinds, batch, args.steps, args.bf16, args.compile, args.baseline),
                          device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          threads=torch.get_num_threads(), batch=batch)
        print(json.dumps(result))
        return

    check_args(ap, args)
    try:
        rows = measure_all(args)
    except KeyboardInterrupt:  # Ctrl-C reaches the measuring process too; its traceback stays in its captured stderr
        print("benchmark.py: stopped" + (f"; the rows measured so far are in {args.out}" if args.out else ""),
              file=sys.stderr)
        sys.exit(130)
    print(f"\n{'model':6} {'step':18} {'wall (s)':>9} {'x FM':>6} {'CPU (s)':>9} {'x FM':>6} {'peak MB':>9} {'x FM':>6}"
          f" {'step MB':>9} {'x FM':>6}")
    for r in rows:
        print(f"{r['model']:6} {r['kind']:18} {r['step_s']:9.3f} {r['time_ratio']:6.2f} {r['cpu_s']:9.3f} "
              f"{r['cpu_ratio']:6.2f} {r['peak_mb']:9.0f} {r['mem_ratio']:6.2f} {r['step_mb']:9.0f} "
              f"{r['step_mem_ratio']:6.2f}")


def measure_all(args):
    """Every row: for each model, the times of its kinds (one process, or one per pair) and each kind's memory (one
    process each); printed and appended to --out as they come."""
    rows, base, started = [], {}, time.strftime("%Y-%m-%dT%H:%M:%S")  # `run` tells the runs in one --out apart
    for model in args.models.split(","):
        recipes = args.recipes.split(",")
        kinds = list(dict.fromkeys(["fm"] + ["fm-imf"] * any("imf" in k for k in recipes) + recipes))
        if args.pairwise:  # each recipe in its own process with its flow-matching step: two networks in memory
            timing = dict(times={})
            for kind in kinds:  # the references come first: each row's own time is its pair's
                pair = child(args, "--child", model, ",".join(dict.fromkeys([reference(kind), kind])))
                timing.update({k: v for k, v in pair.items() if k != "times"})
                timing["times"][kind] = pair["times"][kind]
                timing.setdefault("ref_of", {})[kind] = pair["times"][reference(kind)]
        else:
            timing = child(args, "--child", model, ",".join(kinds))
            timing["ref_of"] = {kind: timing["times"][reference(kind)] for kind in kinds}
        for kind in kinds:
            memory = child(args, "--child", model, kind, "--child-memory")
            peak, start = memory["peak_mb"], memory["start_mb"]
            step_s, cpu_s = timing["times"][kind]
            row = dict(run=started, model=model, kind=kind, device=timing["device"], threads=timing["threads"],
                       batch=timing["batch"], bf16=args.bf16, compile=args.compile, step_s=round(step_s, 4),
                       cpu_s=round(cpu_s, 4), img_per_s=round(timing["batch"] / step_s, 1), peak_mb=round(peak, 1),
                       step_mb=round(peak - start, 1))
            if kind.startswith("fm"):
                base[kind] = row
            fm_wall, fm_cpu = timing["ref_of"][kind]  # --pairwise: the flow-matching step timed in the same process
            row["time_ratio"], row["cpu_ratio"] = round(step_s / fm_wall, 2), round(cpu_s / fm_cpu, 2)
            row["mem_ratio"] = round(row["peak_mb"] / base[reference(kind)]["peak_mb"], 2)
            row["step_mem_ratio"] = round(row["step_mb"] / base[reference(kind)]["step_mb"], 2)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
