"""What every tab shares: the workspace, the job manager, the playground, and error handling."""

from __future__ import annotations

import functools
import logging
import re
import secrets
import threading

import gradio as gr

from studio.errors import StudioError
from studio.jobs import JobManager, JobsView
from studio.paths import Workspace, safe_name

log = logging.getLogger("studio.ui")


SESSION_TOKEN = re.compile(r"^[0-9a-f]{32}$")


class Studio:
    """What every tab shares.

    A single-user studio has one workspace. A shared one (`--share`, a Hugging Face Space, or
    STUDIO_SESSIONS=1) gives each browser its own workspace under `<root>/sessions/<token>/`: the
    token is random, kept in the browser's local storage (so a page refresh keeps it) and bound to
    the page's Gradio session when the page loads. `workspace` and `jobs` resolve per request, so the
    tabs' handlers see their own session's datasets, runs and jobs and nothing else.
    """

    def __init__(self, workspace: Workspace, default_model: str, model_notice: str | None = None,
                 jobs: JobManager | None = None, shared: bool = False):
        self.home = workspace  # the workspace (single user), or the root of the sessions' workspaces
        self.default_model = default_model
        self.model_notice = model_notice
        self.manager = jobs or JobManager()
        self.shared = shared
        self._tokens: dict[str, str] = {}  # Gradio session hash -> browser token
        self._lock = threading.Lock()
        self._playground = None

    @property
    def playground(self):
        if self._playground is None:  # imports torch and diffusers: not at page-serve time
            from studio.generate import Playground

            self._playground = Playground()
        return self._playground

    def bind(self, token: str | None) -> str:
        """Tie the current page to the browser's token (a new one if it has none or a malformed one)."""
        if not SESSION_TOKEN.match(str(token or "")):
            token = secrets.token_hex(16)
        session = _session_hash()
        if session is not None:
            with self._lock:
                self._tokens[session] = token
        return token

    @property
    def session(self) -> str | None:
        """The browser session a handler serves (None in a single-user studio)."""
        if not self.shared:
            return None
        session = _session_hash()
        if session is None:
            return None
        with self._lock:
            return self._tokens.get(session) or "s-" + safe_name(session)

    @property
    def workspace(self) -> Workspace:
        if not self.shared:
            return self.home
        # Outside a request (building the page) a shared studio shows an empty workspace.
        return Workspace(self.home.root / "sessions" / (self.session or "none"))

    @property
    def jobs(self) -> JobsView:
        return JobsView(self.manager, self.session)


def _session_hash() -> str | None:
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    return getattr(request, "session_hash", None) if request is not None else None


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
