"""What the CTXAI panel says: the grouped method list, durations, errors and the model card, translatable."""

import html

from slicer.i18n import tr as _

# The order of the method families in the Method list; families the registry adds later follow, sorted.
FAMILIES = ("gradient", "cam", "perturbation", "relevance", "prediction")


def familyLabel(family: str) -> str:
    return {"gradient": _("Gradient methods"), "cam": _("Class activation maps (CAM)"),
            "perturbation": _("Perturbation methods"), "relevance": _("Relevance propagation"),
            "prediction": _("Model output (not an explanation)")}.get(family, family.capitalize())


def methodGroups(methods: list, advice=None) -> list:
    """The registry's methods as Method-list groups ``(family label, [(label, name, summary)])``; ``advice``
    (the model's trust profile, ``ctxai profile``) marks those it advises against or to use with care.

    >>> methodGroups([{"name": "saliency", "label": "Saliency", "family": "gradient", "summary": "|d score/d x|"}])
    [('Gradient methods', [('Saliency', 'saliency', '|d score/d x|')])]
    >>> methodGroups([{"name": "lrp", "label": "LRP", "family": "relevance", "summary": "s"}],
    ...              {"lrp": {"recommendation": "do not use", "why": "fails randomisation"}})[0][1]
    [('LRP  (not advised on this model)', 'lrp', 's\\nProfile: do not use: fails randomisation')]
    """
    advice = advice or {}
    marks = {"do not use": _("not advised on this model"), "use with care": _("use with care")}

    def item(m: dict) -> tuple:
        entry = advice.get(m["name"])
        mark = marks.get(entry["recommendation"]) if entry else None
        label = m["label"] + (f"  ({mark})" if mark else "")
        tip = m.get("summary", "") + (f"\n{_('Profile')}: {entry['recommendation']}: {entry['why']}" if entry else "")
        return label, m["name"], tip

    families = list(FAMILIES) + sorted({m["family"] for m in methods} - set(FAMILIES))
    groups = [(family, [item(m) for m in methods if m["family"] == family]) for family in families]
    return [(familyLabel(family), members) for family, members in groups if members]


# Verdict colours: green, amber, red as in the run table's pass / caution / FAIL rows; grey when unchecked.
VERDICT_COLOURS = {"trusted": "#2e7d32", "caution": "#b26a00", "not trusted": "#c62828", "unchecked": "#666666"}


def verdictHtml(explanation: dict) -> str:
    """The run's verdict in its colour, with the failed checks' reasons.

    >>> verdictHtml({"verdict": {"verdict": "caution", "reasons": ["stability: the map changes"]}})
    '<b style="color:#b26a00">Verdict: caution</b><br>stability: the map changes'
    >>> verdictHtml({})
    ''
    """
    verdict = explanation.get("verdict")
    if not verdict:
        return ""
    word = verdict["verdict"]
    head = f'<b style="color:{VERDICT_COLOURS.get(word, "#666666")}">{_("Verdict")}: {html.escape(word)}</b>'
    return "<br>".join([head] + [html.escape(reason) for reason in verdict.get("reasons", [])])


def formatDuration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return _("{s} s").format(s=seconds)
    if seconds < 3600:
        return _("{m} min {s:02d} s").format(m=seconds // 60, s=seconds % 60)
    return _("{h} h {m:02d} min").format(h=seconds // 3600, m=seconds % 3600 // 60)


def describeError(exc: Exception) -> str:
    """One line for the status bar; a crashed worker says that the next Explain restarts it."""
    kind = getattr(exc, "kind", None)
    if kind == "WorkerCrashed":
        return _("The CTXAI worker crashed; the next Explain restarts it.") + f" {exc}"
    if kind:
        return f"{kind}: {exc}"
    return str(exc) or type(exc).__name__


def modelCardHtml(description) -> str:
    """The model-card summary (rich text) of a model as the worker described it; None: not loaded."""
    if description is None:
        return _("(not loaded)")
    card = description["card"]

    def size(values, unit):
        return "&times;".join(f"{v:g}" for v in values) + unit if values else _("any")

    lines = [f"<b>{html.escape(str(card.get('name', '')))}</b> {html.escape(str(card.get('version', '')))}",
             _("Task: {task}").format(task=html.escape(str(card.get("task", "")))),
             _("Classes: {classes}").format(classes=html.escape(", ".join(card.get("class_names", [])))),
             _("Patch: {patch}, spacing: {spacing}").format(
                 patch=size(card.get("patch_size"), _(" voxels")), spacing=size(card.get("spacing_mm"), " mm"))]
    if card.get("description"):
        lines.append(html.escape(card["description"]))
    runtime = description.get("runtime")
    if runtime:
        where = runtime.get("device_name") or runtime["device"].upper()
        lines.append(_("Worker: torch {torch} ({build}) on {where}").format(
            torch=html.escape(runtime["torch"]), where=html.escape(where),
            build=_("CUDA {cuda}").format(cuda=runtime["cuda"]) if runtime.get("cuda") else _("CPU build")))
    warnings = list(description.get("warnings", []))
    if description.get("layer_methods") is False:  # TorchScript without an eager twin: which methods work, and why
        warnings.append(description.get("layer_access", ""))
    lines += [f"<span style='color:#b9770e'>{html.escape(w)}</span>" for w in warnings]
    return "<br>".join(lines)
