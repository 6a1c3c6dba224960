"""The worker as a real subprocess fed hostile request lines: each gets a one-line reply (no traceback in the
message), nothing is read or written outside the exchange folder, and the worker goes on answering."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest


class RawWorker:
    """``python -m CTXAILib.worker`` started in ``exchange``, spoken to line by line, bypassing the client's checks."""

    def __init__(self, exchange):
        self.process = subprocess.Popen([sys.executable, "-m", "CTXAILib.worker"], cwd=exchange, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.replies: "queue.Queue[dict]" = queue.Queue()
        threading.Thread(target=lambda: [self.replies.put(json.loads(line)) for line in self.process.stdout],
                         daemon=True).start()
        assert self.reply()["type"] == "ready"

    def send(self, line) -> None:
        self.process.stdin.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
        self.process.stdin.flush()

    def reply(self, timeout=120.0) -> dict:
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the worker did not answer within {timeout} s") from None

    def final(self, job) -> dict:
        while (message := self.reply())["type"] == "progress" or message.get("id") != job:
            pass
        return message

    def still_answers(self) -> None:
        self.send({"id": "alive", "cmd": "methods"})
        assert self.final("alive")["type"] == "result"


@pytest.fixture
def exchange(tmp_path):
    folder = tmp_path / "exchange"
    folder.mkdir()
    return folder


@pytest.fixture
def worker(exchange):
    worker = RawWorker(exchange)
    yield worker
    worker.process.kill()
    worker.process.wait()


def test_fail6_a_line_that_is_not_an_object_gets_a_protocol_error_and_the_loop_goes_on(worker):
    for line in ("[1,2,3]", "null", "42", '"x"'):
        worker.send(line)
        reply = worker.reply(timeout=30)
        assert reply["type"] == "error" and reply["error"] == "ProtocolError", reply
        worker.still_answers()
    worker.process.stdin.close()  # end of input still ends the worker
    assert worker.process.wait(timeout=30) == 0


def explain(exchange, card, volume_path="input.npy", **extra):
    request = {"id": "job", "cmd": "explain", "model": str(card), "method": "saliency", "device": "cpu",
               "volume": {"path": str(volume_path), "spacing": [0.2] * 3, "origin": [0.0] * 3,
                          "directions": np.eye(3).tolist()},
               "target": {"class": "pore"}, "out_dir": str(exchange)}
    request.update(extra)
    return request


@pytest.mark.parametrize("case", ["unknown command", "missing field", "region without its box", "nonexistent npy",
                                  "non-array file"])
def test_weak_worker_requests_are_validated_with_a_specific_message(worker, exchange, classifier_card, case):
    (exchange / "notes.npy").write_text("not an array")
    request, error, words = {
        "unknown command": ({"id": "job", "cmd": "explian"}, "ProtocolError", ["Unknown command 'explian'"]),
        "missing field": ({"id": "job", "cmd": "explain", "method": "saliency"}, "ProtocolError", ["'model'"]),
        "region without its box": (explain(exchange, classifier_card, target={"region": {"type": "box"}}),
                                   "ProtocolError", ["'box'", "'lo'"]),
        "nonexistent npy": (explain(exchange, classifier_card, exchange / "gone.npy"), "InputError",
                            ["gone.npy", "does not exist"]),
        "non-array file": (explain(exchange, classifier_card, exchange / "notes.npy"), "InputError",
                           ["notes.npy", "not a .npy array"]),
    }[case]
    worker.send(request)
    reply = worker.final("job")
    assert reply["type"] == "error" and reply["error"] == error, reply
    assert "traceback" not in reply and "Traceback" not in reply["message"]
    for word in words:
        assert word in reply["message"], reply["message"]
    worker.still_answers()


@pytest.mark.parametrize("case", ["job id with ../", "out_dir outside", "volume outside"])
def test_weak_worker_paths_are_confined_to_the_exchange_folder(worker, exchange, tmp_path, classifier_card,
                                                              volume, case):
    np.save(exchange / "input.npy", volume.array)
    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "input.npy", volume.array)
    job = "job"
    request = explain(exchange, classifier_card, exchange / "input.npy")
    if case == "job id with ../":
        job = request["id"] = "../outside/evil"
    elif case == "out_dir outside":
        request["out_dir"] = str(outside)
    else:
        request["volume"]["path"] = str(outside / "input.npy")
    worker.send(request)
    reply = worker.final(job)
    assert reply["type"] == "error" and reply["error"] == "ProtocolError", reply
    assert sorted(p.name for p in outside.iterdir()) == ["input.npy"]
    assert sorted(p.name for p in exchange.iterdir()) == ["input.npy"]
    worker.still_answers()
