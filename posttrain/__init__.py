"""posttrain: compare post-training pipelines (SFT, SFT->DPO, ORPO) from one YAML recipe.

Importing this package must stay cheap: heavy libraries are imported lazily by the
one module that owns each of them.
"""

__version__ = "0.1.0"
