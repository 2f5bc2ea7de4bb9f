"""Files: the squant format on safetensors, checkpoints in and out.

Packing sub-byte codes (``packing``), the file format's entries and metadata (``file_format``),
atomic writes and validated reads (``file_io``), streaming checkpoint quantization for the CLI
(``checkpoint``), ``squant.save`` / ``squant.load`` of models (``storage``). Imports
:mod:`squant.core` and :mod:`squant.nn`.
"""
