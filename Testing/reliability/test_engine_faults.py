"""Engine faults found by the campaign: cancel honoured everywhere a batch runs."""

from __future__ import annotations

import threading

import pytest

from CTXAILib import Cancelled, Explainer, Target, load_model


def test_fail7_cancel_is_checked_before_every_measured_batch_of_the_batch_search(classifier_card, volume):
    model = load_model(classifier_card)
    explainer = Explainer(model, device="cpu", memory_mb=64)
    explainer.prepare(volume)
    event = threading.Event()
    after_cancel = []

    def forward(module, inputs):
        if event.is_set():
            after_cancel.append(inputs[0].shape[0])
        elif inputs[0].requires_grad:  # the first backward-pass batch of a fresh explainer is the search's
            event.set()

    model.module.register_forward_pre_hook(forward)
    with pytest.raises(Cancelled):
        explainer.explain(volume, "integrated_gradients", Target("pore"), settings={"steps": 64}, cancel=event)
    assert after_cancel == [], f"batches of sizes {after_cancel} ran after cancel was requested"
