"""Concept Studio: teach Stable Diffusion a personal concept from a few photos, then measure it.

The package root stays import-light (no torch, no diffusers) so the app serves its page quickly;
heavy libraries are imported inside the functions that need them.
"""

__version__ = "0.1.0"
