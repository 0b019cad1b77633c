"""autoq: mixed-precision quantization search for large language models.

Stages (each a function here and a CLI subcommand, each leaving an artifact on disk):
score (``autoq.pipeline.score``) -> solve (``autoq.solver``) -> plan (``autoq.plan``) ->
apply + export (``autoq.apply``) -> verify (``autoq.verify``).
"""

__version__ = "0.1.0"
