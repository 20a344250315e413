#include "driver.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

#define FOUNDRY_DEFINE(fn) __typeof__(fn) *p_##fn = NULL;
FOUNDRY_DRIVER_FUNCS(FOUNDRY_DEFINE)

static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;
static int loaded = 0;

int foundry_driver_load(char *err, size_t errlen) {
    pthread_mutex_lock(&load_mu);
    if (loaded) { pthread_mutex_unlock(&load_mu); return 0; }
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        snprintf(err, errlen, "cannot load the CUDA driver (libcuda.so.1): %s", dlerror());
        pthread_mutex_unlock(&load_mu);
        return -1;
    }
#define FOUNDRY_LOAD(fn)                                                                             \
    p_##fn = (__typeof__(fn) *)dlsym(h, FOUNDRY_XSTR(fn));                                           \
    if (!p_##fn) {                                                                                   \
        snprintf(err, errlen, "CUDA driver lacks %s (driver too old?)", FOUNDRY_XSTR(fn));           \
        pthread_mutex_unlock(&load_mu);                                                              \
        return -1;                                                                                   \
    }
    FOUNDRY_DRIVER_FUNCS(FOUNDRY_LOAD)
    loaded = 1;
    pthread_mutex_unlock(&load_mu);
    return 0;
}

const char *foundry_cu_error_name(CUresult r) {
    const char *name = NULL;
    if (p_cuGetErrorName && p_cuGetErrorName(r, &name) == CUDA_SUCCESS && name) return name;
    return "CUDA_ERROR_?";
}
