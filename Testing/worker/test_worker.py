"""The worker as a real subprocess, driven by the same client the Slicer module uses: progress, non-blocking
polls, cooperative and forced cancel, crash recovery, a warm model, clean errors and private temp files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time

import numpy as np
import pytest

from CTXAILib import Cancelled, CTXAIError
from CTXAILib.worker.client import WorkerClient, WorkerError, volume_from_message, volume_message


@pytest.fixture
def client():
    client = WorkerClient()
    yield client
    client.stop()


def explain_request(client, card, volume, method="integrated_gradients", **extra):
    request = {"model": str(card), "volume": volume_message(volume, client.exchange / "input.npy"),
               "method": method, "target": {"class": "pore", "region": {"type": "whole"}},
               "device": "cpu", "out_dir": str(client.exchange)}
    request.update(extra)
    return request


def wait_for(client, job, kinds=("result", "error", "cancelled"), timeout_s=120.0):
    """Poll like the GUI's QTimer would; returns (final message, all messages, longest poll in seconds)."""
    seen, longest = [], 0.0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = time.perf_counter()
        messages = client.poll()
        longest = max(longest, time.perf_counter() - started)
        seen += messages
        for message in messages:
            if message.get("id") == job and message["type"] in kinds:
                return message, seen, longest
        time.sleep(0.02)
    raise AssertionError(f"no reply for job {job} within {timeout_s} s; stderr:\n{client.stderr_tail()}")


def test_progress_result_and_non_blocking_polls(client, classifier_card, volume):
    job = client.submit("explain", **explain_request(client, classifier_card, volume,
                                                     settings={"steps": 128}, memory_mb=32))
    final, seen, longest = wait_for(client, job)
    assert final["type"] == "result", final
    progress = [m for m in seen if m["type"] == "progress" and m["id"] == job]
    assert len(progress) >= 3 and any(m["eta_s"] is not None for m in progress)
    assert progress[-1]["fraction"] == 1.0
    assert longest < 0.1, f"a poll blocked the GUI for {longest * 1000:.0f} ms"
    attribution = volume_from_message(final["result"]["attribution"])
    assert attribution.same_geometry(volume) and np.isfinite(attribution.array).all()
    assert final["result"]["record"]["method"]["name"] == "integrated_gradients"


def test_worker_runs_are_appended_to_the_given_or_the_per_user_audit_log(client, classifier_card, volume, tmp_path):
    from CTXAILib.engine.files import sha256_file
    from CTXAILib.records.audit import user_log_path, verify_log

    given = tmp_path / "panel-audit.jsonl"
    before = user_log_path().read_bytes().count(b"\n") if user_log_path().exists() else 0
    finals = []
    for extra in ({"audit_log": str(given)}, {}):
        final, _, _ = wait_for(client, client.submit("explain", **explain_request(client, classifier_card, volume,
                                                                                  "saliency", **extra)))
        assert final["type"] == "result", final
        finals.append(final)
    check = verify_log(given)
    assert check.intact and check.entries == 1 and check.files_checked == 1
    entry = json.loads(given.read_bytes().splitlines()[-1])
    assert entry["method"] == "saliency" and entry["input"]["sha256"] == finals[0]["result"]["record"]["input"][
        "sha256"]
    assert entry["outputs"]["attribution"]["sha256"] == sha256_file(finals[0]["result"]["attribution"]["path"])
    assert str(user_log_path()).startswith(os.environ["XDG_DATA_HOME"])  # the tests' own log, not the tester's
    assert user_log_path().read_bytes().count(b"\n") == before + 1 and verify_log(user_log_path()).intact


def test_second_run_reuses_the_warm_model(client, classifier_card, volume):
    first = client.call("explain", **explain_request(client, classifier_card, volume, method="gradcam"))
    pid = client.process.pid
    second = client.call("explain", **explain_request(client, classifier_card, volume, method="saliency"))
    assert not first["model_reused"] and second["model_reused"]
    assert client.process.pid == pid and client.starts == 1


def test_cooperative_cancel_within_one_batch(client, classifier_card, volume):
    job = client.submit("explain", **explain_request(client, classifier_card, volume,
                                                     settings={"steps": 1024}, memory_mb=16))
    seen = []
    while not [m for m in seen if m.get("type") == "progress" and m.get("fraction", 0) > 0.02]:
        seen += client.poll()
        time.sleep(0.02)
    asked = time.monotonic()
    client.cancel(job)
    final, _, _ = wait_for(client, job)
    assert final["type"] == "cancelled" and not final.get("forced")
    assert time.monotonic() - asked < 5.0
    assert client.alive and client.starts == 1  # the worker lives on, its model still warm
    again = client.call("explain", **explain_request(client, classifier_card, volume, method="saliency"))
    assert again["model_reused"]


def test_forced_cancel_kills_and_restarts(client, classifier_card, volume):
    job = client.submit("explain", **explain_request(client, classifier_card, volume,
                                                     settings={"steps": 1024}, memory_mb=16))
    wait_for(client, job, kinds=("progress",))
    client.cancel(job, grace_s=0.0)  # no grace: as if the worker were stuck inside one long batch
    final, _, _ = wait_for(client, job)
    assert final["type"] == "cancelled" and final["forced"]
    assert not client.alive
    result = client.call("explain", **explain_request(client, classifier_card, volume, method="saliency"))
    assert client.starts == 2 and not result["model_reused"]


def test_killed_worker_is_reported_and_restarted(client, classifier_card, volume):
    job = client.submit("explain", **explain_request(client, classifier_card, volume,
                                                     settings={"steps": 1024}, memory_mb=16))
    wait_for(client, job, kinds=("progress",))
    os.kill(client.process.pid, signal.SIGKILL)
    final, _, _ = wait_for(client, job)
    assert final["type"] == "error" and final["error"] == "WorkerCrashed"
    assert "stopped unexpectedly" in final["message"] and "Run it again" in final["message"]
    result = client.call("explain", **explain_request(client, classifier_card, volume, method="saliency"))
    assert client.starts == 2 and np.isfinite(volume_from_message(result["attribution"]).array).all()


def test_errors_come_back_typed_and_the_worker_survives(client, classifier_card, unet_card, volume):
    with pytest.raises(WorkerError, match="Class 'void' is not predicted") as info:
        client.call("explain", **explain_request(client, classifier_card, volume,
                                                 target={"class": "void", "region": {"type": "whole"}}))
    assert info.value.kind == "TargetError"
    with pytest.raises(WorkerError, match="lies outside the volume") as info:
        client.call("explain", **explain_request(client, unet_card, volume, target={
            "class": "defect", "region": {"type": "box", "lo": [90, 90, 90], "hi": [99, 99, 99]}}))
    assert info.value.kind == "RegionError"
    assert client.alive and client.starts == 1


def test_cancel_through_call_raises_cancelled(client, classifier_card, volume):
    import threading

    flag = threading.Event()
    threading.Timer(1.5, flag.set).start()
    with pytest.raises(Cancelled):
        client.call("explain", cancel=flag, **explain_request(client, classifier_card, volume,
                                                              settings={"steps": 1024}, memory_mb=16))


def test_describe_model_and_methods(client, unet_card):
    description = client.call("describe_model", model=str(unet_card), device="cpu")
    assert description["card"]["task"] == "segmentation" and description["default_layer"] == "decoders.1.conv2"
    assert any(layer["name"] == "head" and layer["cam_usable"] for layer in description["layers"])
    import torch

    # The panel says which torch the worker uses: Slicer's own process never imports it.
    assert description["runtime"] == {"torch": torch.__version__, "cuda": torch.version.cuda, "device": "cpu"}
    methods = {m["name"] for m in client.call("methods")}
    assert {"gradcam", "lrp", "occlusion", "confidence"} <= methods


def test_describe_model_carries_the_profiles_advice_for_these_weights_only(client, unet_card):
    """The panel marks the methods a model's trust profile advises against; a profile of other weights is ignored."""
    import json

    from CTXAILib.checks.profile import profile_path
    from CTXAILib.engine.models import sha256_file

    card = json.loads(unet_card.read_text())
    sha = sha256_file(unet_card.parent / card["weights"])
    path = profile_path(unet_card)
    entry = {"recommendation": "do not use", "why": "fails randomisation on this model", "checks": {}}
    try:
        path.write_text(json.dumps({"model": {"sha256": sha}, "methods": {"gradcam": entry}}))
        advice = client.call("describe_model", model=str(unet_card), device="cpu")["advice"]
        assert advice == {"gradcam": {"recommendation": "do not use", "why": "fails randomisation on this model"}}
        path.write_text(json.dumps({"model": {"sha256": "0" * 64}, "methods": {"gradcam": entry}}))
        assert client.call("describe_model", model=str(unet_card), device="cpu")["advice"] == {}
    finally:
        path.unlink(missing_ok=True)


def test_stop_answers_pending_requests(classifier_card, volume):
    """Stopping mid-run (scene close, module reload): the run is cancelled or reported stopped, never left open."""
    client = WorkerClient()
    job = client.submit("explain", **explain_request(client, classifier_card, volume,
                                                     settings={"steps": 1024}, memory_mb=16))
    wait_for(client, job, kinds=("progress",))
    started = time.monotonic()
    client.stop(timeout_s=5.0)
    assert time.monotonic() - started < 5.0, "the worker should stop at its next batch, not at the timeout"
    final = [m for m in client.poll() if m.get("id") == job and m["type"] != "progress"]
    assert len(final) == 1
    assert final[0]["type"] == "cancelled" or final[0].get("error") == "WorkerStopped"
    assert client.poll() == [] and not client.alive


def test_exchange_folder_is_private_and_removed(classifier_card, volume):
    client = WorkerClient()
    try:
        client.call("explain", **explain_request(client, classifier_card, volume, method="saliency"))
        exchange = client.exchange
        mode = stat.S_IMODE(os.stat(exchange).st_mode)
        assert mode == 0o700
        assert list(exchange.glob("*.npy"))
    finally:
        client.stop()
    assert not exchange.exists()


def test_exchange_stays_private_after_a_restart(classifier_card, volume):
    """Scene close stops the worker; the next run writes its input before the worker starts again."""
    client = WorkerClient()
    try:
        client.call("methods")
        client.stop()
        request = explain_request(client, classifier_card, volume, method="saliency")
        result = client.call("explain", **request)
        assert stat.S_IMODE(os.stat(client.exchange).st_mode) == 0o700
        for path in (request["volume"]["path"], result["attribution"]["path"]):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        os.chmod(client.exchange, 0o755)
        with pytest.raises(CTXAIError, match="no longer private"):
            client.exchange
    finally:
        os.chmod(client._exchange, 0o700)
        client.stop()


def test_next_start_removes_exchange_folders_whose_worker_is_gone():
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, live, unstarted = (Path(tempfile.mkdtemp(prefix="ctxai-")) for _ in range(3))
    (stale / "owner.json").write_text(json.dumps({"client": gone.pid, "worker": gone.pid}))
    (stale / "input-1.npy").write_bytes(b"a scan")
    (live / "owner.json").write_text(json.dumps({"client": os.getpid(), "worker": gone.pid}))
    client = WorkerClient()
    try:
        client.call("methods")
        assert not stale.exists()
        assert live.exists() and unstarted.exists(), "folders of running clients are theirs"
        assert json.loads((client.exchange / "owner.json").read_text())["worker"] == client.process.pid
    finally:
        client.stop()
        for folder in (live, unstarted):
            shutil.rmtree(folder)


class FakeStartupInfo:
    def __init__(self):
        self.dwFlags = 0
        self.wShowWindow = 1


def test_windows_worker_starts_hidden_and_is_killed_as_a_tree(monkeypatch, tmp_path):
    """Asserted on the arguments given to Popen and run: the real worker runs on Linux in the other tests."""
    import io
    import subprocess
    import tempfile
    from types import SimpleNamespace

    from CTXAILib.worker import client as client_module

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(subprocess, "STARTUPINFO", FakeStartupInfo, raising=False)
    monkeypatch.setattr(subprocess, "STARTF_USESHOWWINDOW", 1, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    # Only the client sees Windows: pytest's own paths must stay POSIX.
    monkeypatch.setattr(client_module, "os", SimpleNamespace(**{**vars(os), "name": "nt"}))
    calls = []

    class FakeProcess:
        pid = 4242
        stdin = io.StringIO()

        @property
        def stdout(self):
            return io.StringIO()

        stderr = stdout

        def __init__(self, command, **kwargs):
            calls.append(("Popen", command, kwargs))

        def poll(self):
            return None

        def wait(self, timeout=None):
            return 0

    def fake_run(command, **kwargs):
        calls.append(("run", command, kwargs))

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(subprocess, "run", fake_run)
    client = WorkerClient(command=["PythonSlicer.exe", "-m", "CTXAILib.worker"])
    client.start()
    client.kill()
    (_, _, popen), (_, taskkill, run) = calls
    for kwargs in (popen, run):
        assert kwargs["creationflags"] & 0x08000000, "CREATE_NO_WINDOW"
        assert kwargs["startupinfo"].dwFlags & 1 and kwargs["startupinfo"].wShowWindow == 0, "SW_HIDE"
    assert "start_new_session" not in popen and "umask" not in popen
    assert popen["errors"] == "replace" and popen["encoding"] == "utf-8"
    assert taskkill == ["taskkill", "/F", "/T", "/PID", "4242"]


def test_undecodable_worker_output_does_not_stop_the_readers():
    """A worker that prints bytes of another code page and dies is still reported, with its message."""
    import sys

    script = ("import sys; sys.stdin.readline(); sys.stdout.buffer.write(b'\\xff\\xfe not json\\n'); "
              "sys.stdout.flush(); sys.stderr.buffer.write(b'Fehler: Ger\\xe4t nicht gefunden\\n'); sys.exit(3)")
    client = WorkerClient(command=[sys.executable, "-c", script])
    try:
        job = client.submit("methods")
        final, _, _ = wait_for(client, job, timeout_s=20.0)
        assert final["error"] == "WorkerCrashed" and "Ger\ufffdt nicht gefunden" in final["message"]
    finally:
        client.stop()
