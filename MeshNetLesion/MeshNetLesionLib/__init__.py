"""MeshNetLesion's Slicer-side code (Qt-free; runs headless on ``slicer-core``) over the core, :mod:`meshnet_lesion`.

- :mod:`.logic`: :class:`~.logic.MeshNetLesionLogic`, the module's public API;
- :mod:`.job`: one run (a :class:`meshnet_lesion.request.SegmentationRequest`) in a child process, relayed to the
  main thread;
- :mod:`.launcher`: starting children through Slicer's ``PythonSlicer`` and stopping them for real;
- :mod:`.mrml`: volume nodes to core volumes, results to segmentation and volume nodes;
- :mod:`.texts`: what the panel says, through Slicer's translation function;
- :mod:`.install`: installing PyTorch and the other packages into Slicer's Python.
"""
