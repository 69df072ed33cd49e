/*
 * example-c: a berth backend plugin in C, written from berth_backend.h and
 * docs/writing-a-backend-in-c.md (which walks through this file).
 *
 * Host-level: each stage runs with bash on the host, in a per-job directory
 * under berth's state directory (<state_dir>/example-c/<job key>/), which
 * config names as the job's builds and cache directories. No isolation: an
 * example to learn the ABI from, not a backend for untrusted jobs.
 *
 * Build: make (needs only a C compiler and the header).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "berth_backend.h"

/* ---- Talking to the host ---- */

static BerthBytes bytes_of(const char *text) {
    BerthBytes b = {(const uint8_t *)text, strlen(text)};
    return b;
}

/* Formats `format` and the arguments after it into the array `buf`. */
#define FORMAT(buf, format)                              \
    do {                                                 \
        va_list args;                                    \
        va_start(args, format);                          \
        vsnprintf(buf, sizeof buf, format, args);        \
        va_end(args);                                    \
    } while (0)

/* A failure: the message goes to the host (which copies it), the status back. */
static int32_t fail(const BerthHost *host, int32_t status, const char *format, ...) {
    char message[1024];
    FORMAT(message, format);
    host->set_message(host->ctx, bytes_of(message));
    return status;
}

/* A runner-side log line (BERTH_LOG=plugin=debug shows debug ones). */
static void logf_host(const BerthHost *host, int32_t level, const char *format, ...) {
    char line[1024];
    FORMAT(line, format);
    host->log(host->ctx, level, bytes_of(line));
}

/* The host must speak our major version and be at least as large as we know it. */
static int host_ok(const BerthHost *host) {
    return host != NULL && host->abi_major == BERTH_ABI_MAJOR && host->size >= sizeof(BerthHost);
}

/* ---- A small JSON reader: enough for berth's documents ---- */

/* A JSON value's text. */
typedef struct {
    const char *p, *end;
} Json;

static const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* The end of the string starting at p (at its quote), or NULL. */
static const char *skip_string(const char *p, const char *end) {
    for (p++; p < end; p++) {
        if (*p == '\\') p++;
        else if (*p == '"') return p + 1;
    }
    return NULL;
}

/* The end of the value starting at p, or NULL if it is malformed. */
static const char *skip_value(const char *p, const char *end) {
    p = ws(p, end);
    if (p >= end) return NULL;
    if (*p == '"') return skip_string(p, end);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = ws(p + 1, end);
        if (p < end && *p == close) return p + 1;
        for (;;) {
            if (close == '}') {
                if (p >= end || *p != '"' || !(p = skip_string(p, end))) return NULL;
                p = ws(p, end);
                if (p >= end || *p != ':') return NULL;
                p++;
            }
            if (!(p = skip_value(p, end))) return NULL;
            p = ws(p, end);
            if (p < end && *p == ',') p = ws(p + 1, end);
            else if (p < end && *p == close) return p + 1;
            else return NULL;
        }
    }
    while (p < end && (strchr("+-.eE", *p) || (*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z'))) p++;
    return p;
}

/* Walks the members of an object: call with *cursor = NULL first; 1 while
 * there is a member (its key's text, with quotes, and its value), 0 at the end. */
static int next_member(Json object, const char **cursor, Json *key, Json *value) {
    const char *p = *cursor ? *cursor : ws(object.p, object.end) + 1;
    p = ws(p, object.end);
    if (p < object.end && *p == ',') p = ws(p + 1, object.end);
    if (p >= object.end || *p != '"') return 0;
    key->p = p;
    key->end = skip_string(p, object.end);
    if (!key->end) return 0;
    p = ws(key->end, object.end);
    if (p >= object.end || *p != ':') return 0;
    value->p = ws(p + 1, object.end);
    value->end = skip_value(value->p, object.end);
    if (!value->end) return 0;
    *cursor = value->end;
    return 1;
}

static int key_is(Json key, const char *name) {
    size_t n = strlen(name);
    return (size_t)(key.end - key.p) == n + 2 && memcmp(key.p + 1, name, n) == 0;
}

/* Member `name` of an object (keys of berth's documents are plain ASCII). */
static int member(Json object, const char *name, Json *value) {
    const char *cursor = NULL;
    Json key;
    if (object.p >= object.end || *object.p != '{') return 0;
    while (next_member(object, &cursor, &key, value))
        if (key_is(key, name)) return 1;
    return 0;
}

static void put_utf8(char **out, unsigned long c) {
    if (c < 0x80) *(*out)++ = (char)c;
    else if (c < 0x800) {
        *(*out)++ = (char)(0xC0 | (c >> 6));
        *(*out)++ = (char)(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        *(*out)++ = (char)(0xE0 | (c >> 12));
        *(*out)++ = (char)(0x80 | ((c >> 6) & 0x3F));
        *(*out)++ = (char)(0x80 | (c & 0x3F));
    } else {
        *(*out)++ = (char)(0xF0 | (c >> 18));
        *(*out)++ = (char)(0x80 | ((c >> 12) & 0x3F));
        *(*out)++ = (char)(0x80 | ((c >> 6) & 0x3F));
        *(*out)++ = (char)(0x80 | (c & 0x3F));
    }
}

/* A JSON string's value, NUL-terminated, to free(); NULL if `value` is no
 * string (null, a number...) or holds a NUL. */
static char *string_of(Json value) {
    if (value.p >= value.end || *value.p != '"') return NULL;
    char *text = malloc((size_t)(value.end - value.p) + 1), *out = text;
    if (!text) return NULL;
    for (const char *p = value.p + 1; p < value.end - 1; p++) {
        if (*p != '\\') {
            *out++ = *p;
            continue;
        }
        switch (*++p) {
        case 'n': *out++ = '\n'; break;
        case 't': *out++ = '\t'; break;
        case 'r': *out++ = '\r'; break;
        case 'b': *out++ = '\b'; break;
        case 'f': *out++ = '\f'; break;
        case 'u': {
            unsigned long c = strtoul((char[5]){p[1], p[2], p[3], p[4], 0}, NULL, 16);
            p += 4;
            if (c >= 0xD800 && c < 0xDC00 && p + 6 < value.end && p[1] == '\\' && p[2] == 'u') {
                unsigned long low = strtoul((char[5]){p[3], p[4], p[5], p[6], 0}, NULL, 16);
                c = 0x10000 + ((c - 0xD800) << 10) + (low - 0xDC00);
                p += 6;
            }
            if (c == 0) {
                free(text);
                return NULL;
            }
            put_utf8(&out, c);
            break;
        }
        default: *out++ = *p; /* \" \\ \/ */
        }
    }
    *out = 0;
    return text;
}

/* Member `name` of `object` as a string, to free(); NULL if absent or not a string. */
static char *string_member(Json object, const char *name) {
    Json value;
    return member(object, name, &value) ? string_of(value) : NULL;
}

static Json json_of(BerthBytes bytes) {
    Json j = {(const char *)bytes.ptr, (const char *)bytes.ptr + bytes.len};
    if (!bytes.ptr) j.p = j.end = "";
    return j;
}

/* ---- Writing JSON: only strings need care ---- */

/* Appends `text` as a JSON string to buf (of size cap); 0 if it does not fit. */
static int put_json_string(char *buf, size_t cap, const char *text) {
    size_t n = strlen(buf);
    if (n + 2 >= cap) return 0;
    buf[n++] = '"';
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if (n + 7 >= cap) return 0;
        if (*c == '"' || *c == '\\') {
            buf[n++] = '\\';
            buf[n++] = (char)*c;
        } else if (*c < 0x20) n += (size_t)snprintf(buf + n, cap - n, "\\u%04x", *c);
        else buf[n++] = (char)*c;
    }
    buf[n++] = '"';
    buf[n] = 0;
    return 1;
}

/* ---- The backend ---- */

/* One instance per runner (per process: every hook is a new process). */
typedef struct {
    char root[4096];   /* <state_dir>/example-c: everything of every job lies below it */
    char runner[64];   /* the runner's name */
    int grace_seconds; /* SIGTERM to SIGKILL on cancel */
} Instance;

/* <root>/<job key>, from a validated job key (a-z, 0-9, '-': safe in a path). */
static int job_dir(const Instance *self, const char *key, char *out, size_t cap) {
    return snprintf(out, cap, "%s/%s", self->root, key) < (int)cap;
}

static int mkdirs(const char *path, mode_t mode) {
    char copy[4096];
    if (snprintf(copy, sizeof copy, "%s", path) >= (int)sizeof copy) return -1;
    for (char *slash = copy + 1; (slash = strchr(slash, '/')); slash++) {
        *slash = 0;
        if (mkdir(copy, mode) != 0 && errno != EEXIST) return -1;
        *slash = '/';
    }
    return mkdir(copy, mode) != 0 && errno != EEXIST ? -1 : 0;
}

static int32_t example_create(const BerthHost *host, BerthBytes settings, BerthBytes runner, void **instance) {
    if (!host_ok(host)) return BERTH_UNSUPPORTED;
    if (!instance) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: no instance pointer");
    Instance *self = calloc(1, sizeof *self);
    if (!self) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: out of memory");
    self->grace_seconds = 2;

    /* The settings: one optional key. Report a bad one as `settings.KEY: why`:
     * berth shows it with the config file, the key and its line. */
    const char *cursor = NULL;
    Json doc = json_of(settings), key, value;
    while (next_member(doc, &cursor, &key, &value)) {
        if (key_is(key, "grace_seconds")) {
            char *end = NULL;
            long n = strtol(value.p, &end, 10);
            if (end != value.end || n < 0 || n > 60) {
                free(self);
                return fail(host, BERTH_SYSTEM_FAILURE, "settings.grace_seconds: must be a whole number of seconds from 0 to 60");
            }
            self->grace_seconds = (int)n;
        } else {
            char *name = string_of(key);
            int32_t status = fail(host, BERTH_SYSTEM_FAILURE, "settings.%s: unknown setting; example-c takes only grace_seconds",
                                  name ? name : "?");
            free(name);
            free(self);
            return status;
        }
    }

    /* The runner: where berth keeps its state, and its name. */
    Json info = json_of(runner);
    char *state_dir = string_member(info, "state_dir"), *name = string_member(info, "name");
    char *builds_dir = string_member(info, "builds_dir");
    int32_t status = BERTH_OK;
    if (!state_dir || !name) {
        status = fail(host, BERTH_SYSTEM_FAILURE, "example-c: the runner document has no state_dir or name");
    } else if (builds_dir) {
        /* The job runs in the host's filesystem: a builds_dir from the runner's
         * TOML would be a host directory outside berth's state. */
        status = fail(host, BERTH_SYSTEM_FAILURE,
                      "example-c runs jobs on the host, so builds_dir %s would be the host's own directory: remove "
                      "builds_dir from runner %s (example-c puts each job's under %s/example-c)",
                      builds_dir, name, state_dir);
    } else if (snprintf(self->root, sizeof self->root, "%s/example-c", state_dir) >= (int)sizeof self->root ||
               snprintf(self->runner, sizeof self->runner, "%s", name) >= (int)sizeof self->runner) {
        status = fail(host, BERTH_SYSTEM_FAILURE, "example-c: the state directory's path is too long");
    }
    free(state_dir);
    free(name);
    free(builds_dir);
    if (status != BERTH_OK) {
        free(self);
        return status;
    }
    *instance = self;
    return BERTH_OK;
}

static void example_destroy(void *instance) { free(instance); }

static int32_t example_describe(void *instance, const BerthHost *host) {
    (void)instance;
    if (!host_ok(host)) return BERTH_UNSUPPORTED;
    host->set_output(host->ctx, bytes_of("{\"name\":\"example-c\",\"version\":\"0.1.0\","
                                         "\"summary\":\"example in C: bash on the host in a per-job directory, no isolation\","
                                         "\"isolation\":\"host\",\"capabilities\":{\"executes_scripts\":true,\"cancel\":true,"
                                         "\"reap\":false,\"images\":false,\"concurrent_jobs\":true,\"contains_root\":false}}"));
    return BERTH_OK;
}

/* The job's trusted key, from the context of ABI 1.1 (never from a variable:
 * a job can set CUSTOM_ENV_CI_JOB_ID). To free(); NULL with a message set. */
static char *job_key(const BerthHost *host, BerthBytes job) {
    Json context;
    char *key = member(json_of(job), "context", &context) ? string_member(context, "key") : NULL;
    if (!key) fail(host, BERTH_SYSTEM_FAILURE, "example-c needs berth with plugin ABI 1.1 (a job document with a context)");
    return key;
}

static int32_t example_config(void *instance, const BerthHost *host, BerthBytes job) {
    if (!host_ok(host)) return BERTH_UNSUPPORTED;
    Instance *self = instance;
    char *key = job_key(host, job);
    if (!key) return BERTH_SYSTEM_FAILURE;
    char dir[4200], out[9000] = "{\"output\":{\"builds_dir\":";
    int fits = job_dir(self, key, dir, sizeof dir - 10);
    free(key);
    if (!fits) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: the job directory's path is too long");
    size_t end = strlen(dir);
    strcpy(dir + end, "/builds");
    fits = put_json_string(out, sizeof out, dir);
    strcpy(dir + end, "/cache");
    fits = fits && strlen(out) + 20 < sizeof out && strcat(out, ",\"cache_dir\":") && put_json_string(out, sizeof out, dir) &&
           strlen(out) + 3 < sizeof out;
    if (!fits) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: the job directory's path is too long");
    strcat(out, "}}");
    host->set_output(host->ctx, bytes_of(out));
    return BERTH_OK;
}

static int32_t example_prepare(void *instance, const BerthHost *host, BerthBytes job, BerthBytes state) {
    (void)state;
    if (!host_ok(host)) return BERTH_UNSUPPORTED;
    Instance *self = instance;
    char *key = job_key(host, job);
    if (!key) return BERTH_SYSTEM_FAILURE;
    char dir[4200];
    int fits = job_dir(self, key, dir, sizeof dir - 10);
    logf_host(host, BERTH_LOG_DEBUG, "[example-c] prepare job=%s", key);
    free(key);
    if (!fits) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: the job directory's path is too long");
    if (mkdirs(self->root, 0755) != 0) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: cannot create %s: %s", self->root, strerror(errno));
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: cannot create %s: %s", dir, strerror(errno));
    strcat(dir, "/builds");
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: cannot create %s: %s", dir, strerror(errno));
    /* One line for the job log (stdout is the user's job log). */
    printf("example-c: the job runs with bash on the host, in %s\n", dir);
    fflush(stdout);
    return BERTH_OK;
}

/* Sleeps up to `ms`, or until cancel_fd becomes readable (then returns 1). */
static int wait_cancel(const BerthHost *host, int ms) {
    if (host->cancel_fd < 0) {
        struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
        nanosleep(&t, NULL);
        return 0;
    }
    struct pollfd pfd = {host->cancel_fd, POLLIN, 0};
    return poll(&pfd, 1, ms) > 0;
}

static int32_t example_run(void *instance, const BerthHost *host, BerthBytes job, BerthBytes state, BerthBytes script,
                           BerthBytes stage) {
    (void)state;
    if (!host_ok(host)) return BERTH_UNSUPPORTED;
    Instance *self = instance;
    char *key = job_key(host, job);
    if (!key) return BERTH_SYSTEM_FAILURE;
    char dir[4200], path[4096];
    int fits = job_dir(self, key, dir, sizeof dir);
    free(key);
    if (!fits || script.len >= sizeof path) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: a path is too long");
    memcpy(path, script.ptr, script.len);
    path[script.len] = 0;
    struct stat st;
    if (stat(dir, &st) != 0)
        return fail(host, BERTH_SYSTEM_FAILURE, "example-c: the job directory %s is gone (%s): was prepare run?", dir,
                    strerror(errno));
    logf_host(host, BERTH_LOG_DEBUG, "[example-c] run stage=%.*s", (int)stage.len, (const char *)stage.ptr);

    /* Everything the child needs is made before fork: after it, only
     * async-signal-safe calls until exec. */
    char home[4210];
    snprintf(home, sizeof home, "HOME=%s", dir);
    char *argv[] = {"bash", path, NULL};
    char *envp[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", home, "LANG=C.UTF-8", NULL};
    sigset_t none;
    sigemptyset(&none);
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: cannot start bash: %s", strerror(errno));
    if (pid == 0) {
        /* Its own process group: a cancel or the end of the stage reaches
         * everything the script started. */
        setpgid(0, 0);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        int null = open("/dev/null", O_RDONLY);
        if (null < 0 || dup2(null, 0) < 0 || chdir(dir) != 0) _exit(127);
        close_range(3, ~0U, 0); /* nothing of berth's but the job log (1, 2) */
        execve("/bin/bash", argv, envp);
        _exit(127);
    }
    setpgid(pid, pid); /* also here: no race with the kill below */

    int status = 0, cancelled = 0;
    for (;;) {
        pid_t done = waitpid(pid, &status, WNOHANG);
        if (done == pid) break;
        if (done < 0 && errno != EINTR) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: waitpid: %s", strerror(errno));
        if (!cancelled && wait_cancel(host, 50)) {
            /* The runner asked to stop: SIGTERM, a grace period, SIGKILL. */
            cancelled = 1;
            kill(-pid, SIGTERM);
            int ended = 0;
            for (int waited = 0; !ended && waited < self->grace_seconds * 1000; waited += 50) {
                ended = waitpid(pid, &status, WNOHANG) == pid;
                if (!ended) nanosleep(&(struct timespec){0, 50L * 1000 * 1000}, NULL);
            }
            kill(-pid, SIGKILL);
            if (!ended) waitpid(pid, &status, 0);
            break;
        }
    }
    /* The stage is over: nothing it started may survive or hold the job log. */
    kill(-pid, SIGKILL);
    if (cancelled) return BERTH_CANCELLED;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code == 0) return BERTH_OK;
    host->set_exit_code(host->ctx, code);
    return fail(host, BERTH_SCRIPT_EXITED, "the script exited with %d", code);
}

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st;
    (void)ftw;
    return (type == FTW_DP ? rmdir(path) : unlink(path)) != 0 && errno != ENOENT ? -1 : 0;
}

static int32_t example_cleanup(void *instance, const BerthHost *host, BerthBytes state) {
    if (!host_ok(host)) return BERTH_UNSUPPORTED;
    Instance *self = instance;
    /* From the state alone: berth's reap calls cleanup without a job. */
    char *key = string_member(json_of(state), "key");
    if (!key) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: the state document has no key");
    char dir[4200];
    int fits = job_dir(self, key, dir, sizeof dir);
    free(key);
    if (!fits) return fail(host, BERTH_SYSTEM_FAILURE, "example-c: the job directory's path is too long");
    /* Never prepared, or already cleaned: nothing to do, and that is a success. */
    if (nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT) != 0 && errno != ENOENT)
        return fail(host, BERTH_SYSTEM_FAILURE, "example-c: cannot remove %s: %s", dir, strerror(errno));
    logf_host(host, BERTH_LOG_INFO, "[example-c] removed %s", dir);
    return BERTH_OK;
}

static int32_t example_reap_orphans(void *instance, const BerthHost *host, BerthBytes known) {
    (void)instance;
    (void)known;
    if (!host_ok(host)) return BERTH_UNSUPPORTED;
    /* example-c declares no reap capability: it finds nothing to remove. */
    host->set_output(host->ctx, bytes_of("[]"));
    return BERTH_OK;
}

static const BerthPlugin TABLE = {
    sizeof(BerthPlugin),  BERTH_ABI_MAJOR, BERTH_ABI_MINOR, example_create,  example_destroy,     example_describe,
    example_config,       example_prepare, example_run,     example_cleanup, example_reap_orphans,
};

const BerthPlugin *berth_backend_v1(void) { return &TABLE; }
