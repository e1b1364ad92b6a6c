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


def test_module_cmake_lists_every_file_and_only_existing_ones():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for path in scripts + resources:
        assert (MODULE_DIR / path).is_file(), f"CMakeLists.txt lists a missing file: {path}"
    code = {p.relative_to(MODULE_DIR).as_posix() for package in ("MeshNetLesionLib", "meshnet_lesion")
            for p in (MODULE_DIR / package).rglob("*.py")}
    assert code <= set(scripts), f"not packaged: {code - set(scripts)}"
    assert "meshnet_lesion/models.json" in resources
    bundled = {f"meshnet_lesion/{f['bundled']}" for m in json.loads((MODULE_DIR / "meshnet_lesion" / "models.json")
               .read_text())["models"] for f in m["files"] if "bundled" in f}
    assert bundled <= set(resources), f"weights the registry ships are not packaged: {bundled - set(resources)}"
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
