"""Static checks of what only a Slicer application can run: the panel (.ui), the module file, packaging."""
from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import REPO
from slicer_code import slicer_code

MODULE_DIR = REPO / "MeshNetLesion"
MODULE_FILE = MODULE_DIR / "MeshNetLesion.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MeshNetLesion.ui"
# Widget classes Slicer's Python can instantiate from a .ui: Qt's own and Slicer/CTK classes.
SLICER_CTK_CLASSES = {"qMRMLWidget", "qMRMLNodeComboBox", "qMRMLSegmentationShow3DButton", "ctkCollapsibleButton",
                      "ctkMenuButton", "ctkDoubleSpinBox", "ctkSliderWidget", "ctkPathLineEdit"}
QT_CLASSES = {"QLabel", "QComboBox", "QCheckBox", "QDoubleSpinBox", "QPushButton", "QProgressBar", "QWidget"}
# Which widget can show which parameter type (slicer.parameterNodeWrapper's GUI connectors).
CONNECTOR_TYPES = {"QCheckBox": "bool", "QDoubleSpinBox": "float", "qMRMLNodeComboBox": "vtkMRML"}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def module_tree():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _widgets(ui):
    return {w.get("name"): w.get("class") for w in ui.iter("widget")}


def test_ui_parses_and_uses_only_known_widget_classes(ui):
    widgets = _widgets(ui)
    assert widgets["MeshNetLesion"] == "qMRMLWidget"
    unknown = set(widgets.values()) - SLICER_CTK_CLASSES - QT_CLASSES
    assert not unknown, f"widget classes Slicer does not provide: {unknown}"
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    assert set(widgets.values()) & SLICER_CTK_CLASSES <= declared
    assert declared <= SLICER_CTK_CLASSES


def test_every_ui_attribute_the_widget_uses_exists(ui):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    missing = used - set(_widgets(ui))
    assert not missing, f"self.ui.<name> not in the .ui: {sorted(missing)}"


def _parameter_annotations(module_tree) -> dict[str, str]:
    for node in module_tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "MeshNetLesionParameterNode":
            assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
            return {item.target.id: ast.unparse(item.annotation) for item in node.body
                    if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no MeshNetLesionParameterNode class")


def test_bound_widgets_match_the_parameter_node(ui, module_tree):
    parameters = _parameter_annotations(module_tree)
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") != "SlicerParameterName":
                continue
            name = prop.findtext("string")
            assert name in parameters, f"{widget.get('name')} binds unknown parameter {name}"
            expected = CONNECTOR_TYPES[widget.get("class")]
            assert expected in parameters[name], f"{name}: {widget.get('class')} cannot show {parameters[name]}"
            if parameters[name].startswith("Annotated[float"):
                assert "WithinRange" in parameters[name]  # sliders/spin boxes need a bounded float


def test_module_file_has_the_template_classes_and_no_heavy_imports(module_tree):
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in module_tree.body if isinstance(n, ast.ClassDef)}
    assert classes["MeshNetLesion"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["MeshNetLesionWidget"]
    assert classes["MeshNetLesionTest"] == ["ScriptedLoadableModuleTest"]
    allowed = set(sys.stdlib_module_names) | {"qt", "ctk", "vtk", "slicer", "MeshNetLesionLib"}
    for node in module_tree.body:  # file scope only
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, f"file-scope import of {name} in MeshNetLesion.py"
    from_logic = [n for n in module_tree.body if isinstance(n, ast.ImportFrom) and n.module == "MeshNetLesionLib.logic"]
    assert any(alias.name == "MeshNetLesionLogic" for n in from_logic for alias in n.names)


def test_logic_imports_without_torch():
    code = ("import sys; import MeshNetLesionLib.logic, MeshNetLesionLib.install; "
            "heavy = [m for m in ('torch', 'scipy', 'safetensors', 'pooch') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=MODULE_DIR)
    assert done.returncode == 0, done.stderr


def test_terminology_file_matches_the_segment_entry():
    from MeshNetLesionLib.mrml import LESION_TERMINOLOGY, TERMINOLOGY_CONTEXT, TERMINOLOGY_FILE

    data = json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    assert data["@schema"] == "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
    assert data["SegmentationCategoryTypeContextName"] == TERMINOLOGY_CONTEXT
    category = data["SegmentationCodes"]["Category"][0]
    kind = category["Type"][0]
    assert f"SCT^{category['CodeValue']}^{category['CodeMeaning']}" in LESION_TERMINOLOGY
    assert f"SCT^{kind['CodeValue']}^{kind['CodeMeaning']}" in LESION_TERMINOLOGY
    assert LESION_TERMINOLOGY.startswith(TERMINOLOGY_CONTEXT + "~")


def _cmake_list(text: str, variable: str) -> list[str]:
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "MeshNetLesion") for line in block.splitlines() if line.strip()]


def test_module_cmake_ships_what_the_panel_runs_and_every_bundled_weight():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for path in scripts + [r for r in resources if not r.startswith("${")]:
        assert (MODULE_DIR / path).is_file(), f"CMakeLists.txt lists a missing file: {path}"
    reached = slicer_code()
    assert set(scripts) == reached, f"not shipped: {reached - set(scripts)}; shipped, never used: {set(scripts) - reached}"
    for left_out in ("meshnet_lesion/cli.py", "meshnet_lesion/training.py", "meshnet_lesion/synth.py"):
        assert left_out not in scripts
    assert "meshnet_lesion/models.json" in resources
    # every file under weights/ ships (a glob), so a bundled weight added later cannot be forgotten
    assert "${MODULE_BUNDLED_WEIGHTS}" in resources
    assert re.search(r"file\(GLOB_RECURSE MODULE_BUNDLED_WEIGHTS RELATIVE \$\{CMAKE_CURRENT_SOURCE_DIR\}\s+"
                     r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/meshnet_lesion/weights/\*\)", text)
    bundled = {f["bundled"] for m in json.loads((MODULE_DIR / "meshnet_lesion" / "models.json").read_text())["models"]
               for f in m["files"] if "bundled" in f}
    assert all(path.startswith("weights/") for path in bundled), bundled
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_cmake_and_catalog_entries():
    text = (REPO / "CMakeLists.txt").read_text()
    for needed in ("project(MeshNetLesion)", 'EXTENSION_CATEGORY "Segmentation"', 'EXTENSION_DEPENDS "PyTorch"',
                   "EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                   "EXTENSION_SCREENSHOTURLS", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(MeshNetLesion)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text, needed
    entry = json.loads((REPO / "MeshNetLesion.json").read_text())
    # slicer-extension-catalog-entry-schema v1.0.1: required keys, no others, types
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Segmentation"
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    repository = entry["scm_url"].rstrip("/").split("/")[-1]
    assert repository.startswith("Slicer") and not "MeshNetLesion".startswith("Slicer")
    s4ext = dict(line.split(" ", 1) for line in (REPO / "MeshNetLesion.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert s4ext["depends"] == "PyTorch" and s4ext["category"] == "Segmentation" and s4ext["scm"] == "git"
    cmake = dict(re.findall(r'set\(EXTENSION_(\w+) "(.*?)"\)', text))
    for s4ext_key, cmake_key in (("homepage", "HOMEPAGE"), ("category", "CATEGORY"), ("contributors", "CONTRIBUTORS"),
                                 ("description", "DESCRIPTION"), ("iconurl", "ICONURL"),
                                 ("screenshoturls", "SCREENSHOTURLS"), ("depends", "DEPENDS")):
        assert s4ext[s4ext_key] == cmake[cmake_key], f".s4ext {s4ext_key} differs from CMakeLists.txt"
    assert s4ext["scmurl"].removesuffix(".git") == entry["scm_url"]
    for url_key in ("iconurl", "screenshoturls"):
        relative = s4ext[url_key].split("/main/", 1)[1]
        assert (REPO / relative).is_file(), f"{url_key} points at a file not in the repository: {relative}"
    assert (REPO / "LICENSE.txt").is_file()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_icons_are_128_pixel_pngs():
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / "MeshNetLesion.png") == (128, 128)
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / "SampleARC.png") == (128, 128)


def test_sample_registration_uses_the_registry_entry(registry):
    from MeshNetLesionLib.logic import SAMPLE_ID, MeshNetLesionLogic

    text = MODULE_FILE.read_text(encoding="utf-8")
    assert "MeshNetLesionLogic().sampleFile()" in text and 'checksums=f"SHA256:{file.sha256}"' in text
    assert SAMPLE_ID == "sample-arc-m2265-t2w"
    file = MeshNetLesionLogic(registry=registry).sampleFile()
    assert file == registry.builtin_entry(SAMPLE_ID).files[0]
    assert re.fullmatch(r"[0-9a-f]{64}", file.sha256) and file.url.startswith("https://")


def _method(module_tree, class_name: str, method: str) -> ast.FunctionDef:
    cls = next(n for n in module_tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method)


def test_widget_sets_its_logic_before_the_base_class_can_call_setup(module_tree):
    """Without a parent, ScriptedLoadableModuleWidget.__init__ calls setup(), which needs self.logic."""
    body = _method(module_tree, "MeshNetLesionWidget", "__init__").body
    statements = [ast.unparse(node) for node in body]
    assigns = next(i for i, text in enumerate(statements) if text.startswith("self.logic = logic"))
    base = next(i for i, text in enumerate(statements) if text.startswith("ScriptedLoadableModuleWidget.__init__"))
    assert assigns < base


def test_widget_asks_the_logic_and_never_reaches_into_the_registry():
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert "logic.registry" not in text and "Registry" not in text
    assert "self.logic.defaultModelId()" in text and "self.logic.defaultBrainMask(" in text


def test_slicer_requirements_are_core_dependencies():
    import tomllib

    declared = {re.split(r"[<>=]", d)[0] for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    wanted = [line.split("#")[0].strip() for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()]
    for requirement in filter(None, wanted):
        assert re.split(r"[<>=]", requirement)[0] in declared, requirement


def test_listing_models_needs_no_third_party_package():
    """The panel lists models before the first run installs pooch and friends."""
    code = ("import sys; from meshnet_lesion.registry import Registry; r = Registry(); r.entries(); "
            "r.default_model(); r.builtin_entry('sample-arc-m2265-t2w'); "
            "heavy = [m for m in ('torch', 'scipy', 'safetensors', 'pooch', 'platformdirs') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=MODULE_DIR)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- the widget, read statically (no Qt here)
def _source(module_tree, class_name: str, method: str) -> str:
    return ast.unparse(_method(module_tree, class_name, method))


def test_device_choice_survives_a_refill_and_devices_come_from_the_child(module_tree):
    """Refilling the device list emits currentIndexChanged; unblocked, it wrote "auto" over the user's choice.
    Which devices exist is told by a run's child process (job.devices): Slicer's process never imports torch."""
    populate = _source(module_tree, "MeshNetLesionWidget", "populateDevices")
    assert populate.index("combo.blockSignals(True)") < populate.index("combo.clear()")
    assert populate.index("combo.addItem(") < populate.index("combo.blockSignals(wasBlocked)")
    assert "self._selectData(combo, self._parameterNode.device)" in populate
    finished = _method(module_tree, "MeshNetLesionWidget", "onJobFinished")
    calls = [node for node in ast.walk(finished) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == "self.populateDevices"]
    guards = [node for node in ast.walk(finished) if isinstance(node, ast.If)
              and ast.unparse(node.test) == "job.devices is not None and (not self._devicesKnown)"]
    assert len(calls) == 1 and ast.unparse(calls[0].args[0]) == "job.devices"
    assert guards and calls[0] in list(ast.walk(guards[0]))
    text = MODULE_FILE.read_text(encoding="utf-8")
    for probe in ("import torch", 'find_spec("torch")', "deviceChoices", "available_devices"):
        assert probe not in text, f"the panel probes PyTorch in Slicer's process: {probe}"


def test_import_model_installs_first_and_the_panel_says_when_it_installs(module_tree):
    """Before the first Apply, 'Import model folder…' failed with "No module named 'torch'"."""
    imports = _source(module_tree, "MeshNetLesionWidget", "onImportModel")
    assert imports.index("self.ensureDependencies()") < imports.index("self.logic.importModelFolder(folder)")
    apply = _source(module_tree, "MeshNetLesionWidget", "onApplyButton")
    assert apply.index("self.ensureDependencies()") < apply.index("self.logic.segmentAsync(")
    ensure = _source(module_tree, "MeshNetLesionWidget", "ensureDependencies")
    assert ensure.index("self.ui.statusLabel.text = _('Installing") < ensure.index("slicer.app.processEvents()")
    assert ensure.index("slicer.app.processEvents()") < ensure.index("ensureDependencies(askConfirmation=True)")


def test_a_finished_run_is_shown_in_the_slice_views(module_tree):
    finished = _source(module_tree, "MeshNetLesionWidget", "onJobFinished")
    assert "self.logic.showResult(job)" in finished


def test_error_dialogs_pass_details_only_when_there_are_some(module_tree):
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert "detailedText=None" not in text
    calls = [n for n in ast.walk(module_tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("errorDisplay")]
    with_details = [(call, k.value) for call in calls for k in call.keywords if k.arg == "detailedText"]
    assert with_details  # the failure dialog still shows a traceback when there is one
    for call, value in with_details:
        assert _guarded(module_tree, call, value), ast.unparse(call)


def _guarded(tree, call, value) -> bool:
    """Whether ``call`` sits in the body of an ``if <value>:``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == ast.unparse(value):
            if any(call is inner for statement in node.body for inner in ast.walk(statement)):
                return True
    return False


def test_cleanup_closes_the_job_and_apply_is_debounced(module_tree):
    assert "self._job.close(timeout=JOB_CLOSE_TIMEOUT_S)" in _source(module_tree, "MeshNetLesionWidget", "cleanup")
    body = _method(module_tree, "MeshNetLesionWidget", "onApplyButton").body
    assert ast.unparse(body[0]) == "now = time.monotonic()"
    assert ast.unparse(body[1]).startswith("if now - self._lastApplyClick < APPLY_DEBOUNCE_S:")


def test_setup_loads_the_terminology_and_the_input_default_comes_from_the_logic(module_tree):
    setup = _source(module_tree, "MeshNetLesionWidget", "setup")
    assert "self.logic.loadTerminology()" in setup
    initialize = _source(module_tree, "MeshNetLesionWidget", "initializeParameterNode")
    assert "self.logic.defaultInputVolume()" in initialize and "GetFirstNodeByClass" not in initialize


def test_self_test_skips_without_dependencies_and_installs_only_when_asked(module_tree):
    """In --testing mode Slicer's confirmations accept by themselves (slicer.util.messageBox, 5.8): the self-test
    must not reach the install there."""
    set_up = _source(module_tree, "MeshNetLesionTest", "setUp")
    assert set_up.index("dependenciesMissing()") < set_up.index("self.skipTest(")
    run = _method(module_tree, "MeshNetLesionTest", "runTest")
    branch = next(node for node in ast.walk(run) if isinstance(node, ast.If)
                  and ast.unparse(node.test) == "slicer.app.testingEnabled()")
    assert "ensureDependencies" not in "".join(ast.unparse(n) for n in branch.body)
    assert "dependenciesMissing()" in "".join(ast.unparse(n) for n in branch.body)
    assert "ensureDependencies(askConfirmation=True)" in "".join(ast.unparse(n) for n in branch.orelse)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = re.search(r"Slicer --no-main-window --testing.*?\n```", readme, re.S)
    assert command and "slicer.selfTests['MeshNetLesion']()" in command.group(0)   # --testing exits afterwards


def test_texts_are_translatable_and_say_license(module_tree):
    text = MODULE_FILE.read_text(encoding="utf-8")
    library = "".join(p.read_text(encoding="utf-8") for p in (MODULE_DIR / "MeshNetLesionLib").glob("*.py"))
    assert "Licence" not in text + library + UI_FILE.read_text(encoding="utf-8")
    assert '<a href="{url}">' in text and "DOCUMENTATION_URL" in text
    for node in ast.walk(module_tree):  # the status line is always a translated text
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "self.ui.statusLabel.text":
            value = ast.unparse(node.value)
            assert value.startswith(("_(", "texts.")), value


def test_stage_texts_map_onto_translatable_phrases(monkeypatch):
    from MeshNetLesionLib import texts

    seen = []
    monkeypatch.setattr(texts, "_", lambda text: seen.append(text) or f"<{text}>")  # a "translation"
    assert texts.stageText("segmenting (model 2 of 3): layer 5 of 26") == "<segmenting (model 2 of 3)>: <layer 5 of 26>"
    assert texts.stageText("brain mask: layer 1 of 26") == "<brain mask>: <layer 1 of 26>"
    assert texts.stageText("segmenting (model 1 of 3): mirrored scan: layer 2 of 26") == \
        "<segmenting (model 1 of 3)>: <mirrored scan>: <layer 2 of 26>"
    assert texts.stageText("downloading model.pth (40%)") == "<downloading model.pth (40%)>"
    assert texts.stageText("something new") == "something new"
    assert "segmenting (model {index} of {count})" in seen and "layer {index} of {count}" in seen


def test_requirements_leave_out_what_slicer_ships_and_an_install_failure_is_one_dialog(monkeypatch):
    wanted = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    requirements = [line.split("#")[0].strip() for line in wanted.splitlines() if line.split("#")[0].strip()]
    assert not any(re.split(r"[<>=]", r)[0] in ("scipy", "numpy", "torch") for r in requirements)

    pytest.importorskip("slicer", reason="needs the slicer-core package")
    import slicer

    from MeshNetLesionLib import install

    dialogs = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: dialogs.append((text, kw)), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: False, raising=False)
    monkeypatch.setattr(install, "missingPackages", lambda: ["pooch>=1.8"])

    def failing(missing, python=None):
        raise RuntimeError("pip exited with code 1:\nERROR: No matching distribution found for pooch>=1.8")

    monkeypatch.setattr(install, "pipInstall", failing)
    assert install.ensureDependencies(askConfirmation=False) is False
    assert len(dialogs) == 1 and "Could not install pooch>=1.8" in dialogs[0][0] and not dialogs[0][1]
    assert "No matching distribution" in dialogs[0][0]
    assert install.ensureDependencies(askConfirmation=True) is False and len(dialogs) == 1  # declined: no dialog
    assert install.dependenciesMissing() == ["pooch>=1.8"] or install.dependenciesMissing()[0].startswith("torch")


def test_catalogue_entry_is_short_and_names_contributors_with_their_organisation():
    text = (REPO / "CMakeLists.txt").read_text()
    cmake = dict(re.findall(r'set\(EXTENSION_(\w+) "(.*?)"\)', text))
    sentences = [s for s in re.split(r"(?<=\.)\s+", cmake["DESCRIPTION"]) if s]
    assert 1 <= len(sentences) <= 2, sentences   # the extension template asks for one or two sentences
    assert "thread" not in cmake["DESCRIPTION"]
    for contributor in cmake["CONTRIBUTORS"].split(", "):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor), contributor   # "Name (Organisation)"
    module = MODULE_FILE.read_text(encoding="utf-8")
    listed = re.search(r"self\.parent\.contributors = \[(.*?)\]", module).group(1)
    assert listed.strip('"') == cmake["CONTRIBUTORS"]
