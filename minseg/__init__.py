"""minseg: segmentation learned by generating images.

Four methods that learn masks without mask labels by training a GAN whose structure exposes them
(improved layered GAN, independence prior, GANSeg, GAN annotation), sharing one set of fused ops
(`minseg.ops`), data sets (`minseg.data`), segmenters (`minseg.nets`) and metrics (`minseg.metrics`).

Importing minseg compiles nothing: the C++/CUDA extension is built lazily on first use of an op.
"""

__version__ = "0.1.0"
