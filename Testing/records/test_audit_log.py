"""The audit log: a real run appends one entry that verifies; one edited byte of any entry or of any output file is
named by `ctxai audit verify`; two real processes appending at once lose no entry (and without the lock they do)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from CTXAILib.engine.files import sha256_file
from CTXAILib.records.audit import GENESIS, append_entry, audit_entry, log_path, verify_log

from records_testing import ctxai

# A writer process: waits for the start file, then appends N entries (the lock replaced by nothing when asked).
WRITER = """
import sys, time, contextlib
from pathlib import Path
import CTXAILib.records.audit as audit
log, tag, count, start, unlocked = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1"
if unlocked:
    audit._locked = lambda handle: contextlib.nullcontext(handle)
# Both writers dwell between reading the last entry and appending theirs, so that their appends always overlap in
# time (on a loaded machine the two processes could otherwise run one after the other and the control pass).
read_last = audit._last_line
def dwelling(handle):
    line = read_last(handle)
    time.sleep(0.005)
    return line
audit._last_line = dwelling
Path(f"{start}.{tag}").touch()
while not start.exists():
    time.sleep(0.001)
for n in range(count):
    audit.append_entry(log, {"writer": tag, "n": n})
"""


def test_a_run_appends_one_entry_of_hashes_that_verifies(recorded_run):
    lines = recorded_run["log"].read_bytes().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    record = json.loads((recorded_run["run"] / "run.json").read_text())
    assert entry["prev"] == GENESIS and len(entry["entry_sha256"]) == 64
    assert entry["input"]["sha256"] == record["input"]["sha256"]
    assert entry["input"]["file_sha256"] == sha256_file(recorded_run["volume"])
    assert entry["model"]["sha256"] == sha256_file(recorded_run["model"]) and entry["model"]["card"]["name"] == "unet"
    assert (entry["method"], entry["seed"], entry["device"]) == ("saliency", 0, "cpu")
    assert set(entry["versions"]) == {"torch", "captum", "ctxai", "numpy", "python"} and all(entry["versions"].values())
    assert entry["user"] and entry["host"] and entry["time"].endswith("+00:00")
    assert set(entry["outputs"]) == {"attribution", "confidence", "record"}
    for output in entry["outputs"].values():
        assert output["sha256"] == sha256_file(output["path"])
    assert len(lines[0]) < 4000, "an entry holds hashes, never voxels"
    out = ctxai("audit", "verify", recorded_run["log"])
    assert out.returncode == 0 and "intact: 1 entries, 3 output file(s) match" in out.stdout, out.stdout + out.stderr


def test_the_default_log_lies_beside_the_outputs_unless_given(tmp_path, monkeypatch):
    monkeypatch.delenv("CTXAI_AUDIT_LOG", raising=False)
    assert log_path(None, tmp_path / "runs" / "a") == tmp_path / "runs" / "ctxai-audit.jsonl"
    monkeypatch.setenv("CTXAI_AUDIT_LOG", str(tmp_path / "env.jsonl"))
    assert log_path(None, tmp_path / "runs" / "a") == tmp_path / "env.jsonl"
    assert log_path(tmp_path / "given.jsonl", tmp_path / "runs" / "a") == tmp_path / "given.jsonl"
    monkeypatch.delenv("CTXAI_AUDIT_LOG")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert log_path() == tmp_path / "data" / "CTXAI" / "audit.jsonl"


@pytest.fixture
def four_entries(tmp_path, recorded_run):
    """A log of four runs' entries whose output files are private copies (the shared run stays intact)."""
    record = json.loads((recorded_run["run"] / "run.json").read_text())
    log = tmp_path / "audit.jsonl"
    for n in range(4):
        folder = tmp_path / f"run{n}"
        shutil.copytree(recorded_run["run"], folder)
        append_entry(log, audit_entry(record, {"attribution": folder / "attribution.nrrd",
                                               "record": folder / "run.json"}))
    return log


def test_one_edited_byte_of_any_entry_is_named(four_entries):
    assert verify_log(four_entries).intact  # the control: the untouched log verifies
    original = four_entries.read_bytes()
    lines = original.splitlines(keepends=True)
    starts = [sum(len(line) for line in lines[:n]) for n in range(len(lines))]
    edited = four_entries.with_name("edited.jsonl")
    for number, (start, line) in enumerate(zip(starts, lines), start=1):
        # Bytes across the line: in its keys, values, hashes, punctuation and its own seal.
        for offset in sorted({0, 1, 9, len(line) // 3, len(line) // 2, len(line) - 40, len(line) - 3}):
            data = bytearray(original)
            data[start + offset] = ord("x") if data[start + offset] != ord("x") else ord("y")
            edited.write_bytes(bytes(data))
            check = verify_log(edited)
            assert check.broken_line == number, (number, offset, check)
            assert check.entries == number - 1


def test_a_removed_entry_and_an_edited_output_file_are_named(four_entries, tmp_path):
    lines = four_entries.read_bytes().splitlines(keepends=True)
    removed = tmp_path / "removed.jsonl"
    removed.write_bytes(b"".join(lines[:1] + lines[2:]))
    check = verify_log(removed)
    assert check.broken_line == 2 and "'prev'" in check.problem
    target = tmp_path / "run2" / "attribution.nrrd"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    out = ctxai("audit", "verify", four_entries)
    assert out.returncode == 2, out.stdout
    assert "BROKEN at line 3" in out.stdout and f"output 'attribution' {target} was changed" in out.stdout
    (tmp_path / "run2" / "attribution.nrrd").unlink()  # a file gone from disk is counted, not a break
    check = verify_log(four_entries)
    assert check.intact and check.files_missing == [str(target)] and check.files_checked == 7


def _race(tmp_path: Path, count: int, unlocked: bool) -> Path:
    log, start = tmp_path / f"race-{unlocked}.jsonl", tmp_path / f"start-{unlocked}"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(log), tag, str(count), str(start),
                                 "1" if unlocked else "0"]) for tag in ("a", "b")]
    deadline = time.monotonic() + 60
    while not all(Path(f"{start}.{tag}").exists() for tag in ("a", "b")) and time.monotonic() < deadline:
        time.sleep(0.01)
    start.touch()  # both interpreters are up and waiting: they start appending together
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    return log


def test_two_processes_appending_at_once_lose_no_entry(tmp_path):
    log = _race(tmp_path, 500, unlocked=False)
    check = verify_log(log)
    assert check.intact and check.entries == 1000, check
    entries = [json.loads(line) for line in log.read_bytes().splitlines()]
    for tag in ("a", "b"):
        assert sorted(e["n"] for e in entries if e["writer"] == tag) == list(range(500))
    # The control: the same race without the lock breaks the chain (two entries chained to one predecessor).
    assert not verify_log(_race(tmp_path, 200, unlocked=True)).intact


def test_an_unwritable_log_is_refused_before_computing(tmp_path, recorded_run):
    # Integrated gradients with 100000 steps would take minutes here: refused after computing, it would time out.
    out = ctxai("explain", "--volume", recorded_run["volume"], "--model", recorded_run["root"] / "unet.json",
                "--method", "integrated_gradients", "--set", "steps=100000", "--device", "cpu", "--quiet",
                "--out", tmp_path / "run", "--audit-log", "/sys/ctxai-audit.jsonl", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith("error: Audit log /sys/ctxai-audit.jsonl cannot be written")
    assert not (tmp_path / "run").exists()
