"""Activation quantization and the corrections that need the layers' inputs.

The paper's data-free range rule and the calibration pass (``activations``), ranges and input
moments from BatchNorm statistics (``batchnorm``), data-free bias correction
(``bias_correction``). Imports :mod:`squant.core` and :mod:`squant.nn`.
"""
