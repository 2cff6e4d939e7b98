"""quant/: turn a checkpoint into fp16 / bf16 / int8 / int4 / ONNX checkpoints and compare them (README.md)."""
