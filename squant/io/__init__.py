"""Files: the squant format on safetensors, checkpoints in and out.

Packing sub-byte codes (``packing``), the file format's entries and metadata (``file_format``),
atomic writes and validated reads (``file_io``), reading checkpoints as people have them
(``sources``: safetensors, ``torch.save`` files, sharded checkpoints; ``torch_files``: safe
``torch.load``, zip-bomb check, trainers' checkpoints), streaming checkpoint quantization for
the CLI (``checkpoint``) and its ``--report`` statistics (``checkpoint_stats``),
``squant.save`` / ``squant.load`` of models (``storage``). Imports :mod:`squant.core` and
:mod:`squant.nn`.
"""
