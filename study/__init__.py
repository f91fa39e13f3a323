"""The study layer: many runs compared the way the papers compare them, in floors that each import only those
before them (tests/test_layout.py):

0. ``spec``: the study file (experiments x seeds, grid points, the CKA and transfer plans), checked before any run.
1. ``passes`` (what every between-model pass shares), ``statistics``, ``plotting``.
2. ``runs`` (everything read from a run folder), ``cka``, ``barriers``, ``criticality`` (each pass with its table
   and figure).
3. ``plan`` (stages, grid scores, the refit's point), ``finetuning`` (the report's section on fine-tuning).
4. ``launch`` (local runs, SLURM arrays), ``analyse`` (cka.json, transfer.json), ``report`` (report.md).
5. ``__main__``: ``python -m study --help``.
"""
