"""The pocket world: procedural 64x64 scenes with exact captions, and the small models trained on it.

- `world`:  the scene vocabulary, the renderer, captions, the held-out split and the demo concept;
- `nets`:   the architectures (a Stable-Diffusion-shaped VAE, UNet and CLIP text tower; a CLIPModel);
- `fit`:    the training stages (CLIP, its text tower alone, CLIP weighted to shapes, VAE, the VAE's
            decoder alone, UNet) with checkpoints that resume, and the pipeline writer.

The shipped weights live in assets/pocket-sd and assets/pocket-clip; `scripts/train_pocket.py`
retrains them from a seed.
"""

# Bump when the shipped weights change: caches keyed on the built-in model (class images) are redrawn.
POCKET_VERSION = 4
