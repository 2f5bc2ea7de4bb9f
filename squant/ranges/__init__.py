"""Activation quantization and the corrections that need the layers' inputs.

The paper's data-free range rule and the calibration pass (``activations``), ranges and input
moments from BatchNorm statistics (``batchnorm``), ranges from real input batches
(``calibration``: hooks and passes; ``calibration_methods``: histograms, KL, MSE, percentile,
EMA), data-free bias correction (``bias_correction``). Imports :mod:`squant.core` and
:mod:`squant.nn`.
"""
