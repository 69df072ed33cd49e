/*
 * berth backend plugin ABI, version 1.0.
 *
 * A berth backend plugin is a shared library exporting
 *
 *     const BerthPlugin *berth_backend_v1(void);
 *
 * which returns a pointer to a static table. This header is the C view of
 * the Rust definitions in berth-backend-api (src/plugin.rs); a test compiles
 * it and compares every size and offset with them, so the two cannot drift.
 * Rust authors do not need it: `berth_backend_api::export_backend!(MyBackend)`
 * generates the entry point. See docs/writing-a-backend.md.
 *
 * Rules:
 *  - Every struct starts with its own size; fields are only ever appended.
 *    Check abi_major (must be equal) before trusting anything else; read a
 *    field added in a later minor version only if `size` covers it.
 *  - Inputs (BerthBytes) are owned by the caller and valid during the call.
 *    Outputs go through the host's callbacks, which copy them: nothing is
 *    freed by the side that did not allocate it.
 *  - Operations return a BerthStatus. JSON documents are described in
 *    docs/writing-a-backend.md.
 *  - Never let an exception or a panic cross the boundary.
 */
#ifndef BERTH_BACKEND_H
#define BERTH_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#define BERTH_ABI_MAJOR 1
#define BERTH_ABI_MINOR 0
#define BERTH_ENTRY_SYMBOL "berth_backend_v1"

typedef enum BerthStatus {
    BERTH_OK = 0,
    BERTH_SCRIPT_EXITED = 1, /* exit code given with set_exit_code */
    BERTH_REFUSED = 2,       /* job-caused; message given with set_message */
    BERTH_SYSTEM_FAILURE = 3,
    BERTH_CANCELLED = 4,
    BERTH_UNSUPPORTED = 5
} BerthStatus;

#define BERTH_LOG_ERROR 1
#define BERTH_LOG_WARN 2
#define BERTH_LOG_INFO 3
#define BERTH_LOG_DEBUG 4

typedef struct BerthBytes {
    const uint8_t *ptr;
    size_t len;
} BerthBytes;

typedef struct BerthHost {
    uint32_t size;
    uint16_t abi_major;
    uint16_t abi_minor;
    void *ctx;
    int32_t cancel_fd; /* readable once the runner asks to stop; -1: not cancellable; do not close */
    void (*log)(void *ctx, int32_t level, BerthBytes message);
    void (*set_output)(void *ctx, BerthBytes bytes);
    void (*set_message)(void *ctx, BerthBytes bytes);
    void (*set_exit_code)(void *ctx, int32_t code);
    int32_t (*is_cancelled)(void *ctx);
} BerthHost;

typedef struct BerthPlugin {
    uint32_t size;
    uint16_t abi_major;
    uint16_t abi_minor;
    int32_t (*create)(const BerthHost *host, BerthBytes settings, BerthBytes runner, void **instance);
    void (*destroy)(void *instance);
    int32_t (*describe)(void *instance, const BerthHost *host);
    int32_t (*config)(void *instance, const BerthHost *host, BerthBytes job);
    int32_t (*prepare)(void *instance, const BerthHost *host, BerthBytes job, BerthBytes state);
    int32_t (*run)(void *instance, const BerthHost *host, BerthBytes job, BerthBytes state, BerthBytes script,
                   BerthBytes stage);
    int32_t (*cleanup)(void *instance, const BerthHost *host, BerthBytes state);
    int32_t (*reap_orphans)(void *instance, const BerthHost *host, BerthBytes known);
} BerthPlugin;

const BerthPlugin *berth_backend_v1(void);

#endif /* BERTH_BACKEND_H */
