"""The embedded default: the synthetic CT phantom, the data both bundled models learn from, their training and
held-out evaluation, and the demo."""
