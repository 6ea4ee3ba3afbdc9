"""The one exception type for errors a user of ``quant`` can cause."""


class QuantError(ValueError):
    """A user-caused quantization error (bad setting, uncalibrated model, wrong checkpoint, ...).

    The message is one line saying what was wrong and what to do.
    """
