"""Train a MeanFlow one-step generator: one script from a 2-D toy on a laptop to ImageNet latents on many GPUs.

  python train.py                                                # 2-D checkerboard, MLP, CPU, about a minute
  python train.py --data moons --recipe improved-minsnr          # any toy_data set, any recipe
  python train.py --data fashion-mnist --model Ti/4 --recipe improved-minsnr --batch-size 32 --lr 1e-3 \\
      --ema 0.99 --steps 600 --eval-every 200                    # 2 CPU cores: about 4 min, garments recognisable
  torchrun --nproc_per_node=8 train.py --data cifar10 --model B/2          # downloads CIFAR-10 into data/cifar10;
                                                 # its own recipe (DATA_RECIPES): unconditional, py-meanflow's knobs
  torchrun --nproc_per_node=8 train.py --prepare-imagenet /data/imagenet/train --data-path data/imagenet-latents
  torchrun --nproc_per_node=8 train.py --data imagenet-latents --model XL/2 --recipe improved-dtd
  torchrun --nproc_per_node=8 train.py --data imagenet-latents --model XL/2 --sample 50000   # ADM-format .npz
  torchrun --nproc_per_node=8 train.py --data imagenet-latents --model B/2 --recipe imf   # the iMF network, 640 epochs
  torchrun --nproc_per_node=8 train.py --data imagenet-latents --model B/2 --recipe imf --sample 50000
                                                       # iMF's sampling guidance per size: B/2 omega 8 on [0.4, 0.65]
The same command with --resume continues from <out>/ckpt.pt (on CPU bitwise as if never stopped); Ctrl-C or
SIGTERM ends the step, writes the checkpoint and prints that command. --overwrite starts over in a used --out.

Output in --out: log.jsonl (a line per --log-every steps), step-XXXXXXX.png (1-NFE and 2-NFE samples of the EMA
model; beside the data and the loss curves for 2-D toys, with loss.png for images), ckpt.pt (written atomically).
Defaults marked (paper) are the MeanFlow paper's ImageNet settings; (toy) marks the 2-D toys' own.
Bad input ends with one line on stderr (under torchrun, one per process), exit code 2, and no half-written file.
"""

import argparse
import copy
import datetime
import fcntl
import functools
import glob
import gzip
import hashlib
import http.client
import inspect
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
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import warnings
import zipfile
import zlib
from contextlib import nullcontext, suppress
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import meanflow as mf
import toy_data

IMAGE_DATA = {"fashion-mnist": (1, 32, 10), "cifar10": (3, 32, 10), "imagenet-latents": (4, 32, 1000)}  # C, H, K
DATA_PATHS = {"fashion-mnist": "data/fashion-mnist",  # Debian's copy when installed, else downloaded here
              "cifar10": "data/cifar10", "imagenet-latents": "data/imagenet-latents"}
FASHION_DEBIAN = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist (Debian, Ubuntu)
# The official training split as Zalando's repository (zalandoresearch/fashion-mnist) links it, with its md5s.
FASHION_URLS = ("https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
FASHION_MD5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
               "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe"}
FASHION_TEST_MD5 = {"t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",  # the test split: only the
                    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}  # convergence study reads it
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]  # the training split, 10,000 images each
CIFAR_URL, CIFAR_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
LATENT_SCALE = 0.18215  # SD-VAE latents times this have about unit variance (as DiT, MeanFlow)
VAE_BATCH = 16  # images the SD-VAE decodes at once (pictures, --sample)
# iMF (official utils/vae_util.py) standardises each latent channel with its own ImageNet statistics instead: with
# 0.18215 its inputs would have channel std 0.72-0.97 and means up to 0.16, not the scale its recipe was tuned on.
IMF_LATENT_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
IMF_LATENT_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)
PAPER = dict(recipe="improved-dtd", batch_size=256, lr=1e-4, ema=0.9999, log_every=100, eval_every=10_000,
             ckpt_every=10_000, epochs=240, warmup_epochs=0)
# 2-D toys: under a minute on a CPU core, plain MeanFlow with meanflow.TOY_OVERRIDES and the raw-input MLP. Twice the
# steps buys little (checkerboard, seed 0: 1-NFE on the squares 84.5% at 3000 steps, 86.0% at 6000, and a v-loss
# spike on the way; README "The 2-D regime").
TOY = dict(recipe="meanflow", batch_size=256, lr=2e-3, ema=0.995, log_every=100, steps=3000,
           warmup_epochs=0)  # eval, save at the end
LOG_KEYS = ("loss", "v_loss", "u_loss", "beta", "dtd_stage")
# Each image dataset's own recipe where it differs from ImageNet's. CIFAR-10 with py-meanflow's method knobs
# (MeanFlow's CIFAR-10 result, 1-NFE FID 2.92, scripts/cifar10_v0.sh): unconditional, logit-normal(-2, 2), adaptive
# weight p = 0.75, c = 1e-3, 75% of the rows r != t, dropout 0.2, lr 6e-4, batch 1024. Not copied (README:
# "CIFAR-10"): their U-Net (our DiT stands in), EDM's augmentation, 16,000 epochs with 200 warm-up, Adam (0.9, 0.999).
DATA_RECIPES = {"cifar10": dict(recipe="meanflow", class_cond=False, dropout=0.2, lr=6e-4, batch_size=1024,
                                knobs=dict(P_mean=-2.0, P_std=2.0, p=0.75, c=1e-3, ratio_r_neq_t=0.75))}
# iMF's own training budget (official configs/train_config.yml, which configures B/2 only; train.py uses it for every
# size), with its 10 warm-up epochs (12,512 steps on ImageNet at batch 1024; --warmup STEPS overrides them).
IMF_TRAINING = dict(batch_size=1024, epochs=640, warmup_epochs=10)
# iMF's sample pictures for sizes without an entry in meanflow.imf_guidance: the official training config's setting.
IMF_PICTURE_GUIDANCE = dict(omega=7.5, t_min=0.4, t_max=0.65)


class Fail(Exception):
    """A problem the user can fix (bad input, diverged run): main prints it as one line and exits with 2."""


class Stopped(Exception):
    """SIGINT or SIGTERM while training: every process stopped at the same step and process 0 wrote the checkpoint;
    main prints how to resume."""


# Every numeric argument, checked before any work: what it must be (float ones must also be finite). A new
# numeric argument gets its line here (a test checks that none is missing).
COUNT = (lambda v: 1 <= v < 2**31, "1 or more, below 2^31")  # (larger ones overflow torch's int64 indices)
NONNEG, POSITIVE = (lambda v: v >= 0, "0 or more"), (lambda v: v > 0, "> 0")
UNIT, FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: 0 <= v < 1, "in [0, 1)")
NUMBERS = dict(
    steps=COUNT, batch_size=COUNT, lr=POSITIVE, warmup=NONNEG, weight_decay=NONNEG, ema=FRACTION, seed=NONNEG,
    omega=POSITIVE, kappa=FRACTION, t_lo=UNIT, t_hi=UNIT,  # guidance in the target
    log_every=COUNT, eval_every=COUNT, ckpt_every=COUNT, stop_at=COUNT,
    sample=COUNT, sample_steps=COUNT, sample_omega=(lambda v: v >= 1, "1 or more (1: no guidance)"),
    sample_interval=UNIT, dropout=FRACTION,
    shard=NONNEG, num_shards=COUNT, workers=NONNEG)  # --prepare-imagenet


class Parser(argparse.ArgumentParser):
    argv = ()  # the arguments being parsed (get_args sets them): to tell a negative number from a missing value

    def error(self, message):  # argparse prints its whole usage first: here the one line of every other error
        flag = re.match(r"argument (--[\w-]+).*: expected one argument", message)  # a number flag given "-1e-3"?
        numeric = flag and next((a.type for a in self._actions
                                 if flag[1] in a.option_strings and a.type in (int, float)), None)
        given = [str(a) for a in self.argv]
        after = given[given.index(flag[1]) + 1] if numeric and flag[1] in given[:-1] else ""
        negative = re.fullmatch(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", after)
        hint = f" (a negative value: {flag[1]}={'-1e-3' if numeric is float else '-1'})" if negative else ""
        raise Fail(f"{message}{hint}; see --help")


# MeanFlow's numeric knobs (--set KEY=VALUE), checked like the flags: meanflow.py's own table of their ranges, which
# MeanFlow() also checks. A new knob gets its line there (tested).
ANY = (lambda v: True, "")
KNOBS = mf.KNOB_RANGES
# Flags that only a training run reads: refused with --prepare-imagenet. --sample accepts and ignores them (but
# --batch-size: its chunk of samples), so that, like --resume, it can take the run's own command.
TRAINING_ONLY = ("steps", "stop_at", "lr", "warmup", "weight_decay", "ema", "log_every", "eval_every", "ckpt_every",
                 "batch_size", "compile")


def processes():
    """(rank, world, local_rank) of this process: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Without RANK, one
    process (a WORLD_SIZE left in the environment by something else does not make a distributed run)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    env = {k: os.environ.get(k, "1" if k == "WORLD_SIZE" else "0") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for k, v in env.items():  # checked before any process group exists: all fail alike
        if not v.isdecimal() or (k == "WORLD_SIZE" and int(v) < 1):  # (isdigit takes '²', which int() refuses)
            what = "a number of processes" if k == "WORLD_SIZE" else "a process number"
            raise Fail(f"{k}={v!r} in the environment is not {what}; unset it, or use torchrun")
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def make_parser():
    """The flags and their help; get_args checks and completes what they parse."""
    p = Parser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--data", default="checkerboard", help=f"{', '.join(toy_data.DATASETS)} (2-D) or {', '.join(IMAGE_DATA)}")
    a("--data-path", help="data folder (default " + ", ".join(f"{p} for {d}" for d, p in DATA_PATHS.items())
      + f"; fashion-mnist reads Debian's {FASHION_DEBIAN} first, where installed)")
    a("--model", help="'mlp' for 2-D data (default there), else a DiT size of meanflow.DiT_models (default B/4); "
      "--recipe imf: a size of meanflow.iMF_models, the official iMF network (official sizes B/2 M/2 L/2 XL/2; /4 "
      "patches and Ti for CPU too; the default B/4 is not an official iMF size)")
    a("--recipe", help=f"{', '.join(mf.RECIPES)} (default improved-dtd; cifar10 and toy meanflow)")
    a("--steps", type=int, help="optimizer steps (default: 240 epochs, paper; iMF 640; toy 3000)")
    a("--batch-size", type=int, help="global batch, split over processes (default 256, paper and toy; iMF and "
      "cifar10 1024); with --sample, the samples drawn at once by all processes together")
    a("--lr", type=float, help="AdamW learning rate, constant after warmup (default 1e-4, paper; cifar10 6e-4; "
      "toy 2e-3)")
    a("--warmup", type=int, help="linear learning-rate warmup steps (default 0, paper; iMF 10 epochs, official)")
    a("--weight-decay", type=float, help="AdamW weight decay (default 0, paper); betas (0.9, 0.95)")
    a("--ema", type=float, help="EMA decay of the weights that make samples (default 0.9999, paper; toy 0.995)")
    paper = ("(default: per size, meanflow.paper_guidance (the paper's; B/4 the official config's), on "
             "class-conditional ImageNet latents; else none)")
    a("--omega", type=float, help="guidance scale in the target " + paper)
    a("--kappa", type=float, help="guidance mixing kappa " + paper)
    a("--t-lo", type=float, help="start of the guidance interval " + paper)
    a("--t-hi", type=float, help="end of the guidance interval " + paper)
    a("--class-cond", action=argparse.BooleanOptionalAction, help="class-conditional (default yes; cifar10: no, as "
      "MeanFlow's CIFAR-10 result)")
    a("--dropout", type=float, help="dropout on the MLP branch of each DiT block (default 0; cifar10 0.2, py-meanflow)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override a MeanFlow knob of the recipe, any "
      "key of meanflow.RECIPES but imf (that is --recipe imf; e.g. --set P_mean=-2.0 --set ratio_r_neq_t=0.75); "
      "repeatable, applied last")
    a("--seed", type=int, default=0, help="seed; process k of n draws its noise from seed * n + k (default 0)")
    a("--out", help="output folder (default runs/<data>-<model>-<recipe>, the model without its '/')")
    a("--log-every", type=int, help="steps between log lines (default 100)")
    a("--eval-every", type=int, help="steps between sample grids (default 10000; toy: at the end)")
    a("--ckpt-every", type=int, help="steps between checkpoints (default 10000; toy: at the end)")
    a("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    a("--overwrite", action="store_true", help="start a new run in an --out that holds one, deleting its ckpt.pt, "
      "log.jsonl and pictures (without it, or --resume, such a folder is refused)")
    a("--stop-at", type=int, help="checkpoint and exit (code 0) after this step, to split a run into jobs or "
      "test resuming (default never)")
    a("--precision", choices=["bf16", "fp32"], help="autocast dtype (default bf16 on GPU, fp32 on CPU; every GPU run "
      "allows TF32 matmuls, fp32 included)")
    a("--compile", action="store_true", help="torch.compile the loss (default off): the forward-mode pass runs "
      "eagerly (Dynamo does not trace dual tensors under a TorchFunctionMode); the guidance forwards and the rest "
      "compile")
    a("--sample", type=int, metavar="N", help="write N samples of the EMA model in <out>/ckpt.pt to an .npz, exit")
    a("--sample-steps", type=int, help="NFE of --sample (default 1)")
    a("--sample-omega", type=float, help="iMF: guidance scale at sampling, an input of the network (default: per "
      "size and NFE, meanflow.imf_guidance(_2nfe), other sizes 7.5 as the official training config; also for the "
      "training pictures)")
    a("--sample-interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"), help="iMF: the guidance interval at "
      "sampling (default: per size and NFE, meanflow.imf_guidance(_2nfe), other sizes 0.4 0.65 as the official "
      "training config)")
    a("--fid-ref", help="reference .npz for FID: its mu/sigma when present, as the ADM evaluator, else its images "
      "arr_0 (uint8 NxHxWx3) (default: the training images on pixel data; imagenet-latents: none, FID skipped)")
    a("--prepare-imagenet", metavar="DIR", help="encode a class-per-folder image tree to latents in --data-path")
    a("--shard", type=int, help="--prepare-imagenet: the shard to encode (default RANK under torchrun, else 0)")
    a("--num-shards", type=int, help="--prepare-imagenet: number of shards (default WORLD_SIZE, else 1)")
    a("--vae", default="stabilityai/sd-vae-ft-mse", help="diffusers AutoencoderKL name or folder (default: paper's)")
    a("--workers", type=int, help="--prepare-imagenet: image-decoding processes (default 4, at most the CPU cores)")
    return p


def get_args(argv=None):
    """The command line parsed, every flag checked against the others, the defaults of the data and recipe filled
    in (toy, paper, iMF, the dataset's own); a bad one is one Fail that names it and the fix."""
    p = make_parser()
    p.argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)

    toy = args.data in toy_data.DATASETS
    if not toy and args.data not in IMAGE_DATA:
        raise Fail(f"unknown --data {args.data!r}; choose one of: {', '.join([*toy_data.DATASETS, *IMAGE_DATA])}")
    args.model = ("mlp" if toy else "B/4") if args.model is None else args.model
    if args.model != "mlp" and args.model not in mf.DiT_models:
        raise Fail(f"unknown --model {args.model!r}; choose 'mlp' or one of: {', '.join(mf.DiT_models)}")
    if (args.model == "mlp") != toy:
        raise Fail(f"--model {args.model} does not fit --data {args.data}: 'mlp' is for 2-D data, a DiT for images")
    own = DATA_RECIPES.get(args.data, {})  # the dataset's own recipe, then the papers' ImageNet settings
    args.recipe = (own.get("recipe") or (TOY if toy else PAPER)["recipe"]) if args.recipe is None else args.recipe
    for flag in ("data_path", "prepare_imagenet", "vae", "fid_ref"):  # '' would read as not given (a default)
        if getattr(args, flag) == "":
            raise Fail(f"--{flag.replace('_', '-')} is empty; pass a path, or leave the flag out")
    if args.recipe not in mf.RECIPES:
        raise Fail(f"unknown --recipe {args.recipe!r}; choose one of: {', '.join(mf.RECIPES)}")
    imf = mf.RECIPES[args.recipe]["imf"]
    given = {k for k in TRAINING_ONLY if getattr(args, k) not in (None, False)}  # before the defaults fill them in
    args.weight_decay = 0.0 if args.weight_decay is None else args.weight_decay
    defaults = {**(TOY if toy else PAPER), **(IMF_TRAINING if imf and not toy else {}),
                **{k: v for k, v in own.items() if k not in ("knobs", "dropout")}}
    for k, v in defaults.items():
        setattr(args, k, v if getattr(args, k, None) is None else getattr(args, k))
    if toy and not args.prepare_imagenet and (args.class_cond is not None or args.data_path is not None):
        flag = "--data-path" if args.data_path is not None else "--class-cond"
        raise Fail(f"{flag} is for image data; the 2-D toy {args.data} is sampled afresh and has no labels")
    args.class_cond = not toy and args.class_cond is not False
    if imf and not toy and args.model not in mf.iMF_models:
        raise Fail(f"--recipe imf trains the iMF network; --model {args.model} is not one of its sizes: "
                   f"{', '.join(mf.iMF_models)}")
    args.dropout = (0.0 if imf or toy else own.get("dropout", 0.0)) if args.dropout is None else args.dropout
    if args.dropout and (imf or toy):
        raise Fail(f"--dropout is an option of the MeanFlow DiT, not of the {'iMF network' if imf else 'toy MLP'}")
    args.knobs, args.set_knobs = own.get("knobs", {}), parse_sets(args.set, args.recipe)
    args.default_data_path = args.data_path is None  # fashion-mnist: Debian's copy, or a download
    args.data_path = args.data_path or DATA_PATHS.get("imagenet-latents" if args.prepare_imagenet else args.data)
    out_given = args.out
    if args.out == "":
        raise Fail("--out is empty; pass a folder (or leave --out out for runs/<data>-<model>-<recipe>)")
    args.out = args.out or os.path.join("runs", f"{args.data}-{args.model.replace('/', '')}-{args.recipe}")
    for k, (ok, must) in NUMBERS.items():
        for v in getattr(args, k) if isinstance(getattr(args, k), list) else [getattr(args, k)]:  # nargs: each
            if v is not None and not (math.isfinite(v) and ok(v)):
                finite = "finite " if isinstance(v, float) else ""
                raise Fail(f"--{k.replace('_', '-')} {v} is out of range: pass a {finite}value {must}")
    world = processes()[1]
    if args.batch_size % world and not args.prepare_imagenet and args.sample is None:
        raise Fail(f"--batch-size {args.batch_size} does not split over {world} processes; pass a multiple of {world}")
    if args.seed * world + world > 2**32:  # numpy seeds process k with seed * world + k
        raise Fail(f"--seed {args.seed} is too large for {world} processes; pass one below {2**32 // world}")
    if args.stop_at is not None and args.steps is not None and args.stop_at > args.steps:
        raise Fail(f"--stop-at {args.stop_at} is beyond --steps {args.steps}; pass a step within the run")
    if args.t_lo is not None and args.t_hi is not None and args.t_lo > args.t_hi:  # the flags, before any work
        raise Fail(f"--t-lo {args.t_lo} is above --t-hi {args.t_hi}; the guidance interval needs t_lo <= t_hi")
    shards = args.num_shards or world  # --prepare-imagenet: --shard of a single process, else each process's rank
    if args.prepare_imagenet and world > 1 and (args.shard is not None or shards != world):
        raise Fail("under torchrun each process encodes the shard of its rank, one of --num-shards = the number of "
                   f"processes ({world}): leave --shard and --num-shards out (or run single processes with --shard)")
    if args.prepare_imagenet and args.shard is not None and args.shard >= shards:
        raise Fail(f"--shard {args.shard} is not among --num-shards {shards}" + (" (its default: 1)" if args.num_shards
                   is None else "") + f"; pass shards 0 to {shards - 1}, or more --num-shards")
    if args.overwrite and (args.resume or args.sample is not None):
        raise Fail("--overwrite starts a new run: it does not go with --resume or --sample")
    if args.resume and args.sample is not None:
        raise Fail("--sample reads the checkpoint as it is: it does not go with --resume")
    only = [("--sample-steps", args.sample_steps, "--sample", args.sample is None),  # options of another mode
            ("--fid-ref", args.fid_ref, "--sample on image data", args.sample is None or toy),
            *[(f"--{k.replace('_', '-')}", getattr(args, k), "--prepare-imagenet", not args.prepare_imagenet)
              for k in ("shard", "num_shards", "workers")],
            *[(f"--{k.replace('_', '-')}", k in given or None, "training (and --sample, which takes the run's own "
               "command)", args.prepare_imagenet) for k in TRAINING_ONLY],
            ("--out", out_given, "training or --sample (--prepare-imagenet writes to --data-path)",
             args.prepare_imagenet)]
    for flag, value, mode, elsewhere in only:
        if value is not None and elsewhere:
            raise Fail(f"{flag} goes with {mode} only; leave it out")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    args.sample_steps = args.sample_steps or 1
    args.workers = min(4, cores) if args.workers is None else args.workers  # more than the cores: a warning, no speed
    return args


def parse_sets(items, recipe):
    """--set KEY=VALUE items -> {knob: value}, each value read as the type of the recipe's default."""
    knobs, out = mf.RECIPES[recipe], {}
    for item in items:
        key, eq, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not eq or key not in knobs or key == "imf":  # iMF is a recipe with its own network: --recipe imf
            raise Fail(f"--set {item!r}: not KEY=VALUE with KEY a knob of --recipe {recipe}: "
                       f"{', '.join(k for k in knobs if k != 'imf')}")
        default, low = knobs[key], text.lower()
        nullable = key in mf.OPTIONAL_KNOBS  # beta_k, minsnr_gamma: None turns them off
        try:
            if isinstance(default, bool):
                value = {"true": True, "1": True, "false": False, "0": False}[low]
            elif isinstance(default, int):
                value = int(text)
            elif isinstance(default, str):
                if text not in ("logit_normal", "uniform"):  # time_sampler, the one text knob
                    raise ValueError
                value = text
            else:  # float, or None for a component that can be off
                value = None if low == "none" and nullable else float(text)
                if value is not None and not math.isfinite(value):
                    raise ValueError
        except (KeyError, ValueError):
            kind = {bool: "true or false", int: "an integer", str: "logit_normal or uniform"}.get(type(default),
                                                                                                 "a number")
            raise Fail(f"--set {key}={text!r}: the value must be {kind}{' or none' if nullable else ''}")
        ok, must = KNOBS.get(key, ANY)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise Fail(f"--set {key}={text}: out of range; pass a value {must}")
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Files: every file this script writes goes through save_atomic (whole or absent, never half-written).


def save_atomic(path, write, run_folder=False, new=False):
    """write(file) into a temporary file of this writer alone, then rename: a kill mid-write never leaves a corrupt
    or half-written file, and two writers never share a temporary. On any failure the temporary goes; a failed
    write (disk full) is one line, and the file at path, if any, is unchanged. run_folder: path is a training run's
    checkpoint, log or picture, and the line says how to continue that run. new: never replace a file at path, even
    one that appeared while we wrote (a hard link fails where a name exists; a rename would replace it): then
    FileExistsError, and nothing written."""
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"  # not the random module: its state is checkpointed
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if new:
            publish_new(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, FileExistsError) and new:
            raise
        cause = err  # torch.save reports a failed write as a RuntimeError whose context is the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or not isinstance(err, Exception):
            raise
        kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
        retry = f"run again, {again(os.path.dirname(path))}" if run_folder else "run the command again"
        raise Fail(f"could not write {path} ({cause.strerror}); {kept}; make room there (or fix its permissions) "
                   f"and {retry}") from None


def publish_new(tmp, path):
    """Give the finished file tmp the name path only if no file has it (FileExistsError if one does)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: a rename, after one last look
        if os.path.exists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
    else:
        os.remove(tmp)


def again(out):
    """How to continue a training run in out after a failed write: from its checkpoint, or over if it has none."""
    if os.path.exists(os.path.join(out or ".", "ckpt.pt")):
        return "with --resume for a training run"
    return "with --overwrite for a training run (it has no checkpoint to resume yet)"


# ----------------------------------------------------------------------------------------------------------
# Data. A batch is a pure function of the step (per-epoch permutations, a generator seeded by the step), so a
# resumed run sees what an uninterrupted one would. Every process takes its slice of the global batch.


def read_idx(path):
    """An IDX file as (Fashion-)MNIST ships it, plain or gzipped: 0 0 0x08 ndim, big-endian int32 dims, uint8."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
        data = np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3])
        if raw[:3] != b"\0\0\x08" or data.size != math.prod(dims):
            raise ValueError
    except (OSError, ValueError, EOFError, IndexError, zlib.error):  # zlib.error: corrupt compressed bytes
        raise Fail(f"{path} is not a valid IDX file (truncated or not uint8 IDX); re-install or re-download it")
    return data.reshape(dims)


def fetch(urls, md5):
    """The bytes at the first of urls whose md5 matches; OSError (the first reason) if none."""
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                raw = r.read()
            if hashlib.md5(raw).hexdigest() == md5:
                return raw
            errors.append("md5 mismatch")
        except (OSError, http.client.HTTPException) as err:  # IncompleteRead: a transfer cut off
            errors.append(str(err) or type(err).__name__)
    raise OSError(errors[0])


def download_fashion_mnist(path, files=None):
    """The official files (default: the training split, FASHION_MD5) into path (those already there are kept), each
    md5-checked before it is saved."""
    for name, md5 in (FASHION_MD5 if files is None else files).items():
        if os.path.exists(os.path.join(path, name)):
            continue
        try:
            raw = fetch([url + name for url in FASHION_URLS], md5)  # Zalando's repository first, its S3 mirror second
        except OSError as err:
            raise Fail(f"could not download Fashion-MNIST ({err}); put {name} from {FASHION_URLS[0]} "
                       f"in {path}, or apt-get install dataset-fashion-mnist")
        save_atomic(os.path.join(path, name), lambda f: f.write(raw))


def load_fashion_mnist(path, local_rank=0, default=None):
    """The training split as (N, 1, 32, 32) uint8 images and (N,) labels. The default path (DATA_PATHS; default:
    whether path is it, unless told) reads Debian's copy when installed, else downloads the official files once
    (process 0 of each machine: data/ may be local to it); a path the user gave must hold them."""
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")

    def find(folder):  # the two files, plain or gzipped; None where one is missing
        return [next((f for f in (os.path.join(folder, n), os.path.join(folder, n + ".gz")) if os.path.exists(f)),
                     None) for n in names]

    if (path == DATA_PATHS["fashion-mnist"]) if default is None else default:
        if None not in find(FASHION_DEBIAN):
            path = FASHION_DEBIAN
        else:
            if local_rank == 0 and None in find(path):
                print(f"downloading Fashion-MNIST ({FASHION_URLS[0]}) into {path}")
                download_fashion_mnist(path)
            if dist.is_initialized():
                dist.barrier()
    found = []
    for name, f in zip(names, find(path)):
        if f is None:
            raise Fail(f"no {name}[.gz] in {path}: apt-get install dataset-fashion-mnist, or pass --data-path, "
                       f"or leave --data-path out to download it into {DATA_PATHS['fashion-mnist']}")
        found.append(read_idx(f))
    x, y = found
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (len(x),):
        raise Fail(f"Fashion-MNIST in {path} has images {x.shape} and labels {y.shape}, not (N, 28, 28) and (N,)")
    return np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None], y  # (N, 1, 32, 32): padded with background to 32x32


class NumpyUnpickler(pickle.Unpickler):
    """CIFAR-10's pickles hold dicts, lists and numpy arrays: nothing else is built (a pickle can run any code)."""

    def find_class(self, module, name):
        if (module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer")
                or (module, name) in (("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes"))):
            # (protocol 2 from Python 3 writes bytes with these)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a pickle of {module}.{name}, not of numpy arrays")


def load_cifar10(path, local_rank):
    """The official python tarball; process 0 of each machine downloads it when absent (and checks its md5)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise Fail(f"--data-path {path} is a file, not a folder; pass the folder that holds (or will hold) "
                   "cifar-10-python.tar.gz")
    tar_path = os.path.join(path, "cifar-10-python.tar.gz")
    if local_rank == 0 and not os.path.exists(tar_path):
        print(f"downloading {CIFAR_URL} to {path}")
        try:
            raw = fetch([CIFAR_URL], CIFAR_MD5)
        except OSError as err:
            raise Fail(f"could not download CIFAR-10 ({err}); put cifar-10-python.tar.gz from {CIFAR_URL} in {path}")
        save_atomic(tar_path, lambda f: f.write(raw))
    if dist.is_initialized():
        dist.barrier()
    if not os.path.exists(tar_path):  # a process that did not download: process 0 of its machine failed
        raise Fail(f"no cifar-10-python.tar.gz in {path}: its download failed (see process 0's line); put the file "
                   f"from {CIFAR_URL} there")
    xs, ys, names = [], [], []
    try:  # data_batch_1..5: Python-2 pickles of {b'data': uint8 (10000, 3072), b'labels': [int]}
        with tarfile.open(tar_path) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if os.path.basename(m.name).startswith("data_batch_"):
                    d = NumpyUnpickler(tar.extractfile(m), encoding="bytes").load()
                    x, y = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
                    if x.dtype != np.uint8 or x.shape != (len(y), 3 * 32 * 32) or y.ndim != 1 \
                            or (len(y) and not np.issubdtype(y.dtype, np.integer)):
                        raise ValueError(f"{m.name}: {x.dtype} data {x.shape}, {len(y)} labels")
                    xs.append(x.reshape(-1, 3, 32, 32))  # rows of 1024 red, 1024 green, 1024 blue
                    ys.append(y.astype(np.int64))
                    names.append(os.path.basename(m.name))
    except (OSError, tarfile.TarError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError,
            AttributeError) as err:  # TypeError: a member that is not a file, or a pickle of something else
        what = type(err).__name__ + (f": {err}" if isinstance(err, ValueError) and ": " in str(err) else "")
        raise Fail(f"{tar_path} is not the CIFAR-10 python tarball ({what}); delete it to re-download")
    if names != CIFAR_BATCHES:  # one batch fewer would train on 40,000 images without a word
        raise Fail(f"{tar_path} holds {', '.join(names) or 'no data_batch_* files'}, not the official tarball's "
                   f"{', '.join(CIFAR_BATCHES)}; delete it to re-download")
    return np.concatenate(xs), np.concatenate(ys)


class Pixels:
    """Fashion-MNIST or CIFAR-10 in memory, uint8 (N, C, 32, 32); batches in [-1, 1]."""

    def __init__(self, x, y, flip):
        self.x, self.labels, self.flip = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), flip

    def __len__(self):
        return len(self.labels)

    def get(self, idx, g, mine=slice(None)):
        """Rows `mine` of the batch of images idx; g draws for the whole batch, so every slice sees the same."""
        flip = torch.rand(len(idx), 1, 1, 1, generator=g)[mine] < 0.5 if self.flip else None
        x = self.x[idx[mine]].float() / 127.5 - 1
        if flip is not None:  # random horizontal flips on CIFAR-10, as py-meanflow
            x = torch.where(flip, x.flip(3), x)
        return x, self.labels[idx[mine]]


def latent_normalisation(imf):
    """(shift, scale), each (4, 1, 1): the network sees (latent - shift) * scale, samples decode from x / scale + shift.
    MeanFlow: 0 and 0.18215 (as DiT); iMF: its per-channel mean and 1 / std (official)."""
    if imf:
        return torch.tensor(IMF_LATENT_MEAN).view(-1, 1, 1), 1 / torch.tensor(IMF_LATENT_STD).view(-1, 1, 1)
    return torch.zeros(4, 1, 1), torch.full((4, 1, 1), LATENT_SCALE)


def labels_path(shard):  # shard-i-of-n.npy -> labels-i-of-n.npy in its folder (whose name may hold "shard-" too)
    return os.path.join(os.path.dirname(shard), os.path.basename(shard).replace("shard-", "labels-", 1))


class ImageNetLatents:
    """Memory-mapped --prepare-imagenet output: shard-i-of-n.npy (N, 2 flips, [mean, std], 4, 32, 32), labels-*.
    Batches are normalised as the recipe's network expects (latent_normalisation)."""

    def __init__(self, path, imf=False):
        self.shift, self.scale = latent_normalisation(imf)
        files = sorted(glob.glob(os.path.join(glob.escape(path), "shard-*-of-*.npy")))
        sets = sorted({f.rsplit("-of-", 1)[1][:-4] for f in files})  # shard-i-of-n.npy: the n of each file
        if len(sets) > 1:
            raise Fail(f"{path} mixes the shards of several preparations (shard-*-of-{' and -of-'.join(sets)}.npy); "
                       "delete the set you do not want (and its labels-* and tree-*), or the folder")
        if not files or sets != [f"{len(files):05d}"]:  # as --prepare-imagenet names them
            raise Fail(f"{path} holds {len(files)} latent shards, not a complete set; "
                       f"run train.py --prepare-imagenet IMAGENET/train --data-path {path}")
        try:
            self.lat = [np.load(f, mmap_mode="r") for f in files]
            labels = [np.load(labels_path(f)) for f in files]
        except (OSError, ValueError, EOFError) as err:  # EOFError: an empty file
            raise Fail(f"latents in {path} are unreadable ({type(err).__name__}); re-run --prepare-imagenet")
        if not all(isinstance(a, np.ndarray) for a in self.lat + labels):  # an .npz archive under an .npy name
            raise Fail(f"latents in {path} are not .npy arrays; delete them and re-run --prepare-imagenet")
        C, H, _ = IMAGE_DATA["imagenet-latents"]  # each row: 2 flips x (mean, std) x (C, H, H)
        if any(a.shape[1:] != (2, 2, C, H, H) or a.dtype not in (np.float16, np.float32) or l.shape != a.shape[:1]
               or not np.issubdtype(l.dtype, np.integer) for a, l in zip(self.lat, labels)):  # shard by shard
            raise Fail(f"latents in {path} are not float16/32 (N, 2, 2, {C}, {H}, {H}) with N integer labels (N) "
                       f"in each shard; delete them and re-run --prepare-imagenet (with the SD-VAE of {C} x {H} x {H} "
                       f"latents)")
        self.labels = np.concatenate(labels).astype(np.int64)  # any integer type: the label embedding takes int64
        self.start = np.cumsum([0] + [len(a) for a in self.lat])

    def __len__(self):
        return len(self.labels)

    def get(self, idx, g, mine=slice(None)):
        """Rows `mine` of the batch of latents idx (only those are read); g draws for the whole batch, so every
        slice sees the same."""
        C, H, _ = IMAGE_DATA["imagenet-latents"]
        flip = torch.randint(0, 2, (len(idx),), generator=g)[mine]  # the image or its mirror image
        noise = torch.randn(len(idx), C, H, H, generator=g)[mine]  # a fresh draw from each latent's posterior
        idx = idx[mine].numpy()
        rows = np.empty((len(idx), *self.lat[0].shape[1:]), np.float32)  # (b, 2, 2, C, H, W)
        for s, a in enumerate(self.lat):
            m = (idx >= self.start[s]) & (idx < self.start[s + 1])
            rows[m] = a[idx[m] - self.start[s]]
        mean, std = torch.from_numpy(rows)[torch.arange(len(idx)), flip].unbind(1)
        return (mean + std * noise - self.shift) * self.scale, torch.from_numpy(self.labels[idx])


def load_data(args, local_rank):  # local_rank 0: the process of each machine that downloads
    if args.data in toy_data.DATASETS:
        return None
    downloads = args.data == "cifar10" or (args.data == "fashion-mnist" and args.default_data_path)
    if not downloads and not os.path.isdir(args.data_path):
        what = "is a file, not a folder" if os.path.exists(args.data_path) else "does not exist"
        raise Fail(f"--data-path {args.data_path} {what}; pass the folder that holds {args.data}")
    if args.data == "fashion-mnist":
        return Pixels(*load_fashion_mnist(args.data_path, local_rank, args.default_data_path), flip=False)
    if args.data == "cifar10":
        return Pixels(*load_cifar10(args.data_path, local_rank), flip=True)
    return ImageNetLatents(args.data_path, imf=mf.RECIPES[args.recipe]["imf"])


def check_data(data, args):
    """A set with no images, or labels outside the classes, would fail later and far away (a division by zero,
    an IndexError in the label embedding): one line now."""
    if data is None:
        return
    K, where = IMAGE_DATA[args.data][2], f"{args.data} in {args.data_path}"
    if len(data) == 0:
        raise Fail(f"{where} holds no images; re-install or re-download it, or pass another --data-path")
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= K:
        fix = "delete them and re-run --prepare-imagenet" if args.data == "imagenet-latents" else "re-download them"
        raise Fail(f"{where} has labels {lo} to {hi}, not 0 to {K - 1}: the files are corrupt or of another data "
                   f"set; {fix}")


def get_batch(args, data, step, rank, world):
    """This process's slice of the global batch of `step`: (x, y), y None for the 2-D toys and unconditional runs."""
    B, g = args.batch_size, torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    mine = slice(rank * B // world, (rank + 1) * B // world)
    if data is None:  # fresh toy samples every step
        return toy_data.sample(args.data, B, generator=g)[mine], None
    pos = step * B + torch.arange(B)  # places in the endless sequence of per-epoch permutations
    epoch, place, idx = pos // len(data), pos % len(data), torch.empty(B, dtype=torch.long)
    for e in epoch.unique().tolist():
        idx[epoch == e] = epoch_order(args.seed, e, len(data))[place[epoch == e]]
    x, y = data.get(idx, g, mine)  # this process reads its own rows only
    return x, y if args.class_cond else None


@functools.lru_cache(maxsize=2)  # a batch <= the data spans at most two epochs; drawn once (1.28M rows: ~20 ms each)
def epoch_order(seed, epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# ----------------------------------------------------------------------------------------------------------
# Training


def make_method(args):
    """This run's MeanFlow: the recipe, meanflow.TOY_OVERRIDES on 2-D data, the dataset's own knobs (DATA_RECIPES),
    MeanFlow's per-size guidance (paper_guidance: ImageNet latents only, never pixels), --omega/--kappa/--t-lo/--t-hi,
    and --set last."""
    toy = args.data in toy_data.DATASETS
    imagenet = args.data == "imagenet-latents" and not mf.RECIPES[args.recipe]["imf"]
    guidance = dict(mf.paper_guidance.get(args.model, {})) if imagenet and args.class_cond else {}
    guidance.update({k: getattr(args, k) for k in ("omega", "kappa", "t_lo", "t_hi") if getattr(args, k) is not None})
    guided = guidance.keys() | (args.set_knobs.keys() & {"omega", "kappa", "t_lo", "t_hi"})  # flags or --set
    if guided and not args.class_cond:
        raise Fail("--omega, --kappa, --t-lo and --t-hi guide with labels; this run is unconditional "
                   "(see --class-cond)")
    if guided and mf.RECIPES[args.recipe]["imf"]:
        raise Fail("--omega, --kappa, --t-lo and --t-hi set MeanFlow's guidance in the target; iMF draws omega and "
                   "the interval in training and takes them at sampling: --sample-omega, --sample-interval")
    try:
        method = mf.MeanFlow(recipe=args.recipe, **{**(mf.TOY_OVERRIDES if toy else {}), **args.knobs, **guidance,
                                                    **args.set_knobs})
    except ValueError as err:
        raise Fail(f"{err} (from --recipe {args.recipe} and --set)")
    # Knobs this run never reads -> why (MeanFlow() refuses the guidance knobs with iMF, omega_max/beta without)
    inert = {k: why for keys, why, idle in (
        (("dtd_patience", "dtd_share", "dtd_window"), "DTD only, and dtd_stages is 0", not method.dtd_stages),
        (("P_mean", "P_std"), "the logit-normal sampler's, and time_sampler is uniform",
         method.time_sampler == "uniform"),
        (("class_dropout",), "labels only, and this run is unconditional", not args.class_cond)) if idle for k in keys}
    if k := min(args.set_knobs.keys() & inert.keys(), default=None):
        raise Fail(f"--set {k} does nothing with --recipe {args.recipe} and these knobs ({inert[k]}); leave it out")
    return method


def get_lr(step, args):  # a pure function of the step, so that resuming needs no scheduler state
    # (step + 1): the first step already moves (optax's linear_schedule in iMF's code starts at 0: one step later)
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr


# The run, top to bottom: set_up -> (sampling only: sample_to_npz) -> resume -> train, whose loop calls
# train_step, log_window, evaluate and checkpoint. `job` carries what the steps share (a plain namespace).
def set_up(args):
    """Processes, device, precision, the method, the data, the networks and the optimizer."""
    # Distributed only under torchrun (RANK set), as in nanoGPT; nccl on GPUs, gloo on CPUs.
    rank, world, local_rank = processes()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif args.model == "mlp" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the toy MLP is too small for threads to pay; on a busy CPU they cost 10-20x
    if "RANK" in os.environ:
        # 30 minutes for a collective (nccl's default is 10): the others wait in a barrier while process 0 writes a
        # checkpoint (XL/2's weights, EMA and AdamW: ~11 GB) or fetches the VAE; torchrun still ends them at once
        # when a process dies.
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]  # where the processes meet
        if missing:
            raise Fail(f"RANK is set in the environment but {' and '.join(missing)} not; start the processes with "
                       "torchrun, or unset RANK")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()

    method = make_method(args)  # bad knobs fail here, before any data is read
    args.sample_guidance = {k: sample_guidance(args, method, k) for k in (1, 2, args.sample_steps)}  # per NFE
    ckpt_path = os.path.join(args.out, "ckpt.pt")  # --resume, --sample: checked before any data is read
    ckpt = load_checkpoint(ckpt_path, args, method) if args.resume or args.sample is not None else None
    # --sample of latents needs the checkpoint and the VAE, not the 42 GB of training latents
    data = None if args.sample is not None and args.data == "imagenet-latents" else load_data(args, local_rank)
    check_data(data, args)
    if args.steps is None and data is not None:
        args.steps = math.ceil(args.epochs * len(data) / args.batch_size)  # 240 epochs (paper), iMF 640
        if args.stop_at is not None and args.stop_at > args.steps:
            raise Fail(f"--stop-at {args.stop_at} is beyond the {args.steps} steps of {args.epochs} epochs; "
                       "pass a step within")
    if args.warmup is None:  # in epochs of this data set at this batch (iMF: 10, official; else 0)
        args.warmup = math.ceil(args.warmup_epochs * len(data) / args.batch_size) if data is not None else 0
    args.eval_every, args.ckpt_every = args.eval_every or args.steps, args.ckpt_every or args.steps
    K = IMAGE_DATA[args.data][2] if args.data in IMAGE_DATA and args.class_cond else 0
    torch.manual_seed(args.seed)  # the same initial weights in every process
    if args.model == "mlp":
        net = mf.MLP(dim=2, **method.net_kwargs).to(device)
    else:
        C, H, _ = IMAGE_DATA[args.data]
        net = (mf.iMF_models[args.model](input_size=H, in_channels=C, num_classes=K) if method.imf else
               mf.DiT_models[args.model](input_size=H, in_channels=C, num_classes=K, dropout=args.dropout,
                                         **method.net_kwargs)).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()  # the weights that make the samples
    adamw = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)  # (paper)
    try:
        opt = torch.optim.AdamW(net.parameters(), **adamw, fused=True)
    except RuntimeError:  # no fused kernel for this device
        opt = torch.optim.AdamW(net.parameters(), **adamw)
    return SimpleNamespace(rank=rank, world=world, device=device, autocast=autocast, method=method, data=data,
                           net=net, ema=ema, opt=opt, ckpt_path=ckpt_path, log_path=os.path.join(args.out, "log.jsonl"),
                           fits=f"{ckpt_path} does not fit --model {args.model} (other shapes); "
                                "pass the run's own settings",
                           step=0, ckpt_step=None, history=[], elapsed=0.0, vae=None, ckpt=ckpt, acc=[],
                           window_seconds=0.0)


def resume(args, job):
    """Each process's random streams; with --resume, the weights, optimizer, curriculum, streams and log of the
    checkpoint (on CPU bitwise: a resumed run continues as the uninterrupted one; on a GPU the streams are restored
    exactly, but some CUDA kernels are not deterministic)."""
    seed_streams(args.seed * job.world + job.rank)  # each process its own noise, (t, r) and label drops
    if args.resume:  # job.elapsed: seconds of the run before this process (`time` in the log goes on)
        ckpt, job.ckpt = job.ckpt, None  # loaded and checked in set_up; freed once in the networks
        job.step = job.ckpt_step = step = ckpt["step"]
        if step > args.steps or (args.stop_at is not None and args.stop_at <= step):
            bad = f"--stop-at {args.stop_at}" if step <= args.steps else f"--steps {args.steps}"
            raise Fail(f"{job.ckpt_path} is at step {step}, not before {bad}; pass a later step to train on")
        try:
            job.net.load_state_dict(ckpt["model"])
            job.ema.load_state_dict(ckpt["ema"])
            if not opt_fits(ckpt["opt"], job.net):  # load_state_dict takes any shapes; the step would crash
                raise Fail(job.fits)
            job.opt.load_state_dict(ckpt["opt"])
            for group in job.opt.param_groups:  # this run's --weight-decay, as its --lr (the state dict has the old)
                group["weight_decay"] = args.weight_decay
            method, accs = dict(ckpt["method"]), ckpt.get("dtd_acc")  # accs: one per process (older: rank 0's only)
            if accs is not None:  # on another number of processes, process 0 carries the window's sums
                method["dtd_acc"] = (accs[job.rank] if len(accs) == job.world else
                                     [sum(a) for a in zip(*accs)] if job.rank == 0 else [0.0] * len(accs[0]))
            job.method.load_state_dict(method)
            if len(ckpt["rng"]) == job.world:
                set_rng_state(ckpt["rng"][job.rank])
            else:  # seeded by the step too: seed * world + rank alone would replay the run's first streams
                key = f"{args.seed} {job.world} {job.rank} {step}".encode()
                seed_streams(int.from_bytes(hashlib.sha256(key).digest()[:4], "little"))
                if job.rank == 0:
                    print(f"resuming a {len(ckpt['rng'])}-process run on {job.world}: fresh random streams",
                          file=sys.stderr)
        except LOAD_ERRORS:
            raise Fail(job.fits)
        job.history = history = read_log(job.log_path, step)
        job.elapsed = ckpt["time"] if "time" in ckpt else history[-1].get("time", 0.0) if history else 0.0
        window = ckpt.get("log_window", {})  # the steps since the last log line: their means go on (older: none)
        try:
            job.acc = [[float(v) for v in a] for a in window.get("acc", [])]
            job.window_seconds = float(window.get("seconds", 0.0))
            if any(len(a) != len(LOG_KEYS) for a in job.acc):
                raise ValueError
        except (TypeError, ValueError):
            raise Fail(f"{job.ckpt_path} has a log window of other numbers (not of this train.py); pass the run's "
                       "own checkpoint")
        if job.rank == 0:  # drop the lines logged after the checkpoint
            save_atomic(job.log_path, lambda f: f.write("".join(map(log_line, history)).encode()), run_folder=True)
    if args.data == "imagenet-latents" and job.rank == 0:
        try:  # for the pictures
            job.vae = load_vae(args, job.device)
        except Fail as err:
            print(f"no VAE to decode latents ({err}); the grids show latent channels 0-2", file=sys.stderr)


def train_step(args, job, loss_fn, x, y, signals=None):
    """One optimizer step; returns the logged numbers (LOG_KEYS), averaged over the processes, and the stop signal
    (STOP_SIGNALS) that any process had noted by the end of this step's forward (0: none; signals.signum is this
    process's), the same in every process."""
    for group in job.opt.param_groups:
        group["lr"] = get_lr(job.step, args)
    loss, logs = loss_fn(x, y, job.step / args.steps)
    # One tiny all-reduce a step, of the logged numbers and of a count per stop signal: the numbers are global, all
    # processes see a non-finite loss at the same step and stop before the weights are touched, and they agree on a
    # stop without a second collective (each one waits for the GPU). (DTD advances inside method.loss.)
    # (Python numbers such as the DTD stage are filled in on the device: a copy from the host would wait for the GPU)
    logged = [v.float() if torch.is_tensor(v) else torch.full((), float(v), device=job.device)
              for v in (logs.get(k, 1.0 if k == "beta" else math.nan) for k in LOG_KEYS)]  # no beta: 1
    noted = torch.zeros(len(STOP_SIGNALS), device=job.device)  # this process's stop signal, one-hot
    if signals is not None and signals.signum:  # read after the forward: a signal during it stops on this step
        noted[STOP_SIGNALS.index(signals.signum)] = 1
    stats = torch.cat([torch.stack(logged), noted])
    if job.world > 1:
        dist.all_reduce(stats)
        stats /= job.world
    stats = stats.tolist()
    stop = max((int(s) for s, n in zip(STOP_SIGNALS, stats[len(LOG_KEYS):]) if n > 0), default=0)  # as most()
    stats = stats[:len(LOG_KEYS)]
    if not math.isfinite(stats[0]):
        raise diverged(job, stats[0])
    job.opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP: gradients averaged over the processes here
    job.opt.step()
    update_ema(job.ema, job.net, args.ema)
    job.step += 1
    return stats, stop


def diverged(job, loss):
    """The line for a non-finite loss, before the weights moved: where to go on from, and the likely cause."""
    fix = (f"{job.ckpt_path} (step {job.ckpt_step}) is the last checkpoint; lower --lr and --resume (if the loss "
           "is not finite again at once, its weights are already ruined: a lower --lr and --overwrite)"
           if job.ckpt_step is not None else "no checkpoint yet; run again with a lower --lr and --overwrite")
    fix += " (or, if the lr is not the cause, check the data and the --set values)"
    if job.step == 0:  # no update yet: the lr cannot be the cause
        fix = ("before any update, so not the lr: a --set value or guidance flag (--omega, --kappa) too far out "
               "for float32, or the data; pass the defaults and change one at a time")
    return Fail(f"the loss is {loss} at step {job.step + 1}; stopped, {fix}")


def log_window(args, job, seconds):
    """One log line: the means of the steps since the last one (job.acc, carried across a resume by the
    checkpoint), img/s over their training time."""
    means = [np.mean([a for a in col if math.isfinite(a)] or [math.nan]) for col in zip(*job.acc)]
    line = dict(step=job.step, **dict(zip(LOG_KEYS, means)), lr=get_lr(job.step - 1, args),
                img_per_s=len(job.acc) * args.batch_size / seconds, time=time.time() - job.t_start)
    job.history.append(line)
    if job.rank == 0:
        append_log(job.log_path, line)
    return line


def evaluate(args, job):
    """Pictures of the EMA network's 1-NFE and 2-NFE samples (toys: and their distances to the data)."""
    method, ema, device, step = job.method, job.ema, job.device, job.step
    path = os.path.join(args.out, f"step-{step:07d}.png")
    if job.data is None:  # data, 1-NFE and 2-NFE samples, loss curves; and the distances to the data
        panels = [(f"data: {args.data}", toy_data.sample(args.data, 2000, torch.Generator().manual_seed(1)))]
        for k in (1, 2):
            x, _ = generate(args, method, ema, range(2000), k, device)
            ed, sw = toy_distances(args, x)
            board = f", {100 * toy_data.on_squares(x):.1f}% on the squares" if args.data == "checkerboard" else ""
            panels.append((f"{k}-NFE (EMA): energy distance {ed:.4f}{board}", x))
            print(f"step {step}: {k}-NFE energy distance {ed:.4f}, sliced Wasserstein {sw:.3f}{board}")
        save_figure(path, panels, job.history, toy_data.checkerboard_squares() if args.data == "checkerboard" else ())
    else:  # 8x8 grids, 1-NFE | 2-NFE, and the loss curves in loss.png
        save_grids(path, [generate(args, method, ema, range(64), k, device, job.vae)[0] for k in (1, 2)])
        save_figure(os.path.join(args.out, "loss.png"), [], job.history)
    return path


def checkpoint(args, job):
    """Weights, EMA, optimizer, curriculum and every process's random streams, written atomically by rank 0."""
    method = job.method.state_dict()
    rngs = [rng_state()] * job.world  # every process's random streams
    accs = [method["dtd_acc"]] * job.world  # and its part of DTD's window sums (the rest is shared)
    if job.world > 1:
        dist.all_gather_object(rngs, rng_state())
        dist.all_gather_object(accs, accs[0])
        hi = torch.stack([p.detach().float().sum() for p in job.net.parameters()])  # replicas still identical?
        lo = hi.clone()
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        if not torch.equal(hi, lo):
            raise Fail(f"the processes' weights differ at step {job.step}: their gradients were not synchronised")
    if job.rank == 0:
        state = dict(model=job.net.state_dict(), ema=job.ema.state_dict(), opt=job.opt.state_dict(), step=job.step,
                     rng=rngs, method=method, dtd_acc=accs, recipe=args.recipe, args=vars(args),
                     knobs=method_knobs(job.method),
                     log_window=dict(acc=job.acc, seconds=job.window_seconds), time=time.time() - job.t_start)
        save_atomic(job.ckpt_path, lambda f: torch.save(state, f), run_folder=True)
    job.ckpt_step = job.step
    if job.world > 1:
        dist.barrier()


def train(args, job):
    """The training loop: a step, and at their intervals a log line, pictures and a checkpoint; stops cleanly on
    STOP_SIGNALS (all processes at the same step, checkpoint written) and at --stop-at."""
    # Data parallel: DDP's gradient hooks fire through all of the loss's forwards (the plain one, the forward-mode
    # pass on dual tensors, the no-grad guidance one) and one backward (tested against one process on the global
    # batch). The buffers are constants (positions): no broadcast each forward (torch 2.13 renamed the flag).
    DDP = torch.nn.parallel.DistributedDataParallel
    new = "forward_sync_buffers" in inspect.signature(DDP).parameters
    flag = "forward_sync_buffers" if new else "broadcast_buffers"
    model = DDP(job.net, **{flag: False}) if job.world > 1 else job.net

    def loss_fn(x, y, progress):
        with job.autocast:  # the JVP too (an fp32 JVP measured no better; README); meanflow.py sums errors in fp32
            return job.method.loss(model, x, y, progress=progress)

    if args.compile:
        loss_fn = torch.compile(loss_fn)
    figure, first = None, job.step
    job.t_start = time.time() - job.elapsed
    with StopSignals() as signals, tqdm(total=args.steps, initial=job.step, disable=job.rank != 0,
                                        dynamic_ncols=True) as bar:
        while job.step < args.steps:
            t_step = time.time()
            x, y = get_batch(args, job.data, job.step, job.rank, job.world)
            x, y = x.to(job.device, non_blocking=True), None if y is None else y.to(job.device, non_blocking=True)
            stats, stop = train_step(args, job, loss_fn, x, y, signals)
            job.acc.append(stats)
            if args.overwrite and job.step == first + 1:  # the old run goes once this one's loss is finite, before
                if noted := signals.agreed(job.device):  # any write, unless a stop came (even during the backward)
                    raise KeyboardInterrupt(noted)  # the old run stays; the new one wrote nothing
                for f in job.replaced:
                    with suppress(FileNotFoundError):
                        os.remove(os.path.join(args.out, f))
            bar.update()
            step = job.step
            window_ends = step % args.log_every == 0 or step == args.steps
            if window_ends and job.device.type == "cuda":  # this step's backward, optimizer and EMA may still be
                torch.cuda.synchronize(job.device)  # queued (the next step's wait would count them in its own time)
            job.window_seconds += time.time() - t_step  # img/s counts training alone, not checkpoints or pictures
            if window_ends:
                line = log_window(args, job, job.window_seconds)
                bar.set_postfix(loss=f"{line['loss']:.4f}", v_loss=f"{line['v_loss']:.3f}",
                                u_loss=f"{line['u_loss']:.3f}", beta=f"{line['beta']:.3f}", dtd=int(line["dtd_stage"]),
                                img_s=f"{line['img_per_s']:.0f}")
                job.acc, job.window_seconds = [], 0.0
            last = step in (args.steps, args.stop_at)  # the run ends here anyway
            stop = stop if not last else 0  # STOP_SIGNALS, agreed in the step
            if step % args.ckpt_every == 0 or last or stop:  # before the pictures: a failure there loses no step
                checkpoint(args, job)
                if not stop and not last:  # a signal during a long write: stop on this step's checkpoint, not one
                    stop = signals.agreed(job.device)  # step and a second write later
            if job.rank == 0 and not stop and (step % args.eval_every == 0 or step == args.steps):
                figure = evaluate(args, job)
            if step == args.stop_at:
                break
            if stop:
                raise Stopped(f"stopped by {signal.Signals(stop).name} after step {step} of {args.steps}; "
                              f"checkpoint {job.ckpt_path}", stop)
    if job.rank == 0 and first == args.steps:  # --resume of a finished run (its last pictures failed): draw them
        figure = evaluate(args, job)
    if job.rank == 0:
        print(f"{job.step} steps in {time.time() - job.t_start:.0f} s; checkpoint {job.ckpt_path}"
              + (f"; samples and loss curves {figure}" if figure else ""))


def run(args, replaced=()):
    job = set_up(args)  # every check of the method, data and network; an --overwrite deletes after its first step
    job.replaced = replaced
    if args.sample is not None:  # --sample: the EMA weights of the checkpoint draw samples into an .npz
        try:
            job.net.load_state_dict(job.ckpt["ema"])
            job.ckpt = None
        except LOAD_ERRORS:
            raise Fail(job.fits)
        return sample_to_npz(args, job.method, job.net.eval(), job.data, job.rank, job.world, job.device)
    resume(args, job)
    train(args, job)


def resume_command(argv):
    """The command line that continues this run: its own arguments with --resume, without --overwrite."""
    script, argv = (sys.argv[0], sys.argv[1:]) if argv is None else ("train.py", [str(a) for a in argv])
    resume = [] if any(len(a) > 4 and "--resume".startswith(a) for a in argv) else ["--resume"]
    argv = [a for a in argv if not (len(a) > 3 and "--overwrite".startswith(a))] + resume
    _, world, _ = processes()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if "RANK" not in os.environ:
        python = os.path.basename(sys.executable)
        launch = [python if shutil.which(python) else sys.executable]
    elif world == local:
        launch = ["torchrun", f"--nproc_per_node={world}"]
    else:  # several machines: the rendezvous options are the job's own
        launch = ["torchrun", f"--nnodes={world // local}", f"--nproc_per_node={local}", "<your rendezvous options>"]
    return shlex.join(launch + [script] + argv)


# ----------------------------------------------------------------------------------------------------------
# EMA, checkpoints, the log, the output folder and its lock, stop signals


@torch.no_grad()
def update_ema(ema, net, decay):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def seed_streams(seed):  # torch (the CPU and every GPU), numpy and random
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state():  # tensors, numbers and plain lists only, so that torch.load(weights_only=True) can read it
    np_state, py_state = np.random.get_state(), random.getstate()  # with their cached second Gaussian draws
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                numpy=torch.from_numpy(np_state[1].astype(np.int64)), numpy_pos=int(np_state[2]),
                numpy_gauss=[int(np_state[3]), float(np_state[4])], python=list(py_state[1]), python_gauss=py_state[2])


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    has_gauss, cached = s.get("numpy_gauss", (0, 0.0))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], has_gauss, cached))
    random.setstate((3, tuple(s["python"]), s.get("python_gauss")))


CKPT_KINDS = dict(args=dict, model=dict, ema=dict, opt=dict, method=dict, step=int, time=(int, float), knobs=dict,
                  log_window=dict, rng=list, dtd_acc=list)  # rng, dtd_acc: one entry per process
LOAD_ERRORS = (RuntimeError, ValueError, KeyError, TypeError, IndexError)  # what load_state_dict raises on another
#                                                                            network's weights


def method_knobs(method):  # the method's settings as plain numbers: what a checkpoint records and --resume compares
    return {k: getattr(method, k) for k in mf.RECIPES[method.recipe]}


def opt_fits(state, net):
    """Does an optimizer state dict hold, for each parameter it names, moments of that parameter's shape?"""
    params = list(net.parameters())
    moments = state.get("state", {})
    return isinstance(moments, dict) and all(
        isinstance(i, int) and 0 <= i < len(params) and isinstance(s, dict) and
        all(v.shape == params[i].shape for k, v in s.items() if k != "step" and torch.is_tensor(v))
        for i, s in moments.items())


def load_checkpoint(path, args, method):
    """<out>/ckpt.pt, checked before use: a train.py checkpoint, with what --resume (or --sample) needs, of this
    --data, --model and --recipe; for --resume also of this batch, seed, dropout and method knobs."""
    if not os.path.exists(path):
        raise Fail(f"no checkpoint at {path}; train first, or pass the --out of the run"
                   + ("" if args.sample is not None else " (or --overwrite to start over there)"))
    try:  # weights_only: a checkpoint is tensors and plain containers, never code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # the file may be whole: never advise deleting it
        raise Fail(f"cannot read {path} ({err.strerror or type(err).__name__}); fix that (permissions, the disk, the "
                   "mount) and run again")
    except MemoryError:
        raise Fail(f"not enough memory to load {path}; free some and run again")
    except Exception as err:
        raise Fail(f"{path} is not a readable checkpoint ({type(err).__name__}); delete it or pass another --out")
    need = ("args", "ema") if args.sample is not None else ("args", "model", "ema", "opt", "method", "step", "rng")
    missing = [k for k in need if k not in ckpt] if isinstance(ckpt, dict) else need
    wrong = [] if missing else [k for k, kind in CKPT_KINDS.items() if k in ckpt and not isinstance(ckpt[k], kind)]
    if not missing and not wrong:  # the right kinds, values no run writes (a bool is an int; a run has a process)
        wrong = [k for k, bad in (("step", isinstance(ckpt.get("step"), bool) or ckpt.get("step", 0) < 0),
                                  ("time", not math.isfinite(ckpt.get("time", 0))), ("rng", ckpt.get("rng") == []),
                                  ("args", not {"data", "model", "recipe"} <= ckpt["args"].keys())) if bad]
    if missing or wrong:
        what = (f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else f"no {', '.join(missing)}" if missing
                else f"a wrong {', '.join(wrong)}")
        raise Fail(f"{path} is not a train.py checkpoint ({what}); pass the --out of a train.py run")
    for k in ("data", "model", "recipe"):
        if ckpt["args"].get(k) != getattr(args, k):
            raise Fail(f"{path} was trained with --{k} {ckpt['args'].get(k)}, not {getattr(args, k)}: "
                       f"pass --{k} {ckpt['args'].get(k)} or another --out")
    if ckpt["args"].get("class_cond", args.class_cond) != args.class_cond:  # older checkpoints: no such key
        flag = "--class-cond" if ckpt["args"]["class_cond"] else "--no-class-cond"
        raise Fail(f"{path} was trained with {flag}: pass {flag} or another --out")
    # Resuming: the step places each batch in the data order (step * batch) and seeds its noise, and the schedule
    # counts steps of this batch: another global batch or seed would silently make another run.
    for k in ("batch_size", "seed", "dropout") if args.sample is None else ():
        if ckpt["args"].get(k, getattr(args, k)) != getattr(args, k):
            flag = "--" + k.replace("_", "-")
            raise Fail(f"{path} was trained with {flag} {ckpt['args'][k]}, not {getattr(args, k)}: pass {flag} "
                       f"{ckpt['args'][k]} to resume it (the global batch, split over any number of processes), or "
                       "another --out")
    # ... and the method: --set, --omega, --kappa, --t-lo, --t-hi left out or changed would make another run
    old, new = ckpt.get("knobs"), method_knobs(method)  # older checkpoints: not recorded
    changed = [k for k in new if isinstance(old, dict) and k in old and old[k] != new[k]] if args.sample is None else []
    if changed:
        raise Fail(f"{path} was trained with {', '.join(f'{k}={old[k]}' for k in changed)}, not "
                   f"{', '.join(f'{k}={new[k]}' for k in changed)}: pass the run's own --set (and guidance flags) "
                   "to resume it, or another --out")
    return ckpt


def log_line(h):
    """A log.jsonl line: standard JSON, so a non-finite number (a diverged loss) is written as null."""
    return json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in h.items()}) + "\n"


def append_log(path, h):
    """Append a line in one write; if it fails (disk full), cut the file back, so that no partial line is left."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    size, data = os.fstat(fd).st_size, log_line(h).encode()
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as err:
        os.ftruncate(fd, size)
        raise Fail(f"could not append to {path} ({err.strerror}); make room there and run again, "
                   f"{again(os.path.dirname(path))}")
    finally:
        os.close(fd)


def read_log(path, step):
    """The lines of log.jsonl up to `step` (those logged after the checkpoint go), null read back as NaN. A last
    line without its newline was cut off by a kill or a full disk: it is dropped."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]  # the last piece is empty, or the cut-off line
    except OSError as err:
        raise Fail(f"cannot read {path} ({err.strerror}); move it away (the run goes on without its old log lines)")
    history = []
    for i, s in enumerate(lines):
        try:
            h = json.loads(s)
            if not isinstance(h.get("step"), int) or not all(  # the loss curves' numbers (null: NaN; none: a gap)
                    isinstance(h.get(k, 0.0), (int, float, type(None))) for k in ("loss", "v_loss", "u_loss")):
                raise ValueError
        except (ValueError, AttributeError):
            raise Fail(f"{path} line {i + 1} is not a log line; delete that line and run again")
        if h["step"] <= step:
            history.append({k: math.nan if v is None else v for k, v in h.items()})
    return history


def missing_folders(path):  # the folders that os.makedirs(path) would create, deepest first
    new, d = [], os.path.abspath(path)
    while not os.path.exists(d):
        new, d = new + [d], os.path.dirname(d)
    return new


def remove_empty(folders):  # the folders a run created, deepest first, as long as they are empty
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:  # not empty: the run wrote something
            break


def claim_out(args):
    """--out checked before any work (the lock and the writes by process 0). Training: it must be a writable folder
    not in use by a live run (a lock file, which the system releases when a process dies, even by kill -9), and hold
    no run (a checkpoint, log or pictures) unless --resume or --overwrite. Returns a function that releases it and, with
    --overwrite, the old run's files, which train() deletes only once every other check has passed and the new
    run's first step has a finite loss."""
    out, rank = args.out, processes()[0]
    if os.path.exists(out) and not os.path.isdir(out):
        raise Fail(f"--out {out} is a file, not a folder; pass a folder")
    if rank or (args.sample is not None and not os.path.isdir(out)):  # --sample: load_checkpoint says what is amiss
        return (lambda: None), []
    new = missing_folders(out)  # the folders this run creates: removed again if left empty
    path = os.path.join(out, "train.lock")
    try:
        os.makedirs(out, exist_ok=True)
        if args.sample is not None:  # sampling only adds its .npz; check now that it will be able to
            tempfile.TemporaryFile(dir=out).close()
            npz = sample_path(args)
            if os.path.exists(npz):
                raise Fail(f"{npz} exists (an earlier --sample); move it away first, or pass another --out")
            return (lambda: None), []
        lock, holder = lock_file(path)
        if lock is None:
            raise Fail(f"another run ({holder}) is training in --out {out}; wait for it, stop it (Ctrl-C saves its "
                       f"checkpoint), or pass another --out")
    except OSError as err:  # (a full disk, no permission): leave nothing behind
        remove_empty(new)
        raise Fail(f"cannot write to --out {out} ({err.strerror}); pass a writable folder (or make room there)")

    def release():
        unlock_file(path, lock)
        remove_empty(new)

    pictures = sorted(f for f in os.listdir(out) if re.fullmatch(r"step-\d{7,}\.png", f))  # evaluate's names only
    held = [f for f in ("ckpt.pt", "log.jsonl", "loss.png") if os.path.exists(os.path.join(out, f))] + pictures
    if held and not (args.resume or args.overwrite):
        release()
        names = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise Fail(f"--out {out} already holds a run ({names}); pass --resume to continue it, "
                   f"--overwrite to start over (deleting it), or another --out")
    for f in os.listdir(out):  # save_atomic's temporaries left by a kill -9 (not --sample's: it may be writing)
        if re.search(r"\.tmp-\d+-[0-9a-f]{8}$", f) and not f.startswith("samples-"):
            os.remove(os.path.join(out, f))
    return release, held if args.overwrite else []


def lock_file(path):
    """(fd, None): an exclusive lock on the file path (created if absent; it says who holds it), or (None, those
    words) if a live process holds it. The system drops a lock when its process dies, even by kill -9. On a file
    system without locks: a warning, and (fd, None) all the same."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            return None, holder or "just starting"
        except OSError as err:  # no locks on this file system (NFS without lockd, Lustre without -o flock): go on
            print(f"train.py: warning: no file locks in {os.path.dirname(path) or '.'} ({err.strerror}): another "
                  "process writing there is not detected", file=sys.stderr)
        try:  # its holder may have removed the file between our open and flock: then take a new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
                return fd, None
        except FileNotFoundError:
            pass
        except OSError:  # (a full disk): our lock file, left empty, goes
            unlock_file(path, fd)
            raise
        os.close(fd)


def unlock_file(path, fd):
    try:  # removed before the unlock: a process that opened it meanwhile sees it gone, and retries
        os.remove(path)
    except OSError:  # gone, or the folder became read-only: closing the file still releases the lock
        pass
    os.close(fd)


# The signals that stop a run with a checkpoint: Ctrl-C; SIGTERM (what SLURM, Kubernetes and torchrun send before
# they stop a job); SIGHUP (the terminal closed); SIGUSR1 (SLURM's --signal=USR1@<seconds> warning). Left to their
# default action, the last two end a process at once, without a checkpoint. A signal the parent set to be ignored
# (nohup: SIGHUP; `cmd &` in a script: SIGINT) stays ignored.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1") if hasattr(signal, n))


def heeded(signals):
    return [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]


class StopSignals:
    """While training, a STOP_SIGNALS signal only takes a note: the step finishes (and the next one, for a signal
    after the step's forward: the agreement rides on the step's all-reduce), all processes agree, the checkpoint is
    written, then Stopped. Repeats are ignored: under torchrun each process gets the terminal's Ctrl-C
    and torchrun's copy of it."""

    def __enter__(self):
        self.signum, self.old = 0, {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self.note) for s in heeded(STOP_SIGNALS)}
        return self

    def note(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def agreed(self, device):
        """The signal any process got (0: none), the same number in every process."""
        return most(self.signum, device)


def leave_process_group():
    """destroy_process_group, after a moment without the GIL: gloo's worker threads free each finished collective's
    tensors, which needs the GIL, and torch 2.4 to 2.7 join them holding it. Two-process runs that hung at exit
    without the sleep: 3 of 24 (torch 2.4, 2.6), 20 of 64 with the CPUs busy (2.4: 7 of 16; 2.5.1: 5 of 16; 2.7.0:
    8 of 32); with it, 0 of 88. Every later torch we ran (2.8.0, 2.9.1, 2.10.0, 2.11.0, 2.12.1, 2.13, 2.14.1, 2.15.0)
    without it: 0 of 128 with the CPUs busy (kept: 0.1 s a run)."""
    time.sleep(0.1)
    dist.destroy_process_group()


def most(value, device):
    """The largest of an int over the processes (value itself in one process): a verdict every process shares."""
    if not dist.is_initialized():
        return value
    flag = torch.full((), float(value), device=device)  # filled on the device: no host copy
    dist.all_reduce(flag, dist.ReduceOp.MAX)
    return int(flag.item())


# ----------------------------------------------------------------------------------------------------------
# Samples, pictures and metrics


def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8, the ADM evaluator's layout (gray repeated to RGB)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return x.expand(-1, -1, -1, 3).cpu().numpy()


def load_vae(args, device):
    """The SD-VAE of --vae (diffusers, an optional dependency); Fail with the reason when it cannot be loaded."""
    try:
        from diffusers.models import AutoencoderKL
        from diffusers.utils import logging
        from huggingface_hub.utils import logging as hub_logging  # (diffusers' own dependency)
    except ImportError:
        raise Fail("the SD-VAE needs diffusers (an optional dependency): pip install diffusers")
    for library in (logging, hub_logging):  # their notices (a missing accelerate; offline, the hub's 5 retries and
        library.set_verbosity_error()  #      deprecations of their own arguments) would bury the one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = AutoencoderKL.from_pretrained(args.vae)
    except Exception as err:
        raise Fail(f"could not load the VAE {args.vae!r} ({type(err).__name__}); pass --vae with a local copy "
                   "(offline, HF_HUB_OFFLINE=1 reads the Hugging Face cache without the hub's retries)")
    C, H, _ = IMAGE_DATA["imagenet-latents"]  # of 256 x 256 images: C channels, 1/8 of the side
    channels, factor = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)  # (diffusers' rule)
    if (channels, factor) != (C, 256 // H):  # another VAE would decode these latents into wrong or wrong-sized images
        raise Fail(f"--vae {args.vae} makes {channels}-channel latents at 1/{factor} of the image side, not the "
                   f"SD-VAE's {C} at 1/{256 // H}; pass that VAE (stabilityai/sd-vae-ft-mse or a local copy)")
    return vae.to(device).eval()


@torch.no_grad()
def generate(args, method, net, numbers, steps, device, vae=None, batch=256):
    """Samples number `numbers` of one fixed stream (noise and class depend on the number alone, so any split
    over processes gives the same set): (points (n, 2) float, None) or (images (n, H, W, 3) uint8, labels).
    Labels are balanced, the classes in turn (sample i has class i mod K), as iMF's official sampler takes them;
    MeanFlow's official evaluation draws them at random; iMF samples at args.sample_guidance[steps] (omega,
    interval)."""
    (C, H, _), K = IMAGE_DATA.get(args.data, (2, None, 0)), net.num_classes
    if not len(numbers):  # this process has no share of a --sample smaller than the number of processes
        return np.zeros((0,)), np.zeros((0,), np.int64) if K else None
    xs, ys = [], []
    for chunk in torch.as_tensor(numbers, dtype=torch.long).split(batch):
        e = torch.stack([torch.randn((C, H, H) if H else (C,), generator=torch.Generator().manual_seed(int(i)))
                         for i in chunk + args.seed * 1_000_003]).to(device)
        y = (chunk % K).to(device) if K else None  # the classes in turn
        x = method.sample(net, e, y, steps=steps, **args.sample_guidance.get(steps, {}))
        if args.data == "imagenet-latents":
            shift, scale = (a.to(x.device) for a in latent_normalisation(method.imf))
            # the SD-VAE's decoder needs ~0.2 GB per 256 x 256 image (measured on CPU): VAE_BATCH at a time
            xs.append(np.concatenate([to_uint8(vae.decode(c / scale + shift).sample if vae is not None else c[:, :3])
                                      for c in x.split(VAE_BATCH)]))
        else:
            xs.append(to_uint8(x) if H else x.float().cpu().numpy())
        ys.append(y.cpu().numpy() if K else None)
    return np.concatenate(xs), np.concatenate(ys) if K else None


def sample_guidance(args, method, steps=1):
    """iMF's guidance for sampling in `steps` NFE (pictures and --sample): --sample-omega / --sample-interval, else
    the official setting of this size (meanflow.imf_guidance_2nfe for 2 steps where it has the size, otherwise
    meanflow.imf_guidance, or IMF_PICTURE_GUIDANCE); none without labels. {} for MeanFlow."""
    if not method.imf:
        if args.sample_omega is not None or args.sample_interval:
            raise Fail(f"--sample-omega and --sample-interval need --recipe imf; {args.recipe} bakes guidance in at "
                       "training (--omega, --kappa, --t-lo, --t-hi)")
        return {}
    table = mf.imf_guidance_2nfe if steps == 2 and args.model in mf.imf_guidance_2nfe else mf.imf_guidance
    g = dict(table.get(args.model, IMF_PICTURE_GUIDANCE)) if args.class_cond else {}
    if args.sample_omega is not None:
        g["omega"] = args.sample_omega
    if args.sample_interval:
        g["t_min"], g["t_max"] = args.sample_interval
    if g.get("t_min", 0.0) > g.get("t_max", 1.0):  # each in [0, 1] and omega >= 1: checked with the other numbers
        raise Fail(f"--sample-interval {g['t_min']} {g['t_max']} is not an interval in [0, 1]; "
                   "pass 0 <= T_MIN <= T_MAX <= 1")
    return g


def save_figure(path, panels, history, squares=()):
    """One PNG: 2-D sample sets side by side (over the given squares (x0, y0, side), shaded), then the loss curves
    of log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * len(panels) + 5, 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        for x0, y0, side in squares:
            ax.add_patch(plt.Rectangle((x0, y0), side, side, color="0.9", zorder=0))
        ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
        ax.set_title(title, fontsize=9)
    for k in ("v_loss", "u_loss", "loss"):  # v, u: squared error per element; loss: after the adaptive weight
        axes[0, -1].plot([h["step"] for h in history], [h.get(k, math.nan) for h in history], label=k)
    axes[0, -1].set(xlabel="step", yscale="log", title="loss")
    axes[0, -1].legend()
    fig.tight_layout()
    save_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), run_folder=True)
    plt.close(fig)


def save_grids(path, image_sets, cols=8):
    """Image sets (n, H, W, 3) as cols-wide grids side by side (images under 64 px enlarged, nearest neighbour)."""
    from PIL import Image

    k = max(1, 64 // image_sets[0].shape[1])  # small images (32x32) enlarged, nearest neighbour
    image_sets = [a.repeat(k, 1).repeat(k, 2) for a in image_sets]
    grids = [a.reshape(-1, cols, *a.shape[1:]).swapaxes(1, 2).reshape(-1, cols * a.shape[2], 3) for a in image_sets]
    gap = np.full((grids[0].shape[0], 8, 3), 255, np.uint8)
    image = np.concatenate([g for grid in grids for g in (grid, gap)][:-1], axis=1)
    save_atomic(path, lambda f: Image.fromarray(image).save(f, format="png"), run_folder=True)


def toy_distances(args, points):
    """Energy distance and sliced Wasserstein-2 (256 fixed directions) to a fixed sample of the data (seed 12345):
    no density needed."""
    ref = toy_data.sample(args.data, len(points), generator=torch.Generator().manual_seed(12345))
    points = torch.as_tensor(points)
    return toy_data.energy_distance(points, ref), toy_data.sliced_wasserstein(points, ref)


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two sets of features (rows), or (mu, sigma) pairs."""
    import scipy.linalg

    if any(not isinstance(f, tuple) and len(f) < 2 for f in (f1, f2)):  # one row: a NaN covariance, on which
        raise ValueError("a Frechet distance needs at least 2 rows of features on each side")  # sqrtm never returns
    (mu1, s1), (mu2, s2) = (f if isinstance(f, tuple) else (f.mean(0), np.cov(f, rowvar=False)) for f in (f1, f2))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # sqrtm can fail on a numerically singular product (fewer images than
        eps = 1e-6 * np.eye(len(s1))  # features): as the ADM evaluator, retry with 1e-6 added to both diagonals
        covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real  # the imaginary part is numerical noise
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


FID_DIMS = 2048  # the Inception network's pool features, as the ADM evaluator's


def inception_features(images, device):
    """Pool features (N, 2048) of pytorch-fid's Inception for uint8 (N, H, W, 3) images; None if it is missing.
    It resizes slightly differently from the ADM evaluator's TensorFlow graph: close, not identical numbers."""
    try:
        from pytorch_fid.inception import InceptionV3

        inception = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIMS]]).to(device).eval()
    except Exception as err:
        print(f"FID skipped: no Inception network ({type(err).__name__}); pip install pytorch-fid", file=sys.stderr)
        return None
    with torch.no_grad():
        return torch.cat([inception(torch.from_numpy(images[i: i + 200]).to(device).permute(0, 3, 1, 2) / 255)[0]
                          .flatten(1).double().cpu() for i in range(0, len(images), 200)]).numpy()


def fid(images, ref, device):
    """FID of uint8 images against ref: uint8 images, or the (mu, sigma) of the reference's features (as the ADM
    reference batch stores those of the whole ImageNet training set). None without the Inception network."""
    feats = inception_features(images, device)  # None: no Inception network (then ref is not read either)
    # ref as a tuple: (mu, sigma) of 2048-d features, checked by fid_reference
    ref = ref if feats is None or isinstance(ref, tuple) else inception_features(ref, device)
    return None if feats is None or ref is None else frechet_distance(feats, ref)


def fid_reference(path):
    """--fid-ref as the ADM evaluator reads it: its mu/sigma when present, else its images arr_0 (and a description
    for the report).
    Read and checked before any sample is drawn."""
    try:
        f = np.load(path)
        if not isinstance(f, np.lib.npyio.NpzFile):  # an .npy array under an .npz name
            raise ValueError
        with f:
            if "mu" in f.files and "sigma" in f.files:
                mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
                if mu.shape != (FID_DIMS,) or sigma.shape != (FID_DIMS, FID_DIMS):
                    raise Fail(f"--fid-ref {path}: mu/sigma have shapes {mu.shape}, {sigma.shape}, not those of the "
                               f"Inception network's {FID_DIMS}-d pool features; pass a reference made with them")
                return (mu, sigma), f"the mu/sigma stored in {path}"
            ref = f["arr_0"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        what = "does not exist" if isinstance(err, FileNotFoundError) else "is not a reference .npz"
        raise Fail(f"--fid-ref {path} {what} ({type(err).__name__}); pass a reference .npz with mu/sigma (e.g. ADM's "
                   "VIRTUAL_imagenet256_labeled.npz) or uint8 images arr_0")
    if ref.dtype != np.uint8 or ref.ndim != 4 or ref.shape[3] != 3 or len(ref) < 2:  # 2: a covariance
        raise Fail(f"--fid-ref {path}: arr_0 is {ref.dtype} {ref.shape}, not uint8 N x H x W x 3 images, N >= 2")
    return ref, f"the {len(ref)} images arr_0 of {path}"


def sample_path(args):
    return os.path.join(args.out, f"samples-{args.sample}-nfe{args.sample_steps}.npz")


def sample_to_npz(args, method, net, data, rank, world, device):
    """--sample N: the EMA model's samples as the ADM evaluator reads them (arr_0 images, arr_1 labels)."""
    N, k, ref = args.sample, args.sample_steps, fid_reference_once(args, rank, device)
    vae = load_vae(args, device) if args.data == "imagenet-latents" else None  # latents: decoded to images
    x, y = generate(args, method, net, range(rank * N // world, (rank + 1) * N // world), k, device, vae,
                    batch=-(-args.batch_size // world))
    if world > 1:
        x, y = join_parts(args, x, y, rank, world, device)
    if rank == 0:
        path = save_samples(sample_path(args), x, y)
        print(f"wrote {N} samples ({k}-NFE) to {path}: arr_0 {x.dtype} {x.shape}")
        report_quality(args, x, y, data, ref, path, device)


def fid_reference_once(args, rank, device):
    """fid_reference(--fid-ref), read by process 0 alone (50,000 reference images are 9.8 GB) before any sample is
    drawn; when it refuses, every process stops before writing anything. None without --fid-ref or on others."""
    if not args.fid_ref:
        return None
    ref = refused = None
    try:
        ref = fid_reference(args.fid_ref) if rank == 0 else None
    except Fail as err:
        refused = err
    if most(refused is not None, device):
        raise refused or Fail(f"process 0 refused --fid-ref {args.fid_ref} (its line says why); nothing was written")
    return ref


def join_parts(args, x, y, rank, world, device):
    """Every process leaves its samples in a part file; process 0 joins them in order (the others get theirs back)."""
    run_id = torch.tensor(int.from_bytes(os.urandom(7), "big"), device=device)  # process 0's, for all: part
    dist.broadcast(run_id, 0)  # names of this run alone (another --sample into this folder has its own)
    part = f"{sample_path(args)}.{int(run_id):x}.part{{}}".format
    save_atomic(part(rank), lambda f: np.savez(f, x=x, y=np.zeros(0) if y is None else y))
    dist.barrier()
    if rank == 0:
        parts = [dict(np.load(part(r))) for r in range(world)]
        parts = [p for p in parts if len(p["x"])]  # empty parts (N below the number of processes)
        x, y = (np.concatenate([p[key] for p in parts]) for key in "xy")
        y = y if args.data in IMAGE_DATA and args.class_cond else None
        for r in range(world):
            os.remove(part(r))
    return x, y


def save_samples(path, x, y):
    """The .npz at path, never over another file: if another run took the name while this one sampled, both files
    stay and these samples go to a new name. Returns the path written."""
    def write(f):
        np.savez(f, arr_0=x, **({} if y is None else {"arr_1": y}))

    try:
        save_atomic(path, write, new=True)
    except FileExistsError:
        taken, path = path, f"{path[:-4]}-{os.urandom(3).hex()}.npz"
        save_atomic(path, write, new=True)
        print(f"train.py: {taken} appeared while sampling (another --sample into this folder?); it is left as "
              f"it is, and these samples go to {path}", file=sys.stderr)
    return path


def report_quality(args, x, y, data, ref, path, device):
    """The samples' distance to the data: energy distance and sliced Wasserstein on 2-D toys, else FID against
    --fid-ref or the training images (ImageNet latents: only with --fid-ref)."""
    N = args.sample
    if args.data not in IMAGE_DATA:
        print("energy distance {:.5f}, sliced Wasserstein {:.5f} to {}".format(*toy_distances(args, x), args.data))
    elif args.fid_ref or isinstance(data, Pixels):
        ref, what = ref or (to_uint8(data.x.float() / 127.5 - 1), f"the {len(data)} training images")
        if min(N, 2 if isinstance(ref, tuple) else len(ref)) < 2:  # one image: no covariance
            print(f"FID skipped: {N} samples against {what}; it needs at least 2 on each side (papers: 50000)")
        elif (score := fid(x, ref, device)) is not None:
            labels = f"labels balanced over {len(np.unique(y))} classes" if y is not None else "unconditional"
            print(f"FID {score:.2f} of {N} samples ({labels}) against {what}, with pytorch-fid's Inception. "
                  f"The number to compare with papers: the ADM evaluator (guided-diffusion evaluations/"
                  f"evaluator.py) on {path} and the same reference")
    else:
        print("FID skipped: pass --fid-ref VIRTUAL_imagenet256_labeled.npz (the ADM reference batch)")


# ----------------------------------------------------------------------------------------------------------
# Appendix: ImageNet -> SD-VAE latents, once (--prepare-imagenet). Center crop to 256 as ADM / DiT; we keep the
# posterior (mean, std) of each image and of its mirror image, so that training draws a fresh latent of a random flip
# every time (the official JAX loader keeps a use_flip flag but never applies it: no flips). Shard s of n encodes
# files s, s + n, ...: one job each, or torchrun.


def center_crop(img, size=256):
    from PIL import Image

    img = img.convert("RGB")  # first, as ADM: PIL resizes palette images by nearest neighbour, whatever resample says
    while min(img.size) >= 2 * size:  # ADM's center_crop_arr: halve with a box filter, then bicubic to size
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]  # (size, size, 3) uint8


def load_images(files):
    """DataLoader collate_fn: files -> (B, 3, 256, 256) in [-1, 1], or (file, reason) for the first unreadable one
    (returned, not raised: an exception inside a loader worker would arrive wrapped in its traceback)."""
    from PIL import Image

    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                images.append(torch.tensor(center_crop(img)).permute(2, 0, 1))
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # not an image, truncated, an image
            return f, f"{type(err).__name__}: {err}"  # PIL cannot decode, or one of over 179M pixels (PIL's limit)
    return torch.stack(images).float() / 127.5 - 1


def prepare_imagenet(args):
    rank, world, _ = processes()
    root, n = args.prepare_imagenet, args.num_shards or world
    s = args.shard if args.shard is not None else rank
    if not os.path.isdir(root):
        raise Fail(f"--prepare-imagenet {root} is not a folder; pass ImageNet's train folder (one folder per class)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    K = IMAGE_DATA["imagenet-latents"][2]
    if len(classes) > K:  # the labels are the folders' places in name order: one folder more shifts them all
        raise Fail(f"--prepare-imagenet {root} holds {len(classes)} class folders, not ImageNet's {K} or fewer; "
                   "move the others out (labels are the folders' places in name order)")
    tree = [(os.path.join(c, f), k) for k, c in enumerate(classes)  # (class/file, label) of every image
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith((".jpeg", ".jpg", ".png")) and not f.startswith(".")]  # ._x.JPEG: macOS metadata
    files = tree[s::n]
    if not files:
        raise Fail(f"shard {s} of {n} of {root} holds no images ({len(tree)} in all); pass a class-per-folder tree of "
                   ".jpeg/.jpg/.png" + (f" with at least {n} images, or fewer --num-shards" if tree else ""))
    name = os.path.join(args.data_path, f"shard-{s:05d}-of-{n:05d}.npy")
    other = sorted(f for f in glob.glob(os.path.join(glob.escape(args.data_path), "shard-*-of-*.npy"))
                   if not f.endswith(f"-of-{n:05d}.npy"))
    if other:  # a set of another shard count would mix with this one
        raise Fail(f"--data-path {args.data_path} holds shards of another preparation ({os.path.basename(other[0])}); "
                   "delete them (and their labels-* and tree-*) or pass another --data-path")
    same_tree(args.data_path, n, tree)  # before the VAE loads
    made, lock_path = missing_folders(args.data_path), name[:-len(".npy")] + ".lock"
    try:
        os.makedirs(args.data_path, exist_ok=True)
        lock, holder = lock_file(lock_path)  # one writer per shard: two would share its temporary
    except OSError as err:
        remove_empty(made)
        raise Fail(f"cannot write to --data-path {args.data_path} ({err.strerror}); pass a writable folder")
    if lock is None:
        raise Fail(f"shard {s} of {n} is being encoded by another process ({holder}); wait for it, or stop it")
    try:
        labels = np.array([k for _, k in files])
        if shard_done(name, labels):
            print(f"shard {s} of {n}: already in {name}; delete it to encode it again")
            return
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
        vae = load_vae(args, device)
        loader = torch.utils.data.DataLoader([os.path.join(root, f) for f, _ in files], batch_size=32,
                                             num_workers=args.workers, collate_fn=load_images)
        try:
            encode_shard(vae, loader, name + ".tmp", len(files), device, f"shard {s} of {n}")
            same_tree(args.data_path, n, tree, write=True)  # recorded by the first finished shard
        except BaseException as err:  # a bad image, a full disk, Ctrl-C: no partial shard stays behind
            if os.path.exists(name + ".tmp"):
                os.remove(name + ".tmp")
            if isinstance(err, OSError):
                raise Fail(f"could not write {name} ({err.strerror}); nothing of it was kept; make room in "
                           f"{args.data_path} and run --prepare-imagenet again (finished shards are kept)") from None
            raise
        save_atomic(labels_path(name), lambda f: np.save(f, labels))
        os.replace(name + ".tmp", name)  # the latents last: a shard is there once both files are complete
        print(f"shard {s} of {n}: {len(files)} images of {len(classes)} classes -> {name}")
    finally:
        unlock_file(lock_path, lock)
        remove_empty(made)  # a run that failed before writing anything leaves no new empty folder


def same_tree(folder, n, tree, write=False):
    """Refuse a folder whose shards are of another image tree (names and labels), as recorded by the first shard
    that is finished (tree-of-n.json; write: record it if absent): they would mix silently with this one (label k
    another class in each)."""
    mine = dict(images=len(tree), classes=tree[-1][1] + 1,
                sha256=hashlib.sha256("\n".join(f"{f} {k}" for f, k in tree).encode()).hexdigest())
    path = os.path.join(folder, f"tree-of-{n:05d}.json")
    if write and not os.path.exists(path):
        try:
            save_atomic(path, lambda f: f.write(json.dumps(mine).encode()), new=True)
        except FileExistsError:  # another shard's process recorded it first: compared below
            pass
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if old != mine:
            raise Fail(f"--data-path {folder} holds latents of another image tree ({path}: {old.get('images')} images "
                       f"of {old.get('classes')} classes, not {len(tree)} of {mine['classes']}, or other names); "
                       "delete its shard-*, labels-* and tree-* files, or pass another --data-path")


def shard_done(name, labels):
    """Is a finished shard of these images there (written last, atomically: a restarted job skips it)? None, or
    an unreadable one: no (encoded again). One of other images or latents is refused, not replaced."""
    if not os.path.exists(name):
        return False
    try:
        lat, old = np.load(name, mmap_mode="r"), np.load(labels_path(name))
    except (OSError, ValueError):
        return False
    C, H, _ = IMAGE_DATA["imagenet-latents"]
    if lat.shape != (len(labels), 2, 2, C, H, H) or lat.dtype not in (np.float16, np.float32) \
            or not np.array_equal(old, labels):
        raise Fail(f"{name} holds latents {lat.dtype} {lat.shape} of other images (or of another VAE), not of these "
                   f"{len(labels)}; delete it and {os.path.basename(labels_path(name))} to encode it again")
    return True


def encode_shard(vae, loader, path, n, device, desc):
    """The posterior (mean, std) of every image and its mirror image, into a float16 .npy at path."""
    lat, i = None, 0
    with torch.no_grad():
        for x in tqdm(loader, desc=desc):
            if isinstance(x, tuple):
                raise Fail(f"{x[0]} is not a readable image ({x[1]}); replace it with a readable copy, then run "
                           "--prepare-imagenet again (removing it changes the tree: then delete the finished shards, "
                           "labels-* and tree-* too)")
            post = vae.encode(torch.cat([x, x.flip(3)]).to(device)).latent_dist  # image and mirror in one pass
            both = torch.stack([post.mean, post.std], 1).unflatten(0, (2, len(x))).transpose(0, 1)  # (B, 2, 2, C, h, w)
            if lat is None:  # float16: half the disk (42 GB for ImageNet), rounding 5e-4 relative
                lat = np.lib.format.open_memmap(path, "w+", np.float16, (n, *both.shape[1:]))
                if hasattr(os, "posix_fallocate"):  # the file is sparse: a write into it on a full disk would end
                    with open(path, "r+b") as f:  # the process (SIGBUS); reserving its blocks fails here instead
                        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            lat[i: i + len(x)] = both.cpu().numpy()
            i += len(x)
    lat.flush()


def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def unwind_on_stop_signals():  # the stop signals other than Ctrl-C raise as Ctrl-C does; returns the old handlers
    return {s: signal.signal(s, interrupt) for s in heeded(STOP_SIGNALS) if s != signal.SIGINT}


def out_of_memory(err):  # torch.OutOfMemoryError is a RuntimeError; a failed CPU allocation a RuntimeError ("can't
    #                        allocate memory") or a MemoryError
    return isinstance(err, MemoryError) or re.search(r"out of memory|can't allocate memory", str(err)) is not None


def main(argv=None):
    release, rank, world, args = None, 0, 1, None
    # The other stop signals outside the training loop unwind as Ctrl-C does (lock, temporaries removed). Not under
    # torchrun: a Python handler cannot run while a process waits in a collective for a failed peer, and torchrun's
    # SIGTERM must end such a process at once, as the default action does. --prepare-imagenet has no collectives:
    # there they unwind under torchrun too (no partial shard stays).
    main_thread = threading.current_thread() is threading.main_thread()
    old = unwind_on_stop_signals() if main_thread and "RANK" not in os.environ else {}
    try:
        with suppress(Fail):  # else get_args says so, after the arguments' own errors (and never for --help)
            rank, world, _ = processes()
        args = get_args(argv)
        if args.prepare_imagenet:
            old = old or (unwind_on_stop_signals() if main_thread else {})
            prepare_imagenet(args)
        else:
            release, replaced = claim_out(args)
            run(args, replaced)
        return 0
    except Fail as err:  # one line per process: under torchrun each says it (a failure may be one process's own)
        who = f"process {rank} of {world}: " if world > 1 else ""
        print(f"train.py: error: {who}" + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        sampling = args is not None and args.sample is not None  # the .npz's N samples are held in memory
        fix = ("a smaller --sample (its samples are held in memory) or --batch-size (those drawn at once)" if sampling
               else "a smaller --batch-size (it is split over the processes) or a smaller --model")
        print(f"train.py: error: out of memory ({type(err).__name__}); pass {fix}", file=sys.stderr)
        return 2
    except Stopped as stop:  # a STOP_SIGNALS signal while training: checkpoint written
        if rank == 0:
            print(f"train.py: {stop.args[0]}; resume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + stop.args[1]
    except KeyboardInterrupt as err:  # a signal before training started, or while sampling: every file is whole
        signum = err.args[0] if err.args else signal.SIGINT
        if rank == 0:
            print(f"train.py: stopped by {signal.Signals(signum).name} outside the training loop (no checkpoint to "
                  "write); every output is whole or absent; run the command again", file=sys.stderr)
        return 128 + signum
    finally:
        if release is not None:
            release()
        for s, handler in old.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
