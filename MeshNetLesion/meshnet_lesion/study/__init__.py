"""A whole study: BIDS or a CSV manifest in, BIDS derivatives out (:mod:`.cohort`), the cohort's table and
mosaic (:mod:`.report`), and the same jobs as a Slurm array (:mod:`.submit`). Built on the inference package;
inference never imports it.
"""
