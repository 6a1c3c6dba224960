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


def test_under_load_the_batch_search_measures_the_small_sizes_and_keeps_the_larger(classifier_card):
    """On a busy machine a call costs a fixed delay whatever its batch: batch 1 then looks slow, and a search cut
    short by its time budget kept it (6.5x the passes' cost under load). Sizes up to 8 are always measured and the
    larger is kept unless clearly slower."""
    import time

    model = load_model(classifier_card)
    model.module.register_forward_pre_hook(lambda module, inputs: time.sleep(0.3))
    explainer = Explainer(model, device="cpu", memory_mb=256)
    assert explainer._fastest_batch((32, 32, 32), limit=32, backward=False, needed=64) >= 8


def test_under_load_a_run_far_slower_than_its_batch_choice_measures_again(classifier_card, volume):
    explainer = Explainer(load_model(classifier_card), device="cpu")
    target = Target("pore")
    explainer.explain(volume, "integrated_gradients", target, settings={"steps": 8})
    key = next(k for k in explainer._fastest if k[1])
    best, tried = explainer._fastest[key][:2]
    explainer._fastest[key] = (best, tried, 1e-9, 0.0)  # measured on a machine far faster than it is now
    explainer.explain(volume, "integrated_gradients", target, settings={"steps": 8})
    assert key not in explainer._fastest  # forgotten: the next run measures again
    explainer.explain(volume, "integrated_gradients", target, settings={"steps": 8})
    assert key in explainer._fastest
    explainer._fastest[key] = (best, tried, 1e3, 0.0)  # a choice the run keeps to
    explainer.explain(volume, "integrated_gradients", target, settings={"steps": 8})
    assert explainer._fastest[key] == (best, tried, 1e3, 0.0)
