"""Code that knows another library's internals: transformers loading, bitsandbytes quantized bases."""
