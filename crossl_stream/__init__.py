"""crossl-stream: streaming inference for wearable sensors with CroSSL.

Readers fill ring buffers, a windower aligns sensors into masked windows, an inference
worker runs the CroSSL model, publishers send predictions downstream. This release ships
the model, its training on real recordings, and offline prediction.
"""

__version__ = "0.1.0"
