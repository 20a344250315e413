"""Kernel binaries under their former single name: :mod:`foundry_core.recorder` records the module images a
process loads (CUPTI); :mod:`foundry_core.images` ties graph kernels to those images at SAVE and loads them
back at LOAD. New code imports those two modules; this one only re-exports their public names.
"""
from foundry_core.images import (
    DriverError,
    FunctionRef,
    ImageFacts,
    ModuleFacts,
    StoredImage,
    changed_attributes,
    choose_image,
    consistent_with_cubin,
    device_arch,
    get_functions,
    image_facts,
    load_images,
    load_kernels,
    loading_mode,
    resolve_functions,
    select_images,
    unload_modules,
)
from foundry_core.recorder import CapturedImage, ImageCaptureError, ImageRecorder, ModuleGlobal, find_libcupti

__all__ = [
    "CapturedImage", "DriverError", "FunctionRef", "ImageCaptureError", "ImageFacts", "ImageRecorder", "ModuleFacts",
    "ModuleGlobal", "StoredImage", "changed_attributes", "choose_image", "consistent_with_cubin", "device_arch",
    "find_libcupti", "get_functions", "image_facts", "load_images", "load_kernels", "loading_mode", "resolve_functions",
    "select_images", "unload_modules",
]
