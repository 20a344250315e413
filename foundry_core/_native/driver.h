/* CUDA driver entry points, resolved at run time from libcuda.so.1 so that the helper library has no
 * link-time dependency on the driver (it builds on machines without one). */
#pragma once
#include <cuda.h>

#define FOUNDRY_DRIVER_FUNCS(X)                                                                            \
    X(cuInit) X(cuDeviceGet) X(cuDevicePrimaryCtxRetain) X(cuCtxSetCurrent) X(cuCtxGetCurrent)            \
    X(cuMemAddressReserve) X(cuMemAddressFree) X(cuMemCreate) X(cuMemRelease) X(cuMemMap) X(cuMemUnmap)   \
    X(cuMemSetAccess) X(cuMemGetAllocationGranularity) X(cuGetErrorName)                                  \
    X(cuGraphCreate) X(cuGraphDestroy) X(cuGraphAddKernelNode) X(cuGraphKernelNodeSetAttribute)          \
    X(cuGraphAddMemsetNode) X(cuGraphAddMemcpyNode) X(cuGraphAddEmptyNode) X(cuGraphAddEventRecordNode)   \
    X(cuGraphAddEventWaitNode) X(cuGraphAddChildGraphNode) X(cuGraphAddDependencies) X(cuGraphGetEdges)   \
    X(cuGraphInstantiate) X(cuGraphUpload) X(cuGraphLaunch) X(cuGraphExecDestroy)                     \
    X(cuGraphNodeGetDependencies) X(cuGraphNodeGetDependentNodes) X(cuGraphDestroyNode)                     \
    X(cuModuleLoadData) X(cuModuleUnload) X(cuModuleGetFunction) X(cuFuncSetAttribute)

#define FOUNDRY_STR(x) #x
#define FOUNDRY_XSTR(x) FOUNDRY_STR(x)
#define FOUNDRY_DECLARE(fn) extern __typeof__(fn) *p_##fn;
FOUNDRY_DRIVER_FUNCS(FOUNDRY_DECLARE)

/* 0 on success; otherwise writes a reason into err. Thread-safe, idempotent. */
int foundry_driver_load(char *err, size_t errlen);
const char *foundry_cu_error_name(CUresult r);
