"""The pocket world and the training of the small models on it (not part of the studio runtime).

- `world`:   the scene vocabulary, the renderer, captions, the held-out split and the demo concept;
- `nets`:    the architectures (a Stable-Diffusion-shaped VAE, UNet and CLIP text tower; a CLIPModel);
- `fit`:     the training stages (CLIP, its text tower alone, CLIP weighted to shapes, VAE, the VAE's
             decoder alone, UNet) with checkpoints that resume, and the pipeline writer;
- `quality`: the measures the model card quotes (bench/bench_pocket.py, tests/test_pocket.py).

The shipped weights live in assets/pocket-sd and assets/pocket-clip; `scripts/train_pocket.py`
retrains them from a seed. The studio loads those folders and never imports this package; the one
thing both sides share, the weights' version (`studio.models.POCKET_VERSION`, which keys the caches
made from the built-in model), lives in the runtime; scripts/train_pocket.py stamps it into what it writes.
"""
