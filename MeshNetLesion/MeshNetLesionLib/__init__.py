"""MeshNetLesion core: MeshNet stroke-lesion segmentation without Slicer.

    from MeshNetLesionLib import load_volume, segment, save_volume
    volume = load_volume("t2.nii.gz")
    result = segment(volume)                      # default model: t2lesion-meshnet11
    save_volume("lesion.nii.gz", result.labels, result.affine, label=True)
"""
__version__ = "0.1.0"

from .errors import (Cancelled, DeviceError, InputError, IntegrityError, MeshNetLesionError, ModelError,  # noqa: E402
                     UnknownModelError)
from .volume import Volume, load_volume, save_volume  # noqa: E402


def __getattr__(name: str):
    # torch-dependent parts load on first use, so `import MeshNetLesionLib` stays cheap (Slicer
    # imports the module at startup, before PyTorch may even be installed).
    if name in ("build_meshnet", "MeshNet", "load_model_files"):
        from . import model
        return getattr(model, name)
    if name in ("Segmenter", "SegmentationResult", "segment"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "Registry":
        from .registry import Registry
        return Registry
    raise AttributeError(name)


__all__ = ["Cancelled", "DeviceError", "InputError", "IntegrityError", "MeshNet", "MeshNetLesionError",
           "ModelError", "Registry", "SegmentationResult", "Segmenter", "UnknownModelError", "Volume",
           "build_meshnet", "load_model_files", "load_volume", "save_volume", "segment"]
