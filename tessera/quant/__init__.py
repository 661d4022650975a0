"""Quantized weight formats and their kernels (FP8, GGUF, MXFP4).

`config.QuantConfig` decides which format each layer gets (from an HF `quantization_config`, from
`--quantization {fp8, fp8_block, mxfp4}`, or from a GGUF file's tensor types); `methods` holds the
formats as `LinearMethod`s for the parallel linear layers, `moe_methods` as `ExpertsMethod`s for MoE
experts; `fp8`, `gguf`, `mxfp4` (and `mxfp4_moe`) the formats themselves and their opaque ops. Nothing
is imported here, so `import tessera.quant` loads no kernels.
"""
