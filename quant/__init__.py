"""Quantization that simulates TensorFlow Lite integer numerics exactly (see docs/DESIGN.md and
notes/graph-mode.md). ``float_model`` is any ``nn.Module`` torch.fx can trace (``quant.graph``):

    qmodel = quant.quantize(float_model, quant.QuantConfig(weight_bits=8, act_bits=8))
    quant.calibrate(qmodel, train_batches, num_batches=cfg.calib_batches)   # PTQ
    imodel = quant.convert(qmodel, rounding="ref")                          # integer only
    quant.compare(test_batches, {"float": float_model, "fq": qmodel, "int": imodel})

QAT: after ``calibrate``, ``prepare_qat(qmodel, QATConfig(...))`` then train (see quant/qat.py, QAT.py).
PTQ methods (cross-layer equalisation, AdaRound, bias correction, learned activation steps, the
output's range) in one call: ``quant.ptq(model, cfg, batches,
methods=(...))`` (quant/ptq.py; notes/methods.md); per-layer bits: ``QuantConfig(layers=...)``.
"""
from quant.adaround import AdaRoundConfig, adaround
from quant.act_tune import ActTuneConfig, act_tune
from quant.checkpoint import integer_meta, load_integer, load_quantized, save_integer, save_quantized
from quant.config import QATConfig, QuantConfig, parse_layer_settings
from quant.errors import QuantError
from quant.evaluate import compare
from quant.export_tflite import RUNTIMES, TFLiteRunner, export_tflite, make_runner
from quant.tflm import TFLMRunner, tflm_arena_bytes, write_c_array
from quant.fixed_point import multiply_by_quantized_multiplier, quantize_multiplier
from quant.fold import fold_bn
from quant.graph import model_graph
from quant.integer import IntModel
from quant.methods import absorb_high_biases, bias_correction, equalization_pairs, equalize, weighted_layers
from quant.modules import LSQQuantize
from quant.output_range import output_range
from quant.ptq import COMPARISON, METHODS, first_last, ptq, ptq_methods
from quant.sensitivity import greedy_weight_bits, layer_sensitivity
from quant.qparams import QParams, choose_qparams, dequantize, fake_quantize, quantize as quantize_tensor
from quant.qat import (clamp_lsq_, frozen_act_observers, prepare_qat, set_act_observers, set_bn_frozen,
                       set_bn_momentum, set_fold_grad_scale, sync_act_ranges)
from quant.transforms import calibrate, calibration_mode, convert, quantize, set_fake_quant, set_observers, set_requant

__all__ = [
    "QuantConfig", "QATConfig", "parse_layer_settings", "AdaRoundConfig", "adaround", "ActTuneConfig", "act_tune", "output_range", "bias_correction", "equalize", "absorb_high_biases",
    "equalization_pairs", "weighted_layers", "layer_sensitivity", "greedy_weight_bits", "ptq", "ptq_methods", "METHODS", "COMPARISON", "first_last", "QuantError", "LSQQuantize", "QParams", "IntModel",
    "quantize", "calibrate", "calibration_mode", "convert", "set_fake_quant", "set_observers", "set_requant", "compare",
    "save_quantized", "load_quantized", "save_integer", "load_integer", "integer_meta",
    "choose_qparams", "quantize_tensor", "dequantize", "fake_quantize", "fold_bn", "model_graph",
    "quantize_multiplier", "multiply_by_quantized_multiplier",
    "prepare_qat", "set_bn_frozen", "set_bn_momentum", "set_fold_grad_scale", "set_act_observers",
    "frozen_act_observers", "clamp_lsq_", "sync_act_ranges",
    "export_tflite", "TFLiteRunner", "TFLMRunner", "RUNTIMES", "make_runner", "tflm_arena_bytes", "write_c_array",
]
