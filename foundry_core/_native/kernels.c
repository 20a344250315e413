/* LOAD's kernel preparation in one call: load every archived image as a module, resolve every function, apply
 * its recorded attributes and force it onto the device.
 *
 * Why native: the preparation runs on a thread beside the application's start-up (imports), and it makes
 * hundreds of short driver calls. Through Python each call gives the GIL up and must win it back from a busy
 * importing thread, paying up to one switch interval (5 ms) each time. Here the GIL is released once, by ctypes,
 * for the whole batch. Same driver calls, same order, same error wording as foundry_core/images.py.
 */
#include "driver.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>

typedef CUresult (*func_load_fn)(CUfunction);

/* cuFuncLoad arrived in CUDA 12.4: looked up on its own, so that an older driver still loads (without it). */
static func_load_fn func_load(void) {
    static int looked = 0;
    static func_load_fn fn = NULL;
    if (!looked) {
        void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
        if (h) fn = (func_load_fn)dlsym(h, "cuFuncLoad");
        looked = 1;
    }
    return fn;
}

static void unload_all(uint64_t *modules, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        if (modules[i]) p_cuModuleUnload((CUmodule)(uintptr_t)modules[i]);
        modules[i] = 0;
    }
}

/* images[i] / image_sizes[i]: the verified image bytes (the sizes are for the messages: the driver reads the
 * ELF/fatbin headers). Function f lives in image func_image[f] under the NUL-terminated func_names[f]; its
 * attributes are attr_ids/attr_values[attr_off[f] .. attr_off[f+1]), already in the order to apply them.
 * Fills modules_out[n_images] and functions_out[n_funcs]. 0 on success; otherwise -1, a one-line reason in
 * err, and nothing left loaded. */
int foundry_load_kernels(uint32_t n_images, const void *const *images, const uint64_t *image_sizes,
                         uint32_t n_funcs, const uint32_t *func_image, const char *const *func_names,
                         const uint32_t *attr_off, const int32_t *attr_ids, const int64_t *attr_values,
                         int force_load, uint64_t *modules_out, uint64_t *functions_out, char *err, size_t errlen) {
    if (foundry_driver_load(err, errlen) != 0) return -1;
    for (uint32_t i = 0; i < n_images; i++) modules_out[i] = 0;
    uint32_t loaded = 0;
    CUresult r;
    for (; loaded < n_images; loaded++) {
        CUmodule mod = NULL;
        r = p_cuModuleLoadData(&mod, images[loaded]);
        if (r != CUDA_SUCCESS) {
            snprintf(err, errlen, "cuModuleLoadData(image #%u, %llu bytes) failed: %s", loaded,
                     (unsigned long long)image_sizes[loaded], foundry_cu_error_name(r));
            goto fail;
        }
        modules_out[loaded] = (uint64_t)(uintptr_t)mod;
    }
    func_load_fn load_fn = force_load ? func_load() : NULL;
    for (uint32_t f = 0; f < n_funcs; f++) {
        if (func_image[f] >= n_images) {
            snprintf(err, errlen, "kernel %s refers to image #%u, but only %u are loaded", func_names[f],
                     func_image[f], n_images);
            goto fail;
        }
        CUfunction fn = NULL;
        r = p_cuModuleGetFunction(&fn, (CUmodule)(uintptr_t)modules_out[func_image[f]], func_names[f]);
        if (r != CUDA_SUCCESS) {
            snprintf(err, errlen, "cuModuleGetFunction(%s) failed: %s", func_names[f], foundry_cu_error_name(r));
            goto fail;
        }
        for (uint32_t a = attr_off[f]; a < attr_off[f + 1]; a++) {
            r = p_cuFuncSetAttribute(fn, (CUfunction_attribute)attr_ids[a], (int)attr_values[a]);
            if (r != CUDA_SUCCESS) {
                snprintf(err, errlen, "cuFuncSetAttribute(%s, %d=%lld) failed: %s", func_names[f], attr_ids[a],
                         (long long)attr_values[a], foundry_cu_error_name(r));
                goto fail;
            }
        }
        if (load_fn) {
            r = load_fn(fn);
            if (r != CUDA_SUCCESS) {
                snprintf(err, errlen, "cuFuncLoad(%s) failed: %s", func_names[f], foundry_cu_error_name(r));
                goto fail;
            }
        }
        functions_out[f] = (uint64_t)(uintptr_t)fn;
    }
    return 0;
fail:
    unload_all(modules_out, loaded);
    return -1;
}
