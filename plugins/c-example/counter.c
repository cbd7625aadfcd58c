/*
 * c-counter: a poll plugin written in C against gw_plugin.h (ABI v1).
 *
 * Each poll emits {"n": <count>, "source": "c"} on the channel's own stream,
 * counting from 1; a restarted instance counts from 1 again. It takes no
 * config: anything but an empty JSON object is refused at create.
 *
 * Build (tests/source_plugins.rs does exactly this):
 *   cc -std=c11 -Wall -Wextra -shared -fPIC -I plugins/plugin-api/include \
 *      -o libc_counter.so plugins/c-example/counter.c
 * The gateway finds it as plugin "c-counter" in any of `plugins.dirs`.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gw_plugin.h"

/* A slice over a string literal (usable in static initializers). */
#define LIT(s) { (const uint8_t *)(s), sizeof(s) - 1 }

/* A slice over a NUL-terminated string, borrowed for one call. */
static GwSlice str(const char *s) {
    GwSlice v = { (const uint8_t *)s, strlen(s) };
    return v;
}

typedef struct {
    const GwHostV1 *host;  /* valid until destroy returns */
    atomic_uint_fast64_t n; /* last emitted count; polls may run on any thread */
} Counter;

/* The config is `{}` (the gateway's default) or empty; allow whitespace. */
static int config_is_empty(GwSlice config) {
    int braces = 0;
    for (size_t i = 0; i < config.len; i++) {
        uint8_t c = config.ptr[i];
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n') continue;
        if ((c == '{' && braces == 0) || (c == '}' && braces == 1)) { braces++; continue; }
        return 0;
    }
    return braces == 0 || braces == 2;
}

static void *counter_create(const GwHostV1 *host, GwSlice config, GwSink err) {
    /* The host table may be newer (larger), never older. */
    if (host->abi_version != GW_ABI_VERSION || host->struct_size < sizeof(GwHostV1)) {
        err.write(err.ctx, str("c-counter: unsupported host table"));
        return NULL;
    }
    if (!config_is_empty(config)) {
        err.write(err.ctx, str("c-counter: takes no config, expected {}"));
        return NULL;
    }
    Counter *c = malloc(sizeof *c);
    if (c == NULL) {
        err.write(err.ctx, str("c-counter: out of memory"));
        return NULL;
    }
    c->host = host;
    atomic_init(&c->n, 0);
    host->log(host->ctx, GW_LOG_INFO, str("c-counter: created"));
    return c;
}

static int32_t counter_poll(void *inst, GwSlice key, GwSink err) {
    Counter *c = inst;
    char json[64];
    unsigned long long n = (unsigned long long)atomic_fetch_add(&c->n, 1) + 1;
    int len = snprintf(json, sizeof json, "{\"n\":%llu,\"source\":\"c\"}", n);
    GwSlice msg = { (const uint8_t *)json, (size_t)len };
    /* emit copies the bytes before it returns, so a stack buffer is fine. */
    int32_t s = c->host->emit(c->host->ctx, key, msg);
    if (s == GW_OK || s == GW_STOPPED) return GW_OK;
    err.write(err.ctx, str("c-counter: the host refused a message"));
    return GW_ERROR;
}

/* Every table entry must be non-null: calls the plugin doesn't support
 * answer GW_UNSUPPORTED (the host never makes them for undeclared modes). */
static int32_t counter_start(void *inst, GwSink err) {
    (void)inst;
    err.write(err.ctx, str("c-counter: no push mode"));
    return GW_UNSUPPORTED;
}

static int32_t counter_open_key(void *inst, GwSlice key, GwSlice params, GwSink err) {
    (void)inst; (void)key; (void)params;
    err.write(err.ctx, str("c-counter: no keyed streams"));
    return GW_UNSUPPORTED;
}

static int32_t counter_close_key(void *inst, GwSlice key) {
    (void)inst; (void)key;
    return GW_UNSUPPORTED;
}

static int32_t counter_command(void *inst, GwSlice request, GwSink reply) {
    (void)inst; (void)request;
    reply.write(reply.ctx, str("c-counter: no commands"));
    return GW_UNSUPPORTED;
}

/* No threads of its own, so nothing to stop. */
static void counter_stop(void *inst) { (void)inst; }

static void counter_destroy(void *inst) { free(inst); }

static const GwPluginV1 TABLE = {
    .abi_version = GW_ABI_VERSION,
    .struct_size = sizeof(GwPluginV1),
    .name = LIT("c-counter"),
    .version = LIT("0.1.0"),
    .panic_unwind = 1, /* nothing unwinds out of C */
    .modes = GW_MODE_POLL,
    .create = counter_create,
    .poll = counter_poll,
    .start = counter_start,
    .open_key = counter_open_key,
    .close_key = counter_close_key,
    .command = counter_command,
    .stop = counter_stop,
    .destroy = counter_destroy,
};

/* The one exported symbol. Visibility "default" keeps it exported even when
 * built with -fvisibility=hidden. */
__attribute__((visibility("default"))) const GwPluginV1 *gw_plugin_entry_v1(void) {
    return &TABLE;
}
