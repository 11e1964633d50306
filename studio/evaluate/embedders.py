"""The evaluation's CLIP embedder (CLIP-I, CLIP-T), by id: 'builtin', 'tiny', a folder or a hub id.

It is defined in `studio.data.clip` because the dataset audit embeds photos with the same model, and
data comes before evaluate (evaluate imports data, never the reverse). The names stay importable here
for the evaluation's code.
"""

from studio.data.clip import (BUILTIN, DEFAULT_CLIP, POCKET_CLIP_DIR, TINY, TINY_CLIP_VERSION, ClipEmbedder,
                              builtin_clip_dir, normalise, resolve_clip, tiny_clip_dir, write_tiny_clip)

__all__ = ["BUILTIN", "DEFAULT_CLIP", "POCKET_CLIP_DIR", "TINY", "TINY_CLIP_VERSION", "ClipEmbedder",
           "builtin_clip_dir", "normalise", "resolve_clip", "tiny_clip_dir", "write_tiny_clip"]
