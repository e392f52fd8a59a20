"""pixart-lowvram: PixArt-alpha text-to-image as a staged, resumable generation queue for small GPUs."""

__version__ = "0.1.0"
