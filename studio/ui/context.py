"""What every tab shares: the workspace, the job manager, the playground, and error handling."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import gradio as gr

from studio.errors import StudioError
from studio.jobs import JobManager
from studio.paths import Workspace

log = logging.getLogger("studio.ui")


@dataclass
class Studio:
    workspace: Workspace
    default_model: str  # what the model box starts with
    model_notice: str | None = None
    jobs: JobManager = field(default_factory=JobManager)
    _playground: object = None

    @property
    def playground(self):
        if self._playground is None:  # imports torch and diffusers: not at page-serve time
            from studio.generate import Playground

            self._playground = Playground()
        return self._playground


def friendly(fn):
    """Show a user's mistake as one sentence in the page; log anything else and show its gist."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except StudioError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            log.exception("Handler %s failed", fn.__name__)
            raise gr.Error(f"Something went wrong ({exc.__class__.__name__}: {exc}); the terminal log has details.") from None
    return wrapper
