"""The study layer: many runs compared the way the papers compare them.

``spec`` reads a study file (experiments x seeds, analyses); ``sweep`` runs it, locally or as a SLURM array;
``compare`` runs the between-model passes (CKA, prediction agreement) on Lightning's Trainer; ``runs`` reads
the runs back; ``report`` writes the tables, statistics and figures. ``python -m study --help``.
"""
