"""The model a run uses where none is named, and the random-weight model presets by name: a light module, so that
`--help` shows them and a `--gpus` command starts its other processes (standby.py) without importing torch."""

DEFAULT_MODEL = "PixArt-alpha/PixArt-XL-2-1024-MS"

# Each kind of model in two sizes: tiny (seconds on a CPU) and xl (the real checkpoint's shapes). Names are
# SIZE-KIND; plain "tiny" and "xl" are PixArt-XL-2-1024-MS.
PRESET_HELP = {
    "tiny": "PixArt-α 1024 (PixArt-XL-2-1024-MS) in tiny shapes, 256 px images: tests and the demo",
    "tiny-512": "PixArt-α 512 (PixArt-XL-2-512x512) in tiny shapes, 512 px images",
    "tiny-sigma": "PixArt-Σ (300 tokens, SDXL VAE) in tiny shapes, 256 px images",
    "tiny-sigma-2k": "PixArt-Σ 2K (sample size 256) in tiny shapes, 2048 px images",
    "tiny-lcm": "PixArt-LCM (LCM scheduler, 4 steps) in tiny shapes, 256 px images",
    "tiny-dmd": "PixArt-α DMD (one step, DDPM scheduler) in tiny shapes, 256 px images",
    "xl": "PixArt-XL-2-1024-MS shapes (~11 GB; build it on a GPU)",
    "xl-512": "PixArt-XL-2-512x512 shapes",
    "xl-sigma": "PixArt-Sigma-XL-2-1024-MS shapes (SDXL VAE)",
    "xl-sigma-2k": "PixArt-Sigma-XL-2-2K-MS shapes",
    "xl-lcm": "PixArt-LCM-XL-2-1024-MS shapes",
    "xl-dmd": "PixArt-Alpha-DMD-XL-2-512x512 shapes",
}
PRESETS = tuple(PRESET_HELP)
