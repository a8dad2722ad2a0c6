"""
Benchmark: the cost of a MeanFlow training step relative to a flow-matching step on the same network.

    python benchmark.py                       # CPU: toy MLP, DiT-S/2, DiT-B/4 (about 10 minutes on 2 cores)
    python benchmark.py --models S/2 --steps 5
    python benchmark.py --models B/2,L/2,XL/2 --batch 32 --bf16     # GPU

For each network: flow matching (r = t everywhere, plain forward, the stock SDPA kernel), then each recipe
(forward + JVP through meanflow.py's explicit layers, backward of the primal). Each runs in a fresh process
so that peak memory is its own: torch.cuda.max_memory_allocated on GPU, the resident-set high-water mark on
CPU (parameters, gradients and optimizer state included in both). Reported: median step time after warm-up,
its ratio to flow matching, peak memory and its ratio, images per second. One JSON line per configuration.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

RECIPES = ["meanflow", "meanflow+cfg", "improved-dtd", "improved-minsnr", "imf"]


def peak_rss_mb():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def run_one(model, kind, batch, steps, bf16, compile_):
    """Time `steps` training steps of one kind ("fm" or a recipe) in this process; return a result dict."""
    import torch

    import meanflow as mf

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    recipe = "meanflow" if kind in ("fm", "meanflow+cfg") else kind
    guidance = dict(omega=1.0, kappa=0.5) if kind == "meanflow+cfg" else {}  # B/2's setting: 2 extra fwd
    method = mf.MeanFlow(recipe, **guidance)
    if model == "mlp":
        net = mf.MLP(dim=2, num_classes=10, **method.net_kwargs)
        x = torch.randn(batch, 2)
    else:
        net = mf.DiT_models[model](input_size=32, in_channels=4, num_classes=1000, **method.net_kwargs)
        x = torch.randn(batch, 4, 32, 32)
    if kind == "fm" and hasattr(net, "set_attention"):
        net.set_attention("sdpa")  # flow matching needs no JVP: the stock fused kernel and its backward
    net, x = net.to(dev), x.to(dev)
    y = torch.randint(0, 10 if model == "mlp" else 1000, (batch,), device=dev)  # class-conditional, like ImageNet
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=(dev == "cuda"))

    def fm_loss():  # r = t everywhere: no JVP, the target is v; same adaptive weight as MeanFlow
        t = method.sample_t_r(batch, dev)[0]
        e = torch.randn_like(x)
        t_ = mf.bcast(t, x)
        u = net((1 - t_) * x + t_ * e, t, t, y)
        return method.adaptive(mf.sq_err(u, e - x)).mean()

    def loss_fn():
        return fm_loss() if kind == "fm" else method.loss(net, x, y, progress=0.5)[0]

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if compile_:
        step = torch.compile(step)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    step()  # warm-up: optimizer state, kernels, compilation
    step()
    sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else peak_rss_mb()
    median = statistics.median(times)
    return dict(model=model, kind=kind, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                threads=torch.get_num_threads(), batch=batch, bf16=bf16, compile=compile_,
                step_s=round(median, 4), img_per_s=round(batch / median, 1), peak_mb=round(peak, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,S/2,B/4", help="comma-separated: mlp and/or keys of DiT_models")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    ap.add_argument("--batch", type=int, default=16, help="batch per step for the DiTs (the MLP uses 256)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after 2 warm-up steps)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)  # internal: child
    args = ap.parse_args()

    if args.one:
        model, kind = args.one
        batch = 256 if model == "mlp" else args.batch
        print(json.dumps(run_one(model, kind, batch, args.steps, args.bf16, args.compile)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big tensors via mmap: RSS tracks live memory
    rows = []
    for model in args.models.split(","):
        base = None
        for kind in ["fm"] + args.recipes.split(","):
            cmd = [sys.executable, __file__, "--one", model, kind, "--batch", str(args.batch), "--steps", str(args.steps)]
            cmd += ["--bf16"] * args.bf16 + ["--compile"] * args.compile
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{model} {kind}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            base = row if kind == "fm" else base
            if base is not None:
                row["time_ratio"] = round(row["step_s"] / base["step_s"], 2)
                row["mem_ratio"] = round(row["peak_mb"] / base["peak_mb"], 2)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)

    print(f"\n{'model':6} {'step':16} {'time (s)':>9} {'x FM':>6} {'peak MB':>9} {'x FM':>6} {'img/s':>8}")
    for r in rows:
        print(f"{r['model']:6} {r['kind']:16} {r['step_s']:9.3f} {r.get('time_ratio', 1):6.2f} "
              f"{r['peak_mb']:9.0f} {r.get('mem_ratio', 1):6.2f} {r['img_per_s']:8.1f}")


if __name__ == "__main__":
    main()
