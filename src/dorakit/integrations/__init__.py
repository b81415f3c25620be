"""Code that knows another library's internals: transformers loading, bitsandbytes quantized bases, and
transformers' Trainer (save, resume and quantized-base checks for dorakit models)."""
