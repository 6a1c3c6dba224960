"""Connectors for the parameters that no stock parameterNodeWrapper connector can bind.

The comboboxes of target class, contrast class, method, layer and run are filled at run time from the worker's
answers and the scene, and the method settings are a form built from the method registry. The widget passes these
connectors explicitly (``CTXAIGuiLib.widget.MANUAL_BINDINGS``); ``canRepresent`` is False so that they are never
chosen for a widget of the .ui.
"""

import json
import math

import qt

import slicer
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import GuiConnector


def parseMethodSettings(text: str) -> dict:
    """The ``methodSettings`` parameter as {method: {setting: value}}; anything unreadable counts as empty."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return {k: v for k, v in value.items() if isinstance(v, dict)} if isinstance(value, dict) else {}


def floatDecimals(setting: dict) -> int:
    """Enough decimals to show the smallest non-zero bound or default of a float setting (2 to 12)."""
    magnitudes = [abs(float(setting[k])) for k in ("min", "max", "default") if setting.get(k)]
    smallest = min(magnitudes, default=1.0)
    return int(min(12, max(2, 1 - math.floor(math.log10(smallest)))))


class _ExplicitConnector(GuiConnector):
    """A connector the parameter node wrapper never picks by itself: it is passed through MANUAL_BINDINGS."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return False

    @staticmethod
    def create(widget, datatype):
        return None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def widget(self):
        return self._widget


class ItemDataComboBoxConnector(_ExplicitConnector):
    """Binds a str parameter to a combobox filled at run time; each item's data is the parameter value.

    >>> connector = ItemDataComboBoxConnector(widget.ui.targetClassComboBox)
    >>> connector.setItems([("(predicted class)", ""), ("pore", "pore")])
    >>> parameterNode.connectParametersToGui({"targetClass": connector})
    """

    def _connect(self):
        self._widget.currentIndexChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentIndexChanged.disconnect(self.changed)

    def setItems(self, items) -> None:
        """Replace the items by ``(text, value)`` pairs. The parameter is left alone: write it afterwards."""
        self.setGroups([(None, [(text, value, None) for text, value in items])])

    def setGroups(self, groups) -> None:
        """Replace the items by groups ``(header, [(text, value, toolTip)])``. A header (None: no header) is an
        item that cannot be chosen, with a separator before it; its members are indented under it."""
        comboBox = self._widget
        wasBlocked = comboBox.blockSignals(True)  # the items change, the parameter does not
        comboBox.clear()
        for header, members in groups:
            if header is not None:
                if comboBox.count:
                    comboBox.insertSeparator(comboBox.count)
                comboBox.addItem(header)
                comboBox.setItemData(comboBox.count - 1, 0, qt.Qt.UserRole - 1)  # item flags 0: not selectable
            for text, value, toolTip in members:
                comboBox.addItem(text if header is None else "    " + text, value)
                if toolTip is not None:
                    comboBox.setItemData(comboBox.count - 1, toolTip, qt.Qt.ToolTipRole)
        comboBox.blockSignals(wasBlocked)

    def read(self):
        value = self._widget.itemData(self._widget.currentIndex)
        return value if isinstance(value, str) else ""

    def write(self, value) -> None:
        # Compared in Python, so that None (no item) never equals "" (the automatic choice).
        index = next((i for i in range(self._widget.count) if self._widget.itemData(i) == value), -1)
        if index != self._widget.currentIndex:
            self._widget.currentIndex = index


class RunComboBoxConnector(ItemDataComboBoxConnector):
    """Binds the selected run (its summary table node) to the Results combobox (item data: table node ID)."""

    def read(self):
        nodeID = super().read()
        return slicer.mrmlScene.GetNodeByID(nodeID) if nodeID else None

    def write(self, value) -> None:
        super().write(value.GetID() if value is not None else None)


class MethodSettingsFormConnector(_ExplicitConnector):
    """Binds ``methodSettings`` (JSON {method: {setting: value}}) to a form built from the method registry.

    int settings get a QSpinBox, float a QDoubleSpinBox (decimals from the range), bool a QCheckBox, choice a
    QComboBox; ranges, defaults and tooltips come from the registry. Every method keeps its own values, so switching
    methods loses nothing and a saved scene restores them.

    >>> form = MethodSettingsFormConnector(widget.ui.methodSettingsFrame)
    >>> form.build("integrated_gradients", [{"name": "steps", "type": "int", "default": 32, "min": 2,
    ...                                      "max": 1024, "help": "Integration steps."}], "{}")
    """

    def __init__(self, frame):
        super().__init__(frame)
        self._form = None
        self._method = ""
        self._editors = {}  # setting name -> (setting dict, editor widget)
        self._stored = {}

    def _connect(self):
        """Nothing to do: editors are connected when the form is built, and the base class drops the callback."""

    def _disconnect(self):
        """Nothing to do: see :meth:`_connect`."""


    def build(self, method: str, settings: list, storedJson: str) -> None:
        """Replace the form with the settings of ``method``, showing stored values (defaults otherwise)."""
        if self._form is not None:
            self._widget.layout().removeWidget(self._form)
            self._form.deleteLater()
        self._form = qt.QWidget()
        layout = qt.QFormLayout(self._form)
        layout.setContentsMargins(0, 0, 0, 0)
        self._method = method
        self._editors = {}
        for setting in settings:
            editor = self._makeEditor(setting)
            editor.toolTip = setting.get("help", "")
            layout.addRow(setting["name"].replace("_", " ").capitalize() + ":", editor)
            self._editors[setting["name"]] = (setting, editor)
        if not settings:
            layout.addRow(qt.QLabel(_("(no settings)") if method else _("(the method list is not loaded yet)")))
        self._widget.layout().addWidget(self._form)
        self.write(storedJson)

    def _makeEditor(self, setting):
        kind = setting["type"]
        if kind == "int":
            editor = qt.QSpinBox()
            editor.setRange(int(setting.get("min", -2**31 + 1)), int(setting.get("max", 2**31 - 1)))
            editor.connect("valueChanged(int)", self._onEdited)
        elif kind == "float":
            editor = qt.QDoubleSpinBox()
            decimals = floatDecimals(setting)
            editor.setDecimals(decimals)
            editor.setRange(float(setting.get("min", -1e9)), float(setting.get("max", 1e9)))
            default = abs(float(setting.get("default") or 0.0))
            editor.setSingleStep(10.0 ** math.floor(math.log10(default)) if default > 0 else 10.0 ** (1 - decimals))
            editor.connect("valueChanged(double)", self._onEdited)
        elif kind == "bool":
            editor = qt.QCheckBox()
            editor.connect("toggled(bool)", self._onEdited)
        else:
            editor = qt.QComboBox()
            editor.addItems([str(c) for c in setting.get("choices", [])])
            editor.connect("currentIndexChanged(int)", self._onEdited)
        return editor

    def _onEdited(self, *args):
        self.changed()

    def _values(self) -> dict:
        values = {}
        for name, (setting, editor) in self._editors.items():
            kind = setting["type"]
            values[name] = (editor.checked if kind == "bool" else editor.currentText if kind == "choice"
                            else editor.value)
        return values

    def read(self):
        stored = dict(self._stored)
        if self._method:
            stored[self._method] = self._values()
        return json.dumps(stored, sort_keys=True)

    def write(self, value) -> None:
        self._stored = parseMethodSettings(value)
        values = self._stored.get(self._method, {})
        for name, (setting, editor) in self._editors.items():
            wanted = values.get(name, setting.get("default"))
            wasBlocked = editor.blockSignals(True)
            if setting["type"] == "bool":
                editor.checked = bool(wanted)
            elif setting["type"] == "choice":
                index = editor.findText(str(wanted))
                if index >= 0:
                    editor.currentIndex = index
            elif wanted is not None:
                wanted = int(wanted) if setting["type"] == "int" else float(wanted)
                if editor.value != wanted:
                    editor.value = wanted
            editor.blockSignals(wasBlocked)
