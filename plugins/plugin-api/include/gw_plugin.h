/*
 * gw_plugin.h - the gateway plugin ABI, version 1, for C plugin authors.
 *
 * This is the same contract as plugins/plugin-api/src/abi.rs (same layout,
 * names and constants; a unit test of plugin-api compiles this header and
 * compares every size and offset with the Rust definitions).
 *
 * Rules:
 * - Only these plain structs, function pointers and borrowed (ptr, len) byte
 *   slices cross the boundary. A slice is valid only for the duration of the
 *   call it is passed to: the receiver copies what it keeps. Nothing allocated
 *   on one side is freed on the other.
 * - No function may unwind (C++ exceptions, Rust panics) across the boundary.
 *
 * Loading sequence (host side):
 * 1. look up the symbol GW_ENTRY_SYMBOL_V1 ("gw_plugin_entry_v1") and call it;
 * 2. check abi_version == GW_ABI_VERSION and struct_size >= sizeof(GwPluginV1)
 *    before reading anything else from the table;
 * 3. create one instance per channel with the channel's plugin config (JSON);
 * 4. poll mode: call poll every update interval on a blocking thread;
 *    push mode: call start once, the plugin emits from its own threads;
 * 5. stop then destroy (also before a restart). Libraries are never unloaded.
 *
 * Threading: the host may call poll, open_key, close_key and command on one
 * instance from different threads at the same time; an instance must be
 * thread-safe. create/start/stop/destroy are never concurrent with anything
 * else on the same instance. After stop returns the plugin must not call any
 * host function with that instance's host table again.
 */
#ifndef GW_PLUGIN_H
#define GW_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Major ABI version. A plugin whose table carries another value is refused. */
#define GW_ABI_VERSION 1u

/* Name of the exported entry symbol. */
#define GW_ENTRY_SYMBOL_V1 "gw_plugin_entry_v1"

/* Status codes. */
#define GW_OK 0          /* success */
#define GW_ERROR 1       /* the plugin returned an error; message written to the error sink */
#define GW_PANIC 2       /* the plugin panicked; the panic was caught at the boundary */
#define GW_UNSUPPORTED 3 /* the plugin does not implement this call */
#define GW_STOPPED 4     /* (from host emit) the instance is being stopped; return */
#define GW_REJECTED 5    /* (from host emit) the message was refused (too large, or a key that is not UTF-8) */

/* Mode bits (GwPluginV1.modes). */
#define GW_MODE_POLL 1u    /* implements poll */
#define GW_MODE_PUSH 2u    /* implements start (push) */
#define GW_MODE_KEYED 4u   /* implements keyed streams (open_key/close_key) */
#define GW_MODE_COMMAND 8u /* implements command */

/* Log levels for GwHostV1.log. */
#define GW_LOG_ERROR 1u
#define GW_LOG_WARN 2u
#define GW_LOG_INFO 3u
#define GW_LOG_DEBUG 4u
#define GW_LOG_TRACE 5u

/* A borrowed byte slice, valid only for the duration of the call it is passed
 * to. ptr may be NULL when len is 0. */
typedef struct GwSlice {
    const uint8_t *ptr; /* first byte */
    size_t len;         /* number of bytes */
} GwSlice;

/* A byte sink owned by the caller: the callee calls write (zero or more times;
 * the receiver appends) and the receiver copies the bytes. */
typedef struct GwSink {
    void *ctx;                                /* opaque receiver state */
    void (*write)(void *ctx, GwSlice bytes);  /* append bytes to the receiver */
} GwSink;

/* Functions the host gives an instance at create. The table and its ctx stay
 * valid until the instance's destroy returns. */
typedef struct GwHostV1 {
    /* Always GW_ABI_VERSION. */
    uint32_t abi_version;
    /* sizeof(GwHostV1) as the host knows it; fields may be added at the end. */
    uint32_t struct_size;
    /* Opaque host state for this instance; pass it back to every function below. */
    void *ctx;
    /* Emit one message (UTF-8 JSON) on stream key (empty: the channel's own
     * stream). Blocks while the channel's queue is full (backpressure).
     * Returns GW_OK, GW_STOPPED (stop emitting and return) or GW_REJECTED. */
    int32_t (*emit)(void *ctx, GwSlice key, GwSlice json);
    /* End the keyed stream key (terminal state): its subscribers receive what
     * was emitted before and are then closed normally. */
    int32_t (*end_stream)(void *ctx, GwSlice key);
    /* Log one UTF-8 line at level (GW_LOG_*); the host adds the plugin's name. */
    void (*log)(void *ctx, uint32_t level, GwSlice msg);
    /* Push mode: the plugin's run loop ended by itself. status is GW_OK
     * (finished), GW_ERROR or GW_PANIC (failed; msg says why). The host
     * restarts failed instances with backoff. */
    void (*exited)(void *ctx, int32_t status, GwSlice msg);
} GwHostV1;

/* The table a plugin's entry symbol returns. It must live as long as the
 * library (a static). Every function entry must be set (the host refuses a
 * table with a NULL one): functions for modes the plugin does not declare
 * return GW_UNSUPPORTED. */
typedef struct GwPluginV1 {
    /* Must equal the host's GW_ABI_VERSION; checked before anything else. */
    uint32_t abi_version;
    /* sizeof(GwPluginV1) as the plugin knows it; must be at least the host's. */
    uint32_t struct_size;
    /* Plugin name (static UTF-8), e.g. "system-metrics". */
    GwSlice name;
    /* Plugin version (static UTF-8), e.g. "0.1.0". */
    GwSlice version;
    /* 1 if panics/exceptions are contained at the boundary, 0 if a panic ends
     * the whole process (Rust panic = "abort"). C plugins: 1. */
    uint32_t panic_unwind;
    /* Bit set of GW_MODE_*. */
    uint32_t modes;
    /* Create an instance from the channel's plugin config (UTF-8 JSON). Returns
     * NULL on failure, after writing the reason to err. */
    void *(*create)(const GwHostV1 *host, GwSlice config, GwSink err);
    /* Poll once: emit zero or more messages through host->emit before
     * returning. key is empty for unkeyed channels, else the stream key of an
     * open key. */
    int32_t (*poll)(void *inst, GwSlice key, GwSink err);
    /* Push mode: start the plugin's own thread(s) and return at once. */
    int32_t (*start)(void *inst, GwSink err);
    /* Keyed streams: a subscriber wants stream key; params is a JSON object
     * (e.g. path parameters {"job_id":"42"}). */
    int32_t (*open_key)(void *inst, GwSlice key, GwSlice params, GwSink err);
    /* Keyed streams: nobody wants key any more. */
    int32_t (*close_key)(void *inst, GwSlice key);
    /* Command: JSON request in; on GW_OK the JSON reply was written to reply,
     * on GW_ERROR an error message was. */
    int32_t (*command)(void *inst, GwSlice request, GwSink reply);
    /* Stop: ask the plugin's threads to finish and wait for them. After this
     * returns the plugin calls no host function for this instance. */
    void (*stop)(void *inst);
    /* Free the instance. No call on inst follows. */
    void (*destroy)(void *inst);
} GwPluginV1;

/* Signature of the entry symbol. */
typedef const GwPluginV1 *(*GwEntryV1)(void);

/* The entry symbol every plugin exports. */
const GwPluginV1 *gw_plugin_entry_v1(void);

/* Layout checks (any pointer size): both structs start with two uint32_t, then
 * pointer-aligned fields. */
#if defined(__cplusplus) && __cplusplus >= 201103L
#define GW_STATIC_ASSERT(c, m) static_assert(c, m)
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define GW_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif
#ifdef GW_STATIC_ASSERT
GW_STATIC_ASSERT(sizeof(GwSlice) == 2 * sizeof(void *), "GwSlice layout");
GW_STATIC_ASSERT(sizeof(GwSink) == 2 * sizeof(void *), "GwSink layout");
GW_STATIC_ASSERT(offsetof(GwHostV1, ctx) == 8, "GwHostV1 layout");
GW_STATIC_ASSERT(sizeof(GwHostV1) == 8 + 5 * sizeof(void *), "GwHostV1 layout");
GW_STATIC_ASSERT(offsetof(GwPluginV1, name) == 8, "GwPluginV1 layout");
GW_STATIC_ASSERT(offsetof(GwPluginV1, panic_unwind) == 8 + 4 * sizeof(void *),
                 "GwPluginV1 layout");
GW_STATIC_ASSERT(offsetof(GwPluginV1, create) == 16 + 4 * sizeof(void *), "GwPluginV1 layout");
GW_STATIC_ASSERT(sizeof(GwPluginV1) == 16 + 12 * sizeof(void *), "GwPluginV1 layout");
#undef GW_STATIC_ASSERT
#endif

#ifdef __cplusplus
}
#endif

#endif /* GW_PLUGIN_H */
