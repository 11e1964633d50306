"""What every tab shares: the workspace, the job manager, the playground, and error handling."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr

from studio.errors import StudioError
from studio.jobs import JobManager, JobsView
from studio.paths import Workspace, safe_name

log = logging.getLogger("studio.ui")


SESSION_TOKEN = re.compile(r"[0-9a-f]{32}")  # always fullmatch: `$` would let "<token>\n" through
# Base models a shared studio's host allows besides 'builtin' and hub ids: names or absolute paths,
# separated by commas (e.g. STUDIO_ALLOWED_MODELS=/models/sd15.safetensors,/models/anime-xl).
ALLOWED_MODELS_ENV = "STUDIO_ALLOWED_MODELS"
NO_SESSION = ("This studio is shared and every request needs its own session; connect through the page or "
              "gradio_client (which opens a session), not a bare POST.")


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
        if not isinstance(token, str) or not SESSION_TOKEN.fullmatch(token):
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
        request = _request()
        if request is None:
            return None
        session = getattr(request, "session_hash", None)
        if not session:  # a bare POST /gradio_api/run/...: no session of its own, so no workspace at all
            raise StudioError(NO_SESSION)
        with self._lock:
            return self._tokens.get(session) or "s-" + safe_name(session)

    @property
    def workspace(self) -> Workspace:
        if not self.shared:
            return self.home
        # Outside a request (building the page) a shared studio shows an empty workspace.
        return Workspace(self.home.root / "sessions" / (self.session or "none"))

    # ------------------------------------------------------------------ what a user may name
    # A single-user studio takes any path and model the user names: it is their machine. A shared one
    # takes only what is inside the session's own workspace, and base models that are 'builtin', hub ids
    # or on the host's list; every refusal is the same sentence whether the path exists or not.

    def user_folder(self, text: str, what: str) -> Path:
        """A folder a user named: as given (single user), or inside their own workspace (shared)."""
        path = Path(str(text)).expanduser()
        if not self.shared:
            return path
        root = self.workspace.root.resolve()
        inside = (root / path).resolve()  # an absolute path replaces root; '..' and symlinks are followed
        if inside != root and root not in inside.parents:
            raise StudioError(f"In a shared studio, {what} must be inside your own workspace (a name or a path "
                              f"within it); '{text}' is not.")
        return inside

    def user_model(self, text: str | None, what: str = "the base model", extra: tuple[str, ...] = ()) -> str:
        """A model a user named (base model, CLIP, DINO): as given (single user); in a shared studio
        'builtin', a hub id, a name on the host's list, or a file or folder inside their own workspace."""
        from studio import models

        name = (text or "").strip()
        if not self.shared or not name or name in (models.BUILTIN, models.TINY, models.BUILTIN_SDXL, *extra):
            return name
        if name in allowed_models():
            return name
        parts = name.split("/")
        hub_like = len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts)
        if hub_like and not Path(name).exists() and ".." not in parts:
            return name
        try:
            return str(self.user_folder(name, what))
        except StudioError:
            pass
        raise StudioError(f"In a shared studio, {what} must be 'builtin', a model hub id such as "
                          f"'{models.DEFAULT_HUB_MODEL}', or one the host allows ({ALLOWED_MODELS_ENV}); "
                          f"'{name}' is none of these.")

    def confine(self, values: dict) -> dict:
        """Training settings with every model and path a user gave checked (see user_folder, user_model)."""
        values = dict(values)
        if "model" in values:
            values["model"] = self.user_model(values["model"])
        if values.get("dataset"):
            values["dataset"] = str(self.dataset_folder(values["dataset"]))
        if values.get("class_data_dir"):
            values["class_data_dir"] = str(self.user_folder(values["class_data_dir"], "the class image folder"))
        if values.get("vae"):
            values["vae"] = self.user_model(values["vae"], "the VAE")
        if values.get("extra_datasets"):
            values["extra_datasets"] = [str(self.dataset_folder(d)) for d in values["extra_datasets"]]
        return values

    def dataset_folder(self, choice: str) -> Path:
        """A dataset the user chose: a name in their workspace, or a folder path (inside it, when shared)."""
        path = Path(str(choice))
        if not path.is_absolute() and len(path.parts) == 1:
            return self.workspace.dataset(str(choice)).root
        return self.user_folder(str(choice), "the dataset")

    # ------------------------------------------------------------------ files shown in the page

    def servable(self, path) -> str:
        """A workspace file as Gradio may serve it. A shared studio does not let Gradio serve its
        workspace folder (every file in it would be open to anyone with its path); Gradio copies a
        file a handler returns into its own cache, under a hash of the content, and serves that copy
        alone. It copies only from the working directory or the temp folder, so a workspace elsewhere
        is first copied into the temp folder."""
        path = Path(path)
        if not self.shared or not path.exists():
            return str(path)
        resolved = path.resolve()
        roots = (Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve())
        if any(r in resolved.parents for r in roots) and not resolved.name.startswith("."):
            return str(resolved)
        stat = resolved.stat()
        key = hashlib.sha256(f"{resolved}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:24]
        served = Path(tempfile.gettempdir()) / "concept-studio-served"
        copy = served / key / resolved.name.lstrip(".")
        if not copy.exists():
            _prune(served)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(resolved, copy)
        return str(copy)

    @property
    def jobs(self) -> JobsView:
        return JobsView(self.manager, self.session)


def _request():
    from gradio.context import LocalContext

    return LocalContext.request.get(None)


def _session_hash() -> str | None:
    request = _request()
    return getattr(request, "session_hash", None) if request is not None else None


_pruned = {"at": 0.0}


def _prune(served: Path) -> None:
    """Delete copies made for the page once they are as old as Gradio's own temporary files may get
    (looked for at most every few minutes)."""
    import time

    from studio import limits

    now = time.time()
    if now - _pruned["at"] < limits.CLEAN_EVERY_S or not served.is_dir():
        return
    _pruned["at"] = now
    for folder in served.iterdir():
        try:
            if now - folder.stat().st_mtime > limits.UPLOAD_KEEP_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def allowed_models() -> list[str]:
    """The base models a shared studio's host allows besides 'builtin' and hub ids."""
    return [m.strip() for m in os.environ.get(ALLOWED_MODELS_ENV, "").split(",") if m.strip()]


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
