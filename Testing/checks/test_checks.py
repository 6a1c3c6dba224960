"""Every check can fail: each is shown failing on a control (a map that does not depend on the model or the target,
a random or constant map, the map of another region) and passing where it should, on the bundled models and
held-out phantoms (seeds past 900 000, never used for training)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from CTXAILib import Box, BoxRegion, ComponentRegion, Explainer, Target
from CTXAILib.checks.base import CheckContext, control_maps, get_check
from CTXAILib.checks.faithfulness import faithfulness, faithfulness_result
from CTXAILib.checks.runner import CHEAP_CHECKS, explain_and_check, resolve_checks, run_checks, verdict
from CTXAILib.engine.methods.registry import _REGISTRY, MethodSpec, register
from CTXAILib.synthetic.evaluation import bundled_model
from CTXAILib.synthetic.phantom import generate_phantom


@pytest.fixture(scope="module")
def pore():
    """The largest pore of a held-out phantom: the volume, a classifier target on it and its true mask."""
    phantom = generate_phantom(900_300, (96, 96, 96))
    defect = max((d for d in phantom.defects if d.type == "pore"), key=lambda d: d.voxel_count)
    centre = tuple(int(v) for v in np.round(defect.centre))
    target = Target("pore", region=BoxRegion(Box(centre, tuple(c + 1 for c in centre))))
    return phantom.ct, target, phantom.instances.array == defect.id


@pytest.fixture(scope="module")
def classifier():
    return Explainer(bundled_model("classifier"), device="cpu")


@pytest.fixture(scope="module")
def voids():
    """A held-out part of one U-Net tile with several voids: the largest one clicked."""
    phantom = generate_phantom(900_301, (64, 64, 64), defect_counts={"pore": 5, "lack_of_fusion": 1, "crack": 0,
                                                                      "inclusion_dense": 0, "inclusion_light": 0})
    explainer = Explainer(bundled_model("unet"), device="cpu")
    predicted = explainer.class_mask(phantom.ct, 1)
    from scipy import ndimage

    labels, count = ndimage.label(predicted, structure=np.ones((3, 3, 3), bool))
    assert count >= 2, "the case needs another predicted void for target sensitivity and spill"
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    k, j, i = np.argwhere(labels == largest)[0]
    return explainer, phantom, Target("void", region=ComponentRegion((int(i), int(j), int(k))))


@pytest.fixture
def centre_control():
    """A registered method whose map is the centre control: it ignores the model and the target entirely."""
    def kernel(ctx, settings):
        shape = ctx.x.shape[2:]
        grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in shape], indexing="ij")
        ctx.score(ctx.x)  # one model pass, as every method makes, so the run counts progress like the others
        return torch.exp(-sum(g ** 2 for g in grids) / 50.0)[None]

    spec = register(MethodSpec("test_centre_control", "Centre control", "gradient", "a model-independent map",
                               sign="magnitude", aggregation="sum", kernel=kernel, samples=lambda s, shape: 1.0))
    yield spec.name
    _REGISTRY.pop(spec.name)


def _check(explainer, volume, method, target, name, **kw):
    result, verified = explain_and_check(explainer, volume, method, target, checks=[name], **kw)
    return verified["checks"][name], result


def test_randomisation_fails_on_a_model_independent_map_and_passes_gradcam(classifier, pore, centre_control):
    volume, target, _ = pore
    control, _ = _check(classifier, volume, centre_control, target, "randomisation")
    assert control["pass"] is False and control["value"] > 0.99, control
    assert control["controls"]["centre"] == 1.0
    for method in ("gradcam", "saliency"):
        check, _ = _check(classifier, volume, method, target, "randomisation")
        assert check["pass"] is True, (method, check)
        assert set(check["details"]["stages"]) == {"top third", "all layers"}


def test_randomisation_fails_guided_backprop_on_the_classifier(classifier, pore):
    """Guided backprop is known to survive re-initialised top layers (Adebayo et al. 2018)."""
    volume, target, _ = pore
    check, _ = _check(classifier, volume, "guided_backprop", target, "randomisation")
    assert check["pass"] is False and check["details"]["stages"]["top third"] > 0.6, check


def test_randomisation_judges_the_unet_where_the_map_is_informative(voids):
    """A U-Net's map is local for random weights too: saliency keeps a high correlation with a random-weight
    U-Net's map near the target, and must not pass."""
    explainer, phantom, target = voids
    check, result = _check(explainer, phantom.ct, "saliency", target, "randomisation")
    assert check["details"]["region_voxels"] < np.prod(result.extent.shape)  # compared near the target only
    assert (check["value"] > 0.6) == (check["pass"] is False), check


def test_target_sensitivity_fails_on_a_map_for_any_target_and_passes_gradcam(classifier, pore, centre_control):
    volume, target, _ = pore
    control, _ = _check(classifier, volume, centre_control, target, "target_sensitivity")
    assert control["pass"] is False and control["value"] > 0.99, control
    check, result = _check(classifier, volume, "gradcam", target, "target_sensitivity")
    assert check["pass"] is True and result.runner_up in check["details"]["other_target"], check


def test_faithfulness_fails_random_and_constant_maps_and_passes_gradcam(classifier, pore):
    volume, target, _ = pore
    check, result = _check(classifier, volume, "gradcam", target, "faithfulness")
    assert check["pass"] is True, check
    assert check["details"]["fill"] == "part_mean" and check["details"]["ranking"] == "|map|"

    captured = {}

    def keep(probe, attribution):
        captured["probe"] = probe
        return {}

    classifier.explain(volume, "gradcam", target, evaluate=keep)
    probe = captured["probe"]
    fill = probe.baseline("part_mean")
    shape = result.extent.shape
    for name, control in (("random", np.random.default_rng(3).random(shape)), ("constant", np.ones(shape))):
        scores = faithfulness(probe.forward, probe.x, fill, control, probe.batch_size, seed=1)
        judged = faithfulness_result(scores)
        assert judged.passed is False, (name, judged)


def test_faithfulness_ranks_signed_maps_by_magnitude(classifier, pore):
    """Input×gradient on a dark pore: its strongest voxels are negative (dark = less material), yet they are where
    the score depends on the input; ranking by |map| removes them first, whatever their sign."""
    volume, target, _ = pore
    captured = {}

    def keep(probe, attribution):
        captured.update(probe=probe, map=attribution)
        return {}

    classifier.explain(volume, "input_x_gradient", target, evaluate=keep)
    probe, signed = captured["probe"], captured["map"]
    assert (signed < 0).any() and (signed > 0).any()
    fill = probe.baseline("part_mean")
    as_is = faithfulness(probe.forward, probe.x, fill, signed, probe.batch_size, seed=0)
    flipped = faithfulness(probe.forward, probe.x, fill, -signed, probe.batch_size, seed=0)
    assert as_is["deletion_auc"] == pytest.approx(flipped["deletion_auc"], abs=1e-9)
    assert "deletion_auc_positive" in as_is  # the positive evidence alone is reported beside


def test_spill_fails_gradcam_on_the_unet_and_passes_hirescam(voids):
    """Grad-CAM's channel-averaged weights light up every void of the class; HiResCAM stays on the clicked one."""
    explainer, phantom, target = voids
    gradcam, _ = _check(explainer, phantom.ct, "gradcam", target, "spill")
    hirescam, _ = _check(explainer, phantom.ct, "hirescam", target, "spill")
    assert gradcam["pass"] is False, gradcam
    assert hirescam["pass"] is True, hirescam
    assert hirescam["controls"]["constant"] < hirescam["threshold"] <= hirescam["value"]
    assert hirescam["details"]["lift"] > 2.0 and hirescam["controls"]["random"] < 0.5


def test_stability_fails_a_few_sample_lime_and_passes_gradcam(classifier, pore):
    volume, target, _ = pore
    check, _ = _check(classifier, volume, "gradcam", target, "stability")
    assert check["pass"] is True and check["controls"]["random"] < check["threshold"], check
    lime, _ = _check(classifier, volume, "lime", target, "stability", settings={"samples": 30, "supervoxels": 200})
    assert lime["pass"] is False, lime
    assert "seed" in lime["details"]["correlations"]


def test_localisation_prints_and_beats_the_trivial_controls(classifier, pore):
    volume, target, mask = pore
    check, _ = _check(classifier, volume, "gradcam", target, "localisation", reference_mask=mask)
    for name in ("centre", "target_blur", "random"):
        assert f"{name}_lift" in check["controls"]
    assert check["threshold"] >= check["controls"]["centre_lift"]  # the centre control cannot pass
    assert check["threshold"] >= check["controls"]["random_lift"]
    assert check["pass"] == (check["details"]["points_inside"] and check["value"] > check["threshold"])
    absent, _ = _check(classifier, volume, "gradcam", target, "localisation")
    assert absent["pass"] is None


def test_verdict_words():
    from CTXAILib.checks.base import CheckResult

    ok = CheckResult("randomisation", 0.1, 0.6, True, "fine")
    bad = CheckResult("randomisation", 0.9, 0.6, False, "same map")
    soft = CheckResult("stability", 0.2, 0.6, False, "unstable")
    assert verdict([]) ["verdict"] == "unchecked"
    assert verdict([ok])["verdict"] == "trusted"
    assert verdict([ok, soft])["verdict"] == "caution"
    assert verdict([bad, soft])["verdict"] == "not trusted"
    assert verdict([bad])["reasons"] == ["randomisation: same map"]


def test_default_checks_cost_at_most_one_more_run():
    """What the panel runs by default adds at most the method's own time (one re-run, no extra passes)."""
    assert sum(get_check(n).runs for n in CHEAP_CHECKS) <= 1.0
    assert all(get_check(n).passes == 0 for n in CHEAP_CHECKS)
    assert resolve_checks("all", "classification") == ["faithfulness", "randomisation", "target_sensitivity",
                                                      "stability"]
    assert "localisation" in resolve_checks("all", "segmentation", has_reference=True)


def test_explain_cli_writes_checks_and_verdict(tmp_path, pore):
    from CTXAILib import write_volume

    volume, target, mask = pore
    ct = write_volume(volume, tmp_path / "ct.nrrd")
    centre = target.region.box.lo
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "CTXAILib.cli", "explain", "--volume", str(ct), "--model",
                           str(bundled_model("classifier")), "--method", "gradcam", "--target", "pore", "--point",
                           ",".join(map(str, centre)), "--checks", "target_sensitivity,faithfulness", "--out",
                           str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "run.json").read_text())
    assert set(record["checks"]) == {"target_sensitivity", "faithfulness"}
    for check in record["checks"].values():
        assert {"value", "threshold", "pass", "controls", "what"} <= set(check)
    assert record["verdict"]["verdict"] in ("trusted", "caution", "not trusted")
    assert "verdict:" in done.stdout
    wrong = subprocess.run([sys.executable, "-m", "CTXAILib.cli", "explain", "--volume", str(ct), "--model",
                            str(bundled_model("classifier")), "--method", "gradcam", "--checks", "sanity",
                            "--out", str(tmp_path / "no")], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "Unknown check 'sanity'" in wrong.stderr
    assert not (tmp_path / "no").exists()


def test_run_checks_uses_the_fixed_target_on_a_changed_model(classifier, pore):
    """Re-explaining on a randomised model keeps the voxels and class the map was made for."""
    volume, target, _ = pore
    result = classifier.explain(volume, "saliency", target)
    assert result.fixed_target.class_name == 1 and result.fixed_target.region.box == Box(*result.target["box"])
    ctx = CheckContext(classifier, volume, result)
    assert set(run_checks(ctx, ["target_sensitivity"])["checks"]) == {"target_sensitivity"}
    assert set(control_maps(result)) == {"centre", "target_blur", "random"}
