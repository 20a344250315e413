"""Tools beside the tests: the archive fuzzer, the sanitizer run of the native checks, the serving soak, the GPU
probe and the no-GPU exit the GPU scripts share. A package, so that scripts elsewhere import ``tools.needs_gpu``."""
