/*
 * berth backend plugin ABI, version 1.1.
 *
 * A berth backend plugin is a shared library exporting
 *
 *     const BerthPlugin *berth_backend_v1(void);
 *
 * which returns a pointer to a static table. This header is the C view of
 * the Rust definitions in berth-backend-api (src/plugin.rs); a test compiles
 * it and compares every size and offset with them, so the two cannot drift.
 * Rust authors do not need it: `berth_backend_api::export_backend!(MyBackend)`
 * generates the entry point. C authors: docs/writing-a-backend-in-c.md walks
 * through every function, and backends/example-c/ is a complete plugin.
 *
 * Rules:
 *  - Every struct starts with its own size; fields are only ever appended.
 *    Check abi_major (must be equal) before trusting anything else; read a
 *    field added in a later minor version only if `size` covers it.
 *  - Inputs (BerthBytes) are owned by the caller and valid during the call;
 *    they are not NUL-terminated. Outputs go through the host's callbacks,
 *    which copy them before returning: nothing is freed by the side that did
 *    not allocate it.
 *  - Every operation returns a BerthStatus. Documents are UTF-8 JSON, each
 *    specified by a JSON Schema in backend-api/schema/:
 *      create       settings: settings.schema.json, runner: runner.schema.json
 *      describe     output: description.schema.json
 *      config       job: job.schema.json; output: config.schema.json
 *      prepare/run  job: job.schema.json, state: state.schema.json
 *      cleanup      state: state.schema.json
 *      reap_orphans known: known.schema.json; output: reap-output.schema.json
 *    Ignore members you do not know: a later 1.x host may append some.
 *  - Every call may be a new process (gitlab-runner starts one per hook):
 *    keep what later calls need in the state's `dir`, not in memory.
 *  - stdout and stderr of prepare and run are the user's job log; runner-side
 *    diagnostics go through `log`.
 *  - Never let an exception or a panic cross the boundary.
 *
 * ABI 1.1 adds the job document's `context` (the trusted job key and id,
 * job_info, image, timeout, the variables with their masked/file/raw flags,
 * what to redact, the runner's builds_dir/cache_dir, tmpdir and exit-code
 * file); a 1.1 host sends it to 1.0 plugins too, which ignore it. No struct
 * changed.
 */
#ifndef BERTH_BACKEND_H
#define BERTH_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#define BERTH_ABI_MAJOR 1
#define BERTH_ABI_MINOR 1
#define BERTH_ENTRY_SYMBOL "berth_backend_v1"

/* What an operation returns. */
typedef enum BerthStatus {
    BERTH_OK = 0,
    BERTH_SCRIPT_EXITED = 1,  /* run: the script exited non-zero; code given with set_exit_code */
    BERTH_REFUSED = 2,        /* the job asked for something not allowed; message given with set_message */
    BERTH_SYSTEM_FAILURE = 3, /* the environment failed (the runner retries prepare); message with set_message */
    BERTH_CANCELLED = 4,      /* stopped because the runner asked to (cancel_fd became readable) */
    BERTH_UNSUPPORTED = 5     /* this plugin does not do this operation (e.g. reap_orphans) */
} BerthStatus;

/* Levels of BerthHost.log. */
#define BERTH_LOG_ERROR 1
#define BERTH_LOG_WARN 2
#define BERTH_LOG_INFO 3
#define BERTH_LOG_DEBUG 4

/* Borrowed bytes, not NUL-terminated; ptr may be NULL when len is 0. */
typedef struct BerthBytes {
    const uint8_t *ptr;
    size_t len;
} BerthBytes;

/* What the host offers during one call. Valid only during that call: keep
 * neither the pointer, nor ctx, nor cancel_fd after returning. */
typedef struct BerthHost {
    uint32_t size; /* sizeof(BerthHost) as the host knows it */
    uint16_t abi_major;
    uint16_t abi_minor;
    void *ctx;         /* pass it back to every callback */
    int32_t cancel_fd; /* readable once the runner asks to stop; -1: not cancellable; do not close */
    /* A runner-side diagnostic line (not the job log), copied by the host. */
    void (*log)(void *ctx, int32_t level, BerthBytes message);
    /* The operation's output document (JSON), copied; the last call counts. */
    void (*set_output)(void *ctx, BerthBytes bytes);
    /* The message of a refusal or a failure, copied; the last call counts. */
    void (*set_message)(void *ctx, BerthBytes bytes);
    /* The failed script's exit code (1-255), with BERTH_SCRIPT_EXITED. */
    void (*set_exit_code)(void *ctx, int32_t code);
    /* Non-zero once the runner asked to stop. */
    int32_t (*is_cancelled)(void *ctx);
} BerthHost;

/* The table a plugin exports. Every operation but destroy gets the host of
 * the call and returns a BerthStatus. */
typedef struct BerthPlugin {
    uint32_t size;      /* sizeof(BerthPlugin) as the plugin knows it */
    uint16_t abi_major; /* BERTH_ABI_MAJOR */
    uint16_t abi_minor; /* BERTH_ABI_MINOR */
    /* Builds an instance for the runner from its settings; stores it in *instance. */
    int32_t (*create)(const BerthHost *host, BerthBytes settings, BerthBytes runner, void **instance);
    /* Frees an instance made by create. */
    void (*destroy)(void *instance);
    /* Output: the description. */
    int32_t (*describe)(void *instance, const BerthHost *host);
    /* What to tell the runner before the job starts. Output: config's document. */
    int32_t (*config)(void *instance, const BerthHost *host, BerthBytes job);
    /* Creates the job's environment (the state is locked and fresh). */
    int32_t (*prepare)(void *instance, const BerthHost *host, BerthBytes job, BerthBytes state);
    /* Runs one stage: script is the path of a bash program on the host, stage
     * its name (UTF-8; accept names you do not know). */
    int32_t (*run)(void *instance, const BerthHost *host, BerthBytes job, BerthBytes state, BerthBytes script,
                   BerthBytes stage);
    /* Removes everything of the job, from the state alone; idempotent. */
    int32_t (*cleanup)(void *instance, const BerthHost *host, BerthBytes state);
    /* Removes what jobs not in `known` left. Output: the lines, one per thing removed. */
    int32_t (*reap_orphans)(void *instance, const BerthHost *host, BerthBytes known);
} BerthPlugin;

/* The entry point. */
const BerthPlugin *berth_backend_v1(void);

#endif /* BERTH_BACKEND_H */
