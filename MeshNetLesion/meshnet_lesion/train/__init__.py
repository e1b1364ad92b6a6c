"""Training MeshNets: the paper's recipe (:mod:`.training`), distillation from a teacher (:mod:`.distill`), the
data they learn from (:mod:`.dataset`, synthetic scans :mod:`.synth`, changed scans :mod:`.perturb`), the network
as a trainable module (:mod:`.model`) and how a model is scored (:mod:`.evaluation`, :mod:`.metrics`).

Built on the inference package (conform, engine, pipeline as the teacher); inference never imports it.
"""
