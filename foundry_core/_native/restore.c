/* The restore hot loop: rebuild one CUDA graph node for node from the archive's packed records, then
 * instantiate and upload it. One call per graph; everything per node happens here, not in Python.
 * Record layouts mirror foundry_core/schema.py (NODE_DTYPE, ATTR_DTYPE, EDGE_DTYPE, MEMSET_DTYPE).
 */
#include "driver.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t payload_off;
    uint32_t kind, ref;
    uint32_t grid[3], block[3];
    uint32_t smem, payload_len, attr_off, attr_cnt;
    uint32_t pad[2];
} NodeRec;
_Static_assert(sizeof(NodeRec) == 64, "NodeRec must match schema.NODE_DTYPE");

typedef struct {
    uint32_t id, pad;
    uint8_t value[64];
} AttrRec;
_Static_assert(sizeof(AttrRec) == 72, "AttrRec must match schema.ATTR_DTYPE");
_Static_assert(sizeof(CUlaunchAttributeValue) == 64, "CUlaunchAttributeValue changed size");

typedef struct {
    uint32_t src, dst;
    uint8_t from_port, to_port, type, pad[5];
} EdgeRec;
_Static_assert(sizeof(EdgeRec) == 16, "EdgeRec must match schema.EDGE_DTYPE");

typedef struct {
    uint64_t dst, pitch;
    uint32_t value, element_size;
    uint64_t width, height;
} MemsetRec;
_Static_assert(sizeof(MemsetRec) == 40, "MemsetRec must match schema.MEMSET_DTYPE");

enum { K_KERNEL = 0, K_MEMSET = 1, K_MEMCPY = 2, K_EMPTY = 3, K_EVENT_RECORD = 4, K_EVENT_WAIT = 5, K_CHILD = 6, K_SLOT = 7 };

size_t foundry_sizeof_memcpy3d(void) { return sizeof(CUDA_MEMCPY3D); }

#define BAIL(...)                                   \
    do {                                            \
        snprintf(err, errlen, __VA_ARGS__);         \
        goto fail;                                  \
    } while (0)

/* Sizes of the tables that node records index into. */
typedef struct {
    uint64_t payload_size; /* bytes */
    uint32_t n_attrs, n_funcs, n_events, n_children;
} TableSizes;

/* Every record's offsets and indices against the table sizes, before anything is read through them. The Python
 * side (foundry_core/validate.py) checks the same and more (addresses against the arena); this is the last line
 * for callers that skip it. 0 if all is in bounds; otherwise -1 and a one-line reason naming the record. */
int foundry_check_graph(const NodeRec *nodes, uint32_t n_nodes, const uint8_t *payload, const AttrRec *attrs,
                        const EdgeRec *edges, uint32_t n_edges, const CUfunction *funcs, const CUevent *events,
                        const CUgraph *children, const TableSizes *t, char *err, size_t errlen) {
#define REFUSE(...) return snprintf(err, errlen, __VA_ARGS__), -1
    if (!t) REFUSE("no table sizes given");
    if ((n_nodes && !nodes) || (n_edges && !edges) || (t->payload_size && !payload) || (t->n_attrs && !attrs) ||
        (t->n_funcs && !funcs) || (t->n_events && !events) || (t->n_children && !children))
        REFUSE("a non-empty table is missing");
    for (uint32_t i = 0; i < n_nodes; i++) {
        const NodeRec *n = &nodes[i];
        if (n->payload_off > t->payload_size || n->payload_len > t->payload_size - n->payload_off)
            REFUSE("node %u: payload %llu+%u lies outside the %llu-byte payload table", i,
                   (unsigned long long)n->payload_off, n->payload_len, (unsigned long long)t->payload_size);
        switch (n->kind) {
        case K_KERNEL:
            if (n->ref >= t->n_funcs) REFUSE("node %u: kernel %u of %u", i, n->ref, t->n_funcs);
            if (n->attr_off > t->n_attrs || n->attr_cnt > t->n_attrs - n->attr_off)
                REFUSE("node %u: launch attributes %u+%u of %u", i, n->attr_off, n->attr_cnt, t->n_attrs);
            break;
        case K_MEMSET:
            if (n->payload_len != sizeof(MemsetRec) || n->payload_off % 8)
                REFUSE("node %u: memset payload of %u bytes at %llu", i, n->payload_len,
                       (unsigned long long)n->payload_off);
            break;
        case K_MEMCPY: {
            if (n->payload_len != sizeof(CUDA_MEMCPY3D) || n->payload_off % 8)
                REFUSE("node %u: memcpy payload of %u bytes at %llu", i, n->payload_len,
                       (unsigned long long)n->payload_off);
            const CUDA_MEMCPY3D *c = (const CUDA_MEMCPY3D *)(payload + n->payload_off);
            if (c->srcMemoryType != CU_MEMORYTYPE_DEVICE || c->dstMemoryType != CU_MEMORYTYPE_DEVICE)
                REFUSE("node %u: memcpy is not device-to-device", i);
            break;
        }
        case K_EVENT_RECORD:
        case K_EVENT_WAIT:
            if (n->ref >= t->n_events) REFUSE("node %u: event %u of %u", i, n->ref, t->n_events);
            break;
        case K_CHILD:
            if (n->ref >= t->n_children) REFUSE("node %u: child graph %u of %u", i, n->ref, t->n_children);
            break;
        default: /* kinds without table references; the builder refuses kinds it does not know */
            break;
        }
    }
    for (uint32_t e = 0; e < n_edges; e++)
        if (edges[e].src >= n_nodes || edges[e].dst >= n_nodes)
            REFUSE("edge %u (%u -> %u) out of range of %u nodes", e, edges[e].src, edges[e].dst, n_nodes);
    return 0;
#undef REFUSE
}

/* How many of g's edges carry edge data (ports/types other than the default); -1 if the driver cannot say or
 * the graph has not exactly n_edges edges. */
static long count_edges_with_data(CUgraph g, uint32_t n_edges) {
    size_t n = n_edges;
    long with_data = -1;
    CUgraphNode *from = malloc(sizeof(CUgraphNode) * (n_edges ? n_edges : 1));
    CUgraphNode *to = malloc(sizeof(CUgraphNode) * (n_edges ? n_edges : 1));
    CUgraphEdgeData *data = calloc(n_edges ? n_edges : 1, sizeof(CUgraphEdgeData));
    if (from && to && data && p_cuGraphGetEdges(g, from, to, data, &n) == CUDA_SUCCESS && n == n_edges) {
        with_data = 0;
        for (size_t e = 0; e < n; e++) with_data += data[e].from_port || data[e].to_port || data[e].type;
    }
    free(from), free(to), free(data);
    return with_data;
}

/* Build a graph. funcs/events/children are tables indexed by NodeRec.ref, of the sizes in `t` (checked first by
 * foundry_check_graph). A slot node becomes two unconnected empty nodes, one taking its incoming and one its
 * outgoing edges (plain edges: the placeholder's edge data does not apply to what fills it); their handles go to
 * slot_nodes (2 per slot, node order, n_slots slots). On failure returns -1, destroys the partial graph and writes a one-line reason naming the node into err. */
int foundry_build_graph(const NodeRec *nodes, uint32_t n_nodes, const uint8_t *payload, const AttrRec *attrs,
                        const EdgeRec *edges, uint32_t n_edges, const CUfunction *funcs, const CUevent *events,
                        const CUgraph *children, CUgraph *out, char *err, size_t errlen, CUgraphNode *slot_nodes,
                        uint32_t n_slots, const TableSizes *t) {
    CUgraph g = NULL;
    CUgraphNode *handles = NULL, *outs = NULL, *from = NULL, *to = NULL;
    uint32_t slot = 0;
    CUgraphEdgeData *data = NULL;
    CUcontext ctx = NULL;
    CUresult r;
    *out = NULL;
    if (foundry_check_graph(nodes, n_nodes, payload, attrs, edges, n_edges, funcs, events, children, t, err, errlen))
        return -1;
    if (foundry_driver_load(err, errlen)) return -1;
    if ((r = p_cuCtxGetCurrent(&ctx)) != CUDA_SUCCESS || !ctx) BAIL("no current CUDA context");
    if ((r = p_cuGraphCreate(&g, 0)) != CUDA_SUCCESS) BAIL("cuGraphCreate: %s", foundry_cu_error_name(r));
    handles = malloc(sizeof(CUgraphNode) * (n_nodes ? n_nodes : 1));
    outs = malloc(sizeof(CUgraphNode) * (n_nodes ? n_nodes : 1));
    if (!handles || !outs) BAIL("out of host memory");

    for (uint32_t i = 0; i < n_nodes; i++) {
        const NodeRec *n = &nodes[i];
        const uint8_t *pl = payload + n->payload_off;
        switch (n->kind) {
        case K_KERNEL: {
            size_t argsize = n->payload_len;
            void *extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, (void *)pl, CU_LAUNCH_PARAM_BUFFER_SIZE, &argsize,
                             CU_LAUNCH_PARAM_END};
            CUDA_KERNEL_NODE_PARAMS p;
            memset(&p, 0, sizeof p);
            p.func = funcs[n->ref];
            p.gridDimX = n->grid[0], p.gridDimY = n->grid[1], p.gridDimZ = n->grid[2];
            p.blockDimX = n->block[0], p.blockDimY = n->block[1], p.blockDimZ = n->block[2];
            p.sharedMemBytes = n->smem;
            p.extra = argsize ? extra : NULL;
            if ((r = p_cuGraphAddKernelNode(&handles[i], g, NULL, 0, &p)) != CUDA_SUCCESS)
                BAIL("node %u (kernel #%u): cuGraphAddKernelNode: %s", i, n->ref, foundry_cu_error_name(r));
            for (uint32_t a = 0; a < n->attr_cnt; a++) {
                const AttrRec *at = &attrs[n->attr_off + a];
                r = p_cuGraphKernelNodeSetAttribute(handles[i], (CUkernelNodeAttrID)at->id,
                                                    (const CUkernelNodeAttrValue *)at->value);
                if (r != CUDA_SUCCESS)
                    BAIL("node %u: launch attribute %u: %s", i, at->id, foundry_cu_error_name(r));
            }
            break;
        }
        case K_MEMSET: {
            const MemsetRec *m = (const MemsetRec *)pl;
            CUDA_MEMSET_NODE_PARAMS p;
            memset(&p, 0, sizeof p);
            p.dst = m->dst, p.pitch = m->pitch, p.value = m->value, p.elementSize = m->element_size;
            p.width = m->width, p.height = m->height;
            if ((r = p_cuGraphAddMemsetNode(&handles[i], g, NULL, 0, &p, ctx)) != CUDA_SUCCESS)
                BAIL("node %u (memset): %s", i, foundry_cu_error_name(r));
            break;
        }
        case K_MEMCPY:
            if (n->payload_len != sizeof(CUDA_MEMCPY3D)) BAIL("node %u (memcpy): bad payload size", i);
            if ((r = p_cuGraphAddMemcpyNode(&handles[i], g, NULL, 0, (const CUDA_MEMCPY3D *)pl, ctx)))
                BAIL("node %u (memcpy): %s", i, foundry_cu_error_name(r));
            break;
        case K_EMPTY:
            if ((r = p_cuGraphAddEmptyNode(&handles[i], g, NULL, 0))) BAIL("node %u (empty): %s", i, foundry_cu_error_name(r));
            break;
        case K_EVENT_RECORD:
            if ((r = p_cuGraphAddEventRecordNode(&handles[i], g, NULL, 0, events[n->ref])))
                BAIL("node %u (event record): %s", i, foundry_cu_error_name(r));
            break;
        case K_EVENT_WAIT:
            if ((r = p_cuGraphAddEventWaitNode(&handles[i], g, NULL, 0, events[n->ref])))
                BAIL("node %u (event wait): %s", i, foundry_cu_error_name(r));
            break;
        case K_CHILD:
            if ((r = p_cuGraphAddChildGraphNode(&handles[i], g, NULL, 0, children[n->ref])))
                BAIL("node %u (child graph): %s", i, foundry_cu_error_name(r));
            break;
        case K_SLOT:
            if (slot >= n_slots || !slot_nodes) BAIL("node %u: more slot nodes than the slot table holds", i);
            if ((r = p_cuGraphAddEmptyNode(&handles[i], g, NULL, 0)) ||
                (r = p_cuGraphAddEmptyNode(&outs[i], g, NULL, 0)))
                BAIL("node %u (slot): %s", i, foundry_cu_error_name(r));
            slot_nodes[2 * slot] = handles[i], slot_nodes[2 * slot + 1] = outs[i];
            slot++;
            break;
        default:
            BAIL("node %u: unknown node kind %u in archive", i, n->kind);
        }
        if (n->kind != K_SLOT) outs[i] = handles[i];
    }
    if (slot != n_slots) BAIL("graph has %u slot nodes, the slot table %u", slot, n_slots);

    if (n_edges) {
        /* Plain edges go in one call without edge data; each edge WITH data (programmatic/PDL ports) in a call of
         * its own: given one array of mixed edge data, the driver (580, CUDA 13) gave every edge of the call the
         * data of the first one, so a PDL edge first in the batch made all edges programmatic — kernels then
         * started before their inputs were written (tests/gpu/probe_pdl_gemm.py). */
        uint32_t n_plain = 0;
        from = malloc(sizeof(CUgraphNode) * n_edges);
        to = malloc(sizeof(CUgraphNode) * n_edges);
        data = calloc(1, sizeof(CUgraphEdgeData));
        if (!from || !to || !data) BAIL("out of host memory");
        for (uint32_t e = 0; e < n_edges; e++) {
            if (edges[e].src >= n_nodes || edges[e].dst >= n_nodes) BAIL("edge %u out of range", e);
            int slot_edge = nodes[edges[e].src].kind == K_SLOT || nodes[edges[e].dst].kind == K_SLOT;
            if (slot_edge || (!edges[e].from_port && !edges[e].to_port && !edges[e].type)) {
                from[n_plain] = outs[edges[e].src];
                to[n_plain] = handles[edges[e].dst];
                n_plain++;
                continue;
            }
            memset(data, 0, sizeof *data);
            data->from_port = edges[e].from_port;
            data->to_port = edges[e].to_port;
            data->type = edges[e].type;
            r = p_cuGraphAddDependencies(g, &outs[edges[e].src], &handles[edges[e].dst], data, 1);
            if (r != CUDA_SUCCESS)
                BAIL("edge %u (%u -> %u, port %u -> %u, type %u): cuGraphAddDependencies: %s", e, edges[e].src,
                     edges[e].dst, edges[e].from_port, edges[e].to_port, edges[e].type, foundry_cu_error_name(r));
        }
        if (n_plain && (r = p_cuGraphAddDependencies(g, from, to, NULL, n_plain)) != CUDA_SUCCESS)
            BAIL("cuGraphAddDependencies (%u edges): %s", n_plain, foundry_cu_error_name(r));
        if (n_plain < n_edges && count_edges_with_data(g, n_edges) != n_edges - n_plain)
            BAIL("the driver reports other edge data than was added (%u edges with data): refusing a graph whose "
                 "kernels could start before their inputs are written", n_edges - n_plain);
    }
    free(handles), free(outs), free(from), free(to), free(data);
    *out = g;
    return 0;
fail:
    free(handles), free(outs), free(from), free(to), free(data);
    if (g) p_cuGraphDestroy(g);
    return -1;
}

/* Instantiate and upload on `stream` (0 = legacy default stream is avoided by callers). */
int foundry_instantiate(CUgraph g, CUstream stream, CUgraphExec *out, char *err, size_t errlen) {
    CUresult r;
    *out = NULL;
    if (foundry_driver_load(err, errlen)) return -1;
    if ((r = p_cuGraphInstantiate(out, g, 0)) != CUDA_SUCCESS) {
        snprintf(err, errlen, "cuGraphInstantiate: %s", foundry_cu_error_name(r));
        return -1;
    }
    if (stream && (r = p_cuGraphUpload(*out, stream)) != CUDA_SUCCESS) {
        snprintf(err, errlen, "cuGraphUpload: %s", foundry_cu_error_name(r));
        p_cuGraphExecDestroy(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

/* A graph's edges with their data (cuGraphGetEdges_v2). With from == NULL only *n is set. Read here, not through
 * cuda-python: its cuGraphGetEdges builds the edge-data objects over a buffer it frees before returning
 * (NVIDIA/cuda-python#1804), so ports and types read back there can be garbage. */
int foundry_graph_edges(CUgraph g, CUgraphNode *from, CUgraphNode *to, CUgraphEdgeData *data, size_t *n) {
    char err[64];
    if (foundry_driver_load(err, sizeof err)) return (int)CUDA_ERROR_NOT_INITIALIZED;
    return (int)p_cuGraphGetEdges(g, from, to, from ? data : NULL, n);
}

int foundry_launch(CUgraphExec exec, CUstream stream) { return (int)p_cuGraphLaunch(exec, stream); }
int foundry_exec_destroy(CUgraphExec exec) { return (int)p_cuGraphExecDestroy(exec); }
int foundry_graph_destroy(CUgraph g) { return (int)p_cuGraphDestroy(g); }

/* Replace `node` of graph `g` by two unconnected empty nodes: in_out[0] takes its incoming edges, in_out[1] its
 * outgoing edges; `node` is destroyed. Edge data on those edges is dropped (plain edges): whatever is filled in
 * between starts after the predecessors have finished. SAVE uses it to turn a captured slot placeholder into the
 * pair `foundry_core.slots.fill_slots` captures real work between, as the native builder does at LOAD. */
int foundry_split_node(CUgraph g, CUgraphNode node, CUgraphNode *in_out, char *err, size_t errlen) {
    CUresult r;
    size_t n_in = 0, n_out = 0;
    CUgraphNode *deps = NULL, *outs = NULL;
    CUgraphEdgeData *data = NULL;
    in_out[0] = in_out[1] = NULL;
    if (foundry_driver_load(err, errlen)) return -1;
    if ((r = p_cuGraphNodeGetDependencies(node, NULL, NULL, &n_in)) != CUDA_SUCCESS ||
        (r = p_cuGraphNodeGetDependentNodes(node, NULL, NULL, &n_out)) != CUDA_SUCCESS)
        BAIL("counting the edges of a slot placeholder: %s", foundry_cu_error_name(r));
    deps = calloc(n_in + 1, sizeof *deps);
    outs = calloc(n_out + 1, sizeof *outs);
    data = calloc((n_in > n_out ? n_in : n_out) + 1, sizeof *data);
    if (!deps || !outs || !data) BAIL("out of host memory");
    /* edge data is asked for too: without it the driver refuses a node whose edges carry data (LOSSY_QUERY) */
    if ((r = p_cuGraphNodeGetDependencies(node, deps, data, &n_in)) != CUDA_SUCCESS ||
        (r = p_cuGraphNodeGetDependentNodes(node, outs, data, &n_out)) != CUDA_SUCCESS)
        BAIL("reading the edges of a slot placeholder: %s", foundry_cu_error_name(r));
    if ((r = p_cuGraphAddEmptyNode(&in_out[0], g, deps, n_in)) != CUDA_SUCCESS ||
        (r = p_cuGraphAddEmptyNode(&in_out[1], g, NULL, 0)) != CUDA_SUCCESS)
        BAIL("adding the empty nodes of a slot: %s", foundry_cu_error_name(r));
    for (size_t i = 0; i < n_out; i++)
        if ((r = p_cuGraphAddDependencies(g, &in_out[1], &outs[i], NULL, 1)) != CUDA_SUCCESS)
            BAIL("reconnecting a slot's successors: %s", foundry_cu_error_name(r));
    if ((r = p_cuGraphDestroyNode(node)) != CUDA_SUCCESS)
        BAIL("removing a slot placeholder: %s", foundry_cu_error_name(r));
    free(deps), free(outs), free(data);
    return 0;
fail:
    free(deps), free(outs), free(data);
    return -1;
}
