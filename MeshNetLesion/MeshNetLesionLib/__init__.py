"""MeshNetLesion's Slicer-side code (Qt-free; runs headless on ``slicer-core``) over the core, :mod:`meshnet_lesion`.

- :mod:`.logic`: :class:`~.logic.MeshNetLesionLogic`, the module's public API;
- :mod:`.job`: one run on a worker thread, and its :class:`~.job.RunOptions`;
- :mod:`.mrml`: volume nodes to core volumes, results to segmentation and volume nodes;
- :mod:`.install`: installing PyTorch and the other packages into Slicer's Python.
"""
