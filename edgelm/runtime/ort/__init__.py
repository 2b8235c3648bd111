"""The onnxruntime backend: encoders, GPT-2 and recurrent decoders, and the ONNX files' own checks."""
