"""Settings that could take the machine down are bounded, bad values are one sentence in the CLI, work
before step 1 is proportional to what a step uses, and a run loses little: checkpoints by time,
one on SIGTERM, and a full disk that keeps the earlier checkpoints and says what to do."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from studio import checkpoints, events, limits, train
from studio.config import build_config
from studio.errors import DISK_FULL, StudioError
from studio.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(model="tiny", method="lora", sample_every=0, learning_rate=1e-2, seed=5)


# ----------------------------------------------------------------------------- every setting bounded

@pytest.mark.parametrize("override, field", [
    ("steps=0", "steps"), ("steps=1000000", "steps"), ("batch_size=1000000000", "batch_size"),
    ("repeats=1000000000000", "repeats"), ("resolution=100000", "resolution"), ("learning_rate=nan", "learning_rate"),
    ("learning_rate=inf", "learning_rate"), ("learning_rate=-1e-4", "learning_rate"), ("learning_rate=0", "learning_rate"),
    ("seed=18446744073709551616", "seed"), ("seed=-1", "seed"), ("sample_steps=0", "sample_steps"),
    ("sample_steps=1000000", "sample_steps"), ("gradient_accumulation_steps=1000000", "gradient_accumulation_steps"),
    ("rank=100000", "rank"), ("alpha=nan", "alpha"), ("noise_offset=inf", "noise_offset"),
    ("checkpoint_minutes=nan", "checkpoint_minutes"), ("num_class_images=10000000", "num_class_images"),
])
def test_every_setting_has_a_range_and_says_it(override, field):
    with pytest.raises(StudioError) as caught:
        build_config(values=dict(model="tiny", dataset="x"), overrides=[override])
    message = str(caught.value)
    assert f"'{field}'" in message and message.count(". ") == 0 and message.endswith("."), message


def test_the_largest_allowed_values_still_build():
    cfg = build_config(values=dict(model="tiny", dataset="x", seed=limits.SEED_MAX, steps=limits.MAX_STEPS,
                                   batch_size=256, repeats=1000, resolution=2048, learning_rate=1.0))
    assert cfg.seed == 2**63 - 1 and train.seed_key(cfg.seed * 1_000_003 + 101) < 2**64
    torch.Generator().manual_seed(train.seed_key(cfg.seed * 7919 + 10**6))  # no OverflowError


# ----------------------------------------------------------------------------- setup proportional to a step

def test_batch_draws_cost_the_batch_not_the_epoch(monkeypatch):
    cfg = build_config(values=dict(model="tiny", dataset="x", batch_size=8, repeats=1000, seed=2))
    repeats = torch.tensor([1000, 1000, 1000, 1000, 1000])  # 5 images x 1000 x 1000: 5e6 slots an epoch
    start = time.process_time()
    picks = [train.batch_indices(cfg, 5, step, 0, repeats=repeats) for step in range(1, 51)]
    assert time.process_time() - start < 30  # generous: a list of 5e6 slots per draw would take minutes
    assert all(p.shape == (8,) and int(p.min()) >= 0 and int(p.max()) < 5 for p in picks)
    # the same draws as the explicit list of slots, wherever that list is small enough to make
    small = build_config(values=dict(model="tiny", dataset="x", batch_size=3, seed=2))
    slots = torch.tensor([0, 1, 1, 2, 2, 2])
    for step in range(1, 20):
        assert torch.equal(train.batch_indices(small, 3, step, 0, slots=slots),
                           train.batch_indices(small, 3, step, 0, repeats=torch.tensor([1, 2, 3])))
    # the keyed permutation used for long epochs is a true shuffle: every slot exactly once an epoch
    monkeypatch.setattr(train, "SHUFFLE_LIST_MAX", 0)
    for n in (1, 2, 5, 1000, 4097):
        order = [train._permuted(n, 12345, i) for i in range(n)]
        assert sorted(order) == list(range(n))
    assert [train._permuted(1000, 1, i) for i in range(20)] != [train._permuted(1000, 2, i) for i in range(20)]


def test_a_dataset_with_absurd_repeats_is_one_sentence(dataset_dir, tmp_path):
    from studio.data.dataset import load_dataset

    data = tmp_path / "ds"
    shutil.copytree(dataset_dir, data)
    spec = yaml.safe_load((data / "dataset.yaml").read_text())
    spec["items"][0]["repeats"] = 10**12
    (data / "dataset.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(StudioError, match=r"repeats 1000000000000; repeats are whole numbers from 1 to 1000"):
        load_dataset(data)


def test_settings_are_checked_before_the_model_loads(dataset_dir, tmp_path, monkeypatch):
    from studio import models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(models, "load_pipeline", never)
    bad = [dict(optimizer="adamw8bit"), dict(prior_preservation=True, class_data_dir=str(tmp_path / "empty")),
           dict(model="nobody/no-such-model")]
    (tmp_path / "empty").mkdir()
    for values in bad:
        cfg = build_config(values={**SETTINGS, "dataset": str(dataset_dir), "steps": 2, **values})
        with pytest.raises(StudioError) as caught:
            train.run(cfg, tmp_path / f"run-{len(values)}-{sorted(values)[0]}")
        assert "\n" not in str(caught.value)
    assert not any(tmp_path.glob("run-*/config.yaml"))  # nothing was written either


def test_cancel_while_loading_ends_at_once_with_nothing_to_export(dataset_dir, tiny_model, tmp_path):
    asked = []

    def should_stop():  # pressed while the model loads: every check from the first one on sees it
        asked.append(time.monotonic())
        return True

    cfg = build_config(values={**SETTINGS, "dataset": str(dataset_dir), "steps": 5})
    result = train.run(cfg, tmp_path / "run", should_stop=should_stop)
    assert (result.status, result.step, result.adapter_dir) == ("cancelled", 0, None) and asked
    assert result.message == "Stopped before training step 1; nothing was trained."
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "checkpoints").exists()
    finished = [e for e in events.read_events(tmp_path / "run" / "events.jsonl") if isinstance(e, events.Finished)]
    assert [(e.status, e.step) for e in finished] == [("cancelled", 0)]


def test_a_hub_id_offline_fails_at_once_in_one_sentence(dataset_dir, tmp_path):
    """Without HF_HUB_OFFLINE (the hub simply unreachable, as on this machine), no hub retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-m", "studio", "train", "--model", "nobody/no-such-model", "--dataset",
                           str(dataset_dir), "--out", str(tmp_path / "run"), "--steps", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["error: Base model 'nobody/no-such-model' is not in this machine's model cache and the model "
                     "hub cannot be reached; connect to the internet, name a local folder, or use 'builtin'."], lines
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- one sentence in the CLI

def _cli(args: list[str], capsys) -> tuple[int, str]:
    from studio.__main__ import main

    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("args, needle", [
    (["train", "--model", "tiny", "--steps", "0"], "Setting 'steps' must be greater than 0, got 0."),
    (["train", "--model", "tiny", "--set", "learning_rate=nan"], "'learning_rate' must be a finite number"),
    (["train", "--model", "tiny", "--set", "learning_rate=inf"], "'learning_rate' must be a finite number"),
    (["train", "--model", "tiny", "--steps", "1000000"], "'steps' must be from 1 to 100,000"),
    (["generate", "--model", "tiny", "--steps", "-1"], "Denoising steps must be from 1 to 1,000, got -1."),
    (["generate", "--model", "tiny", "--steps", "0"], "Denoising steps must be from 1 to 1,000, got 0."),
    (["generate", "--model", "tiny", "--steps", "1000000"], "Denoising steps must be from 1 to 1,000"),
    (["generate", "--model", "tiny", "--seed", str(2**64)], "The seed must be from 0 to 9,223,372,036,854,775,807"),
])
def test_bad_cli_values_are_one_sentence(args, needle, capsys, dataset_dir, tmp_path):
    if args[0] == "train":
        args = args + ["--dataset", str(dataset_dir), "--out", str(tmp_path / "run")]
    else:
        args = args + ["--prompt", "a photo", "--out", str(tmp_path / "x.png")]
    code, err = _cli(args, capsys)
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "0"], "Denoising steps must be from 1 to 1,000, got 0."),
    (["--seeds", "0"], "--seeds (images per prompt) must be from 1 to 64, got 0."),
    (["--clip", "nobody/no-such-clip"], "CLIP model 'nobody/no-such-clip' is not in this machine's model cache"),
])
def test_bad_evaluation_values_are_one_sentence_before_loading(extra, needle, capsys, dataset_dir, tmp_path):
    code, err = _cli(["evaluate", "--model", "tiny", "--dataset", str(dataset_dir), "--out", str(tmp_path / "ev"),
                      *extra], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "ev").exists()


def test_a_pickle_renamed_safetensors_is_refused_unread(capsys, tmp_path, tiny_model):
    from studio import adapters
    from studio.adapters import AdapterMeta

    ran = tmp_path / "ran"

    class Payload:  # what a hostile pickle does on load: here, leave a mark
        def __reduce__(self):
            return (Path.touch, (ran,))

    folder = tmp_path / "run" / "adapter"
    folder.mkdir(parents=True)
    adapters.write_meta(folder, AdapterMeta(kind="lora", base_model="tiny", token="sks", class_word="toy", step=1,
                                            rank=4, alpha=4.0, has_scale=True))
    (folder / "pytorch_lora_weights.safetensors").write_bytes(pickle.dumps(Payload()))
    loose = tmp_path / "someones-lora.safetensors"
    shutil.copy(folder / "pytorch_lora_weights.safetensors", loose)
    for adapter in (str(tmp_path / "run"), str(loose)):
        code, err = _cli(["generate", "--model", "tiny", "--adapter", adapter, "--prompt", "a photo", "--steps", "2",
                          "--out", str(tmp_path / "x.png")], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "is not a safetensors file" in err or "pickle" in err, err
    assert not ran.exists() and not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- big photos

def test_a_photo_of_exactly_100_megapixels_is_refused_before_decoding(tmp_path):
    from studio.data.images import open_photo

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "exactly-100mp.png"  # 10000 x 10000 declared; a decode would take over 1 GB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    with pytest.raises(StudioError, match=r"10000×10000 pixels, at or over the 100 megapixel limit"):
        open_photo(path)


def test_caption_files_and_imports_have_limits(tmp_path):
    from studio.data.formats import pair_uploads
    from studio.ui import dataset_tab

    huge = tmp_path / "0001.txt"
    with huge.open("wb") as f:  # 50 MB, sparse: never read
        f.truncate(50 * 1024 * 1024)
    photo = tmp_path / "0001.jpg"
    photo.write_bytes(b"x")
    with pytest.raises(StudioError, match=r"Caption file '0001.txt' is 51,200 KB and a caption may be at most 16 KB"):
        pair_uploads([(photo, "0001.jpg"), (huge, "0001.txt")])
    many = [str(photo)] * (limits.MAX_IMPORT_IMAGES + 1)
    with pytest.raises(StudioError, match=r"201 photos were given and one import takes at most 200"):
        dataset_tab._prepare(many, "sks", "toy", "a photo of {token} {class}", 64, progress=lambda *a, **k: None)


# ----------------------------------------------------------------------------- losing less

def test_checkpoints_are_written_by_time_as_well_as_by_steps(dataset_dir, tiny_model, tmp_path):
    cfg = build_config(values={**SETTINGS, "dataset": str(dataset_dir), "steps": 3, "checkpoint_every": 0,
                               "checkpoint_minutes": 1e-6})  # due after every step
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "completed", result.message
    saved = sorted(p.name for p in RunPaths(result.run_dir).checkpoints.iterdir())
    assert saved == ["step-000001", "step-000002", "step-000003"]
    assert build_config(values=dict(model="tiny", dataset="x")).checkpoint_minutes == 5.0  # on by default


def test_a_full_disk_keeps_the_earlier_checkpoints_and_says_so(dataset_dir, tiny_model, tmp_path, monkeypatch):
    """/dev/full answers every write with ENOSPC: the training state of step 4 is written into it."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    run = tmp_path / "run"
    cfg = build_config(values={**SETTINGS, "dataset": str(dataset_dir), "steps": 6, "checkpoint_every": 2})
    real = checkpoints.write_state

    def onto_a_full_disk(folder, pipe, optimizer, scaler, step, elapsed_s):
        if step == 4:  # the temporary file trainer.yaml is written to (before its rename) is the full device
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{checkpoints.TRAINER}.tmp-{os.getpid()}").symlink_to("/dev/full")
        return real(folder, pipe, optimizer, scaler, step, elapsed_s)

    monkeypatch.setattr(checkpoints, "write_state", onto_a_full_disk)
    target = RunPaths(run).checkpoint(4)
    result = train.run(cfg, run)
    assert result.status == "failed" and result.message == DISK_FULL
    assert result.message == "The disk is full; free space and resume the run (the checkpoints saved before are kept)."
    assert checkpoints.latest(RunPaths(run)).step == 2 and not target.exists()  # the half one is gone
    assert not (run / "error.log").exists()
    monkeypatch.setattr(checkpoints, "write_state", real)  # space was freed
    resumed = train.resume(run)
    assert resumed.status == "completed" and resumed.step == 6, resumed.message


def test_full_disk_errors_are_recognised_as_the_libraries_raise_them(tmp_path):
    from safetensors import SafetensorError

    from studio.errors import disk_full

    with pytest.raises(OSError) as caught:
        Path("/dev/full").write_text("x" * 10_000)
    assert disk_full(caught.value)
    # safetensors' own wording of ENOSPC (Rust's io::Error inside its SafetensorError)
    assert disk_full(SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                     'message: "No space left on device" })'))
    assert not disk_full(RuntimeError("shape mismatch"), tmp_path)  # a disk with room: not a full disk
    assert not disk_full(ValueError("bad value"))


def test_sigterm_stops_training_with_a_checkpoint_to_resume(dataset_dir, tiny_model, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "studio", "train", "--model", "tiny", "--dataset", str(dataset_dir), "--out", str(run),
           "--steps", "60", "--set", "sample_every=0", "--set", "checkpoint_minutes=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            steps = [e.step for e in events.read_events(run / "events.jsonl") if isinstance(e, events.Step)] \
                if (run / "events.jsonl").exists() else []
            if steps and steps[-1] >= 3:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "asked to shut down (SIGTERM); a checkpoint is saved" in out and "Traceback" not in err
    history = events.read_events(run / "events.jsonl")
    last = [e.step for e in history if isinstance(e, events.Step)][-1]
    assert 3 <= last < 60 and checkpoints.latest(RunPaths(run)).step == last
    assert [e.status for e in history if isinstance(e, events.Finished)] == ["interrupted"]


def test_sigterm_to_the_app_checkpoints_an_api_run_then_exits(dataset_dir, tiny_model, tmp_path):
    import socket

    from gradio_client import Client

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workspace = tmp_path / "ws"
    shutil.copytree(dataset_dir, workspace / "datasets" / "bear")
    env = {**os.environ, "STUDIO_WORKSPACE": str(workspace), "STUDIO_MODEL": "tiny"}
    env.pop("STUDIO_SESSIONS", None)
    app = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        client = None
        while client is None and time.monotonic() < deadline:
            assert app.poll() is None, app.stderr.read()[-2000:]
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:
                time.sleep(1)
        assert client is not None, "the app did not serve its page"
        run_id = client.predict("bear", "lora", 400, "", api_name="/train")
        run = workspace / "runs" / run_id
        while time.monotonic() < deadline:
            steps = [e.step for e in events.read_events(run / "events.jsonl") if isinstance(e, events.Step)] \
                if (run / "events.jsonl").exists() else []
            if steps and steps[-1] >= 2:
                break
            time.sleep(0.1)
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=180)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    history = events.read_events(run / "events.jsonl")
    last = [e.step for e in history if isinstance(e, events.Step)][-1]
    assert [e.status for e in history if isinstance(e, events.Finished)] == ["interrupted"]
    assert 2 <= last < 400 and checkpoints.latest(RunPaths(run)).step == last
