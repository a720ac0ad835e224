"""PyTorch interoperability: junyanz/pytorch-CycleGAN-and-pix2pix checkpoints in and out of ganjax.

  ganjax.interop.torch            read/write .pth state_dicts <-> Flax variables (needs torch)
  ganjax.interop.convert          the command line: `python -m ganjax.interop.convert --help`
  ganjax.interop.torch_reference  PyTorch builds of the reference networks (parity tests, benchmarks)
  ganjax.interop.parity           forward / training-step parity checks against them (needs torch)
  ganjax.interop.inception_weights  pytorch-fid's Inception .pth -> Flax variables for FID/KID
  ganjax.interop.drn_weights      GAN Compression's DRN-D-105 Cityscapes segmenter .pth -> Flax + export

Importing this package needs no torch; the functions that read or write .pth files import it when called.
"""
