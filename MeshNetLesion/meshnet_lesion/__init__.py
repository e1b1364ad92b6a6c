"""meshnet_lesion: chronic stroke lesion segmentation on T2w MRI with MeshNet, without Slicer.

    from meshnet_lesion import load_volume, segment, save_volume
    volume = load_volume("t2.nii.gz")
    result = segment(volume)                      # the registry's default lesion model
    save_volume("lesion.nii.gz", result.labels, result.affine, label=True)

This package is inference: what the Slicer extension ships (``MeshNetLesion/CMakeLists.txt``), plus the
PNG preview. :mod:`.study` runs whole studies (BIDS in, derivatives out), :mod:`.train` trains and
distils MeshNets (``from meshnet_lesion.train.model import build_meshnet``), :mod:`.cli` is the
``meshnet-lesion`` command. Inference imports none of them.
"""
from ._version import __version__
from .errors import (
    Cancelled,
    DeviceError,
    InputError,
    IntegrityError,
    MeshNetLesionError,
    ModelError,
    UnknownModelError,
)
from .volume import Volume, load_volume, save_volume

# torch-dependent parts load on first use, so `import meshnet_lesion` stays cheap (Slicer imports
# the module at startup, before PyTorch may even be installed).
_LAZY = {"load_model_files": "formats", "Segmenter": "pipeline",
         "SegmentationResult": "result", "segment": "pipeline", "Registry": "registry"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["Cancelled", "DeviceError", "InputError", "IntegrityError", "MeshNetLesionError", "ModelError", "Registry",
           "SegmentationResult", "Segmenter", "UnknownModelError", "Volume", "__version__", "load_model_files",
           "load_volume", "save_volume", "segment"]
