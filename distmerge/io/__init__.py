"""Reading and writing safetensors: headers for planning, tensors streamed one at a time."""
