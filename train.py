"""Train a MeanFlow one-step generator: one script from a 2-D toy on a laptop to ImageNet latents on many GPUs.

  python train.py                                                # 2-D checkerboard, MLP, CPU, about a minute
  python train.py --data moons --recipe meanflow                 # any toy_data set, any recipe
  python train.py --data fashion-mnist --model Ti/4 --recipe improved-minsnr --batch-size 32 --lr 1e-3 \\
      --ema 0.99 --steps 600 --eval-every 200                    # CPU: 15-40 min, garments recognisable
  torchrun --nproc_per_node=8 train.py --data cifar10 --model B/2          # downloads CIFAR-10 into data/cifar10
  torchrun --nproc_per_node=8 train.py --prepare-imagenet /data/imagenet/train --data-path data/imagenet-latents
  torchrun --nproc_per_node=8 train.py --data imagenet-latents --model XL/2 --recipe improved-dtd
  torchrun --nproc_per_node=8 train.py --data imagenet-latents --model XL/2 --sample 50000   # ADM-format .npz
The same command with --resume continues from <out>/ckpt.pt (on CPU bitwise as if never stopped).

Output in --out: log.jsonl (a line per --log-every steps), step-XXXXXXX.png (1-NFE and 2-NFE samples of the EMA
model; beside the data and the loss curves for 2-D toys, with loss.png for images), ckpt.pt (written atomically).
Defaults marked (paper) are the MeanFlow paper's ImageNet settings; (toy) marks the 2-D toys' own.
Bad input ends with one line on stderr, exit code 2, and no half-written file.
"""

import argparse
import copy
import glob
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import sys
import tarfile
import time
import urllib.request
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import meanflow as mf
import toy_data

IMAGE_DATA = {"fashion-mnist": (1, 32, 10), "cifar10": (3, 32, 10), "imagenet-latents": (4, 32, 1000)}  # C, H, K
DATA_PATHS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist",  # Debian package dataset-fashion-mnist
              "cifar10": "data/cifar10", "imagenet-latents": "data/imagenet-latents"}
CIFAR_URL, CIFAR_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
LATENT_SCALE = 0.18215  # SD-VAE latents times this have about unit variance (as DiT, MeanFlow)
PAPER = dict(recipe="improved-dtd", batch_size=256, lr=1e-4, ema=0.9999, log_every=100, eval_every=10_000,
             ckpt_every=10_000)
# 2-D toys: a minute on 2 CPU cores. DTD's 20 stages of >= 200 steps outlast such a run (measured on the
# checkerboard, 5000 steps: 1-NFE energy distance 0.0046 with improved-dtd, 0.0027 with meanflow).
TOY = dict(recipe="meanflow", batch_size=256, lr=2e-3, ema=0.995, log_every=100, steps=3000)  # eval, save at the end
LOG_KEYS = ("loss", "v_loss", "u_loss", "beta", "dtd_stage")


class Fail(Exception):
    """A problem the user can fix (bad input, diverged run): main prints it as one line and exits with 2."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--data", default="checkerboard", help=f"{', '.join(toy_data.DATASETS)} (2-D) or {', '.join(IMAGE_DATA)}")
    a("--data-path", help="data folder (default " + ", ".join(f"{p} for {d}" for d, p in DATA_PATHS.items()) + ")")
    a("--model", help="'mlp' for 2-D data (default there), else a DiT size of meanflow.DiT_models (default B/4)")
    a("--recipe", help=f"{', '.join(mf.RECIPES)} (default improved-dtd; toy meanflow: DTD outlasts a 1-minute run)")
    a("--steps", type=int, help="optimizer steps (default: 240 epochs, paper; toy 3000)")
    a("--batch-size", type=int, help="global batch, split over processes (default 256, paper and toy)")
    a("--lr", type=float, help="AdamW learning rate, constant after warmup (default 1e-4, paper; toy 2e-3)")
    a("--warmup", type=int, default=0, help="linear learning-rate warmup steps (default 0, paper)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0, paper); betas (0.9, 0.95)")
    a("--ema", type=float, help="EMA decay of the weights that make samples (default 0.9999, paper; toy 0.995)")
    a("--omega", type=float, help="guidance scale in the target (default: paper, per size: meanflow.paper_guidance)")
    a("--kappa", type=float, help="guidance mixing kappa (default: paper, per size: meanflow.paper_guidance)")
    a("--t-lo", type=float, help="start of the guidance interval (default: paper, per size: meanflow.paper_guidance)")
    a("--t-hi", type=float, help="end of the guidance interval (default: paper, per size: meanflow.paper_guidance)")
    a("--seed", type=int, default=0, help="seed; process k of n draws its noise from seed * n + k (default 0)")
    a("--out", help="output folder (default runs/<data>-<model>-<recipe>)")
    a("--log-every", type=int, help="steps between log lines (default 100)")
    a("--eval-every", type=int, help="steps between sample grids (default 10000; toy: at the end)")
    a("--ckpt-every", type=int, help="steps between checkpoints (default 10000; toy: at the end)")
    a("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    a("--stop-at", type=int, help="checkpoint and exit after this step, as a preempted job would (default never)")
    a("--precision", choices=["bf16", "fp32"], help="autocast dtype (default bf16 on GPU, with TF32; fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the loss (default off): the forward-mode pass runs "
      "eagerly (Dynamo would drop meanflow.py's jvp rules); the guidance forwards and the rest compile")
    a("--sample", type=int, metavar="N", help="write N samples of the EMA model in <out>/ckpt.pt to an .npz, exit")
    a("--sample-steps", type=int, default=1, help="NFE of --sample (default 1)")
    a("--sample-omega", type=float, help="guidance scale at sampling for iMF, which takes it as input (default 1)")
    a("--fid-ref", help="reference .npz (arr_0 uint8 NxHxWx3) for FID (default: the training images)")
    a("--prepare-imagenet", metavar="DIR", help="encode a class-per-folder image tree to latents in --data-path")
    a("--shard", type=int, help="--prepare-imagenet: the shard to encode (default RANK under torchrun, else 0)")
    a("--num-shards", type=int, help="--prepare-imagenet: number of shards (default WORLD_SIZE, else 1)")
    a("--vae", default="stabilityai/sd-vae-ft-mse", help="diffusers AutoencoderKL name or folder (default: paper's)")
    a("--workers", type=int, default=4, help="--prepare-imagenet: image-decoding processes (default 4)")
    args = p.parse_args(argv)

    toy = args.data in toy_data.DATASETS
    if not toy and args.data not in IMAGE_DATA:
        raise Fail(f"unknown --data {args.data!r}; choose one of: {', '.join([*toy_data.DATASETS, *IMAGE_DATA])}")
    args.model = args.model or ("mlp" if toy else "B/4")
    if args.model != "mlp" and args.model not in mf.DiT_models:
        raise Fail(f"unknown --model {args.model!r}; choose 'mlp' or one of: {', '.join(mf.DiT_models)}")
    if (args.model == "mlp") != toy:
        raise Fail(f"--model {args.model} does not fit --data {args.data}: 'mlp' is for 2-D data, a DiT for images")
    for k, v in (TOY if toy else PAPER).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.recipe not in mf.RECIPES:
        raise Fail(f"unknown --recipe {args.recipe!r}; choose one of: {', '.join(mf.RECIPES)}")
    args.data_path = args.data_path or DATA_PATHS.get("imagenet-latents" if args.prepare_imagenet else args.data)
    args.out = args.out or os.path.join("runs", f"{args.data}-{args.model.replace('/', '')}-{args.recipe}")
    world = int(os.environ.get("WORLD_SIZE", 1))  # checked before any process group exists: all fail alike
    if args.batch_size % world and not args.prepare_imagenet:
        raise Fail(f"--batch-size {args.batch_size} does not split over {world} processes; pass a multiple of {world}")
    return args


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
    except (OSError, ValueError, EOFError, IndexError):
        raise Fail(f"{path} is not a valid IDX file (truncated or not uint8 IDX); re-install or re-download it")
    return data.reshape(dims)


def load_fashion_mnist(path):
    found = []
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        files = [f for f in (os.path.join(path, name), os.path.join(path, name + ".gz")) if os.path.exists(f)]
        if not files:
            raise Fail(f"no {name}[.gz] in {path}: apt-get install dataset-fashion-mnist, or pass --data-path")
        found.append(read_idx(files[0]))
    x, y = found
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (len(x),):
        raise Fail(f"Fashion-MNIST in {path} has images {x.shape} and labels {y.shape}, not (N, 28, 28) and (N,)")
    return np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None], y  # (N, 1, 32, 32): padded with background to 32x32


def load_cifar10(path, rank):
    """The official python tarball; process 0 downloads it when absent (and checks its md5)."""
    tar_path = os.path.join(path, "cifar-10-python.tar.gz")
    if rank == 0 and not os.path.exists(tar_path):
        print(f"downloading {CIFAR_URL} to {path}")
        try:
            with urllib.request.urlopen(CIFAR_URL, timeout=30) as r:
                raw = r.read()
            if hashlib.md5(raw).hexdigest() != CIFAR_MD5:
                raise OSError("md5 mismatch")
        except OSError as err:
            raise Fail(f"could not download CIFAR-10 ({err}); put cifar-10-python.tar.gz from {CIFAR_URL} in {path}")
        save_atomic(tar_path, lambda f: f.write(raw))
    if dist.is_initialized():
        dist.barrier()
    xs, ys = [], []
    try:  # data_batch_1..5: Python-2 pickles of {b'data': uint8 (10000, 3072), b'labels': [int]}
        with tarfile.open(tar_path) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if os.path.basename(m.name).startswith("data_batch_"):
                    d = pickle.load(tar.extractfile(m), encoding="bytes")
                    xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
                    ys.append(np.asarray(d[b"labels"], np.int64))
    except (OSError, tarfile.TarError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
        raise Fail(f"{tar_path} is not the CIFAR-10 python tarball ({type(err).__name__}); delete it to re-download")
    if not xs:
        raise Fail(f"{tar_path} holds no data_batch_* files; delete it to re-download")
    return np.concatenate(xs), np.concatenate(ys)


class Pixels:
    """Fashion-MNIST or CIFAR-10 in memory, uint8 (N, C, 32, 32); batches in [-1, 1]."""

    def __init__(self, x, y, flip):
        self.x, self.labels, self.flip = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), flip

    def __len__(self):
        return len(self.labels)

    def get(self, idx, g):
        x = self.x[idx].float() / 127.5 - 1
        if self.flip:  # random horizontal flips on CIFAR-10, as py-meanflow
            x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
        return x, self.labels[idx]


class ImageNetLatents:
    """Memory-mapped --prepare-imagenet output: shard-i-of-n.npy (N, 2 flips, [mean, std], 4, 32, 32), labels-*."""

    def __init__(self, path):
        files = sorted(glob.glob(os.path.join(path, "shard-*-of-*.npy")))
        if not files or len(files) != int(files[0].rsplit("-of-", 1)[1][:-4]):
            raise Fail(f"{path} holds {len(files)} latent shards, not a complete set; "
                       f"run train.py --prepare-imagenet IMAGENET/train --data-path {path}")
        try:
            self.lat = [np.load(f, mmap_mode="r") for f in files]
            self.labels = np.concatenate([np.load(f.replace("shard-", "labels-")) for f in files])
        except (OSError, ValueError) as err:
            raise Fail(f"latents in {path} are unreadable ({type(err).__name__}); re-run --prepare-imagenet")
        self.start = np.cumsum([0] + [len(a) for a in self.lat])
        if self.start[-1] != len(self.labels) or self.lat[0].shape[1:3] != (2, 2):
            raise Fail(f"latents in {path} do not match their labels; re-run --prepare-imagenet")

    def __len__(self):
        return len(self.labels)

    def get(self, idx, g):
        idx = idx.numpy()
        rows = np.empty((len(idx), *self.lat[0].shape[1:]), np.float32)  # (B, 2, 2, C, H, W)
        for s, a in enumerate(self.lat):
            m = (idx >= self.start[s]) & (idx < self.start[s + 1])
            rows[m] = a[idx[m] - self.start[s]]
        flip = torch.randint(0, 2, (len(idx),), generator=g)  # the image or its mirror image
        mean, std = torch.from_numpy(rows)[torch.arange(len(idx)), flip].unbind(1)
        x = (mean + std * torch.randn(mean.shape, generator=g)) * LATENT_SCALE  # a fresh draw of the posterior
        return x, torch.from_numpy(self.labels[idx])


def load_data(args, rank):
    if args.data in toy_data.DATASETS:
        return None
    if args.data != "cifar10" and not os.path.isdir(args.data_path):
        raise Fail(f"--data-path {args.data_path} does not exist; pass the folder that holds {args.data}")
    if args.data == "fashion-mnist":
        return Pixels(*load_fashion_mnist(args.data_path), flip=False)
    if args.data == "cifar10":
        return Pixels(*load_cifar10(args.data_path, rank), flip=True)
    return ImageNetLatents(args.data_path)


def get_batch(args, data, step, rank, world):
    """This process's slice of the global batch of `step`: (x, y), y None for the 2-D toys."""
    B, g = args.batch_size, torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    mine = slice(rank * B // world, (rank + 1) * B // world)
    if data is None:  # fresh toy samples every step
        return toy_data.sample(args.data, B, generator=g)[mine], None
    pos = step * B + torch.arange(B)  # places in the endless sequence of per-epoch permutations
    idx = torch.empty(B, dtype=torch.long)
    for epoch in (pos // len(data)).unique().tolist():
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        idx[pos // len(data) == epoch] = perm[pos[pos // len(data) == epoch] % len(data)]
    x, y = data.get(idx, g)
    return x[mine], y[mine]


# ----------------------------------------------------------------------------------------------------------
# ImageNet -> SD-VAE latents, once. Center crop to 256 as ADM / DiT; we keep the posterior (mean, std) of each image
# and of its mirror image, so that training draws a fresh latent of a random flip every time (the official JAX
# loader flips cached latents, a no-op). Shard s of n encodes files s, s + n, ...: one job each, or torchrun.


def center_crop(img, size=256):
    from PIL import Image

    while min(img.size) >= 2 * size:  # ADM's center_crop_arr: halve with a box filter, then bicubic to size
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]  # (size, size, 3) uint8


def load_images(files):  # DataLoader collate_fn: files -> (B, 3, 256, 256) in [-1, 1]
    from PIL import Image

    def one(f):
        with Image.open(f) as img:
            return torch.tensor(center_crop(img)).permute(2, 0, 1)

    return torch.stack([one(f) for f in files]).float() / 127.5 - 1


def prepare_imagenet(args):
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise Fail("--prepare-imagenet needs diffusers (an optional dependency): pip install diffusers")
    root, n = args.prepare_imagenet, args.num_shards or int(os.environ.get("WORLD_SIZE", 1))
    s = args.shard if args.shard is not None else int(os.environ.get("RANK", 0))
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    files = [(os.path.join(root, c, f), k) for k, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith((".jpeg", ".jpg", ".png"))][s::n]
    if not files:
        raise Fail(f"shard {s} of {n} of {root} holds no images; pass a class-per-folder tree of .jpeg/.jpg/.png")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    except (OSError, ValueError) as err:
        raise Fail(f"could not load the VAE {args.vae!r} ({type(err).__name__}); pass --vae with a local copy")
    loader = torch.utils.data.DataLoader([f for f, _ in files], batch_size=32, num_workers=args.workers,
                                         collate_fn=load_images)
    name, lat, i = os.path.join(args.data_path, f"shard-{s:05d}-of-{n:05d}.npy"), None, 0
    os.makedirs(args.data_path, exist_ok=True)
    with torch.no_grad():
        for x in tqdm(loader, desc=f"shard {s} of {n}"):
            post = vae.encode(torch.cat([x, x.flip(3)]).to(device)).latent_dist  # image and mirror in one pass
            both = torch.stack([post.mean, post.std], 1).unflatten(0, (2, len(x))).transpose(0, 1)  # (B, 2, 2, C, h, w)
            if lat is None:  # float16: half the disk (42 GB for ImageNet), rounding 5e-4 relative
                lat = np.lib.format.open_memmap(name + ".tmp", "w+", np.float16, (len(files), *both.shape[1:]))
            lat[i: i + len(x)] = both.cpu().numpy()
            i += len(x)
    lat.flush()
    del lat
    save_atomic(name.replace("shard-", "labels-"), lambda f: np.save(f, np.array([k for _, k in files])))
    os.replace(name + ".tmp", name)  # the latents last: a shard is there once both files are complete
    print(f"shard {s} of {n}: {len(files)} images of {len(classes)} classes -> {name}")


# ----------------------------------------------------------------------------------------------------------
# EMA, checkpoints


@torch.no_grad()
def update_ema(ema, net, decay):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def rng_state():  # tensors and plain lists only, so that torch.load(weights_only=True) can read it
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                numpy=torch.from_numpy(np_state[1].astype(np.int64)), numpy_pos=int(np_state[2]),
                python=list(random.getstate()[1]))


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"]))
    random.setstate((3, tuple(s["python"]), None))


def load_checkpoint(path, args):
    if not os.path.exists(path):
        raise Fail(f"no checkpoint at {path}; train first, or pass the --out of the run")
    try:  # weights_only: a checkpoint is tensors and plain containers, never code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise Fail(f"{path} is not a readable checkpoint ({type(err).__name__}); delete it or pass another --out")
    for k in ("data", "model", "recipe"):
        if ckpt["args"][k] != getattr(args, k):
            raise Fail(f"{path} was trained with --{k} {ckpt['args'][k]}, not {getattr(args, k)}: "
                       f"pass --{k} {ckpt['args'][k]} or another --out")
    return ckpt


def save_atomic(path, write):
    """write(file) into path.tmp, then rename: a kill mid-write never leaves a corrupt or half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------------
# Samples, pictures and metrics


def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8, the ADM evaluator's layout (gray repeated to RGB)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return x.expand(-1, -1, -1, 3).cpu().numpy()


def load_vae(args, device):
    try:
        from diffusers.models import AutoencoderKL

        return AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    except Exception as err:  # optional while training: the grids then show latent channels 0-2
        print(f"no VAE to decode latents ({type(err).__name__}): pip install diffusers, check --vae", file=sys.stderr)


@torch.no_grad()
def generate(args, method, net, numbers, steps, device, vae=None, batch=256):
    """Samples number `numbers` of one fixed stream (noise and class depend on the number alone, so any split
    over processes gives the same set): (points (n, 2) float, None) or (images (n, H, W, 3) uint8, labels)."""
    C, H, K = IMAGE_DATA.get(args.data, (2, None, 0))
    xs, ys = [], []
    for chunk in torch.as_tensor(numbers, dtype=torch.long).split(batch):
        e = torch.stack([torch.randn((C, H, H) if H else (C,), generator=torch.Generator().manual_seed(int(i)))
                         for i in chunk + args.seed * 1_000_003]).to(device)
        y = (chunk % K).to(device) if K else None  # the classes in turn
        x = method.sample(net, e, y, steps=steps, **({} if args.sample_omega is None else {"omega": args.sample_omega}))
        if args.data == "imagenet-latents":
            x = vae.decode(x / LATENT_SCALE).sample if vae is not None else x[:, :3]
        xs.append(to_uint8(x) if K else x.float().cpu().numpy())
        ys.append(y.cpu().numpy() if K else None)
    return np.concatenate(xs), np.concatenate(ys) if K else None


def save_figure(path, panels, history):
    """One PNG: 2-D sample sets side by side, then the loss curves of log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * len(panels) + 5, 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
        ax.set_title(title, fontsize=9)
    for k in ("v_loss", "u_loss", "loss"):  # v, u: squared error per element; loss: after the adaptive weight
        axes[0, -1].plot([h["step"] for h in history], [h[k] for h in history], label=k)
    axes[0, -1].set(xlabel="step", yscale="log", title="loss")
    axes[0, -1].legend()
    fig.tight_layout()
    save_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def save_grids(path, image_sets, cols=8):
    """Image sets (n, H, W, 3) as cols-wide grids side by side, at full resolution."""
    from PIL import Image

    k = max(1, 64 // image_sets[0].shape[1])  # small images (32x32) enlarged, nearest neighbour
    image_sets = [a.repeat(k, 1).repeat(k, 2) for a in image_sets]
    grids = [a.reshape(-1, cols, *a.shape[1:]).swapaxes(1, 2).reshape(-1, cols * a.shape[2], 3) for a in image_sets]
    gap = np.full((grids[0].shape[0], 8, 3), 255, np.uint8)
    image = np.concatenate([g for grid in grids for g in (grid, gap)][:-1], axis=1)
    save_atomic(path, lambda f: Image.fromarray(image).save(f, format="png"))


def toy_distances(args, points):
    """Energy distance and sliced Wasserstein-2 to a fresh sample of the data (exact, no density needed)."""
    ref = toy_data.sample(args.data, len(points), generator=torch.Generator().manual_seed(12345))
    points = torch.as_tensor(points)
    return toy_data.energy_distance(points, ref), toy_data.sliced_wasserstein(points, ref)


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two sets of features (rows)."""
    import scipy.linalg

    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the imaginary part is numerical noise
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def fid(images, ref, device):
    """FID on the pool features of pytorch_fid's Inception (optional); None, with a note, without it."""
    try:
        from pytorch_fid.inception import InceptionV3

        inception = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    except Exception as err:
        print(f"FID skipped: no Inception network ({type(err).__name__}); pip install pytorch-fid", file=sys.stderr)
        return None
    with torch.no_grad():
        feats = [torch.cat([inception(torch.from_numpy(a[i: i + 200]).to(device).permute(0, 3, 1, 2) / 255)[0]
                            .flatten(1).double().cpu() for i in range(0, len(a), 200)]).numpy() for a in (images, ref)]
    return frechet_distance(*feats)


def sample_to_npz(args, method, net, data, rank, world, device):
    """--sample N: the EMA model's samples as the ADM evaluator reads them (arr_0 images, arr_1 labels)."""
    N, k, vae = args.sample, args.sample_steps, None
    if args.data == "imagenet-latents" and (vae := load_vae(args, device)) is None:
        raise Fail("--sample on latents needs the VAE to decode them: pip install diffusers, and check --vae")
    x, y = generate(args, method, net, range(rank * N // world, (rank + 1) * N // world), k, device, vae)
    path = os.path.join(args.out, f"samples-{N}-nfe{k}.npz")
    if world > 1:  # every process leaves its part, process 0 joins them in order
        save_atomic(f"{path}.part{rank}", lambda f: np.savez(f, x=x, y=np.zeros(0) if y is None else y))
        dist.barrier()
        if rank == 0:
            parts = [dict(np.load(f"{path}.part{r}")) for r in range(world)]
            x, y = (np.concatenate([p[key] for p in parts]) for key in "xy")
            y = y if args.data in IMAGE_DATA else None
            for r in range(world):
                os.remove(f"{path}.part{r}")
    if rank == 0:
        save_atomic(path, lambda f: np.savez(f, arr_0=x, **({} if y is None else {"arr_1": y})))
        print(f"wrote {N} samples ({k}-NFE) to {path}: arr_0 {x.dtype} {x.shape}")
        if args.data not in IMAGE_DATA:
            print("energy distance {:.5f}, sliced Wasserstein {:.5f} to {}".format(*toy_distances(args, x), args.data))
        elif args.fid_ref or isinstance(data, Pixels):
            ref = np.load(args.fid_ref)["arr_0"] if args.fid_ref else to_uint8(data.x.float() / 127.5 - 1)
            if (score := fid(x, ref, device)) is not None:
                print(f"FID {score:.2f} against {args.fid_ref or 'the training images'} ({len(ref)} images)")
        else:
            print("FID skipped: pass --fid-ref VIRTUAL_imagenet256_labeled.npz (the ADM reference batch)")


# ----------------------------------------------------------------------------------------------------------
# Training


def get_lr(step, args):  # a pure function of the step, so that resuming needs no scheduler state
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr


def run(args):
    # Distributed only under torchrun (RANK set), as in nanoGPT; nccl on GPUs, gloo on CPUs.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif args.model == "mlp" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the toy MLP is too small for threads to pay; on a busy CPU they cost 10-20x
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()

    data = load_data(args, rank)
    args.steps = args.steps or math.ceil(240 * len(data) / args.batch_size)  # 240 epochs (paper)
    args.eval_every, args.ckpt_every = args.eval_every or args.steps, args.ckpt_every or args.steps
    K = IMAGE_DATA[args.data][2] if data is not None else 0
    guidance = dict(mf.paper_guidance.get(args.model, {})) if K else {}  # omega, kappa, interval per size (paper)
    guidance.update({k: getattr(args, k) for k in ("omega", "kappa", "t_lo", "t_hi") if getattr(args, k) is not None})
    toy = mf.TOY_OVERRIDES if data is None else {}  # 2-D data: meanflow.py's own settings for toys
    method = mf.MeanFlow(recipe=args.recipe, **{**toy, **guidance})
    if args.sample_omega is not None and not method.imf:
        raise Fail(f"--sample-omega needs --recipe imf; {args.recipe} bakes guidance in at training (--omega, --kappa)")
    torch.manual_seed(args.seed)  # the same initial weights in every process
    if args.model == "mlp":
        net = mf.MLP(dim=2, **method.net_kwargs).to(device)
    else:
        C, H, _ = IMAGE_DATA[args.data]
        net = mf.DiT_models[args.model](input_size=H, in_channels=C, num_classes=K, **method.net_kwargs).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()  # the weights that make the samples
    adamw = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)  # (paper)
    try:
        opt = torch.optim.AdamW(net.parameters(), **adamw, fused=True)
    except RuntimeError:  # no fused kernel for this device
        opt = torch.optim.AdamW(net.parameters(), **adamw)
    ckpt_path, log_path, step, history = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl"), 0, []
    if args.sample:
        net.load_state_dict(load_checkpoint(ckpt_path, args)["ema"])
        return sample_to_npz(args, method, net.eval(), data, rank, world, device)

    torch.manual_seed(args.seed * world + rank)  # each process its own noise, (t, r) and label drops
    np.random.seed(args.seed * world + rank)
    random.seed(args.seed * world + rank)
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, args)
        try:
            net.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
        except RuntimeError:
            raise Fail(f"{ckpt_path} does not fit --model {args.model} (other shapes); pass the run's own settings")
        opt.load_state_dict(ckpt["opt"])
        method.load_state_dict(ckpt["method"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        elif rank == 0:
            print(f"resuming a {len(ckpt['rng'])}-process run on {world}: fresh random streams", file=sys.stderr)
        history = [h for h in map(json.loads, open(log_path)) if h["step"] <= step] if os.path.exists(log_path) else []
        if rank == 0:  # drop the lines logged after the checkpoint
            save_atomic(log_path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))
    vae = load_vae(args, device) if args.data == "imagenet-latents" and rank == 0 else None  # for the pictures

    # Data parallel: DDP's gradient hooks fire through all of the loss's forwards (the plain one, the forward-mode
    # pass on dual tensors, the no-grad guidance one) and one backward (tested against one process on the global
    # batch). The buffers are constants (positions): no broadcast each forward.
    model = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False) if world > 1 else net

    def loss_fn(x, y, progress):
        with autocast:  # the JVP too (an fp32 JVP measured no better; README); meanflow.py sums errors in fp32
            return method.loss(model, x, y, progress=progress)

    if args.compile:
        loss_fn = torch.compile(loss_fn)

    def checkpoint():
        rngs = [rng_state()] * world  # every process's random streams
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
            hi = torch.stack([p.detach().float().sum() for p in net.parameters()])  # replicas still identical?
            lo = hi.clone()
            dist.all_reduce(hi, dist.ReduceOp.MAX)
            dist.all_reduce(lo, dist.ReduceOp.MIN)
            if not torch.equal(hi, lo):
                raise Fail(f"the processes' weights differ at step {step}: their gradients were not synchronised")
        if rank == 0:
            state = dict(model=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step, rng=rngs,
                         method=method.state_dict(), recipe=args.recipe, args=vars(args))
            save_atomic(ckpt_path, lambda f: torch.save(state, f))
        if world > 1:
            dist.barrier()

    def evaluate():
        path = os.path.join(args.out, f"step-{step:07d}.png")
        if data is None:  # data, 1-NFE and 2-NFE samples, loss curves; and the distances to the data
            panels = [(f"data: {args.data}", toy_data.sample(args.data, 2000, torch.Generator().manual_seed(1)))]
            for k in (1, 2):
                x, _ = generate(args, method, ema, range(2000), k, device)
                ed, sw = toy_distances(args, x)
                panels.append((f"{k}-NFE (EMA): energy distance {ed:.4f}, sliced W2 {sw:.3f}", x))
                print(f"step {step}: {k}-NFE energy distance {ed:.4f}, sliced Wasserstein {sw:.3f}")
            save_figure(path, panels, history)
        else:  # 8x8 grids, 1-NFE | 2-NFE, and the loss curves in loss.png
            save_grids(path, [generate(args, method, ema, range(64), k, device, vae)[0] for k in (1, 2)])
            save_figure(os.path.join(args.out, "loss.png"), [], history)
        return path

    acc, t_start, t_log, paused, figure = [], time.time(), time.time(), 0.0, None
    with tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True) as bar:
        while step < args.steps:
            x, y = get_batch(args, data, step, rank, world)
            x, y = x.to(device, non_blocking=True), None if y is None else y.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = get_lr(step, args)
            loss, logs = loss_fn(x, y, step / args.steps)
            # One tiny all-reduce a step: the logged numbers are global, DTD advances on the global v-loss, and
            # all processes see a non-finite loss at the same step and stop before the weights are touched.
            stats = torch.stack([torch.as_tensor(logs.get(k, 1.0 if k == "beta" else math.nan),  # no beta: 1
                                                 dtype=torch.float32, device=device) for k in LOG_KEYS])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            stats = stats.tolist()
            if not math.isfinite(stats[0]):
                last = f"{ckpt_path} is the last good checkpoint" if os.path.exists(ckpt_path) else "no checkpoint yet"
                raise Fail(f"the loss is {stats[0]} at step {step + 1}; stopped, {last}; lower --lr and --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under DDP: gradients averaged over the processes here
            opt.step()
            update_ema(ema, net, args.ema)
            method.dtd_update(stats[1])
            step += 1
            acc.append(stats)
            bar.update()

            if step % args.log_every == 0 or step == args.steps:
                means = [np.mean([a for a in col if math.isfinite(a)] or [math.nan]) for col in zip(*acc)]
                line = dict(step=step, **dict(zip(LOG_KEYS, means)), lr=get_lr(step - 1, args),
                            img_per_s=len(acc) * args.batch_size / (time.time() - t_log - paused),
                            time=time.time() - t_start)
                history.append(line)
                bar.set_postfix(loss=f"{line['loss']:.4f}", v_loss=f"{line['v_loss']:.3f}",
                                u_loss=f"{line['u_loss']:.3f}", beta=f"{line['beta']:.3f}", dtd=int(line["dtd_stage"]),
                                img_s=f"{line['img_per_s']:.0f}")
                if rank == 0:
                    os.makedirs(args.out, exist_ok=True)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(line) + "\n")
                acc, t_log, paused = [], time.time(), 0.0
            t_pause = time.time()
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
                figure = evaluate()
            if step % args.ckpt_every == 0 or step in (args.steps, args.stop_at):
                checkpoint()
            paused += time.time() - t_pause  # img/s counts training alone
            if step == args.stop_at:
                break
    if rank == 0:
        print(f"{step} steps in {time.time() - t_start:.0f} s; checkpoint {ckpt_path}"
              + (f"; samples and loss curves {figure}" if figure else ""))


def main(argv=None):
    try:
        args = get_args(argv)
        prepare_imagenet(args) if args.prepare_imagenet else run(args)
        return 0
    except Fail as err:
        print("train.py: error: " + " ".join(str(err).split()), file=sys.stderr)  # always one line
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
