"""sparsebench: is the pruned and quantized CNN actually faster on a GPU?"""

__version__ = "0.1.0"
