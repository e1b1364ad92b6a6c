"""Knowledge distillation for small MeshNets: a teacher's soft targets, cached once per volume, and a
training run that resumes from a small state file.

Every voxel of a teacher's probability map is a training signal, not only the lesion voxels that a
sparse ground truth offers, which is the standard remedy when a small model trained on few steps
collapses to all-background. The loss mixes the two (Hinton et al. 2015):

    weight · T² · KL(teacher_T ‖ student_T)  +  (1 − weight) · CE(student, ground truth)

with both distributions softened by the temperature T (the T² keeps the gradient's scale), the
cross-entropy term the paper's (class weights, label smoothing) wherever a ground truth exists, and
the teacher term alone elsewhere. The teacher's two-class output is kept as its lesion probability;
its logit is recovered from it (clipped at ±:data:`LOGIT_CLIP`) to soften it at any temperature.

BatchNorm is trained with fixed statistics. MeshNet's BatchNorm was fitted on whole 256³ volumes
(batch size 1), and at inference it applies those statistics; a student trained on 64³ crops in
PyTorch's train mode normalises each crop by its own statistics and learns to rely on that (one such
run matched its teacher on crops and called 919 mL of "lesion" on the whole scan in eval mode). Here
the statistics are measured once, before the first step, on the whole brain box of the training
volumes (what the network is run on; "precise BatchNorm"), and stay fixed: the layers learn around
them in eval mode, so the student trains with exactly the normalisation it is run with. Measuring
them again every 50 steps made the loss jump after each measurement and end higher than keeping them
(MeshNet-5 on M2265 crops, mean loss of steps 100-120: 0.80 against 0.52 at lr 2e-3, 0.93 against 0.50
at lr 5e-4).

A run writes its whole state (weights, optimiser and scheduler, the step, the record) to one
safetensors file every ``save_every`` steps and at the end; the samples of step ``s`` depend only on
the seed and ``s``, so a run continued from its state makes the same steps as one that never stopped.
No pickle is involved: tensors in safetensors, everything else as JSON in its metadata.

A run trains on its configured device (``auto``: a CUDA GPU where there is one) and keeps its state on
the CPU, so a run started on one machine continues on another. On a GPU the step outruns one core's
augmentation (1.7 s a 128³ sample on an EPYC core); ``workers`` forked processes then prepare the
samples ahead of it, the same samples in the same order.
"""
from __future__ import annotations

from .config import ADDED_SETTINGS, DistillConfig
from .loss import LOGIT_CLIP, distillation_loss, teacher_logit
from .run import (
    STATE_METADATA_KEY,
    Record,
    distill,
    load_state,
    measure_batchnorm,
    prepared_samples,
    save_state,
    student,
)
from .samples import (
    BIAS_FIELD,
    GAMMA,
    TeacherCache,
    TeacherView,
    crop_sample,
    flips,
    intensity_augmented,
    lesion_box,
    network_input,
    rendered_view,
    rendering_draws,
    teacher_view,
)

__all__ = ["ADDED_SETTINGS", "BIAS_FIELD", "GAMMA", "LOGIT_CLIP", "STATE_METADATA_KEY", "DistillConfig", "Record",
           "TeacherCache", "TeacherView", "crop_sample", "distill", "distillation_loss", "flips", "intensity_augmented",
           "lesion_box", "load_state", "measure_batchnorm", "network_input", "prepared_samples", "rendered_view",
           "rendering_draws", "save_state", "student", "teacher_logit", "teacher_view"]
