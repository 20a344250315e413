/*
 * Record every CUDA module image the process loads, through CUPTI resource callbacks.
 *
 * CUPTI calls us on MODULE_LOADED (and MODULE_UNLOAD_STARTING) with the image bytes the driver
 * loaded (cubin or fatbin). We copy each distinct image once into process memory under a mutex;
 * Python copies them out after capture (foundry_core/binaries.py, ImageRecorder).
 *
 * We also watch the driver calls cuModuleLoad/LoadData/LoadDataEx/LoadFatBinary: the MODULE_LOADED
 * callback fires on the same thread inside such a call, so at the call's exit the returned CUmodule
 * handle can be paired with the module id, and so with the image (exact identity for modules loaded
 * explicitly, e.g. by Triton). Modules the CUDA runtime loads internally get no such pairing.
 *
 * And the driver calls that hand the address of a module-scope variable to host code (cuModuleGetGlobal_v2,
 * cuLibraryGetGlobal; cudaGetSymbolAddress and cudaMemcpyToSymbol go through them): at their exit we keep
 * (name, address, size). A library that passes such an address to its kernels (cuBLAS keeps alpha/beta
 * constants in a kernel-less module) or writes the variable after loading makes graphs depend on module
 * memory that a fresh load of the image at LOAD neither places at the same address nor fills the same way.
 *
 * No link-time dependency on CUPTI or the driver: libcupti is dlopen'ed from a path Python passes,
 * libcuda is only looked at if the process already loaded it (RTLD_NOLOAD). The few CUPTI types
 * used are declared here with the layouts of cupti_callbacks.h / cupti_result.h (CUDA 12 and 13),
 * because the headers are not installed everywhere.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FOUNDRY_CUPTI_ABI 2

/* ---- CUPTI declarations (mirror cupti_callbacks.h / cupti_result.h) ---- */
typedef int CUptiResult;                   /* enum CUptiResult */
typedef int CUpti_CallbackDomain;          /* enum CUpti_CallbackDomain */
typedef uint32_t CUpti_CallbackId;
typedef struct CUpti_Subscriber_st *CUpti_SubscriberHandle;
typedef void (*CUpti_CallbackFunc)(void *userdata, CUpti_CallbackDomain domain, CUpti_CallbackId cbid,
                                   const void *cbdata);

typedef struct {
    void *context;                         /* CUcontext */
    union {
        void *stream;                      /* CUstream */
    } resourceHandle;
    void *resourceDescriptor;              /* CUpti_ModuleResourceData* for module callbacks */
} CUpti_ResourceData;

typedef struct {
    uint32_t moduleId;
    size_t cubinSize;
    const char *pCubin;
} CUpti_ModuleResourceData;

typedef struct {                           /* cbdata for the driver-API domain */
    int callbackSite;                      /* CUpti_ApiCallbackSite: 0 enter, 1 exit */
    const char *functionName;
    const void *functionParams;            /* cuModuleLoad*_params: first field is CUmodule *module */
    void *functionReturnValue;             /* CUresult * (valid at exit) */
    const char *symbolName;
    void *context;
    uint32_t contextUid;
    uint64_t *correlationData;
    uint32_t correlationId;
} CUpti_CallbackData;

typedef struct {                           /* cuptiSubscribe_v2 parameters (CUDA 12.9+) */
    size_t structSize;
    const char *subscriberName;
    char *oldSubscriberName;
    size_t oldSubscriberSize;
} CUpti_SubscriberParams;

enum {
    CUPTI_SUCCESS = 0,
    CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED = 39,
    CUPTI_CB_DOMAIN_DRIVER_API = 1,
    CUPTI_CB_DOMAIN_RESOURCE = 3,
    CUPTI_API_ENTER = 0,
    CUPTI_API_EXIT = 1,
    CUPTI_CBID_RESOURCE_MODULE_LOADED = 6,
    CUPTI_CBID_RESOURCE_MODULE_UNLOAD_STARTING = 7,
};

/* cupti_driver_cbid.h: cuModuleLoad, cuModuleLoadData, cuModuleLoadDataEx, cuModuleLoadFatBinary */
static const CUpti_CallbackId k_load_cbids[] = {18, 19, 20, 21};
/* cupti_driver_cbid.h: cuModuleGetGlobal_v2, cuLibraryGetGlobal; both take (CUdeviceptr *dptr, size_t *bytes,
 * handle, const char *name) (generated_cuda_meta.h) */
enum { CBID_MODULE_GET_GLOBAL_V2 = 241, CBID_LIBRARY_GET_GLOBAL = 684 };
typedef struct {
    uint64_t *dptr;
    size_t *bytes;
    void *handle;
    const char *name;
} get_global_params;

typedef CUptiResult (*subscribe_fn)(CUpti_SubscriberHandle *, CUpti_CallbackFunc, void *);
typedef CUptiResult (*subscribe_v2_fn)(CUpti_SubscriberHandle *, CUpti_CallbackFunc, void *,
                                       CUpti_SubscriberParams *);
typedef CUptiResult (*unsubscribe_fn)(CUpti_SubscriberHandle);
typedef CUptiResult (*enable_callback_fn)(uint32_t, CUpti_SubscriberHandle, CUpti_CallbackDomain,
                                          CUpti_CallbackId);
typedef CUptiResult (*result_string_fn)(CUptiResult, const char **);

/* ---- recorded images ---- */
typedef struct {
    uint8_t *data;
    size_t size;
    uint64_t hash;          /* FNV-1a, to find repeats cheaply */
    uint32_t module_id;     /* CUPTI module id of the first load */
    uint64_t order;         /* load-event sequence number of the first load */
    uint32_t loads;         /* how many module loads delivered these bytes */
    uint32_t unloads;       /* how many of those modules were unloaded since */
    int seen_at_unload;     /* 1: first seen at unload (loaded before we subscribed) */
} image_t;

typedef struct {
    uint32_t module_id;
    size_t image;
    uint64_t handle;        /* CUmodule returned by the cuModuleLoad* call that loaded it; 0 if unknown */
} module_t;

/* a module-scope variable whose address the driver handed out */
typedef struct {
    char *name;
    uint64_t address;
    uint64_t size;
    uint64_t handle;        /* the CUmodule or CUlibrary asked */
    int via_library;        /* 1: cuLibraryGetGlobal, 0: cuModuleGetGlobal_v2 */
} global_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static global_t *g_globals;
static size_t g_nglobals, g_globals_cap;
static int g_global_callbacks;             /* the get-global callbacks are enabled */
static image_t *g_images;
static size_t g_count, g_cap;
static module_t *g_modules;
static size_t g_nmodules, g_modules_cap;
static uint64_t g_events;
static size_t g_total_bytes;
static int g_oom;                          /* a copy failed for lack of memory */

static void *g_cupti;
static CUpti_SubscriberHandle g_subscriber;
static unsubscribe_fn g_unsubscribe;
static enable_callback_fn g_enable;
static result_string_fn g_result_string;
static int g_active;
static int g_driver_callbacks;             /* the cuModuleLoad* callbacks are enabled */

/* Per thread: inside a cuModuleLoad* call, the module ids loaded so far. */
static __thread int t_depth;
static __thread int t_npending;
static __thread uint32_t t_pending[4];

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static const char *result_name(CUptiResult r) {
    const char *s = NULL;
    if (g_result_string && g_result_string(r, &s) == CUPTI_SUCCESS && s)
        return s;
    return "unknown CUPTI error";
}

/* Caller holds g_lock; h = fnv1a(bytes). Returns the image index, or (size_t)-1 when out of memory. */
static size_t store_image(const char *bytes, size_t size, uint64_t h, uint32_t module_id, int at_unload) {
    for (size_t i = 0; i < g_count; i++) {
        image_t *im = &g_images[i];
        if (im->size == size && im->hash == h && memcmp(im->data, bytes, size) == 0) {
            if (!at_unload)
                im->loads++;
            return i;
        }
    }
    if (g_count == g_cap) {
        size_t cap = g_cap ? g_cap * 2 : 256;
        image_t *n = realloc(g_images, cap * sizeof(image_t));
        if (!n)
            return (size_t)-1;
        g_images = n;
        g_cap = cap;
    }
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return (size_t)-1;
    memcpy(copy, bytes, size);
    image_t *im = &g_images[g_count];
    im->data = copy;
    im->size = size;
    im->hash = h;
    im->module_id = module_id;
    im->order = g_events;
    im->loads = at_unload ? 0 : 1;
    im->unloads = 0;
    im->seen_at_unload = at_unload;
    g_total_bytes += size;
    return g_count++;
}

static void remember_module(uint32_t module_id, size_t image) {
    if (g_nmodules == g_modules_cap) {
        size_t cap = g_modules_cap ? g_modules_cap * 2 : 256;
        module_t *n = realloc(g_modules, cap * sizeof(module_t));
        if (!n)
            return;  /* only costs us the unload bookkeeping */
        g_modules = n;
        g_modules_cap = cap;
    }
    g_modules[g_nmodules].module_id = module_id;
    g_modules[g_nmodules].image = image;
    g_modules[g_nmodules].handle = 0;
    g_nmodules++;
}

/* Enter/exit of a cuModuleLoad* call: pair the returned CUmodule with the module id loaded inside it. */
static void on_module_load_call(const CUpti_CallbackData *cd) {
    if (cd->callbackSite == CUPTI_API_ENTER) {
        if (t_depth++ == 0)
            t_npending = 0;
        return;
    }
    if (t_depth == 0)  /* the call began before we subscribed */
        return;
    if (--t_depth > 0)
        return;
    const int *rc = (const int *)cd->functionReturnValue;
    void *const *module_out = cd->functionParams ? *(void *const *const *)cd->functionParams : NULL;
    if (!rc || *rc != 0 || !module_out || !*module_out || t_npending != 1)
        return;
    uint32_t id = t_pending[0];
    pthread_mutex_lock(&g_lock);
    for (size_t i = g_nmodules; i-- > 0;) {
        if (g_modules[i].module_id == id) {
            g_modules[i].handle = (uint64_t)(uintptr_t)*module_out;
            break;
        }
    }
    pthread_mutex_unlock(&g_lock);
}

/* Exit of cuModuleGetGlobal_v2 / cuLibraryGetGlobal: remember (name, address, size) once per address. */
static void on_get_global_call(const CUpti_CallbackData *cd, int via_library) {
    if (cd->callbackSite != CUPTI_API_EXIT || !cd->functionParams)
        return;
    const int *rc = (const int *)cd->functionReturnValue;
    const get_global_params *p = (const get_global_params *)cd->functionParams;
    if (!rc || *rc != 0 || !p->dptr || !p->name)
        return;
    uint64_t address = *p->dptr;
    uint64_t size = p->bytes ? (uint64_t)*p->bytes : 0;
    if (!address)
        return;
    pthread_mutex_lock(&g_lock);
    for (size_t i = 0; i < g_nglobals; i++) {
        if (g_globals[i].address == address && g_globals[i].size == size && strcmp(g_globals[i].name, p->name) == 0) {
            pthread_mutex_unlock(&g_lock);
            return;
        }
    }
    if (g_nglobals == g_globals_cap) {
        size_t cap = g_globals_cap ? g_globals_cap * 2 : 64;
        global_t *n = realloc(g_globals, cap * sizeof(global_t));
        if (!n) {
            g_oom = 1;
            pthread_mutex_unlock(&g_lock);
            return;
        }
        g_globals = n;
        g_globals_cap = cap;
    }
    char *name = strdup(p->name);
    if (!name) {
        g_oom = 1;
        pthread_mutex_unlock(&g_lock);
        return;
    }
    global_t *g = &g_globals[g_nglobals++];
    g->name = name;
    g->address = address;
    g->size = size;
    g->handle = (uint64_t)(uintptr_t)p->handle;
    g->via_library = via_library;
    pthread_mutex_unlock(&g_lock);
}

static void on_callback(void *userdata, CUpti_CallbackDomain domain, CUpti_CallbackId cbid, const void *cbdata) {
    (void)userdata;
    if (!cbdata)
        return;
    if (domain == CUPTI_CB_DOMAIN_DRIVER_API) {
        if (cbid == CBID_MODULE_GET_GLOBAL_V2 || cbid == CBID_LIBRARY_GET_GLOBAL)
            on_get_global_call((const CUpti_CallbackData *)cbdata, cbid == CBID_LIBRARY_GET_GLOBAL);
        else
            on_module_load_call((const CUpti_CallbackData *)cbdata);
        return;
    }
    if (domain != CUPTI_CB_DOMAIN_RESOURCE)
        return;
    if (cbid != CUPTI_CBID_RESOURCE_MODULE_LOADED && cbid != CUPTI_CBID_RESOURCE_MODULE_UNLOAD_STARTING)
        return;
    const CUpti_ResourceData *rd = (const CUpti_ResourceData *)cbdata;
    const CUpti_ModuleResourceData *md = (const CUpti_ModuleResourceData *)rd->resourceDescriptor;
    if (!md)
        return;
    int has_image = md->pCubin && md->cubinSize;
    uint64_t h = has_image ? fnv1a((const uint8_t *)md->pCubin, md->cubinSize) : 0;  /* outside the lock */
    pthread_mutex_lock(&g_lock);
    g_events++;
    if (cbid == CUPTI_CBID_RESOURCE_MODULE_LOADED) {
        if (t_depth > 0 && t_npending < (int)(sizeof t_pending / sizeof t_pending[0]))
            t_pending[t_npending++] = md->moduleId;
        else if (t_depth > 0)
            t_npending++;  /* too many to pair: leave unpaired */
        if (has_image) {
            size_t idx = store_image(md->pCubin, md->cubinSize, h, md->moduleId, 0);
            if (idx == (size_t)-1)
                g_oom = 1;
            else
                remember_module(md->moduleId, idx);
        }
    } else {
        size_t found = (size_t)-1;
        for (size_t i = g_nmodules; i-- > 0;) {
            if (g_modules[i].module_id == md->moduleId) {
                found = g_modules[i].image;
                g_modules[i] = g_modules[--g_nmodules];
                break;
            }
        }
        if (found == (size_t)-1 && has_image) {
            /* loaded before we subscribed: keep its image now */
            found = store_image(md->pCubin, md->cubinSize, h, md->moduleId, 1);
            if (found == (size_t)-1)
                g_oom = 1;
        }
        if (found != (size_t)-1)
            g_images[found].unloads++;
    }
    pthread_mutex_unlock(&g_lock);
}

/* ---- exported API (ctypes) ---- */

int foundry_cupti_abi(void) { return FOUNDRY_CUPTI_ABI; }

/*
 * State of CUDA in this process, without initialising it:
 * 0 libcuda not loaded; 1 loaded, cuInit not called; 2 initialised, no primary context active;
 * 3 a primary context is active (modules may already be loaded); -1 could not tell.
 */
int foundry_cupti_cuda_state(void) {
    void *h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (!h)
        return 0;
    typedef int (*count_fn)(int *);
    typedef int (*state_fn)(int, unsigned int *, int *);
    count_fn get_count = (count_fn)dlsym(h, "cuDeviceGetCount");
    state_fn get_state = (state_fn)dlsym(h, "cuDevicePrimaryCtxGetState");
    int result = -1;
    int n = 0;
    if (get_count && get_state) {
        int rc = get_count(&n);
        if (rc == 3 /* CUDA_ERROR_NOT_INITIALIZED */)
            result = 1;
        else if (rc == 0) {
            result = 2;
            for (int d = 0; d < n; d++) {
                unsigned int flags = 0;
                int active = 0;
                if (get_state(d, &flags, &active) == 0 && active)
                    result = 3;
            }
        }
    }
    dlclose(h);
    return result;
}

/* Subscribe to module load/unload callbacks. Returns 0, or a CUPTI error code / -1 with a message in err. */
int foundry_cupti_start(const char *libcupti_path, char *err, size_t errlen) {
    if (g_active)
        return 0;
    if (!g_cupti) {
        g_cupti = dlopen(libcupti_path, RTLD_NOW | RTLD_LOCAL);
        if (!g_cupti) {
            set_err(err, errlen, "cannot load libcupti (%s): %s", libcupti_path, dlerror());
            return -1;
        }
    }
    subscribe_fn subscribe = (subscribe_fn)dlsym(g_cupti, "cuptiSubscribe");
    subscribe_v2_fn subscribe_v2 = (subscribe_v2_fn)dlsym(g_cupti, "cuptiSubscribe_v2");
    g_unsubscribe = (unsubscribe_fn)dlsym(g_cupti, "cuptiUnsubscribe");
    g_enable = (enable_callback_fn)dlsym(g_cupti, "cuptiEnableCallback");
    g_result_string = (result_string_fn)dlsym(g_cupti, "cuptiGetResultString");
    if (!subscribe || !g_unsubscribe || !g_enable) {
        set_err(err, errlen, "%s lacks cuptiSubscribe/cuptiUnsubscribe/cuptiEnableCallback", libcupti_path);
        return -1;
    }
    char holder[128] = {0};
    CUptiResult r;
    if (subscribe_v2) {
        CUpti_SubscriberParams p;
        memset(&p, 0, sizeof p);
        p.structSize = sizeof p;
        p.subscriberName = "foundry";
        p.oldSubscriberName = holder;
        p.oldSubscriberSize = sizeof holder;
        r = subscribe_v2(&g_subscriber, on_callback, NULL, &p);
    } else {
        r = subscribe(&g_subscriber, on_callback, NULL);
    }
    if (r != CUPTI_SUCCESS) {
        if (r == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED)
            set_err(err, errlen,
                    "CUPTI is already in use by another tool%s%s%s (a profiler such as torch.profiler, Nsight "
                    "Systems/Compute or cuda-gdb); only one CUPTI subscriber may exist per process",
                    holder[0] ? " (" : "", holder, holder[0] ? ")" : "");
        else
            set_err(err, errlen, "cuptiSubscribe failed: %s (%d)", result_name(r), r);
        return r;
    }
    CUpti_CallbackId ids[2] = {CUPTI_CBID_RESOURCE_MODULE_LOADED, CUPTI_CBID_RESOURCE_MODULE_UNLOAD_STARTING};
    for (int i = 0; i < 2; i++) {
        r = g_enable(1, g_subscriber, CUPTI_CB_DOMAIN_RESOURCE, ids[i]);
        if (r != CUPTI_SUCCESS) {
            set_err(err, errlen, "cuptiEnableCallback(resource, %u) failed: %s (%d)", ids[i], result_name(r), r);
            g_unsubscribe(g_subscriber);
            g_subscriber = NULL;
            return r;
        }
    }
    /* Best effort: without these we only lose the exact CUmodule -> image pairing. */
    g_driver_callbacks = 1;
    for (size_t i = 0; i < sizeof k_load_cbids / sizeof k_load_cbids[0]; i++)
        if (g_enable(1, g_subscriber, CUPTI_CB_DOMAIN_DRIVER_API, k_load_cbids[i]) != CUPTI_SUCCESS)
            g_driver_callbacks = 0;
    /* Best effort too: without these, pointers into module variables are not recognised at SAVE. */
    g_global_callbacks = g_enable(1, g_subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CBID_MODULE_GET_GLOBAL_V2) ==
                             CUPTI_SUCCESS &&
                         g_enable(1, g_subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CBID_LIBRARY_GET_GLOBAL) ==
                             CUPTI_SUCCESS;
    g_active = 1;
    return 0;
}

/* 1 when the cuModuleLoad* driver callbacks (CUmodule pairing) are enabled. */
int foundry_cupti_driver_callbacks(void) { return g_driver_callbacks; }

/* 1 when the get-global driver callbacks (addresses of module variables) are enabled. */
int foundry_cupti_global_callbacks(void) { return g_global_callbacks; }

/* Number of module-variable addresses handed out while recording. */
uint64_t foundry_cupti_global_count(void) {
    pthread_mutex_lock(&g_lock);
    uint64_t n = g_nglobals;
    pthread_mutex_unlock(&g_lock);
    return n;
}

/* Variable i: address, size, the module/library handle asked, whether through cuLibraryGetGlobal, and its name
 * (NUL-terminated, truncated to cap). Returns 0, or -1 if i is out of range. */
int foundry_cupti_global_info(uint64_t i, uint64_t *address, uint64_t *size, uint64_t *handle, int *via_library,
                              char *name, uint64_t cap) {
    int rc = -1;
    pthread_mutex_lock(&g_lock);
    if (i < g_nglobals) {
        global_t *g = &g_globals[i];
        if (address) *address = g->address;
        if (size) *size = g->size;
        if (handle) *handle = g->handle;
        if (via_library) *via_library = g->via_library;
        if (name && cap) {
            strncpy(name, g->name, cap - 1);
            name[cap - 1] = 0;
        }
        rc = 0;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* Unsubscribe (keeps the recorded images). Returns 0 or the CUPTI error. */
int foundry_cupti_stop(char *err, size_t errlen) {
    if (!g_active)
        return 0;
    CUptiResult r = g_unsubscribe(g_subscriber);
    g_active = 0;
    g_subscriber = NULL;
    if (r != CUPTI_SUCCESS) {
        set_err(err, errlen, "cuptiUnsubscribe failed: %s (%d)", result_name(r), r);
        return r;
    }
    return 0;
}

int foundry_cupti_active(void) { return g_active; }

/* Counters: number of distinct images, their total bytes, module load/unload events seen, copy failures. */
void foundry_cupti_stats(uint64_t *count, uint64_t *total_bytes, uint64_t *events, int *oom) {
    pthread_mutex_lock(&g_lock);
    if (count) *count = g_count;
    if (total_bytes) *total_bytes = g_total_bytes;
    if (events) *events = g_events;
    if (oom) *oom = g_oom;
    pthread_mutex_unlock(&g_lock);
}

/* Metadata of image i. Returns 0, or -1 if i is out of range. */
int foundry_cupti_image_info(uint64_t i, uint64_t *size, uint32_t *module_id, uint64_t *order, uint32_t *loads,
                             uint32_t *unloads, int *seen_at_unload) {
    int rc = -1;
    pthread_mutex_lock(&g_lock);
    if (i < g_count) {
        image_t *im = &g_images[i];
        if (size) *size = im->size;
        if (module_id) *module_id = im->module_id;
        if (order) *order = im->order;
        if (loads) *loads = im->loads;
        if (unloads) *unloads = im->unloads;
        if (seen_at_unload) *seen_at_unload = im->seen_at_unload;
        rc = 0;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* Copy image i into dst (capacity cap). Returns bytes copied, or -1 if i is out of range or cap too small. */
int64_t foundry_cupti_image_copy(uint64_t i, void *dst, uint64_t cap) {
    int64_t rc = -1;
    pthread_mutex_lock(&g_lock);
    if (i < g_count && g_images[i].size <= cap) {
        memcpy(dst, g_images[i].data, g_images[i].size);
        rc = (int64_t)g_images[i].size;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* Number of modules currently loaded that we know of (loaded while recording, not yet unloaded). */
uint64_t foundry_cupti_module_count(void) {
    pthread_mutex_lock(&g_lock);
    uint64_t n = g_nmodules;
    pthread_mutex_unlock(&g_lock);
    return n;
}

/* Live module i: its CUPTI id, the image index, and the CUmodule handle (0 if not paired). -1 if out of range. */
int foundry_cupti_module_info(uint64_t i, uint32_t *module_id, uint64_t *image, uint64_t *handle) {
    int rc = -1;
    pthread_mutex_lock(&g_lock);
    if (i < g_nmodules) {
        if (module_id) *module_id = g_modules[i].module_id;
        if (image) *image = g_modules[i].image;
        if (handle) *handle = g_modules[i].handle;
        rc = 0;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* Forget every recorded image. */
void foundry_cupti_clear(void) {
    pthread_mutex_lock(&g_lock);
    for (size_t i = 0; i < g_count; i++)
        free(g_images[i].data);
    free(g_images);
    free(g_modules);
    for (size_t i = 0; i < g_nglobals; i++)
        free(g_globals[i].name);
    free(g_globals);
    g_images = NULL;
    g_modules = NULL;
    g_globals = NULL;
    g_count = g_cap = g_nmodules = g_modules_cap = g_nglobals = g_globals_cap = 0;
    g_total_bytes = 0;
    g_events = 0;
    g_oom = 0;
    pthread_mutex_unlock(&g_lock);
}

/*
 * Test hook: replay the callbacks CUPTI would make for one module load (loaded=1) or unload (loaded=0).
 * With handle != 0 a load is wrapped in a successful cuModuleLoadData call returning that CUmodule.
 */
void foundry_cupti_inject(uint32_t module_id, const void *bytes, uint64_t size, int loaded, uint64_t handle) {
    CUpti_ModuleResourceData md = {module_id, (size_t)size, (const char *)bytes};
    CUpti_ResourceData rd;
    memset(&rd, 0, sizeof rd);
    rd.resourceDescriptor = &md;
    void *module = (void *)(uintptr_t)handle;
    struct { void **module; const void *image; } params = {&module, bytes};
    int result = 0;
    CUpti_CallbackData cd;
    memset(&cd, 0, sizeof cd);
    cd.functionParams = &params;
    cd.functionReturnValue = &result;
    if (loaded && handle) {
        cd.callbackSite = CUPTI_API_ENTER;
        on_callback(NULL, CUPTI_CB_DOMAIN_DRIVER_API, 19, &cd);
    }
    on_callback(NULL, CUPTI_CB_DOMAIN_RESOURCE,
                loaded ? CUPTI_CBID_RESOURCE_MODULE_LOADED : CUPTI_CBID_RESOURCE_MODULE_UNLOAD_STARTING, &rd);
    if (loaded && handle) {
        cd.callbackSite = CUPTI_API_EXIT;
        on_callback(NULL, CUPTI_CB_DOMAIN_DRIVER_API, 19, &cd);
    }
}

/* Test hook: replay the exit callback of a successful cuModuleGetGlobal_v2 (via_library=0) or cuLibraryGetGlobal
 * (via_library=1) that returned (address, size) for `name`. */
void foundry_cupti_inject_global(const char *name, uint64_t address, uint64_t size, uint64_t handle,
                                 int via_library) {
    uint64_t dptr = address;
    size_t bytes = (size_t)size;
    get_global_params params = {&dptr, &bytes, (void *)(uintptr_t)handle, name};
    int result = 0;
    CUpti_CallbackData cd;
    memset(&cd, 0, sizeof cd);
    cd.callbackSite = CUPTI_API_EXIT;
    cd.functionParams = &params;
    cd.functionReturnValue = &result;
    on_callback(NULL, CUPTI_CB_DOMAIN_DRIVER_API, via_library ? CBID_LIBRARY_GET_GLOBAL : CBID_MODULE_GET_GLOBAL_V2,
                &cd);
}
