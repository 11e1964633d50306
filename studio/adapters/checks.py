"""The export self-check: a file written for other tools, read back by an independent loader.

Each adapter module's `export(adapter_dir, pipe)` writes the community-format file(s) and returns
one ExportReport per file; the training run stores them in `export_check.yaml` beside the adapter
and reports them, so a user learns at once whether AUTOMATIC1111 / ComfyUI / kohya will read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

EXPORT_CHECK = "export_check.yaml"


@dataclass
class ExportReport:
    file: str  # file name inside the adapter folder
    format: str  # e.g. "kohya", "lycoris", "a1111-embedding"
    loader: str  # the independent code that read it back, e.g. "diffusers kohya converter"
    missing_keys: list[str] = field(default_factory=list)  # expected but not found by the loader
    unexpected_keys: list[str] = field(default_factory=list)  # found but not understood by the loader
    max_abs_diff: float | None = None  # UNet output, loader's copy vs the studio's, same input and scale
    tolerance: float = 1e-4
    note: str = ""  # why a check could not run, in one sentence
    # A lossy export (a LoRA extracted from a full fine-tune, studio.adapters.extract): what it costs,
    # measured on the UNet's output against the model it approximates. Empty for exact exports.
    approximation: dict = field(default_factory=dict)
    # The file through each client's own rules (studio.adapters.clients): ComfyUI, AUTOMATIC1111, kohya,
    # with matched/total keys, the output against the studio's and whether the studio recommends the file
    # for that client. Every recommended client must apply it exactly for the report to be ok.
    clients: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.missing_keys and not self.unexpected_keys and self.max_abs_diff is not None
                and self.max_abs_diff <= self.tolerance
                and all(c["exact"] for c in self.clients if c["recommended"]))

    def clients_summary(self) -> str:
        from studio.adapters.clients import summary

        return "; ".join(summary(c) for c in self.clients)

    def summary(self) -> str:
        if self.ok and self.approximation:
            a = self.approximation
            return (f"{self.file} ({self.format}, rank {a['rank']}) reloads through {self.loader}; against the "
                    f"fine-tuned model its UNet output differs by {a['relative_output_diff']:.1%} of what the "
                    f"fine-tune changed (mean {a['unet_output_mean_abs_diff']:.2e}, max "
                    f"{a['unet_output_max_abs_diff']:.2e}); not in it: {a['not_in_the_lora']}.")
        clients = f" Clients: {self.clients_summary()}." if self.clients else ""
        if self.ok:
            return (f"{self.file} ({self.format}) reloads through {self.loader}: same output "
                    f"(max diff {self.max_abs_diff:.1e}).{clients}")
        if self.note:
            return f"{self.file} ({self.format}) was not verified: {self.note}"
        parts = []
        if self.missing_keys or self.unexpected_keys:
            parts.append(f"{len(self.missing_keys)} missing and {len(self.unexpected_keys)} unexpected keys")
        if self.max_abs_diff is not None and self.max_abs_diff > self.tolerance:
            parts.append(f"output differs by up to {self.max_abs_diff:.1e}")
        parts += [f"{c['client']} does not apply it exactly" for c in self.clients if c["recommended"] and not c["exact"]]
        return f"{self.file} ({self.format}) does not round-trip through {self.loader}: {', '.join(parts)}.{clients}"


def write_reports(adapter_dir: Path, reports: list[ExportReport]) -> None:
    data = [dict(asdict(r), ok=r.ok) for r in reports]
    (Path(adapter_dir) / EXPORT_CHECK).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def read_reports(adapter_dir: Path) -> list[ExportReport]:
    path = Path(adapter_dir) / EXPORT_CHECK
    if not path.exists():
        return []
    rows = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    return [ExportReport(**{k: v for k, v in row.items() if k != "ok"}) for row in rows]
